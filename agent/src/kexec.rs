//! The end of a deployment by kexec (the cluster's `boot: kexec`, Kadeploy's fast path): the
//! deploy initrd starts the deployed kernel itself, with no firmware and no PXE in between.
//!
//! [`load`] mounts the deploy partition read-only, finds the environment's kernel and initrd in
//! it ([`resolve_in_tree`]: Debian's `/vmlinuz` is a symlink, followed inside the tree, never
//! out of it), builds the command line as the GRUB entry kd wrote
//! ([`kd_disk::boot::kernel_cmdline`]: `root=UUID=… ro` and the environment's parameters) and
//! runs `kexec -l`; [`exec`] runs `kexec -e`. The caller falls back to a plain reboot when either
//! fails.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kd_disk::mount::{Mount, MsFlags};
use kd_proto::msg::Kexec;

/// Symlinks followed at most while resolving one path (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// What [`load`] staged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The kernel, as a path in the deployed tree (symlinks resolved).
    pub kernel: String,
    /// The initrd, likewise.
    pub initrd: Option<String>,
    /// The command line given to the kernel.
    pub cmdline: String,
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kernel)?;
        if let Some(i) = &self.initrd {
            write!(f, " with {i}")?;
        }
        write!(f, ", command line: {}", self.cmdline)
    }
}

/// `path` (absolute in the deployed tree, or relative to its root) with every symlink along it
/// followed inside the tree: an absolute link target starts again at the tree's root, `..`
/// stops at it. `readlink(p)` answers for a path of the tree (absolute, `/`-rooted): its link
/// target, `None` when it is not a symlink, an error when it does not exist. Returns the
/// resolved path, absolute in the tree.
pub fn resolve_in_tree(
    path: &str,
    mut readlink: impl FnMut(&Path) -> Result<Option<PathBuf>, String>,
) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    // Components still to walk, the next one last.
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, Path::new(path));
    let mut cur = PathBuf::from("/");
    let mut links = 0usize;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        match readlink(&next)? {
            None => cur = next,
            Some(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(format!(
                        "{path}: more than {MAX_LINKS} symlinks (a loop?) in the deployed tree"
                    ));
                }
                if target.as_os_str().is_empty() {
                    return Err(format!("{}: an empty symlink", next.display()));
                }
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                push_components(&mut todo, &target);
            }
        }
    }
    Ok(cur)
}

/// Pushes `p`'s components (normal ones and `..`) so that the first is popped first.
fn push_components(todo: &mut Vec<OsString>, p: &Path) {
    let comps: Vec<OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(comps.into_iter().rev());
}

/// [`resolve_in_tree`] on the tree mounted at `root`: the real path of a regular file.
pub fn resolve_file(root: &Path, path: &str) -> Result<(PathBuf, PathBuf), String> {
    let inside = resolve_in_tree(path, |p| {
        let real = real_path(root, p);
        match std::fs::symlink_metadata(&real) {
            Ok(m) if m.file_type().is_symlink() => std::fs::read_link(&real)
                .map(Some)
                .map_err(|e| format!("{}: {e}", p.display())),
            Ok(_) => Ok(None),
            Err(e) => Err(format!("{} in the deployed tree: {e}", p.display())),
        }
    })?;
    let real = real_path(root, &inside);
    match std::fs::metadata(&real) {
        Ok(m) if m.is_file() => Ok((inside, real)),
        Ok(_) => Err(format!(
            "{path} ({}) is not a regular file in the deployed tree",
            inside.display()
        )),
        Err(e) => Err(format!("{path} ({}): {e}", inside.display())),
    }
}

