//! The streaming image writers on temp files and directories (no devices needed).
#![allow(clippy::unwrap_used)]
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kd_disk::{raw_sink, tar_sink, DiskError, ImageSink, WriteSummary};

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Feed `data` in uneven chunks, then finish.
fn feed(
    mut sink: Box<dyn ImageSink>,
    data: &[u8],
    chunk: usize,
) -> Result<WriteSummary, DiskError> {
    for c in data.chunks(chunk) {
        sink.write_all(c)?;
    }
    sink.finish()
}

#[test]
fn raw_image_written_and_compared() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("disk.img");
    fs::write(&target, vec![0xAAu8; 8 * MIB]).unwrap();
    let img = pattern(3 * MIB + 12345, 1);
    let s = feed(
        raw_sink(&target, Some(8 * MIB as u64)).unwrap(),
        &img,
        100_003,
    )
    .unwrap();
    assert_eq!(
        s,
        WriteSummary {
            bytes: img.len() as u64,
            files: 0
        }
    );
    let got = fs::read(&target).unwrap();
    assert_eq!(got.len(), 8 * MIB);
    assert!(got[..img.len()] == img[..], "image bytes differ");
    assert!(
        got[img.len()..].iter().all(|b| *b == 0xAA),
        "bytes after the image were touched"
    );
}

#[test]
fn raw_image_smaller_than_the_held_back_mib() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("new.img");
    let img = pattern(5000, 2);
    feed(raw_sink(&target, None).unwrap(), &img, 4096).unwrap();
    let got = fs::read(&target).unwrap();
    assert_eq!(&got[..5000], &img[..]);
    // The zeroed first MiB stays zero after the image.
    assert!(got[5000..].iter().all(|b| *b == 0));
}

#[test]
fn raw_image_overflowing_its_target_fails_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("part.img");
    fs::write(&target, vec![0xAAu8; 4 * MIB]).unwrap();
    let img = pattern(3 * MIB, 3);
    let err = feed(
        raw_sink(&target, Some(2 * MIB as u64)).unwrap(),
        &img,
        MIB / 2,
    )
    .unwrap_err();
    match &err {
        DiskError::ImageTooLarge { limit, needed, .. } => {
            assert_eq!(*limit, 2 * MIB as u64);
            assert!(*needed > *limit);
        }
        e => panic!("expected ImageTooLarge, got {e}"),
    }
    assert!(err.to_string().contains("overflows its target"), "{err}");
    let got = fs::read(&target).unwrap();
    assert!(
        got[2 * MIB..].iter().all(|b| *b == 0xAA),
        "wrote past the limit"
    );
    assert!(
        got[..MIB].iter().all(|b| *b == 0),
        "first MiB must stay zeroed after a failure"
    );
}

/// coreos-installer's order, watched on the target: the first MiB is zeroed when the sink opens,
/// stays zero while every later byte is written, and receives the image's first MiB only in
/// `finish` (a node whose write stops midway has no partition table or boot sector).
#[test]
fn raw_sink_writes_the_first_mib_last() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("disk.img");
    fs::write(&target, vec![0xAAu8; 10 * MIB]).unwrap();
    // A multiple of the sink's 4 MiB messages: every byte reaches the writer before `finish`.
    let img = pattern(8 * MIB, 5);
    let mut sink = raw_sink(&target, None).unwrap();
    let got = fs::read(&target).unwrap();
    assert!(
        got[..MIB].iter().all(|b| *b == 0),
        "the first MiB is not zeroed before the image is written"
    );
    for c in img.chunks(MIB / 3) {
        sink.write_all(c).unwrap();
    }
    // The writer thread works on its own: watch the target until all but the first MiB is there
    // (10 s at most); the first MiB must stay zero all along.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = fs::read(&target).unwrap();
        assert!(
            got[..MIB].iter().all(|b| *b == 0),
            "the first MiB was written before finish"
        );
        if got[MIB..img.len()] == img[MIB..] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the image after its first MiB did not reach the target within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sink.finish().unwrap();
    let got = fs::read(&target).unwrap();
    assert!(
        got[..img.len()] == img[..],
        "image bytes differ after finish"
    );
    assert!(got[img.len()..].iter().all(|b| *b == 0xAA));
}

