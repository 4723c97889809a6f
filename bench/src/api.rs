//! `kd-bench api`: latency and memory of the kd daemon's HTTP API at scale. A temp state
//! directory gets one cluster of `--nodes` nodes and `--deployments` finished deployments
//! (written directly with `kd_coord::db::Db`), then `kd-coord --state DIR serve` runs as a child
//! and each endpoint is called `--requests` times in sequence (after 5 warm-up calls) over its
//! Unix socket with `kd_coord::client::Client` (one connection per request, like the CLI).
//! Printed as a table: p50, p95, max latency and body size per endpoint, the daemon's VmRSS
//! after start and after the requests, and the database size. No root needed, no network.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper::Method;
use kd_coord::client::Client;
use kd_coord::config::ClusterConfig;
use kd_coord::db::Db;

/// Options of `kd-bench api`.
#[derive(clap::Args)]
pub(crate) struct ApiArgs {
    /// Nodes of the cluster.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Finished one-node deployments in the history (1 % of them by a second user).
    #[arg(long, default_value_t = 100_000)]
    deployments: usize,
    /// Timed requests per endpoint (after 5 warm-up ones).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Time limit per endpoint in seconds: fewer requests are made if it is reached.
    #[arg(long, default_value_t = 120)]
    max_secs: u64,
}

const WARMUP: usize = 5;
/// The user of 99 % of the history.
const USER: &str = "bench";
/// The user of the other 1 %, written first (the oldest rows): `?user=` must find them.
const RARE_USER: &str = "rare";
const SOCKET_WAIT: Duration = Duration::from_secs(30);

/// The daemon child: stopped by its PID (SIGTERM, then SIGKILL after 5 s) when dropped, also on
/// errors.
pub(crate) struct Daemon {
    pub(crate) child: Child,
}

impl Daemon {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The nodes of a [`cluster_yaml`]: how many, the first byte of their IPv4 addresses
/// (`NET.a.b.c`), the first three bytes of their MACs, and how their PXE profiles are named.
pub(crate) struct Nodes<'a> {
    pub(crate) n: usize,
    pub(crate) net: u8,
    pub(crate) mac: &'a str,
    pub(crate) profile_naming: &'a str,
}

