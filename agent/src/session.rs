//! One agent's life: connect, introduce itself, receive the plan, then receive, verify, relay
//! and write the image until the coordinator says it is over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kd_net::tls::AllowedPeers;
use kd_net::wire::{self, DataIn, Whole};
use kd_proto::codec::MAX_FRAME;
use kd_proto::manifest::{verify_chunk, Manifest};
use kd_proto::msg::Digest;
use kd_proto::msg::{AgentStep, StepEnd};
use kd_proto::msg::{
    DataFrame, DataRequest, DeployImage, DeployJob, ErrorCode, Hello, Job, Kexec, PeerIdentity,
    PeerInfo, Plan, Progress, Report, StepReport, ToAgent, ToCoord, Upstream, Welcome,
};
use kd_proto::piece::{check_piece_hashes, piece_count, piece_ok, piece_range};
use kd_proto::upstream::{Judgement, Policy, Problem, Verdict, Watch};
use tokio::sync::mpsc;

use crate::config::{AgentConfig, Fault, SinkSpec};
use crate::store::{Get, Store};

/// How an agent's run ended.
#[derive(Debug)]
pub struct AgentOutcome {
    /// The report sent to the coordinator.
    pub report: Report,
}

struct Ctx {
    cfg: AgentConfig,
    coord: quinn::Connection,
    /// The endpoint this node connects from (coordinator, parent, repairs).
    endpoint: quinn::Endpoint,
    /// The endpoint children and repairing peers connect to (`data_port`): the same one with
    /// `--net-threads 1`, else one on the relay thread.
    children_ep: quinn::Endpoint,
    to_coord: mpsc::Sender<ToCoord>,
    ctl: mpsc::Receiver<ToAgent>,
    allowed: AllowedPeers,
    deployment: u64,
    identity: PeerIdentity,
    manifest: Arc<Manifest>,
    /// How long a silent upstream is waited for (the plan's, else the agent's own).
    stall: Policy,
    /// Chunks repaired by another node (swarm repair) rather than the coordinator.
    peer_repairs: std::sync::atomic::AtomicU32,
}

