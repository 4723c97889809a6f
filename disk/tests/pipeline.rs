//! The whole disk pipeline as root on loop devices over files in temp dirs (skipped, with the
//! reason printed, when /dev/loop-control is absent or we are not root; failed under `CI=true`). Loop devices are
//! detached by guards, also when a test panics; each test checks that none is left behind.
#![allow(clippy::unwrap_used)]
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kd_disk::loopdev::LoopDevice;
use kd_disk::mount::Mount;
use kd_disk::{
    prepare, BootConfig, DiskError, FinishConfig, ImageKind, Layout, PostInstall, PrepareConfig,
    Prepared, StepLog, Target,
};

const MIB: u64 = 1 << 20;

fn skip() -> bool {
    kd_disk::testenv::skip_without_loop_devices()
}

/// A file-backed disk on a loop device (with partscan, so that BLKRRPART is exercised).
/// Field order = drop order: the loop device is detached before the temp dir goes.
struct Disk {
    dev: LoopDevice,
    file: PathBuf,
    dir: tempfile::TempDir,
}

impl Disk {
    fn new(size: u64) -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        fs::File::create(&file).unwrap().set_len(size).unwrap();
        let dev = LoopDevice::attach(&file, None, true).unwrap();
        Disk { dev, file, dir }
    }
    fn path(&self) -> &Path {
        self.dev.path()
    }
    fn work(&self) -> PathBuf {
        let w = self.dir.path().join("work");
        fs::create_dir_all(&w).unwrap();
        w
    }
    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut f = fs::File::open(&self.file).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut v = vec![0u8; len as usize];
        f.read_exact(&mut v).unwrap();
        v
    }
    fn write(&self, off: u64, data: &[u8]) {
        let mut f = fs::OpenOptions::new().write(true).open(&self.file).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    /// `prepare` for an image of `kind` on this disk, partitioned as `parts` (a `label` table).
    fn prepare(&self, label: &str, parts: &str, kind: ImageKind, log: &mut StepLog) -> Prepared {
        prepare(
            &prep(layout(self.path(), label, parts), kind, self.work()),
            log,
        )
        .unwrap()
    }
    /// Drops the disk and checks that nothing of it stays attached or mounted.
    fn release(self) {
        let path = self.dir.path().to_path_buf();
        drop(self);
        assert_released(&path);
    }
    /// Mount partition (start, size) through a loop device of its own.
    fn mount_part(&self, start: u64, size: u64, at: &str) -> (Mount, LoopDevice, PathBuf) {
        let l = LoopDevice::attach(&self.file, Some((start, size)), false).unwrap();
        let dir = self.dir.path().join(at);
        let m = Mount::new(
            l.path(),
            &dir,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None,
        )
        .unwrap();
        (m, l, dir)
    }
}

