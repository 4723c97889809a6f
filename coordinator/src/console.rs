//! A node's console through the daemon (`kd-coord console NODE`).
//!
//! The daemon runs the cluster's `commands.console` template (it may hold BMC credentials
//! the user must not see) with its stdin, stdout and stderr as pipes, in a process group of
//! its own, and relays it over the connection the client upgraded
//! (`POST /api/v1/nodes/NAME/console`, `Upgrade: kd-console`). Both directions carry frames:
//! one kind byte, a 4-byte big-endian length, at most [`MAX_FRAME`] bytes of payload.
//!
//! - client → daemon: [`INPUT`] (bytes for the command's stdin), [`CLOSE_INPUT`] (its stdin
//!   ends, as ssh forwards an end of file). The connection ending without [`CLOSE_INPUT`]
//!   first, or after it, means the client left: the daemon stops the command's process group
//!   (SIGTERM, SIGKILL 2 s later).
//! - daemon → client: [`STDOUT`], [`STDERR`], then [`EXIT`] once the command ended
//!   (`{"code": N}` or `{"signal": N}`), then the end of the stream.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol name of the `Upgrade` header.
pub const PROTOCOL: &str = "kd-console";
/// Largest frame payload.
pub const MAX_FRAME: usize = 64 * 1024;
/// client → daemon: bytes for the command's stdin.
pub const INPUT: u8 = b'i';
/// client → daemon: the command's stdin ends.
pub const CLOSE_INPUT: u8 = b'c';
/// daemon → client: bytes the command wrote on its stdout.
pub const STDOUT: u8 = b'o';
/// daemon → client: bytes the command wrote on its stderr.
pub const STDERR: u8 = b'e';
/// daemon → client: how the command ended (JSON [`ExitStatus`]).
pub const EXIT: u8 = b'x';

/// How long a command may take to leave after SIGTERM before its group gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long the output may still flow after the command exited (a background process of
/// its group may hold the pipes: the group is killed then).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How the console command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("unknown end"),
        }
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(s: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus {
            code: s.code(),
            signal: s.signal(),
        }
    }
}

/// Writes one frame (an empty payload is allowed; a payload over [`MAX_FRAME`] is split).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, data: &[u8]) -> Result<()> {
    let mut parts = data.chunks(MAX_FRAME).peekable();
    if parts.peek().is_none() {
        w.write_all(&[kind, 0, 0, 0, 0]).await?;
    }
    for p in parts {
        // At most MAX_FRAME: fits in a u32.
        let len = u32::try_from(p.len()).unwrap_or(u32::MAX).to_be_bytes();
        w.write_all(&[kind, len[0], len[1], len[2], len[3]]).await?;
        w.write_all(p).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `None` at a clean end of the stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..])
        .await
        .context("console stream cut inside a frame header")?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        bail!("console frame of {len} bytes (at most {MAX_FRAME})");
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)
        .await
        .context("console stream cut inside a frame")?;
    Ok(Some((head[0], data)))
}

/// How a console session ended, for the daemon's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The command ended.
    Exited(ExitStatus),
    /// The client left (or broke the protocol): the command was stopped.
    ClientLeft(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(s) => write!(f, "the console command ended ({s})"),
            End::ClientLeft(why) => write!(f, "the client left ({why}): command stopped"),
        }
    }
}

/// Kills the command's process group when the session ends, however it ends (the command
/// exited, the client left, the daemon stopping drops the task, a panic): no console
/// outlives its session.
struct GroupGuard {
    pgid: Option<nix::unistd::Pid>,
}

