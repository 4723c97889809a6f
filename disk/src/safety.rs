//! Checks made before anything is written: the target must be a block device that holds no
//! mounted file system or active swap, is not the device of `/`, has no holders (LVM, RAID),
//! and is large enough for the layout.
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{DiskError, IoContext};

fn refuse(dev: &Path, reason: impl Into<String>) -> DiskError {
    DiskError::Unsafe {
        device: dev.to_path_buf(),
        reason: reason.into(),
    }
}

/// `major:minor` of a device number.
fn majmin(rdev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// The whole disk a block device number belongs to (itself if it is not a partition).
fn whole_disk(mm: &str) -> String {
    let base = PathBuf::from(format!("/sys/dev/block/{mm}"));
    if base.join("partition").exists() {
        if let Ok(d) = std::fs::read_to_string(base.join("../dev")) {
            return d.trim().to_string();
        }
    }
    mm.to_string()
}

/// Devices (`major:minor`) whose data lives on `disk_mm`: the disk itself, its partitions,
/// and loop devices backed by any of them (recursively, e.g. kd's own partition loops).
fn devices_on(disk_mm: &str, disk_path: &Path) -> Vec<String> {
    let mut out = vec![disk_mm.to_string()];
    if let Ok(rd) = std::fs::read_dir("/sys/dev/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if whole_disk(&name) == disk_mm && name != disk_mm {
                out.push(name);
            }
        }
    }
    // Loop devices backed by the disk (the backing file names the device node).
    let mut i = 0;
    while i < out.len() && i < 4096 {
        let cur = out[i].clone();
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let bf = e.path().join("loop/backing_file");
                let Ok(backing) = std::fs::read_to_string(&bf) else {
                    continue;
                };
                let backing = backing.trim();
                let Ok(md) = std::fs::metadata(backing) else {
                    continue;
                };
                let hit = (md.file_type().is_block_device() && majmin(md.rdev()) == cur)
                    || (i == 0 && Path::new(backing) == disk_path);
                if hit {
                    if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                        let d = d.trim().to_string();
                        if !out.contains(&d) {
                            out.push(d);
                        }
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// `major:minor` and mount point of every mounted file system (`/proc/self/mountinfo`).
fn mounts() -> Result<Vec<(String, String)>, DiskError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .ctx(|| "reading /proc/self/mountinfo".into())?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let mm = f.nth(2)?.to_string();
            let point = f.nth(1)?.to_string();
            Some((mm, point))
        })
        .collect())
}

/// Refuse `dev` unless it is a block device that is not in use; returns its size in bytes.
/// `needed`: bytes the layout needs (0 to skip).
pub fn check_device(dev: &Path, needed: u64) -> Result<u64, DiskError> {
    let md = std::fs::metadata(dev).map_err(|e| refuse(dev, format!("cannot stat it: {e}")))?;
    if !md.file_type().is_block_device() {
        return Err(refuse(dev, "not a block device"));
    }
    let mm = majmin(md.rdev());
    if whole_disk(&mm) != mm {
        return Err(refuse(dev, "it is a partition, not a whole disk"));
    }
    let ours = devices_on(&mm, dev);
    // The device of `/`.
    let root = std::fs::metadata("/").ctx(|| "stat /".into())?;
    let root_mm = majmin(root.dev());
    if ours.contains(&root_mm) || ours.contains(&whole_disk(&root_mm)) {
        return Err(refuse(dev, "it holds the root file system of this system"));
    }
    for (m, point) in mounts()? {
        if ours.contains(&m) {
            return Err(refuse(
                dev,
                format!("it holds a mounted file system ({m} on {point})"),
            ));
        }
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(p) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(s) = std::fs::metadata(p) {
                if s.file_type().is_block_device() && ours.contains(&majmin(s.rdev())) {
                    return Err(refuse(dev, format!("it holds an active swap ({p})")));
                }
            }
        }
    }
    let holders = PathBuf::from(format!("/sys/dev/block/{mm}/holders"));
    if let Ok(rd) = std::fs::read_dir(&holders) {
        let names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !names.is_empty() {
            return Err(refuse(dev, format!("it is held by {}", names.join(", "))));
        }
    }
    let mut f =
        std::fs::File::open(dev).map_err(|e| refuse(dev, format!("cannot open it: {e}")))?;
    let size = crate::write::target_size(&mut f).ctx(|| format!("size of {}", dev.display()))?;
    if needed > size {
        return Err(refuse(
            dev,
            format!("it is smaller than the layout ({size} bytes, the layout needs {needed})"),
        ));
    }
    Ok(size)
}
