//! The agent's entry points: [`prepare`] the disk (safety checks, partitioning, formatting,
//! mounting) and get a [`Target`]; stream the image through [`Prepared::sink`]; then
//! [`Prepared::finish`] (post-install, SSH key, fstab, GRUB, unmount). Every step is timed in a
//! [`StepLog`]. Dropping a [`Prepared`] unmounts and detaches everything it set up.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::boot::{self, BootConfig, FstabEntry};
use crate::error::{DiskError, IoContext};
use crate::fs;
use crate::layout::{FsType, Layout, Plan, Role};
use crate::mount::Mount;
use crate::partition::{self, PartitionDevices};
use crate::post::{self, ChrootMounts, PostInstall, ScriptEnv};
use crate::safety;
use crate::steps::StepLog;
use crate::write::{raw_sink, tar_sink, ImageSink};

/// What the image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// A tar of the root file system, extracted into the formatted deploy partition.
    Tar,
    /// A raw file system image written to the deploy partition.
    RawPartition,
    /// A raw whole-disk image (no partitioning, no post steps).
    RawDisk,
}

/// What [`prepare`] needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareConfig {
    /// The disk layout (its `device` is the disk written).
    pub layout: Layout,
    /// `-p N`: the deploy partition of this deployment, if not the layout's.
    #[serde(default)]
    pub deploy_partition: Option<u32>,
    /// The image kind.
    pub image: ImageKind,
    /// Directory under which kd makes its mount points.
    pub work_dir: PathBuf,
    /// Write the partition table (false: Kadeploy's `--disable-disk-partitioning`; the
    /// existing table must then match the layout).
    #[serde(default = "yes")]
    pub partition: bool,
    /// How long to wait for the kernel's partition nodes before using loop devices (ms).
    #[serde(default = "default_wait")]
    pub node_wait_ms: u64,
}

fn yes() -> bool {
    true
}
fn default_wait() -> u64 {
    2000
}

/// What [`Prepared::finish`] needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishConfig {
    /// Node name (`KD_NODE`).
    pub node: String,
    /// Environment name (`KD_ENV`).
    pub environment: String,
    /// Admin then user post-installs, run in order.
    #[serde(default)]
    pub postinstalls: Vec<PostInstall>,
    /// Timeout of each post-install script, in seconds (0: 300 s).
    #[serde(default)]
    pub postinstall_timeout_secs: u64,
    /// `-k`: a public key for root.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// Bootloader; `None` skips fstab's neighbour grub.cfg and grub-install.
    #[serde(default)]
    pub boot: Option<BootConfig>,
}

/// Where the image goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A mounted, freshly formatted deploy partition: extract the tar here.
    Dir(PathBuf),
    /// A device (deploy partition or whole disk) of `limit` bytes: write the raw image here.
    Raw {
        /// The device.
        device: PathBuf,
        /// Its size.
        limit: u64,
    },
}

impl Target {
    /// The image sink for this target.
    pub fn sink(&self) -> Result<Box<dyn ImageSink>, DiskError> {
        match self {
            Target::Dir(d) => tar_sink(d),
            Target::Raw { device, limit } => raw_sink(device, Some(*limit)),
        }
    }
}

/// A prepared disk. Holds the mounts and loop devices; dropping it releases them.
#[derive(Debug)]
pub struct Prepared {
    disk: PathBuf,
    plan: Option<Plan>,
    target: Target,
    work_dir: PathBuf,
    // Field order is drop order: the mount before the loop devices under it.
    root: Option<Mount>,
    parts: Option<PartitionDevices>,
}

fn note(s: impl Into<String>) -> String {
    s.into()
}