/// Runs the agent until the broadcast is over. Errors are what the operator must read.
pub async fn run(cfg: AgentConfig) -> Result<AgentOutcome> {
    // Declared first, dropped last: its runtime outlives the children's endpoint.
    let relay = match cfg.net_threads {
        0 | 1 => None,
        _ => Some(RelayThread::start().context("cannot start the relay thread")?),
    };
    let children_ep =
        kd_net::endpoint::bind_on(cfg.listen, None, relay.as_ref().map(|r| r.handle.clone()))
            .context("cannot open a UDP socket")?;
    let data_port = children_ep.local_addr()?.port();
    // With a relay thread, the upstream side has an endpoint of its own (any port, the same
    // address) on this thread: each endpoint's packets are handled by its own runtime.
    let endpoint = match relay {
        None => children_ep.clone(),
        Some(_) => kd_net::endpoint::bind(std::net::SocketAddr::new(cfg.listen.ip(), 0), None)
            .context("cannot open a UDP socket")?,
    };
    let hello = Hello {
        version: kd_proto::PROTOCOL_VERSION,
        node: cfg.node.clone(),
        token: cfg.token.clone(),
        data_port,
        inventory: crate::inventory::collect(),
    };
    let Joined {
        coord,
        mut send,
        mut recv,
        welcome,
    } = join(&endpoint, &cfg, &hello).await?;
    tracing::info!(
        deployment = welcome.deployment,
        "welcomed by the coordinator"
    );
    // Control plumbing: a writer task and a reader task around the control stream.
    let (to_coord, mut out_rx) = mpsc::channel::<ToCoord>(256);
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if wire::send(&mut send, &m).await.is_err() {
                break;
            }
        }
    });
    let (ctl_tx, mut ctl) = mpsc::channel::<ToAgent>(256);
    // The children this node accepts. An `Adopt` takes effect here, the moment it arrives:
    // the session reads its control messages only between chunks, and a relay whose window
    // waits on a dead child would turn the orphan sent to it away meanwhile.
    let allowed = AllowedPeers::default();
    let child_conns = ChildConns::default();
    {
        let allowed = allowed.clone();
        let child_conns = child_conns.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = wire::recv_opt::<ToAgent>(&mut recv).await {
                match &m {
                    ToAgent::Adopt(p) => allowed.allow(p.cert_sha256, p.node.clone()),
                    // Its streams end, and with them its hold on this node's window.
                    ToAgent::ChildGone(node) => child_conns.close(node),
                    _ => {}
                }
                if ctl_tx.send(m).await.is_err() {
                    break;
                }
            }
        });
    }

    // Before the plan: a staged deployment prepares the disk when asked.
    let mut staged: Option<(Box<DeployJob>, kd_disk::Prepared)> = None;
    // An `auto` broadcast's probe keeps serving its peers until the plan.
    let mut probe_server = None;
    let plan_deadline = tokio::time::Instant::now() + cfg.plan_timeout;
    let plan = loop {
        let msg = match tokio::time::timeout_at(plan_deadline, ctl.recv()).await {
            Err(_) => bail!("no plan from the coordinator within {:?}", cfg.plan_timeout),
            Ok(None) => match coord.close_reason() {
                Some(r) => bail!("the coordinator closed the connection before the plan: {r}"),
                None => bail!("the control stream ended before the plan"),
            },
            Ok(Some(m)) => m,
        };
        match msg {
            ToAgent::Plan(p) => break p,
            ToAgent::Probe(p) => {
                let disk = match (&staged, &cfg.sink) {
                    (Some((_, prepared)), _) => match prepared.target() {
                        kd_disk::Target::Dir(d) => crate::probe::DiskProbe::for_dir(d),
                        kd_disk::Target::Raw { device, .. } => {
                            crate::probe::DiskProbe::Device(device.clone())
                        }
                    },
                    (None, SinkSpec::Raw(p)) => crate::probe::DiskProbe::for_raw(p),
                    (None, SinkSpec::Dir(p)) => crate::probe::DiskProbe::for_dir(p),
                    (None, SinkSpec::Null) => crate::probe::DiskProbe::Nowhere,
                };
                // A second probe replaces the first (its server first: one accept loop).
                drop(probe_server.take());
                let (probed, server) =
                    crate::probe::run((&children_ep, &endpoint), *p, disk, cfg.write_rate).await;
                probe_server = server;
                let _ = to_coord.send(ToCoord::Probed(probed)).await;
            }
            ToAgent::Prepare(job) => {
                // A second Prepare (a retry) starts over: the previous mounts go first.
                drop(staged.take());
                let t = Instant::now();
                let r = prepare_disk(&cfg, &job, &to_coord).await;
                report_step_end(&to_coord, AgentStep::Prepare, t, r.as_ref().err()).await;
                if let Ok(p) = r {
                    staged = Some((job, p));
                }
            }
            ToAgent::Reboot { .. } => {
                // No deployed system to kexec into before the plan: a plain reboot.
                drop(staged.take());
                coord.close(kd_net::close::DONE.into(), b"rebooting");
                reboot_or_exit(&cfg);
                bail!("the coordinator ended this deployment before the plan");
            }
            ToAgent::Abort { reason } => {
                bail!("aborted by the coordinator before the plan: {reason}")
            }
            ToAgent::Finish => bail!("the coordinator finished without giving this node a plan"),
            other => tracing::debug!(?other, "ignored before the plan"),
        }
    };
    let Plan {
        deployment,
        identity,
        upstream,
        children,
        manifest,
        job,
        stall,
    } = *plan;
    manifest
        .validate()
        .map_err(|e| anyhow!("bad manifest from the coordinator: {e}"))?;
    let stall = match stall {
        Some(l) => Policy::from_limits(&l)
            .map_err(|e| anyhow!("bad stall limits from the coordinator: {e}"))?,
        None => Policy::new(cfg.stall_floor, cfg.stall_timeout).map_err(|e| anyhow!(e))?,
    };
    tracing::debug!(?stall, "upstream patience");

    // Serve children (the probe's server, if any, stops first: one accept loop; a silent
    // child is dropped after the plan's limit).
    drop(probe_server);
    child_conns.set_quiet(stall.child_quiet());
    for c in &children {
        allowed.allow(c.cert_sha256, c.node.clone());
    }
    children_ep.set_server_config(Some(kd_net::tls::parent_server(
        identity.cert_der.clone(),
        identity.key_der.clone(),
        allowed.clone(),
    )?));
    let store = Arc::new(Store::new(cfg.window));
    let manifest = Arc::new(manifest);
    let serving = serve_children(
        children_ep.clone(),
        store.clone(),
        manifest.clone(),
        deployment,
        (allowed.clone(), child_conns.clone()),
        to_coord.clone(),
    );
    match &relay {
        Some(r) => drop(r.handle.spawn(serving)),
        None => drop(tokio::spawn(serving)),
    }

    let cpu0 = cpu_seconds();
    let was_staged = staged.is_some();
    // The target: the command line's sink, or the node's disk prepared for a deployment. A node
    // whose disk cannot be prepared still relays to its children, then reports the failure.
    let mut prepare_error = None;
    let mut prepared = None;
    // The deploy partition, for a kexec at the end.
    let mut deploy_device = None;
    let sink = match &job {
        Job::LocalSink => crate::sink::open(&cfg.sink).unwrap_or_else(|e| {
            prepare_error = Some(e);
            None
        }),
        Job::Deploy(d) => match take_or_prepare(&cfg, d, staged.take(), &to_coord).await {
            Ok(p) => match p.sink() {
                Ok(s) => {
                    deploy_device = p
                        .plan()
                        .and_then(|plan| plan.deploy())
                        .map(|d| kd_disk::partition::partition_node(p.disk(), d.number));
                    prepared = Some(p);
                    Some(s)
                }
                Err(e) => {
                    prepare_error = Some(format!("cannot open the deploy target: {e}"));
                    None
                }
            },
            Err(e) => {
                prepare_error = Some(e);
                None
            }
        },
    };
    let mut ctx = Ctx {
        cfg,
        coord,
        endpoint,
        children_ep,
        to_coord,
        ctl,
        allowed,
        deployment,
        identity,
        manifest,
        stall,
        peer_repairs: std::sync::atomic::AtomicU32::new(0),
    };
    let mut report = receive_all(&mut ctx, upstream, &store, sink, children.len()).await;
    if let Some(e) = prepare_error {
        report.error = Some(e);
        report.image_hash = None;
    }
    // A staged deployment (the disk was prepared on the coordinator's Prepare) reports the image
    // first, then finishes the disk and reports that step; otherwise finishing is part of the
    // report.
    let mut finish_after = None;
    if let (Job::Deploy(d), Some(p)) = (&job, prepared) {
        if report.error.is_none() {
            if was_staged {
                finish_after = Some((d.clone(), p));
            } else if let Err(e) = finish_disk(&ctx.cfg, d.as_ref(), p, &ctx.to_coord).await {
                report.error = Some(e);
                report.image_hash = None;
            }
        }
    }
    let report = Report {
        cpu_seconds: cpu_seconds() - cpu0,
        ..report
    };
    let _ = ctx.to_coord.send(ToCoord::Report(report.clone())).await;
    if let Some((d, p)) = finish_after {
        let t = Instant::now();
        let r = finish_disk(&ctx.cfg, d.as_ref(), p, &ctx.to_coord).await;
        report_step_end(&ctx.to_coord, AgentStep::Finish, t, r.as_ref().err()).await;
    }

    // Keep serving children until the coordinator releases us.
    let end = loop {
        let msg = tokio::select! {
            m = ctx.ctl.recv() => m,
            _ = ctx.coord.closed() => None,
        };
        match msg {
            Some(ToAgent::Adopt(p)) => ctx.allowed.allow(p.cert_sha256, p.node),
            Some(ToAgent::Finish) => break Ok(None),
            Some(ToAgent::Reboot { kexec }) => break Ok(Some(kexec)),
            Some(ToAgent::Abort { reason }) => {
                break Err(anyhow!("aborted by the coordinator: {reason}"))
            }
            Some(_) => {}
            None => {
                break Err(anyhow!(
                    "the coordinator went away before releasing this agent"
                ))
            }
        }
    };
    // A kexec is staged while the coordinator still listens: it hears why one cannot be.
    let mut kexec_loaded = false;
    if let (Ok(Some(Some(k))), None) = (&end, &report.error) {
        kexec_loaded = kexec_load(&ctx, deploy_device.as_deref(), k).await;
    }
    ctx.coord.close(kd_net::close::DONE.into(), b"done");
    ctx.endpoint.close(kd_net::close::DONE.into(), b"done");
    ctx.children_ep.close(kd_net::close::DONE.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        ctx.endpoint.wait_idle().await;
        ctx.children_ep.wait_idle().await;
    })
    .await;
    if let Some(e) = &report.error {
        bail!("{e}");
    }
    let reboot = end?.is_some();
    if reboot || matches!(job, Job::Deploy(_)) {
        if kexec_loaded {
            kexec_or_fall_back(&ctx.cfg);
        }
        reboot_or_exit(&ctx.cfg);
    }
    Ok(AgentOutcome { report })
}

/// Stages the deployed kernel (`kexec -l`, see [`crate::kexec`]) and tells the coordinator how
/// that went (a `kexec` step); `false` when it cannot be (the caller reboots instead).
async fn kexec_load(ctx: &Ctx, device: Option<&std::path::Path>, k: &Kexec) -> bool {
    if !ctx.cfg.reboot_on_finish {
        tracing::info!("kexec asked, but this agent does not reboot (not the deploy initrd)");
        return false;
    }
    let t = Instant::now();
    let r = match device {
        None => Err("no deploy partition to kexec from (a whole-disk image)".to_string()),
        Some(dev) => {
            let (work_dir, dev, k) = (ctx.cfg.work_dir.clone(), dev.to_path_buf(), k.clone());
            tokio::task::spawn_blocking(move || crate::kexec::load(&work_dir, &dev, &k))
                .await
                .unwrap_or_else(|e| Err(format!("kexec thread: {e}")))
        }
    };
    let step = StepReport {
        step: "kexec".into(),
        millis: t.elapsed().as_millis() as u64,
        output: r.as_ref().map(|l| l.to_string()).unwrap_or_default(),
        error: r
            .as_ref()
            .err()
            .map(|e| format!("{}; rebooting instead", e.trim_end())),
    };
    match &r {
        Ok(l) => tracing::info!(millis = step.millis, "kexec loaded: {l}"),
        Err(e) => tracing::error!("kexec: {e}; falling back to a reboot"),
    }
    let _ = ctx.to_coord.send(ToCoord::Step(step)).await;
    // Let the report leave before the connection closes (bounded: the node reboots anyway).
    let deadline = Instant::now() + Duration::from_secs(1);
    while ctx.to_coord.capacity() < ctx.to_coord.max_capacity() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.is_ok()
}

/// `kexec -e` into the staged kernel; returns (to the caller's reboot) only when that failed.
fn kexec_or_fall_back(cfg: &AgentConfig) {
    if !cfg.reboot_on_finish {
        return;
    }
    tracing::info!("deployment finished: kexec into the deployed kernel");
    nix::unistd::sync();
    let why = crate::kexec::exec();
    tracing::error!("kexec -e failed: {why}; rebooting instead");
}

