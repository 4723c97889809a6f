//! Running external tools (mkfs, blkid, losetup, grub-install, chroot) with a timeout and
//! captured output.
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Run `cmd` in its own process group, stdout and stderr captured (interleaved by arrival per
/// stream: stdout first, then stderr), killed (the whole group) after `timeout`. A non-zero exit
/// or a timeout is a [`DiskError::Command`] carrying the output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String, DiskError> {
    let what = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| DiskError::io(format!("starting `{what}`"), e))?;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    })
    .collect();
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if start.elapsed() >= timeout => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait();
                break Err(format!("timed out after {} s", timeout.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("wait failed: {e}")),
        }
    };
    let mut out = String::new();
    for r in readers {
        if let Ok(v) = r.join() {
            out.push_str(&String::from_utf8_lossy(&v));
        }
    }
    let out = tail(&out, MAX_OUTPUT).to_string();
    match status {
        Ok(st) if st.success() => Ok(out),
        Ok(st) => Err(DiskError::Command {
            command: what,
            status: st.to_string(),
            output: out,
        }),
        Err(reason) => Err(DiskError::Command {
            command: what,
            status: reason,
            output: out,
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
}
