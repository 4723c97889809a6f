//! The only `unsafe` of kd-disk: thin wrappers over system calls that neither std nor nix offer.
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in name"))
}

/// Set the extended attribute `name` of `path` (not following a final symlink).
pub fn set_xattr(path: &Path, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let n = cstr(name.as_bytes())?;
    // SAFETY: `p` and `n` are valid NUL-terminated strings alive for the call; `value` is a valid
    // slice whose pointer and length are passed together; lsetxattr does not keep them.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Read the extended attribute `name` of `path` (not following a final symlink); `None` if absent.
pub fn get_xattr(path: &Path, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
    let p = cstr(path.as_os_str().as_bytes())?;
    let n = cstr(name.as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid NUL-terminated strings; `buf` is writable for `buf.len()` bytes and the kernel
    // writes at most that many.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        return Err(e);
    }
    buf.truncate(usize::try_from(r).unwrap_or(0));
    Ok(Some(buf))
}

mod ioctl {
    nix::ioctl_none!(blkrrpart, 0x12, 95);
}

/// Ask the kernel to re-read the partition table of the block device open as `dev` (BLKRRPART).
pub fn blkrrpart(dev: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: BLKRRPART takes no argument; the fd is an open descriptor borrowed for the call.
    // The kernel checks that it is a block device and returns an error otherwise.
    unsafe { ioctl::blkrrpart(dev.as_raw_fd()) }
        .map(drop)
        .map_err(io::Error::from)
}