/// Tells the coordinator that a staged deployment step ended (and logs it).
async fn report_step_end(
    to_coord: &mpsc::Sender<ToCoord>,
    step: AgentStep,
    started: Instant,
    error: Option<&String>,
) {
    let end = StepEnd {
        step,
        millis: started.elapsed().as_millis() as u64,
        error: error.cloned(),
    };
    match &end.error {
        None => tracing::info!(millis = end.millis, "{step:?} done"),
        Some(e) => tracing::error!("{step:?} failed: {e}"),
    }
    let _ = to_coord.send(ToCoord::StepEnd(end)).await;
}

/// Reboots into the deployed system when this agent may (`reboot_on_finish`: the deploy
/// initrd); otherwise returns (a test or a host just exits).
fn reboot_or_exit(cfg: &AgentConfig) {
    if cfg.reboot_on_finish {
        tracing::info!("deployment finished: rebooting into the deployed system");
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    } else {
        tracing::info!("deployment finished (no reboot: not started by the deploy initrd)");
    }
}

/// The disk prepared by an earlier `Prepare` for this same job, or a fresh preparation.
async fn take_or_prepare(
    cfg: &AgentConfig,
    job: &DeployJob,
    staged: Option<(Box<DeployJob>, kd_disk::Prepared)>,
    to_coord: &mpsc::Sender<ToCoord>,
) -> Result<kd_disk::Prepared, String> {
    match staged {
        Some((j, p)) if *j == *job => Ok(p),
        other => {
            drop(other);
            prepare_disk(cfg, job, to_coord).await
        }
    }
}

fn send_steps(to_coord: &mpsc::Sender<ToCoord>, log: &kd_disk::StepLog) {
    for s in &log.steps {
        let _ = to_coord.try_send(ToCoord::Step(StepReport {
            step: s.name.clone(),
            millis: s.millis,
            error: s.error.clone(),
            output: s.output.clone(),
        }));
    }
}

/// Checks, partitions, formats and mounts the node's disk (blocking work on its own thread).
async fn prepare_disk(
    cfg: &AgentConfig,
    job: &DeployJob,
    to_coord: &mpsc::Sender<ToCoord>,
) -> Result<kd_disk::Prepared, String> {
    let mut layout =
        kd_disk::Layout::from_yaml(&job.layout).map_err(|e| format!("bad disk layout: {e}"))?;
    if let Some(d) = &cfg.disk {
        layout.device = d.clone();
    }
    let pc = kd_disk::PrepareConfig {
        layout,
        deploy_partition: job.deploy_partition,
        image: match job.image {
            DeployImage::Tar => kd_disk::ImageKind::Tar,
            DeployImage::RawPartition => kd_disk::ImageKind::RawPartition,
            DeployImage::RawDisk => kd_disk::ImageKind::RawDisk,
        },
        work_dir: cfg.work_dir.clone(),
        partition: job.partition,
        node_wait_ms: 2000,
    };
    let (r, log) = tokio::task::spawn_blocking(move || {
        let mut log = kd_disk::StepLog::default();
        let r = kd_disk::prepare(&pc, &mut log);
        (r, log)
    })
    .await
    .map_err(|e| format!("prepare thread: {e}"))?;
    send_steps(to_coord, &log);
    r.map_err(|e| format!("preparing the disk failed: {e}"))
}

/// Post-install, SSH key, fstab, GRUB, unmount (blocking work on its own thread).
async fn finish_disk(
    cfg: &AgentConfig,
    job: &DeployJob,
    prepared: kd_disk::Prepared,
    to_coord: &mpsc::Sender<ToCoord>,
) -> Result<(), String> {
    let dir = cfg.work_dir.join("postinstalls");
    let mut postinstalls = Vec::new();
    if !job.postinstalls.is_empty() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for (i, p) in job.postinstalls.iter().enumerate() {
        let path = dir.join(format!("{i}-archive"));
        std::fs::write(&path, &p.archive).map_err(|e| format!("{}: {e}", path.display()))?;
        postinstalls.push(kd_disk::PostInstall {
            archive: path,
            script: p.script.clone(),
        });
    }
    let fin = kd_disk::FinishConfig {
        node: cfg.node.clone(),
        environment: job.environment.clone(),
        postinstalls,
        // From the wire: bounded like every timeout an operator sets (Instant + it must not
        // overflow).
        postinstall_timeout_secs: kd_proto::bounds::check_secs(job.postinstall_timeout_secs, 0)
            .map_err(|e| format!("the job's post-install timeout: {e}"))?,
        ssh_key: job.ssh_key.clone(),
        boot: job.boot.as_ref().map(|b| kd_disk::BootConfig {
            title: job.environment.clone(),
            kernel: b.kernel.clone(),
            initrd: b.initrd.clone(),
            params: b.params.clone(),
            bios: b.bios,
            efi: b.efi,
        }),
    };
    let (r, log) = tokio::task::spawn_blocking(move || {
        let mut log = kd_disk::StepLog::default();
        let r = prepared.finish(&fin, &mut log);
        (r, log)
    })
    .await
    .map_err(|e| format!("finish thread: {e}"))?;
    send_steps(to_coord, &log);
    r.map_err(|e| format!("finishing the disk failed: {e}"))
}

/// The control connection to the coordinator once it has welcomed this agent.
struct Joined {
    coord: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    welcome: Welcome,
}

/// Why one attempt to join the coordinator failed.
enum JoinFailure {
    /// Trying again cannot help (a wrong pinned certificate, a definitive refusal).
    Fatal(anyhow::Error),
    /// The connection was refused, cut or silent before the Welcome: worth another attempt.
    Retry(String),
}

/// How long an agent waits for the Welcome once its Hello is sent. Under a storm the
/// coordinator may take long to finish a handshake while being silent: its socket, on a
/// saturated machine, dropped this agent's last handshake packet, which QUIC sends again only
/// after a backoff that grows with the slow first round trip (measured: 13–27 s for a few
/// agents of 1000 on 2 cores). A coordinator that is gone is found by QUIC's idle timeout
/// (30 s without a packet) before this.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest pause between two attempts to join the coordinator.
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest pause between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Connects to the coordinator and says Hello until it answers Welcome, for at most
/// `cfg.connect_timeout`. A connection refused, cut or silent before the Welcome (a coordinator
/// not up yet, or busy with a storm of agents and timing out handshakes) is tried again after a
/// short random pause; a definitive refusal ([`definitive`]) or a coordinator that is not the
/// pinned one ends it at once.
async fn join(endpoint: &quinn::Endpoint, cfg: &AgentConfig, hello: &Hello) -> Result<Joined> {
    let client = kd_net::tls::agent_to_coordinator(cfg.pin)?;
    let start = tokio::time::Instant::now();
    let deadline = start
        .checked_add(cfg.connect_timeout)
        .unwrap_or_else(|| start + Duration::from_secs(86_400));
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let why = match join_once(endpoint, &client, cfg, hello, deadline).await {
            Ok(j) => return Ok(j),
            Err(JoinFailure::Fatal(e)) => return Err(e),
            Err(JoinFailure::Retry(why)) => why,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            bail!(
                "could not join the coordinator at {} in {:?} ({attempt} attempts): {why}",
                cfg.coord,
                cfg.connect_timeout
            );
        }
        let pause = retry_pause(attempt, random_fraction()).min(left);
        tracing::warn!(
            attempt,
            pause_ms = pause.as_millis() as u64,
            "{why}; retrying"
        );
        tokio::time::sleep(pause).await;
    }
}

