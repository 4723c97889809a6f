//! The disk layout of the cluster configuration (YAML, like Kadeploy's `partitioning` section),
//! its validation and its resolution into byte ranges for a disk of a given size.
//!
//! ```yaml
//! device: /dev/sda
//! label: gpt            # or msdos
//! partitions:
//!   - { number: 1, size: 1MiB,  role: bios_grub }
//!   - { number: 2, size: 4GiB,  role: swap }
//!   - { number: 3, size: 20GiB, role: deploy, fs: ext4 }
//!   - { number: 4, size: rest,  role: tmp, fs: ext4 }
//! ```
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::DiskError;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Partition table type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    /// GUID partition table.
    Gpt,
    /// MBR (primary partitions 1-4).
    Msdos,
}

/// What a partition is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Receives the image (formatted for tar images).
    Deploy,
    /// Swap space (mkswap).
    Swap,
    /// Scratch space mounted on /tmp (formatted).
    Tmp,
    /// Never touched: its bytes stay as they are, its table entry must not move.
    Keep,
    /// EFI system partition (vfat).
    Esp,
    /// GPT partition where GRUB for BIOS embeds its core image.
    BiosGrub,
}

/// File systems kd can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4 (Kadeploy's options).
    Ext4,
    /// ext3.
    Ext3,
    /// ext2.
    Ext2,
    /// XFS.
    Xfs,
    /// FAT (ESP).
    Vfat,
    /// Linux swap.
    Swap,
}

impl FsType {
    /// The name used by mount(8), fstab and blkid.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Ext3 => "ext3",
            FsType::Ext2 => "ext2",
            FsType::Xfs => "xfs",
            FsType::Vfat => "vfat",
            FsType::Swap => "swap",
        }
    }
}

/// A partition size: `512MiB`, `4GiB`, `2TiB`, `10%` (of the usable space), or `rest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Bytes (always a multiple of 1 MiB).
    Bytes(u64),
    /// Percent of the usable space of the disk.
    Percent(u32),
    /// What is left after all the other partitions.
    Rest,
}

impl Size {
    /// Parse `512MiB`, `512M`, `4GiB`, `4G`, `1TiB`, `10%`, `rest`, or a bare number of MiB.
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("rest") {
            return Ok(Size::Rest);
        }
        if let Some(p) = t.strip_suffix('%') {
            let v: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("bad percentage `{s}`"))?;
            if v == 0 || v > 100 {
                return Err(format!("percentage `{s}` must be 1-100"));
            }
            return Ok(Size::Percent(v));
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits);
        let v: u64 = num
            .parse()
            .map_err(|_| format!("bad size `{s}` (e.g. 512MiB, 4GiB, 10%, rest)"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mib" | "mb" => MIB,
            "g" | "gib" | "gb" => 1024 * MIB,
            "t" | "tib" | "tb" => 1024 * 1024 * MIB,
            u => {
                return Err(format!(
                    "unknown size unit `{u}` in `{s}` (MiB, GiB, TiB, %, rest)"
                ))
            }
        };
        let b = v
            .checked_mul(mult)
            .ok_or_else(|| format!("size `{s}` is too large"))?;
        if b == 0 {
            return Err(format!("size `{s}` is zero"));
        }
        Ok(Size::Bytes(b))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Bytes(b) if b % (1024 * MIB) == 0 => write!(f, "{}GiB", b / (1024 * MIB)),
            Size::Bytes(b) => write!(f, "{}MiB", b / MIB),
            Size::Percent(p) => write!(f, "{p}%"),
            Size::Rest => write!(f, "rest"),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Size::parse(&n.to_string()),
            Raw::S(s) => Size::parse(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// One partition of the layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// Partition number (1-128 on GPT, 1-4 on msdos).
    pub number: u32,
    /// Size.
    pub size: Size,
    /// Role.
    pub role: Role,
    /// File system (deploy and tmp default to ext4, swap to swap, esp to vfat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsType>,
    /// Fixed start (a multiple of 1 MiB); by default right after the previous partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Size>,
    /// GPT partition name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A disk layout: the block device, the label, the partitions in disk order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// The whole-disk block device, e.g. `/dev/sda`.
    pub device: PathBuf,
    /// Partition table type.
    pub label: Label,
    /// Partitions, in the order they are laid out on the disk.
    pub partitions: Vec<PartitionSpec>,
}

/// A partition resolved to bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPartition {
    /// Partition number.
    pub number: u32,
    /// Start in bytes from the start of the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Role (after the per-deployment choice of the deploy partition).
    pub role: Role,
    /// File system to create (none for keep, bios_grub, or a deploy partition of a raw image).
    pub fs: Option<FsType>,
    /// GPT name.
    pub name: String,
}

