//! Files the coordinator writes whole: PXE profiles, the tokens file, its key and certificate.
//!
//! Each is written to a temporary file of its own in the same directory (a unique name, so two
//! writers never share one), flushed, given its mode, then renamed over the target (or linked,
//! for [`create_new`]): a reader sees the old file or the new one, never a part of either, and
//! a secret never exists with a wider mode than asked, whatever the umask or an earlier file's
//! mode.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tempfile::NamedTempFile;

/// Writes `bytes` into a new temporary file next to `path` (a unique name: tempfile's) with
/// exactly `mode` (the umask does not apply: the mode is set again after creation) and syncs
/// it; it is removed when dropped unless persisted.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<NamedTempFile> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut t = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    t.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    t.write_all(bytes)?;
    t.as_file().sync_all()?;
    Ok(t)
}

/// Replaces `path` with `bytes` atomically (temporary file, then rename), with `mode`. Creates
/// the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_temp(path, bytes, mode)?
        .persist(path)
        .map_err(|e| e.error)?;
    Ok(())
}

/// Creates `path` with `bytes` and `mode`, atomically and only if it does not exist (temporary
/// file, then a no-clobber persist, which fails if `path` exists). `Ok(false)`: it existed (left
/// as is).
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<bool> {
    match write_temp(path, bytes, mode)?.persist_noclobber(path) {
        Ok(_) => Ok(true),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.error),
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
