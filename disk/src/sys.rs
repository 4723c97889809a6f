//! The only `unsafe` of kd-disk: thin wrappers over system calls that neither std nor nix offer.
use std::io;
use std::os::fd::AsRawFd;

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
