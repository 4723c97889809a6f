//! Post-install archives (tgz, txz, tar.zst) with a script run in a chroot of the deployed tree
//! (/proc, /sys and /dev mounted, unmounted after), and the SSH key of `-k`.
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use crate::error::{DiskError, IoContext};
use crate::mount::Mount;
use crate::write::tar_sink;

/// One post-install: an archive and the script in it to run (Kadeploy's `postinstall` files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostInstall {
    /// The archive on the agent's file system (tgz, txz, tar.zst or plain tar; detected from
    /// its first bytes).
    pub archive: PathBuf,
    /// Path of the script inside the archive (run from the extraction directory), or `None`
    /// to only extract... into a scratch directory, which is useless: use a script.
    pub script: Option<String>,
}

/// `KD_*` variables given to the scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptEnv {
    /// Node name (`KD_NODE`).
    pub node: String,
    /// Environment name (`KD_ENV`).
    pub environment: String,
    /// Whole-disk device (`KD_BLOCK_DEVICE`).
    pub block_device: String,
    /// Deploy partition device (`KD_DEPLOY_PART`).
    pub deploy_partition: String,
    /// Deploy partition number (`KD_DEPLOY_PART_NUM`).
    pub deploy_partition_number: u32,
}

/// Compression of an archive, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (tgz).
    Gzip,
    /// xz (txz).
    Xz,
    /// zstd (tar.zst).
    Zstd,
    /// bzip2 (tbz2).
    Bzip2,
    /// Not compressed.
    None,
}

/// Detect the compression from the first bytes.
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else {
        Compression::None
    }
}

/// Extract `archive` into `dir` through kd's safe tar writer.
pub fn extract_archive(archive: &Path, dir: &Path) -> Result<u64, DiskError> {
    let mut f = File::open(archive).ctx(|| format!("opening {}", archive.display()))?;
    let mut head = [0u8; 6];
    let n = f
        .read(&mut head)
        .ctx(|| format!("reading {}", archive.display()))?;
    let comp = detect(&head[..n]);
    let f = File::open(archive).ctx(|| format!("opening {}", archive.display()))?;
    let mut child = None;
    let mut reader: Box<dyn Read> = match comp {
        Compression::None => Box::new(f),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(f).ctx(|| format!("zstd {}", archive.display()))?,
        ),
        Compression::Gzip | Compression::Xz | Compression::Bzip2 => {
            let prog = match comp {
                Compression::Gzip => "gzip",
                Compression::Xz => "xz",
                _ => "bzip2",
            };
            let mut c = Command::new(prog)
                .arg("-dc")
                .stdin(Stdio::from(f))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ctx(|| format!("starting {prog} -dc"))?;
            let out = c
                .stdout
                .take()
                .ok_or_else(|| DiskError::Internal("no stdout".into()))?;
            child = Some((prog, c));
            Box::new(out)
        }
    };
    let mut sink = tar_sink(dir)?;
    let mut buf = vec![0u8; 256 * 1024];
    let res = (|| {
        loop {
            let n = reader
                .read(&mut buf)
                .ctx(|| format!("decompressing {}", archive.display()))?;
            if n == 0 {
                break;
            }
            sink.write_all(&buf[..n])?;
        }
        sink.finish()
    })();
    drop(reader);
    if let Some((prog, mut c)) = child {
        let st = c.wait().ctx(|| format!("waiting for {prog}"))?;
        if !st.success() && res.is_ok() {
            return Err(DiskError::BadImage(format!(
                "{}: {prog} -dc failed ({st})",
                archive.display()
            )));
        }
    }
    Ok(res?.files)
}

/// /proc, /sys and /dev of the deployed tree, mounted for the scripts; unmounted on drop.
pub struct ChrootMounts {
    mounts: Vec<Mount>,
}

