//! One agent's life: connect, introduce itself, receive the plan, then receive, verify, relay
//! and write the image until the coordinator says it is over.
//!
//! This is the driver of the session's decisions, which are made without I/O in
//! [`kd_proto::session`] (each control message in each phase, each frame of the upstream's
//! stream, refused pieces, repairs, joining the coordinator) and [`kd_proto::upstream`] (a
//! silent or failed upstream): it reads the sockets and the clock, hands what it got to them
//! and does what they answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kd_net::tls::AllowedPeers;
use kd_net::wire::{self, DataIn};
use kd_proto::codec::MAX_FRAME;
use kd_proto::manifest::{verify_chunk, Manifest};
use kd_proto::msg::Digest;
use kd_proto::msg::{AgentStep, StepEnd};
use kd_proto::msg::{
    Asked, DataFrame, DataRequest, DeployImage, DeployJob, Hello, Job, Kexec, PeerIdentity,
    PeerInfo, Plan, Progress, Report, StallLimits, StepReport, ToAgent, ToCoord, Upstream, Welcome,
    DATA_REQUEST_WAIT,
};
use kd_proto::piece::{piece_ok, piece_range};
use kd_proto::session::{
    control, ending, parent, Answer, ChunkPieces, Control, ControlIn, Ending, FinishDisk, Incoming,
    JoinFailure, Joining, Phase, Repair, Step, CHILDREN_WAIT, PROGRESS_EVERY, REPARENT_WAIT,
    WELCOME_TIMEOUT,
};
use kd_proto::upstream::{Heard, Judgement, Policy, Problem, Verdict, Watch};
use tokio::sync::mpsc;

use crate::config::{AgentConfig, Fault, SinkSpec};
use crate::peer::connect_peer;
use crate::probe::ProbeServer;
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
    /// The endpoint children and repairing peers connect to (`data_port`): its own socket,
    /// on the relay thread with two network threads.
    children_ep: quinn::Endpoint,
    to_coord: mpsc::Sender<ToCoord>,
    ctl: mpsc::Receiver<ToAgent>,
    allowed: AllowedPeers,
    child_conns: ChildConns,
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
    let inventory = crate::inventory::collect();
    let nic = route_interface(cfg.coord);
    let link = cfg
        .link_mbps
        .or_else(|| deploy_link(&inventory, nic.as_deref()));
    let threads = cfg.net_threads.resolve(link, inventory.cpus as usize);
    tracing::info!(threads, ?nic, link_mbps = ?link, cpus = inventory.cpus, "network threads");
    // Declared before the endpoints, dropped after them: its runtime outlives the children's.
    let relay = if threads > 1 {
        Some(RelayThread::start().context("cannot start the relay thread")?)
    } else {
        None
    };
    let (children_ep, endpoint) = bind_endpoints(&cfg, relay.as_ref())?;
    let hello = Hello {
        version: kd_proto::PROTOCOL_VERSION,
        node: cfg.node.clone(),
        token: cfg.token.clone(),
        data_port: children_ep.local_addr()?.port(),
        inventory,
    };
    let joined = join(&endpoint, &cfg, &hello).await?;
    tracing::info!(
        deployment = joined.welcome.deployment,
        "welcomed by the coordinator"
    );
    let coord = joined.coord.clone();
    let mut plumbing = Plumbing::start(joined);
    let mut staging = Staging::default();
    let plan = staging
        .await_plan(&cfg, &coord, &mut plumbing, (&children_ep, &endpoint))
        .await?;
    let (plan, stall) = checked_plan(&cfg, plan)?;
    // The probe's server, if any, stops first: one accept loop.
    drop(staging.probe_server.take());
    let mut ctx = Ctx {
        cfg,
        coord,
        endpoint,
        children_ep,
        to_coord: plumbing.to_coord,
        ctl: plumbing.ctl,
        allowed: plumbing.allowed,
        child_conns: plumbing.child_conns,
        deployment: plan.deployment,
        identity: plan.identity,
        manifest: Arc::new(plan.manifest),
        stall,
        peer_repairs: std::sync::atomic::AtomicU32::new(0),
    };
    let store = serve_children(&ctx, relay.as_ref(), &plan.children)?;
    let cpu0 = cpu_seconds();
    let was_staged = staging.staged.is_some();
    let target = open_target(&ctx, &plan.job, &mut staging.staged).await;
    let deploy_device = target.deploy_device.clone();
    let receipt = (plan.upstream, &store, plan.children.len());
    let job = plan.job;
    let report = receive_and_report(&mut ctx, &job, receipt, target, (cpu0, was_staged)).await;
    let end = released(&mut ctx).await;
    // A kexec is staged while the coordinator still listens: it hears why one cannot be.
    let mut kexec_loaded = false;
    if let (Ok(Some(Some(k))), None) = (&end, &report.error) {
        kexec_loaded = kexec_load(&ctx, deploy_device.as_deref(), k).await;
    }
    shut_down(&ctx).await;
    // Exit, reboot or kexec: `ending` decides, this executes (the errors are returned after).
    let reboot_asked = matches!(end, Ok(Some(_)));
    let failed = report.error.is_some() || end.is_err();
    match ending(&job, reboot_asked, kexec_loaded, failed) {
        Ending::Exit => {}
        Ending::Reboot => reboot_or_exit(&ctx.cfg),
        Ending::KexecThenReboot => {
            kexec_or_fall_back(&ctx.cfg);
            reboot_or_exit(&ctx.cfg);
        }
    }
    if let Some(e) = &report.error {
        bail!("{e}");
    }
    end?;
    Ok(AgentOutcome { report })
}

