//! `kd-agent`: the node side of kd.
use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use kd_agent::{AgentConfig, Fault, SinkSpec};

/// Receives, verifies, relays and writes a kd image. With no arguments, reads
/// `kd.coord= kd.pin= kd.node= kd.token=` from /proc/cmdline (the deploy initrd's way).
#[derive(Parser, Debug)]
// A flag given twice takes the last value (a bench passes `--link-mbps`, a user may pass it again).
#[command(name = "kd-agent", version, args_override_self = true)]
struct Args {
    /// Coordinator address (IP:PORT).
    #[arg(long)]
    coord: Option<SocketAddr>,
    /// SHA-256 (hex) of the coordinator's certificate.
    #[arg(long)]
    pin: Option<String>,
    /// This node's name.
    #[arg(long)]
    node: Option<String>,
    /// One-time token.
    #[arg(long)]
    token: Option<String>,
    /// Where the image goes: raw:PATH, dir:PATH or null.
    #[arg(long, default_value = "null")]
    sink: SinkSpec,
    /// Address to listen on for children.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Chunks kept in memory for children (2 to 256: up to 256 x the image's chunk size).
    #[arg(long, default_value_t = 16,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=256))]
    window: usize,
    /// Longest wait, in seconds, for a silent upstream (and for the first data): a silence is
    /// judged against the stream's recent chunk interval, between --stall-floor and this (1 to
    /// 86400). A coordinator's plan may carry the cluster's own values instead.
    #[arg(long, default_value_t = 30, value_parser = kd_proto::bounds::parse_timeout_secs)]
    stall_timeout: u64,
    /// Shortest wait, in seconds, for a silent upstream (1 to --stall-timeout; TCG nodes need
    /// longer than a LAN's default).
    #[arg(long, default_value_t = 1, value_parser = kd_proto::bounds::parse_timeout_secs)]
    stall_floor: u64,
    /// Deployments: write this disk instead of the layout's device.
    #[arg(long)]
    disk: Option<std::path::PathBuf>,
    /// Deployments: directory for kd's mount points.
    #[arg(long, default_value = "/run/kd")]
    work_dir: std::path::PathBuf,
    /// Reboot once a deployment is over (implied when kd.* come from /proc/cmdline, i.e. in the
    /// deploy initrd; never on a host).
    #[arg(long)]
    reboot_on_finish: bool,
    /// Write the image no faster than this many bytes per second (suffixes k, M, G: powers of
    /// 1000): a slow disk for benches (`kd-bench arity --slow-disk`), as tc makes slow links.
    #[arg(long, value_parser = parse_bytes_per_sec)]
    write_rate: Option<u64>,
    /// Fault injection for tests: corrupt:N, die-after:N, stop-after:N.
    #[arg(long, hide = true)]
    fault: Vec<Fault>,
    /// Threads for the network: 1 (one for everything), 2 (the children's connections on a
    /// thread of their own, the upstream's on the main one: a relay can use two cores), or auto
    /// (two only for a link faster than one core relays, ~2.5 Gbit/s, or of unknown speed).
    /// Default: `kd.net_threads=` from the kernel command line, else auto.
    #[arg(long)]
    net_threads: Option<kd_agent::config::NetThreads>,
    /// The link's speed in Mbit/s, for `--net-threads auto`, when the NIC cannot tell it (a
    /// bench's tc-shaped veth reports 10000 whatever its shaper).
    #[arg(long, hide = true)]
    link_mbps: Option<u64>,
    /// Kernel command line to read kd.* from.
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: std::path::PathBuf,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a real terminal (the initrd's serial console is logged to files).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("TERM").is_some_and(|t| t != "dumb" && t != "linux"),
        )
        .init();
    match real_main() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("kd-agent: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn real_main() -> Result<()> {
    let a = Args::parse();
    let from_cmdline =
        a.coord.is_none() || a.node.is_none() || a.token.is_none() || a.pin.is_none();
    let cmd = if from_cmdline {
        let s = std::fs::read_to_string(&a.cmdline).unwrap_or_default();
        kd_agent::config::parse_cmdline(&s)
    } else {
        Default::default()
    };
    let coord = match a.coord {
        Some(c) => c,
        None => cmd
            .coord
            .as_deref()
            .ok_or_else(|| {
                anyhow!("no coordinator: pass --coord or kd.coord= on the kernel command line")
            })?
            .parse()
            .context("kd.coord must be IP:PORT")?,
    };
    let pin_s = a
        .pin
        .or(cmd.pin)
        .ok_or_else(|| anyhow!("no pin: pass --pin or kd.pin="))?;
    let pin = kd_net::parse_sha256_hex(&pin_s)
        .ok_or_else(|| anyhow!("the pin must be 64 hex digits (SHA-256), got {pin_s:?}"))?;
    let node = a
        .node
        .or(cmd.node)
        .ok_or_else(|| anyhow!("no node name: pass --node or kd.node="))?;
    let token = a
        .token
        .or(cmd.token)
        .ok_or_else(|| anyhow!("no token: pass --token or kd.token="))?;
    let sink = match cmd.sink {
        Some(s) => s.parse().map_err(|e: String| anyhow!(e))?,
        None => a.sink,
    };
    let mut cfg = AgentConfig::new(coord, pin, node, token, sink);
    cfg.listen = a.listen;
    cfg.window = a.window;
    cfg.stall_timeout = std::time::Duration::from_secs(a.stall_timeout.max(1));
    // A floor above the timeout is the timeout (a short --stall-timeout alone stays valid).
    cfg.stall_floor = std::time::Duration::from_secs(a.stall_floor.max(1)).min(cfg.stall_timeout);
    cfg.faults = a.fault;
    cfg.write_rate = a.write_rate;
    cfg.net_threads = match (a.net_threads, cmd.net_threads.as_deref()) {
        (Some(t), _) => t,
        (None, Some(t)) => t
            .parse()
            .map_err(|e: String| anyhow!("kd.net_threads on the kernel command line: {e}"))?,
        (None, None) => kd_agent::config::NetThreads::Auto,
    };
    cfg.link_mbps = a.link_mbps;
    cfg.disk = a.disk;
    cfg.work_dir = a.work_dir;
    // Started by the deploy initrd (identity from the kernel's own command line): the node is
    // ours to reboot once the coordinator says so.
    cfg.reboot_on_finish =
        a.reboot_on_finish || (from_cmdline && a.cmdline == std::path::Path::new("/proc/cmdline"));
    // A current-thread runtime: measured 38 % less CPU per GiB relayed than two workers of a
    // multi-thread one (fewer cross-thread wake-ups). With --net-threads 2 the children's
    // endpoint gets a second current-thread runtime on its own thread (session::RelayThread);
    // decompression and disk writes have their own threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let out = rt.block_on(kd_agent::run(cfg))?;
    let r = out.report;
    eprintln!(
        "kd-agent: done: {} chunks, {} bytes received, {} bytes written, {} corrupt chunks refused, image {}",
        r.progress.chunks,
        r.progress.bytes_received,
        r.progress.bytes_written,
        r.progress.corrupt_chunks,
        r.image_hash.map(|h| kd_proto::manifest::hex(&h)).unwrap_or_default()
    );
    Ok(())
}

/// `30M` → 30,000,000 (suffixes k, M, G; powers of 1000); at least 1.
fn parse_bytes_per_sec(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000),
        Some((i, 'M')) => (&t[..i], 1_000_000),
        Some((i, 'G')) => (&t[..i], 1_000_000_000),
        _ => (t, 1),
    };
    match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "bad rate {s:?}: expected bytes per second, like 30M"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn a_flag_given_twice_takes_the_last_value_and_faults_add_up() {
        let a = super::Args::try_parse_from([
            "kd-agent",
            "--link-mbps=100",
            "--link-mbps=1000",
            "--fault=die-after:1",
            "--fault=corrupt:2",
        ])
        .expect("parses");
        assert_eq!(a.link_mbps, Some(1000));
        assert_eq!(a.fault.len(), 2);
    }
}
