//! `kd-bench agents`: the kd daemon's memory with N simulated agents connected. A temp state
//! directory, `kd-coord --state DIR serve` as a child (stopped by its PID by a guard, also on
//! errors), a cluster of `--nodes` nodes added through the API (addresses 127.a.b.c, PXE roots in
//! the temp directory, reboot commands `true HOSTNAME`), a small tar environment and one
//! deployment of every node. The bench then plays the agents in its own process: for each node
//! it reads the deploy PXE profile the daemon wrote (`kd.coord kd.pin kd.node kd.token`),
//! connects over QUIC on loopback (`--concurrency` handshakes at a time), says Hello as the real
//! agent does and waits for the Welcome; each agent keeps its connection, answers `Prepare`
//! with a successful `StepEnd{Prepare}` (no disk is touched) and ignores everything else.
//! VmRSS of the daemon (and of the bench) is read before the deployment, with every agent
//! welcomed, after every Prepare was answered, after the cancel and after the agents are gone;
//! `--rounds R` repeats the deployment R times (does the memory of one come back for the next?).
//! No root, no disks, no PXE boot; only loopback traffic.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hyper::Method;
use kd_coord::client::Client;
use kd_coord::config::ClusterConfig;
use kd_net::wire;
use kd_proto::msg::{AgentStep, Hello, Inventory, StepEnd, ToAgent, ToCoord};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::api::{self, kd_coord_bin, log_tail, rss_kib, start_daemon, status_field, Nodes};

/// Options of `kd-bench agents`.
#[derive(clap::Args)]
pub(crate) struct AgentsArgs {
    /// Nodes of the cluster, one simulated agent each.
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Agents connecting (QUIC handshake, Hello, Welcome) at the same time.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// UDP sockets (quinn client endpoints) the simulated agents share.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Seconds to wait for every agent to be welcomed (from the deployment's creation).
    #[arg(long, default_value_t = 300)]
    welcome_secs: u64,
    /// Seconds to wait for the daemon to send Prepare to every welcomed agent.
    #[arg(long, default_value_t = 120)]
    prepare_secs: u64,
    /// Deployments of every node one after the other (each cancelled once all its agents are
    /// in): whether the memory of one comes back for the next.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// How long one agent's handshake + Hello + Welcome may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per agent (a refused or cut attempt is tried again, as the real agent does).
const JOIN_ATTEMPTS: u32 = 3;
/// How long the cancelled deployment may take to end.
const END_WAIT: Duration = Duration::from_secs(120);
/// How long the agents' connections may take to close after the end.
const GONE_WAIT: Duration = Duration::from_secs(30);
/// Pause between two scans for profiles and between two progress checks.
const POLL: Duration = Duration::from_millis(200);
/// Errors printed (the others only counted).
const MAX_PRINTED_ERRORS: usize = 5;

/// What the simulated agents did, counted.
#[derive(Default)]
struct Stats {
    welcomed: AtomicUsize,
    /// Welcomed agents whose control stream has ended since.
    ended: AtomicUsize,
    prepared: AtomicUsize,
    /// Other messages received after the Welcome, by kind (Plan, Abort, ...).
    other_msgs: std::sync::Mutex<BTreeMap<&'static str, usize>>,
    failed: AtomicUsize,
    retries: AtomicUsize,
    /// Why the first few attempts were tried again.
    retry_reasons: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    fn connected(&self) -> usize {
        self.welcomed
            .load(Ordering::Relaxed)
            .saturating_sub(self.ended.load(Ordering::Relaxed))
    }
}

/// What a deploy PXE profile gives the agent on its kernel command line.
struct Profile {
    coord: SocketAddr,
    pin: [u8; 32],
    node: String,
    token: String,
}

/// Reads `path` if it is a deploy profile (it names a token); `None` if it is absent or not one.
fn read_profile(path: &Path) -> Result<Option<Profile>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kv = BTreeMap::new();
    for w in text.split_whitespace() {
        if let Some((k, v)) = w.split_once('=') {
            if k.starts_with("kd.") {
                kv.insert(k, v);
            }
        }
    }
    let (Some(coord), Some(pin), Some(node), Some(token)) = (
        kv.get("kd.coord"),
        kv.get("kd.pin"),
        kv.get("kd.node"),
        kv.get("kd.token"),
    ) else {
        return Ok(None);
    };
    Ok(Some(Profile {
        coord: coord
            .parse()
            .with_context(|| format!("{}: bad kd.coord {coord:?}", path.display()))?,
        pin: kd_net::parse_sha256_hex(pin)
            .with_context(|| format!("{}: bad kd.pin {pin:?}", path.display()))?,
        node: node.to_string(),
        token: token.to_string(),
    }))
}