fn real_path(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// `kexec -l`'s arguments.
pub fn load_args(kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> Vec<OsString> {
    let mut a = vec![OsString::from("-l"), kernel.as_os_str().to_os_string()];
    if let Some(i) = initrd {
        let mut s = OsString::from("--initrd=");
        s.push(i.as_os_str());
        a.push(s);
    }
    a.push(OsString::from(format!("--command-line={cmdline}")));
    a
}

/// Mounts the deploy partition `device` read-only under `work_dir`, stages the deployed
/// kernel with `kexec -l`, unmounts. Blocking.
pub fn load(work_dir: &Path, device: &Path, k: &Kexec) -> Result<Loaded, String> {
    let fs = kd_disk::fs::probe(device, "TYPE")
        .map_err(|e| format!("probing {}: {e}", device.display()))?
        .ok_or_else(|| format!("no file system on {}", device.display()))?;
    let uuid = kd_disk::fs::uuid(device).map_err(|e| e.to_string())?;
    let dir = work_dir.join("kexec-root");
    let m =
        Mount::new(device, &dir, Some(&fs), MsFlags::MS_RDONLY, None).map_err(|e| e.to_string())?;
    let staged = (|| -> Result<Loaded, String> {
        let (kernel, kernel_real) = resolve_file(&dir, &k.kernel)?;
        let initrd = match &k.initrd {
            Some(i) => Some(resolve_file(&dir, i)?),
            None => None,
        };
        let cmdline = kd_disk::boot::kernel_cmdline(&uuid, &k.params);
        let args = load_args(
            &kernel_real,
            initrd.as_ref().map(|(_, real)| real.as_path()),
            &cmdline,
        );
        kd_disk::cmd::run(Command::new("kexec").args(&args), Duration::from_secs(120))
            .map_err(|e| one_line(&format!("kexec -l {}", kernel_real.display()), e))?;
        Ok(Loaded {
            kernel: kernel.display().to_string(),
            initrd: initrd.map(|(inside, _)| inside.display().to_string()),
            cmdline,
        })
    })();
    let unmounted = m.unmount().map_err(|e| e.to_string());
    let loaded = staged?;
    unmounted?;
    Ok(loaded)
}

/// A failed kexec command in one line: its status and the first line of its output (on a
/// refusal, kexec-tools follows the reason with a dump of its segments).
fn one_line(what: &str, e: kd_disk::DiskError) -> String {
    match e {
        kd_disk::DiskError::Command { status, output, .. } => format!(
            "{what} failed ({status}): {}",
            output
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no output")
        ),
        e => e.to_string(),
    }
}

/// `kexec -e`: starts the staged kernel. Returns only when that failed.
pub fn exec() -> String {
    match kd_disk::cmd::run(Command::new("kexec").arg("-e"), Duration::from_secs(60)) {
        Ok(out) => format!("kexec -e returned: {}", out.trim()),
        Err(e) => one_line("kexec -e", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tree of symlinks (absolute path → target); every other path is a plain file or
    /// directory, except `missing`.
    fn tree<'a>(
        links: &'a HashMap<&str, &str>,
        missing: &'a [&str],
    ) -> impl FnMut(&Path) -> Result<Option<PathBuf>, String> + 'a {
        move |p: &Path| {
            let s = p.to_str().unwrap();
            if missing.contains(&s) {
                return Err(format!("{s}: no such file"));
            }
            Ok(links.get(s).map(PathBuf::from))
        }
    }

    #[test]
    fn debian_vmlinuz_link_is_followed_in_the_tree() {
        let links = HashMap::from([
            ("/vmlinuz", "boot/vmlinuz-6.1.0-18-amd64"),
            ("/initrd.img", "boot/initrd.img-6.1.0-18-amd64"),
        ]);
        assert_eq!(
            resolve_in_tree("/vmlinuz", tree(&links, &[])).unwrap(),
            PathBuf::from("/boot/vmlinuz-6.1.0-18-amd64")
        );
        assert_eq!(
            resolve_in_tree("initrd.img", tree(&links, &[])).unwrap(),
            PathBuf::from("/boot/initrd.img-6.1.0-18-amd64")
        );
        // A plain path stays as it is.
        assert_eq!(
            resolve_in_tree("/boot/vmlinuz-6.1.0-18-amd64", tree(&links, &[])).unwrap(),
            PathBuf::from("/boot/vmlinuz-6.1.0-18-amd64")
        );
    }

    #[test]
    fn absolute_and_dotdot_links_stay_inside_the_tree() {
        let links = HashMap::from([
            // An absolute target is the tree's, not the initrd's.
            ("/vmlinuz", "/boot/vmlinuz-6.1"),
            // `..` climbs no higher than the tree's root.
            ("/boot/vmlinuz-6.1", "../../../../etc/../boot/real"),
            // A directory link on the way.
            ("/k", "/usr/lib/kernels"),
            ("/usr/lib/kernels/current", "../../../boot/real"),
        ]);
        assert_eq!(
            resolve_in_tree("/vmlinuz", tree(&links, &[])).unwrap(),
            PathBuf::from("/boot/real")
        );
        assert_eq!(
            resolve_in_tree("/k/current", tree(&links, &[])).unwrap(),
            PathBuf::from("/boot/real")
        );
        assert_eq!(
            resolve_in_tree("/../../x/./y", tree(&links, &[])).unwrap(),
            PathBuf::from("/x/y")
        );
    }

    #[test]
    fn loops_missing_files_and_empty_paths_are_errors() {
        let links = HashMap::from([("/a", "b"), ("/b", "/a"), ("/e", "")]);
        let e = resolve_in_tree("/a", tree(&links, &[])).unwrap_err();
        assert!(e.contains("more than 40 symlinks"), "{e}");
        let e = resolve_in_tree("/boot/vmlinuz", tree(&links, &["/boot/vmlinuz"])).unwrap_err();
        assert!(e.contains("/boot/vmlinuz: no such file"), "{e}");
        assert!(resolve_in_tree("", tree(&links, &[])).is_err());
        let e = resolve_in_tree("/e", tree(&links, &[])).unwrap_err();
        assert!(e.contains("empty symlink"), "{e}");
    }

    /// On a real directory: Debian's relative links, an absolute one that would leave the
    /// tree on the host, a directory, a dangling link.
    #[test]
    fn resolve_file_on_a_real_tree() {
        let root = std::env::temp_dir().join(format!("kd-kexec-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot/vmlinuz-6.1"), b"kernel").unwrap();
        std::fs::write(root.join("boot/initrd.img-6.1"), b"initrd").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.1", root.join("vmlinuz")).unwrap();
        std::os::unix::fs::symlink("/boot/initrd.img-6.1", root.join("initrd.img")).unwrap();
        std::os::unix::fs::symlink("/boot/none", root.join("dangling")).unwrap();
        let (inside, real) = resolve_file(&root, "/vmlinuz").unwrap();
        assert_eq!(inside, PathBuf::from("/boot/vmlinuz-6.1"));
        assert_eq!(real, root.join("boot/vmlinuz-6.1"));
        // Absolute: the tree's /boot, not the host's.
        let (_, real) = resolve_file(&root, "/initrd.img").unwrap();
        assert_eq!(std::fs::read(real).unwrap(), b"initrd");
        let e = resolve_file(&root, "/boot").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = resolve_file(&root, "/dangling").unwrap_err();
        assert!(e.contains("/boot/none in the deployed tree"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// On a real ext4 partition (a loop device): the deploy partition is mounted read-only,
    /// the kernel found through its symlink, and a missing initrd ends the load with the path
    /// named and the partition unmounted, before `kexec` runs.
    #[test]
    fn load_fails_cleanly_on_a_missing_initrd() {
        if kd_disk::testenv::skip_without_loop_devices() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("part.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let lo = kd_disk::loopdev::LoopDevice::attach(&img, None, false).unwrap();
        kd_disk::fs::mkfs(kd_disk::FsType::Ext4, lo.path(), None).unwrap();
        let m = Mount::new(
            lo.path(),
            &dir.path().join("fill"),
            Some("ext4"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        std::fs::create_dir(m.path().join("boot")).unwrap();
        std::fs::write(m.path().join("boot/vmlinuz-6.1"), b"not a kernel").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.1", m.path().join("vmlinuz")).unwrap();
        m.unmount().unwrap();
        let work = dir.path().join("work");
        let k = Kexec {
            kernel: "/vmlinuz".into(),
            initrd: Some("/initrd.img".into()),
            params: "console=ttyS0".into(),
        };
        let e = load(&work, lo.path(), &k).unwrap_err();
        assert!(e.contains("/initrd.img in the deployed tree"), "{e}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&*work.join("kexec-root").to_string_lossy()),
            "left mounted"
        );
        // A kernel that is not there is named too.
        let k = Kexec {
            kernel: "/boot/vmlinuz-9".into(),
            initrd: None,
            params: String::new(),
        };
        let e = load(&work, lo.path(), &k).unwrap_err();
        assert!(e.contains("/boot/vmlinuz-9 in the deployed tree"), "{e}");
        lo.detach().unwrap();
    }

    #[test]
    fn kexec_load_arguments() {
        let a = load_args(
            Path::new("/run/kd/kexec-root/boot/vmlinuz-6.1"),
            Some(Path::new("/run/kd/kexec-root/boot/initrd.img-6.1")),
            "root=UUID=u ro console=ttyS0,115200n8 rw",
        );
        assert_eq!(
            a,
            [
                "-l",
                "/run/kd/kexec-root/boot/vmlinuz-6.1",
                "--initrd=/run/kd/kexec-root/boot/initrd.img-6.1",
                "--command-line=root=UUID=u ro console=ttyS0,115200n8 rw",
            ]
            .map(OsString::from)
        );
        let a = load_args(Path::new("/k"), None, "root=UUID=u ro");
        assert_eq!(
            a,
            ["-l", "/k", "--command-line=root=UUID=u ro"].map(OsString::from)
        );
    }
}
