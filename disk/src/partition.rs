//! Partition tables (gptman / mbrman), re-reading them (BLKRRPART with retries), and reaching
//! the partitions: kernel nodes when they appear, loop devices with offset and size limit over
//! the disk otherwise.
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{DiskError, IoContext};
use crate::layout::{is_logical, Label, Plan, PlannedPartition, Role};
use crate::loopdev::LoopDevice;
use crate::sys;

const SECTOR: u64 = 512;

/// GPT type GUIDs (mixed-endian bytes as stored on disk).
fn gpt_type(role: Role) -> [u8; 16] {
    // "0FC63DAF-8483-4772-8E79-3D69D8477DE4" Linux filesystem
    const LINUX: [u8; 16] = guid(
        0x0FC63DAF,
        0x8483,
        0x4772,
        [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
    );
    // "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" Linux swap
    const SWAP: [u8; 16] = guid(
        0x0657FD6D,
        0xA4AB,
        0x43C4,
        [0x84, 0xE5, 0x09, 0x33, 0xC8, 0x4B, 0x4F, 0x4F],
    );
    // "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" EFI system
    const ESP: [u8; 16] = guid(
        0xC12A7328,
        0xF81F,
        0x11D2,
        [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
    );
    // "21686148-6449-6E6F-744E-656564454649" BIOS boot
    const BIOS: [u8; 16] = guid(
        0x21686148,
        0x6449,
        0x6E6F,
        [0x74, 0x4E, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49],
    );
    match role {
        Role::Swap => SWAP,
        Role::Esp => ESP,
        Role::BiosGrub => BIOS,
        _ => LINUX,
    }
}

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

fn mbr_type(role: Role) -> u8 {
    match role {
        Role::Swap => 0x82,
        Role::Esp => 0xEF,
        _ => 0x83,
    }
}

/// Random bytes from the kernel (getrandom(2)).
pub fn random_bytes<const N: usize>() -> Result<[u8; N], DiskError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(std::io::Error::from)
        .ctx(|| "getrandom".into())?;
    Ok(b)
}

/// A random version-4 UUID as bytes (RFC 4122 byte order).
pub fn random_guid() -> Result<[u8; 16], DiskError> {
    let mut g: [u8; 16] = random_bytes()?;
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    Ok(g)
}

fn keep_mismatch(p: &PlannedPartition, found: Option<(u64, u64)>) -> DiskError {
    DiskError::Layout(match found {
        Some((s, l)) => format!(
            "keep partition {} is at bytes {}+{} on the disk but the layout puts it at {}+{}: refusing to move it",
            p.number, s, l, p.start, p.size
        ),
        None => format!(
            "keep partition {} does not exist in the disk's current partition table",
            p.number
        ),
    })
}

/// Write the partition table of `plan` onto `disk` (a block device or an image file).
/// `keep` partitions must already exist at the same place: their entry is carried over and
/// their bytes are never written. Only the table sectors are written.
pub fn write_table(disk: &Path, plan: &Plan) -> Result<(), DiskError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .ctx(|| format!("opening {}", disk.display()))?;
    match plan.label {
        Label::Gpt => write_gpt(&mut f, plan)?,
        Label::Msdos => {
            write_mbr(&mut f, plan)?;
            wipe_gpt(&mut f).ctx(|| format!("wiping the old GPT of {}", disk.display()))?;
        }
    }
    f.sync_all().ctx(|| format!("fsync {}", disk.display()))
}

/// Zero the primary and backup GPT headers if present (a disk going from gpt to msdos must not
/// keep a stale GPT that tools and kernels would prefer).
fn wipe_gpt(f: &mut File) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let size = f.seek(SeekFrom::End(0))?;
    for off in [SECTOR, size.saturating_sub(SECTOR)] {
        let mut sig = [0u8; 8];
        if off >= SECTOR && f.read_exact_at(&mut sig, off).is_ok() && &sig == b"EFI PART" {
            f.write_all_at(&[0u8; SECTOR as usize], off)?;
        }
    }
    Ok(())
}