/// The speed (Mbit/s) of the NIC that carries the deployment: the one the kernel routes the
/// coordinator's address through (`toward`), when it can tell; else the fastest NIC that tells
/// one. `None`: unknown (the route goes through an interface the inventory does not list, such
/// as `lo`, or its NIC reports no speed). A node's fastest NIC is often not that one (an unused
/// 100 Gbit/s port beside the 1 Gbit/s one it boots from).
fn deploy_link(inventory: &kd_proto::msg::Inventory, toward: Option<&str>) -> Option<u64> {
    let known = |n: &kd_proto::msg::NicInfo| Some(u64::from(n.speed_mbps)).filter(|&m| m > 0);
    match toward {
        Some(name) => inventory
            .nics
            .iter()
            .find(|n| n.name == name)
            .and_then(known),
        None => inventory.nics.iter().filter_map(known).max(),
    }
}

/// The interface the kernel would send a datagram to `to` through (its name), if it can tell:
/// a UDP socket connected there (which sends nothing) shows the local address chosen, and the
/// interface holding that address is the one.
fn route_interface(to: std::net::SocketAddr) -> Option<String> {
    let any: std::net::SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any).ok()?;
    sock.connect(to).ok()?;
    let local = sock.local_addr().ok()?.ip();
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let a = ifa.address?;
        let ip = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => std::net::IpAddr::V4(v4.ip()),
            (_, Some(v6)) => std::net::IpAddr::V6(v6.ip()),
            _ => return None,
        };
        (ip == local).then_some(ifa.interface_name)
    })
}

/// The endpoint children connect to (`data_port`; on the relay thread's runtime when there is
/// one), and the one this node connects from (coordinator, parent, repairs): always two sockets,
/// on one thread or two. One socket for both made the acknowledgements and keep-alives owed to
/// the parent wait behind the data for the children: quinn sends nothing on an endpoint whose
/// socket is full, and a relay serving a child at line rate (a catch-up after a re-parenting)
/// kept it full. Measured with one thread and one socket (`kd-bench arity --nodes 16 --kill
/// 5@0.3`, chain): node4, serving its new child node6, went 1 s without a packet to node3,
/// which dropped it as dead; the same cascaded up to node1, and the run took 1.60–1.70 × S/B
/// instead of 1.2.
fn bind_endpoints(
    cfg: &AgentConfig,
    relay: Option<&RelayThread>,
) -> Result<(quinn::Endpoint, quinn::Endpoint)> {
    let children_ep = kd_net::endpoint::bind_on(cfg.listen, None, relay.map(|r| r.handle.clone()))
        .context("cannot open a UDP socket")?;
    let endpoint = kd_net::endpoint::bind(std::net::SocketAddr::new(cfg.listen.ip(), 0), None)
        .context("cannot open a UDP socket")?;
    Ok((children_ep, endpoint))
}

/// The control stream's plumbing: a writer task (messages to the coordinator are queued) and a
/// reader task (messages from it, to the session).
struct Plumbing {
    to_coord: mpsc::Sender<ToCoord>,
    ctl: mpsc::Receiver<ToAgent>,
    /// The children this node accepts.
    allowed: AllowedPeers,
    child_conns: ChildConns,
}

impl Plumbing {
    fn start(joined: Joined) -> Self {
        let Joined {
            mut send, mut recv, ..
        } = joined;
        let (to_coord, mut out_rx) = mpsc::channel::<ToCoord>(256);
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if wire::send(&mut send, &m).await.is_err() {
                    break;
                }
            }
        });
        let (ctl_tx, ctl) = mpsc::channel::<ToAgent>(256);
        let (allowed, child_conns) = (AllowedPeers::default(), ChildConns::default());
        // An `Adopt` takes effect here, the moment it arrives: the session reads its control
        // messages only between chunks, and a relay whose window waits on a dead child would
        // turn the orphan sent to it away meanwhile.
        let (allow, conns) = (allowed.clone(), child_conns.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = wire::recv_opt::<ToAgent>(&mut recv).await {
                match &m {
                    ToAgent::Adopt(p) => allow.allow(p.cert_sha256, p.node.clone()),
                    // Its streams end, and with them its hold on this node's window.
                    ToAgent::ChildGone(node) => conns.close(node),
                    _ => {}
                }
                if ctl_tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        Self {
            to_coord,
            ctl,
            allowed,
            child_conns,
        }
    }
}

/// Before the plan: a staged deployment prepares the disk when asked; an `auto` broadcast's
/// probe keeps serving its peers until the plan.
#[derive(Default)]
struct Staging {
    staged: Option<(Box<DeployJob>, kd_disk::Prepared)>,
    probe_server: Option<ProbeServer>,
}

