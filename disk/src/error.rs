//! The one error type of kd-disk.
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the disk pipeline. Messages name the object and the reason.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O call failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image is larger than its target (partition, device or file).
    #[error(
        "image overflows its target {}: the target holds {limit} bytes, the image needs at least {needed}",
        target.display()
    )]
    ImageTooLarge {
        /// The target written to.
        target: PathBuf,
        /// The target's size in bytes.
        limit: u64,
        /// Bytes the image needed so far (a lower bound of its size).
        needed: u64,
    },
    /// A tar entry that would escape the target directory or write through a symlink.
    #[error("refused tar entry `{path}`: {reason}")]
    UnsafeEntry {
        /// The entry's path as stored in the archive.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// The image stream ended early or is not a valid image.
    #[error("bad image: {0}")]
    BadImage(String),
    /// The disk layout is invalid.
    #[error("invalid disk layout: {0}")]
    Layout(String),
    /// A safety check refused the target device before anything was written.
    #[error("refusing device {}: {reason}", device.display())]
    Unsafe {
        /// The device refused.
        device: PathBuf,
        /// Why.
        reason: String,
    },
    /// An external command failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status or the reason it did not complete (e.g. timeout).
        status: String,
        /// Its captured output (stdout and stderr, possibly shortened).
        output: String,
    },
    /// A worker thread panicked or vanished.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DiskError {
    /// An [`DiskError::Io`] with a context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        DiskError::Io {
            context: context.into(),
            source,
        }
    }
}

/// `.ctx("...")?` on io results.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, DiskError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, DiskError> {
        self.map_err(|e| DiskError::io(context(), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, DiskError> {
        self.map_err(|e| DiskError::io(context(), io::Error::from(e)))
    }
}