/// One attempt: connect (until `deadline`), send the Hello, wait for the Welcome.
async fn join_once(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    cfg: &AgentConfig,
    hello: &Hello,
    deadline: tokio::time::Instant,
) -> Result<Joined, JoinFailure> {
    let connecting = endpoint
        .connect_with(client.clone(), cfg.coord, "kd-coord")
        .map_err(|e| JoinFailure::Fatal(anyhow!("cannot connect to {}: {e}", cfg.coord)))?;
    let coord = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // A certificate that does not match the pin will not get better by retrying.
            if let quinn::ConnectionError::TransportError(t) = &e {
                let t = t.to_string();
                if t.contains("pinned") || t.contains("certificate") {
                    return Err(JoinFailure::Fatal(anyhow!(
                        "the coordinator at {} is not the one pinned: {t}",
                        cfg.coord
                    )));
                }
            }
            return Err(JoinFailure::Retry(format!(
                "cannot connect to the coordinator at {}: {e}",
                cfg.coord
            )));
        }
        Err(_) => {
            return Err(JoinFailure::Retry(format!(
                "no answer from the coordinator at {}",
                cfg.coord
            )))
        }
    };
    // Past the handshake: a failure from here on is the connection cut before the Welcome.
    let cut = |what: String| {
        let why = match coord.close_reason() {
            Some(r) => format!("the coordinator closed the connection before the Welcome: {r}"),
            None => what,
        };
        coord.close(kd_net::close::DONE.into(), b"trying again");
        JoinFailure::Retry(why)
    };
    let (mut send, mut recv) = match coord.open_bi().await {
        Ok(s) => s,
        Err(e) => return Err(cut(format!("cannot open the control stream: {e}"))),
    };
    if let Err(e) = wire::send(&mut send, &ToCoord::Hello(hello.clone())).await {
        return Err(cut(format!("cannot send the Hello: {e}")));
    }
    match wire::recv::<ToAgent>(&mut recv, WELCOME_TIMEOUT, "the Welcome").await {
        Ok(ToAgent::Welcome(welcome)) => Ok(Joined {
            coord,
            send,
            recv,
            welcome,
        }),
        Ok(ToAgent::Error(e)) if definitive(e.code) => Err(JoinFailure::Fatal(anyhow!(
            "the coordinator refused this agent: {e}"
        ))),
        Ok(ToAgent::Error(e)) => Err(cut(format!("the coordinator refused this attempt: {e}"))),
        Ok(other) => Err(JoinFailure::Fatal(anyhow!(
            "unexpected first message from the coordinator: {other:?}"
        ))),
        Err(e) => Err(cut(format!("no Welcome from the coordinator: {e}"))),
    }
}

/// Whether a coordinator's refusal of a Hello holds for any later attempt (the token, the node
/// or the protocol is wrong) rather than for this connection (a Hello cut or late under load).
fn definitive(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::BadToken
            | ErrorCode::UnknownNode
            | ErrorCode::VersionMismatch
            | ErrorCode::Forbidden
    )
}

