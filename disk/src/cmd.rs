//! Running external tools with a time limit and captured output: [`output`] and
//! [`wait_output`] for every crate of kd (lab, bench and the tests use them too), [`run`] for
//! kd-disk's tools (mkfs, blkid, losetup, grub-install, chroot).
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::DiskError;

/// Output kept in reports and errors, at most this many bytes (the end is kept).
pub const MAX_OUTPUT: usize = 16 * 1024;

/// Keep the last `max` bytes of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// How long the output of a command that ended is read for.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Why a command run with a time limit ([`output`], [`wait_output`]) gave no [`Output`].
#[derive(Debug)]
pub enum RunError {
    /// It could not be started.
    Spawn(io::Error),
    /// Waiting for it failed.
    Wait(io::Error),
    /// It was killed (with its process group if it leads one): past its time limit, or because
    /// the caller's stop flag was set. What it had printed is kept.
    Killed {
        /// "timed out after N s" or "interrupted".
        reason: String,
        /// Its standard output until then.
        stdout: Vec<u8>,
        /// Its standard error until then.
        stderr: Vec<u8>,
    },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Spawn(e) => write!(f, "cannot start: {e}"),
            RunError::Wait(e) => write!(f, "wait failed: {e}"),
            RunError::Killed { reason, .. } => f.write_str(reason),
        }
    }
}

impl std::error::Error for RunError {}

/// Run `cmd` to completion (stdin null, stdout and stderr captured), killed past `limit` or as
/// soon as `stop` is set. The one "run a command with a timeout" of kd's crates.
pub fn output(
    cmd: &mut Command,
    limit: Duration,
    stop: Option<&AtomicBool>,
) -> Result<Output, RunError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RunError::Spawn)?;
    wait_output(&mut child, limit, stop)
}

/// Wait for a spawned `child` at most `limit` (or until `stop` is set), reading its piped stdout
/// and stderr on threads (no pipe fills up); past that, kill it (its whole process group if it
/// leads one, as with `Command::process_group(0)`) and reap it.
pub fn wait_output(
    child: &mut Child,
    limit: Duration,
    stop: Option<&AtomicBool>,
) -> Result<Output, RunError> {
    fn reader(r: Option<impl Read + Send + 'static>) -> Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            let _ = tx.send(v);
        });
        rx
    }
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let start = Instant::now();
    // Once the child is gone its pipes reach their end at once, unless a grandchild outside its
    // process group holds them: then what was read within 2 s is kept, and the reader thread is
    // left to end with the pipe.
    let collect = |rx: Receiver<Vec<u8>>| rx.recv_timeout(PIPE_GRACE).unwrap_or_default();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                kill(child);
                return Err(RunError::Wait(e));
            }
        }
        let stopped = stop.is_some_and(|s| s.load(Ordering::SeqCst));
        if stopped || start.elapsed() >= limit {
            kill(child);
            return Err(RunError::Killed {
                reason: if stopped {
                    "interrupted".into()
                } else {
                    format!("timed out after {} s", limit.as_secs_f64())
                },
                stdout: collect(out),
                stderr: collect(err),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    })
}

/// SIGKILL `child`, and its process group if it leads one (grandchildren may hold its pipes);
/// then reap it.
fn kill(child: &mut Child) {
    if let Ok(raw) = i32::try_from(child.id()) {
        let pid = Pid::from_raw(raw);
        if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Run `cmd` in its own process group, stdout and stderr captured (stdout first, then stderr),
/// killed (the whole group) after `timeout`. A non-zero exit or a timeout is a
/// [`DiskError::Command`] carrying the output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String, DiskError> {
    let what = describe(cmd);
    let joined = |stdout: &[u8], stderr: &[u8]| {
        let mut out = String::from_utf8_lossy(stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(stderr));
        tail(&out, MAX_OUTPUT).to_string()
    };
    match output(cmd.process_group(0), timeout, None) {
        Ok(o) if o.status.success() => Ok(joined(&o.stdout, &o.stderr)),
        Ok(o) => Err(DiskError::Command {
            command: what,
            status: o.status.to_string(),
            output: joined(&o.stdout, &o.stderr),
        }),
        Err(RunError::Spawn(e)) => Err(DiskError::io(format!("starting `{what}`"), e)),
        Err(e @ RunError::Wait(_)) => Err(DiskError::Command {
            command: what,
            status: e.to_string(),
            output: String::new(),
        }),
        Err(RunError::Killed {
            reason,
            stdout,
            stderr,
        }) => Err(DiskError::Command {
            command: what,
            status: reason,
            output: joined(&stdout, &stderr),
        }),
    }
}

/// [`run`] with a one-minute timeout, for quick tools.
pub fn quick(program: &str, args: &[&str]) -> Result<String, DiskError> {
    run(Command::new(program).args(args), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_timeout() {
        let out = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out, "out\nerr\n");
        let e = run(
            Command::new("sh").args(["-c", "echo bad; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("exit status: 3") && e.to_string().contains("bad"),
            "{e}"
        );
        // A grandchild holding the pipes is killed with its group.
        let t = std::time::Instant::now();
        let e = run(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(tail("héllo", 4), "llo");
    }

    #[test]
    fn a_grandchild_holding_the_pipes_does_not_hold_the_caller() {
        // No process group of its own: the sleeping grandchild survives `sh` with its stdout.
        let t = Instant::now();
        let o = output(
            Command::new("sh").args(["-c", "sleep 20 & echo hi"]),
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert!(o.status.success());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn a_stop_flag_interrupts_the_command() {
        let stop = AtomicBool::new(true);
        let t = Instant::now();
        let e = output(
            Command::new("sh")
                .args(["-c", "echo started; sleep 30"])
                .process_group(0),
            Duration::from_secs(60),
            Some(&stop),
        )
        .unwrap_err();
        assert!(
            matches!(&e, RunError::Killed { reason, .. } if reason == "interrupted"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        let e = output(
            &mut Command::new("does-not-exist-kd"),
            Duration::from_secs(1),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Spawn(_)), "{e}");
    }
}
