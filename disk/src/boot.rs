//! fstab by UUID, grub.cfg written by kd, and grub-install (i386-pc, x86_64-efi removable).
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::error::{DiskError, IoContext};
use crate::layout::FsType;

/// How the deployed environment boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Menu entry title (the environment name).
    pub title: String,
    /// Kernel path inside the deploy partition, e.g. `/vmlinuz` or `/boot/vmlinuz-6.1.0-18-amd64`.
    pub kernel: String,
    /// Initrd path inside the deploy partition, if any.
    pub initrd: Option<String>,
    /// Extra kernel parameters (besides `root=UUID=… ro`).
    pub params: String,
    /// Install GRUB for BIOS (i386-pc) in the MBR (and the bios_grub partition on GPT).
    pub bios: bool,
    /// Install GRUB for UEFI (x86_64-efi, removable path) on the ESP when there is one.
    pub efi: bool,
}

/// One fstab line's worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// File system UUID.
    pub uuid: String,
    /// Mount point (`none` for swap).
    pub mount_point: String,
    /// File system type.
    pub fs: FsType,
}

/// fstab text, by UUID; `/` first.
pub fn fstab(entries: &[FstabEntry]) -> String {
    let mut s = String::from("# /etc/fstab written by kd\n");
    let mut sorted: Vec<&FstabEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| (e.mount_point != "/", e.mount_point.clone()));
    for e in sorted {
        let (opts, dump, pass) = match (e.fs, e.mount_point.as_str()) {
            (FsType::Swap, _) => ("sw", 0, 0),
            (FsType::Vfat, _) => ("umask=0077", 0, 1),
            (FsType::Ext2 | FsType::Ext3 | FsType::Ext4, "/") => ("errors=remount-ro", 0, 1),
            (_, "/") => ("defaults", 0, 1),
            _ => ("defaults", 0, 2),
        };
        let mp = if e.fs == FsType::Swap {
            "none"
        } else {
            e.mount_point.as_str()
        };
        s.push_str(&format!(
            "UUID={} {} {} {} {} {}\n",
            e.uuid,
            mp,
            e.fs.name(),
            opts,
            dump,
            pass
        ));
    }
    s
}

/// The deployed kernel's command line: its root file system by UUID, mounted read-only first
/// (the system remounts it), then the environment's parameters. What the GRUB entry kd writes
/// passes, and what a kexec into the deployed kernel passes.
pub fn kernel_cmdline(root_uuid: &str, params: &str) -> String {
    let params = params.trim();
    if params.is_empty() {
        format!("root=UUID={root_uuid} ro")
    } else {
        format!("root=UUID={root_uuid} ro {params}")
    }
}

/// grub.cfg text for the environment on the root file system `root_uuid` of type `fs`.
pub fn grub_cfg(boot: &BootConfig, root_uuid: &str, fs: FsType) -> String {
    let fsmod = match fs {
        FsType::Xfs => "xfs",
        _ => "ext2",
    };
    let mut s = format!(
        "# grub.cfg written by kd\n\
         set timeout=1\n\
         set default=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input console serial\n\
         terminal_output console serial\n\
         insmod part_gpt\n\
         insmod part_msdos\n\
         insmod {fsmod}\n\
         search --no-floppy --fs-uuid --set=root {root_uuid}\n\
         menuentry '{}' {{\n\
         \tlinux {} {}\n",
        boot.title.replace('\'', ""),
        boot.kernel,
        kernel_cmdline(root_uuid, &boot.params)
    );
    if let Some(i) = &boot.initrd {
        s.push_str(&format!("\tinitrd {i}\n"));
    }
    s.push_str("}\n");
    s
}

/// Write `text` to `root/rel` (parents created), refusing to go through symlinks in the tree.
pub fn write_in_tree(root: &Path, rel: &str, text: &str, mode: u32) -> Result<(), DiskError> {
    use std::os::unix::fs::PermissionsExt;
    let path = safe_tree_path(root, rel, true)?;
    if path
        .symlink_metadata()
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        std::fs::remove_file(&path).ctx(|| format!("removing symlink {}", path.display()))?;
    }
    std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", path.display()))
}