fn write_gpt(f: &mut File, plan: &Plan) -> Result<(), DiskError> {
    let old = gptman::GPT::find_from(f).ok();
    let mut gpt = gptman::GPT::new_from(f, SECTOR, random_guid()?)
        .map_err(|e| DiskError::Layout(format!("creating a GPT: {e}")))?;
    if let Some(o) = &old {
        gpt.header.disk_guid = o.header.disk_guid;
    }
    for p in &plan.partitions {
        let first = p.start / SECTOR;
        let last = (p.start + p.size) / SECTOR - 1;
        let entry = if p.role == Role::Keep {
            let found = old.as_ref().and_then(|o| {
                o.iter()
                    .find(|(n, e)| *n == p.number && e.is_used())
                    .map(|(_, e)| e.clone())
            });
            match found {
                Some(e) if e.starting_lba == first && e.ending_lba == last => e,
                Some(e) => {
                    return Err(keep_mismatch(
                        p,
                        Some((
                            e.starting_lba * SECTOR,
                            (e.ending_lba + 1 - e.starting_lba) * SECTOR,
                        )),
                    ))
                }
                None => return Err(keep_mismatch(p, None)),
            }
        } else {
            gptman::GPTPartitionEntry {
                partition_type_guid: gpt_type(p.role),
                unique_partition_guid: random_guid()?,
                starting_lba: first,
                ending_lba: last,
                attribute_bits: 0,
                partition_name: p.name.as_str().into(),
            }
        };
        gpt[p.number] = entry;
    }
    gpt.write_into(f)
        .map_err(|e| DiskError::Layout(format!("writing the GPT: {e}")))?;
    gptman::GPT::write_protective_mbr_into(f, SECTOR)
        .map_err(|e| DiskError::Layout(format!("writing the protective MBR: {e}")))?;
    Ok(())
}

fn write_mbr(f: &mut File, plan: &Plan) -> Result<(), DiskError> {
    let old = mbrman::MBR::read_from(f, SECTOR as u32).ok();
    let sig = match &old {
        Some(o) => o.header.disk_signature,
        None => random_bytes()?,
    };
    let mut mbr = mbrman::MBR::new_from(f, SECTOR as u32, sig)
        .map_err(|e| DiskError::Layout(format!("creating an MBR: {e}")))?;
    let too_big = |p: &PlannedPartition| {
        DiskError::Layout(format!(
            "partition {} is beyond the 2 TiB reach of msdos",
            p.number
        ))
    };
    let logical: Vec<&PlannedPartition> = plan
        .partitions
        .iter()
        .filter(|p| is_logical(plan.label, p.number))
        .collect();
    if let (Some(first), Some(last)) = (logical.first(), logical.last()) {
        // The extended partition: from the first EBR to the end of the last logical partition,
        // in the lowest primary slot the layout leaves free.
        let used: Vec<u32> = plan.partitions.iter().map(|p| p.number).collect();
        let slot = (1..=4usize)
            .find(|n| !used.contains(&(*n as u32)))
            .ok_or_else(|| {
                DiskError::Layout("no free primary slot for the extended partition".into())
            })?;
        let start = first.start - crate::layout::MIB;
        let end = last.start + last.size;
        let e = mbr
            .get_mut(slot)
            .ok_or_else(|| DiskError::Layout(format!("no MBR slot {slot}")))?;
        *e = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys: 0x0f,
            last_chs: mbrman::CHS::empty(),
            starting_lba: u32::try_from(start / SECTOR).map_err(|_| too_big(first))?,
            sectors: u32::try_from((end - start) / SECTOR).map_err(|_| too_big(last))?,
        };
    }
    for p in &plan.partitions {
        let i = usize::try_from(p.number).map_err(|_| too_big(p))?;
        let first = u32::try_from(p.start / SECTOR).map_err(|_| too_big(p))?;
        let sectors = u32::try_from(p.size / SECTOR).map_err(|_| too_big(p))?;
        if is_logical(plan.label, p.number) {
            if p.role == Role::Keep {
                let found = old
                    .as_ref()
                    .and_then(|o| o.logical_partitions.get(i - 5))
                    .map(|l| l.partition.clone());
                match found {
                    Some(e) if e.starting_lba == first && e.sectors == sectors => {}
                    Some(e) => {
                        return Err(keep_mismatch(
                            p,
                            Some((
                                u64::from(e.starting_lba) * SECTOR,
                                u64::from(e.sectors) * SECTOR,
                            )),
                        ))
                    }
                    None => return Err(keep_mismatch(p, None)),
                }
            }
            // The EBR sits one alignment unit (1 MiB) before the partition.
            let align = mbr.align;
            mbr.push(mbr_type(p.role), first - align, sectors + align)
                .map_err(|e| DiskError::Layout(format!("logical partition {}: {e}", p.number)))?;
            continue;
        }
        let entry = if p.role == Role::Keep {
            let found = old
                .as_ref()
                .and_then(|o| o.get(i))
                .filter(|e| e.is_used())
                .cloned();
            match found {
                Some(e) if e.starting_lba == first && e.sectors == sectors => e,
                Some(e) => {
                    return Err(keep_mismatch(
                        p,
                        Some((
                            u64::from(e.starting_lba) * SECTOR,
                            u64::from(e.sectors) * SECTOR,
                        )),
                    ))
                }
                None => return Err(keep_mismatch(p, None)),
            }
        } else {
            mbrman::MBRPartitionEntry {
                boot: if p.role == Role::Deploy {
                    mbrman::BOOT_ACTIVE
                } else {
                    mbrman::BOOT_INACTIVE
                },
                first_chs: mbrman::CHS::empty(),
                sys: mbr_type(p.role),
                last_chs: mbrman::CHS::empty(),
                starting_lba: first,
                sectors,
            }
        };
        let slot = mbr
            .get_mut(i)
            .ok_or_else(|| DiskError::Layout(format!("no MBR slot {}", p.number)))?;
        *slot = entry;
    }
    // Keep the boot code area of the old MBR (GRUB's boot.img is rewritten later anyway).
    if let Some(o) = &old {
        mbr.header.bootstrap_code = o.header.bootstrap_code;
    }
    mbr.write_into(f)
        .map_err(|e| DiskError::Layout(format!("writing the MBR: {e}")))?;
    Ok(())
}

