//! `kd-bench arity`: broadcast time against tree arity, with real `kd-coord` and `kd-agent`
//! processes in network namespaces whose links are shaped by `tc`.
//!
//! Topology: one namespace holds a bridge (`kdb-<pid>-br`); namespace `kdb-<pid>-0` runs the
//! coordinator and `kdb-<pid>-1..N` one agent each. Every host namespace has a veth pair to the
//! bridge; both ends are shaped to the rate B with `tbf` (host side: what the host sends; bridge
//! side: what the host receives). Addresses are in 10.199.0.0/16, which exists only inside these
//! namespaces. Everything (processes by PID, namespaces, temp files) is removed by a guard on
//! the way out, also on error and on SIGINT/SIGTERM. Needs root.
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kd_disk::procstat::ProcStat;
use kd_proto::tree::Arity;
use serde::Serialize;

use crate::plot;

/// Options of `kd-bench arity`.
#[derive(clap::Args, Debug)]
pub(crate) struct ArityArgs {
    /// Number of agents (one network namespace each).
    #[arg(long, default_value_t = 16)]
    nodes: usize,
    /// Link rate of every host, both directions, in tc syntax (100mbit, 1gbit, 500kbit).
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// Comma-separated arities: 1 (= chain), k, chain, star.
    #[arg(long, default_value = "1,2,3,4")]
    arity: String,
    /// Size of the incompressible image in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// What agents do with the image: null (verify and relay) or raw (also decompress and write
    /// a file under --raw-dir).
    #[arg(long, default_value = "null", value_parser = ["null", "raw"])]
    sink: String,
    /// Directory for the raw copies (removed after each run).
    #[arg(long, default_value = "/tmp")]
    raw_dir: PathBuf,
    /// Print the results as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Write an SVG plot of time against arity.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Uncompressed chunk size of the image (kd-coord image pack --chunk-size).
    #[arg(long, default_value = "1M")]
    chunk_size: String,
    /// zstd level of the image.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Where kd-coord and kd-agent are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Extra argument for every agent, repeatable (e.g. --agent-arg=--window=32).
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// tbf queue limit, in milliseconds at the rate.
    #[arg(long, default_value_t = 50)]
    queue_ms: u64,
    /// tbf bucket size, in milliseconds at the rate (at least 4 full-size packets).
    #[arg(long, default_value_t = 2)]
    burst_ms: u64,
    /// Queueing on every shaped link: `fifo` (tbf: one FIFO, tail drop) or `sparse` (htb at
    /// the same rate whose packets under 256 bytes — ACKs — go before the bulk queue, as a
    /// Linux host's default fq_codel serves sparse flows first; the bulk queue is the same
    /// FIFO).
    #[arg(long, default_value = "sparse", value_parser = ["fifo", "sparse"])]
    qdisc: String,
    /// After kd's runs, the same image through a plain TCP chain of the same N nodes (one
    /// `kd-bench tcp-relay` per namespace: read, write on, nothing verified or stored — what
    /// `nc | tee` does): the reference a chain must not fall behind. Its row is `tcp-chain`.
    #[arg(long)]
    tcp_chain: bool,
    /// Skip the TCP check of the shaped links.
    #[arg(long)]
    no_probe: bool,
    /// MTU of every veth and the bridge (9000: jumbo frames; kd's path-MTU discovery then finds
    /// datagrams of up to 8952 bytes).
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Turn on GRO on every host's veth (`ethtool -K eth0 gro on`, needs ethtool), as physical
    /// NICs have it: received UDP datagrams of one flow reach the socket in batches.
    #[arg(long)]
    gro: bool,
    /// Niceness of the coordinator and agents (negative: ahead of the machine's other work,
    /// to tell this machine's other load from kd's own cost).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    nice: i32,
    /// Log level of the coordinator and agents (their `KD_LOG`).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Copy every run's logs (coord.log, coord.json, node<i>.log) to DIR/run<k> before they
    /// are removed.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// A two-level network: R racks, each its own bridge joined to the core bridge (where the
    /// coordinator is) by one uplink shaped to --uplink-rate; node i is in rack (i-1) mod R, so
    /// node names interleave racks. Each arity then runs twice: name-ordered (`chain`) and
    /// rack-aware (`chain/racks`: kd-coord broadcast --rack).
    #[arg(long, default_value_t = 1)]
    racks: usize,
    /// Rate of each rack's uplink, both directions (default: --rate).
    #[arg(long)]
    uplink_rate: Option<String>,
    /// Power a node off during every run: NODE@FRACTION (NODE in 1..=N, FRACTION in (0,1)),
    /// repeatable. At FRACTION × S/B seconds after the coordinator's plan, node NODE's link goes
    /// down (`ip link set eth0 down` in its namespace) and its agent gets SIGKILL. The run then
    /// counts as verified when every other node verified; the survivors' time is reported.
    #[arg(long, value_parser = parse_kill)]
    kill: Vec<Kill>,
    /// A slower link for some hosts: NODES=RATE (NODES: `3`, `2,5`, `4-6` or `all`; RATE in tc
    /// syntax), both directions; repeatable.
    #[arg(long, value_parser = parse_slow)]
    slow_link: Vec<Slow>,
    /// A slow disk for some agents: NODES=BYTES_PER_S (`all=4M`; suffixes k, M, G are powers
    /// of 1000): they write the image no faster (`kd-agent --write-rate`), with or without
    /// `--sink raw`; repeatable.
    #[arg(long, value_parser = parse_slow)]
    slow_disk: Vec<Slow>,
}

/// Some nodes and a rate for them (`--slow-link`, `--slow-disk`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Slow {
    /// Node indices, 1-based; empty: all.
    pub(crate) nodes: Vec<usize>,
    /// The rate as given.
    pub(crate) rate: String,
}

impl Slow {
    fn covers(&self, i: usize) -> bool {
        self.nodes.is_empty() || self.nodes.contains(&i)
    }
}

/// `NODES=RATE`: NODES is `all` or a comma list of indices and ranges (`1,3-5`).
pub(crate) fn parse_slow(s: &str) -> Result<Slow, String> {
    let (nodes, rate) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODES=RATE, like 5=25mbit or all=4M"))?;
    if rate.trim().is_empty() {
        return Err(format!("{s:?}: no rate"));
    }
    let mut v = Vec::new();
    if nodes.trim() != "all" {
        for part in nodes.split(',') {
            let bad = || format!("{s:?}: bad node list {nodes:?}");
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let (a, b): (usize, usize) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            if a == 0 || b < a || b - a > 1000 {
                return Err(bad());
            }
            v.extend(a..=b);
        }
    }
    Ok(Slow {
        nodes: v,
        rate: rate.trim().to_string(),
    })
}

/// A node to power off during a run (`--kill NODE@FRACTION`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Kill {
    /// Node index, 1-based (`node<i>`).
    pub(crate) node: usize,
    /// When, as a fraction of S/B after the plan.
    pub(crate) fraction: f64,
}

/// Parses `NODE@FRACTION` (`5@0.3`): NODE at least 1, FRACTION strictly between 0 and 1.
pub(crate) fn parse_kill(s: &str) -> Result<Kill, String> {
    let (node, frac) = s
        .trim()
        .split_once('@')
        .ok_or_else(|| format!("bad --kill {s:?}: expected NODE@FRACTION, like 5@0.3"))?;
    let node: usize = node
        .trim()
        .parse()
        .map_err(|_| format!("bad node in --kill {s:?}: expected an index 1..N"))?;
    let fraction: f64 = frac
        .trim()
        .parse()
        .map_err(|_| format!("bad fraction in --kill {s:?}: expected a number in (0,1)"))?;
    if node == 0 {
        return Err(format!(
            "bad node in --kill {s:?}: nodes are numbered from 1"
        ));
    }
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(format!(
            "bad fraction in --kill {s:?}: must be strictly between 0 and 1"
        ));
    }
    Ok(Kill { node, fraction })
}

/// Checks `--kill`s against N: every node in 1..=N, no node twice, at least one survivor.
pub(crate) fn check_kills(kills: &[Kill], nodes: usize) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for k in kills {
        if k.node == 0 || k.node > nodes {
            bail!(
                "--kill {}@{}: node must be in 1..={nodes}",
                k.node,
                k.fraction
            );
        }
        if !(k.fraction > 0.0 && k.fraction < 1.0) {
            bail!(
                "--kill {}@{}: fraction must be in (0,1)",
                k.node,
                k.fraction
            );
        }
        if !seen.insert(k.node) {
            bail!("--kill: node {} given twice", k.node);
        }
    }
    if seen.len() >= nodes {
        bail!("--kill: every node would be killed; leave at least one");
    }
    Ok(())
}

/// The rack of node `i` (1-based) among `racks`.
fn rack_of(i: usize, racks: usize) -> usize {
    (i - 1) % racks.max(1)
}

