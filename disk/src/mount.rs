//! Private mounts, unmounted on every path out (a guard type).
use std::path::{Path, PathBuf};

pub use nix::mount::MsFlags;
use nix::mount::{mount, umount2, MntFlags};

use crate::error::{DiskError, IoContext};

/// A mounted file system; unmounted (lazily if busy) when dropped.
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mount `source` of type `fstype` on `target` (created if missing), then make the mount
    /// private so that it never propagates to other mount namespaces.
    pub fn new(
        source: &Path,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<Mount, DiskError> {
        std::fs::create_dir_all(target).ctx(|| format!("creating {}", target.display()))?;
        mount(Some(source), target, fstype, flags, data).ctx(|| {
            format!(
                "mounting {} on {} ({})",
                source.display(),
                target.display(),
                fstype.unwrap_or("bind")
            )
        })?;
        let m = Mount {
            target: target.to_path_buf(),
            mounted: true,
        };
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .ctx(|| format!("making {} private", target.display()))?;
        Ok(m)
    }

    /// Bind-mount `source` on `target`.
    pub fn bind(source: &Path, target: &Path) -> Result<Mount, DiskError> {
        Mount::new(source, target, None, MsFlags::MS_BIND, None)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmount now, reporting errors (retried a few times while busy).
    pub fn unmount(mut self) -> Result<(), DiskError> {
        self.mounted = false;
        let mut last = None;
        for _ in 0..20 {
            match umount2(&self.target, MntFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let e = last
            .map(std::io::Error::from)
            .unwrap_or_else(|| std::io::Error::other("umount"));
        // Do not leave it behind: detach it lazily, but report the failure.
        let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        Err(DiskError::io(
            format!("unmounting {}", self.target.display()),
            e,
        ))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted && umount2(&self.target, MntFlags::empty()).is_err() {
            let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}
