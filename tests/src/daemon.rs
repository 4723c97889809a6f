//! `kd-coord serve` on a test's state directory and its CLI clients, as several Unix users:
//! what the `daemon_*` tests (`deploy_workflow`) and `console_and_env` share.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{bin, wait_child};

/// A `kd-coord serve` (SIGKILLed when dropped).
pub struct Daemon {
    /// The daemon's process.
    pub child: Child,
    /// Its stderr (the log, `KD_LOG=info`).
    pub log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kd-coord --state STATE serve ARGS`, its log appended to `log`, and waits (20 s at
/// most) until its socket answers.
pub fn serve(state: &Path, log: &Path, args: &[&str]) -> Daemon {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(bin("kd-coord"))
        .arg("--state")
        .arg(state)
        .arg("serve")
        .args(args)
        .env("KD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        log: log.to_path_buf(),
    };
    let sock = state.join("kd.sock");
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the daemon did not listen on {}:\n{}",
            sock.display(),
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// `kd-coord --state STATE ARGS` as `uid` (None: this process's user), its stdin empty, its
/// stdout and stderr piped.
pub fn kd_cmd(state: &Path, uid: Option<u32>, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin("kd-coord"));
    c.arg("--state").arg(state).args(args);
    if let Some(u) = uid {
        c.uid(u).gid(u);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs a `kd-coord` client command as `uid` (None: this process's user), killed past `limit`.
pub fn kd(state: &Path, uid: Option<u32>, args: &[&str], limit: Duration) -> Result<Output> {
    let mut child = kd_cmd(state, uid, args).spawn()?;
    wait_child(&mut child, limit)
}

/// A client's exit code, stdout and stderr, for a failed assertion's message.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