/// `kd-coord broadcast`'s `--rack` arguments for nodes 1..=n in `racks` racks.
fn rack_args(n: usize, racks: usize) -> Vec<String> {
    (0..racks)
        .flat_map(|r| {
            let members: Vec<String> = (1..=n)
                .filter(|&i| rack_of(i, racks) == r)
                .map(|i| format!("node{i}"))
                .collect();
            ["--rack".to_string(), format!("r{r}={}", members.join(","))]
        })
        .collect()
}

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Full-size Ethernet frame as tc counts it (no preamble, no FCS).
const FRAME: u64 = 1514;
const PORT: u16 = 7000;

// ---------------------------------------------------------------------------------------------
// Pure helpers

/// Parses a tc-style rate (`100mbit`, `1gbit`, `500kbit`, `12000bit`, `10mbps` = bytes) into
/// bits per second.
pub(crate) fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow!("bad rate {s:?}: expected a number and a unit like 100mbit"))?;
    let mult = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => bail!("bad rate unit in {s:?}: use bit, kbit, mbit, gbit (or bps, kbps... for bytes)"),
    };
    let bps = (v * mult).round();
    if !(1e4..=1e11).contains(&bps) {
        bail!("rate {s:?} out of range (10kbit to 100gbit)");
    }
    Ok(bps as u64)
}

/// Node `i`'s link rate in bits per second: `--rate`, or the last `--slow-link` that covers it.
fn link_bps(a: &ArityArgs, i: usize) -> Result<u64> {
    match a.slow_link.iter().rev().find(|sl| sl.covers(i)) {
        Some(sl) => parse_rate(&sl.rate),
        None => parse_rate(&a.rate),
    }
}

/// Human form of a rate in bits per second.
pub(crate) fn rate_label(bps: u64) -> String {
    if bps.is_multiple_of(1_000_000_000) {
        format!("{}gbit", bps / 1_000_000_000)
    } else if bps.is_multiple_of(1_000_000) {
        format!("{}mbit", bps / 1_000_000)
    } else if bps.is_multiple_of(1000) {
        format!("{}kbit", bps / 1000)
    } else {
        format!("{bps}bit")
    }
}

/// Parses `1,2,chain,star`; `1` is the chain. Duplicates are kept (repeated runs).
pub(crate) fn parse_arities(s: &str) -> Result<Vec<Arity>> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let a: Arity = part.parse().map_err(|e| anyhow!("{e}"))?;
        v.push(match a {
            Arity::Kary(1) => Arity::Chain,
            a => a,
        });
    }
    if v.is_empty() {
        bail!("no arity given");
    }
    Ok(v)
}

/// The ideal time ratio to S/B: every sender sends `fan-out` copies through its link.
pub(crate) fn ideal_ratio(a: Arity, nodes: usize) -> f64 {
    a.fan_out(nodes).min(nodes.max(1)) as f64
}

/// tbf parameters: bucket and queue limit, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Tbf {
    /// Rate in bits per second.
    pub(crate) rate_bps: u64,
    /// Bucket size (bytes): how much may leave back to back.
    pub(crate) burst: u64,
    /// Queue limit (bytes) before tail drop.
    pub(crate) limit: u64,
}

/// Bucket of `burst_ms` at the rate (at least 16 frames: one GSO batch of a QUIC sender, ~12
/// datagrams per `sendmsg`; a smaller bucket makes tbf split every batch and drop ten times more),
/// queue of `queue_ms` (at least the bucket plus 16 frames).
pub(crate) fn tbf_params(rate_bps: u64, burst_ms: u64, queue_ms: u64) -> Tbf {
    let per_ms = rate_bps / 8 / 1000;
    let burst = (per_ms * burst_ms).max(16 * FRAME);
    let limit = (per_ms * queue_ms).max(burst + 16 * FRAME);
    Tbf {
        rate_bps,
        burst,
        limit,
    }
}

/// `tc` command lines (arguments after `tc -n NS`) that shape `dev` to `t`: one tbf (`fifo`),
/// or (`sparse`) an htb class at the rate with two leaves, packets under 256 bytes (IPv4 total
/// length) served first, everything else in a byte FIFO of `t.limit`.
pub(crate) fn shaper_commands(dev: &str, t: Tbf, sparse: bool) -> Vec<Vec<String>> {
    let rate = format!("{}bit", t.rate_bps);
    let burst = t.burst.to_string();
    let limit = t.limit.to_string();
    let line = |s: &str| -> Vec<String> {
        s.replace("DEV", dev)
            .replace("RATE", &rate)
            .replace("BURST", &burst)
            .replace("LIMIT", &limit)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    if !sparse {
        return vec![line(
            "qdisc replace dev DEV root tbf rate RATE burst BURST limit LIMIT",
        )];
    }
    [
        "qdisc replace dev DEV root handle 1: htb default 20",
        "class add dev DEV parent 1: classid 1:1 htb rate RATE ceil RATE burst BURST cburst BURST",
        "class add dev DEV parent 1:1 classid 1:10 htb rate RATE ceil RATE burst BURST cburst BURST prio 0",
        "class add dev DEV parent 1:1 classid 1:20 htb rate RATE ceil RATE burst BURST cburst BURST prio 1",
        "qdisc add dev DEV parent 1:10 bfifo limit LIMIT",
        "qdisc add dev DEV parent 1:20 bfifo limit LIMIT",
        "filter add dev DEV parent 1: protocol ip prio 1 u32 match u16 0x0000 0xff00 at 2 flowid 1:10",
    ]
    .iter()
    .map(|s| line(s))
    .collect()
}

/// Address of host `i` (0 = coordinator) in 10.199.0.0/16.
pub(crate) fn host_addr(i: usize) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(10, 199, ((n >> 8) & 0xff) as u8, (n & 0xff) as u8)
}

/// CPU time counters of the `cpu` line of /proc/stat (clock ticks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    /// All time (user nice system idle iowait irq softirq steal).
    pub(crate) total: u64,
    /// Idle and iowait.
    pub(crate) idle: u64,
    /// Softirq (network processing in the kernel).
    pub(crate) softirq: u64,
}

/// Reads the aggregate `cpu` line of a /proc/stat text.
pub(crate) fn parse_proc_stat(s: &str) -> Option<CpuTimes> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<_>>>()?;
    if v.len() < 7 {
        return None;
    }
    Some(CpuTimes {
        total: v.iter().sum(),
        idle: v[3] + v[4],
        softirq: v[6],
    })
}

/// Busy and softirq fractions of all cores between two readings.
pub(crate) fn cpu_busy(a: CpuTimes, b: CpuTimes) -> (f64, f64) {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return (0.0, 0.0);
    }
    let idle = b.idle.saturating_sub(a.idle);
    let soft = b.softirq.saturating_sub(a.softirq);
    (1.0 - idle as f64 / total as f64, soft as f64 / total as f64)
}

/// (drops, packets) of the tbf qdiscs in `tc -s -j qdisc show` output.
pub(crate) fn parse_tc_stats(json: &str) -> (u64, u64) {
    let Ok(serde_json::Value::Array(v)) = serde_json::from_str(json) else {
        return (0, 0);
    };
    v.iter()
        .filter(|q| q["kind"] == "tbf" || q["kind"] == "htb")
        .fold((0, 0), |(d, p), q| {
            (
                d + q["drops"].as_u64().unwrap_or(0),
                p + q["packets"].as_u64().unwrap_or(0),
            )
        })
}

/// Namespaces named `kdb-<pid>-*` in `ip netns list` output whose owner `pid` is dead.
pub(crate) fn stale_namespaces(list: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    let mut v = Vec::new();
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("kdb-") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if let Ok(p) = pid.parse::<u32>() {
            if !alive(p) {
                v.push(name.to_string());
            }
        }
    }
    v
}

/// Mean and maximum.
pub(crate) fn mean_max(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (
        v.iter().sum::<f64>() / v.len() as f64,
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

// ---------------------------------------------------------------------------------------------
// Signals and the clean-up guard

/// Set by SIGINT, SIGTERM or SIGHUP: every wait checks it and the guard cleans up.
static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

fn install_signal_handlers() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // The handler only stores to the flag; exec'd children get the default disposition back.
        signal_hook::flag::register(sig, Arc::clone(&STOP))
            .with_context(|| format!("installing a handler for signal {sig}"))?;
    }
    Ok(())
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Owns everything the bench creates; `Drop` removes it all.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Child>,
    tmp: PathBuf,
    raw: Option<PathBuf>,
}