/// Safety checks, partitioning, formatting and mounting. Nothing is written before the checks
/// pass (mounted file system, device of `/`, holders, size).
pub fn prepare(cfg: &PrepareConfig, log: &mut StepLog) -> Result<Prepared, DiskError> {
    let disk = cfg.layout.device.clone();
    let (size, plan) = log.step("check", || {
        let size = safety::check_device(&disk, 0)?;
        if cfg.image == ImageKind::RawDisk {
            return Ok(((size, None), note(format!("{size} bytes"))));
        }
        let plan = cfg.layout.resolve(size, cfg.deploy_partition)?;
        safety::check_device(&disk, plan.needed_bytes())?;
        Ok(((size, Some(plan)), note(format!("{size} bytes"))))
    })?;
    let Some(plan) = plan else {
        return Ok(Prepared {
            target: Target::Raw {
                device: disk.clone(),
                limit: size,
            },
            disk,
            plan: None,
            work_dir: cfg.work_dir.clone(),
            root: None,
            parts: None,
        });
    };
    if cfg.partition {
        log.step("partition", || {
            partition::write_table(&disk, &plan)?;
            Ok((
                (),
                note(format!(
                    "{:?}, {} partitions",
                    plan.label,
                    plan.partitions.len()
                )),
            ))
        })?;
    } else {
        log.step("check-partitions", || {
            let found = partition::read_table(&disk)?;
            for p in &plan.partitions {
                if !found.contains(&(p.number, p.start, p.size)) {
                    return Err(DiskError::Layout(format!(
                        "partitioning disabled but partition {} is not on the disk as the layout says",
                        p.number
                    )));
                }
            }
            Ok(((), String::new()))
        })?;
    }
    let parts = log.step("partition-devices", || {
        let d =
            partition::partition_devices(&disk, &plan, Duration::from_millis(cfg.node_wait_ms))?;
        let how = if d.via_loop() {
            "loop devices (offset/sizelimit)"
        } else {
            "kernel nodes"
        };
        Ok((d, note(how)))
    })?;
    let mut prepared = Prepared {
        target: Target::Dir(PathBuf::new()),
        disk: disk.clone(),
        plan: None,
        work_dir: cfg.work_dir.clone(),
        root: None,
        parts: Some(parts),
    };
    let deploy = plan
        .deploy()
        .cloned()
        .ok_or_else(|| DiskError::Layout("no deploy partition".into()))?;
    for p in &plan.partitions {
        let Some(fs) = p.fs else { continue };
        if matches!(p.role, Role::Keep | Role::BiosGrub) {
            continue;
        }
        if p.role == Role::Deploy && cfg.image == ImageKind::RawPartition {
            continue;
        }
        let dev = prepared.part(p.number)?;
        log.step(format!("mkfs:{}", p.number), || {
            Ok(((), fs::mkfs(fs, &dev, None)?))
        })?;
    }
    let deploy_dev = prepared.part(deploy.number)?;
    prepared.target = match cfg.image {
        ImageKind::Tar => {
            let fs = deploy.fs.unwrap_or(FsType::Ext4);
            let dir = cfg.work_dir.join("root");
            let m = log.step("mount", || {
                Ok((
                    Mount::new(
                        &deploy_dev,
                        &dir,
                        Some(fs.name()),
                        nix::mount::MsFlags::empty(),
                        None,
                    )?,
                    String::new(),
                ))
            })?;
            prepared.root = Some(m);
            Target::Dir(dir)
        }
        _ => Target::Raw {
            device: deploy_dev,
            limit: deploy.size,
        },
    };
    prepared.plan = Some(plan);
    Ok(prepared)
}

impl Prepared {
    /// Where the image goes.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A sink that writes the image to the target.
    pub fn sink(&self) -> Result<Box<dyn ImageSink>, DiskError> {
        self.target.sink()
    }

    /// The disk written.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The resolved layout (none for whole-disk raw images).
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// The device through which partition `n` is reached (kernel node or loop device).
    pub fn part(&self, n: u32) -> Result<PathBuf, DiskError> {
        self.parts
            .as_ref()
            .and_then(|p| p.get(n))
            .map(Path::to_path_buf)
            .ok_or_else(|| DiskError::Internal(format!("no device for partition {n}")))
    }