/// The pause before attempt `attempt + 1`: between [`RETRY_MIN`] and a ceiling that doubles
/// from twice it up to [`RETRY_MAX`], placed by `r` (in [0, 1)) so that agents cut at the same
/// moment do not come back at the same moment.
fn retry_pause(attempt: u32, r: f64) -> Duration {
    let ceiling = RETRY_MIN
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(RETRY_MAX);
    RETRY_MIN + (ceiling - RETRY_MIN).mul_f64(r.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs between processes and calls (std's hasher keys are random
/// per process), for jitter.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// How long a node waits for its children to attach before it asks for the image itself.
const CHILDREN_WAIT: Duration = Duration::from_secs(3);

/// Receives every chunk, switching upstream when told to or when the current one fails.
async fn receive_all(
    ctx: &mut Ctx,
    mut upstream: Upstream,
    store: &Arc<Store>,
    sink: Option<Box<dyn kd_disk::ImageSink>>,
    children: usize,
) -> Report {
    let count = ctx.manifest.chunk_count();
    let writer = match crate::sink::spawn(sink, &ctx.manifest, 4, ctx.cfg.write_rate) {
        Ok(w) => w,
        Err(e) => {
            return Report {
                error: Some(format!("cannot start the writer: {e}")),
                ..Default::default()
            }
        }
    };
    let mut progress = Progress::default();
    let mut refetched = 0u32;
    let mut corrupted_once = false;
    let mut last_progress = Instant::now();
    let mut fatal: Option<String> = None;
    // Who is silent, when to retry the same upstream and when to ask for another: decided by
    // the pure `Watch` (kd_proto::upstream); this loop only reads, verifies and reports.
    let mut watch = Watch::new(ctx.stall);

    // The tree is wired before data flows: this node asks its upstream for the image only once
    // its children have asked it (or after CHILDREN_WAIT). Bytes a node receives before its
    // child is attached stay queued ahead of everything it relays next, since its uplink runs
    // no faster than its downlink: a late hop delays every chunk below it for the whole run
    // (measured: the ~60 ms of a child's first packet resent after reaching a parent that had
    // no plan yet, at every hop of a chain).
    if children > 0 && !store.wait_for_streams(children, CHILDREN_WAIT).await {
        tracing::warn!(
            children,
            "not every child asked for the image within {CHILDREN_WAIT:?}; starting anyway"
        );
    }
    'outer: while store.available() < count {
        let next = store.available();
        // The piece hashes of the next chunk, when its upstream sent them (and they check out).
        let mut pending: Option<Arc<[Digest]>> = None;
        let opened = open_upstream(ctx, &upstream, next, watch.patience()).await;
        let (problem, conn) = match opened {
            Err(OpenFail::Unreachable(e)) => (Problem::Unreachable(format!("{e:#}")), None),
            // Connected, then turned away (a new parent that has not had our `Adopt` yet
            // refuses our certificate once the handshake is over): the Watch's quick retries
            // of a stream that broke at once, not a lost upstream.
            Err(OpenFail::Refused(e)) => {
                watch.opened(Instant::now(), matches!(upstream, Upstream::Peer(_)));
                (Problem::Broken(format!("{e:#}")), None)
            }
            Ok((conn, mut recv)) => {
                watch.opened(Instant::now(), matches!(upstream, Upstream::Peer(_)));
                // The connection the stream comes on: its packets tell a live upstream from a
                // dead one.
                let up = conn.clone().unwrap_or_else(|| ctx.coord.clone());
                let problem = loop {
                    if store.available() >= count {
                        break 'outer;
                    }
                    watch.reading(Instant::now());
                    // One read per frame, kept across the control messages handled meanwhile:
                    // dropping it for an `Adopt` would lose a frame header half read and break
                    // the stream's framing. Only a new upstream or the end abandons it.
                    let frame = {
                        let read = judged(&watch, &up, wire::recv_data(&mut recv, MAX_FRAME));
                        tokio::pin!(read);
                        loop {
                            tokio::select! {
                                f = &mut read => break f,
                                m = ctx.ctl.recv() => match m {
                                    Some(ToAgent::Reparent(u)) => { upstream = u; continue 'outer; }
                                    Some(ToAgent::Adopt(p)) => ctx.allowed.allow(p.cert_sha256, p.node),
                                    Some(ToAgent::Abort { reason }) => { fatal = Some(format!("aborted by the coordinator: {reason}")); break 'outer; }
                                    Some(_) => {}
                                    None => { fatal = Some("the coordinator connection was lost".into()); break 'outer; }
                                },
                            }
                        }
                    };
                    let next = store.available();
                    let p = match frame {
                        Err(silent) => break silent,
                        Ok(Err(e)) => break Problem::Broken(e.to_string()),
                        Ok(Ok(None)) => {
                            break Problem::Broken("the upstream ended the stream early".into())
                        }
                        Ok(Ok(Some(p))) => p,
                    };
                    watch.data(Instant::now());
                    let broken = match p {
                        DataIn::Other(DataFrame::Pieces { index, hashes }) if index == next => {
                            let info = &ctx.manifest.chunks[index as usize];
                            match check_piece_hashes(info.comp_len as usize, &hashes, &info.hash) {
                                Ok(()) => pending = Some(hashes.into()),
                                Err(e) => {
                                    tracing::warn!("chunk {index}: {e}; it will be verified whole");
                                    pending = None;
                                }
                            }
                            None
                        }
                        DataIn::Other(DataFrame::Pieces { index, .. }) => Some(format!(
                            "got the piece hashes of chunk {index}, expected {next}"
                        )),
                        DataIn::ChunkStart { index, len } if index == next => {
                            let expected = ctx.manifest.chunks[index as usize].comp_len as usize;
                            if len != expected {
                                Some(format!(
                                    "chunk {index} announces {len} bytes, the manifest says {expected}"
                                ))
                            } else {
                                let hashes = pending.take();
                                let got = receive_chunk(
                                    ctx,
                                    store,
                                    (&mut recv, &up),
                                    (index, len, hashes),
                                    &mut corrupted_once,
                                    &mut progress,
                                    &mut watch,
                                )
                                .await;
                                match got {
                                    Ok(repaired) => {
                                        refetched += u32::from(repaired);
                                        accept(ctx, store, &writer, index, &mut progress).await;
                                        watch.chunk_done();
                                        None
                                    }
                                    Err(ChunkFail::Upstream(p)) => break p,
                                    Err(ChunkFail::Fatal(e)) => {
                                        fatal = Some(e);
                                        break 'outer;
                                    }
                                }
                            }
                        }
                        DataIn::ChunkStart { index, .. } => {
                            Some(format!("got chunk {index}, expected {next}"))
                        }
                        DataIn::Other(DataFrame::Unavailable { index }) if index == next => {
                            // That upstream no longer holds it: ask someone else.
                            let gone = match &upstream {
                                Upstream::Peer(p) => Some(p.node.as_str()),
                                Upstream::Coordinator => None,
                            };
                            match repair(ctx, index, gone).await {
                                Ok(d) => {
                                    refetched += 1;
                                    store.fill(index, d, grace(&watch)).await;
                                    accept(ctx, store, &writer, index, &mut progress).await;
                                    watch.chunk_done();
                                    None
                                }
                                Err(e) => {
                                    fatal =
                                        Some(format!("chunk {index} could not be fetched: {e:#}"));
                                    break 'outer;
                                }
                            }
                        }
                        DataIn::Other(DataFrame::Unavailable { index }) => {
                            Some(format!("unexpected Unavailable({index})"))
                        }
                        DataIn::Other(DataFrame::Error(e)) => {
                            Some(format!("the upstream refused: {e}"))
                        }
                        DataIn::Other(DataFrame::Chunk { index, .. }) => Some(format!(
                            "bad frame from the upstream: chunk {index} mis-framed"
                        )),
                        DataIn::Other(DataFrame::Redirect(p)) => Some(format!(
                            "the upstream redirected a stream to {} (only repairs are)",
                            p.node
                        )),
                    };
                    if let Some(b) = broken {
                        break Problem::Broken(b);
                    }
                    if last_progress.elapsed() >= Duration::from_secs(1) {
                        last_progress = Instant::now();
                        progress.bytes_written = writer.written.load(Ordering::Relaxed);
                        let _ = ctx.to_coord.try_send(ToCoord::Progress(progress.clone()));
                    }
                };
                (problem, conn)
            }
        };
        // A parent that took this node for a dead child (it heard nothing from it for a
        // while) closed the connection: this node is alive, so that is not a lost parent.
        let problem = match (&problem, &conn) {
            (Problem::Broken(_), Some(c)) if dropped_as_silent(c) => Problem::Dropped,
            _ => problem,
        };
        match watch.failed(Instant::now(), problem) {
            Verdict::RetrySame { pause } => {
                tracing::info!(
                    "new upstream closed at once, or dropped this node as silent; retrying it"
                );
                tokio::time::sleep(pause).await;
            }
            Verdict::Lost(reason) => {
                tracing::warn!("upstream problem: {reason}");
                if let Some(c) = &conn {
                    c.close(kd_net::close::DONE.into(), b"lost");
                }
                match lost_upstream(ctx, &upstream, store.available(), reason).await {
                    Ok(u) => upstream = u,
                    Err(e) => {
                        fatal = Some(e);
                        break 'outer;
                    }
                }
            }
        }
    }
    drop(writer.tx);
    let result = tokio::task::spawn_blocking(move || writer.handle.join())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    progress.bytes_written = writer.written.load(Ordering::Relaxed);
    let mut error = fatal.or(result.error);
    if error.is_none() {
        if let Some(h) = result.content_hash {
            if h != ctx.manifest.content_hash {
                error = Some("the written content does not match the image's content hash".into());
            }
        }
    }
    Report {
        image_hash: error.is_none().then(|| ctx.manifest.image_hash()),
        content_hash: result.content_hash,
        error,
        progress,
        cpu_seconds: 0.0,
        refetched_chunks: refetched,
        refetched_from_peers: ctx.peer_repairs.load(Ordering::Relaxed),
    }
}

/// How long a full window waits for a child that still needs its oldest chunk before that
/// child is overtaken (it then gets `Unavailable` and repairs from the coordinator): a few
/// times this node's own patience with a silent upstream, so that a frozen child holds its
/// siblings and its parent's stream back about as long as a frozen parent would hold it.
fn grace(watch: &Watch) -> Duration {
    watch.patience().saturating_mul(3)
}

/// How receiving a chunk failed.
enum ChunkFail {
    /// The upstream failed (stalled, closed, broke the framing): see [`Watch::failed`].
    Upstream(Problem),
    /// The chunk could not be had at all.
    Fatal(String),
}

/// Waits for `read` (a read from the upstream on connection `up`) while `watch` judges the
/// upstream alive: past its patience, a read is abandoned once the connection has also brought
/// no packet for a while ([`Watch::judge`]). The connection's packet count is looked at every
/// [`Watch::sample_every`], so that the time of its last packet is known to within that; time
/// this task itself did not run (the agent starved of CPU, packets waiting unread) is not the
/// upstream's silence. The read is never cancelled and resumed (a frame half read would be
/// lost).
async fn judged<T>(
    watch: &Watch,
    up: &quinn::Connection,
    read: impl std::future::Future<Output = T>,
) -> Result<T, Problem> {
    tokio::pin!(read);
    let start = Instant::now();
    let tick = watch.sample_every();
    let mut seen = up.stats().udp_rx.datagrams;
    let mut heard = start;
    let mut woke = start;
    let mut wait = watch.patience().min(tick);
    loop {
        tokio::select! {
            r = &mut read => return Ok(r),
            _ = tokio::time::sleep(wait) => {}
        }
        let now = Instant::now();
        if now.saturating_duration_since(woke) > wait + tick.saturating_mul(2) {
            heard = heard.max(now - tick);
        }
        woke = now;
        let rx = up.stats().udp_rx.datagrams;
        if rx != seen {
            seen = rx;
            heard = now;
        }
        let (silent, quiet) = (now - start, now - heard);
        match watch.judge(silent, quiet) {
            Judgement::Wait(d) => wait = d.min(tick).max(Duration::from_millis(50)),
            Judgement::Dead => return Err(Problem::Silent { silent, quiet }),
        }
    }
}

/// Reads `n` bytes of chunk data while the upstream is judged alive ([`judged`]).
async fn read_data(
    (recv, up): (&mut quinn::RecvStream, &quinn::Connection),
    n: usize,
    watch: &mut Watch,
) -> Result<bytes::Bytes, ChunkFail> {
    watch.reading(Instant::now());
    match judged(watch, up, wire::recv_bytes(recv, n)).await {
        Err(silent) => Err(ChunkFail::Upstream(silent)),
        Ok(Err(e)) => Err(ChunkFail::Upstream(Problem::Broken(e.to_string()))),
        Ok(Ok(b)) => {
            watch.data(Instant::now());
            Ok(b)
        }
    }
}

/// Receives the data of chunk `index` (`len` bytes, the manifest's length) into the window.
/// With its piece hashes (checked against the manifest) it goes piece by piece: each piece is
/// verified, then at once available to the children's senders. Without them it is verified
/// whole. Nothing that fails verification is kept or forwarded: the chunk's missing pieces then
/// come from the coordinator. Pieces already held (a new upstream resends the chunk from its
/// start) are read and skipped. Returns whether the chunk had to be fetched again.
async fn receive_chunk(
    ctx: &Ctx,
    store: &Store,
    (recv, up): (&mut quinn::RecvStream, &quinn::Connection),
    (index, len, hashes): (u32, usize, Option<Arc<[Digest]>>),
    corrupted_once: &mut bool,
    progress: &mut Progress,
    watch: &mut Watch,
) -> Result<bool, ChunkFail> {
    let grace = grace(watch);
    let mut inject = !*corrupted_once && ctx.cfg.faults.contains(&Fault::CorruptChunk(index));
    let mut corrupt = |b: bytes::Bytes| {
        if !inject {
            return b;
        }
        inject = false;
        *corrupted_once = true;
        let mut v = b.to_vec();
        if let Some(x) = v.first_mut() {
            *x ^= 0x5a;
        }
        v.into()
    };
    let refused = match hashes {
        None => {
            let data = corrupt(read_data((recv, up), len, watch).await?);
            match verify_chunk(&ctx.manifest, index, &data) {
                Ok(()) => {
                    store.fill(index, data, grace).await;
                    return Ok(false);
                }
                Err(e) => e,
            }
        }
        Some(hashes) => {
            store.begin(index, len, hashes.clone(), grace).await;
            let held = store.pieces_held(index);
            let count = piece_count(len);
            let mut bad = None;
            for p in 0..count {
                let piece = read_data((recv, up), piece_range(len, p).len(), watch).await?;
                if p < held || bad.is_some() {
                    continue;
                }
                // The injected fault hits the middle piece: the pieces before it have been
                // forwarded already, the rest must come from the repair.
                let piece = if p == count / 2 {
                    corrupt(piece)
                } else {
                    piece
                };
                if piece_ok(len, p, &piece, &hashes[p]) {
                    store.push_piece(index, p, piece);
                } else {
                    bad = Some(p);
                }
            }
            match bad {
                None => return Ok(false),
                Some(p) => format!("chunk {index}: piece {p} does not match its hash"),
            }
        }
    };
    tracing::warn!("refused {refused}; fetching it again from the coordinator");
    progress.corrupt_chunks += 1;
    let data = repair(ctx, index, None)
        .await
        .map_err(|e| ChunkFail::Fatal(format!("chunk {index} could not be repaired: {e:#}")))?;
    store.fill(index, data, grace).await;
    Ok(true)
}

/// Chunk `index` is complete in the window: hand it to the writer.
async fn accept(
    ctx: &Ctx,
    store: &Store,
    writer: &crate::sink::Writer,
    index: u32,
    progress: &mut Progress,
) {
    let Some(pieces) = store.pieces(index) else {
        return;
    };
    progress.chunks += 1;
    progress.bytes_received += ctx.manifest.chunks[index as usize].comp_len as u64;
    tracing::debug!(index, "chunk accepted");
    let _ = writer.tx.send((index, pieces)).await;
    for f in &ctx.cfg.faults {
        let signal = match *f {
            Fault::DieAfter(n) if n == index + 1 => nix::sys::signal::Signal::SIGKILL,
            Fault::StopAfter(n) if n == index + 1 => nix::sys::signal::Signal::SIGSTOP,
            _ => continue,
        };
        tracing::error!("fault injection: {signal} after {} chunks", index + 1);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), signal);
    }
}

/// Tells the coordinator the upstream is gone and waits for a new one.
async fn lost_upstream(
    ctx: &mut Ctx,
    upstream: &Upstream,
    next: u32,
    reason: String,
) -> Result<Upstream, String> {
    let parent = match upstream {
        Upstream::Coordinator => None,
        Upstream::Peer(p) => Some(p.node.clone()),
    };
    tracing::warn!(?parent, next, %reason, "upstream lost; asking the coordinator for another");
    if ctx
        .to_coord
        .send(ToCoord::ParentLost {
            parent,
            next_chunk: next,
            reason: reason.clone(),
        })
        .await
        .is_err()
    {
        return Err(format!(
            "upstream lost ({reason}) and the coordinator is gone"
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = tokio::time::timeout_at(deadline, ctx.ctl.recv()).await;
        match m {
            Err(_) => {
                return Err(format!(
                    "upstream lost ({reason}) and no new one within 60 s"
                ))
            }
            Ok(None) => {
                return Err(format!(
                    "upstream lost ({reason}) and the coordinator is gone"
                ))
            }
            Ok(Some(ToAgent::Reparent(u))) => return Ok(u),
            Ok(Some(ToAgent::Adopt(p))) => ctx.allowed.allow(p.cert_sha256, p.node),
            Ok(Some(ToAgent::Abort { reason })) => {
                return Err(format!("aborted by the coordinator: {reason}"))
            }
            Ok(Some(_)) => {}
        }
    }
}

/// Opens a data stream to `upstream` asking for every chunk from `from`, trying to connect for
/// at most `patience` (a dead or frozen parent never answers).
/// Why no stream came from an upstream.
enum OpenFail {
    /// It could not be reached (within the patience).
    Unreachable(anyhow::Error),
    /// It was reached, then the stream could not be opened or asked for (it closed the
    /// connection: typically a parent that does not accept us yet).
    Refused(anyhow::Error),
}

async fn open_upstream(
    ctx: &Ctx,
    upstream: &Upstream,
    from: u32,
    patience: Duration,
) -> std::result::Result<(Option<quinn::Connection>, quinn::RecvStream), OpenFail> {
    let (conn, own) = connect_upstream(ctx, upstream, patience)
        .await
        .map_err(OpenFail::Unreachable)?;
    let asked = async {
        let (mut s, r) = conn.open_bi().await.context("open data stream")?;
        wire::send(
            &mut s,
            &DataRequest::Stream {
                deployment: ctx.deployment,
                from,
            },
        )
        .await?;
        let _ = s.finish();
        anyhow::Ok(r)
    };
    let r = asked.await.map_err(OpenFail::Refused)?;
    Ok((own.then_some(conn), r))
}

/// The connection to `upstream` (the coordinator's, or a new one to a peer, retried within
/// `patience`), and whether it is our own (to close when done).
async fn connect_upstream(
    ctx: &Ctx,
    upstream: &Upstream,
    patience: Duration,
) -> Result<(quinn::Connection, bool)> {
    let (conn, own) = match upstream {
        Upstream::Coordinator => (ctx.coord.clone(), false),
        Upstream::Peer(p) => {
            let client = kd_net::tls::child_to_parent(
                p.cert_sha256,
                ctx.identity.cert_der.clone(),
                ctx.identity.key_der.clone(),
            )?;
            // The parent may learn about us a moment after we learn about it: retry briefly,
            // each attempt bounded (a dead parent never answers), all within the patience.
            let mut last: Option<String> = None;
            let mut conn = None;
            let deadline = tokio::time::Instant::now() + patience;
            while tokio::time::Instant::now() < deadline {
                let attempt = ctx
                    .endpoint
                    .connect_with(client.clone(), p.addr, "kd-peer")?;
                let t = Instant::now();
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match tokio::time::timeout(left.min(Duration::from_secs(3)), attempt).await {
                    Ok(Ok(c)) => {
                        tracing::debug!(parent = %p.node, ms = t.elapsed().as_millis() as u64, "connected to the parent");
                        conn = Some(c);
                        break;
                    }
                    Ok(Err(e)) => last = Some(e.to_string()),
                    Err(_) => last = Some("no answer".into()),
                }
                tracing::debug!(parent = %p.node, ms = t.elapsed().as_millis() as u64, error = ?last, "connection attempt failed");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let conn = conn.ok_or_else(|| {
                anyhow!(
                    "cannot connect to parent {} at {}: {}",
                    p.node,
                    p.addr,
                    last.unwrap_or_default()
                )
            })?;
            (conn, true)
        }
    };
    Ok((conn, own))
}

/// Fetches one chunk from the coordinator and verifies it.
/// Fetches chunk `index` again (corrupt, or gone from a new parent's window). The coordinator
/// is asked first; it may point at a peer that holds the chunk (swarm repair: the repair does
/// not load the coordinator's uplink), which is asked next; the coordinator serves it when no
/// peer can.
async fn repair(ctx: &Ctx, index: u32, avoid: Option<&str>) -> Result<bytes::Bytes> {
    let mut last = anyhow!("no attempt");
    let mut peers_ok = true;
    for _ in 0..3 {
        let ask = if peers_ok {
            DataRequest::Repair {
                deployment: ctx.deployment,
                index,
                avoid: avoid.map(str::to_string),
            }
        } else {
            DataRequest::One {
                deployment: ctx.deployment,
                index,
            }
        };
        match fetch_one(ctx, &ctx.coord, &ask, index).await {
            Ok(Fetched::Chunk(d)) => return Ok(d),
            Ok(Fetched::Redirect(peer)) => {
                peers_ok = false;
                match fetch_from_peer(ctx, &peer, index).await {
                    Ok(d) => {
                        ctx.peer_repairs.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(peer = %peer.node, "chunk {index} repaired by a peer");
                        return Ok(d);
                    }
                    Err(e) => {
                        tracing::info!(peer = %peer.node, "chunk {index} from a peer failed ({e:#}); asking the coordinator");
                        last = e;
                    }
                }
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What a repair request brought.
enum Fetched {
    Chunk(bytes::Bytes),
    Redirect(PeerInfo),
}

/// One repair request on a new stream of `conn`, bounded.
async fn fetch_one(
    ctx: &Ctx,
    conn: &quinn::Connection,
    ask: &DataRequest,
    index: u32,
) -> Result<Fetched> {
    let (mut s, mut r) = conn.open_bi().await?;
    wire::send(&mut s, ask).await?;
    let _ = s.finish();
    let p = tokio::time::timeout(Duration::from_secs(60), wire::recv_chunk(&mut r, MAX_FRAME))
        .await
        .map_err(|_| anyhow!("timed out"))??
        .ok_or_else(|| anyhow!("empty answer"))?;
    match p {
        Whole::Chunk(i, data) if i == index => {
            verify_chunk(&ctx.manifest, index, &data).map_err(|e| anyhow!(e))?;
            Ok(Fetched::Chunk(data))
        }
        Whole::Other(DataFrame::Redirect(peer)) if matches!(ask, DataRequest::Repair { .. }) => {
            Ok(Fetched::Redirect(peer))
        }
        Whole::Other(DataFrame::Unavailable { .. }) => Err(anyhow!("no longer held")),
        Whole::Other(DataFrame::Error(e)) => Err(anyhow!("refused: {e}")),
        Whole::Chunk(i, _) => Err(anyhow!("got chunk {i} instead")),
        Whole::Other(f) => Err(anyhow!("unexpected answer {f:?}")),
    }
}

/// How long a repair tries to reach the peer the coordinator named.
const PEER_REPAIR_CONNECT: Duration = Duration::from_secs(3);

/// Chunk `index` from `peer`, which the coordinator told to accept us: a connection of its
/// own (retried briefly: the peer may learn about us a moment after we learn about it), one
/// request, closed after.
async fn fetch_from_peer(ctx: &Ctx, peer: &PeerInfo, index: u32) -> Result<bytes::Bytes> {
    // The same connection as to a parent (the peer's certificate pinned, ours presented),
    // retried for a few seconds.
    let (conn, _) =
        connect_upstream(ctx, &Upstream::Peer(peer.clone()), PEER_REPAIR_CONNECT).await?;
    let ask = DataRequest::One {
        deployment: ctx.deployment,
        index,
    };
    let got = fetch_one(ctx, &conn, &ask, index).await;
    conn.close(kd_net::close::DONE.into(), b"repaired");
    match got? {
        Fetched::Chunk(d) => Ok(d),
        Fetched::Redirect(_) => bail!("a peer answered with a redirect"),
    }
}

/// The thread of `--net-threads 2`: a current-thread runtime of its own that runs the children's
/// endpoint and their streams, while the session's runtime receives from the upstream. A relay
/// at a link rate one core cannot carry (~1.2 Gbit/s of QUIC at MTU 1500) then uses two; each
/// runtime stays single-threaded (no work stealing: a multi-thread runtime's two workers cost
/// 38 % more CPU per GiB). Pieces cross between the two through the store's notifications.
/// Dropping it stops the runtime (the thread ends on its own).
struct RelayThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RelayThread {
    fn start() -> Result<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("kd-relay".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| anyhow!("the relay thread ended at once"))??;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

/// Accepts children's connections and streams chunks to them.
/// The children's connections by node, so that one the coordinator says is gone can be
/// closed at once.
/// Each connection is also watched: one that brings no packet for the plan's
/// [`Policy::child_quiet`] (a child sends keep-alives every 250 ms) is a dead or frozen child,
/// dropped at once (its window and pacing hold on this node end) without waiting for the
/// coordinator's `ChildGone`.
#[derive(Clone, Default)]
struct ChildConns {
    conns: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<quinn::Connection>>>>,
    /// [`Policy::child_quiet`] in ms (0: not watched, before the plan).
    quiet_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl ChildConns {
    /// Children's connections are dropped after `limit` without a packet.
    fn set_quiet(&self, limit: Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.quiet_ms.store(ms, Ordering::Relaxed);
    }

    fn add(&self, node: &str, conn: &quinn::Connection) {
        let quiet = self.quiet_ms.load(Ordering::Relaxed);
        if quiet > 0 {
            tokio::spawn(drop_when_silent(
                conn.clone(),
                node.to_string(),
                Duration::from_millis(quiet),
            ));
        }
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.entry(node.to_string()).or_default();
        v.retain(|c| c.close_reason().is_none());
        v.push(conn.clone());
    }

    fn close(&self, node: &str) {
        let gone = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node)
            .unwrap_or_default();
        if !gone.is_empty() {
            tracing::info!(child = %node, "the coordinator lost this child: dropping it");
        }
        for c in gone {
            c.close(kd_net::close::DONE.into(), b"gone");
        }
    }
}

/// The reason a parent gives when it closes a silent child's connection.
const SILENT_CHILD: &[u8] = b"silent child";

/// Whether `conn` (to a parent) was closed by the parent as a silent child's.
fn dropped_as_silent(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.reason.as_ref() == SILENT_CHILD
    )
}

/// Closes a child's connection once it has brought no packet for `limit` (time this task did
/// not run excluded); returns when the connection ends. A live child (stalled, or its packets
/// lost) sees why and reconnects at once ([`Problem::Dropped`]).
async fn drop_when_silent(conn: quinn::Connection, node: String, limit: Duration) {
    let tick = (limit / 4).max(Duration::from_millis(50));
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    let mut woke = heard;
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let now = Instant::now();
        if now.saturating_duration_since(woke) > tick.saturating_mul(3) {
            heard = heard.max(now - tick);
        }
        woke = now;
        let rx = conn.stats().udp_rx.datagrams;
        if rx != seen {
            seen = rx;
            heard = now;
        } else if now.saturating_duration_since(heard) >= limit {
            let quiet = now.saturating_duration_since(heard);
            tracing::warn!(child = %node, "no packet from this child for {:.1} s: dropping it", quiet.as_secs_f64());
            conn.close(kd_net::close::DONE.into(), SILENT_CHILD);
            return;
        }
    }
}

async fn serve_children(
    endpoint: quinn::Endpoint,
    store: Arc<Store>,
    manifest: Arc<Manifest>,
    deployment: u64,
    (allowed, conns): (AllowedPeers, ChildConns),
    to_coord: mpsc::Sender<ToCoord>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let store = store.clone();
        let manifest = manifest.clone();
        let allowed = allowed.clone();
        let conns = conns.clone();
        let to_coord = to_coord.clone();
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), incoming).await else {
                return;
            };
            let node = kd_net::tls::peer_cert(&conn)
                .and_then(|c| allowed.node_of(&c))
                .unwrap_or_default();
            conns.add(&node, &conn);
            while let Ok((s, r)) = conn.accept_bi().await {
                let store = store.clone();
                let manifest = manifest.clone();
                let node = node.clone();
                let to_coord = to_coord.clone();
                let conn = conn.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(s, r, &store, &manifest, deployment, &conn).await {
                        tracing::warn!(child = %node, "child lost: {e:#}");
                        let _ = to_coord
                            .send(ToCoord::ChildLost {
                                child: node,
                                reason: format!("{e:#}"),
                            })
                            .await;
                    }
                });
            }
        });
    }
}

async fn serve_stream(
    mut s: quinn::SendStream,
    mut r: quinn::RecvStream,
    store: &Store,
    manifest: &Manifest,
    deployment: u64,
    conn: &quinn::Connection,
) -> Result<()> {
    let req = wire::recv::<DataRequest>(&mut r, Duration::from_secs(10), "a data request").await?;
    let count = manifest.chunk_count();
    let (d, from, to, paced) = match req {
        DataRequest::Stream { deployment, from } => (deployment, from, count, true),
        DataRequest::One { deployment, index }
        | DataRequest::Repair {
            deployment, index, ..
        } => (deployment, index, index.saturating_add(1).min(count), false),
        DataRequest::Probe { .. } => bail!("a probe request after the plan"),
    };
    if d != deployment {
        wire::send(
            &mut s,
            &DataFrame::Error(kd_proto::msg::WireError::new(
                kd_proto::msg::ErrorCode::Forbidden,
                "another deployment",
            )),
        )
        .await?;
        return Ok(());
    }
    let id = store.register(from, paced);
    let result: Result<()> = async {
        for i in from..to {
            tokio::select! {
                _ = async { store.wait_for_piece(i, 0).await; store.pace(id, i).await } => {}
                _ = conn.closed() => bail!("connection closed"),
            }
            if tracing::enabled!(tracing::Level::DEBUG) && i % 8 == 0 {
                let p = conn.stats().path;
                tracing::debug!(
                    index = i,
                    rtt_us = p.rtt.as_micros() as u64,
                    cwnd = p.cwnd,
                    lost_packets = p.lost_packets,
                    congestion_events = p.congestion_events,
                    "serving a child"
                );
            }
            match store.head(i) {
                Get::Ready(len, hashes) => {
                    // A stream gets the piece hashes first and each piece as soon as this node
                    // has verified it; a one-chunk request (a repair) is verified whole.
                    if paced {
                        let f = DataFrame::Pieces {
                            index: i,
                            hashes: hashes.to_vec(),
                        };
                        wire::send(&mut s, &f).await?;
                    }
                    wire::send_chunk_header(&mut s, i, len).await?;
                    for p in 0..piece_count(len) {
                        tokio::select! {
                            _ = store.wait_for_piece(i, p) => {}
                            _ = conn.closed() => bail!("connection closed"),
                        }
                        let Some(piece) = store.piece(i, p) else {
                            bail!("chunk {i} left the window while it was being sent (the child fell too far behind)");
                        };
                        wire::send_bytes(&mut s, piece).await?;
                    }
                }
                Get::Evicted | Get::NotYet => {
                    wire::send(&mut s, &DataFrame::Unavailable { index: i }).await?;
                }
            }
            store.advance(id, i + 1);
        }
        let _ = s.finish();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.stopped()).await;
        if paced {
            let p = conn.stats().path;
            tracing::info!(
                chunks = to - from,
                rtt_us = p.rtt.as_micros() as u64,
                cwnd = p.cwnd,
                mtu = p.current_mtu,
                sent_packets = p.sent_packets,
                lost_packets = p.lost_packets,
                congestion_events = p.congestion_events,
                "stream to a child served"
            );
        }
        Ok(())
    }
    .await;
    store.unregister(id);
    result
}

fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_stay_between_200_ms_and_2_s_and_grow() {
        for attempt in 1..40 {
            for r in [0.0, 0.3, 0.999, 1.0, -1.0, 7.0] {
                let p = retry_pause(attempt, r);
                assert!(p >= RETRY_MIN && p <= RETRY_MAX, "{attempt} {r}: {p:?}");
            }
        }
        assert_eq!(retry_pause(1, 0.0), RETRY_MIN);
        assert_eq!(retry_pause(1, 1.0), Duration::from_millis(400));
        assert_eq!(retry_pause(2, 1.0), Duration::from_millis(800));
        assert_eq!(retry_pause(5, 1.0), RETRY_MAX);
        assert_eq!(retry_pause(u32::MAX, 1.0), RETRY_MAX);
        // Jitter: two calls differ.
        let (a, b) = (random_fraction(), random_fraction());
        assert!((0.0..1.0).contains(&a) && (0.0..1.0).contains(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn a_live_peer_speaks_more_often_than_it_is_judged_quiet() {
        // A parent with nothing to send still sends QUIC keep-alives: the watch must not take
        // their interval for death (nor the coordinator's silence limit).
        assert!(kd_net::endpoint::KEEP_ALIVE < kd_proto::upstream::PEER_QUIET);
        // Between agents: at least three keep-alives in the shortest quiet limit.
        assert!(kd_net::endpoint::DATA_KEEP_ALIVE * 3 < kd_proto::upstream::MIN_QUIET);
    }

    #[test]
    fn only_refusals_of_the_node_itself_are_definitive() {
        for c in [
            ErrorCode::BadToken,
            ErrorCode::UnknownNode,
            ErrorCode::VersionMismatch,
            ErrorCode::Forbidden,
        ] {
            assert!(definitive(c), "{c:?}");
        }
        // "bad Hello: timed out", "no control stream": this connection, not this node.
        assert!(!definitive(ErrorCode::Unexpected));
        assert!(!definitive(ErrorCode::Internal));
    }
}