/// A layout resolved for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The disk.
    pub device: PathBuf,
    /// Table type.
    pub label: Label,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Partitions in disk order.
    pub partitions: Vec<PlannedPartition>,
}

impl Plan {
    /// The deploy partition (validated to exist exactly once).
    pub fn deploy(&self) -> Option<&PlannedPartition> {
        self.partitions.iter().find(|p| p.role == Role::Deploy)
    }
    /// The partitions with a role.
    pub fn with_role(&self, role: Role) -> impl Iterator<Item = &PlannedPartition> {
        self.partitions.iter().filter(move |p| p.role == role)
    }
    /// The bytes the layout needs (end of the last partition, plus the GPT backup).
    pub fn needed_bytes(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.start + p.size)
            .max()
            .unwrap_or(0)
            + tail_reserve(self.label)
    }
}

fn tail_reserve(label: Label) -> u64 {
    match label {
        Label::Gpt => MIB,
        Label::Msdos => 0,
    }
}

fn err(msg: impl Into<String>) -> DiskError {
    DiskError::Layout(msg.into())
}

impl Layout {
    /// Parse a layout from YAML.
    pub fn from_yaml(text: &str) -> Result<Layout, DiskError> {
        let l: Layout = serde_norway::from_str(text).map_err(|e| err(e.to_string()))?;
        l.validate()?;
        Ok(l)
    }

    /// Check what does not depend on the disk size: numbers, roles, file systems, one deploy
    /// partition, at most one `rest`, percentages summing to 100 at most.
    pub fn validate(&self) -> Result<(), DiskError> {
        if self.partitions.is_empty() {
            return Err(err("no partitions"));
        }
        let max = match self.label {
            Label::Gpt => 128,
            Label::Msdos => MSDOS_MAX,
        };
        let mut seen = std::collections::HashSet::new();
        for p in &self.partitions {
            if p.number == 0 || p.number > max {
                return Err(err(format!(
                    "partition number {} is out of range 1-{max} for a {:?} label{}",
                    p.number,
                    self.label,
                    if self.label == Label::Msdos {
                        " (1-4 primary, 5+ logical)"
                    } else {
                        ""
                    }
                )));
            }
            if !seen.insert(p.number) {
                return Err(err(format!("partition number {} appears twice", p.number)));
            }
            check_fs(self.label, p)?;
        }
        if self.label == Label::Msdos {
            check_logical(&self.partitions)?;
        }
        let deploys: Vec<u32> = self
            .partitions
            .iter()
            .filter(|p| p.role == Role::Deploy)
            .map(|p| p.number)
            .collect();
        match deploys.len() {
            0 => {
                return Err(err(
                    "no deploy partition (one partition needs `role: deploy`)",
                ))
            }
            1 => {}
            _ => {
                return Err(err(format!(
                    "two deploy partitions: {deploys:?} (only one allowed)"
                )))
            }
        }
        for r in [Role::Esp, Role::BiosGrub] {
            if self.partitions.iter().filter(|p| p.role == r).count() > 1 {
                return Err(err(format!("more than one {r:?} partition")));
            }
        }
        if self
            .partitions
            .iter()
            .filter(|p| p.size == Size::Rest)
            .count()
            > 1
        {
            return Err(err("more than one partition of size `rest`"));
        }
        let pct: u32 = self
            .partitions
            .iter()
            .map(|p| if let Size::Percent(v) = p.size { v } else { 0 })
            .sum();
        if pct > 100 {
            return Err(err(format!(
                "percentages add up to {pct}% (more than 100%)"
            )));
        }
        Ok(())
    }

