//! `kd-bench disk`: write throughput of kd's tar path (streaming extraction) and raw path
//! (coreos-installer order) against `tar -x` and `dd` on the same loop device (ext4 on a loop
//! device over a file), one run each by default (`--runs N`: best of N, alternating order),
//! printed as a table with ratios. Needs root.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kd_disk::loopdev::LoopDevice;
use kd_disk::mount::Mount;
use kd_disk::{raw_sink, tar_sink, FsType};

/// Options of `kd-bench disk`.
#[derive(clap::Args)]
pub(crate) struct DiskArgs {
    /// Image size in MiB (tar payload and raw image).
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Directory for the backing file of the loop device (on the disk to measure).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Directory (in RAM) holding the images that `tar -x` and `dd` read.
    #[arg(long, default_value = "/dev/shm")]
    input_dir: PathBuf,
    /// Runs of each writer (alternating which goes first); the best time of each is shown.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Bytes per write_all call (like the broadcast engine's chunks).
    #[arg(long, default_value_t = 1 << 20)]
    chunk: usize,
}

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn header() -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// A root-file-system-like tar: many small files, some large ones, directories, symlinks.
fn make_tar(total: u64) -> Result<(Vec<u8>, u64)> {
    let mut b = tar::Builder::new(Vec::with_capacity(usize::try_from(total + total / 8)?));
    let sizes = [512usize, 3000, 12_000, 40_000, 200_000, 4 << 20];
    let mut written = 0u64;
    let mut files = 0u64;
    let mut i = 0usize;
    let big = pattern(4 << 20, 1);
    while written < total {
        if i.is_multiple_of(200) {
            let mut h = header();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, format!("usr/d{}", i / 200), &[][..])?;
        }
        let size = sizes[i % sizes.len()];
        let mut h = header();
        h.set_mode(0o644);
        h.set_size(size as u64);
        h.set_mtime(1_700_000_000);
        let off = (i * 4099) % (big.len() - size).max(1);
        b.append_data(
            &mut h,
            format!("usr/d{}/f{i}", i / 200),
            &big[off..off + size],
        )?;
        if i.is_multiple_of(50) {
            let mut h = header();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(
                &mut h,
                format!("usr/d{}/l{i}", i / 200),
                format!("/usr/d{}/f{i}", i / 200),
            )?;
        }
        written += size as u64;
        files += 1;
        i += 1;
    }
    Ok((b.into_inner()?, files))
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// Run a reference tool to completion (an hour at most).
fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = kd_disk::cmd::output(cmd, Duration::from_secs(3600), None)
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn fresh_ext4(dev: &Path, mnt: &Path) -> Result<Mount> {
    kd_disk::fs::mkfs(FsType::Ext4, dev, None)?;
    sync();
    Ok(Mount::new(dev, mnt, Some("ext4"), nix_flags(), None)?)
}

