//! Helpers for kd's tests: find the built binaries, run a coordinator and agents as real
//! processes on loopback, compare what they wrote.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod daemon;
pub mod fakebmc;

/// The deploy initrd the lab tests boot (`KD_INITRD_DIR`, set by `./dev.sh test`); `None`, with
/// a message, when it is not set (the test is then skipped; under `CI=true` it fails: see
/// [`kd_disk::testenv`]). Panics when it has no initramfs.
pub fn initrd_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("KD_INITRD_DIR").map(std::path::PathBuf::from);
    let why = "KD_INITRD_DIR is not set (./dev.sh test builds the deploy initrd and sets it)";
    if kd_disk::testenv::skip_unless(dir.is_some(), why) {
        return None;
    }
    let dir = dir?;
    assert!(
        dir.join("initramfs.img").exists(),
        "no initramfs.img in {}",
        dir.display()
    );
    Some(dir)
}

/// Serialises the tests that start many processes (the machine has 2 cores).
pub fn heavy() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// Path of a workspace binary built next to the test executable (`cargo build --bins` first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        p.display()
    );
    p
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command to completion with a time limit; kills it past that.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn")?;
    wait_child(&mut child, limit)
}

/// Waits for a spawned child (stdout/stderr piped) with a time limit ([`kd_disk::cmd`]); past
/// it, kills the child and fails with its last stderr lines.
pub fn wait_child(child: &mut Child, limit: Duration) -> Result<Output> {
    let pid = child.id();
    match kd_disk::cmd::wait_output(child, limit, None) {
        Ok(o) => Ok(o),
        Err(kd_disk::cmd::RunError::Killed { reason, stderr, .. }) => {
            let text = String::from_utf8_lossy(&stderr);
            let mut tail: Vec<&str> = text.lines().rev().take(80).collect();
            tail.reverse();
            bail!(
                "process {pid} {reason}; its last stderr lines:\n{}",
                tail.join("\n")
            )
        }
        Err(e) => Err(e).with_context(|| format!("process {pid}")),
    }
}

/// Kills child processes when dropped (tests clean up even when they fail).
#[derive(Default)]
pub struct Reaper(pub Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `text` to `p`, creating its parent directories.
pub fn write(p: &Path, text: &str) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, text).unwrap();
}

/// A test image source: deterministic pseudo-random bytes, half of them compressible.
pub fn make_raw_input(path: &Path, size: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if (v.len() / 65536) % 2 == 0 {
            v.extend_from_slice(&x.to_le_bytes());
        } else {
            v.extend_from_slice(&[(x & 0xff) as u8; 8]);
        }
    }
    v.truncate(size);
    std::fs::write(path, v).unwrap();
}

/// One coordinator + agents broadcast setup in a temp dir.
pub struct Cluster {
    /// Temp dir holding everything.
    pub dir: tempfile::TempDir,
    /// Coordinator state dir.
    pub state: PathBuf,
    /// The image.
    pub image: PathBuf,
    /// Pin (hex).
    pub pin: String,
    /// UDP port of the coordinator.
    pub port: u16,
    /// Node names.
    pub nodes: Vec<String>,
}