#[test]
fn raw_sink_dropped_without_finish_leaves_first_mib_zeroed() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("d.img");
    // 8 MiB (two whole messages): the writer receives the first MiB before the sink is dropped.
    let img = pattern(8 * MIB, 4);
    let mut sink = raw_sink(&target, None).unwrap();
    sink.write_all(&img).unwrap();
    drop(sink);
    let got = fs::read(&target).unwrap();
    assert!(got[..MIB].iter().all(|b| *b == 0));
}

// ---------------------------------------------------------------------------------------------
// tar

/// Build a header with a raw (unchecked) path, to craft hostile archives.
fn raw_header(path: &[u8], kind: tar::EntryType, size: u64, link: Option<&[u8]>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

fn pax_xattr(b: &mut tar::Builder<Vec<u8>>, key: &str, value: &str) {
    let rec = |k: &str, v: &str| {
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    };
    let data = rec(&format!("SCHILY.xattr.{key}"), value);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_path("PaxHeaders/x").unwrap();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, data.as_bytes()).unwrap();
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h
}

fn crafted_rootfs(xattrs: bool) -> Vec<u8> {
    use tar::EntryType as T;
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(T::Directory, 0o755, 0, 0, 0);
    b.append_data(&mut h, "./", &[][..]).unwrap();
    for d in ["etc", "usr", "usr/bin", "dev", "run"] {
        let mut h = header(T::Directory, 0o755, 0, 0, 0);
        b.append_data(&mut h, d, &[][..]).unwrap();
    }
    if xattrs {
        pax_xattr(&mut b, "user.kd.dir", "dirvalue");
    }
    let mut h = header(T::Directory, 0o1777, 0, 0, 0);
    b.append_data(&mut h, "tmp", &[][..]).unwrap();
    if xattrs {
        pax_xattr(&mut b, "user.kd.file", "hello");
    }
    let mut h = header(T::Regular, 0o644, 0, 0, 5);
    b.append_data(&mut h, "etc/hostname", &b"node\n"[..])
        .unwrap();
    let mut h = header(T::Regular, 0o4755, 0, 0, 3);
    b.append_data(&mut h, "usr/bin/tool", &b"elf"[..]).unwrap();
    let mut h = header(T::Link, 0o4755, 0, 0, 0);
    b.append_link(&mut h, "usr/bin/tool2", "usr/bin/tool")
        .unwrap();
    let mut h = header(T::Symlink, 0o777, 0, 0, 0);
    b.append_link(&mut h, "bin", "usr/bin").unwrap();
    let mut h = header(T::Symlink, 0o777, 1000, 1000, 0);
    b.append_link(&mut h, "usr/bin/abs", "/bin/tool").unwrap();
    let mut h = header(T::Regular, 0o600, 1000, 1001, 6);
    b.append_data(&mut h, "home/user/secret", &b"secret"[..])
        .unwrap();
    let mut h = header(T::Char, 0o666, 0, 0, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
    let mut h = header(T::Fifo, 0o640, 0, 5, 0);
    b.append_data(&mut h, "run/initctl", &[][..]).unwrap();
    b.into_inner().unwrap()
}

/// Whether `user.*` xattrs work in `dir` (ext4 yes; tmpfs only on recent kernels).
fn user_xattrs(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    fs::write(&probe, b"").unwrap();
    let ok = xattr::set(&probe, "user.kd.probe", b"1").is_ok();
    fs::remove_file(&probe).unwrap();
    let why = format!("user xattrs unsupported in {}: xattr checks", dir.display());
    !kd_disk::testenv::skip_unless(ok, &why)
}

fn xattr(p: &Path, k: &str) -> Option<Vec<u8>> {
    xattr::get(p, k).unwrap()
}

#[test]
fn tar_crafted_rootfs_keeps_metadata() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let xa = user_xattrs(t.path());
    let tar = crafted_rootfs(xa);
    let s = feed(tar_sink(&root).unwrap(), &tar, 1000).unwrap();
    assert_eq!(s.bytes, tar.len() as u64);
    assert_eq!(s.files, 15);

    let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"node\n");
    assert_eq!(md("usr/bin/tool").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(md("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(
        md("usr/bin/tool").ino(),
        md("usr/bin/tool2").ino(),
        "hard link"
    );
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        fs::read_link(root.join("usr/bin/abs")).unwrap(),
        Path::new("/bin/tool")
    );
    assert_eq!(md("usr/bin/abs").uid(), 1000);
    let secret = md("home/user/secret");
    assert_eq!(
        (secret.uid(), secret.gid(), secret.mode() & 0o777),
        (1000, 1001, 0o600)
    );
    let null = md("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(null.mode() & 0o777, 0o666);
    let fifo = md("run/initctl");
    assert!(fifo.file_type().is_fifo());
    assert_eq!((fifo.gid(), fifo.mode() & 0o777), (5, 0o640));
    assert_eq!(
        md("etc").mtime(),
        1_600_000_000,
        "directory mtimes are restored at the end"
    );
    assert_eq!(md("etc/hostname").mtime(), 1_600_000_000);
    assert_eq!(md("dev/null").mtime(), 1_600_000_000);
    if xa {
        assert_eq!(
            xattr(&root.join("etc/hostname"), "user.kd.file").unwrap(),
            b"hello"
        );
        assert_eq!(
            xattr(&root.join("tmp"), "user.kd.dir").unwrap(),
            b"dirvalue"
        );
    }
}

/// Walk `a` and `b` and compare type, mode, owner, mtime, content, link targets, xattrs and
/// hard-link structure.
fn compare_trees(a: &Path, b: &Path) {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            out.push(r.clone());
            if e.file_type().unwrap().is_dir() {
                walk(root, &r, out);
            }
        }
    }
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    walk(a, Path::new(""), &mut la);
    walk(b, Path::new(""), &mut lb);
    la.sort();
    lb.sort();
    assert_eq!(la, lb, "file lists differ");
    let mut inodes = std::collections::HashMap::new();
    for r in &la {
        let (ma, mb) = (
            fs::symlink_metadata(a.join(r)).unwrap(),
            fs::symlink_metadata(b.join(r)).unwrap(),
        );
        assert_eq!(ma.mode(), mb.mode(), "mode of {r:?}");
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "owner of {r:?}");
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {r:?}");
        if ma.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(a.join(r)).unwrap(),
                fs::read_link(b.join(r)).unwrap()
            );
        } else if ma.is_file() {
            assert_eq!(
                fs::read(a.join(r)).unwrap(),
                fs::read(b.join(r)).unwrap(),
                "{r:?}"
            );
            assert_eq!(
                xattr(&a.join(r), "user.kd"),
                xattr(&b.join(r), "user.kd"),
                "{r:?}"
            );
            let prev = inodes.insert(ma.ino(), mb.ino());
            assert!(
                prev.is_none() || prev == Some(mb.ino()),
                "hard links of {r:?}"
            );
        }
    }
}