fn nix_flags() -> kd_disk::mount::MsFlags {
    kd_disk::mount::MsFlags::empty()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Time `f`, which must flush its own writes (fsync, syncfs); everything else is flushed
/// before the clock starts.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    sync();
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

pub(crate) fn run(a: DiskArgs) -> Result<()> {
    if !Path::new("/dev/loop-control").exists() {
        bail!("no loop devices here (/dev/loop-control is absent)");
    }
    let tmp = Scratch(a.dir.join(format!("kd-bench-disk.{}", std::process::id())));
    std::fs::create_dir_all(&tmp.0)?;
    let size = a.size_mib * MIB;
    let disk = size * 2 + 256 * MIB;
    let file = tmp.0.join("disk.img");
    std::fs::File::create(&file)?.set_len(disk)?;
    // Fill the file so that the runs do not measure block allocation of a sparse file.
    {
        let z = vec![0u8; 8 << 20];
        let mut f = std::fs::OpenOptions::new().write(true).open(&file)?;
        let mut left = disk;
        while left > 0 {
            let n = left.min(z.len() as u64);
            f.write_all(&z[..usize::try_from(n)?])?;
            left -= n;
        }
        f.sync_all()?;
    }
    let lo = LoopDevice::attach(&file, None, false)?;
    let dev = lo.path().to_path_buf();
    let mnt = tmp.0.join("mnt");
    eprintln!(
        "building a {} MiB tar and raw image in memory...",
        a.size_mib
    );
    let (tarball, files) = make_tar(size)?;
    let raw = pattern(usize::try_from(size)?, 7);
    // The reference tools read the same bytes from files in RAM; kd gets them from memory.
    let inputs = Scratch(
        a.input_dir
            .join(format!("kd-bench-disk.{}", std::process::id())),
    );
    std::fs::create_dir_all(&inputs.0)?;
    let tar_file = inputs.0.join("image.tar");
    let raw_file = inputs.0.join("image.raw");
    std::fs::write(&tar_file, &tarball)?;
    std::fs::write(&raw_file, &raw)?;

    let kd_tar_run = || -> Result<Duration> {
        let m = fresh_ext4(&dev, &mnt)?;
        let t = timed(|| {
            let mut s = tar_sink(&mnt)?;
            for c in tarball.chunks(a.chunk) {
                s.write_all(c)?;
            }
            s.finish()?;
            Ok(())
        })?;
        m.unmount()?;
        Ok(t)
    };
    let gnu_tar_run = || -> Result<Duration> {
        let m = fresh_ext4(&dev, &mnt)?;
        let t = timed(|| {
            run_tool(
                Command::new("tar")
                    .arg("-x")
                    .arg("-f")
                    .arg(&tar_file)
                    .arg("-C")
                    .arg(&mnt),
            )?;
            // syncfs, as kd's tar sink does at finish.
            let st = Command::new("sync").arg("-f").arg(&mnt).status()?;
            anyhow::ensure!(st.success(), "sync -f failed");
            Ok(())
        })?;
        m.unmount()?;
        Ok(t)
    };
    let dd_cmd = || {
        let mut c = Command::new("dd");
        c.arg(format!("if={}", raw_file.display()))
            .arg(format!("of={}", dev.display()))
            .args(["bs=4M", "conv=fsync", "status=none"]);
        c
    };
    let kd_raw_run = || {
        timed(|| {
            let mut s = raw_sink(&dev, None)?;
            for c in raw.chunks(a.chunk) {
                s.write_all(c)?;
            }
            s.finish()?;
            Ok(())
        })
    };
    let dd_run = || timed(|| run_tool(&mut dd_cmd()));
    let (mut kd_tar, mut gnu_tar, mut kd_raw, mut dd) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    for r in 0..a.runs.max(1) {
        // Alternate who goes first, to cancel ordering effects; keep the best of each.
        let (t1, t2) = if r % 2 == 0 {
            let t1 = kd_tar_run()?;
            (t1, gnu_tar_run()?)
        } else {
            let t2 = gnu_tar_run()?;
            (kd_tar_run()?, t2)
        };
        // Raw path: one untimed pass first, so that neither timed run pays for a cold device
        // (the tar runs above went through the file system).
        run_tool(&mut dd_cmd())?;
        let (r1, r2) = if r % 2 == 0 {
            let r1 = kd_raw_run()?;
            (r1, dd_run()?)
        } else {
            let r2 = dd_run()?;
            (kd_raw_run()?, r2)
        };
        kd_tar = kd_tar.min(t1);
        gnu_tar = gnu_tar.min(t2);
        kd_raw = kd_raw.min(r1);
        dd = dd.min(r2);
    }
    lo.detach()?;

    let mbs = |bytes: usize, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "kd-bench disk: ext4 on a loop device over a file in {}, {} MiB, best of {} run(s) each, {} files in the tar; tar -x and dd read from {}",
        a.dir.display(),
        a.size_mib,
        a.runs.max(1),
        files,
        a.input_dir.display()
    );
    println!("| path | kd | reference | kd MB/s | ref MB/s | kd/ref |");
    // Times include each writer's own flush: fsync (raw, dd conv=fsync), syncfs (tar).
    println!("|---|---|---|---|---|---|");
    for (name, kd, refname, r, bytes) in [
        ("tar", kd_tar, "tar -x", gnu_tar, tarball.len()),
        ("raw", kd_raw, "dd bs=4M conv=fsync", dd, raw.len()),
    ] {
        println!(
            "| {name} | {:.2} s | {refname}: {:.2} s | {:.0} | {:.0} | {:.2} |",
            kd.as_secs_f64(),
            r.as_secs_f64(),
            mbs(bytes, kd),
            mbs(bytes, r),
            mbs(bytes, kd) / mbs(bytes, r)
        );
    }
    Ok(())
}