    /// After the image: post-installs, SSH key, fstab, grub.cfg, grub-install, then sync,
    /// unmount and detach. The bootloader is written last.
    pub fn finish(mut self, fin: &FinishConfig, log: &mut StepLog) -> Result<(), DiskError> {
        let Some(plan) = self.plan.clone() else {
            log.step("sync", || {
                nix::unistd::sync();
                Ok(((), String::new()))
            })?;
            return Ok(());
        };
        let deploy = plan
            .deploy()
            .cloned()
            .ok_or_else(|| DiskError::Layout("no deploy partition".into()))?;
        let deploy_dev = self.part(deploy.number)?;
        let root_dir = self.work_dir.join("root");
        let mut root_fs = deploy.fs.unwrap_or(FsType::Ext4);
        if self.root.is_none() {
            // Raw partition image: mount what it holds, if kd can.
            let ty = fs::probe(&deploy_dev, "TYPE")?;
            let known = [FsType::Ext4, FsType::Ext3, FsType::Ext2, FsType::Xfs];
            match ty
                .as_deref()
                .and_then(|t| known.into_iter().find(|f| f.name() == t))
            {
                Some(f) => {
                    root_fs = f;
                    let m = log.step("mount", || {
                        Ok((
                            Mount::new(
                                &deploy_dev,
                                &root_dir,
                                Some(f.name()),
                                nix::mount::MsFlags::empty(),
                                None,
                            )?,
                            String::new(),
                        ))
                    })?;
                    self.root = Some(m);
                }
                None => {
                    log.step("post-steps", || {
                        Ok((
                            (),
                            note(format!("skipped: file system {ty:?} not supported")),
                        ))
                    })?;
                    return self.release(log);
                }
            }
        }
        let root = root_dir;
        let env = ScriptEnv {
            node: fin.node.clone(),
            environment: fin.environment.clone(),
            block_device: self.disk.to_string_lossy().into_owned(),
            deploy_partition: partition::partition_node(&self.disk, deploy.number)
                .to_string_lossy()
                .into_owned(),
            deploy_partition_number: deploy.number,
        };
        if !fin.postinstalls.is_empty() {
            let timeout = Duration::from_secs(if fin.postinstall_timeout_secs == 0 {
                300
            } else {
                fin.postinstall_timeout_secs
            });
            let mounts = log.step("chroot-mounts", || {
                Ok((ChrootMounts::new(&root)?, String::new()))
            })?;
            let mut result = Ok(());
            for (i, p) in fin.postinstalls.iter().enumerate() {
                let r = log.step(format!("postinstall:{}", i + 1), || {
                    Ok(((), post::run_postinstall(&root, i + 1, p, &env, timeout)?))
                });
                if let Err(e) = r {
                    result = Err(e);
                    break;
                }
            }
            let unmounted = mounts.unmount();
            result?;
            unmounted?;
        }
        if let Some(key) = &fin.ssh_key {
            log.step("ssh-key", || {
                let p = post::install_ssh_key(&root, key)?;
                Ok(((), p.display().to_string()))
            })?;
        }
        let root_uuid = log.step("fstab", || {
            let mut entries = Vec::new();
            let mut uuids = BTreeMap::new();
            for p in &plan.partitions {
                let mp = match p.role {
                    Role::Deploy => "/",
                    Role::Swap => "none",
                    Role::Tmp => "/tmp",
                    Role::Esp => "/boot/efi",
                    Role::Keep | Role::BiosGrub => continue,
                };
                let dev = self.part(p.number)?;
                let uuid = fs::uuid(&dev)?;
                let fs = if p.role == Role::Deploy {
                    root_fs
                } else {
                    p.fs.unwrap_or(FsType::Ext4)
                };
                uuids.insert(p.number, uuid.clone());
                entries.push(FstabEntry {
                    uuid,
                    mount_point: mp.into(),
                    fs,
                });
            }
            let text = boot::fstab(&entries);
            boot::write_in_tree(&root, "etc/fstab", &text, 0o644)?;
            let root_uuid = uuids.get(&deploy.number).cloned().unwrap_or_default();
            Ok((root_uuid, text))
        })?;
        if let Some(b) = &fin.boot {
            log.step("grub-cfg", || {
                let text = boot::grub_cfg(b, &root_uuid, root_fs);
                boot::write_in_tree(&root, "boot/grub/grub.cfg", &text, 0o644)?;
                Ok(((), text))
            })?;
            if b.efi {
                self.install_efi(&plan, &root, log)?;
            }
            if b.bios {
                log.step("grub-install:i386-pc", || {
                    Ok(((), boot::grub_install_bios(&self.disk, &root)?))
                })?;
            }
        }
        self.release(log)
    }

    fn install_efi(&self, plan: &Plan, root: &Path, log: &mut StepLog) -> Result<(), DiskError> {
        let Some(esp) = plan.with_role(Role::Esp).next() else {
            log.step("grub-install:x86_64-efi", || {
                Ok(((), note("skipped: no ESP in the layout")))
            })?;
            return Ok(());
        };
        let dev = self.part(esp.number)?;
        let dir = boot::safe_tree_path(root, "boot/efi/x", true)?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        log.step("grub-install:x86_64-efi", || {
            // Some kernels (this lab host's) cannot mount vfat: then skip, and say so. Not on
            // a machine that itself runs under UEFI: it would be left without a boot loader.
            let m = match Mount::new(&dev, &dir, Some("vfat"), nix::mount::MsFlags::empty(), None) {
                Ok(m) => m,
                Err(e) if !running_under_uefi() => {
                    return Ok(((), note(format!("skipped: cannot mount the ESP: {e}"))))
                }
                Err(e) => return Err(e),
            };
            let out = boot::grub_install_efi(root, &dir);
            let um = m.unmount();
            let out = out?;
            um?;
            Ok(((), out))
        })
    }

    /// Sync, unmount, detach: reporting errors (the guards would otherwise do it silently).
    fn release(mut self, log: &mut StepLog) -> Result<(), DiskError> {
        let root = self.root.take();
        let parts = self.parts.take();
        log.step("umount", || {
            nix::unistd::sync();
            if let Some(m) = root {
                m.unmount()?;
            }
            if let Some(p) = parts {
                p.detach()?;
            }
            nix::unistd::sync();
            Ok(((), String::new()))
        })
    }
}

/// Whether this machine booted through UEFI (its firmware's tables are exposed), i.e. whether
/// the disk being deployed is booted by UEFI.
fn running_under_uefi() -> bool {
    Path::new("/sys/firmware/efi").exists()
}

/// For callers that only hold paths: flush a device's buffers.
pub fn fsync_device(dev: &Path) -> Result<(), DiskError> {
    std::fs::File::open(dev)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("fsync {}", dev.display()))
}

// The agent moves these into blocking tasks: they must stay `Send`.
const _: () = {
    const fn send<T: Send>() {}
    send::<Prepared>();
    send::<Box<dyn ImageSink>>();
    send::<StepLog>();
};