impl Staging {
    /// Handles the control messages before the plan ([`Phase::BeforePlan`]) until it comes.
    async fn await_plan(
        &mut self,
        cfg: &AgentConfig,
        coord: &quinn::Connection,
        plumbing: &mut Plumbing,
        endpoints: (&quinn::Endpoint, &quinn::Endpoint),
    ) -> Result<Box<Plan>> {
        let timeout = cfg.plan_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let input = match tokio::time::timeout_at(deadline, plumbing.ctl.recv()).await {
                Err(_) => ControlIn::TimedOut,
                Ok(Some(m)) => ControlIn::Message(m),
                Ok(None) => ControlIn::Ended {
                    reason: coord.close_reason().map(|r| r.to_string()),
                },
            };
            let to_coord = &plumbing.to_coord;
            match control(Phase::BeforePlan { timeout }, input) {
                Control::Plan(p) => return Ok(p),
                Control::Probe(p) => {
                    let disk = self.probe_target(&cfg.sink);
                    // A second probe replaces the first (its server first: one accept loop).
                    drop(self.probe_server.take());
                    let (probed, server) =
                        crate::probe::run(endpoints, *p, disk, cfg.write_rate).await;
                    self.probe_server = server;
                    let _ = to_coord.send(ToCoord::Probed(probed)).await;
                }
                Control::Prepare(job) => {
                    // A second Prepare (a retry) starts over: the previous mounts go first.
                    drop(self.staged.take());
                    let t = Instant::now();
                    let r = prepare_disk(cfg, &job, to_coord).await;
                    report_step_end(to_coord, AgentStep::Prepare, t, r.as_ref().err()).await;
                    self.staged = r.ok().map(|p| (job, p));
                }
                Control::Reboot(_) => {
                    drop(self.staged.take());
                    coord.close(kd_net::close::DONE.into(), b"rebooting");
                    reboot_or_exit(cfg);
                    bail!("the coordinator ended this deployment before the plan");
                }
                Control::Fail(e) => bail!("{e}"),
                other => tracing::debug!(?other, "ignored before the plan"),
            }
        }
    }

    /// Where the disk probe writes: the disk a Prepare made ready, else the command line's sink.
    fn probe_target(&self, sink: &SinkSpec) -> crate::probe::DiskProbe {
        use crate::probe::DiskProbe;
        match (&self.staged, sink) {
            (Some((_, prepared)), _) => match prepared.target() {
                kd_disk::Target::Dir(d) => DiskProbe::for_dir(d),
                kd_disk::Target::Raw { device, .. } => DiskProbe::Device(device.clone()),
            },
            (None, SinkSpec::Raw(p)) => DiskProbe::for_raw(p),
            (None, SinkSpec::Dir(p)) => DiskProbe::for_dir(p),
            (None, SinkSpec::Null) => DiskProbe::Nowhere,
        }
    }
}

/// The plan, its manifest checked, and the patience with a silent upstream (the plan's, else
/// the agent's own).
fn checked_plan(cfg: &AgentConfig, plan: Box<Plan>) -> Result<(Plan, Policy)> {
    plan.manifest
        .validate()
        .map_err(|e| anyhow!("bad manifest from the coordinator: {e}"))?;
    let stall = match &plan.stall {
        Some(l) => stall_limits(l)?,
        None => Policy::new(cfg.stall_floor, cfg.stall_timeout).map_err(|e| anyhow!(e))?,
    };
    tracing::debug!(?stall, "upstream patience");
    Ok((*plan, stall))
}

fn stall_limits(l: &StallLimits) -> Result<Policy> {
    Policy::from_limits(l).map_err(|e| anyhow!("bad stall limits from the coordinator: {e}"))
}

/// Starts serving the plan's children (and those adopted later; a silent child is dropped
/// after the plan's limit) from a window of its own, on the relay thread when there is one.
fn serve_children(
    ctx: &Ctx,
    relay: Option<&RelayThread>,
    children: &[PeerInfo],
) -> Result<Arc<Store>> {
    ctx.child_conns.set_quiet(ctx.stall.child_quiet());
    for c in children {
        ctx.allowed.allow(c.cert_sha256, c.node.clone());
    }
    ctx.children_ep
        .set_server_config(Some(kd_net::tls::parent_server(
            ctx.identity.cert_der.clone(),
            ctx.identity.key_der.clone(),
            ctx.allowed.clone(),
        )?));
    let store = Arc::new(Store::new(ctx.cfg.window));
    let serving = accept_children(
        ctx.children_ep.clone(),
        store.clone(),
        ctx.manifest.clone(),
        ctx.deployment,
        (ctx.allowed.clone(), ctx.child_conns.clone()),
        ctx.to_coord.clone(),
    );
    match relay {
        Some(r) => drop(r.handle.spawn(serving)),
        None => drop(tokio::spawn(serving)),
    }
    Ok(store)
}

/// Where the image goes: the command line's sink, or the node's disk prepared for a
/// deployment. A node whose disk cannot be prepared still relays to its children, then reports
/// the failure (`error`).
#[derive(Default)]
struct Target {
    sink: Option<Box<dyn kd_disk::ImageSink>>,
    error: Option<String>,
    prepared: Option<kd_disk::Prepared>,
    /// The deploy partition, for a kexec at the end.
    deploy_device: Option<std::path::PathBuf>,
}

async fn open_target(
    ctx: &Ctx,
    job: &Job,
    staged: &mut Option<(Box<DeployJob>, kd_disk::Prepared)>,
) -> Target {
    let failed = |error| Target {
        error: Some(error),
        ..Target::default()
    };
    let d = match job {
        Job::LocalSink => {
            return match crate::sink::open(&ctx.cfg.sink) {
                Ok(sink) => Target {
                    sink,
                    ..Target::default()
                },
                Err(e) => failed(e),
            }
        }
        Job::Deploy(d) => d,
    };
    let p = match take_or_prepare(&ctx.cfg, d, staged.take(), &ctx.to_coord).await {
        Ok(p) => p,
        Err(e) => return failed(e),
    };
    match p.sink() {
        Ok(sink) => Target {
            sink: Some(sink),
            error: None,
            deploy_device: p
                .plan()
                .and_then(|plan| plan.deploy())
                .map(|d| kd_disk::partition::partition_node(p.disk(), d.number)),
            prepared: Some(p),
        },
        Err(e) => failed(format!("cannot open the deploy target: {e}")),
    }
}