    /// Resolve the layout for a disk of `disk_size` bytes. `deploy_override` (`-p N`) makes
    /// partition N the deploy partition for this deployment; the layout's own deploy partition
    /// is then kept untouched. Errors: overlaps, larger than the disk.
    pub fn resolve(&self, disk_size: u64, deploy_override: Option<u32>) -> Result<Plan, DiskError> {
        self.validate()?;
        let first = MIB;
        let end = (disk_size / MIB) * MIB;
        let end = end.saturating_sub(tail_reserve(self.label));
        if end <= first {
            return Err(err(format!(
                "the disk ({disk_size} bytes) is too small for any layout"
            )));
        }
        let usable = end - first;
        let mut fixed: u64 = 0;
        for p in &self.partitions {
            if is_logical(self.label, p.number) {
                fixed += MIB;
            }
            fixed += match p.size {
                Size::Bytes(b) => b,
                Size::Percent(v) => (usable / MIB) * u64::from(v) / 100 * MIB,
                Size::Rest => 0,
            };
        }
        let mut out = Vec::new();
        let mut cursor = first;
        let mut prev: Option<u32> = None;
        for p in &self.partitions {
            if is_logical(self.label, p.number) {
                cursor += MIB; // room for the EBR
            }
            let start = match p.start {
                None => cursor,
                Some(Size::Bytes(b)) => {
                    if b < cursor {
                        return Err(err(match prev {
                            Some(n) => format!(
                                "partition {} starts at {} MiB and overlaps partition {n} (which ends at {} MiB)",
                                p.number, b / MIB, cursor / MIB
                            ),
                            None => format!(
                                "partition {} starts at {} MiB, before the first usable MiB",
                                p.number,
                                b / MIB
                            ),
                        }));
                    }
                    b
                }
                Some(other) => {
                    return Err(err(format!(
                        "partition {}: start must be an absolute size, not `{other}`",
                        p.number
                    )))
                }
            };
            let size = match p.size {
                Size::Bytes(b) => b,
                Size::Percent(v) => (usable / MIB) * u64::from(v) / 100 * MIB,
                Size::Rest => {
                    let gaps = start - cursor;
                    let left = usable.saturating_sub(fixed).saturating_sub(gaps);
                    // Later explicit starts also take room: fill to the next fixed start if any.
                    let later_start = self
                        .partitions
                        .iter()
                        .skip_while(|q| q.number != p.number)
                        .skip(1)
                        .find_map(|q| match q.start {
                            Some(Size::Bytes(b)) => Some(b),
                            _ => None,
                        });
                    match later_start {
                        Some(ls) => ls.saturating_sub(start).min(left.max(1)),
                        None => left,
                    }
                }
            };
            if size == 0 {
                return Err(err(format!(
                    "partition {} gets no space (the other partitions use the whole disk)",
                    p.number
                )));
            }
            if start + size > end {
                return Err(err(format!(
                    "the layout is larger than the disk: partition {} would end at {} MiB, the disk has {} MiB usable ({} bytes in all)",
                    p.number,
                    (start + size) / MIB,
                    end / MIB,
                    disk_size
                )));
            }
            out.push(PlannedPartition {
                number: p.number,
                start,
                size,
                role: p.role,
                fs: default_fs(p),
                name: p
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{:?}", p.role).to_lowercase()),
            });
            cursor = start + size;
            prev = Some(p.number);
        }
        if let Some(n) = deploy_override {
            let current = out.iter().position(|p| p.role == Role::Deploy);
            let idx = out
                .iter()
                .position(|p| p.number == n)
                .ok_or_else(|| err(format!("deploy partition {n} (-p) is not in the layout")))?;
            match out[idx].role {
                Role::Deploy | Role::Tmp | Role::Keep => {}
                r => {
                    return Err(err(format!(
                        "partition {n} has role {r:?} and cannot be the deploy partition"
                    )))
                }
            }
            if let Some(c) = current {
                if c != idx {
                    out[c].role = Role::Keep;
                    out[c].fs = None;
                }
            }
            out[idx].role = Role::Deploy;
            out[idx].fs = Some(out[idx].fs.unwrap_or(FsType::Ext4));
        }
        Ok(Plan {
            device: self.device.clone(),
            label: self.label,
            disk_size,
            partitions: out,
        })
    }
}

/// Highest msdos partition number (logical partitions 5 and up).
pub const MSDOS_MAX: u32 = 60;

/// Whether partition `number` of a layout with label `label` is an msdos logical partition
/// (preceded on the disk by a 1 MiB gap that holds its EBR).
pub fn is_logical(label: Label, number: u32) -> bool {
    label == Label::Msdos && number >= 5
}