impl GroupGuard {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(p) = self.pgid {
            let _ = nix::sys::signal::killpg(p, sig);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Starts `command` (a shell command line) in a process group of its own, with piped stdio.
pub fn spawn(command: &str) -> Result<tokio::process::Child> {
    tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the console command")
}

/// Relays `child` (from [`spawn`]) over `io` until it ends or the client leaves; the
/// command's group is stopped in the second case.
pub async fn relay<S>(io: S, mut child: tokio::process::Child) -> End
where
    S: AsyncRead + AsyncWrite + Send,
{
    let guard = GroupGuard {
        pgid: child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw),
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let mut status: Option<ExitStatus> = None;
    let end = {
        let input = pump_in(&mut rd, stdin);
        tokio::pin!(input);
        let output = pump_out(stdout, stderr, &mut wr);
        tokio::pin!(output);
        let mut output_done = false;
        let drain = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(drain);
        loop {
            tokio::select! {
                why = &mut input => break End::ClientLeft(why),
                r = &mut output, if !output_done => {
                    output_done = true;
                    if let Err(e) = r {
                        break End::ClientLeft(format!("{e:#}"));
                    }
                    if let Some(s) = status {
                        break End::Exited(s);
                    }
                }
                st = child.wait(), if status.is_none() => {
                    let s = match st {
                        Ok(s) => ExitStatus::from(s),
                        Err(_) => ExitStatus { code: None, signal: None },
                    };
                    status = Some(s);
                    if output_done {
                        break End::Exited(s);
                    }
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                _ = &mut drain, if status.is_some() && !output_done => {
                    // Someone of its group still holds the pipes (so the group still exists).
                    guard.signal(nix::sys::signal::Signal::SIGKILL);
                    drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(86_400));
                }
            }
        }
    };
    match &end {
        End::Exited(s) => {
            let body = serde_json::to_vec(s).unwrap_or_default();
            let _ = write_frame(&mut wr, EXIT, &body).await;
            let _ = wr.shutdown().await;
        }
        End::ClientLeft(_) => {
            if status.is_none() {
                guard.signal(nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(TERM_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    guard.signal(nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait().await;
                }
            }
        }
    }
    // Whatever else of its group is left (a background process that closed its pipes) gets
    // the guard's SIGKILL: the leader was reaped, but living members keep the group id from
    // being reused (with none left, the signal finds no one).
    drop(guard);
    end
}

/// Client frames into the command's stdin; returns why the client is gone.
async fn pump_in<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut stdin: Option<tokio::process::ChildStdin>,
) -> String {
    loop {
        match read_frame(rd).await {
            Ok(None) => return "disconnected".into(),
            Err(e) => return format!("{e:#}"),
            Ok(Some((INPUT, data))) => {
                if let Some(w) = stdin.as_mut() {
                    // A command that closed its stdin gets no more input.
                    if w.write_all(&data).await.is_err() || w.flush().await.is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some((CLOSE_INPUT, _))) => stdin = None,
            Ok(Some((k, _))) => return format!("unknown console frame kind {k:#04x}"),
        }
    }
}

/// The command's stdout and stderr into frames, until both end.
async fn pump_out<W: AsyncWrite + Unpin>(
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    wr: &mut W,
) -> Result<()> {
    let mut out = stdout;
    let mut err = stderr;
    let mut ob = vec![0u8; 16 * 1024];
    let mut eb = vec![0u8; 16 * 1024];
    while out.is_some() || err.is_some() {
        tokio::select! {
            n = async { match out.as_mut() { Some(o) => o.read(&mut ob).await, None => std::future::pending().await } } => {
                match n {
                    Ok(0) | Err(_) => out = None,
                    Ok(n) => write_frame(wr, STDOUT, &ob[..n]).await.context("writing to the client")?,
                }
            }
            n = async { match err.as_mut() { Some(e) => e.read(&mut eb).await, None => std::future::pending().await } } => {
                match n {
                    Ok(0) | Err(_) => err = None,
                    Ok(n) => write_frame(wr, STDERR, &eb[..n]).await.context("writing to the client")?,
                }
            }
        }
    }
    Ok(())
}

/// ssh's escape on a terminal's input: `~.` at the start of a line disconnects, `~~` sends
/// one `~`; any other `~` is sent as typed.
#[derive(Debug, Clone)]
pub struct Escape {
    line_start: bool,
    tilde: bool,
}

impl Default for Escape {
    fn default() -> Self {
        Escape {
            line_start: true,
            tilde: false,
        }
    }
}

impl Escape {
    /// What to send of `input`, and whether the user asked to disconnect (what follows `~.`
    /// is not sent).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = b == b'\r' || b == b'\n';
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_disconnects_only_at_line_start() {
        let mut e = Escape::default();
        assert_eq!(e.feed(b"~."), (vec![], true));
        let mut e = Escape::default();
        assert_eq!(e.feed(b"a~.b\r"), (b"a~.b\r".to_vec(), false));
        assert_eq!(e.feed(b"~"), (vec![], false));
        assert_eq!(e.feed(b".rest"), (vec![], true));
        let mut e = Escape::default();
        assert_eq!(e.feed(b"ls\n~~.\n"), (b"ls\n~.\n".to_vec(), false));
        assert_eq!(e.feed(b"~x"), (b"~x".to_vec(), false));
        assert_eq!(e.feed(b"\r~.x"), (b"\r".to_vec(), true));
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let big = vec![7u8; MAX_FRAME + 10];
        write_frame(&mut a, INPUT, b"hello").await.unwrap();
        write_frame(&mut a, CLOSE_INPUT, b"").await.unwrap();
        write_frame(&mut a, STDOUT, &big).await.unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((INPUT, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((CLOSE_INPUT, vec![]))
        );
        let (k, p1) = read_frame(&mut b).await.unwrap().unwrap();
        let (_, p2) = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((k, p1.len() + p2.len()), (STDOUT, big.len()));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
        let mut bad: &[u8] = &[INPUT, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut bad).await.is_err());
    }

    /// The process whose pid is in `pidfile` ends (a zombie counts as ended) within 5 s.
    fn gone(pidfile: &std::path::Path) {
        let pid: u32 = std::fs::read_to_string(pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t0 = std::time::Instant::now();
        while kd_disk::procstat::alive(pid) {
            assert!(t0.elapsed() < Duration::from_secs(5), "{pid} lives on");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn a_command_is_relayed_and_stopped_when_the_client_leaves() {
        // Ends by itself: output, exit status, end of stream; what it left in the background
        // is killed.
        let dir = tempfile::tempdir().unwrap();
        let bg = dir.path().join("bg");
        let (client, server) = tokio::io::duplex(1 << 16);
        let child = spawn(&format!(
            "sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {}; echo banner; cat; echo err >&2; exit 3",
            bg.display()
        ))
        .unwrap();
        let relay_task = tokio::spawn(relay(server, child));
        let (mut rd, mut wr) = tokio::io::split(client);
        write_frame(&mut wr, INPUT, b"line\n").await.unwrap();
        write_frame(&mut wr, CLOSE_INPUT, b"").await.unwrap();
        let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
        while let Some((k, d)) = read_frame(&mut rd).await.unwrap() {
            match k {
                STDOUT => out.extend(d),
                STDERR => err.extend(d),
                EXIT => exit = Some(serde_json::from_slice::<ExitStatus>(&d).unwrap()),
                _ => panic!("kind {k}"),
            }
        }
        assert_eq!(String::from_utf8_lossy(&out), "banner\nline\n");
        assert_eq!(String::from_utf8_lossy(&err), "err\n");
        let st = ExitStatus {
            code: Some(3),
            signal: None,
        };
        assert_eq!(exit, Some(st));
        assert_eq!(relay_task.await.unwrap(), End::Exited(st));
        gone(&bg);

        // The client leaves: the whole group (a background child too) is stopped.
        let pidfile = dir.path().join("pid");
        let (client, server) = tokio::io::duplex(1 << 16);
        let child = spawn(&format!(
            "sleep 1000 & echo $! > {}; echo up; cat",
            pidfile.display()
        ))
        .unwrap();
        let relay_task = tokio::spawn(relay(server, child));
        let (mut rd, wr) = tokio::io::split(client);
        assert_eq!(read_frame(&mut rd).await.unwrap().unwrap().1, b"up\n");
        drop(wr);
        drop(rd);
        let end = tokio::time::timeout(Duration::from_secs(10), relay_task)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(end, End::ClientLeft(_)), "{end:?}");
        gone(&pidfile);
    }
}