/// Receives the image into `target`, finishes a deployment's disk (before the report, or after
/// it when the disk was staged: [`kd_proto::session::when_to_finish`]), and sends the report.
async fn receive_and_report(
    ctx: &mut Ctx,
    job: &Job,
    (upstream, store, children): (Upstream, &Arc<Store>, usize),
    target: Target,
    (cpu0, was_staged): (f64, bool),
) -> Report {
    let mut report = receive_all(ctx, upstream, store, target.sink, children).await;
    if let Some(e) = target.error {
        report.error = Some(e);
        report.image_hash = None;
    }
    let mut finish_after = None;
    if let (Job::Deploy(d), Some(p)) = (job, target.prepared) {
        match kd_proto::session::when_to_finish(report.error.is_none(), was_staged) {
            FinishDisk::Never => {}
            FinishDisk::AfterReport => finish_after = Some((d, p)),
            FinishDisk::BeforeReport => {
                if let Err(e) = finish_disk(&ctx.cfg, d.as_ref(), p, &ctx.to_coord).await {
                    report.error = Some(e);
                    report.image_hash = None;
                }
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
    report
}

/// Keeps serving children until the coordinator releases this agent ([`Phase::Serving`]):
/// `None` when the broadcast is over, `Some(kexec)` when the node is to reboot.
async fn released(ctx: &mut Ctx) -> Result<Option<Option<Kexec>>> {
    loop {
        let msg = tokio::select! {
            m = ctx.ctl.recv() => m,
            _ = ctx.coord.closed() => None,
        };
        match control(Phase::Serving, msg.into()) {
            Control::Finish => return Ok(None),
            Control::Reboot(kexec) => return Ok(Some(kexec)),
            Control::Fail(e) => return Err(anyhow!(e)),
            _ => {}
        }
    }
}

/// Closes the connections and endpoints, and lets the last packets leave (2 s at most).
async fn shut_down(ctx: &Ctx) {
    ctx.coord.close(kd_net::close::DONE.into(), b"done");
    ctx.endpoint.close(kd_net::close::DONE.into(), b"done");
    ctx.children_ep.close(kd_net::close::DONE.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        ctx.endpoint.wait_idle().await;
        ctx.children_ep.wait_idle().await;
    })
    .await;
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

/// Connects to the coordinator and says Hello until it answers Welcome, for at most
/// `cfg.connect_timeout`. A connection refused, cut or silent before the Welcome (a coordinator
/// not up yet, or busy with a storm of agents and timing out handshakes) is tried again after a
/// short random pause; a definitive refusal or a coordinator that is not the pinned one ends it
/// at once (decided by [`kd_proto::session`]'s [`Joining`] and its functions).
async fn join(endpoint: &quinn::Endpoint, cfg: &AgentConfig, hello: &Hello) -> Result<Joined> {
    let client = kd_net::tls::agent_to_coordinator(cfg.pin)?;
    let mut joining = Joining::new(cfg.coord, Instant::now(), cfg.connect_timeout);
    let deadline = tokio::time::Instant::from_std(joining.deadline());
    loop {
        let why = match join_once(endpoint, &client, cfg, hello, deadline).await {
            Ok(j) => return Ok(j),
            Err(JoinFailure::Fatal(e)) => bail!("{e}"),
            Err(JoinFailure::Retry(why)) => why,
        };
        let pause = joining
            .failed(Instant::now(), &why, random_fraction())
            .map_err(|e| anyhow!(e))?;
        tracing::warn!(
            attempt = joining.attempts(),
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
        .map_err(|e| JoinFailure::Fatal(format!("cannot connect to {}: {e}", cfg.coord)))?;
    let coord = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let transport = match &e {
                quinn::ConnectionError::TransportError(t) => Some(t.to_string()),
                _ => None,
            };
            let why = e.to_string();
            return Err(kd_proto::session::handshake_failed(
                cfg.coord,
                &why,
                transport.as_deref(),
            ));
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
        Err(e) => Err(cut(format!("no Welcome from the coordinator: {e}"))),
        Ok(m) => match kd_proto::session::welcome(m) {
            Ok(welcome) => Ok(Joined {
                coord,
                send,
                recv,
                welcome,
            }),
            Err(JoinFailure::Retry(why)) => Err(cut(why)),
            Err(fatal) => Err(fatal),
        },
    }
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

/// Receives every chunk, switching upstream when told to or when the current one fails.
async fn receive_all(
    ctx: &mut Ctx,
    upstream: Upstream,
    store: &Arc<Store>,
    sink: Option<Box<dyn kd_disk::ImageSink>>,
    children: usize,
) -> Report {
    let writer = match crate::sink::spawn(sink, &ctx.manifest, 4, ctx.cfg.write_rate) {
        Ok(w) => w,
        Err(e) => {
            return Report {
                error: Some(format!("cannot start the writer: {e}")),
                ..Default::default()
            }
        }
    };
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
    let mut rx = Receipt {
        count: ctx.manifest.chunk_count(),
        // Who is silent, when to retry the same upstream and when to ask for another: decided
        // by the pure `Watch` (kd_proto::upstream); the receipt reads, verifies and reports.
        watch: Watch::new(ctx.stall),
        ctx,
        store,
        writer,
        progress: Progress::default(),
        refetched: 0,
        corrupted_once: false,
        last_progress: Instant::now(),
    };
    let fatal = rx.receive(upstream).await.err();
    rx.report(fatal).await
}

/// The receipt of the image under way.
struct Receipt<'a> {
    ctx: &'a mut Ctx,
    store: &'a Arc<Store>,
    writer: crate::sink::Writer,
    watch: Watch,
    progress: Progress,
    /// Chunks fetched again (refused, or gone from the upstream's window).
    refetched: u32,
    /// Whether the `CorruptChunk` fault has been injected (once per run).
    corrupted_once: bool,
    last_progress: Instant,
    count: u32,
}

/// How reading one stream from an upstream ended.
enum StreamEnd {
    /// Every chunk is in.
    Done,
    /// The coordinator moved this node to another upstream.
    Moved(Upstream),
    /// The upstream failed: see [`Watch::failed`].
    Failed(Problem),
    /// Nothing more can be done.
    Fatal(String),
}

impl Receipt<'_> {
    /// Reads streams from `upstream` (and its successors) until every chunk is in.
    async fn receive(&mut self, mut upstream: Upstream) -> Result<(), String> {
        while self.store.available() < self.count {
            let (end, conn) = self.stream_from(&upstream).await;
            upstream = match end {
                StreamEnd::Done => return Ok(()),
                StreamEnd::Moved(u) => u,
                StreamEnd::Fatal(e) => return Err(e),
                StreamEnd::Failed(p) => self.failed(upstream, p, conn).await?,
            };
        }
        Ok(())
    }

    /// Opens a stream from `upstream` at the first chunk this node lacks and reads it; with
    /// the connection (when it is this node's own), to judge and close.
    async fn stream_from(&mut self, upstream: &Upstream) -> (StreamEnd, Option<quinn::Connection>) {
        let from_peer = matches!(upstream, Upstream::Peer(_));
        let next = self.store.available();
        match open_upstream(self.ctx, upstream, next, self.watch.patience()).await {
            Err(OpenFail::Unreachable(e)) => {
                let p = Problem::Unreachable(format!("{e:#}"));
                (StreamEnd::Failed(p), None)
            }
            // Connected, then turned away (a new parent that has not had our `Adopt` yet
            // refuses our certificate once the handshake is over): the Watch's quick retries
            // of a stream that broke at once, not a lost upstream.
            Err(OpenFail::Refused(e)) => {
                self.watch.opened(Instant::now(), from_peer);
                (StreamEnd::Failed(Problem::Broken(format!("{e:#}"))), None)
            }
            Ok((conn, recv)) => {
                self.watch.opened(Instant::now(), from_peer);
                // The connection the stream comes on: its packets tell a live upstream from a
                // dead one.
                let up = conn.clone().unwrap_or_else(|| self.ctx.coord.clone());
                (self.read_stream(upstream, recv, &up).await, conn)
            }
        }
    }

    /// Reads frames from the stream and does what each asks ([`Incoming::frame`]).
    async fn read_stream(
        &mut self,
        upstream: &Upstream,
        mut recv: quinn::RecvStream,
        up: &quinn::Connection,
    ) -> StreamEnd {
        let mut incoming = Incoming::default();
        loop {
            if self.store.available() >= self.count {
                return StreamEnd::Done;
            }
            self.watch.reading(Instant::now());
            let frame = match next_frame(self.ctx, &self.watch, &mut recv, up).await {
                Ok(f) => f,
                Err(end) => return end,
            };
            self.watch.data(Instant::now());
            let step = incoming.frame(&self.ctx.manifest, self.store.available(), frame);
            if let Err(end) = self.take(step, upstream, (&mut recv, up)).await {
                return end;
            }
            if self.last_progress.elapsed() >= PROGRESS_EVERY {
                self.last_progress = Instant::now();
                self.progress.bytes_written = self.writer.written.load(Ordering::Relaxed);
                let _ = self
                    .ctx
                    .to_coord
                    .try_send(ToCoord::Progress(self.progress.clone()));
            }
        }
    }

    /// Does what a frame asks.
    async fn take(
        &mut self,
        step: Step,
        upstream: &Upstream,
        stream: (&mut quinn::RecvStream, &quinn::Connection),
    ) -> Result<(), StreamEnd> {
        match step {
            Step::Continue { warning } => {
                if let Some(w) = warning {
                    tracing::warn!("{w}");
                }
                Ok(())
            }
            Step::Receive { index, len, hashes } => {
                match self.receive_chunk(stream, (index, len, hashes)).await {
                    Ok(repaired) => {
                        self.accepted(index, repaired).await;
                        Ok(())
                    }
                    Err(ChunkFail::Upstream(p)) => Err(StreamEnd::Failed(p)),
                    Err(ChunkFail::Fatal(e)) => Err(StreamEnd::Fatal(e)),
                }
            }
            // That upstream no longer holds it: ask someone else.
            Step::Repair { index } => match repair(self.ctx, index, parent(upstream)).await {
                Ok(d) => {
                    self.store.fill(index, d, self.watch.grace()).await;
                    self.accepted(index, true).await;
                    Ok(())
                }
                Err(e) => Err(StreamEnd::Fatal(format!(
                    "chunk {index} could not be fetched: {e:#}"
                ))),
            },
            Step::Broken(b) => Err(StreamEnd::Failed(Problem::Broken(b))),
        }
    }

    /// Receives the data of chunk `index` (`len` bytes, the manifest's length) into the
    /// window. With its piece hashes (checked against the manifest) it goes piece by piece
    /// ([`receive_pieces`]); without them it is verified whole. A chunk refused is fetched
    /// again from the coordinator. Returns whether the chunk had to be fetched again.
    async fn receive_chunk(
        &mut self,
        (recv, up): (&mut quinn::RecvStream, &quinn::Connection),
        (index, len, hashes): (u32, usize, Option<Arc<[Digest]>>),
    ) -> Result<bool, ChunkFail> {
        let grace = self.watch.grace();
        let faulty = self.ctx.cfg.faults.contains(&Fault::CorruptChunk(index));
        let mut fault = Corrupt {
            armed: !self.corrupted_once && faulty,
            fired: &mut self.corrupted_once,
        };
        let refused = match hashes {
            None => {
                let data = fault.apply(read_data((recv, up), len, &mut self.watch).await?);
                match verify_chunk(&self.ctx.manifest, index, &data) {
                    Ok(()) => {
                        self.store.fill(index, data, grace).await;
                        return Ok(false);
                    }
                    Err(e) => e,
                }
            }
            Some(hashes) => {
                let chunk = (index, len, hashes, grace);
                let stream = (recv, up, &mut self.watch);
                match receive_pieces(self.store, stream, chunk, &mut fault).await? {
                    Ok(()) => return Ok(false),
                    Err(e) => e,
                }
            }
        };
        tracing::warn!("refused {refused}; fetching it again from the coordinator");
        self.progress.corrupt_chunks += 1;
        let data = repair(self.ctx, index, None)
            .await
            .map_err(|e| ChunkFail::Fatal(format!("chunk {index} could not be repaired: {e:#}")))?;
        self.store.fill(index, data, grace).await;
        Ok(true)
    }

    /// Chunk `index` is complete in the window (`repaired`: fetched again): to the writer.
    async fn accepted(&mut self, index: u32, repaired: bool) {
        self.refetched += u32::from(repaired);
        accept(
            self.ctx,
            self.store,
            &self.writer,
            index,
            &mut self.progress,
        )
        .await;
        self.watch.chunk_done();
    }

    /// The stream failed: the same upstream again after a pause, or another one from the
    /// coordinator ([`Watch::failed`]).
    async fn failed(
        &mut self,
        upstream: Upstream,
        problem: Problem,
        conn: Option<quinn::Connection>,
    ) -> Result<Upstream, String> {
        // A parent that took this node for a dead child (it heard nothing from it for a
        // while) closed the connection: this node is alive, so that is not a lost parent.
        let problem = problem.or_dropped(conn.as_ref().is_some_and(dropped_as_silent));
        match self.watch.failed(Instant::now(), problem) {
            Verdict::RetrySame { pause } => {
                tracing::info!(
                    "new upstream closed at once, or dropped this node as silent; retrying it"
                );
                tokio::time::sleep(pause).await;
                Ok(upstream)
            }
            Verdict::Lost(reason) => {
                tracing::warn!("upstream problem: {reason}");
                if let Some(c) = &conn {
                    c.close(kd_net::close::DONE.into(), b"lost");
                }
                lost_upstream(self.ctx, &upstream, self.store.available(), reason).await
            }
        }
    }

    /// The report once the writer is done ([`kd_proto::session::verdict`]).
    async fn report(self, fatal: Option<String>) -> Report {
        let Receipt {
            ctx,
            writer,
            mut progress,
            refetched,
            ..
        } = self;
        drop(writer.tx);
        let result = tokio::task::spawn_blocking(move || writer.handle.join())
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        progress.bytes_written = writer.written.load(Ordering::Relaxed);
        let error = kd_proto::session::verdict(
            fatal,
            result.error,
            result.content_hash,
            &ctx.manifest.content_hash,
        );
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
}

/// The next frame of the stream, read while the upstream is judged alive ([`judged`]); the
/// control messages that come meanwhile are handled ([`Phase::Receiving`]). One read per
/// frame, kept across them: dropping it for a control message would lose a frame header half
/// read and break the stream's framing. Only a new upstream or the end abandons it.
async fn next_frame(
    ctx: &mut Ctx,
    watch: &Watch,
    recv: &mut quinn::RecvStream,
    up: &quinn::Connection,
) -> Result<DataIn, StreamEnd> {
    let read = judged(watch, up, wire::recv_data(recv, MAX_FRAME));
    tokio::pin!(read);
    let frame = loop {
        tokio::select! {
            f = &mut read => break f,
            m = ctx.ctl.recv() => match control(Phase::Receiving, m.into()) {
                Control::Reparent(u) => return Err(StreamEnd::Moved(u)),
                Control::Fail(e) => return Err(StreamEnd::Fatal(e)),
                _ => {}
            },
        }
    };
    let broken = |why: String| Err(StreamEnd::Failed(Problem::Broken(why)));
    match frame {
        Err(silent) => Err(StreamEnd::Failed(silent)),
        Ok(Err(e)) => broken(e.to_string()),
        Ok(Ok(None)) => broken("the upstream ended the stream early".into()),
        Ok(Ok(Some(f))) => Ok(f),
    }
}

/// The `CorruptChunk` fault (tests): flips a byte of the first buffer it is given while armed,
/// once per run.
struct Corrupt<'a> {
    armed: bool,
    fired: &'a mut bool,
}

impl Corrupt<'_> {
    fn apply(&mut self, b: bytes::Bytes) -> bytes::Bytes {
        if !self.armed {
            return b;
        }
        self.armed = false;
        *self.fired = true;
        let mut v = b.to_vec();
        if let Some(x) = v.first_mut() {
            *x ^= 0x5a;
        }
        v.into()
    }
}

/// Receives chunk `index` piece by piece ([`ChunkPieces`]): each piece is verified, then at
/// once available to the children's senders. Nothing that fails verification is kept or
/// forwarded. Pieces already held (a new upstream resends the chunk from its start) are read
/// and skipped. `Ok(Err(why))`: the chunk is refused.
async fn receive_pieces(
    store: &Store,
    (recv, up, watch): (&mut quinn::RecvStream, &quinn::Connection, &mut Watch),
    (index, len, hashes, grace): (u32, usize, Arc<[Digest]>, Duration),
    fault: &mut Corrupt<'_>,
) -> Result<Result<(), String>, ChunkFail> {
    store.begin(index, len, hashes.clone(), grace).await;
    let mut pieces = ChunkPieces::new(index, len, store.pieces_held(index));
    let count = pieces.count();
    for p in 0..count {
        let piece = read_data((recv, up), piece_range(len, p).len(), watch).await?;
        if !pieces.wants(p) {
            continue;
        }
        // The injected fault hits the middle piece: the pieces before it have been
        // forwarded already, the rest must come from the repair.
        let piece = if p == count / 2 {
            fault.apply(piece)
        } else {
            piece
        };
        let ok = piece_ok(len, p, &piece, &hashes[p]);
        if ok {
            store.push_piece(index, p, piece);
        }
        pieces.checked(p, ok);
    }
    Ok(pieces.outcome())
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
/// this task itself did not run is not the upstream's silence ([`Heard`]). The read is never
/// cancelled and resumed (a frame half read would be lost).
async fn judged<T>(
    watch: &Watch,
    up: &quinn::Connection,
    read: impl std::future::Future<Output = T>,
) -> Result<T, Problem> {
    tokio::pin!(read);
    let start = Instant::now();
    let tick = watch.sample_every();
    let mut heard = Heard::new(start, up.stats().udp_rx.datagrams);
    let mut wait = watch.patience().min(tick);
    loop {
        tokio::select! {
            r = &mut read => return Ok(r),
            _ = tokio::time::sleep(wait) => {}
        }
        let now = Instant::now();
        let quiet = heard.sample(now, wait, tick, up.stats().udp_rx.datagrams);
        let silent = now - start;
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

/// Tells the coordinator the upstream is gone and waits for a new one ([`Phase::Lost`]).
async fn lost_upstream(
    ctx: &mut Ctx,
    upstream: &Upstream,
    next: u32,
    reason: String,
) -> Result<Upstream, String> {
    let parent = parent(upstream).map(str::to_string);
    tracing::warn!(?parent, next, %reason, "upstream lost; asking the coordinator for another");
    let lost = ToCoord::ParentLost {
        parent,
        next_chunk: next,
        reason: reason.clone(),
    };
    let gone = ctx.to_coord.send(lost).await.is_err();
    let deadline = tokio::time::Instant::now() + REPARENT_WAIT;
    loop {
        let input = if gone {
            ControlIn::Ended { reason: None }
        } else {
            match tokio::time::timeout_at(deadline, ctx.ctl.recv()).await {
                Err(_) => ControlIn::TimedOut,
                Ok(m) => m.into(),
            }
        };
        match control(Phase::Lost { reason: &reason }, input) {
            Control::Reparent(u) => return Ok(u),
            Control::Fail(e) => return Err(e),
            _ => {}
        }
    }
}

/// Why no stream came from an upstream.
enum OpenFail {
    /// It could not be reached (within the patience).
    Unreachable(anyhow::Error),
    /// It was reached, then the stream could not be opened or asked for (it closed the
    /// connection: typically a parent that does not accept us yet).
    Refused(anyhow::Error),
}

/// Opens a data stream to `upstream` asking for every chunk from `from`, trying to connect for
/// at most `patience` (a dead or frozen parent never answers); with the connection when it is
/// this node's own (a parent's: to close when done), not the coordinator's.
async fn open_upstream(
    ctx: &Ctx,
    upstream: &Upstream,
    from: u32,
    patience: Duration,
) -> std::result::Result<(Option<quinn::Connection>, quinn::RecvStream), OpenFail> {
    let (conn, own) = match upstream {
        Upstream::Coordinator => (ctx.coord.clone(), false),
        Upstream::Peer(p) => {
            let c = connect_peer(&ctx.endpoint, &ctx.identity, p, patience)
                .await
                .map_err(OpenFail::Unreachable)?;
            (c, true)
        }
    };
    let asked = async {
        let (mut s, r) = conn.open_bi().await.context("open data stream")?;
        let deployment = ctx.deployment;
        wire::send(&mut s, &DataRequest::Stream { deployment, from }).await?;
        let _ = s.finish();
        anyhow::Ok(r)
    };
    let r = asked.await.map_err(OpenFail::Refused)?;
    Ok((own.then_some(conn), r))
}

/// Fetches chunk `index` again (corrupt, or gone from a new parent's window), not from node
/// `avoid`. The coordinator is asked first; it may point at a peer that holds the chunk
/// (swarm repair: the repair does not load the coordinator's uplink), which is asked next; the
/// coordinator serves it when no peer can ([`Repair`]).
async fn repair(ctx: &Ctx, index: u32, avoid: Option<&str>) -> Result<bytes::Bytes> {
    let mut plan = Repair::new(ctx.deployment, index, avoid);
    let mut last = anyhow!("no attempt");
    while let Some(ask) = plan.next_ask() {
        let peer = match fetch_one(ctx, &ctx.coord, &ask, index).await {
            Ok(Answer::Chunk(d)) => return Ok(d),
            Ok(Answer::Redirect(peer)) => peer,
            Err(e) => {
                last = e;
                continue;
            }
        };
        plan.redirected();
        match fetch_from_peer(ctx, &peer, &plan.peer_ask(), index).await {
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
    Err(last)
}

/// One repair request on a new stream of `conn`, bounded; its answer judged by
/// [`kd_proto::session::answer`].
async fn fetch_one(
    ctx: &Ctx,
    conn: &quinn::Connection,
    ask: &DataRequest,
    index: u32,
) -> Result<Answer<bytes::Bytes>> {
    let (mut s, mut r) = conn.open_bi().await?;
    wire::send(&mut s, ask).await?;
    let _ = s.finish();
    let got = tokio::time::timeout(Duration::from_secs(60), wire::recv_chunk(&mut r, MAX_FRAME))
        .await
        .map_err(|_| anyhow!("timed out"))??
        .ok_or_else(|| anyhow!("empty answer"))?;
    kd_proto::session::answer(&ctx.manifest, ask, index, got).map_err(|e| anyhow!(e))
}

/// How long a repair tries to reach the peer the coordinator named.
const PEER_REPAIR_CONNECT: Duration = Duration::from_secs(3);

/// Chunk `index` from `peer`, which the coordinator told to accept us: a connection of its
/// own (as to a parent: [`connect_peer`]), one request `ask`, closed after.
async fn fetch_from_peer(
    ctx: &Ctx,
    peer: &PeerInfo,
    ask: &DataRequest,
    index: u32,
) -> Result<bytes::Bytes> {
    let conn = connect_peer(&ctx.endpoint, &ctx.identity, peer, PEER_REPAIR_CONNECT).await?;
    let got = fetch_one(ctx, &conn, ask, index).await;
    conn.close(kd_net::close::DONE.into(), b"repaired");
    match got? {
        Answer::Chunk(d) => Ok(d),
        Answer::Redirect(_) => bail!("a peer answered with a redirect"),
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
    let mut heard = Heard::new(Instant::now(), conn.stats().udp_rx.datagrams);
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let quiet = heard.sample(Instant::now(), tick, tick, conn.stats().udp_rx.datagrams);
        if quiet >= limit {
            tracing::warn!(child = %node, "no packet from this child for {:.1} s: dropping it", quiet.as_secs_f64());
            conn.close(kd_net::close::DONE.into(), SILENT_CHILD);
            return;
        }
    }
}

/// Accepts children's connections and streams chunks to them.
async fn accept_children(
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

/// Serves one stream a child (or a repairing peer) opened: its request, then the chunks.
async fn serve_stream(
    mut s: quinn::SendStream,
    mut r: quinn::RecvStream,
    store: &Store,
    manifest: &Manifest,
    deployment: u64,
    conn: &quinn::Connection,
) -> Result<()> {
    let req = wire::recv::<DataRequest>(&mut r, DATA_REQUEST_WAIT, "a data request").await?;
    let Some(Asked {
        deployment: d,
        chunks,
        paced,
    }) = req.asked(manifest.chunk_count())
    else {
        bail!("a probe request after the plan")
    };
    if d != deployment {
        let refused = kd_proto::msg::WireError::new(
            kd_proto::msg::ErrorCode::Forbidden,
            "another deployment",
        );
        wire::send(&mut s, &DataFrame::Error(refused)).await?;
        return Ok(());
    }
    let id = store.register(chunks.start, paced);
    let result = send_range(&mut s, store, (id, chunks, paced), conn).await;
    store.unregister(id);
    result
}

/// Sends chunks `range` on `s` as this node gets them (registered in the window as `id`; in
/// step with its other streams when `paced`: a stream, not a repair).
async fn send_range(
    s: &mut quinn::SendStream,
    store: &Store,
    (id, range, paced): (u64, std::ops::Range<u32>, bool),
    conn: &quinn::Connection,
) -> Result<()> {
    let chunks = range.len();
    for i in range {
        tokio::select! {
            _ = async { store.wait_for_piece(i, 0).await; store.pace(id, i).await } => {}
            _ = conn.closed() => bail!("connection closed"),
        }
        kd_net::endpoint::log_conn_stats(conn, i, "serving a child");
        match store.head(i) {
            Get::Ready(len, hashes) => send_chunk(s, store, (i, len, hashes, paced), conn).await?,
            Get::Evicted | Get::NotYet => {
                wire::send(s, &DataFrame::Unavailable { index: i }).await?;
            }
        }
        store.advance(id, i + 1);
    }
    let _ = s.finish();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.stopped()).await;
    if paced {
        let path = kd_net::endpoint::path_summary(conn);
        tracing::info!(chunks, %path, "stream to a child served");
    }
    Ok(())
}

/// Sends chunk `i` (`len` bytes) piece by piece as this node verifies them. A stream gets the
/// piece hashes first; a one-chunk request (a repair) is verified whole.
async fn send_chunk(
    s: &mut quinn::SendStream,
    store: &Store,
    (i, len, hashes, paced): (u32, usize, Arc<[Digest]>, bool),
    conn: &quinn::Connection,
) -> Result<()> {
    if paced {
        let f = DataFrame::Pieces {
            index: i,
            hashes: hashes.to_vec(),
        };
        wire::send(s, &f).await?;
    }
    wire::send_chunk_header(s, i, len).await?;
    for p in 0..kd_proto::piece::piece_count(len) {
        tokio::select! {
            _ = store.wait_for_piece(i, p) => {}
            _ = conn.closed() => bail!("connection closed"),
        }
        let Some(piece) = store.piece(i, p) else {
            bail!(
                "chunk {i} left the window while it was being sent (the child fell too far behind)"
            );
        };
        wire::send_bytes(s, piece).await?;
    }
    Ok(())
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
    use kd_proto::msg::{Inventory, NicInfo};

    fn nics(speeds: &[(&str, u32)]) -> Inventory {
        Inventory {
            nics: speeds
                .iter()
                .map(|&(name, speed_mbps)| NicInfo {
                    name: name.into(),
                    mac: String::new(),
                    speed_mbps,
                })
                .collect(),
            ..Inventory::default()
        }
    }

    #[test]
    fn the_link_is_the_one_toward_the_coordinator() {
        let inv = nics(&[("eno1", 1000), ("ens2f0", 100_000), ("eno2", 0)]);
        // Routed through the 1 Gbit/s port: not the idle 100 Gbit/s one beside it.
        assert_eq!(super::deploy_link(&inv, Some("eno1")), Some(1000));
        // Through a NIC that tells no speed, or an interface not listed (lo): unknown.
        assert_eq!(super::deploy_link(&inv, Some("eno2")), None);
        assert_eq!(super::deploy_link(&inv, Some("lo")), None);
        // No route known: the fastest that tells one.
        assert_eq!(super::deploy_link(&inv, None), Some(100_000));
        assert_eq!(super::deploy_link(&nics(&[("eno2", 0)]), None), None);
    }

    #[test]
    fn loopback_is_routed_through_lo() {
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        assert_eq!(super::route_interface(to).as_deref(), Some("lo"));
    }

    #[test]
    fn jitter_differs_between_calls() {
        let (a, b) = (super::random_fraction(), super::random_fraction());
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
}