/// A cluster of `n` nodes node1..nodeN on 127.a.b.c that `ClusterConfig::parse` accepts;
/// commands succeed at once; timeouts long enough for every agent to connect.
fn cluster_yaml(n: usize, pxe: &Path, port: u16, check_port: u16) -> String {
    let nodes = Nodes {
        n,
        net: 127,
        mac: "52:54:01",
        profile_naming: "hostname",
    };
    let mut y = api::cluster_yaml("agents", &nodes, pxe, port);
    y += &format!(
        "workflow:\n  reboot_window: 50\n  command_timeout: 60\n  probe_delay: 1\n  probe_interval: 5\n  \
         broadcast_wait: 600\n  set_deployment_env: {{ timeout: 600, retries: 0 }}\n  \
         prepare: {{ timeout: 600, retries: 0 }}\n  broadcast: {{ timeout: 900, retries: 0 }}\n  \
         finish: {{ timeout: 600, retries: 0 }}\n  boot_new_env: {{ timeout: 600, retries: 0 }}\n\
         check_port: {check_port}\n",
    );
    y
}

/// One simulated agent: join (bounded attempts), then answer Prepare and ignore the rest until
/// the control stream ends or `deadline`.
async fn agent(
    ep: quinn::Endpoint,
    p: Profile,
    sem: Arc<Semaphore>,
    stats: Arc<Stats>,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let permit = sem.acquire_owned().await.context("semaphore closed")?;
    let hello = Hello {
        version: kd_proto::PROTOCOL_VERSION,
        node: p.node.clone(),
        token: p.token.clone(),
        data_port: ep.local_addr().map(|a| a.port()).unwrap_or(0),
        inventory: Inventory {
            ram_bytes: 1 << 30,
            cpus: 1,
            agent_version: "kd-bench".into(),
            ..Default::default()
        },
    };
    let client = kd_net::tls::agent_to_coordinator(p.pin)
        .map_err(|e| anyhow!("client TLS configuration: {e}"))?;
    let mut attempt = 0;
    let (conn, mut send, mut recv) = loop {
        attempt += 1;
        let r: Result<_> = async {
            let connecting = ep
                .connect_with(client.clone(), p.coord, "kd-coord")
                .with_context(|| format!("connecting to {}", p.coord))?;
            let conn = tokio::time::timeout(JOIN_TIMEOUT, connecting)
                .await
                .context("handshake timed out")?
                .context("handshake")?;
            let (mut send, mut recv) = conn.open_bi().await.context("opening the stream")?;
            wire::send(&mut send, &ToCoord::Hello(hello.clone()))
                .await
                .context("sending the Hello")?;
            match wire::recv::<ToAgent>(&mut recv, JOIN_TIMEOUT, "the Welcome")
                .await
                .context("waiting for the Welcome")?
            {
                ToAgent::Welcome(_) => Ok((conn, send, recv)),
                other => {
                    conn.close(kd_net::close::DONE.into(), b"refused");
                    bail!("answer to the Hello: {other:?}")
                }
            }
        }
        .await;
        match r {
            Ok(j) => break j,
            Err(e) if attempt >= JOIN_ATTEMPTS => {
                return Err(e.context(format!("{}: {attempt} attempts", p.node)))
            }
            Err(e) => {
                stats.retries.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut r) = stats.retry_reasons.lock() {
                    if r.len() < MAX_PRINTED_ERRORS {
                        r.push(format!("{}: attempt {attempt}: {e:#}", p.node));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    stats.welcomed.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    loop {
        match tokio::time::timeout_at(deadline, wire::recv_opt::<ToAgent>(&mut recv)).await {
            Ok(Ok(Some(ToAgent::Prepare(_job)))) => {
                // What the real agent answers after a successful kd-disk preparation.
                let end = StepEnd {
                    step: AgentStep::Prepare,
                    millis: 0,
                    error: None,
                };
                if wire::send(&mut send, &ToCoord::StepEnd(end)).await.is_err() {
                    break;
                }
                stats.prepared.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(Some(m))) => {
                if let Ok(mut k) = stats.other_msgs.lock() {
                    *k.entry(kind(&m)).or_default() += 1;
                }
            }
            // The stream ended or broke, or the bench is over.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
        }
    }
    stats.ended.fetch_add(1, Ordering::Relaxed);
    conn.close(kd_net::close::DONE.into(), b"bench over");
    Ok(())
}

/// The variant of a message, for the counts.
fn kind(m: &ToAgent) -> &'static str {
    match m {
        ToAgent::Welcome(_) => "Welcome",
        ToAgent::Plan(_) => "Plan",
        ToAgent::Reparent(_) => "Reparent",
        ToAgent::Adopt(_) => "Adopt",
        ToAgent::ChildGone(_) => "ChildGone",
        ToAgent::Finish => "Finish",
        ToAgent::Prepare(_) => "Prepare",
        ToAgent::Probe(_) => "Probe",
        ToAgent::Reboot { .. } => "Reboot",
        ToAgent::Abort { .. } => "Abort",
        ToAgent::Error(_) => "Error",
    }
}

struct Row {
    round: usize,
    phase: &'static str,
    agents: usize,
    daemon_kib: u64,
    daemon_anon_kib: u64,
    threads: u64,
    bench_kib: u64,
    secs: f64,
}

/// Waits (polling, at most `limit`) until `done()`; whether it became true.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

pub(crate) fn run(a: AgentsArgs) -> Result<()> {
    if a.nodes == 0 || a.concurrency == 0 || a.endpoints == 0 || a.rounds == 0 {
        bail!("--nodes, --concurrency, --endpoints and --rounds must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(a))
}

async fn run_async(a: AgentsArgs) -> Result<()> {
    let bin = kd_coord_bin()?;
    let tmp = tempfile::Builder::new()
        .prefix("kd-bench-agents.")
        .tempdir()
        .context("temp directory")?;
    let state = tmp.path().join("state");
    let pxe = tmp.path().join("pxe");
    for d in ["tftp", "http/nodes", "http/boot"] {
        std::fs::create_dir_all(pxe.join(d))
            .with_context(|| format!("creating {}", pxe.join(d).display()))?;
    }
    for (f, text) in [
        ("http/boot/vmlinuz", "not a kernel\n"),
        ("http/boot/initramfs.img", "not an initrd\n"),
    ] {
        std::fs::write(pxe.join(f), text)
            .with_context(|| format!("writing {}", pxe.join(f).display()))?;
    }
    kd_coord::state::create_dir(&state)?;

    // The environment: a tar of one small file.
    let env_dir = tmp.path().join("env");
    std::fs::create_dir_all(&env_dir).context("creating the environment directory")?;
    let image = env_dir.join("image.tar");
    {
        let f = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        let mut b = tar::Builder::new(f);
        let data = b"kd-bench agents\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, "etc/kd-bench", &data[..])
            .context("writing the image tar")?;
        b.into_inner()
            .context("finishing the image tar")?
            .sync_all()
            .context("syncing the image tar")?;
    }
    let env_yaml = format!(
        "name: kdbench\nversion: 1\ndescription: kd-bench agents\n\
         image:\n  file: {}\n  kind: tar\n\
         boot:\n  kernel: /vmlinuz\n  kernel_params: console=ttyS0\n\
         filesystem: ext4\n",
        image.display()
    );

    // The port agents reach (the daemon binds it for the deployment) and a closed TCP port for
    // the daemon's probes.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("finding a free UDP port")?
        .port();
    let check_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("finding a free TCP port")?
        .port();
    let yaml = cluster_yaml(a.nodes, &pxe, port, check_port);
    let cfg = ClusterConfig::parse(&yaml).context("the bench's cluster YAML")?;
    let http_root = pxe.join("http");
    let profiles: Vec<PathBuf> = cfg
        .nodes
        .iter()
        .map(|n| {
            http_root.join(kd_coord::config::profile_file_name(
                cfg.pxe.method,
                cfg.pxe.profile_naming,
                n,
            ))
        })
        .collect();

    // The daemon.
    let log = tmp.path().join("daemon.log");
    let t0 = Instant::now();
    let mut daemon = start_daemon(&bin, &state, &log).await?;
    let pid = daemon.pid();
    let mut rows = Vec::new();
    let mut rec = Recorder {
        pid,
        rows: &mut rows,
    };
    rec.row(0, "daemon started", 0, t0)?;
    let client = Client::new(&state);
    client
        .call(
            Method::POST,
            "/api/v1/clusters",
            Some(&json!({ "yaml": yaml })),
        )
        .await
        .context("adding the cluster")?;
    rec.row(0, "cluster added", 0, t0)?;

    let mut eps = Vec::with_capacity(a.endpoints);
    for _ in 0..a.endpoints {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        eps.push(kd_net::endpoint::bind(addr, None).context("binding a client UDP socket")?);
    }
    let ctx = RoundCtx {
        a: &a,
        client: &client,
        env_yaml: &env_yaml,
        env_dir: &env_dir,
        log: &log,
        profiles: &profiles,
        eps: &eps,
    };
    let mut last_tokens: Vec<Option<String>> = vec![None; a.nodes];
    let mut summaries = Vec::new();
    for round in 1..=a.rounds {
        let r = one_round(&ctx, round, &mut rec, &mut daemon, &mut last_tokens).await;
        match r {
            Ok(s) => summaries.push(s),
            Err(e) => {
                for ep in &eps {
                    ep.close(kd_net::close::DONE.into(), b"bench over");
                }
                return Err(e);
            }
        }
    }
    for ep in &eps {
        ep.close(kd_net::close::DONE.into(), b"bench over");
    }
    drop(daemon);

    // The table.
    println!(
        "kd-bench agents: {} nodes, {} deployment(s) of them in turn, {} handshakes at a time \
         over {} client sockets; daemon PID {pid}",
        a.nodes, a.rounds, a.concurrency, a.endpoints
    );
    for s in &summaries {
        println!("{}", s.line);
        for e in &s.errors {
            println!("  error: {e}");
        }
    }
    println!(
        "| round | phase | agents connected | daemon VmRSS MiB | daemon RssAnon MiB | daemon threads | bench VmRSS MiB | time s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
            r.round,
            r.phase,
            r.agents,
            r.daemon_kib as f64 / 1024.0,
            r.daemon_anon_kib as f64 / 1024.0,
            r.threads,
            r.bench_kib as f64 / 1024.0,
            r.secs
        );
    }
    for round in 1..=a.rounds {
        let find = |p: &str| {
            rows.iter()
                .find(|r| r.round == round && r.phase.starts_with(p))
                .map(|r| r.daemon_kib)
        };
        let welcomed = summaries.get(round - 1).map_or(0, |s| s.welcomed);
        if let (Some(b), Some(w)) = (
            find("deployment created"),
            find("all agents").or(find("agents welcomed")),
        ) {
            if welcomed > 0 {
                println!(
                    "round {round}: daemon {:.1} KiB per welcomed agent \
                     ((VmRSS with agents − before) / {welcomed})",
                    (w as f64 - b as f64) / welcomed as f64
                );
            }
        }
    }
    Ok(())
}

/// Appends rows of measurements.
struct Recorder<'a> {
    pid: u32,
    rows: &'a mut Vec<Row>,
}

impl Recorder<'_> {
    fn row(
        &mut self,
        round: usize,
        phase: &'static str,
        agents: usize,
        since: Instant,
    ) -> Result<()> {
        let me = std::process::id();
        self.rows.push(Row {
            round,
            phase,
            agents,
            daemon_kib: rss_kib(self.pid)?,
            daemon_anon_kib: status_field(self.pid, "RssAnon")?,
            threads: status_field(self.pid, "Threads").unwrap_or(0),
            bench_kib: rss_kib(me)?,
            secs: since.elapsed().as_secs_f64(),
        });
        Ok(())
    }
}

/// What every round shares.
struct RoundCtx<'a> {
    a: &'a AgentsArgs,
    client: &'a Client,
    env_yaml: &'a str,
    env_dir: &'a Path,
    log: &'a Path,
    profiles: &'a [PathBuf],
    eps: &'a [quinn::Endpoint],
}

struct RoundSummary {
    welcomed: usize,
    line: String,
    errors: Vec<String>,
}

/// One deployment of every node: create it, play the agents until all are welcomed and have
/// answered Prepare, cancel it, wait for its end and for the agents' connections to end.
async fn one_round(
    ctx: &RoundCtx<'_>,
    round: usize,
    rec: &mut Recorder<'_>,
    daemon: &mut crate::api::Daemon,
    last_tokens: &mut [Option<String>],
) -> Result<RoundSummary> {
    let a = ctx.a;
    let stats = Arc::new(Stats::default());
    let td = Instant::now();
    let nodes = format!("node[1-{}]", a.nodes);
    let created = ctx
        .client
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&json!({
                "environment": ctx.env_yaml,
                "environment_dir": ctx.env_dir.display().to_string(),
                "nodes": nodes,
                "arity": "chain",
            })),
        )
        .await
        .with_context(|| format!("creating the deployment:\n{}", log_tail(ctx.log)))?;
    let id = created["id"]
        .as_i64()
        .with_context(|| format!("no id in {created}"))?;
    rec.row(round, "deployment created, 0 agents", 0, td)?;

    // The agents.
    let sem = Arc::new(Semaphore::new(a.concurrency));
    let welcome_deadline = td + Duration::from_secs(a.welcome_secs);
    // Agents stop reading at the latest here (they are aborted earlier when the round ends).
    let agent_deadline = tokio::time::Instant::from_std(
        welcome_deadline + Duration::from_secs(a.prepare_secs) + END_WAIT + GONE_WAIT,
    );
    // Dropped (every agent task aborted) on every way out of this function.
    let mut tasks = JoinSet::new();
    let mut pending: Vec<usize> = (0..a.nodes).collect();
    let mut errors: Vec<String> = Vec::new();
    let mut note_error = |stats: &Stats, e: anyhow::Error| {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        if errors.len() < MAX_PRINTED_ERRORS {
            errors.push(format!("{e:#}"));
        }
    };
    let mut spawned = 0usize;
    let all_welcomed = loop {
        // Spawn an agent for every new deploy profile since the last scan (a token of an
        // earlier round is an old profile).
        let mut still = Vec::with_capacity(pending.len());
        for i in pending {
            match read_profile(&ctx.profiles[i]) {
                Ok(Some(p)) if last_tokens[i].as_deref() != Some(p.token.as_str()) => {
                    last_tokens[i] = Some(p.token.clone());
                    let ep = ctx.eps[spawned % ctx.eps.len()].clone();
                    spawned += 1;
                    tasks.spawn(agent(ep, p, sem.clone(), stats.clone(), agent_deadline));
                }
                Ok(_) => still.push(i),
                Err(e) => {
                    note_error(&stats, e);
                }
            }
        }
        pending = still;
        while let Some(r) = tasks.try_join_next() {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => note_error(&stats, e),
                Err(e) => note_error(&stats, anyhow!("agent task: {e}")),
            }
        }
        let welcomed = stats.welcomed.load(Ordering::Relaxed);
        if welcomed == a.nodes {
            break true;
        }
        if welcomed + stats.failed.load(Ordering::Relaxed) >= a.nodes {
            break false;
        }
        if Instant::now() >= welcome_deadline {
            break false;
        }
        if let Some(st) = daemon.child.try_wait().context("waiting for kd-coord")? {
            bail!("kd-coord serve exited ({st}):\n{}", log_tail(ctx.log));
        }
        tokio::time::sleep(POLL).await;
    };
    let welcomed = stats.welcomed.load(Ordering::Relaxed);
    let welcome_secs = td.elapsed().as_secs_f64();
    rec.row(
        round,
        if all_welcomed {
            "all agents welcomed"
        } else {
            "agents welcomed (not all)"
        },
        stats.connected(),
        td,
    )?;
    if !all_welcomed {
        eprintln!(
            "kd-bench agents: round {round}: only {welcomed} of {} agents welcomed after \
             {welcome_secs:.1} s ({} profiles never seen, {} failed)",
            a.nodes,
            pending.len(),
            stats.failed.load(Ordering::Relaxed)
        );
    }
    let prepared_all = wait_until(Duration::from_secs(a.prepare_secs), || {
        stats.prepared.load(Ordering::Relaxed) >= welcomed
    })
    .await;
    rec.row(
        round,
        if prepared_all {
            "all Prepare answered"
        } else {
            "Prepare answered (not all)"
        },
        stats.connected(),
        td,
    )?;
    // A second look a little later: what the daemon keeps once the burst is over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    rec.row(round, "5 s later", stats.connected(), td)?;

    // Cancel, wait for the end, then for the agents' connections to close.
    ctx.client
        .call(
            Method::POST,
            &format!("/api/v1/deployments/{id}/cancel"),
            None,
        )
        .await
        .context("cancelling the deployment")?;
    let tc = Instant::now();
    let mut final_state = String::from("running");
    while tc.elapsed() < END_WAIT {
        let d = ctx
            .client
            .call(Method::GET, &format!("/api/v1/deployments/{id}"), None)
            .await
            .context("reading the deployment")?;
        final_state = d["state"].as_str().unwrap_or("?").to_string();
        if final_state != "running" {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let end_secs = tc.elapsed().as_secs_f64();
    rec.row(round, "deployment ended", stats.connected(), td)?;
    let gone = wait_until(GONE_WAIT, || stats.connected() == 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rec.row(
        round,
        if gone {
            "agents gone (+2 s)"
        } else {
            "agents not all gone"
        },
        stats.connected(),
        td,
    )?;
    tasks.abort_all();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            note_error(&stats, e);
        }
    }
    if let Ok(r) = stats.retry_reasons.lock() {
        errors.extend(r.iter().map(|w| format!("retried: {w}")));
    }
    let line = format!(
        "round {round}: deployment {id}: welcomed {welcomed}/{} in {welcome_secs:.1} s after its \
         creation; Prepare answered {}; other messages {}; join retries {}; failed {}; \
         cancel → {final_state} in {end_secs:.1} s",
        a.nodes,
        stats.prepared.load(Ordering::Relaxed),
        stats
            .other_msgs
            .lock()
            .map(|k| format!("{k:?}"))
            .unwrap_or_default(),
        stats.retries.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    Ok(RoundSummary {
        welcomed,
        line,
        errors,
    })
}
