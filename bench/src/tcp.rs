//! `kd-bench tcp-relay`: one hop of a plain TCP chain, the reference `kd-bench arity
//! --tcp-chain` runs beside kd (what `nc -l | tee >(nc NEXT)` does, without a disk): read the
//! stream from the previous hop and write it to the next one, nothing verified, nothing stored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One hop: `--listen` (a relay or the last node) and/or `--send FILE` (the source), `--next`.
#[derive(clap::Args, Debug)]
pub(crate) struct RelayArgs {
    /// Accept one connection here and read the stream from it.
    #[arg(long, conflicts_with = "send")]
    listen: Option<SocketAddr>,
    /// Be the source: send this file.
    #[arg(long)]
    send: Option<PathBuf>,
    /// Write the stream on to this address.
    #[arg(long)]
    next: Option<SocketAddr>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// Connects to `addr`, retrying while the next hop is not listening yet (bounded).
fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).with_context(|| format!("connect to {addr}")),
        }
    }
}

/// Runs one hop; prints `bytes N` (what it received or sent) when the stream ends.
pub(crate) fn run(a: RelayArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut input: Box<dyn Read> = match (&a.listen, &a.send) {
        (Some(l), None) => {
            let listener = TcpListener::bind(l).with_context(|| format!("listen on {l}"))?;
            let (s, _) = listener.accept().context("accept")?;
            s.set_read_timeout(Some(Duration::from_secs(a.timeout)))?;
            Box::new(s)
        }
        (None, Some(f)) => {
            Box::new(std::fs::File::open(f).with_context(|| format!("open {}", f.display()))?)
        }
        _ => bail!("give --listen ADDR or --send FILE"),
    };
    let mut next = match a.next {
        Some(n) => {
            let s = connect(n, deadline)?;
            s.set_write_timeout(Some(Duration::from_secs(a.timeout)))?;
            Some(s)
        }
        None => None,
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read"),
        };
        if let Some(s) = next.as_mut() {
            s.write_all(&buf[..n]).context("write to the next hop")?;
        }
        bytes += n as u64;
        if Instant::now() > deadline {
            bail!("timed out after {bytes} bytes");
        }
    }
    if let Some(s) = next {
        s.shutdown(std::net::Shutdown::Write).ok();
        // Wait for the next hop to close (it has read everything), so that this process ends
        // after its data left.
        let mut s = s;
        let _ = s.read(&mut [0u8; 1]);
    }
    println!("bytes {bytes}");
    Ok(())
}