impl Lab {
    fn new(raw_dir: Option<&Path>) -> Result<Self> {
        let pid = std::process::id();
        let prefix = format!("kdb-{pid}");
        let tmp = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut lab = Self {
            prefix: prefix.clone(),
            namespaces: Vec::new(),
            procs: Vec::new(),
            tmp,
            raw: None,
        };
        if let Some(d) = raw_dir {
            let r = d.join(format!("{prefix}-raw"));
            std::fs::create_dir_all(&r).with_context(|| format!("create {}", r.display()))?;
            lab.raw = Some(r);
        }
        Ok(lab)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        cmd("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// Kills every process of the current run (by PID) and reaps it.
    fn kill_procs(&mut self) {
        for mut c in self.procs.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_procs();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(r) = &self.raw {
            let _ = std::fs::remove_dir_all(r);
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Runs a short command (ip, tc) to completion within 30 s; its stdout on success.
fn cmd(prog: &str, args: &[&str]) -> Result<String> {
    let o = run_limited(Command::new(prog).args(args), Duration::from_secs(30))?;
    if !o.status.success() {
        bail!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs a command with a time limit ([`kd_disk::cmd::output`]), stopped early by a signal.
fn run_limited(c: &mut Command, limit: Duration) -> Result<Output> {
    kd_disk::cmd::output(c, limit, Some(&**STOP)).with_context(|| format!("{:?}", c.get_program()))
}

// ---------------------------------------------------------------------------------------------
// Network set-up

fn remove_stale() {
    let Ok(list) = cmd("ip", &["netns", "list"]) else {
        return;
    };
    for ns in stale_namespaces(&list, |p| Path::new(&format!("/proc/{p}")).exists()) {
        eprintln!("kd-bench: removing stale namespace {ns} of a dead run");
        let _ = cmd("ip", &["netns", "del", &ns]);
    }
}

/// The racks of a two-level network: how many, and their uplinks' shaping.
#[derive(Debug, Clone, Copy)]
struct Racks {
    count: usize,
    uplink: Tbf,
}

fn build_network(
    lab: &mut Lab,
    hosts: usize,
    host_tbf: &dyn Fn(usize) -> Tbf,
    sparse: bool,
    gro: bool,
    mtu: u32,
    racks: Option<Racks>,
) -> Result<()> {
    let mtu = mtu.to_string();
    let br = lab.bridge_ns();
    lab.add_ns(&br)?;
    cmd("ip", &["-n", &br, "link", "set", "lo", "up"])?;
    let add_bridge = |name: &str| -> Result<()> {
        cmd(
            "ip",
            &[
                "-n",
                &br,
                "link",
                "add",
                name,
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        cmd("ip", &["-n", &br, "link", "set", name, "up"]).map(drop)
    };
    add_bridge("br0")?;
    // With br_netfilter loaded, bridged frames go through iptables: a cost of this test rig
    // (charged to the agents' system time), not of a real switch. The keys are per namespace.
    for key in ["iptables", "ip6tables", "arptables"] {
        let _ = cmd(
            "ip",
            &[
                "netns",
                "exec",
                &br,
                "sysctl",
                "-qw",
                &format!("net.bridge.bridge-nf-call-{key}=0"),
            ],
        );
    }
    let shape = |ns: &str, dev: &str, tbf: Tbf| -> Result<()> {
        for c in shaper_commands(dev, tbf, sparse) {
            let mut args = vec!["-n", ns];
            args.extend(c.iter().map(String::as_str));
            cmd("tc", &args)?;
        }
        Ok(())
    };
    // Racks: a bridge each, joined to the core bridge br0 by a shaped veth pair.
    if let Some(r) = racks {
        for k in 0..r.count {
            let (rk, up, down) = (format!("rk{k}"), format!("u{k}r"), format!("u{k}c"));
            add_bridge(&rk)?;
            cmd(
                "ip",
                &[
                    "-n", &br, "link", "add", &up, "type", "veth", "peer", "name", &down,
                ],
            )?;
            for (dev, master) in [(&up, &rk), (&down, &"br0".to_string())] {
                cmd("ip", &["-n", &br, "link", "set", dev, "mtu", &mtu])?;
                cmd("ip", &["-n", &br, "link", "set", dev, "master", master])?;
                cmd("ip", &["-n", &br, "link", "set", dev, "up"])?;
                for c in shaper_commands(dev, r.uplink, sparse) {
                    let mut args = vec!["-n", br.as_str()];
                    args.extend(c.iter().map(String::as_str));
                    cmd("tc", &args)?;
                }
            }
        }
    }
    for i in 0..hosts {
        check_stop()?;
        let ns = lab.ns(i);
        lab.add_ns(&ns)?;
        let port = format!("p{i}");
        cmd("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        cmd(
            "ip",
            &[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &br,
            ],
        )?;
        cmd(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/16", host_addr(i)),
                "dev",
                "eth0",
            ],
        )?;
        cmd("ip", &["-n", &ns, "link", "set", "eth0", "mtu", &mtu])?;
        cmd("ip", &["-n", &br, "link", "set", &port, "mtu", &mtu])?;
        cmd("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        let master = match racks {
            Some(r) if i > 0 => format!("rk{}", rack_of(i, r.count)),
            _ => "br0".to_string(),
        };
        cmd("ip", &["-n", &br, "link", "set", &port, "master", &master])?;
        cmd("ip", &["-n", &br, "link", "set", &port, "up"])?;
        shape(&ns, "eth0", host_tbf(i))?;
        shape(&br, &port, host_tbf(i))?;
        if gro {
            cmd(
                "ip",
                &["netns", "exec", &ns, "ethtool", "-K", "eth0", "gro", "on"],
            )?;
        }
    }
    Ok(())
}

/// Sum of (drops, packets) over every shaped device (both directions of every host).
fn shaper_stats(lab: &Lab, hosts: usize) -> (u64, u64) {
    let mut total = (0, 0);
    let br = lab.bridge_ns();
    for i in 0..hosts {
        for (ns, dev) in [
            (lab.ns(i), "eth0".to_string()),
            (br.clone(), format!("p{i}")),
        ] {
            if let Ok(j) = cmd("tc", &["-n", &ns, "-s", "-j", "qdisc", "show", "dev", &dev]) {
                let (d, p) = parse_tc_stats(&j);
                total.0 += d;
                total.1 += p;
            }
        }
    }
    total
}

/// Runs `f` on a thread that has entered namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let fd = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        // Changes only this thread's network namespace: the sockets made below live there.
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns {}", path.display()))?;
        f()
    })
}

/// One TCP flow from host 1 to host 2 for `secs`: goodput in bit/s.
fn tcp_probe(lab: &Lab, secs: f64) -> Result<f64> {
    let dst = SocketAddr::from((host_addr(2), 5201));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rx = in_netns(&lab.ns(2), move || {
        let l = TcpListener::bind(dst)?;
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut first: Option<Instant> = None;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            // Start the clock after the first 1 MiB (past slow start).
            if first.is_none() && total + n as u64 >= MIB {
                first = Some(Instant::now());
                total = 0;
                continue;
            }
            total += n as u64;
        }
        let t = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
        Ok(if t > 0.0 { total as f64 * 8.0 / t } else { 0.0 })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("probe receiver did not start"))?;
    let tx = in_netns(&lab.ns(1), move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        let buf = vec![0x5au8; 1 << 16];
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    tx.join().map_err(|_| anyhow!("probe sender panicked"))??;
    rx.join().map_err(|_| anyhow!("probe receiver panicked"))?
}

// ---------------------------------------------------------------------------------------------
// Image

/// Writes `bytes` of incompressible pseudo-random data (splitmix64).
fn write_random(path: &Path, bytes: u64) -> Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut x: u64 = 0x1234_5678_9abc_def0;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for c in block.chunks_exact_mut(8) {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            c.copy_from_slice(&z.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        w.write_all(&block[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Runs

/// One row of the table.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct Row {
    /// Agents.
    pub(crate) nodes: usize,
    /// Link rate (bit/s).
    pub(crate) rate_bps: u64,
    /// chain, k, star.
    pub(crate) arity: String,
    /// Fan-out used for the ideal time.
    pub(crate) fan_out: usize,
    /// Transfer time reported by the coordinator (plan to last report).
    pub(crate) seconds: f64,
    /// Wall time from starting the processes to the coordinator's exit.
    pub(crate) wall_seconds: f64,
    /// seconds / (S/B).
    pub(crate) ratio: f64,
    /// Ideal ratio (fan-out).
    pub(crate) ideal_ratio: f64,
    /// Agent CPU seconds per GiB received, mean over agents.
    pub(crate) cpu_s_per_gib_mean: f64,
    /// Same, the largest.
    pub(crate) cpu_s_per_gib_max: f64,
    /// Sum of the agents' CPU seconds divided by the transfer time (cores used by agents).
    pub(crate) agent_cores: f64,
    /// Coordinator CPU seconds (user+sys, last reading before it exited).
    pub(crate) coord_cpu_seconds: f64,
    /// The busiest single thread of any agent: its user+sys CPU seconds per GiB (from
    /// /proc/PID/task, whole thread life). What one core must carry for that node to keep up.
    pub(crate) thread_s_per_gib_max: f64,
    /// Agents' user CPU seconds per GiB, mean, sampled from /proc (whole process life).
    pub(crate) agent_user_s_per_gib: f64,
    /// Agents' system CPU seconds per GiB, mean, sampled from /proc (whole process life).
    pub(crate) agent_sys_s_per_gib: f64,
    /// Busy fraction of all cores of the machine over the run (everything, not only kd).
    pub(crate) machine_busy: f64,
    /// Softirq fraction of all cores (kernel network processing).
    pub(crate) machine_softirq: f64,
    /// Packets dropped by the tbf shapers (all links, both directions) during the run.
    pub(crate) tbf_drops: u64,
    /// Packets sent through the tbf shapers during the run.
    pub(crate) tbf_packets: u64,
    /// Every node reported a verified copy and every agent exited 0.
    pub(crate) verified: bool,
    /// What went wrong, per node.
    pub(crate) failures: Vec<String>,
    /// Largest `seconds` (plan to report) over the nodes not killed that verified; without
    /// `--kill`, the same as `seconds` up to the coordinator's rounding.
    pub(crate) survivor_seconds: f64,
    /// survivor_seconds / (S/B).
    pub(crate) survivor_ratio: f64,
    /// The nodes powered off (`--kill`), with what the coordinator said of them.
    pub(crate) killed: Vec<Killed>,
    /// Median `seconds` over the nodes not killed that verified: when most nodes are done.
    pub(crate) median_seconds: f64,
    /// Of `seconds`, the rate probe's before an `auto` tree (0 without one).
    pub(crate) probe_seconds: f64,
    /// The coordinator's words for the tree (`auto: chain of 15 at 11.8 MB/s, ...`).
    pub(crate) shape: String,
}

/// A node powered off during a run and the coordinator's verdict on it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Killed {
    /// `node<i>`.
    pub(crate) node: String,
    /// The requested moment, as a fraction of S/B after the plan.
    pub(crate) fraction: f64,
    /// When it was powered off, seconds after the plan was seen (None: the run ended first).
    pub(crate) at_seconds: Option<f64>,
    /// The coordinator counted it verified (it finished before the kill).
    pub(crate) ok: bool,
    /// The coordinator's reason.
    pub(crate) reason: Option<String>,
}

/// Everything measured, for `--json`.
#[derive(Debug, Serialize)]
pub(crate) struct Results {
    nodes: usize,
    rate: String,
    rate_bps: u64,
    size_mib: u64,
    chunk_size: String,
    sink: String,
    compressed_bytes: u64,
    s_over_b_seconds: f64,
    tbf: Tbf,
    /// `fifo` or `sparse` (see `--qdisc`).
    qdisc: String,
    tcp_probe_bps: Option<f64>,
    cores: usize,
    agent_args: Vec<String>,
    rows: Vec<Row>,
}

#[derive(serde::Deserialize)]
struct NodeOut {
    node: String,
    ok: bool,
    #[serde(default)]
    reason: Option<String>,
    /// `null` for a node that never reported.
    #[serde(default)]
    cpu_seconds: Option<f64>,
    #[serde(default)]
    seconds: Option<f64>,
}

#[derive(serde::Deserialize)]
struct Outcome {
    nodes: Vec<NodeOut>,
    transfer_seconds: f64,
    compressed_bytes: u64,
    #[serde(default)]
    probe_seconds: f64,
    #[serde(default)]
    shape: String,
}

struct Env {
    coord: PathBuf,
    agent: PathBuf,
    state: PathBuf,
    image: PathBuf,
    pin: String,
    tokens: PathBuf,
}

/// Raises `ticks[k]` to the (user, sys) ticks /proc shows now for `pids[k]` (a process that has
/// exited keeps its last reading).
fn sample_ticks(pids: &[u32], ticks: &mut [(u64, u64)]) {
    for (t, pid) in ticks.iter_mut().zip(pids) {
        if let Some(st) = ProcStat::of(*pid) {
            *t = (t.0.max(st.utime), t.1.max(st.stime));
        }
    }
}

/// Raises `busiest[k]` to the user+sys ticks of the busiest thread of `pids[k]` now (kd-agent
/// relays on two threads with `--net-threads 2`: what one core must carry is its busiest
/// thread's share, not the process's).
fn sample_thread_max(pids: &[u32], busiest: &mut [u64]) {
    for (b, pid) in busiest.iter_mut().zip(pids) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Some(st) = ProcStat::read(&t.path().join("stat")) {
                *b = (*b).max(st.cpu_ticks());
            }
        }
    }
}

/// `12.3 s, ratio 1.234, WHAT true`, the failures and the killed nodes, for the progress lines.
fn row_summary(row: &Row, what: &str) -> String {
    let mut s = format!(
        "{:.1} s, ratio {:.3}, {what} {}{}",
        row.seconds,
        row.ratio,
        row.verified,
        if row.failures.is_empty() {
            String::new()
        } else {
            format!(": {}", row.failures.join("; "))
        }
    );
    if !row.killed.is_empty() {
        s.push_str(&format!(
            "; survivors {:.1} s (ratio {:.3}); killed: {}",
            row.survivor_seconds,
            row.survivor_ratio,
            killed_summary(&row.killed)
        ));
    }
    s
}

/// `node5 at 6.45 s: REASON, ...`.
pub(crate) fn killed_summary(killed: &[Killed]) -> String {
    killed
        .iter()
        .map(|k| {
            let at = k.at_seconds.map_or_else(
                || "not killed (run over)".to_string(),
                |t| format!("at {t:.2} s"),
            );
            let verdict = if k.ok {
                "verified before it died".to_string()
            } else {
                k.reason.clone().unwrap_or_else(|| "no reason given".into())
            };
            format!("{} {at}: {verdict}", k.node)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `ip netns exec <namespace of host i> nice -n NICE`, to which the program and its arguments
/// are added.
fn ns_command(lab: &Lab, i: usize, nice: i32) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.ns(i), "nice", "-n", &nice.to_string()]);
    c
}

fn proc_stat() -> CpuTimes {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_proc_stat(&s))
        .unwrap_or_default()
}

fn clk_tck() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    lab: &mut Lab,
    env: &Env,
    a: &ArityArgs,
    arity: Arity,
    run: usize,
    s_over_b: f64,
    rate_bps: u64,
    coord_args: &[String],
) -> Result<Row> {
    let n = a.nodes;
    let ideal = ideal_ratio(arity, n);
    let port = PORT + run as u16;
    let coord_addr = SocketAddr::from((host_addr(0), port));
    let hello = 60u64;
    let transfer_limit = (s_over_b * ideal * 4.0 + 60.0).ceil() as u64;
    let logs = lab.tmp.join(format!("run{run}"));
    std::fs::create_dir_all(&logs)?;
    let tc0 = shaper_stats(lab, n + 1);
    let cpu0 = proc_stat();
    let t0 = Instant::now();
    let c_out = File::create(logs.join("coord.json"))?;
    let c_err = File::create(logs.join("coord.log"))?;
    let coord = ns_command(lab, 0, a.nice)
        .arg(&env.coord)
        .arg("--state")
        .arg(&env.state)
        .arg("broadcast")
        .arg(&env.image)
        .args(["-m", &format!("node[1-{n}]"), "--arity", &arity.to_string()])
        .args(["--listen", &coord_addr.to_string(), "--tokens"])
        .arg(&env.tokens)
        .args(["--json", "--hello-timeout", &hello.to_string()])
        .args(["--timeout", &transfer_limit.to_string()])
        .args(coord_args)
        .env("KD_LOG", &a.log)
        .stdin(Stdio::null())
        .stdout(c_out)
        .stderr(c_err)
        .spawn()
        .context("start kd-coord")?;
    lab.procs.push(coord);
    for i in 1..=n {
        let sink = match (&lab.raw, a.sink.as_str()) {
            (Some(r), "raw") => format!("raw:{}", r.join(format!("node{i}.raw")).display()),
            _ => "null".to_string(),
        };
        let log = File::create(logs.join(format!("node{i}.log")))?;
        let child = ns_command(lab, i, a.nice)
            .arg(&env.agent)
            .args(["--coord", &coord_addr.to_string(), "--pin", &env.pin])
            .args([
                "--node",
                &format!("node{i}"),
                "--token",
                &format!("tok-{i}"),
            ])
            .args(["--sink", &sink])
            .args(["--listen", &format!("{}:0", host_addr(i))])
            // What the NIC of a real node shaped so would report (a veth says 10000): the
            // agent's `--net-threads auto` reads it.
            .arg(format!(
                "--link-mbps={}",
                (link_bps(a, i)? / 1_000_000).max(1)
            ))
            .args(
                a.slow_disk
                    .iter()
                    .rev()
                    .find(|sd| sd.covers(i))
                    .map(|sd| format!("--write-rate={}", sd.rate)),
            )
            .args(&a.agent_arg)
            .env("KD_LOG", &a.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start kd-agent")?;
        lab.procs.push(child);
    }
    // Wait for the coordinator, bounded; sample its CPU time while it lives.
    let deadline = t0 + Duration::from_secs(hello + transfer_limit + 30);
    let tck = clk_tck();
    // Last (user, sys) ticks seen per process: index 0 the coordinator, i agent i.
    let pids: Vec<u32> = lab.procs.iter().map(|c| c.id()).collect();
    let mut ticks = vec![(0u64, 0u64); pids.len()];
    let mut busiest = vec![0u64; pids.len()];
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    // The plan's moment (seen in coord.log) and, per node index, when it was powered off.
    let mut planned: Option<Instant> = None;
    let mut kill_at: Vec<Option<f64>> = vec![None; n + 1];
    let coord_status = loop {
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            sample_ticks(&pids, &mut ticks);
            sample_thread_max(&pids, &mut busiest);
        }
        if !a.kill.is_empty() {
            match planned {
                None => {
                    if std::fs::read_to_string(logs.join("coord.log"))
                        .is_ok_and(|t| t.contains("planned a tree"))
                    {
                        planned = Some(Instant::now());
                    }
                }
                Some(p) => {
                    for k in &a.kill {
                        if kill_at[k.node].is_none()
                            && p.elapsed().as_secs_f64() >= k.fraction * s_over_b
                        {
                            power_off(lab, k.node)?;
                            let at = p.elapsed().as_secs_f64();
                            kill_at[k.node] = Some(at);
                            eprintln!(
                                "kd-bench: arity {arity}: powered node{} off {at:.2} s after the plan ({:.3} S/B)",
                                k.node,
                                at / s_over_b
                            );
                        }
                    }
                }
            }
        }
        if let Some(s) = lab.procs[0].try_wait()? {
            break s;
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "arity {arity}: the coordinator did not finish within {:?} (logs: {})",
                deadline - t0,
                tail(&logs.join("coord.log"), 5)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = proc_stat();
    // Agents exit once released; give them a bounded moment, then kill what is left.
    let mut failures = Vec::new();
    let agent_deadline = Instant::now() + Duration::from_secs(20);
    for i in 1..lab.procs.len() {
        if kill_at.get(i).is_some_and(Option::is_some) {
            // Powered off by us: its exit by SIGKILL is the point.
            continue;
        }
        let status = loop {
            if let Some(s) = lab.procs[i].try_wait()? {
                break Some(s);
            }
            if Instant::now() > agent_deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => failures.push(format!(
                "node{i}: agent exited with {s}: {}",
                tail(&logs.join(format!("node{i}.log")), 2)
            )),
            None => failures.push(format!(
                "node{i}: agent still running after the coordinator"
            )),
        }
    }
    lab.kill_procs();
    // Power the killed nodes back on for the next run (the qdiscs stay on the device).
    for k in &a.kill {
        cmd("ip", &["-n", &lab.ns(k.node), "link", "set", "eth0", "up"])?;
    }
    if let Some(keep) = &a.keep_logs {
        let dst = keep.join(format!("run{run}"));
        std::fs::create_dir_all(&dst).with_context(|| format!("create {}", dst.display()))?;
        for e in std::fs::read_dir(&logs)? {
            let e = e?;
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    let tc1 = shaper_stats(lab, n + 1);
    if let Some(r) = &lab.raw {
        for i in 1..=n {
            let _ = std::fs::remove_file(r.join(format!("node{i}.raw")));
        }
    }
    let out_text = std::fs::read_to_string(logs.join("coord.json"))?;
    let out: Outcome = serde_json::from_str(&out_text).with_context(|| {
        format!(
            "arity {arity}: no JSON outcome from kd-coord ({coord_status}): {}",
            tail(&logs.join("coord.log"), 5)
        )
    })?;
    let gib = out.compressed_bytes as f64 / GIB;
    let mut per_gib = Vec::new();
    let mut agent_cpu = 0.0;
    let mut survivor_seconds = 0.0f64;
    let mut done_at = Vec::new();
    let mut killed = Vec::new();
    for nd in &out.nodes {
        if let Some(k) = a.kill.iter().find(|k| format!("node{}", k.node) == nd.node) {
            killed.push(Killed {
                node: nd.node.clone(),
                fraction: k.fraction,
                at_seconds: kill_at[k.node],
                ok: nd.ok,
                reason: nd.reason.clone(),
            });
            continue;
        }
        if nd.ok {
            survivor_seconds = survivor_seconds.max(nd.seconds.unwrap_or(f64::NAN));
            done_at.extend(nd.seconds);
        } else {
            failures.push(format!(
                "{}: {}",
                nd.node,
                nd.reason.clone().unwrap_or_default()
            ));
        }
        let Some(cpu) = nd.cpu_seconds else {
            continue;
        };
        agent_cpu += cpu;
        if gib > 0.0 {
            per_gib.push(cpu / gib);
        }
    }
    if out.nodes.len() != n {
        failures.push(format!("{} node reports for {n} nodes", out.nodes.len()));
    }
    let (busy, soft) = cpu_busy(cpu0, cpu1);
    let (mean, max) = mean_max(&per_gib);
    let seconds = out.transfer_seconds;
    Ok(Row {
        nodes: n,
        rate_bps,
        arity: arity.to_string(),
        fan_out: arity.fan_out(n).min(n),
        seconds,
        wall_seconds: wall,
        ratio: seconds / s_over_b,
        ideal_ratio: ideal,
        cpu_s_per_gib_mean: mean,
        cpu_s_per_gib_max: max,
        agent_cores: if seconds > 0.0 {
            agent_cpu / seconds
        } else {
            0.0
        },
        coord_cpu_seconds: (ticks[0].0 + ticks[0].1) as f64 / tck,
        thread_s_per_gib_max: if gib > 0.0 {
            busiest[1..].iter().copied().max().unwrap_or(0) as f64 / tck / gib
        } else {
            f64::NAN
        },
        agent_user_s_per_gib: if gib > 0.0 {
            ticks[1..].iter().map(|t| t.0).sum::<u64>() as f64 / tck / n as f64 / gib
        } else {
            f64::NAN
        },
        agent_sys_s_per_gib: if gib > 0.0 {
            ticks[1..].iter().map(|t| t.1).sum::<u64>() as f64 / tck / n as f64 / gib
        } else {
            f64::NAN
        },
        machine_busy: busy,
        machine_softirq: soft,
        tbf_drops: tc1.0.saturating_sub(tc0.0),
        tbf_packets: tc1.1.saturating_sub(tc0.1),
        // With kills the coordinator exits 1 (not every node verified): the survivors decide.
        verified: failures.is_empty()
            && (coord_status.success() || (!a.kill.is_empty() && coord_status.code() == Some(1))),
        failures,
        survivor_seconds,
        survivor_ratio: survivor_seconds / s_over_b,
        killed,
        median_seconds: median(&mut done_at),
        probe_seconds: out.probe_seconds,
        shape: out.shape,
    })
}

/// The median of `v` (NaN when empty).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The table of trees: per run, the last and the median node's time, the rate probe's part,
/// and the tree the coordinator chose.
pub(crate) fn shape_table(rows: &[Row], s_over_b: f64) -> String {
    let w = rows.iter().map(|r| r.arity.len()).max().unwrap_or(0).max(6);
    let mut s = format!(
        "{:>w$} {:>8} {:>6} {:>8} {:>6} {:>7}  tree\n",
        "arity", "seconds", "ratio", "median s", "ratio", "probe s"
    );
    for r in rows {
        s.push_str(&format!(
            "{:>w$} {:>8.1} {:>6.3} {:>8.1} {:>6.3} {:>7.2}  {}\n",
            r.arity,
            r.seconds,
            r.seconds / s_over_b,
            r.median_seconds,
            r.median_seconds / s_over_b,
            r.probe_seconds,
            if r.shape.is_empty() { "-" } else { &r.shape }
        ));
    }
    s
}

/// "Powers off" agent `i`: its link down first (nothing it sends leaves any more, not even the
/// kernel's ICMP for its closed sockets), then SIGKILL to its process (`ip netns exec` and
/// `nice` exec, so the child's PID is the agent's).
fn power_off(lab: &mut Lab, i: usize) -> Result<()> {
    cmd("ip", &["-n", &lab.ns(i), "link", "set", "eth0", "down"])?;
    let c = lab
        .procs
        .get_mut(i)
        .ok_or_else(|| anyhow!("no process for node{i}"))?;
    c.kill()
        .with_context(|| format!("SIGKILL node{i}'s agent"))?;
    Ok(())
}

/// The reference: the image file through a plain TCP chain (namespace 0 sends, 1..N relay).
fn run_tcp_chain(
    lab: &mut Lab,
    env: &Env,
    a: &ArityArgs,
    run: usize,
    s_over_b: f64,
    rate_bps: u64,
) -> Result<Row> {
    let n = a.nodes;
    let port = PORT + 500 + run as u16;
    let limit = (s_over_b * 4.0 + 60.0).ceil() as u64;
    let me = std::env::current_exe().context("kd-bench's own path")?;
    let logs = lab.tmp.join(format!("run{run}"));
    std::fs::create_dir_all(&logs)?;
    let spawn = |lab: &mut Lab, i: usize, args: Vec<String>| -> Result<()> {
        let out = File::create(logs.join(format!("tcp{i}.out")))?;
        let err = File::create(logs.join(format!("tcp{i}.log")))?;
        let child = ns_command(lab, i, a.nice)
            .arg(&me)
            .arg("tcp-relay")
            .args(&args)
            .args(["--timeout", &limit.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("start kd-bench tcp-relay")?;
        lab.procs.push(child);
        Ok(())
    };
    let addr = |i: usize| format!("{}:{port}", host_addr(i));
    // Listeners from the last node up; each connects on when its own connection comes in.
    for i in (1..=n).rev() {
        let mut args = vec!["--listen".to_string(), addr(i)];
        if i < n {
            args.extend(["--next".to_string(), addr(i + 1)]);
        }
        spawn(lab, i, args)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let tc0 = shaper_stats(lab, n + 1);
    let cpu0 = proc_stat();
    let t0 = Instant::now();
    spawn(
        lab,
        0,
        vec![
            "--send".to_string(),
            env.image.display().to_string(),
            "--next".to_string(),
            addr(1),
        ],
    )?;
    let pids: Vec<u32> = lab.procs.iter().map(|c| c.id()).collect();
    let mut ticks = vec![(0u64, 0u64); pids.len()];
    let deadline = t0 + Duration::from_secs(limit + 30);
    let mut failures = Vec::new();
    let mut done = vec![false; pids.len()];
    while !done.iter().all(|d| *d) {
        sample_ticks(&pids, &mut ticks);
        for (k, d) in done.iter_mut().enumerate() {
            if !*d {
                if let Some(st) = lab.procs[k].try_wait()? {
                    *d = true;
                    if !st.success() {
                        let who = if k < n {
                            format!("node{}", n - k)
                        } else {
                            "the source".to_string()
                        };
                        failures.push(format!("tcp-relay of {who} exited with {st}"));
                    }
                }
            }
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            failures.push("the TCP chain did not finish in time".to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = proc_stat();
    lab.kill_procs();
    let tc1 = shaper_stats(lab, n + 1);
    let size = std::fs::metadata(&env.image)?.len();
    // procs were pushed for nodes n..1, then the source: the node of procs[k] is n - k.
    for i in 1..=n {
        let got = std::fs::read_to_string(logs.join(format!("tcp{i}.out"))).unwrap_or_default();
        if got.trim() != format!("bytes {size}") {
            failures.push(format!(
                "node{i}: {:?} of {size} bytes ({})",
                got.trim(),
                tail(&logs.join(format!("tcp{i}.log")), 2)
            ));
        }
    }
    let gib = size as f64 / GIB;
    let tck = clk_tck();
    let relays = &ticks[..n];
    let per_gib: Vec<f64> = relays
        .iter()
        .map(|t| (t.0 + t.1) as f64 / tck / gib)
        .collect();
    let (mean, max) = mean_max(&per_gib);
    let relay_cpu: f64 = relays.iter().map(|t| (t.0 + t.1) as f64 / tck).sum();
    let (busy, soft) = cpu_busy(cpu0, cpu1);
    Ok(Row {
        nodes: n,
        rate_bps,
        arity: "tcp-chain".to_string(),
        fan_out: 1,
        seconds,
        wall_seconds: seconds,
        ratio: seconds / s_over_b,
        ideal_ratio: 1.0,
        cpu_s_per_gib_mean: mean,
        cpu_s_per_gib_max: max,
        agent_cores: relay_cpu / seconds,
        coord_cpu_seconds: (ticks[n].0 + ticks[n].1) as f64 / tck,
        // One thread per relay.
        thread_s_per_gib_max: max,
        agent_user_s_per_gib: relays.iter().map(|t| t.0).sum::<u64>() as f64 / tck / n as f64 / gib,
        agent_sys_s_per_gib: relays.iter().map(|t| t.1).sum::<u64>() as f64 / tck / n as f64 / gib,
        machine_busy: busy,
        machine_softirq: soft,
        tbf_drops: tc1.0.saturating_sub(tc0.0),
        tbf_packets: tc1.1.saturating_sub(tc0.1),
        verified: failures.is_empty(),
        failures,
        survivor_seconds: seconds,
        survivor_ratio: seconds / s_over_b,
        median_seconds: seconds,
        shape: "plain TCP chain".into(),
        ..Default::default()
    })
}

/// The table, one line per run.
pub(crate) fn table(rows: &[Row], s_over_b: f64) -> String {
    // The arity column fits its longest label (`chain/racks`).
    let w = rows.iter().map(|r| r.arity.len()).max().unwrap_or(0).max(6);
    let line = |c: [&str; 16]| {
        format!(
            "{:>4} {:>8} {:>w$} {:>8} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>7} {:>8} {:>8}\n",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]
        )
    };
    let mut s = line([
        "N", "B", "arity", "seconds", "S/B", "ratio", "ideal", "cpu/GiB", "cpu/GiB", "thread",
        "usr+sys", "agent", "busy", "softirq", "tc drops", "verified",
    ]);
    s.push_str(&line([
        "", "", "", "", "s", "", "", "mean s", "max s", "max s", "s/GiB", "cores", "%", "%",
        "per 10k", "",
    ]));
    for r in rows {
        s.push_str(&line([
            &r.nodes.to_string(),
            &rate_label(r.rate_bps),
            &r.arity,
            &format!("{:.1}", r.seconds),
            &format!("{s_over_b:.1}"),
            &format!("{:.3}", r.ratio),
            &format!("{:.0}", r.ideal_ratio),
            &format!("{:.2}", r.cpu_s_per_gib_mean),
            &format!("{:.2}", r.cpu_s_per_gib_max),
            &format!("{:.2}", r.thread_s_per_gib_max),
            &format!("{:.1}+{:.1}", r.agent_user_s_per_gib, r.agent_sys_s_per_gib),
            &format!("{:.2}", r.agent_cores),
            &format!("{:.0}", r.machine_busy * 100.0),
            &format!("{:.0}", r.machine_softirq * 100.0),
            &format!(
                "{:.1}",
                r.tbf_drops as f64 * 1e4 / r.tbf_packets.max(1) as f64
            ),
            if r.verified { "yes" } else { "NO" },
        ]));
    }
    s
}

/// The second table of a run with `--kill`: the survivors' time, and the killed nodes.
pub(crate) fn kill_table(rows: &[Row], s_over_b: f64) -> String {
    let w = rows.iter().map(|r| r.arity.len()).max().unwrap_or(0).max(6);
    let mut s = format!(
        "{:>w$} {:>8} {:>6} {:>10} {:>7} {:>7}  killed (seconds after the plan): the coordinator's reason\n",
        "arity", "seconds", "ratio", "survivors", "ratio", "/ideal"
    );
    s.push_str(&format!(
        "{:>w$} {:>8} {:>6} {:>10} {:>7} {:>7}\n",
        "", "all", "", "max s", "", ""
    ));
    for r in rows.iter().filter(|r| !r.killed.is_empty()) {
        s.push_str(&format!(
            "{:>w$} {:>8.1} {:>6.3} {:>10.1} {:>7.3} {:>7.3}  {}\n",
            r.arity,
            r.seconds,
            r.seconds / s_over_b,
            r.survivor_seconds,
            r.survivor_seconds / s_over_b,
            r.survivor_seconds / s_over_b / r.ideal_ratio,
            killed_summary(&r.killed)
        ));
    }
    s
}

fn find_bins(a: &ArityArgs) -> Result<(PathBuf, PathBuf)> {
    let dir = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no directory for this executable"))?
            .to_path_buf(),
    };
    let c = dir.join("kd-coord");
    let g = dir.join("kd-agent");
    for p in [&c, &g] {
        if !p.is_file() {
            bail!(
                "{} is missing: build it (cargo build --release -p kd-coord -p kd-agent) or pass --bin-dir",
                p.display()
            );
        }
    }
    Ok((c, g))
}

/// `kd-bench arity`.
pub(crate) fn run(a: ArityArgs) -> Result<()> {
    let rate_bps = parse_rate(&a.rate)?;
    let arities = parse_arities(&a.arity)?;
    if a.nodes < 2 || a.nodes > 1000 {
        bail!("--nodes must be between 2 and 1000");
    }
    if a.size_mib == 0 || a.size_mib > 64 * 1024 {
        bail!("--size-mib must be between 1 and 65536");
    }
    check_kills(&a.kill, a.nodes)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("kd-bench arity creates network namespaces: run it as root");
    }
    let (coord_bin, agent_bin) = find_bins(&a)?;
    install_signal_handlers()?;
    remove_stale();
    let tbf = tbf_params(rate_bps, a.burst_ms, a.queue_ms);
    if a.racks == 0 || a.racks > a.nodes {
        bail!("--racks must be between 1 and --nodes");
    }
    let racks = if a.racks > 1 {
        let up = match &a.uplink_rate {
            Some(r) => parse_rate(r)?,
            None => rate_bps,
        };
        Some(Racks {
            count: a.racks,
            uplink: tbf_params(up, a.burst_ms, a.queue_ms),
        })
    } else {
        None
    };
    let mut lab = Lab::new((a.sink == "raw").then_some(a.raw_dir.as_path()))?;

    // Image first (no namespaces yet), then the network.
    let input = lab.tmp.join("input.raw");
    let t = Instant::now();
    write_random(&input, a.size_mib * MIB)?;
    let state = lab.tmp.join("state");
    let image = lab.tmp.join("image.kdi");
    let o = run_limited(
        Command::new(&coord_bin)
            .arg("--state")
            .arg(&state)
            .args(["image", "pack"])
            .arg(&input)
            .arg("-o")
            .arg(&image)
            .args([
                "--chunk-size",
                &a.chunk_size,
                "--level",
                &a.level.to_string(),
            ]),
        Duration::from_secs(600),
    )?;
    if !o.status.success() {
        bail!("image pack failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let _ = std::fs::remove_file(&input);
    let o = run_limited(
        Command::new(&coord_bin)
            .arg("--state")
            .arg(&state)
            .arg("pin"),
        Duration::from_secs(30),
    )?;
    if !o.status.success() {
        bail!(
            "kd-coord pin failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let pin = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let tokens = lab.tmp.join("tokens");
    let tok: String = (1..=a.nodes)
        .map(|i| format!("node{i} tok-{i}\n"))
        .collect();
    std::fs::write(&tokens, tok)?;
    let compressed = std::fs::metadata(&image)?.len();
    eprintln!(
        "kd-bench: image of {} MiB packed in {:.1} s",
        a.size_mib,
        t.elapsed().as_secs_f64()
    );
    check_stop()?;

    let mut slow_tbf: Vec<Tbf> = vec![tbf; a.nodes + 1];
    for sl in &a.slow_link {
        let t = tbf_params(parse_rate(&sl.rate)?, a.burst_ms, a.queue_ms);
        for (i, st) in slow_tbf.iter_mut().enumerate().skip(1) {
            if sl.covers(i) {
                *st = t;
            }
        }
    }
    for (i, t) in slow_tbf.iter().enumerate().skip(1) {
        if t.rate_bps != tbf.rate_bps {
            eprintln!("kd-bench: node{i}'s link is {}", rate_label(t.rate_bps));
        }
    }
    for sd in &a.slow_disk {
        let nodes = if sd.nodes.is_empty() {
            "every node".to_string()
        } else {
            format!("node {:?}", sd.nodes)
        };
        eprintln!("kd-bench: {nodes} writes at most {} bytes/s", sd.rate);
    }
    build_network(
        &mut lab,
        a.nodes + 1,
        &|i| slow_tbf[i],
        a.qdisc == "sparse",
        a.gro,
        a.mtu,
        racks,
    )?;
    if let Some(r) = racks {
        eprintln!(
            "kd-bench: {} racks (node i in rack (i-1) mod {}), each joined to the coordinator's bridge by an uplink of {}",
            r.count,
            r.count,
            rate_label(r.uplink.rate_bps)
        );
    }
    eprintln!(
        "kd-bench: {} hosts on a bridge, each link {} rate {} burst {} B limit {} B, both directions{}",
        a.nodes + 1,
        if a.qdisc == "sparse" {
            "htb (packets under 256 B first)"
        } else {
            "tbf"
        },
        rate_label(rate_bps),
        tbf.burst,
        tbf.limit,
        if a.gro { ", GRO on" } else { "" }
    );
    let probe = if a.no_probe {
        None
    } else {
        let p = tcp_probe(&lab, 3.0)?;
        eprintln!(
            "kd-bench: one TCP flow through two shaped links: {:.1} Mbit/s goodput ({:.1}% of B; 1448/1514 = 95.6% is the most TCP can carry)",
            p / 1e6,
            p / rate_bps as f64 * 100.0
        );
        Some(p)
    };
    let env = Env {
        coord: coord_bin,
        agent: agent_bin,
        state,
        image,
        pin,
        tokens,
    };
    let mut rows = Vec::new();
    // Each arity as named; on a rack network, then rack-aware too.
    let variants: Vec<(Arity, bool)> = arities
        .iter()
        .flat_map(|&ar| {
            let aware = racks.is_some() && !matches!(ar, Arity::Star);
            std::iter::once((ar, false)).chain(aware.then_some((ar, true)))
        })
        .collect();
    for (run, &(arity, aware)) in variants.iter().enumerate() {
        check_stop()?;
        // The file size here (a bound); the coordinator's S for the table below.
        let s_over_b = compressed as f64 * 8.0 / rate_bps as f64;
        eprintln!(
            "kd-bench: arity {arity}: {} agents, ideal {:.1} s",
            a.nodes,
            s_over_b * ideal_ratio(arity, a.nodes)
        );
        let extra = if aware {
            rack_args(a.nodes, a.racks)
        } else {
            Vec::new()
        };
        let mut row = run_one(&mut lab, &env, &a, arity, run, s_over_b, rate_bps, &extra)?;
        if aware {
            row.arity = format!("{}/racks", row.arity);
        }
        eprintln!(
            "kd-bench: arity {}: {}",
            row.arity,
            row_summary(&row, "verified")
        );
        rows.push(row);
    }
    if a.tcp_chain {
        check_stop()?;
        if !a.kill.is_empty() {
            eprintln!("kd-bench: tcp-chain: --kill does not apply (every hop runs)");
        }
        let s_over_b = compressed as f64 * 8.0 / rate_bps as f64;
        let row = run_tcp_chain(&mut lab, &env, &a, variants.len(), s_over_b, rate_bps)?;
        eprintln!(
            "kd-bench: tcp-chain: {}",
            row_summary(&row, "every hop got the whole stream")
        );
        rows.push(row);
    }
    // Use the compressed size the coordinator reported (chunks only) for S.
    let s_final = std::fs::read_to_string(lab.tmp.join("run0").join("coord.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Outcome>(&t).ok())
        .map(|o| o.compressed_bytes)
        .unwrap_or(compressed);
    let s_over_b = s_final as f64 * 8.0 / rate_bps as f64;
    for r in &mut rows {
        r.ratio = r.seconds / s_over_b;
        r.survivor_ratio = r.survivor_seconds / s_over_b;
    }
    let mut text = table(&rows, s_over_b);
    if !a.kill.is_empty() {
        text.push('\n');
        text.push_str(&kill_table(&rows, s_over_b));
    }
    text.push('\n');
    text.push_str(&shape_table(&rows, s_over_b));
    let res = Results {
        nodes: a.nodes,
        rate: rate_label(rate_bps),
        rate_bps,
        size_mib: a.size_mib,
        chunk_size: a.chunk_size.clone(),
        sink: a.sink.clone(),
        compressed_bytes: s_final,
        s_over_b_seconds: s_over_b,
        tbf,
        qdisc: a.qdisc.clone(),
        tcp_probe_bps: probe,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        agent_args: a.agent_arg.clone(),
        rows,
    };
    if a.json {
        eprint!("{text}");
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        print!("{text}");
        println!(
            "S = {} bytes, S/B = {:.2} s; cpu/GiB: agent user+sys CPU seconds per GiB received; thread: the busiest single thread of any agent, the same per GiB; agent cores: sum of agents' CPU / transfer time; busy, softirq: share of all {} cores of the machine over the run.",
            s_final, s_over_b, res.cores
        );
    }
    if let Some(p) = &a.plot {
        let pts: Vec<plot::Point> = res
            .rows
            .iter()
            .map(|r| plot::Point {
                label: r.arity.clone(),
                fan_out: r.fan_out as f64,
                seconds: r.seconds,
                ideal: r.ideal_ratio * s_over_b,
            })
            .collect();
        let title = format!(
            "kd broadcast of {} MiB to {} nodes, {} links",
            a.size_mib,
            a.nodes,
            rate_label(rate_bps)
        );
        std::fs::write(p, plot::svg(&title, &pts))
            .with_context(|| format!("write {}", p.display()))?;
    }
    if res.rows.iter().any(|r| !r.verified) {
        bail!("some copies were not verified");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn racks_interleave_node_names() {
        assert_eq!(
            rack_args(5, 2),
            ["--rack", "r0=node1,node3,node5", "--rack", "r1=node2,node4"]
        );
        assert_eq!(rack_of(1, 1), 0);
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("1.5Mbit").unwrap(), 1_500_000);
        assert_eq!(parse_rate("10mbps").unwrap(), 80_000_000);
        assert_eq!(parse_rate("20000bit").unwrap(), 20_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("100furlongs").is_err());
        assert!(parse_rate("1bit").is_err());
        assert_eq!(rate_label(100_000_000), "100mbit");
        assert_eq!(rate_label(1_500_000), "1500kbit");
    }

    #[test]
    fn arities_and_ideals() {
        let v = parse_arities("1,2, chain,star,4").unwrap();
        assert_eq!(
            v,
            vec![
                Arity::Chain,
                Arity::Kary(2),
                Arity::Chain,
                Arity::Star,
                Arity::Kary(4)
            ]
        );
        assert!(parse_arities("0").is_err());
        assert!(parse_arities("").is_err());
        assert_eq!(ideal_ratio(Arity::Chain, 16), 1.0);
        assert_eq!(ideal_ratio(Arity::Kary(3), 16), 3.0);
        assert_eq!(ideal_ratio(Arity::Star, 16), 16.0);
        assert_eq!(ideal_ratio(Arity::Kary(32), 16), 16.0);
    }

    #[test]
    fn shapers() {
        let t = tbf_params(100_000_000, 2, 50);
        let fifo = shaper_commands("eth0", t, false);
        assert_eq!(
            fifo,
            vec![
                "qdisc replace dev eth0 root tbf rate 100000000bit burst 25000 limit 625000"
                    .split(' ')
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            ]
        );
        let sparse = shaper_commands("p3", t, true);
        let text: Vec<String> = sparse.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            text[0],
            "qdisc replace dev p3 root handle 1: htb default 20"
        );
        // Every class at the link's rate, never above it.
        for c in text.iter().filter(|c| c.starts_with("class")) {
            assert!(
                c.contains("rate 100000000bit ceil 100000000bit burst 25000"),
                "{c}"
            );
        }
        // Both leaves hold the same byte queue as the tbf.
        assert_eq!(
            text.iter()
                .filter(|c| c.ends_with("bfifo limit 625000"))
                .count(),
            2
        );
        // IPv4 total length < 256 (high byte zero) goes to the first class.
        assert!(text
            .last()
            .is_some_and(|c| c.contains("u32 match u16 0x0000 0xff00 at 2 flowid 1:10")));
    }

    #[test]
    fn tbf_sizes() {
        let t = tbf_params(100_000_000, 2, 50);
        assert_eq!(t.burst, 25_000);
        assert_eq!(t.limit, 625_000);
        // Slow links still get room for a GSO batch.
        let t = tbf_params(1_000_000, 2, 50);
        assert_eq!(t.burst, 16 * FRAME);
        assert_eq!(t.limit, 32 * FRAME);
        let t = tbf_params(50_000_000, 2, 50);
        assert_eq!(t.burst, 16 * FRAME);
    }

    #[test]
    fn addresses_stay_in_the_test_subnet() {
        assert_eq!(host_addr(0), Ipv4Addr::new(10, 199, 0, 1));
        assert_eq!(host_addr(16), Ipv4Addr::new(10, 199, 0, 17));
        assert_eq!(host_addr(300), Ipv4Addr::new(10, 199, 1, 45));
        let all: std::collections::HashSet<_> = (0..1001).map(host_addr).collect();
        assert_eq!(all.len(), 1001);
    }

    #[test]
    fn proc_stat_and_busy() {
        let a = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n").unwrap();
        assert_eq!(a.total, 1000);
        assert_eq!(a.idle, 850);
        let b = parse_proc_stat("cpu  400 0 150 1000 50 0 100 0 0 0\n").unwrap();
        let (busy, soft) = cpu_busy(a, b);
        assert!((busy - (1.0 - 200.0 / 700.0)).abs() < 1e-9);
        assert!((soft - 100.0 / 700.0).abs() < 1e-9);
        assert_eq!(cpu_busy(a, a), (0.0, 0.0));
        assert!(parse_proc_stat("intr 1 2 3").is_none());
    }

    #[test]
    fn tc_stats() {
        let j = r#"[{"kind":"tbf","drops":3,"packets":100},{"kind":"noqueue"},{"kind":"tbf","drops":1,"packets":50}]"#;
        assert_eq!(parse_tc_stats(j), (4, 150));
        assert_eq!(parse_tc_stats("not json"), (0, 0));
    }

    #[test]
    fn stale_only_for_dead_owners() {
        let list = "kdb-100-br (id: 3)\nkdb-100-0\nkdb-200-1 (id: 1)\nother-1\nkdb-x-1\n";
        let v = stale_namespaces(list, |p| p == 200);
        assert_eq!(v, vec!["kdb-100-br".to_string(), "kdb-100-0".to_string()]);
    }

    #[test]
    fn kill_specs_parse() {
        assert_eq!(
            parse_kill("5@0.3").unwrap(),
            Kill {
                node: 5,
                fraction: 0.3
            }
        );
        assert_eq!(parse_kill(" 11 @ .5 ").unwrap().node, 11);
        for bad in [
            "5", "@0.3", "x@0.3", "5@", "5@x", "0@0.3", "-1@0.3", "5@0", "5@1", "5@1.5", "5@-0.1",
            "5@NaN", "5@inf",
        ] {
            assert!(parse_kill(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kill_bounds_and_duplicates() {
        let k = |node, fraction| Kill { node, fraction };
        assert!(check_kills(&[], 16).is_ok());
        assert!(check_kills(&[k(5, 0.3), k(11, 0.3)], 16).is_ok());
        assert!(check_kills(&[k(16, 0.9)], 16).is_ok());
        assert!(check_kills(&[k(17, 0.3)], 16).is_err());
        assert!(check_kills(&[k(0, 0.3)], 16).is_err());
        assert!(check_kills(&[k(5, 0.3), k(5, 0.6)], 16).is_err());
        assert!(check_kills(&[k(5, 1.0)], 16).is_err());
        // Someone must survive.
        assert!(check_kills(&[k(1, 0.3), k(2, 0.3)], 2).is_err());
        assert!(check_kills(&[k(1, 0.3)], 2).is_ok());
    }

    /// A verified chain run of 16 nodes at 100 Mbit/s.
    fn sample_row(seconds: f64, ratio: f64) -> Row {
        Row {
            nodes: 16,
            rate_bps: 100_000_000,
            arity: "chain".into(),
            fan_out: 1,
            seconds,
            wall_seconds: seconds + 2.0,
            ratio,
            ideal_ratio: 1.0,
            cpu_s_per_gib_mean: 2.0,
            cpu_s_per_gib_max: 3.0,
            agent_cores: 0.5,
            coord_cpu_seconds: 1.0,
            thread_s_per_gib_max: 2.0,
            agent_user_s_per_gib: 1.0,
            agent_sys_s_per_gib: 1.0,
            machine_busy: 0.6,
            machine_softirq: 0.1,
            tbf_drops: 3,
            tbf_packets: 1000,
            verified: true,
            survivor_seconds: seconds,
            survivor_ratio: ratio,
            median_seconds: seconds,
            ..Default::default()
        }
    }

    #[test]
    fn kill_table_shows_survivors_and_reasons() {
        let r = Row {
            survivor_seconds: 24.0,
            survivor_ratio: 1.2,
            killed: vec![Killed {
                node: "node5".into(),
                fraction: 0.3,
                at_seconds: Some(6.45),
                ok: false,
                reason: Some("silent for 6 s".into()),
            }],
            ..sample_row(30.0, 1.4)
        };
        let t = kill_table(&[r], 20.0);
        assert_eq!(t.lines().count(), 3);
        assert!(t.contains("1.200"), "{t}");
        assert!(t.contains("node5 at 6.45 s: silent for 6 s"), "{t}");
    }

    #[test]
    fn mean_and_max() {
        assert_eq!(mean_max(&[1.0, 3.0]), (2.0, 3.0));
        assert!(mean_max(&[]).0.is_nan());
    }

    #[test]
    fn random_image_has_the_size_and_no_repeated_words() {
        let dir = std::env::temp_dir().join(format!("kdb-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r");
        write_random(&p, 3 * MIB + 5).unwrap();
        let data = std::fs::read(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(data.len() as u64, 3 * MIB + 5);
        // Incompressible in practice: 100,000 8-byte words, all distinct.
        let words: std::collections::HashSet<&[u8]> = data.chunks_exact(8).take(100_000).collect();
        assert_eq!(words.len(), 100_000);
    }

    #[test]
    fn table_has_a_line_per_row() {
        let r = sample_row(23.0, 1.07);
        let t = table(&[r.clone(), r], 21.5);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("chain"));
        assert!(t.contains("1.070"));
    }

    #[test]
    fn shape_table_shows_median_probe_and_tree() {
        let r = Row {
            arity: "auto".into(),
            median_seconds: 21.5,
            probe_seconds: 0.42,
            shape: "auto: chain of 15 at 11.8 MB/s, chain of 1 at 3.0 MB/s".into(),
            ..sample_row(86.0, 4.0)
        };
        let t = shape_table(&[r], 21.5);
        assert_eq!(t.lines().count(), 2);
        assert!(t.contains(" 1.000    0.42  auto: chain of 15"), "{t}");
        assert!(median(&mut []).is_nan());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn slow_specs_parse() {
        assert_eq!(
            parse_slow("2,5-6=25mbit").unwrap(),
            Slow {
                nodes: vec![2, 5, 6],
                rate: "25mbit".into()
            }
        );
        let all = parse_slow("all=4M").unwrap();
        assert!(all.covers(1) && all.covers(999));
        for bad in ["5", "x=1", "0=1M", "3-2=1M", "4="] {
            assert!(parse_slow(bad).is_err(), "{bad}");
        }
    }
}
