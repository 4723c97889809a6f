//! Files the coordinator writes whole: PXE profiles, the tokens file, its key and certificate.
//!
//! Each is written to a temporary file of its own in the same directory (a unique name, so two
//! writers never share one), flushed, given its mode, then renamed over the target (or linked,
//! for [`create_new`]): a reader sees the old file or the new one, never a part of either, and
//! a secret never exists with a wider mode than asked, whatever the umask or an earlier file's
//! mode.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A temporary file next to `path`, opened with `mode`; removed when dropped unless kept.
struct Temp {
    path: PathBuf,
    keep: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` into a new temporary file next to `path` with exactly `mode` (the umask does
/// not apply: the mode is set again after creation) and syncs it.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<Temp> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut last = None;
    // A unique name: the pid and random bits (a few tries in case a stale file holds it).
    for _ in 0..8 {
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            kd_proto::manifest::hex(&r)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(mut f) => {
                let t = Temp {
                    path: tmp,
                    keep: false,
                };
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
                f.write_all(bytes)?;
                f.sync_all()?;
                return Ok(t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary file name")))
}

/// Replaces `path` with `bytes` atomically (temporary file, then rename), with `mode`. Creates
/// the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut t = write_temp(path, bytes, mode)?;
    std::fs::rename(&t.path, path)?;
    t.keep = true;
    Ok(())
}

/// Creates `path` with `bytes` and `mode`, atomically and only if it does not exist (temporary
/// file, then a hard link, which fails if `path` exists). `Ok(false)`: it existed (left as is).
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<bool> {
    let t = write_temp(path, bytes, mode)?;
    match std::fs::hard_link(&t.path, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives an existing file `mode` if it has another one; returns whether it changed.
pub fn ensure_mode(path: &Path, mode: u32) -> std::io::Result<bool> {
    let now = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if now == mode {
        return Ok(false);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_are_exact_and_no_temporary_file_stays() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        std::fs::write(&p, b"old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(mode(&p), 0o600);
        let q = d.path().join("other");
        assert!(create_new(&q, b"first", 0o600).unwrap());
        assert!(!create_new(&q, b"second", 0o600).unwrap());
        assert_eq!(std::fs::read(&q).unwrap(), b"first");
        assert_eq!(mode(&q), 0o600);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(ensure_mode(&q, 0o600).unwrap());
        assert!(!ensure_mode(&q, 0o600).unwrap());
        assert_eq!(mode(&q), 0o600);
    }
}