/// No loop device may still be backed by a file of this test's temp dir, and nothing stays
/// mounted under it.
fn assert_released(dir: &Path) {
    let d = dir.to_string_lossy().to_string();
    let attached = || -> Vec<String> {
        let mut v = Vec::new();
        for e in fs::read_dir("/sys/block").unwrap().flatten() {
            if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.contains(&d) {
                    v.push(format!("{:?} -> {}", e.file_name(), b.trim()));
                }
            }
        }
        v
    };
    // `losetup -d` of a device that udev still has open detaches it when udev closes it
    // (autoclear): give that a few seconds.
    let start = std::time::Instant::now();
    while !attached().is_empty() && start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        attached().is_empty(),
        "loop devices still attached: {:?}",
        attached()
    );
    let mi = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mi.contains(&d), "still mounted under {d}:\n{mi}");
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(7);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A small root file system: a static busybox as /bin/sh (for the post-install chroot), files
/// with owners, modes, a hard link, symlinks, an xattr.
fn rootfs_tree(dir: &Path) -> bool {
    for d in ["bin", "etc", "root", "tmp", "usr/bin", "var/lib/x", "boot"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for l in ["sh", "echo", "cat", "test", "ls", "id"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(l)).unwrap();
    }
    fs::write(dir.join("etc/hostname"), "node-1\n").unwrap();
    fs::write(dir.join("etc/shadow"), "root:*:1::::::\n").unwrap();
    fs::set_permissions(dir.join("etc/shadow"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(dir.join("etc/shadow"), Some(0), Some(42)).unwrap();
    fs::write(dir.join("usr/bin/data"), pattern(2 * MIB as usize + 3, 1)).unwrap();
    fs::set_permissions(dir.join("usr/bin/data"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(dir.join("usr/bin/data"), dir.join("usr/bin/data2")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/data", dir.join("usr/bin/abs")).unwrap();
    std::os::unix::fs::chown(dir.join("var/lib/x"), Some(100), Some(101)).unwrap();
    fs::write(dir.join("vmlinuz"), "not a kernel").unwrap();
    let ok = xattr::set(dir.join("etc/hostname"), "user.kd", b"v").is_ok();
    let why = format!("user xattrs unsupported in {}: xattr check", dir.display());
    !kd_disk::testenv::skip_unless(ok, &why)
}

fn tar_of(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner"])
        .args(extra)
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A post-install archive holding `script` as `post.sh`, compressed with `flag` (-z, -J, --zstd).
fn postinstall_archive(dir: &Path, name: &str, flag: &str, script: &str) -> PathBuf {
    let src = dir.join(format!("{name}.d"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("post.sh"), script).unwrap();
    fs::write(src.join("payload.txt"), format!("payload of {name}\n")).unwrap();
    let path = dir.join(name);
    let st = Command::new("tar")
        .arg(flag)
        .arg("-C")
        .arg(&src)
        .args(["-cf"])
        .arg(&path)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    path
}

fn feed(t: &Target, data: &[u8]) -> Result<kd_disk::WriteSummary, DiskError> {
    let mut s = t.sink()?;
    for c in data.chunks(256 * 1024 + 17) {
        s.write_all(c)?;
    }
    s.finish()
}

fn layout(dev: &Path, label: &str, parts: &str) -> Layout {
    Layout::from_yaml(&format!(
        "device: {}\nlabel: {label}\npartitions:\n{parts}",
        dev.display()
    ))
    .unwrap()
}

fn prep(l: Layout, image: ImageKind, work: PathBuf) -> PrepareConfig {
    PrepareConfig {
        layout: l,
        deploy_partition: None,
        image,
        work_dir: work,
        partition: true,
        node_wait_ms: 300,
    }
}

fn boot() -> BootConfig {
    BootConfig {
        title: "debian-test".into(),
        kernel: "/vmlinuz".into(),
        initrd: None,
        params: "console=ttyS0".into(),
        bios: true,
        efi: true,
    }
}

fn names(log: &StepLog) -> Vec<&str> {
    log.steps.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn gpt_tar_pipeline_postinstall_ssh_fstab_grub() {
    if skip() {
        return;
    }
    let disk = Disk::new(400 * MIB);
    let parts = "  - { number: 1, size: 1MiB, role: bios_grub }\n  - { number: 2, size: 32MiB, role: swap }\n  - { number: 3, size: 160MiB, role: deploy, fs: ext4 }\n  - { number: 5, size: 33MiB, role: esp }\n  - { number: 4, size: rest, role: tmp }\n";
    let l = layout(disk.path(), "gpt", parts);
    let src = disk.dir.path().join("src");
    let xa = rootfs_tree(&src);
    let image = tar_of(&src, &[]);
    let admin = postinstall_archive(
        disk.dir.path(),
        "admin.tgz",
        "-z",
        "set -e\necho \"$KD_NODE $KD_ENV $KD_DEPLOY_PART_NUM\" > /etc/kd-post\ncat payload.txt >> /etc/kd-post\ntest -e /proc/self/status\ntest -e /dev/null\necho admin-ran\n",
    );
    let user = postinstall_archive(
        disk.dir.path(),
        "user.tar.zst",
        "--zstd",
        "echo user >> /etc/kd-post\n",
    );
    let user2 = postinstall_archive(
        disk.dir.path(),
        "user.txz",
        "-J",
        "echo txz >> /etc/kd-post\n",
    );

    let mut log = StepLog::default();
    let p = prepare(&prep(l, ImageKind::Tar, disk.work()), &mut log).unwrap();
    let plan = p.plan().unwrap().clone();
    let Target::Dir(root) = p.target().clone() else {
        panic!("tar needs a directory")
    };
    let s = feed(p.target(), &image).unwrap();
    assert_eq!(s.bytes, image.len() as u64);
    let fin = FinishConfig {
        node: "node-1".into(),
        environment: "debian-test".into(),
        postinstalls: vec![
            PostInstall {
                archive: admin,
                script: Some("post.sh".into()),
            },
            PostInstall {
                archive: user,
                script: Some("./post.sh".into()),
            },
            PostInstall {
                archive: user2,
                script: Some("post.sh".into()),
            },
        ],
        postinstall_timeout_secs: 60,
        ssh_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKd test@kd".into()),
        boot: Some(boot()),
    };
    p.finish(&fin, &mut log).unwrap();
    let n = names(&log);
    for want in [
        "check",
        "partition",
        "partition-devices",
        "mkfs:2",
        "mkfs:3",
        "mkfs:4",
        "mkfs:5",
        "mount",
        "chroot-mounts",
        "postinstall:1",
        "postinstall:2",
        "postinstall:3",
        "ssh-key",
        "fstab",
        "grub-cfg",
        "grub-install:x86_64-efi",
        "grub-install:i386-pc",
        "umount",
    ] {
        assert!(n.contains(&want), "step {want} missing from {n:?}");
    }
    assert!(log
        .get("postinstall:1")
        .unwrap()
        .output
        .contains("admin-ran"));
    eprintln!(
        "steps: {:#?}",
        log.steps
            .iter()
            .map(|s| (&s.name, s.millis))
            .collect::<Vec<_>>()
    );
    assert!(
        !root.join("etc").exists(),
        "the deploy partition is unmounted after finish"
    );

    // The table as planned.
    let table = kd_disk::partition::read_table(disk.path()).unwrap();
    let mut want: Vec<_> = plan
        .partitions
        .iter()
        .map(|p| (p.number, p.start, p.size))
        .collect();
    want.sort();
    assert_eq!(table, want);
    // Boot code in the MBR, core image in the bios_grub partition.
    let mbr = disk.read(0, 512);
    assert!(
        mbr[..440].iter().any(|b| *b != 0),
        "no boot code in the MBR"
    );
    assert_eq!(&mbr[510..], &[0x55, 0xAA]);
    let bios = &plan.partitions[0];
    assert!(
        disk.read(bios.start, 512).iter().any(|b| *b != 0),
        "no core image in bios_grub"
    );

    // Look at the deployed tree.
    let deploy = plan.partitions[2].clone();
    let (m, l, dir) = disk.mount_part(deploy.start, deploy.size, "check");
    let out = Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(src.join("usr"))
        .arg(dir.join("usr"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let shadow = fs::metadata(dir.join("etc/shadow")).unwrap();
    assert_eq!((shadow.gid(), shadow.mode() & 0o7777), (42, 0o640));
    assert_eq!(
        fs::metadata(dir.join("usr/bin/data")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(dir.join("usr/bin/data")).unwrap().ino(),
        fs::metadata(dir.join("usr/bin/data2")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(dir.join("usr/bin/abs")).unwrap(),
        Path::new("/usr/bin/data")
    );
    assert_eq!(fs::metadata(dir.join("var/lib/x")).unwrap().uid(), 100);
    if xa {
        let v = xattr::get(dir.join("etc/hostname"), "user.kd").unwrap();
        assert_eq!(v.unwrap(), b"v");
    }
    assert_eq!(
        fs::read_to_string(dir.join("etc/kd-post")).unwrap(),
        "node-1 debian-test 3\npayload of admin.tgz\nuser\ntxz\n"
    );
    assert!(
        !dir.join("tmp/kd-postinstall-1").exists(),
        "post-install directory removed"
    );
    let keys = dir.join("root/.ssh/authorized_keys");
    assert_eq!(fs::metadata(&keys).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        fs::metadata(dir.join("root/.ssh")).unwrap().mode() & 0o777,
        0o700
    );
    assert!(fs::read_to_string(&keys).unwrap().contains("test@kd"));
    let fstab = fs::read_to_string(dir.join("etc/fstab")).unwrap();
    let lines: Vec<&str> = fstab.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 4, "{fstab}");
    assert!(
        lines[0].starts_with("UUID=") && lines[0].ends_with(" / ext4 errors=remount-ro 0 1"),
        "{fstab}"
    );
    assert!(
        lines[1].ends_with(" /boot/efi vfat umask=0077 0 1"),
        "{fstab}"
    );
    assert!(lines[2].ends_with(" /tmp ext4 defaults 0 2"), "{fstab}");
    assert!(lines[3].ends_with(" none swap sw 0 0"), "{fstab}");
    let root_uuid = lines[0]
        .trim_start_matches("UUID=")
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let cfg = fs::read_to_string(dir.join("boot/grub/grub.cfg")).unwrap();
    assert!(
        cfg.contains(&format!(
            "linux /vmlinuz root=UUID={root_uuid} ro console=ttyS0"
        )),
        "{cfg}"
    );
    assert!(
        dir.join("boot/grub/i386-pc/normal.mod").exists(),
        "grub modules installed"
    );
    let efi = log.get("grub-install:x86_64-efi").unwrap();
    // This host's kernel cannot mount vfat: the step says it skipped; elsewhere it installs.
    assert!(
        efi.error.is_none()
            && (efi.output.contains("cannot mount the ESP") || efi.output.contains("x86_64-efi")),
        "{efi:?}"
    );
    m.unmount().unwrap();
    l.detach().unwrap();
    disk.release();
}

#[test]
fn msdos_raw_partition_keep_untouched() {
    if skip() {
        return;
    }
    let disk = Disk::new(300 * MIB);
    let first = "  - { number: 1, size: 32MiB, role: swap }\n  - { number: 2, size: 128MiB, role: deploy }\n  - { number: 3, size: 16MiB, role: tmp }\n  - { number: 5, size: rest, role: tmp }\n";
    let l0 = layout(disk.path(), "msdos", first);
    let plan0 = l0.resolve(300 * MIB, None).unwrap();
    kd_disk::partition::write_table(disk.path(), &plan0).unwrap();
    let keep = plan0.partitions[2].clone();
    let keep_bytes = pattern(keep.size as usize, 77);
    disk.write(keep.start, &keep_bytes);

    // A raw ext4 image of 64 MiB made from a directory.
    let src = disk.dir.path().join("src");
    rootfs_tree(&src);
    let img = disk.dir.path().join("fs.img");
    fs::File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let image = fs::read(&img).unwrap();

    let parts = first.replace(
        "number: 3, size: 16MiB, role: tmp",
        "number: 3, size: 16MiB, role: keep",
    );
    let l = layout(disk.path(), "msdos", &parts);
    let mut log = StepLog::default();
    let p = prepare(&prep(l, ImageKind::RawPartition, disk.work()), &mut log).unwrap();
    assert!(
        !names(&log).contains(&"mkfs:2"),
        "a raw deploy partition is not formatted"
    );
    assert!(!names(&log).contains(&"mkfs:3"), "keep is never formatted");
    let plan = p.plan().unwrap().clone();
    let deploy = plan.partitions[1].clone();
    feed(p.target(), &image).unwrap();
    assert!(
        disk.read(deploy.start, image.len() as u64) == image,
        "raw image bytes differ"
    );
    let fin = FinishConfig {
        node: "n".into(),
        environment: "e".into(),
        ssh_key: Some("ssh-rsa AAAA k@kd".into()),
        boot: Some(BootConfig {
            efi: false,
            ..boot()
        }),
        ..Default::default()
    };
    p.finish(&fin, &mut log).unwrap();
    assert!(
        disk.read(keep.start, keep.size) == keep_bytes,
        "keep partition changed"
    );
    let mbr = disk.read(0, 512);
    assert!(
        mbr[..440].iter().any(|b| *b != 0),
        "no boot code in the MBR"
    );
    assert!(
        disk.read(512, 512).iter().any(|b| *b != 0),
        "no core image in the MBR gap"
    );
    let (m, lo, dir) = disk.mount_part(deploy.start, deploy.size, "check");
    assert_eq!(
        fs::metadata(dir.join("root/.ssh/authorized_keys"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
    assert!(fs::read_to_string(dir.join("etc/fstab"))
        .unwrap()
        .contains(" / ext4 "));
    assert_eq!(
        fs::read_to_string(dir.join("etc/hostname")).unwrap(),
        "node-1\n"
    );
    m.unmount().unwrap();
    lo.detach().unwrap();

    // Moving the keep partition is refused before anything is written.
    let moved = parts.replace("number: 2, size: 128MiB", "number: 2, size: 120MiB");
    let before = disk.read(0, MIB);
    let err = prepare(
        &prep(
            layout(disk.path(), "msdos", &moved),
            ImageKind::Tar,
            disk.work(),
        ),
        &mut StepLog::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("refusing to move it"), "{err}");
    assert!(disk.read(0, MIB) == before);
    disk.release();
}

#[test]
fn raw_image_overflowing_the_partition_fails_cleanly() {
    if skip() {
        return;
    }
    let disk = Disk::new(100 * MIB);
    let parts =
        "  - { number: 1, size: 8MiB, role: deploy }\n  - { number: 2, size: 16MiB, role: keep }\n";
    let l0 = layout(disk.path(), "gpt", &parts.replace("keep", "tmp"));
    let plan0 = l0.resolve(100 * MIB, None).unwrap();
    kd_disk::partition::write_table(disk.path(), &plan0).unwrap();
    let keep = plan0.partitions[1].clone();
    let keep_bytes = pattern(keep.size as usize, 3);
    disk.write(keep.start, &keep_bytes);
    let mut log = StepLog::default();
    let p = disk.prepare("gpt", parts, ImageKind::RawPartition, &mut log);
    let err = feed(p.target(), &pattern(9 * MIB as usize, 1)).unwrap_err();
    assert!(matches!(err, DiskError::ImageTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("overflows its target"), "{err}");
    drop(p);
    assert!(
        disk.read(keep.start, keep.size) == keep_bytes,
        "wrote past the deploy partition"
    );
    disk.release();
}

#[test]
fn failing_postinstall_fails_with_its_output_and_cleans_up() {
    if skip() {
        return;
    }
    let disk = Disk::new(200 * MIB);
    let parts = "  - { number: 1, size: 1MiB, role: bios_grub }\n  - { number: 2, size: rest, role: deploy }\n";
    let src = disk.dir.path().join("src");
    rootfs_tree(&src);
    let bad = postinstall_archive(
        disk.dir.path(),
        "bad.tgz",
        "-z",
        "echo about to fail\nexit 1\n",
    );
    let mut log = StepLog::default();
    let p = disk.prepare("gpt", parts, ImageKind::Tar, &mut log);
    feed(p.target(), &tar_of(&src, &[])).unwrap();
    let fin = FinishConfig {
        postinstalls: vec![PostInstall {
            archive: bad,
            script: Some("post.sh".into()),
        }],
        ..Default::default()
    };
    let err = p.finish(&fin, &mut log).unwrap_err();
    assert!(matches!(err, DiskError::Command { .. }), "{err}");
    let rec = log.get("postinstall:1").unwrap();
    assert!(
        rec.error.as_ref().unwrap().contains("exit status: 1"),
        "{rec:?}"
    );
    assert!(rec.output.contains("about to fail"), "{rec:?}");
    disk.release();
}

#[test]
fn truncated_or_hostile_tar_fails_and_releases_everything() {
    if skip() {
        return;
    }
    let disk = Disk::new(100 * MIB);
    let parts = "  - { number: 1, size: rest, role: deploy }\n";
    let src = disk.dir.path().join("src");
    rootfs_tree(&src);
    let image = tar_of(&src, &[]);
    let mut log = StepLog::default();
    let p = disk.prepare("msdos", parts, ImageKind::Tar, &mut log);
    let err = feed(p.target(), &image[..image.len() / 2]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    drop(p);
    let p = disk.prepare("msdos", parts, ImageKind::Tar, &mut log);
    let mut evil = tar::Header::new_gnu();
    evil.as_old_mut().name[..9].copy_from_slice(b"../escape");
    evil.set_size(0);
    evil.set_mode(0o644);
    evil.set_cksum();
    let mut t = evil.as_bytes().to_vec();
    t.extend_from_slice(&[0u8; 1024]);
    let err = feed(p.target(), &t).unwrap_err();
    assert!(matches!(err, DiskError::UnsafeEntry { .. }), "{err}");
    drop(p);
    assert!(!disk.work().join("escape").exists());
    disk.release();
}

#[test]
fn unsafe_devices_refused_before_writing() {
    if skip() {
        return;
    }
    // A mounted device.
    let disk = Disk::new(64 * MIB);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(disk.path())
        .status()
        .unwrap();
    assert!(st.success());
    let mnt = disk.dir.path().join("mnt");
    let m = Mount::new(
        disk.path(),
        &mnt,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None,
    )
    .unwrap();
    let before = disk.read(0, 2 * MIB);
    let parts = "  - { number: 1, size: rest, role: deploy }\n";
    let err = prepare(
        &prep(
            layout(disk.path(), "gpt", parts),
            ImageKind::Tar,
            disk.work(),
        ),
        &mut StepLog::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("mounted file system"), "{err}");
    m.unmount().unwrap();
    // ext4 itself rewrites its superblock while mounted; a partition table would land in the
    // first KiB (protective MBR, GPT header) and the last MiB (backup GPT).
    assert!(
        disk.read(0, 1024) == before[..1024],
        "the mounted device was written"
    );
    let before_tail = disk.read(63 * MIB, MIB);
    let before = disk.read(0, 2 * MIB);

    // A layout larger than the disk.
    let big = "  - { number: 1, size: 1GiB, role: deploy }\n";
    let mut log = StepLog::default();
    let err = prepare(
        &prep(layout(disk.path(), "gpt", big), ImageKind::Tar, disk.work()),
        &mut log,
    )
    .unwrap_err();
    assert!(err.to_string().contains("larger than the disk"), "{err}");
    assert_eq!(names(&log), vec!["check"]);
    assert!(log.steps[0].error.is_some());
    assert!(disk.read(0, 2 * MIB) == before);
    assert!(disk.read(63 * MIB, MIB) == before_tail);

    // A partition-like device (a loop device with an offset is fine as a disk), a regular file,
    // and the device of `/`.
    let err = prepare(
        &prep(
            layout(&disk.file, "gpt", parts),
            ImageKind::Tar,
            disk.work(),
        ),
        &mut StepLog::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a block device"), "{err}");
    let root_dev = fs::metadata("/").unwrap().dev();
    let node = format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(root_dev),
        nix::sys::stat::minor(root_dev)
    );
    if let Ok(uevent) = fs::read_to_string(format!("{node}/uevent")) {
        if let Some(name) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) {
            let dev = PathBuf::from("/dev").join(name);
            if dev.exists() {
                let err = kd_disk::safety::check_device(&dev, 0).unwrap_err();
                let msg = err.to_string();
                assert!(
                    msg.contains("root file system")
                        || msg.contains("partition")
                        || msg.contains("mounted"),
                    "{msg}"
                );
            }
        }
    }
    disk.release();
}

#[test]
fn raw_whole_disk_image_and_existing_table() {
    if skip() {
        return;
    }
    let disk = Disk::new(64 * MIB);
    let parts =
        "  - { number: 1, size: 8MiB, role: swap }\n  - { number: 2, size: rest, role: deploy }\n";
    let l = layout(disk.path(), "gpt", parts);
    let image = pattern(5 * MIB as usize + 123, 11);
    let mut log = StepLog::default();
    let p = prepare(&prep(l.clone(), ImageKind::RawDisk, disk.work()), &mut log).unwrap();
    assert_eq!(
        names(&log),
        vec!["check"],
        "a whole-disk image is not partitioned"
    );
    assert!(matches!(p.target(), Target::Raw { limit, .. } if *limit == 64 * MIB));
    feed(p.target(), &image).unwrap();
    p.finish(&FinishConfig::default(), &mut log).unwrap();
    assert!(
        disk.read(0, image.len() as u64) == image,
        "whole-disk image differs"
    );

    // Partitioning disabled: the existing table must match the layout.
    let mut log = StepLog::default();
    let mut cfg = prep(l.clone(), ImageKind::Tar, disk.work());
    cfg.partition = false;
    let err = prepare(&cfg, &mut log).unwrap_err();
    assert!(
        err.to_string().contains("no GPT and no MBR")
            || err.to_string().contains("not on the disk"),
        "{err}"
    );
    let plan = l.resolve(64 * MIB, None).unwrap();
    kd_disk::partition::write_table(disk.path(), &plan).unwrap();
    let mut log = StepLog::default();
    let p = prepare(&cfg, &mut log).unwrap();
    assert!(names(&log).contains(&"check-partitions"));
    assert!(!names(&log).contains(&"partition"));
    drop(p);
    disk.release();
}