impl Cluster {
    /// Packs `input` and prepares tokens for `n` nodes.
    pub fn new(input: &Path, n: usize, chunk: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("state");
        let image = dir.path().join("image.kdi");
        let o = run_with_timeout(
            Command::new(bin("kd-coord"))
                .arg("--state")
                .arg(&state)
                .args(["image", "pack"])
                .arg(input)
                .arg("-o")
                .arg(&image)
                .args(["--chunk-size", chunk]),
            Duration::from_secs(120),
        )?;
        if !o.status.success() {
            bail!("pack failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let o = run_with_timeout(
            Command::new(bin("kd-coord"))
                .arg("--state")
                .arg(&state)
                .arg("pin"),
            Duration::from_secs(30),
        )?;
        let pin = String::from_utf8(o.stdout)?.trim().to_string();
        let nodes: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
        let tokens: String = nodes.iter().map(|n| format!("{n} tok-{n}\n")).collect();
        std::fs::write(dir.path().join("tokens"), tokens)?;
        Ok(Self {
            dir,
            state,
            image,
            pin,
            port: free_udp_port(),
            nodes,
        })
    }

    /// Starts `kd-coord broadcast` for all nodes.
    pub fn start_coordinator(&self, arity: &str, extra: &[&str]) -> Result<Child> {
        let nodes = format!("node[1-{}]", self.nodes.len());
        Ok(Command::new(bin("kd-coord"))
            .arg("--state")
            .arg(&self.state)
            .arg("broadcast")
            .arg(&self.image)
            .args([
                "-m",
                &nodes,
                "--arity",
                arity,
                "--json",
                "--hello-timeout",
                "60",
                "--timeout",
                "300",
            ])
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--tokens")
            .arg(self.dir.path().join("tokens"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("KD_LOG", "info")
            .spawn()?)
    }

    /// Starts one agent with a sink and extra arguments.
    pub fn start_agent(
        &self,
        node: &str,
        token: &str,
        sink: &str,
        extra: &[&str],
    ) -> Result<Child> {
        Ok(Command::new(bin("kd-agent"))
            .args([
                "--coord",
                &format!("127.0.0.1:{}", self.port),
                "--pin",
                &self.pin,
            ])
            .args([
                "--node",
                node,
                "--token",
                token,
                "--sink",
                sink,
                "--listen",
                "127.0.0.1:0",
                "--stall-timeout",
                "5",
            ])
            .args(extra)
            .env("KD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }
}

/// True when two files have the same bytes.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The JSON outcome printed by `kd-coord broadcast --json`.
pub fn outcome(stdout: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(stdout)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(stdout)))
}

/// What `scripts/lab-deploy.sh` did in a lab test ([`lab_deploy`]).
pub struct LabDeploy {
    /// The script's exit status.
    pub status: std::process::ExitStatus,
    /// Its stdout: the phases, kd-coord's tables, the ssh checks.
    pub out: String,
    /// Its stderr: kd-coord's progress and the lab's logs.
    pub err: String,
    /// The last 60 lines of `err`, for failure messages.
    pub err_tail: String,
    /// What the script left of its lab when it returned (namespace, state), if anything.
    pub left_behind: Option<String>,
}

impl LabDeploy {
    /// Fails the test unless the script succeeded, with its stdout and the end of its stderr.
    pub fn assert_ok(&self) {
        assert!(
            self.status.success(),
            "lab-deploy.sh failed ({}).\nstdout:\n{}\nstderr (last lines):\n{}",
            self.status,
            self.out,
            self.err_tail
        );
    }
}

/// Runs `scripts/lab-deploy.sh --subnet SUBNET ARGS` (a /24 such as `10.83.0.0/24`, which names
/// the lab: namespace `kdlab-83`, state `/var/lib/kd-lab/83`) with this build's binaries and the
/// deploy initrd in `initrd`, within `limit`. Prints its stdout (per-step times, for `--nocapture`),
/// notes what it left of its lab, and then tears the lab down whatever happened.
pub fn lab_deploy(initrd: &Path, subnet: &str, args: &[&str], limit: Duration) -> LabDeploy {
    let id = subnet.split('.').nth(1).unwrap_or_default().to_string();
    let state = PathBuf::from(format!("/var/lib/kd-lab/{id}"));
    let netns = format!("kdlab-{id}");
    let coord = bin("kd-coord");
    let bin_dir = coord.parent().unwrap().to_path_buf();
    // Tears the lab down even if the script was killed before its own trap ran.
    struct Down(PathBuf, PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = Command::new(&self.0)
                .arg("down")
                .arg("--state")
                .arg(&self.1)
                .output();
        }
    }
    let _down = Down(bin("kd-lab"), state.clone());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let t = Instant::now();
    let o = run_with_timeout(
        Command::new(root.join("scripts/lab-deploy.sh"))
            .args(["--subnet", subnet])
            .args(args)
            .env("KD_BIN_DIR", &bin_dir)
            .env("KD_INITRD_DIR", initrd),
        limit,
    )
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!(
        "lab-deploy.sh {} took {:.0} s:\n{out}",
        args.join(" "),
        t.elapsed().as_secs_f64()
    );
    let err_tail = {
        let lines: Vec<&str> = err.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    };
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left_behind = if String::from_utf8_lossy(&ns.stdout).contains(&netns) {
        Some(format!("namespace {netns} left behind"))
    } else if state.join("lab.json").exists() {
        Some(format!("{} left behind", state.display()))
    } else {
        None
    };
    LabDeploy {
        status: o.status,
        out,
        err,
        err_tail,
        left_behind,
    }
}
