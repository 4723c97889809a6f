//! `kd-coord image pack` as an operator runs it, at its bounds (issue 14, finding 3): an input
//! that never ends, threads x chunk size over the memory limit, a chunk size that would make an
//! image no command can open. Each refusal says which flag to change and leaves no file behind.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kd-coord");

/// Runs `sh -c SCRIPT kd-coord ARGS...` (so that the script can set limits, then `exec "$0"
/// "$@"`), killed after `limit`: a hang is a failure, not a stuck test.
fn run_sh(script: &str, args: &[&str], limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let o = kd_disk::cmd::output(
        Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(BIN)
            .args(args)
            .env("KD_LOG", "warn"),
        limit,
        None,
    )
    .unwrap();
    (o, t0.elapsed())
}

fn pack(dir: &Path, input: &str, flags: &[&str]) -> (Output, Duration) {
    let state = dir.join("state");
    let out = dir.join("out").join("x.kdi");
    let mut args = vec![
        "--state",
        state.to_str().unwrap(),
        "image",
        "pack",
        input,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(flags);
    // 2 GiB of address space: an allocation of threads x chunk size fails at once instead of
    // taking the machine's memory.
    run_sh(
        "ulimit -v 2097152; exec \"$0\" \"$@\"",
        &args,
        Duration::from_secs(60),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn out_dir(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("out");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

#[test]
fn packing_an_endless_input_stops_at_max_size_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = out_dir(d.path());
    let (o, took) = pack(
        d.path(),
        "/dev/zero",
        &["--max-size", "3M", "--chunk-size", "1M"],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("/dev/zero holds more than 3 MiB (the --max-size limit): pass --max-size SIZE"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_empty(&out);
}

#[test]
fn threads_times_chunk_size_over_the_memory_limit_is_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let out = out_dir(d.path());
    let (o, _) = pack(
        d.path(),
        "/dev/zero",
        &["--threads", "1000", "--chunk-size", "16M"],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("--threads 1000 is out of bounds: 1 to 64"),
        "{e}"
    );
    let (o, _) = pack(
        d.path(),
        "/dev/zero",
        &["--threads", "64", "--chunk-size", "16M", "--level", "19"],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("--threads 64 x --chunk-size 16 MiB at --level 19 needs about")
            && e.contains("over the 1 GiB limit: lower --threads (at most 8 at this chunk size")
            && e.contains("or --chunk-size"),
        "{e}"
    );
    assert_empty(&out);
}

/// `--chunk-size 1` on a 400 KB file wrote a 23 MB image whose manifest no command could open.
#[test]
fn a_chunk_size_below_the_minimum_is_refused_before_reading() {
    let d = tempfile::tempdir().unwrap();
    let out = out_dir(d.path());
    let input = d.path().join("in.raw");
    std::fs::write(&input, vec![7u8; 400_000]).unwrap();
    for size in ["1", "4095", "17M"] {
        let (o, _) = pack(d.path(), input.to_str().unwrap(), &["--chunk-size", size]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains("is out of bounds: 4 KiB to 16 MiB"), "{e}");
        assert_empty(&out);
    }
    // Refused before the input is opened: a FIFO nobody writes to would block the open.
    let fifo = d.path().join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let (o, took) = pack(d.path(), fifo.to_str().unwrap(), &["--chunk-size", "1"]);
    assert!(
        stderr(&o).contains("--chunk-size 1 bytes is out of bounds"),
        "{}",
        stderr(&o)
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    // At the minimum, the same file packs into an image that opens and verifies.
    let (o, _) = pack(d.path(), input.to_str().unwrap(), &["--chunk-size", "4K"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = out.join("x.kdi");
    let (o, _) = run_sh(
        "exec \"$0\" \"$@\"",
        &["image", "verify", img.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (98 chunks verified)"));
}