/// `root/rel` after checking that no existing ancestor inside `root` is a symlink (a deployed
/// image must not redirect kd's writes out of the tree); missing directories are created (0755)
/// when `create`.
pub fn safe_tree_path(
    root: &Path,
    rel: &str,
    create: bool,
) -> Result<std::path::PathBuf, DiskError> {
    let rel = crate::write::safe_relative(Path::new(rel)).map_err(|r| DiskError::UnsafeEntry {
        path: rel.to_string(),
        reason: r,
    })?;
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(DiskError::UnsafeEntry {
                        path: rel.display().to_string(),
                        reason: format!("{} is a symlink in the deployed tree", cur.display()),
                    })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(DiskError::UnsafeEntry {
                        path: rel.display().to_string(),
                        reason: format!("{} is not a directory", cur.display()),
                    })
                }
                Err(_) if create => {
                    std::fs::create_dir(&cur).ctx(|| format!("creating {}", cur.display()))?
                }
                Err(e) => return Err(DiskError::io(format!("stat {}", cur.display()), e)),
            }
        }
    }
    Ok(root.join(rel))
}

/// `grub-install --target=i386-pc` of the disk, with `/boot/grub` in the mounted tree `root`.
pub fn grub_install_bios(disk: &Path, root: &Path) -> Result<String, DiskError> {
    let boot = root.join("boot");
    cmd::run(
        Command::new("grub-install")
            .arg("--target=i386-pc")
            .arg(format!("--boot-directory={}", boot.display()))
            .args([
                "--modules=part_gpt part_msdos ext2 xfs search_fs_uuid",
                "--no-floppy",
                "--force",
            ])
            .arg(disk),
        Duration::from_secs(300),
    )
}

/// `grub-install --target=x86_64-efi --removable` onto the ESP mounted at `esp`.
pub fn grub_install_efi(root: &Path, esp: &Path) -> Result<String, DiskError> {
    cmd::run(
        Command::new("grub-install")
            .arg("--target=x86_64-efi")
            .arg(format!("--efi-directory={}", esp.display()))
            .arg(format!("--boot-directory={}", root.join("boot").display()))
            .args(["--removable", "--no-nvram", "--no-uefi-secure-boot"]),
        Duration::from_secs(300),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_by_uuid() {
        let t = fstab(&[
            FstabEntry {
                uuid: "s".into(),
                mount_point: "swap".into(),
                fs: FsType::Swap,
            },
            FstabEntry {
                uuid: "t".into(),
                mount_point: "/tmp".into(),
                fs: FsType::Ext4,
            },
            FstabEntry {
                uuid: "r".into(),
                mount_point: "/".into(),
                fs: FsType::Ext4,
            },
        ]);
        assert_eq!(
            t,
            "# /etc/fstab written by kd\n\
             UUID=r / ext4 errors=remount-ro 0 1\n\
             UUID=t /tmp ext4 defaults 0 2\n\
             UUID=s none swap sw 0 0\n"
        );
    }

    #[test]
    fn grub_cfg_boots_by_uuid() {
        let b = BootConfig {
            title: "debian12".into(),
            kernel: "/vmlinuz".into(),
            initrd: Some("/initrd.img".into()),
            params: "console=ttyS0".into(),
            bios: true,
            efi: false,
        };
        let c = grub_cfg(&b, "1234-abcd", FsType::Ext4);
        assert!(c.contains("search --no-floppy --fs-uuid --set=root 1234-abcd\n"));
        assert!(c.contains("\tlinux /vmlinuz root=UUID=1234-abcd ro console=ttyS0\n"));
        assert!(c.contains("\tinitrd /initrd.img\n"));
        assert!(c.contains("menuentry 'debian12' {"));
        // No parameters: no trailing blank.
        let c = grub_cfg(
            &BootConfig {
                params: " ".into(),
                ..b
            },
            "u",
            FsType::Xfs,
        );
        assert!(c.contains("\tlinux /vmlinuz root=UUID=u ro\n"), "{c}");
    }

    #[test]
    fn kernel_cmdline_is_grubs() {
        assert_eq!(
            kernel_cmdline("1234-abcd", "console=tty0 console=ttyS0,115200n8 rw"),
            "root=UUID=1234-abcd ro console=tty0 console=ttyS0,115200n8 rw"
        );
        assert_eq!(kernel_cmdline("1234-abcd", ""), "root=UUID=1234-abcd ro");
    }
}
