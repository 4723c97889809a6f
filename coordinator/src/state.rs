//! The coordinator's state directory (`--state`, `/var/lib/kd`): created mode 0700 whatever the
//! umask, and a lock (`STATE/.lock`) that serialises what several `kd-coord` processes do to its
//! shared files (the identity: see [`crate::pki::CoordIdentity::load_or_create`]).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long [`Lock::take`] waits for another `kd-coord` to release the state lock (it is held
/// for the milliseconds it takes to read or create the identity).
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Creates the state directory if it does not exist: mode 0700 (set again after creation, so
/// the umask does not matter); missing parents get 0755. An existing directory keeps its mode
/// (it may be any directory the operator named), with a warning when others can read it.
pub fn create_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of {}", dir.display()))?,
            // Another kd-coord made it at the same time (and sets its mode).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot create state directory {}", dir.display()))
            }
        }
    }
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("state directory {}", dir.display()))?
        .permissions()
        .mode();
    // Search (x) for others is what the daemon's socket needs; read (list) is what to avoid.
    if mode & 0o044 != 0 {
        tracing::warn!(
            "state directory {} has mode {:o}: others may list it (kd-coord's secrets in it are \
             0600; `chmod 700` it to hide the rest)",
            dir.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// The state directory's lock (`STATE/.lock`), released when dropped.
#[derive(Debug)]
pub struct Lock {
    _file: std::fs::File,
}

impl Lock {
    /// Takes the lock of `dir` (which must exist), waiting up to [`LOCK_WAIT`].
    pub fn take(dir: &Path) -> Result<Self> {
        Self::take_within(dir, LOCK_WAIT)
    }

    /// Takes the lock of `dir`, waiting up to `wait`.
    pub fn take_within(dir: &Path, wait: Duration) -> Result<Self> {
        let path = dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let t0 = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Lock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if t0.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(std::fs::TryLockError::WouldBlock) => bail!(
                    "{} is held by another kd-coord for more than {} s: is one stuck? (it is \
                     released when that process exits)",
                    path.display(),
                    wait.as_secs()
                ),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_is_private_and_the_lock_excludes() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("a/b/state");
        create_dir(&s).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&s), 0o700);
        // An existing directory keeps its mode.
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_dir(&s).unwrap();
        assert_eq!(mode(&s), 0o750);
        let held = Lock::take(&s).unwrap();
        let e = Lock::take_within(&s, Duration::from_millis(50)).unwrap_err();
        assert!(format!("{e:#}").contains(".lock is held"), "{e:#}");
        drop(held);
        Lock::take_within(&s, Duration::from_millis(50)).unwrap();
    }
}