impl ChrootMounts {
    /// Mount proc, sysfs and a bind of /dev under `root`.
    pub fn new(root: &Path) -> Result<ChrootMounts, DiskError> {
        let mut mounts = Vec::new();
        let proc_ = crate::boot::safe_tree_path(root, "proc/x", true)?;
        let sys_ = crate::boot::safe_tree_path(root, "sys/x", true)?;
        let dev_ = crate::boot::safe_tree_path(root, "dev/x", true)?;
        let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
        mounts.push(Mount::new(
            Path::new("proc"),
            &parent(&proc_),
            Some("proc"),
            MsFlags::empty(),
            None,
        )?);
        mounts.push(Mount::new(
            Path::new("sysfs"),
            &parent(&sys_),
            Some("sysfs"),
            MsFlags::empty(),
            None,
        )?);
        mounts.push(Mount::bind(Path::new("/dev"), &parent(&dev_))?);
        Ok(ChrootMounts { mounts })
    }

    /// Unmount in reverse order, reporting the first error.
    pub fn unmount(mut self) -> Result<(), DiskError> {
        let mut first = Ok(());
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = m.unmount() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// Extract post-install `index` into `root/tmp/kd-postinstall-<index>`, run its script there in
/// a chroot with the `KD_*` variables and `timeout`, remove the directory. Returns the output;
/// a failing script is a [`DiskError::Command`] with its output.
pub fn run_postinstall(
    root: &Path,
    index: usize,
    p: &PostInstall,
    env: &ScriptEnv,
    timeout: Duration,
) -> Result<String, DiskError> {
    let rel = format!("tmp/kd-postinstall-{index}");
    let dir = crate::boot::safe_tree_path(root, &format!("{rel}/x"), true)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("chmod {}", dir.display()))?;
    let res = (|| {
        extract_archive(&p.archive, &dir)?;
        let Some(script) = &p.script else {
            return Ok(String::from("(no script)"));
        };
        let script_rel =
            crate::write::safe_relative(Path::new(script)).map_err(|r| DiskError::UnsafeEntry {
                path: script.clone(),
                reason: r,
            })?;
        let inside = Path::new("/").join(&rel);
        let mut c = Command::new("chroot");
        c.arg(root)
            .args([
                "/bin/sh",
                "-c",
                "cd \"$KD_POSTINSTALL_DIR\" && exec /bin/sh \"./$KD_SCRIPT\"",
            ])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("KD_NODE", &env.node)
            .env("KD_ENV", &env.environment)
            .env("KD_BLOCK_DEVICE", &env.block_device)
            .env("KD_DEPLOY_PART", &env.deploy_partition)
            .env(
                "KD_DEPLOY_PART_NUM",
                env.deploy_partition_number.to_string(),
            )
            .env("KD_MOUNT_POINT", "/")
            .env("KD_HOST_MOUNT_POINT", root)
            .env("KD_POSTINSTALL_DIR", &inside)
            .env("KD_SCRIPT", &script_rel);
        crate::cmd::run(&mut c, timeout)
    })();
    let cleanup = std::fs::remove_dir_all(&dir).ctx(|| format!("removing {}", dir.display()));
    let out = res?;
    cleanup?;
    Ok(out)
}

/// Append `key` to `root/root/.ssh/authorized_keys` (directory 0700, file 0600, owned by root).
pub fn install_ssh_key(root: &Path, key: &str) -> Result<PathBuf, DiskError> {
    let key = key.trim();
    if key.is_empty() || key.contains('\n') {
        return Err(DiskError::BadImage(
            "the SSH key must be one non-empty line".into(),
        ));
    }
    let path = crate::boot::safe_tree_path(root, "root/.ssh/authorized_keys", true)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("chmod {}", dir.display()))?;
    std::os::unix::fs::lchown(&dir, Some(0), Some(0)).ctx(|| format!("chown {}", dir.display()))?;
    let md = std::fs::symlink_metadata(&path);
    let mut text = match md {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(DiskError::UnsafeEntry {
                path: "root/.ssh/authorized_keys".into(),
                reason: "is a symlink in the deployed tree".into(),
            })
        }
        Ok(_) => std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?,
        Err(_) => String::new(),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !text.lines().any(|l| l.trim() == key) {
        text.push_str(key);
        text.push('\n');
    }
    std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod {}", path.display()))?;
    std::os::unix::fs::lchown(&path, Some(0), Some(0))
        .ctx(|| format!("chown {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(detect(&[0xfd, b'7', b'z', b'X', b'Z', 0]), Compression::Xz);
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(detect(b"etc/"), Compression::None);
    }
}