#[test]
fn tar_from_gnu_tar_extracted_and_compared() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    for d in ["etc/ssh", "usr/bin", "usr/lib", "var/empty"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("etc/ssh/sshd_config"), "PermitRootLogin yes\n").unwrap();
    fs::set_permissions(
        src.join("etc/ssh/sshd_config"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(src.join("usr/bin/big"), pattern(3 * MIB + 7, 9)).unwrap();
    fs::set_permissions(src.join("usr/bin/big"), fs::Permissions::from_mode(0o2755)).unwrap();
    fs::hard_link(src.join("usr/bin/big"), src.join("usr/bin/big-link")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/big", src.join("usr/bin/abs")).unwrap();
    std::os::unix::fs::symlink("usr/lib", src.join("lib")).unwrap();
    std::os::unix::fs::chown(src.join("var/empty"), Some(33), Some(44)).unwrap();
    let xa = user_xattrs(t.path());
    if xa {
        xattr::set(src.join("etc/ssh/sshd_config"), "user.kd", b"x1").unwrap();
    }
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-C"])
        .arg(&src)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dst = t.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let s = feed(tar_sink(&dst).unwrap(), &out.stdout, 65536 + 3).unwrap();
    assert_eq!(s.bytes, out.stdout.len() as u64);
    compare_trees(&src, &dst);
    if xa {
        assert_eq!(
            xattr(&dst.join("etc/ssh/sshd_config"), "user.kd").unwrap(),
            b"x1"
        );
    }
}

fn end_of_archive(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

/// Extract `tar` into `outer/root` and return the error; nothing may appear in `outer` but `root`.
fn refused(tar: &[u8]) -> DiskError {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let err = feed(tar_sink(&root).unwrap(), tar, 512).unwrap_err();
    let names: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("root")],
        "something was written outside"
    );
    err
}

#[test]
fn tar_dotdot_path_refused() {
    let mut v = raw_header(b"../evil", tar::EntryType::Regular, 4, None)
        .as_bytes()
        .to_vec();
    v.extend_from_slice(b"evil");
    v.resize(1024, 0);
    let err = refused(&end_of_archive(v));
    assert!(matches!(err, DiskError::UnsafeEntry { .. }), "{err}");
    assert!(err.to_string().contains("`..`"), "{err}");
}

#[test]
fn tar_write_through_planted_symlink_refused() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    b.append_link(&mut h, "escape", &outside).unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
    b.append_link(&mut h, "up", "../..").unwrap();
    let mut v = b.into_inner().unwrap();
    v.truncate(v.len() - 1024);
    for p in [&b"escape/pwned"[..], b"up/pwned"] {
        let mut v2 = v.clone();
        v2.extend_from_slice(raw_header(p, tar::EntryType::Regular, 3, None).as_bytes());
        v2.extend_from_slice(&[b'x'; 512]);
        let err = refused(&end_of_archive(v2));
        assert!(err.to_string().contains("is a symlink"), "{err}");
    }
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn tar_hard_link_outside_refused() {
    for (target, why) in [
        (&b"/etc/passwd"[..], "absolute"),
        (b"../../etc/passwd", "`..`"),
    ] {
        let v = raw_header(b"pw", tar::EntryType::Link, 0, Some(target))
            .as_bytes()
            .to_vec();
        let err = refused(&end_of_archive(v));
        assert!(matches!(err, DiskError::UnsafeEntry { .. }), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
}

#[test]
fn tar_truncated_is_an_error() {
    let full = crafted_rootfs(false);
    let t = tempfile::tempdir().unwrap();
    // Cut inside the secret file's data, at a header boundary, and just before the end marker.
    let pos = full.windows(6).position(|w| w == b"secret").unwrap() + 3;
    for cut in [pos, pos - pos % 512 + 512, full.len() - 1024] {
        let root = t.path().join(format!("r{cut}"));
        fs::create_dir(&root).unwrap();
        let err = feed(tar_sink(&root).unwrap(), &full[..cut], 4096).unwrap_err();
        assert!(err.to_string().contains("truncated"), "cut at {cut}: {err}");
    }
}

#[test]
fn tar_garbage_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let err = feed(tar_sink(t.path()).unwrap(), &pattern(10_000, 5), 4096).unwrap_err();
    assert!(matches!(err, DiskError::BadImage(_)), "{err}");
}