/// A cluster `name` of nodes node1..nodeN that `ClusterConfig::parse` accepts; commands do
/// nothing (`true`); its PXE files under `pxe`, its coordinator on 127.0.0.1:`port`.
pub(crate) fn cluster_yaml(name: &str, nodes: &Nodes, pxe: &Path, port: u16) -> String {
    let mut y = String::with_capacity(nodes.n * 72 + 2048);
    y += &format!("cluster: {name}\nnodes:\n");
    for i in 1..=nodes.n {
        // NET.a.b.c with c in 1..=250: no .0 or .255 addresses.
        let (a, b, c) = (i / 62_500 + 1, (i / 250) % 250, i % 250 + 1);
        y += &format!(
            "  - {{ name: node{i}, address: {}.{a}.{b}.{c}, mac: \"{}:{:02x}:{:02x}:{:02x}\" }}\n",
            nodes.net,
            nodes.mac,
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    y += &format!(
        "pxe:\n  tftp_root: {tftp}\n  http_root: {http}\n  http_base_url: http://127.0.0.1:9/\n  \
         profile_naming: {naming}\n  method: ipxe\n\
         commands:\n  reboot:\n    soft: true HOSTNAME\n    hard: true HOSTNAME\n    \
         very_hard: true HOSTNAME\n  power_on: {{ hard: true HOSTNAME }}\n  \
         power_off: {{ hard: true HOSTNAME }}\n  power_status: true HOSTNAME\n\
         coordinator: {{ address: 127.0.0.1, port: {port} }}\n\
         disk:\n  block_device: /dev/kd-no-such-disk\n  layout:\n    device: /dev/kd-no-such-disk\n    label: gpt\n    partitions:\n\
         \x20     - {{ number: 1, size: 1MiB, role: bios_grub }}\n\
         \x20     - {{ number: 2, size: 8MiB, role: swap, fs: swap }}\n\
         \x20     - {{ number: 3, size: 80MiB, role: deploy, fs: ext4 }}\n\
         \x20     - {{ number: 4, size: rest, role: tmp, fs: ext4 }}\n",
        tftp = pxe.join("tftp").display(),
        http = pxe.join("http").display(),
        naming = nodes.profile_naming,
    );
    y
}

/// VmRSS of a process in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS")
}

/// The number of a `KEY:  N [kB]` field of `/proc/PID/status`: KiB for a size (`VmRSS`,
/// `RssAnon`, ...), a count otherwise (`Threads`).
pub(crate) fn status_field(pid: u32, key: &str) -> Result<u64> {
    let p = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    let line = s
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
        .with_context(|| format!("no {key} in {p}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad line in {p}: {line}"))
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

pub(crate) fn kd_coord_bin() -> Result<PathBuf> {
    sibling_bin("kd-coord")
}

/// kd's binary `name`, next to this one (the same cargo profile).
pub(crate) fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    let bin = dir.join(name);
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build -p {name} --bins, with the same profile)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Starts `kd-coord --state STATE serve` (output to `log`) and waits until its socket accepts
/// connections (at most [`SOCKET_WAIT`]); the child is stopped when the guard is dropped.
pub(crate) async fn start_daemon(bin: &Path, state: &Path, log: &Path) -> Result<Daemon> {
    let logf = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let t = Instant::now();
    let child = Command::new(bin)
        .arg("--state")
        .arg(state)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().context("log file")?)
        .stderr(logf)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut daemon = Daemon { child };
    let sock = state.join(kd_coord::service::SOCKET);
    loop {
        if tokio::net::UnixStream::connect(&sock).await.is_ok() {
            return Ok(daemon);
        }
        if let Some(st) = daemon.child.try_wait().context("waiting for kd-coord")? {
            bail!("kd-coord serve exited ({st}):\n{}", log_tail(log));
        }
        if t.elapsed() > SOCKET_WAIT {
            bail!(
                "{} accepts no connection after {} s:\n{}",
                sock.display(),
                SOCKET_WAIT.as_secs(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last lines of the daemon's log, for error messages.
pub(crate) fn log_tail(log: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

struct Row {
    name: &'static str,
    path: String,
    n: usize,
    p50: f64,
    p95: f64,
    max: f64,
    bytes: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn run(a: ApiArgs) -> Result<()> {
    if a.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(a))
}

async fn run_async(a: ApiArgs) -> Result<()> {
    let bin = kd_coord_bin()?;
    let tmp = tempfile::Builder::new()
        .prefix("kd-bench-api.")
        .tempdir()
        .context("temp directory")?;
    let state = tmp.path().join("state");
    let pxe = tmp.path().join("pxe");
    for d in ["tftp", "http"] {
        std::fs::create_dir_all(pxe.join(d))
            .with_context(|| format!("creating {}", pxe.join(d).display()))?;
    }
    kd_coord::state::create_dir(&state)?;
    let db_path = state.join("kd.db");

    // 1. The database, written directly.
    // The port agents would reach (the daemon binds it only for a deployment; none runs here).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("finding a free UDP port")?
        .port();
    let nodes = Nodes {
        n: a.nodes,
        net: 10,
        mac: "52:54:00",
        profile_naming: "mac",
    };
    let yaml = cluster_yaml("bench", &nodes, &pxe, port);
    let t = Instant::now();
    let cfg = ClusterConfig::parse(&yaml).context("the bench's cluster YAML")?;
    let parse_secs = t.elapsed().as_secs_f64();
    let names: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    let mut db = Db::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
    let t = Instant::now();
    db.put_cluster(&cfg.cluster, &yaml, &names)
        .context("put_cluster")?;
    let cluster_secs = t.elapsed().as_secs_f64();
    let rare = a.deployments / 100;
    let t = Instant::now();
    db.bulk_history(RARE_USER, &names, rare)
        .context("bulk_history")?;
    db.bulk_history(USER, &names, a.deployments - rare)
        .context("bulk_history")?;
    let history_secs = t.elapsed().as_secs_f64();
    drop(db);
    let db_bytes = file_size(&db_path) + file_size(&state.join("kd.db-wal"));
    eprintln!(
        "kd-bench api: YAML of {} nodes ({} KiB) parsed in {parse_secs:.3} s, put_cluster {cluster_secs:.3} s, \
         bulk_history of {} deployments {history_secs:.3} s",
        a.nodes,
        yaml.len() / 1024,
        a.deployments
    );

    // 2. The daemon.
    let log = tmp.path().join("daemon.log");
    let t = Instant::now();
    let daemon = start_daemon(&bin, &state, &log).await?;
    let start_secs = t.elapsed().as_secs_f64();
    let pid = daemon.pid();
    let rss_start = rss_kib(pid)?;

    // 3. The endpoints.
    let client = Client::new(&state);
    let list = client
        .call(Method::GET, "/api/v1/deployments?limit=1", None)
        .await
        .context("listing deployments")?;
    let newest = list["deployments"][0]["id"].as_i64().unwrap_or(1);
    // One deployment from the middle of the history.
    let id = (newest / 2).max(1);
    let endpoints: [(&str, String); 6] = [
        ("nodes", "/api/v1/nodes".into()),
        ("deployments", "/api/v1/deployments?limit=100".into()),
        (
            "deployments by user",
            format!("/api/v1/deployments?limit=100&user={RARE_USER}"),
        ),
        ("one deployment", format!("/api/v1/deployments/{id}")),
        ("stats", "/api/v1/stats".into()),
        ("metrics", "/metrics".into()),
    ];
    let limit = Duration::from_secs(a.max_secs);
    let mut rows = Vec::new();
    for (name, path) in endpoints {
        let metrics = path == "/metrics";
        let call = || async {
            if metrics {
                client.text(&path).await.map(|_| ())
            } else {
                client.call(Method::GET, &path, None).await.map(|_| ())
            }
        };
        let begun = Instant::now();
        for _ in 0..WARMUP {
            call().await.with_context(|| format!("GET {path}"))?;
        }
        let mut ms = Vec::with_capacity(a.requests);
        for _ in 0..a.requests {
            if begun.elapsed() > limit {
                eprintln!(
                    "kd-bench api: {path}: time limit of {} s reached after {} requests",
                    a.max_secs,
                    ms.len()
                );
                break;
            }
            let t = Instant::now();
            call().await.with_context(|| format!("GET {path}"))?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // The body as sent (not re-serialized).
        let bytes = client
            .text(&path)
            .await
            .with_context(|| format!("GET {path}"))?
            .len();
        ms.sort_by(f64::total_cmp);
        rows.push(Row {
            name,
            path,
            n: ms.len(),
            p50: percentile(&ms, 0.5),
            p95: percentile(&ms, 0.95),
            max: ms.last().copied().unwrap_or(f64::NAN),
            bytes,
        });
    }
    let rss_end = rss_kib(pid)?;
    drop(daemon);
    let db_bytes_end = file_size(&db_path) + file_size(&state.join("kd.db-wal"));

    // 4. The table.
    println!(
        "kd-bench api: {} nodes, {} deployments ({} by user {RARE_USER}, the oldest), \
         {} requests per endpoint after {WARMUP} warm-up, one connection per request",
        a.nodes, a.deployments, rare, a.requests
    );
    println!(
        "setup: put_cluster {cluster_secs:.2} s, bulk_history {history_secs:.2} s, \
         daemon up in {start_secs:.2} s"
    );
    println!("| endpoint | path | n | p50 ms | p95 ms | max ms | bytes |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | `{}` | {} | {:.2} | {:.2} | {:.2} | {} |",
            r.name, r.path, r.n, r.p50, r.p95, r.max, r.bytes
        );
    }
    println!(
        "daemon VmRSS: {:.1} MiB after start, {:.1} MiB after the requests; \
         kd.db (+wal): {:.1} MiB after setup, {:.1} MiB at the end",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        db_bytes as f64 / 1048576.0,
        db_bytes_end as f64 / 1048576.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bench_cluster_parses_with_its_addresses_and_macs() {
        let nodes = Nodes {
            n: 300,
            net: 127,
            mac: "52:54:01",
            profile_naming: "hostname",
        };
        let y = cluster_yaml("agents", &nodes, Path::new("/nonexistent"), 9);
        let cfg = ClusterConfig::parse(&y).unwrap();
        assert_eq!(cfg.nodes.len(), 300);
        assert!(y.starts_with("cluster: agents\n"), "{y}");
        assert!(
            y.contains("name: node251, address: 127.1.1.2, mac: \"52:54:01:00:00:fb\""),
            "{y}"
        );
        assert!(y.contains("profile_naming: hostname\n"), "{y}");
    }
}
