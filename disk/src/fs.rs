//! Creating file systems (mkfs.ext4 with Kadeploy's options, mkfs.xfs, mkswap, mkfs.vfat) and
//! reading their UUIDs.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cmd;
use crate::error::DiskError;
use crate::layout::FsType;

/// Kadeploy's ext2/3/4 options (`-b 4096 -O sparse_super,filetype,resize_inode,dir_index`),
/// quiet and forced.
pub const EXT_OPTIONS: &[&str] = &[
    "-q",
    "-F",
    "-b",
    "4096",
    "-O",
    "sparse_super,filetype,resize_inode,dir_index",
];

/// The mkfs command line for `fs` on `dev`.
pub fn mkfs_command(fs: FsType, dev: &Path, label: Option<&str>) -> Command {
    let (prog, args, label_flag): (&str, &[&str], &str) = match fs {
        FsType::Ext4 => ("mkfs.ext4", EXT_OPTIONS, "-L"),
        FsType::Ext3 => ("mkfs.ext3", EXT_OPTIONS, "-L"),
        FsType::Ext2 => ("mkfs.ext2", EXT_OPTIONS, "-L"),
        FsType::Xfs => ("mkfs.xfs", &["-q", "-f"], "-L"),
        FsType::Vfat => ("mkfs.vfat", &[], "-n"),
        FsType::Swap => ("mkswap", &["-f"], "-L"),
    };
    let mut c = Command::new(prog);
    c.args(args);
    if let Some(l) = label {
        c.args([label_flag, l]);
    }
    c.arg(dev);
    c
}

/// Create file system `fs` on `dev`; returns the tool's output.
/// A device just written or re-read can be briefly held open exclusively by a prober (udev's
/// blkid): mke2fs then says "apparently in use by the system". Such failures are retried a few
/// times.
pub fn mkfs(fs: FsType, dev: &Path, label: Option<&str>) -> Result<String, DiskError> {
    let mut tries = 0;
    loop {
        match cmd::run(&mut mkfs_command(fs, dev, label), Duration::from_secs(600)) {
            Err(DiskError::Command { output, .. }) if output.contains("in use") && tries < 10 => {
                tries += 1;
                tracing::info!("{} busy, mkfs retried: {}", dev.display(), output.trim());
                std::thread::sleep(Duration::from_millis(300));
            }
            r => return r,
        }
    }
}

/// Probe `dev` (bypassing blkid's cache) for a tag: `UUID`, `TYPE`...; `None` if absent.
pub fn probe(dev: &Path, tag: &str) -> Result<Option<String>, DiskError> {
    let r = cmd::run(
        Command::new("blkid")
            .args(["-p", "-o", "value", "-s", tag])
            .arg(dev),
        Duration::from_secs(60),
    );
    match r {
        Ok(out) => {
            let v = out.lines().next().unwrap_or("").trim().to_string();
            Ok(if v.is_empty() { None } else { Some(v) })
        }
        // blkid exits 2 when nothing was found.
        Err(DiskError::Command { status, .. }) if status.contains("exit status: 2") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The UUID of the file system or swap on `dev`.
pub fn uuid(dev: &Path) -> Result<String, DiskError> {
    probe(dev, "UUID")?
        .ok_or_else(|| DiskError::BadImage(format!("no file system UUID on {}", dev.display())))
}