/// msdos logical partitions: listed after all the primary ones, numbered 5, 6, ... in disk
/// order, with a primary number left free for the extended partition that holds them.
fn check_logical(parts: &[PartitionSpec]) -> Result<(), DiskError> {
    let Some(first) = parts.iter().position(|p| p.number >= 5) else {
        return Ok(());
    };
    for (i, p) in parts[first..].iter().enumerate() {
        let want = 5 + u32::try_from(i).unwrap_or(u32::MAX);
        if p.number != want {
            return Err(err(format!(
                "msdos logical partitions must be listed last and numbered 5, 6, ... in disk order: found {} where {want} was expected",
                p.number
            )));
        }
    }
    if parts[..first].len() >= 4 {
        return Err(err(
            "msdos: logical partitions need a free primary number (1-4) for the extended partition",
        ));
    }
    Ok(())
}

fn default_fs(p: &PartitionSpec) -> Option<FsType> {
    match p.role {
        Role::Deploy | Role::Tmp => Some(p.fs.unwrap_or(FsType::Ext4)),
        Role::Swap => Some(FsType::Swap),
        Role::Esp => Some(FsType::Vfat),
        Role::Keep => p.fs,
        Role::BiosGrub => None,
    }
}

fn check_fs(label: Label, p: &PartitionSpec) -> Result<(), DiskError> {
    let bad = |why: &str| {
        Err(err(format!(
            "partition {} ({:?}) cannot have file system {}: {why}",
            p.number,
            p.role,
            p.fs.map_or("none", FsType::name)
        )))
    };
    match (p.role, p.fs) {
        (Role::Deploy | Role::Tmp, Some(FsType::Swap | FsType::Vfat)) => bad("use ext2/3/4 or xfs"),
        (Role::Swap, Some(f)) if f != FsType::Swap => bad("a swap partition holds swap"),
        (Role::Esp, Some(f)) if f != FsType::Vfat => bad("an ESP is vfat"),
        (Role::BiosGrub, Some(_)) => bad("bios_grub holds GRUB's core image, no file system"),
        (Role::BiosGrub, None) if label == Label::Msdos => Err(err(format!(
            "partition {}: bios_grub needs a gpt label (msdos embeds GRUB in the MBR gap)",
            p.number
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * MIB;

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("512MiB").unwrap(), Size::Bytes(512 * MIB));
        assert_eq!(Size::parse("4G").unwrap(), Size::Bytes(4 * GIB));
        assert_eq!(Size::parse("10%").unwrap(), Size::Percent(10));
        assert_eq!(Size::parse("rest").unwrap(), Size::Rest);
        assert_eq!(Size::parse("64").unwrap(), Size::Bytes(64 * MIB));
        assert!(Size::parse("12 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(Size::parse("0MiB").is_err());
        assert!(Size::parse("150%").is_err());
        assert_eq!(Size::Bytes(4 * GIB).to_string(), "4GiB");
    }

    fn yaml(parts: &str, label: &str) -> String {
        format!("device: /dev/sda\nlabel: {label}\npartitions:\n{parts}")
    }

    const FOUR: &str = "  - { number: 1, size: 1MiB, role: bios_grub }\n  - { number: 2, size: 64MiB, role: swap }\n  - { number: 3, size: 50%, role: deploy, fs: ext4 }\n  - { number: 4, size: rest, role: tmp }\n";

    #[test]
    fn resolves_a_gpt_layout() {
        let l = Layout::from_yaml(&yaml(FOUR, "gpt")).unwrap();
        let p = l.resolve(1026 * MIB, None).unwrap();
        let got: Vec<_> = p
            .partitions
            .iter()
            .map(|p| (p.number, p.start / MIB, p.size / MIB))
            .collect();
        assert_eq!(
            got,
            vec![(1, 1, 1), (2, 2, 64), (3, 66, 512), (4, 578, 447)]
        );
        assert_eq!(p.deploy().unwrap().fs, Some(FsType::Ext4));
        assert_eq!(
            p.with_role(Role::Tmp).next().unwrap().fs,
            Some(FsType::Ext4)
        );
        assert!(p.needed_bytes() <= 1026 * MIB);
        // Round trip through YAML keeps the layout.
        let again: Layout = serde_norway::from_str(&serde_norway::to_string(&l).unwrap()).unwrap();
        assert_eq!(again, l);
    }

    fn layout_err(parts: &str, label: &str) -> String {
        Layout::from_yaml(&yaml(parts, label))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn clear_errors() {
        let two = "  - { number: 1, size: 1GiB, role: deploy }\n  - { number: 2, size: 1GiB, role: deploy }\n";
        assert!(layout_err(two, "gpt").contains("two deploy partitions"));
        let zfs = "  - { number: 1, size: 1GiB, role: deploy, fs: zfs }\n";
        assert!(
            layout_err(zfs, "gpt").contains("unknown variant `zfs`"),
            "{}",
            layout_err(zfs, "gpt")
        );
        let far = "  - { number: 61, size: 1GiB, role: deploy }\n";
        assert!(layout_err(far, "msdos").contains("out of range 1-60"));
        let grub = "  - { number: 1, size: 1MiB, role: bios_grub }\n  - { number: 2, size: 1GiB, role: deploy }\n";
        assert!(layout_err(grub, "msdos").contains("bios_grub needs a gpt label"));
        let dup = "  - { number: 1, size: 1GiB, role: deploy }\n  - { number: 1, size: 1GiB, role: swap }\n";
        assert!(layout_err(dup, "gpt").contains("appears twice"));
        let big = Layout::from_yaml(&yaml(
            "  - { number: 1, size: 2GiB, role: deploy }\n",
            "gpt",
        ))
        .unwrap();
        let e = big.resolve(GIB, None).unwrap_err().to_string();
        assert!(e.contains("larger than the disk"), "{e}");
        let overlap = "  - { number: 1, size: 100MiB, role: deploy }\n  - { number: 2, size: 10MiB, start: 50MiB, role: keep }\n";
        let e = Layout::from_yaml(&yaml(overlap, "gpt"))
            .unwrap()
            .resolve(GIB, None)
            .unwrap_err();
        assert!(e.to_string().contains("overlaps partition 1"), "{e}");
        let swapfs = "  - { number: 1, size: 1GiB, role: swap, fs: ext4 }\n  - { number: 2, size: 1GiB, role: deploy }\n";
        assert!(layout_err(swapfs, "gpt").contains("a swap partition holds swap"));
    }

    #[test]
    fn msdos_logical_partitions() {
        // Grid'5000's classic layout: swap, prod (kept), deploy, extended 4, tmp 5.
        let g5k = "  - { number: 1, size: 64MiB, role: swap }\n  - { number: 2, size: 128MiB, role: keep }\n  - { number: 3, size: 128MiB, role: deploy }\n  - { number: 5, size: rest, role: tmp }\n";
        let l = Layout::from_yaml(&yaml(g5k, "msdos")).unwrap();
        let p = l.resolve(1024 * MIB, None).unwrap();
        let tmp = &p.partitions[3];
        assert_eq!(
            (tmp.number, tmp.start / MIB, (tmp.start + tmp.size) / MIB),
            (5, 322, 1024)
        );
        let bad = "  - { number: 5, size: 64MiB, role: swap }\n  - { number: 1, size: 128MiB, role: deploy }\n";
        assert!(layout_err(bad, "msdos").contains("listed last"));
        let gap = "  - { number: 1, size: 64MiB, role: deploy }\n  - { number: 6, size: 64MiB, role: tmp }\n";
        assert!(layout_err(gap, "msdos").contains("5 was expected"));
        let full = "  - { number: 1, size: 8MiB, role: swap }\n  - { number: 2, size: 8MiB, role: deploy }\n  - { number: 3, size: 8MiB, role: tmp }\n  - { number: 4, size: 8MiB, role: keep }\n  - { number: 5, size: 8MiB, role: tmp }\n";
        assert!(layout_err(full, "msdos").contains("free primary number"));
    }

    #[test]
    fn deploy_partition_chosen_per_deployment() {
        let l = Layout::from_yaml(&yaml(FOUR, "gpt")).unwrap();
        let p = l.resolve(1026 * MIB, Some(4)).unwrap();
        assert_eq!(p.deploy().unwrap().number, 4);
        assert_eq!(p.partitions[2].role, Role::Keep);
        let e = l.resolve(1026 * MIB, Some(2)).unwrap_err().to_string();
        assert!(e.contains("cannot be the deploy partition"), "{e}");
        assert!(l
            .resolve(1026 * MIB, Some(9))
            .unwrap_err()
            .to_string()
            .contains("not in the layout"));
    }
}