/// Read back the partitions of `disk` as (number, start bytes, size bytes).
pub fn read_table(disk: &Path) -> Result<Vec<(u32, u64, u64)>, DiskError> {
    let mut f = File::open(disk).ctx(|| format!("opening {}", disk.display()))?;
    if let Ok(gpt) = gptman::GPT::find_from(&mut f) {
        return Ok(gpt
            .iter()
            .filter(|(_, e)| e.is_used())
            .map(|(n, e)| {
                (
                    n,
                    e.starting_lba * gpt.sector_size,
                    (e.ending_lba + 1 - e.starting_lba) * gpt.sector_size,
                )
            })
            .collect());
    }
    let mbr = mbrman::MBR::read_from(&mut f, SECTOR as u32)
        .map_err(|e| DiskError::Layout(format!("{}: no GPT and no MBR: {e}", disk.display())))?;
    Ok(mbr
        .iter()
        .filter(|(_, e)| e.is_used() && !e.is_extended())
        .filter_map(|(n, e)| {
            Some((
                u32::try_from(n).ok()?,
                u64::from(e.starting_lba) * SECTOR,
                u64::from(e.sectors) * SECTOR,
            ))
        })
        .collect())
}

/// Ask the kernel to re-read the table: BLKRRPART, retried while the device is busy.
/// Returns whether the kernel accepted it (a loop device without partscan refuses: EINVAL).
pub fn reread(disk: &Path) -> Result<bool, DiskError> {
    let f = File::open(disk).ctx(|| format!("opening {}", disk.display()))?;
    let mut last = None;
    for _ in 0..10 {
        match sys::blkrrpart(&f) {
            Ok(()) => return Ok(true),
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::ENOTTY) =>
            {
                return Ok(false)
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(DiskError::io(
        format!(
            "re-reading the partition table of {} (BLKRRPART, 10 tries)",
            disk.display()
        ),
        last.unwrap_or_else(|| std::io::Error::other("BLKRRPART")),
    ))
}

/// The kernel's name of partition `n` of `disk`: `/dev/sda3`, `/dev/nvme0n1p3`, `/dev/loop0p3`.
pub fn partition_node(disk: &Path, n: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

/// Does the kernel's partition node exist with the planned start and size?
fn node_matches(node: &Path, p: &PlannedPartition) -> bool {
    let Ok(md) = std::fs::metadata(node) else {
        return false;
    };
    if !md.file_type().is_block_device() {
        return false;
    }
    let rdev = md.rdev();
    let base = format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{base}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    read("start").map(|s| s * SECTOR) == Some(p.start)
        && read("size").map(|s| s * SECTOR) == Some(p.size)
}

/// How the partitions are reached.
#[derive(Debug)]
pub struct PartitionDevices {
    devices: BTreeMap<u32, PathBuf>,
    loops: Vec<LoopDevice>,
}

impl PartitionDevices {
    /// The device of partition `n`.
    pub fn get(&self, n: u32) -> Option<&Path> {
        self.devices.get(&n).map(PathBuf::as_path)
    }
    /// Whether the loop-device fallback is in use.
    pub fn via_loop(&self) -> bool {
        !self.loops.is_empty()
    }
    /// Detach the fallback loop devices now, reporting errors.
    pub fn detach(mut self) -> Result<(), DiskError> {
        let mut first = Ok(());
        for l in self.loops.drain(..).rev() {
            if let Err(e) = l.detach() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// Reach the partitions of `plan` on `disk`: re-read the table, wait up to `wait` for the
/// kernel's nodes (udev), else attach loop devices with offset and size limit over the disk.
pub fn partition_devices(
    disk: &Path,
    plan: &Plan,
    wait: Duration,
) -> Result<PartitionDevices, DiskError> {
    let is_block = std::fs::metadata(disk)
        .ctx(|| format!("stat {}", disk.display()))?
        .file_type()
        .is_block_device();
    if is_block && reread(disk)? {
        let start = Instant::now();
        loop {
            if plan
                .partitions
                .iter()
                .all(|p| node_matches(&partition_node(disk, p.number), p))
            {
                let devices = plan
                    .partitions
                    .iter()
                    .map(|p| (p.number, partition_node(disk, p.number)))
                    .collect();
                return Ok(PartitionDevices {
                    devices,
                    loops: Vec::new(),
                });
            }
            if start.elapsed() >= wait {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(
            "no partition nodes for {} after {:?}: using loop devices",
            disk.display(),
            wait
        );
    }
    loop_partitions(disk, plan)
}

/// The fallback: one loop device per partition (offset, size limit) over the disk.
pub fn loop_partitions(disk: &Path, plan: &Plan) -> Result<PartitionDevices, DiskError> {
    let mut out = PartitionDevices {
        devices: BTreeMap::new(),
        loops: Vec::new(),
    };
    for p in &plan.partitions {
        if matches!(p.role, Role::BiosGrub | Role::Keep) {
            continue;
        }
        let l = LoopDevice::attach(disk, Some((p.start, p.size)), false)?;
        out.devices.insert(p.number, l.path().to_path_buf());
        out.loops.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert_eq!(
            partition_node(Path::new("/dev/sda"), 3),
            PathBuf::from("/dev/sda3")
        );
        assert_eq!(
            partition_node(Path::new("/dev/nvme0n1"), 1),
            PathBuf::from("/dev/nvme0n1p1")
        );
        assert_eq!(
            partition_node(Path::new("/dev/loop7"), 2),
            PathBuf::from("/dev/loop7p2")
        );
    }

    #[test]
    fn tables_on_an_image_file() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk");
        File::create(&img)
            .unwrap()
            .set_len(64 * crate::layout::MIB)
            .unwrap();
        let parts = "  - { number: 1, size: 8MiB, role: swap }\n  - { number: 2, size: 16MiB, role: deploy }\n  - { number: 3, size: rest, role: tmp }\n";
        let plan = |label: &str| {
            crate::layout::Layout::from_yaml(&format!(
                "device: /x\nlabel: {label}\npartitions:\n{parts}"
            ))
            .unwrap()
            .resolve(64 * crate::layout::MIB, None)
            .unwrap()
        };
        let want = |p: &Plan| {
            p.partitions
                .iter()
                .map(|p| (p.number, p.start, p.size))
                .collect::<Vec<_>>()
        };
        let gpt = plan("gpt");
        write_table(&img, &gpt).unwrap();
        assert_eq!(read_table(&img).unwrap(), want(&gpt));
        // gpt -> msdos leaves no stale GPT behind.
        let dos = plan("msdos");
        write_table(&img, &dos).unwrap();
        assert_eq!(read_table(&img).unwrap(), want(&dos));
        let raw = std::fs::read(&img).unwrap();
        assert!(!raw.windows(8).any(|w| w == b"EFI PART"));
        assert_eq!(&raw[510..512], &[0x55, 0xAA]);
        assert_eq!(raw[446 + 16 + 4], 0x83, "deploy is a Linux partition");
        assert_eq!(raw[446 + 16], 0x80, "deploy is active");
        // Logical partitions in an extended one (Grid'5000's msdos layout).
        let parts = "  - { number: 1, size: 8MiB, role: swap }\n  - { number: 2, size: 8MiB, role: keep }\n  - { number: 3, size: 16MiB, role: deploy }\n  - { number: 5, size: 8MiB, role: tmp }\n  - { number: 6, size: rest, role: tmp }\n";
        let l = crate::layout::Layout::from_yaml(&format!(
            "device: /x\nlabel: msdos\npartitions:\n{parts}"
        ))
        .unwrap();
        let dos = l.resolve(64 * crate::layout::MIB, None).unwrap();
        // Partition 2 must exist before it can be kept.
        let err = write_table(&img, &dos).unwrap_err().to_string();
        assert!(err.contains("refusing to move it"), "{err}");
        let mut first = dos.clone();
        first.partitions[1].role = Role::Tmp;
        write_table(&img, &first).unwrap();
        write_table(&img, &dos).unwrap();
        assert_eq!(read_table(&img).unwrap(), want(&dos));
        let raw = std::fs::read(&img).unwrap();
        assert_eq!(raw[446 + 3 * 16 + 4], 0x0f, "extended partition in slot 4");
        let sfdisk = std::process::Command::new("sfdisk")
            .arg("--dump")
            .arg(&img)
            .output();
        if let Ok(out) = sfdisk {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("disk5 : start=") && text.contains("disk6 : start="),
                "{text}"
            );
        }
    }

    #[test]
    fn guid_layout() {
        // EFI system partition type as stored on disk.
        assert_eq!(
            gpt_type(Role::Esp),
            [
                0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
                0xC9, 0x3B
            ]
        );
    }
}
