//! Loop devices (through losetup), detached when dropped: the fallback that reaches partitions
//! on kernels that create no partition nodes, and the disks of the tests.
use std::path::{Path, PathBuf};

use crate::cmd;
use crate::error::DiskError;

/// An attached loop device; detached on drop (errors ignored) or by [`LoopDevice::detach`].
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    /// Attach `backing` (a file or a block device). `range`: (offset, size limit) in bytes.
    /// `partscan`: ask the kernel to scan partitions (`losetup -P`).
    pub fn attach(
        backing: &Path,
        range: Option<(u64, u64)>,
        partscan: bool,
    ) -> Result<Self, DiskError> {
        let mut args: Vec<String> = vec!["--find".into(), "--show".into()];
        if let Some((off, len)) = range {
            args.push(format!("--offset={off}"));
            args.push(format!("--sizelimit={len}"));
        }
        if partscan {
            args.push("--partscan".into());
        }
        args.push(backing.to_string_lossy().into_owned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cmd::quick("losetup", &argv)?;
        let path = PathBuf::from(out.lines().next().unwrap_or("").trim());
        if !path.starts_with("/dev/") {
            return Err(DiskError::Internal(format!("losetup printed `{out}`")));
        }
        Ok(LoopDevice {
            path,
            attached: true,
        })
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detach now, reporting errors.
    pub fn detach(mut self) -> Result<(), DiskError> {
        self.attached = false;
        detach(&self.path)
    }
}

fn detach(p: &Path) -> Result<(), DiskError> {
    // A just-unmounted device can be briefly busy: retry a few times.
    let mut last = None;
    for _ in 0..20 {
        match cmd::quick("losetup", &["-d", &p.to_string_lossy()]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(last.unwrap_or_else(|| DiskError::Internal("losetup -d".into())))
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = detach(&self.path) {
                tracing::warn!("detaching {}: {e}", self.path.display());
            }
        }
    }
}

/// Whether loop devices can be used here (`/dev/loop-control` exists).
pub fn loop_available() -> bool {
    Path::new("/dev/loop-control").exists()
}
