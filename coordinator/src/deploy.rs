//! `kd-coord deploy`: the driver that runs the deployment workflow ([`crate::workflow`]) with
//! real I/O.
//!
//! The workflow decides; this module executes its [`Action`]s and feeds back [`Event`]s:
//! it writes PXE profiles (a fresh one-time token per deploy profile), runs the cluster's
//! reboot commands (killed after `command_timeout`), keeps one QUIC endpoint open for the
//! whole deployment (agents may say Hello at any time, with the token of their current
//! profile), sends `Prepare`, sends each node of a broadcast round the plan of the tree the
//! workflow chose (certificates from the deployment's CA, peer addresses from the agents'
//! connections), passes `Reparent` on to the agents (`Adopt` to the new parent), reboots
//! agents into the deployed system, and probes the deployed system's TCP port. It holds no
//! policy: which tree, who re-attaches where, when a relay may reboot, what is retried, all
//! come from the workflow.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kd_proto::msg::{
    AgentStep, DeployJob, Job, Kexec, PeerInfo, Progress, Report, StepReport, ToAgent, ToCoord,
    Upstream,
};
use kd_proto::tree::Arity;
use tokio::sync::mpsc;

use crate::broadcast::{self, Inbound, Source};
use crate::config::{ClusterConfig, DeployArgs, Level, Operation, ProfileBoot};
use crate::env::Environment;
use crate::image::ImageFile;
use crate::pki::{CoordIdentity, DeploymentCa};
use crate::workflow::{
    Action, CommandId, CommandStatus, Deployment, Event, NodeReport, PxeKind, Settings, Step,
    Summary,
};

/// What to deploy where.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// The cluster (nodes, PXE, commands, workflow timeouts).
    pub cluster: ClusterConfig,
    /// Nodes to deploy, all in `cluster`.
    pub nodes: Vec<String>,
    /// What every agent does with the image (layout, environment, key, boot, post-installs).
    pub job: DeployJob,
    /// Tree shape of each broadcast round.
    pub arity: Arity,
    /// Deployment identifier (data requests must name it).
    pub deployment: u64,
    /// UDP address to listen on; default: the cluster's coordinator address and port.
    pub listen: Option<SocketAddr>,
}

/// A connected agent. Control messages go through `tx` with `try_send`: the driver never
/// waits on one agent (a full queue means the agent stopped reading its control stream).
struct Agent {
    conn: quinn::Connection,
    tx: mpsc::Sender<ToAgent>,
    data_port: u16,
}

/// One broadcast round as sent: each member's peer address and certificate fingerprint
/// (what `Adopt` and `Reparent` carry).
struct Round {
    number: u32,
    info: HashMap<String, PeerInfo>,
    started: Instant,
}

/// What one driver runs: the workflow's settings and what executing its actions needs.
struct Setup {
    settings: Settings,
    nodes: Vec<String>,
    deployment: u64,
    /// The job every plan carries (`Job::Deploy` for a deployment: also what `Prepare` sends).
    job: Job,
    /// PXE profiles, reboot commands, probes; `None` for the broadcast alone.
    cluster: Option<ClusterConfig>,
    /// The broadcast alone: the tokens of agents started by other means (never replaced or
    /// revoked); `None`: a fresh token with each deploy profile.
    tokens: Option<HashMap<String, String>>,
    /// Live events for `kd-coord broadcast`'s progress lines.
    events: Option<mpsc::UnboundedSender<broadcast::Event>>,
}

impl Setup {
    fn deploy(cfg: DeployConfig) -> Self {
        let mut settings = Settings::from_config(&cfg.cluster, cfg.arity);
        if cfg.job.boot.is_none() {
            // No kernel in the environment: nothing to kexec into.
            settings.boot = crate::config::NewEnvBoot::Reboot;
        }
        Setup {
            settings,
            nodes: cfg.nodes,
            deployment: cfg.deployment,
            job: Job::Deploy(Box::new(cfg.job)),
            cluster: Some(cfg.cluster),
            tokens: None,
            events: None,
        }
    }
}

/// What a driver leaves when every node is done.
struct Driven {
    summary: Summary,
    /// Each node's last report and when it came.
    reports: HashMap<String, (Report, Instant)>,
    /// When the first round started.
    first_round: Option<Instant>,
    /// When the first rate probe (an `auto` tree's) started.
    first_probe: Option<Instant>,
    /// Progress counters last heard of each node.
    progress: HashMap<String, Progress>,
}

struct Driver {
    setup: Setup,
    wf: Deployment,
    pin_hex: String,
    ca: DeploymentCa,
    /// The image served (none for a remote operation).
    source: Option<Arc<Source>>,
    tokens: HashMap<String, String>,
    used: HashSet<String>,
    agents: HashMap<String, Agent>,
    round: Option<Round>,
    commands: HashMap<CommandId, tokio::task::AbortHandle>,
    ev_tx: mpsc::UnboundedSender<Event>,
    notes: mpsc::UnboundedSender<String>,
    progress: HashMap<String, Progress>,
    summary: Option<Summary>,
    updates: Option<mpsc::UnboundedSender<Update>>,
    reports: HashMap<String, (Report, Instant)>,
    first_round: Option<Instant>,
    first_probe: Option<Instant>,
}

/// What a driver reports besides its notes.
#[derive(Debug, Clone)]
pub enum Update {
    /// A step started on a node (attempt 0 = the first).
    Step {
        /// Node.
        node: String,
        /// Step.
        step: Step,
        /// Attempt.
        attempt: u32,
    },
    /// A node is done (deployed or failed).
    Node(NodeReport),
    /// A node's agent reported the image bytes (compressed) it received and verified.
    Received {
        /// Node.
        node: String,
        /// Bytes.
        bytes: u64,
    },
}

/// How a driver talks to whoever runs it: `notes` receives one human-readable line per thing
/// that happened, `updates` (if any) the structured events, and a reason sent on `cancel`
/// stops every node.
pub struct Hooks {
    /// Human-readable lines.
    pub notes: mpsc::UnboundedSender<String>,
    /// Structured updates.
    pub updates: Option<mpsc::UnboundedSender<Update>>,
    /// Set to `Some(reason)` to abort the deployment.
    pub cancel: tokio::sync::watch::Receiver<Option<String>>,
}

/// A QUIC endpoint shared by every deployment of a daemon: agents are routed to the
/// deployment that holds their node.
#[derive(Clone)]
pub struct SharedEndpoint {
    endpoint: quinn::Endpoint,
    table: broadcast::RouteTable,
    local: SocketAddr,
    accept: Arc<tokio::task::JoinHandle<()>>,
}

impl SharedEndpoint {
    /// Listens on `addr` (port 0: any); refusals made before a node is known go to `refused`.
    pub fn bind(
        addr: SocketAddr,
        identity: &CoordIdentity,
        refused: mpsc::UnboundedSender<broadcast::Event>,
    ) -> Result<Self> {
        let server =
            kd_net::tls::coordinator_server(identity.cert_der.clone(), identity.key_der.clone())?;
        let endpoint = kd_net::endpoint::bind(addr, Some(server))
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = endpoint.local_addr()?;
        let table = broadcast::RouteTable::default();
        let accept =
            broadcast::spawn_accept(&endpoint, broadcast::Routes::ByNode(table.clone()), refused);
        Ok(SharedEndpoint {
            endpoint,
            table,
            local,
            accept: Arc::new(accept),
        })
    }

    /// The address agents reach.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Nodes whose agents are routed now.
    pub fn routed(&self) -> usize {
        self.table.len()
    }

    /// Stops listening.
    pub async fn close(&self) {
        self.endpoint.close(kd_net::close::DONE.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        self.accept.abort();
    }
}

/// Runs a whole deployment on an endpoint of its own (the standalone `kd-coord deploy
/// --standalone`); Ctrl-C stops every node.
pub async fn run(
    image: ImageFile,
    cfg: DeployConfig,
    identity: &CoordIdentity,
    notes: mpsc::UnboundedSender<String>,
) -> Result<Summary> {
    let mut cfg = cfg;
    let wanted = cfg
        .listen
        .unwrap_or_else(|| cfg.cluster.coordinator.socket_addr());
    let server =
        kd_net::tls::coordinator_server(identity.cert_der.clone(), identity.key_der.clone())?;
    // The configured port may be taken by another deployment running at the same time (on
    // other nodes): any free port on the same address does, since each profile names it.
    let endpoint = match kd_net::endpoint::bind(wanted, Some(server.clone())) {
        Ok(e) => e,
        Err(first) => kd_net::endpoint::bind(SocketAddr::new(wanted.ip(), 0), Some(server))
            .with_context(|| {
                format!("cannot listen on {wanted} ({first:#}) nor on another port of that address: run kd-coord where the nodes reach the cluster's coordinator address")
            })?,
    };
    let local = endpoint.local_addr()?;
    set_listen_addr(&mut cfg, local);
    let _ = notes.send(format!(
        "listening on {local}, deployment {:016x}",
        cfg.deployment
    ));
    let liveness = broadcast::Liveness::of_cluster(&cfg.cluster.workflow);
    let (source, route, in_rx, bev_rx) = wire(image, cfg.deployment, liveness);
    let refused = route.events.clone();
    let accept = broadcast::spawn_accept(&endpoint, broadcast::Routes::One(route), refused);
    let (cancel_tx, cancel) = tokio::sync::watch::channel(None);
    let interrupt = {
        let notes = notes.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = notes.send(
                    "interrupted: stopping every node (press Ctrl-C again to quit at once)".into(),
                );
                let _ = cancel_tx.send(Some("interrupted by the operator".into()));
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        })
    };
    let hooks = Hooks {
        notes,
        updates: None,
        cancel,
    };
    let summary = drive(
        Setup::deploy(cfg),
        identity,
        Some(source),
        in_rx,
        bev_rx,
        hooks,
    )
    .await
    .map(|d| d.summary);
    interrupt.abort();
    endpoint.close(kd_net::close::DONE.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    accept.abort();
    summary
}

/// Runs a whole deployment on a daemon's shared endpoint: its nodes' agents are routed to it
/// while it runs.
pub async fn run_shared(
    image: ImageFile,
    cfg: DeployConfig,
    identity: &CoordIdentity,
    shared: &SharedEndpoint,
    hooks: Hooks,
) -> Result<Summary> {
    let mut cfg = cfg;
    set_listen_addr(&mut cfg, shared.local);
    let liveness = broadcast::Liveness::of_cluster(&cfg.cluster.workflow);
    let (source, route, in_rx, bev_rx) = wire(image, cfg.deployment, liveness);
    let nodes = cfg.nodes.clone();
    shared.table.register(&nodes, &route);
    drop(route);
    let summary = drive(
        Setup::deploy(cfg),
        identity,
        Some(source),
        in_rx,
        bev_rx,
        hooks,
    )
    .await
    .map(|d| d.summary);
    shared.table.unregister(&nodes);
    summary
}

/// `kd-coord broadcast`: the image to agents started by other means, with the one driver
/// and the workflow's broadcast-only profile (no PXE, no reboot, no Prepare/Finish steps: the
/// plan's job holds the disk work, if any). `events` receives live progress.
pub async fn broadcast(
    image: ImageFile,
    cfg: broadcast::BroadcastConfig,
    identity: &CoordIdentity,
    events: mpsc::UnboundedSender<broadcast::Event>,
) -> Result<broadcast::Outcome> {
    // Only the set's nodes may be welcomed: a token of another node would take a place.
    let mut outside: Vec<String> = cfg
        .tokens
        .keys()
        .filter(|n| !cfg.nodes.contains(n))
        .cloned()
        .collect();
    if !outside.is_empty() {
        outside.sort();
        anyhow::bail!(
            "tokens given for nodes outside the set: {}",
            kd_proto::nodeset::fold(&outside)
        );
    }
    let server =
        kd_net::tls::coordinator_server(identity.cert_der.clone(), identity.key_der.clone())?;
    let endpoint = kd_net::endpoint::bind(cfg.listen, Some(server))
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let local = endpoint.local_addr()?;
    let _ = events.send(broadcast::Event::Listening(local));
    let (source, route, in_rx, bev_rx) = wire(image, cfg.deployment, cfg.liveness);
    let refused = route.events.clone();
    let accept = broadcast::spawn_accept(&endpoint, broadcast::Routes::One(route), refused);
    // The events carry the progress (main.rs prints them); the driver's notes say the same in
    // other words, for the debug log.
    let (notes, mut notes_rx) = mpsc::unbounded_channel::<String>();
    let log = tokio::spawn(async move {
        while let Some(line) = notes_rx.recv().await {
            tracing::debug!("{line}");
        }
    });
    let (_cancel_tx, cancel) = tokio::sync::watch::channel(None);
    let setup = Setup {
        settings: Settings {
            racks: cfg.racks.clone(),
            ..Settings::broadcast_only(cfg.arity, cfg.hello_timeout, cfg.run_timeout)
        },
        nodes: cfg.nodes.clone(),
        deployment: cfg.deployment,
        job: cfg.job.clone(),
        cluster: None,
        tokens: Some(cfg.tokens.clone()),
        events: Some(events),
    };
    let hooks = Hooks {
        notes,
        updates: None,
        cancel,
    };
    let driven = drive(setup, identity, Some(source.clone()), in_rx, bev_rx, hooks).await;
    endpoint.close(kd_net::close::DONE.into(), b"done");
    accept.abort();
    log.abort();
    let driven = driven?;
    Ok(outcome(&cfg.nodes, &driven, &source))
}

/// A remote operation on a cluster's nodes (`kd-coord reboot`, `kd-coord power on|off`).
#[derive(Debug, Clone)]
pub struct OperateConfig {
    /// The cluster (command templates, PXE profiles, check port, timeouts).
    pub cluster: ClusterConfig,
    /// The nodes, all in `cluster`.
    pub nodes: Vec<String>,
    /// Which templates.
    pub op: Operation,
    /// Write each node's local-disk PXE profile first (`reboot -r recorded_env`).
    pub local_profile: bool,
    /// Wait for the check port after the command (a reboot).
    pub check: bool,
    /// The lowest level tried (then up, on failure or timeout).
    pub from: Level,
}

/// Runs a remote operation with the one driver and the workflow's Operate profile: the
/// cluster's command templates with deploy's escalation, reboot window, command timeout and
/// `boot_new_env` timeout and retries; no agent, no QUIC endpoint.
pub async fn operate(
    cfg: OperateConfig,
    identity: &CoordIdentity,
    hooks: Hooks,
) -> Result<Summary> {
    if cfg.cluster.commands.of(cfg.op).levels().is_empty() {
        anyhow::bail!(
            "the cluster has no {} command: add commands.{} to its configuration",
            cfg.op.words(),
            cfg.op.key()
        );
    }
    let setup = Setup {
        settings: Settings::operate(&cfg.cluster, cfg.op, cfg.local_profile, cfg.check, cfg.from),
        nodes: cfg.nodes,
        deployment: 0,
        job: Job::LocalSink,
        cluster: Some(cfg.cluster),
        tokens: None,
        events: None,
    };
    // No agent ever connects: the inbound side stays open and silent.
    let (_in_tx, in_rx) = mpsc::channel::<Inbound>(1);
    let (_bev_tx, bev_rx) = mpsc::unbounded_channel::<broadcast::Event>();
    drive(setup, identity, None, in_rx, bev_rx, hooks)
        .await
        .map(|d| d.summary)
}

/// `kd-coord broadcast`'s result from what the driver left.
fn outcome(nodes: &[String], d: &Driven, source: &Source) -> broadcast::Outcome {
    // An `auto` tree's time counts its rate probe.
    let started = d.first_probe.or(d.first_round);
    let probe_seconds = match (d.first_probe, d.first_round) {
        (Some(p), Some(r)) => r.saturating_duration_since(p).as_secs_f64(),
        _ => 0.0,
    };
    let since = |t: Instant| started.map(|s| t.saturating_duration_since(s).as_secs_f64());
    let mut out = Vec::new();
    let mut last: Option<f64> = None;
    for name in nodes {
        let result = d.summary.reports.iter().find(|r| &r.node == name);
        let (ok, reason) = match result.map(|r| &r.result) {
            Some(crate::workflow::NodeResult::Deployed) => (true, None),
            Some(crate::workflow::NodeResult::Failed { reason, .. }) => {
                (false, Some(reason.clone()))
            }
            None => (false, Some("unfinished".to_string())),
        };
        let report = d.reports.get(name);
        let seconds = report.and_then(|(_, t)| since(*t));
        if let Some(s) = seconds {
            last = Some(last.map_or(s, |l: f64| l.max(s)));
        }
        let kept = report.filter(|_| ok).map(|(r, _)| r.clone());
        out.push(broadcast::NodeOutcome {
            node: name.clone(),
            ok,
            reason,
            seconds,
            cpu_seconds: kept.as_ref().map(|r| r.cpu_seconds),
            corrupt_chunks: d.progress.get(name).map(|p| p.corrupt_chunks).unwrap_or(0),
            refetched_chunks: kept.as_ref().map(|r| r.refetched_chunks).unwrap_or(0),
            refetched_from_peers: kept.as_ref().map(|r| r.refetched_from_peers).unwrap_or(0),
            report: kept,
        });
    }
    let manifest = &source.chunks.image().manifest;
    broadcast::Outcome {
        nodes: out,
        transfer_seconds: last.unwrap_or(0.0),
        probe_seconds,
        compressed_bytes: manifest.compressed_size(),
        image_hash: kd_proto::manifest::hex(&manifest.image_hash()),
        repairs_served: source
            .repairs_served
            .load(std::sync::atomic::Ordering::Relaxed),
        repairs_redirected: source
            .repairs_redirected
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// A deployment's image source and the route its agents' messages take to its driver (the
/// receiving ends).
fn wire(
    image: ImageFile,
    deployment: u64,
    liveness: broadcast::Liveness,
) -> (
    Arc<Source>,
    broadcast::Route,
    mpsc::Receiver<Inbound>,
    mpsc::UnboundedReceiver<broadcast::Event>,
) {
    let source = Arc::new(Source::new(image, deployment, liveness));
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(1024);
    let (bev_tx, bev_rx) = mpsc::unbounded_channel::<broadcast::Event>();
    let route = broadcast::Route {
        in_tx,
        source: source.clone(),
        events: bev_tx,
    };
    (source, route, in_rx, bev_rx)
}

/// Profiles name the address and port the endpoint really listens on.
fn set_listen_addr(cfg: &mut DeployConfig, local: SocketAddr) {
    if !local.ip().is_unspecified() {
        cfg.cluster.coordinator.address = local.ip();
    }
    cfg.cluster.coordinator.port = local.port();
}

/// The driver loop: executes the workflow's actions and feeds it events until every node is
/// done.
async fn drive(
    setup: Setup,
    identity: &CoordIdentity,
    source: Option<Arc<Source>>,
    mut in_rx: mpsc::Receiver<Inbound>,
    mut bev_rx: mpsc::UnboundedReceiver<broadcast::Event>,
    hooks: Hooks,
) -> Result<Driven> {
    let Hooks {
        notes,
        updates,
        mut cancel,
    } = hooks;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let now = Instant::now();
    let mut d = Driver::new(setup, identity, source, ev_tx, notes, now)?;
    d.updates = updates;
    let mut queue: VecDeque<Action> = d.wf.start(now).into();
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cancelled = false;
    let summary = loop {
        // Execute everything asked, feeding back what executing it tells at once.
        while let Some(a) = queue.pop_front() {
            for e in d.execute(a).await {
                queue.extend(d.wf.handle(e, Instant::now()));
            }
        }
        if let Some(s) = d.summary.take() {
            break s;
        }
        let wake =
            d.wf.poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            ib = in_rx.recv() => {
                let Some(ib) = ib else { anyhow::bail!("the QUIC endpoint stopped") };
                for e in d.inbound(ib).await {
                    queue.extend(d.wf.handle(e, Instant::now()));
                }
            }
            Some(e) = ev_rx.recv() => queue.extend(d.wf.handle(e, Instant::now())),
            Some(be) = bev_rx.recv() => {
                if let broadcast::Event::Refused { addr, reason } = &be {
                    d.note(format!("refused a connection from {addr}: {reason}"));
                }
                d.event(be);
            }
            _ = tokio::time::sleep_until(wake) => {
                queue.extend(d.wf.handle_timeout(Instant::now()));
            }
            _ = tick.tick() => d.progress_line(),
            r = cancel.changed(), if !cancelled => {
                let reason = match r {
                    Ok(()) => cancel.borrow_and_update().clone(),
                    // Whoever could cancel is gone: nothing will.
                    Err(_) => { cancelled = true; None }
                };
                if let Some(reason) = reason {
                    cancelled = true;
                    queue.extend(d.wf.handle(Event::Abort { reason }, Instant::now()));
                }
            }
        }
    };
    // Every node is done: release what is left.
    for (_, h) in d.commands.drain() {
        h.abort();
    }
    if d.setup.tokens.is_some() {
        // The broadcast alone: agents keep serving their children until told to finish.
        for a in d.agents.values() {
            let _ = a.tx.try_send(ToAgent::Finish);
        }
        let close_deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        for a in d.agents.values() {
            let _ = tokio::time::timeout_at(close_deadline, a.conn.closed()).await;
        }
    } else {
        let names: Vec<String> = d.agents.keys().cloned().collect();
        for n in names {
            d.drop_agent(&n, "the deployment is over");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(Driven {
        summary,
        reports: std::mem::take(&mut d.reports),
        first_round: d.first_round,
        first_probe: d.first_probe,
        progress: std::mem::take(&mut d.progress),
    })
}

impl Driver {
    fn new(
        setup: Setup,
        identity: &CoordIdentity,
        source: Option<Arc<Source>>,
        ev_tx: mpsc::UnboundedSender<Event>,
        notes: mpsc::UnboundedSender<String>,
        now: Instant,
    ) -> Result<Self> {
        let mut settings = setup.settings.clone();
        if let Some(src) = &source {
            let m = &src.chunks.image().manifest;
            settings.image = kd_proto::auto::ImageShape {
                compressed: m.compressed_size(),
                raw: m.chunks.iter().map(|c| u64::from(c.raw_len)).sum(),
                // A relay forwards each piece as soon as it is verified: a hop's delay.
                step: kd_proto::piece::PIECE_LEN as u64,
            };
        }
        Ok(Driver {
            wf: Deployment::new(setup.nodes.clone(), settings, now),
            pin_hex: kd_proto::manifest::hex(&identity.pin()),
            ca: DeploymentCa::new(setup.deployment)?,
            source,
            tokens: setup.tokens.clone().unwrap_or_default(),
            used: HashSet::new(),
            agents: HashMap::new(),
            round: None,
            commands: HashMap::new(),
            ev_tx,
            notes,
            progress: HashMap::new(),
            summary: None,
            updates: None,
            reports: HashMap::new(),
            first_round: None,
            first_probe: None,
            setup,
        })
    }

    fn note(&self, line: String) {
        let _ = self.notes.send(line);
    }

    /// A live event for `kd-coord broadcast`'s progress lines (if it listens).
    fn event(&self, e: broadcast::Event) {
        if let Some(tx) = &self.setup.events {
            let _ = tx.send(e);
        }
    }

    /// For an operation: what it is and what a node is when it succeeded, for the notes.
    fn op_words(&self) -> Option<(&'static str, &'static str)> {
        match self.setup.settings.profile {
            crate::workflow::Profile::Operate { op, .. } => Some((
                op.words(),
                match op {
                    Operation::Reboot => "answering",
                    Operation::PowerOn => "powered on",
                    Operation::PowerOff => "powered off",
                },
            )),
            _ => None,
        }
    }

    fn cluster(&self) -> Result<&ClusterConfig, String> {
        self.setup.cluster.as_ref().ok_or_else(|| {
            "no cluster configuration: the broadcast alone has no PXE, reboot or probe".to_string()
        })
    }

    fn progress_line(&self) {
        let p = self.wf.progress();
        let mut parts: Vec<String> = Step::ALL
            .iter()
            .zip(p.in_step.iter())
            .filter(|(_, &n)| n > 0)
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        if let Some(r) = &self.round {
            let receiving = self.wf.receiving();
            if let (false, Some(source)) = (receiving.is_empty(), &self.source) {
                let total = source.chunks.image().manifest.chunk_count();
                let min = receiving
                    .iter()
                    .map(|n| self.progress.get(*n).map(|p| p.chunks).unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                parts.push(format!(
                    "round {} slowest node at chunk {min}/{total} after {:.0} s",
                    r.number,
                    r.started.elapsed().as_secs_f64()
                ));
            }
        }
        parts.push(format!("{} ok, {} ko", p.ok, p.ko));
        self.note(format!("progress: {}", parts.join(", ")));
    }

    /// Executes one action; returns the events known at once.
    async fn execute(&mut self, action: Action) -> Vec<Event> {
        match action {
            Action::WritePxe { node, profile } => vec![Event::PxeWritten {
                result: self.write_pxe(&node, profile),
                node,
            }],
            Action::RunCommand {
                node,
                id,
                op,
                level,
            } => self.run_command(node, id, op, level),
            Action::RebootAgent { node, id, kexec } => {
                if !self.agents.contains_key(&node) {
                    return vec![Event::CommandDone {
                        node,
                        id,
                        status: CommandStatus::Failed("no agent connection to reboot".into()),
                    }];
                }
                vec![Event::CommandDone {
                    status: self.send_reboot(&node, kexec),
                    node,
                    id,
                }]
            }
            Action::KillCommand { node, id } => {
                if let Some(h) = self.commands.remove(&id) {
                    self.note(format!("{node}: command {} killed (too long)", id.0));
                    h.abort();
                }
                Vec::new()
            }
            Action::SendPrepare { node } => {
                let Job::Deploy(job) = &self.setup.job else {
                    return vec![Event::StepDone {
                        node,
                        step: Step::Prepare,
                        result: Err("no disk job to prepare".into()),
                    }];
                };
                let job = job.clone();
                match self.agents.get(&node) {
                    Some(a) if a.tx.try_send(ToAgent::Prepare(job)).is_ok() => Vec::new(),
                    _ => vec![Event::StepDone {
                        node,
                        step: Step::Prepare,
                        result: Err("no agent connection".into()),
                    }],
                }
            }
            Action::ProbeRates {
                round,
                nodes,
                fetch,
                bytes,
            } => self.probe_rates(round, nodes, fetch, bytes),
            Action::StartBroadcast {
                round,
                nodes,
                parents,
                pace_groups,
                shape,
            } => {
                if let Some(src) = &self.source {
                    let mut g = src.pace_groups.lock().unwrap_or_else(|p| p.into_inner());
                    g.clear();
                    g.extend(nodes.iter().cloned().zip(pace_groups));
                }
                self.start_round(round, nodes, parents, &shape)
            }
            Action::Reparent {
                round,
                node,
                parent,
            } => {
                self.reparent(round, &node, parent.as_deref());
                Vec::new()
            }
            Action::ProbePort { node } => {
                self.probe(node);
                Vec::new()
            }
            Action::CancelStep { node, step, reason } => {
                match step {
                    Step::SetDeploymentEnv => {
                        // A late Hello with this token is refused from now on.
                        self.tokens.remove(&node);
                        self.drop_agent(&node, &reason);
                    }
                    Step::Prepare | Step::Broadcast | Step::Finish => {
                        self.drop_agent(&node, &reason)
                    }
                    Step::BootNewEnv => {}
                }
                Vec::new()
            }
            Action::StepStarted {
                node,
                step,
                attempt,
            } => {
                if let Some(u) = &self.updates {
                    let _ = u.send(Update::Step {
                        node: node.clone(),
                        step,
                        attempt,
                    });
                }
                if attempt == 0 {
                    match self.op_words() {
                        Some((what, _)) => self.note(format!("{node}: {what}")),
                        None => self.note(format!("{node}: {step}")),
                    }
                } else {
                    self.note(format!("{node}: {step} (retry {attempt})"));
                }
                Vec::new()
            }
            Action::NodeDone { node, report } => {
                if let Some(u) = &self.updates {
                    let _ = u.send(Update::Node(report.clone()));
                }
                self.event(broadcast::Event::Done {
                    node: node.clone(),
                    error: match &report.result {
                        crate::workflow::NodeResult::Deployed => None,
                        crate::workflow::NodeResult::Failed { reason, .. } => Some(reason.clone()),
                    },
                });
                match &report.result {
                    crate::workflow::NodeResult::Deployed => self.note(format!(
                        "{node}: {} in {:.1} s",
                        self.op_words().map_or("deployed", |(_, done)| done),
                        report.total.as_secs_f64()
                    )),
                    crate::workflow::NodeResult::Failed { step, reason } => {
                        self.note(format!("{node}: FAILED in {step}: {reason}"));
                        self.drop_agent(&node, reason);
                        // Its token is revoked and its profile boots the local disk again: a
                        // later reboot (a BMC, an operator) does not start a deploy agent
                        // that nobody waits for, and the file no longer holds a token.
                        self.tokens.remove(&node);
                        if let Err(e) = self.write_pxe(&node, PxeKind::LocalDisk) {
                            self.note(format!("{node}: {e}"));
                        }
                        return Vec::new();
                    }
                }
                Vec::new()
            }
            Action::Finished { summary } => {
                self.summary = Some(summary);
                Vec::new()
            }
        }
    }

    fn write_pxe(&mut self, node: &str, kind: PxeKind) -> Result<(), String> {
        let nc = self
            .cluster()?
            .node(node)
            .cloned()
            .ok_or_else(|| format!("{node} is not in the cluster configuration"))?;
        let token = match kind {
            PxeKind::Deploy => {
                let token = crate::tokens::random_token().map_err(|e| format!("{e:#}"))?;
                // A new profile means a new boot: the previous agent (if any) is gone.
                self.drop_agent(node, "the node is rebooted into the deploy environment");
                self.used.remove(node);
                self.tokens.insert(node.to_string(), token.clone());
                Some(token)
            }
            PxeKind::LocalDisk => {
                self.tokens.remove(node);
                None
            }
        };
        let cluster = self.cluster()?;
        let profile = match &token {
            Some(token) => {
                let args = DeployArgs::new(&self.pin_hex, token).map_err(|e| e.to_string())?;
                cluster.render_profile(&nc, &ProfileBoot::Deploy(&args))
            }
            None => cluster.render_profile(&nc, &ProfileBoot::LocalDisk),
        };
        write_profile(&profile.path, profile.content.as_bytes()).map_err(|e| {
            format!(
                "cannot write the PXE profile {}: {e}",
                profile.path.display()
            )
        })
    }

    fn run_command(
        &mut self,
        node: String,
        id: CommandId,
        op: Operation,
        level: Level,
    ) -> Vec<Event> {
        let cmd = self
            .cluster()
            .ok()
            .and_then(|c| c.node(&node).and_then(|nc| c.command(op, level, nc)));
        let Some(cmd) = cmd else {
            return vec![Event::CommandDone {
                node,
                id,
                status: CommandStatus::Failed(format!("no {op:?} command at level {level}")),
            }];
        };
        let what = self.op_words().map_or("reboot", |(what, _)| what);
        self.note(format!("{node}: {level} {what}: {cmd}"));
        let tx = self.ev_tx.clone();
        let limit = Duration::from_secs(self.setup.settings.policy.command_timeout.max(1));
        let h = tokio::spawn(async move {
            let status = run_shell(&cmd, limit).await;
            let _ = tx.send(Event::CommandDone { node, id, status });
        });
        self.commands.insert(id, h.abort_handle());
        Vec::new()
    }

    /// Tells the node's agent to reboot, or to kexec into the deployed kernel (the job's boot
    /// settings: paths in the deployed tree, the environment's kernel parameters).
    fn send_reboot(&mut self, node: &str, kexec: bool) -> CommandStatus {
        let kexec = match (&self.setup.job, kexec) {
            (Job::Deploy(job), true) => job.boot.as_ref().map(|b| Kexec {
                kernel: b.kernel.clone(),
                initrd: b.initrd.clone(),
                params: b.params.clone(),
            }),
            _ => None,
        };
        if let Some(k) = &kexec {
            self.note(format!(
                "{node}: kexec into {}{} (falls back to a reboot)",
                k.kernel,
                k.initrd
                    .as_deref()
                    .map(|i| format!(" with {i}"))
                    .unwrap_or_default()
            ));
        }
        match self.agents.remove(node) {
            Some(a) => match a.tx.try_send(ToAgent::Reboot { kexec }) {
                Ok(()) => CommandStatus::Exited(0),
                Err(e) => CommandStatus::Failed(format!("cannot tell the agent: {e}")),
            },
            None => CommandStatus::Failed("no agent connection to reboot".into()),
        }
    }

    fn probe(&self, node: String) {
        let Some(addr) = self.cluster().ok().and_then(|c| {
            c.node(&node)
                .map(|n| SocketAddr::new(n.address, c.check_port))
        }) else {
            return;
        };
        let limit = Duration::from_secs(self.setup.settings.policy.probe_interval.clamp(1, 3));
        let tx = self.ev_tx.clone();
        tokio::spawn(async move {
            let open = matches!(
                tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            let _ = tx.send(if open {
                Event::PortOpen { node }
            } else {
                Event::PortClosed { node }
            });
        });
    }

    /// Tells the node's agent (if any) to stop and forgets it.
    fn drop_agent(&mut self, node: &str, reason: &str) {
        if let Some(a) = self.agents.remove(node) {
            let _ = a.tx.try_send(ToAgent::Abort {
                reason: reason.to_string(),
            });
            let conn = a.conn;
            let reason = reason.to_string();
            tokio::spawn(async move {
                // Let the Abort leave before the connection closes.
                tokio::time::sleep(Duration::from_secs(2)).await;
                conn.close(kd_net::close::DONE.into(), reason.as_bytes());
            });
        }
    }

    /// Sends each node its probe order (see `Action::ProbeRates`); a node that cannot be
    /// told answers nothing at once.
    fn probe_rates(
        &mut self,
        round: u32,
        nodes: Vec<String>,
        fetch: Vec<Option<usize>>,
        bytes: u32,
    ) -> Vec<Event> {
        let Some(deployment) = self.source.as_ref().map(|s| s.deployment) else {
            return Vec::new();
        };
        let unmeasured = |node: &String| Event::RatesMeasured {
            node: node.clone(),
            link: None,
            disk: None,
        };
        let mut ids = HashMap::new();
        let mut info: HashMap<usize, PeerInfo> = HashMap::new();
        for (k, name) in nodes.iter().enumerate() {
            let Some(a) = self.agents.get(name) else {
                continue;
            };
            let Ok(id) = self.ca.issue(name) else {
                continue;
            };
            info.insert(
                k,
                PeerInfo {
                    node: name.clone(),
                    addr: SocketAddr::new(a.conn.remote_address().ip(), a.data_port),
                    cert_sha256: kd_net::cert_sha256(&id.cert_der),
                },
            );
            ids.insert(k, id);
        }
        let mut events = Vec::new();
        for (k, name) in nodes.iter().enumerate() {
            let Some(identity) = ids.remove(&k) else {
                events.push(unmeasured(name));
                continue;
            };
            let serve = fetch
                .iter()
                .enumerate()
                .filter(|(_, f)| **f == Some(k))
                .filter_map(|(j, _)| info.get(&j).cloned())
                .collect();
            let probe = kd_proto::msg::Probe {
                deployment,
                identity,
                serve,
                fetch: fetch
                    .get(k)
                    .copied()
                    .flatten()
                    .and_then(|j| info.get(&j).cloned()),
                bytes,
            };
            let sent = self
                .agents
                .get(name)
                .is_some_and(|a| a.tx.try_send(ToAgent::Probe(Box::new(probe))).is_ok());
            if !sent {
                events.push(unmeasured(name));
            }
        }
        self.first_probe.get_or_insert_with(Instant::now);
        self.note(format!(
            "round {round}: {} nodes measure their link and disk rates for an auto tree",
            nodes.len()
        ));
        events
    }

    fn start_round(
        &mut self,
        number: u32,
        nodes: Vec<String>,
        parents: Vec<Option<usize>>,
        shape: &str,
    ) -> Vec<Event> {
        let Some(source) = self.source.clone() else {
            return nodes
                .into_iter()
                .map(|node| Event::NodeFailed {
                    node,
                    reason: "no image to broadcast".into(),
                })
                .collect();
        };
        let agents = &self.agents;
        let planned = broadcast::plan_round(
            &nodes,
            &parents,
            &self.ca,
            |n| {
                agents
                    .get(n)
                    .map(|a| SocketAddr::new(a.conn.remote_address().ip(), a.data_port))
            },
            &source,
            &self.setup.job,
        );
        let planned = match planned {
            Ok(p) => p,
            Err(e) => {
                return nodes
                    .into_iter()
                    .map(|node| Event::NodeFailed {
                        node,
                        reason: format!("cannot plan the broadcast: {e:#}"),
                    })
                    .collect();
            }
        };
        self.note(format!(
            "broadcast round {number} started: {} ({shape}, {:.1} MiB in {} chunks)",
            nodes.join(" "),
            source.chunks.image().manifest.compressed_size() as f64 / 1048576.0,
            source.chunks.image().manifest.chunk_count()
        ));
        self.first_round.get_or_insert_with(Instant::now);
        self.event(broadcast::Event::Planned {
            shape: shape.to_string(),
            edges: nodes
                .iter()
                .map(|n| (n.clone(), planned.parent.get(n).cloned().flatten()))
                .collect(),
        });
        let mut events = Vec::new();
        for (name, plan) in planned.plans {
            let sent = match self.agents.get(&name) {
                Some(a) => a.tx.try_send(ToAgent::Plan(Box::new(plan))).is_ok(),
                None => false,
            };
            if !sent {
                events.push(Event::NodeLost {
                    node: name,
                    reason: "no agent connection to send the plan to".into(),
                });
            }
        }
        self.round = Some(Round {
            number,
            info: planned.info,
            started: Instant::now(),
        });
        events
    }

    /// A peer to serve chunk `index` to `node` (swarm repair), told to accept it; `None`: the
    /// coordinator serves it. The choice is the workflow's (`Deployment::repair_peer`), from
    /// the nodes' last progress and the agents connected.
    fn repair_holder(&mut self, node: &str, index: u32, avoid: Option<&str>) -> Option<PeerInfo> {
        let r = self.round.as_ref()?;
        let asker = r.info.get(node)?.clone();
        let holder = self.wf.repair_peer(
            node,
            index,
            avoid,
            |n| self.progress.get(n).map_or(0, |p| p.chunks),
            |n| self.agents.contains_key(n),
        )?;
        let info = r.info.get(&holder)?.clone();
        let a = self.agents.get(&holder)?;
        a.tx.try_send(ToAgent::Adopt(asker)).ok()?;
        self.note(format!("{node}: chunk {index} repaired by {holder}"));
        Some(info)
    }

    /// Tells `node` to read from `parent` (the coordinator if `None` or unknown) and `parent`
    /// to accept it.
    fn reparent(&mut self, round: u32, node: &str, parent: Option<&str>) {
        let Some(r) = self.round.as_ref().filter(|r| r.number == round) else {
            return;
        };
        let mut msgs = Vec::new();
        let upstream = match (parent.and_then(|p| r.info.get(p)), r.info.get(node)) {
            (Some(pi), Some(ci)) => {
                msgs.push((pi.node.clone(), ToAgent::Adopt(ci.clone())));
                Upstream::Peer(pi.clone())
            }
            _ => Upstream::Coordinator,
        };
        msgs.push((node.to_string(), ToAgent::Reparent(upstream)));
        for (to, msg) in msgs {
            if let Some(a) = self.agents.get(&to) {
                // Never wait on one agent: a full queue means it stopped reading, and it
                // will be judged by its silence.
                let _ = a.tx.try_send(msg);
            }
        }
        self.note(format!(
            "{node} now reads from {}",
            parent.unwrap_or("the coordinator")
        ));
        self.event(broadcast::Event::Reparented {
            node: node.to_string(),
            parent: parent.map(str::to_string),
        });
    }

    async fn inbound(&mut self, ib: Inbound) -> Vec<Event> {
        match ib {
            Inbound::Hello {
                hello,
                conn,
                tx,
                reply,
            } => {
                // An agent is welcome only while its node waits for one.
                let waiting = matches!(
                    self.wf.node_step(&hello.node),
                    Some((Step::SetDeploymentEnv, false))
                );
                self.hello(hello, conn, tx, reply, waiting)
            }
            Inbound::Msg { node, msg } => {
                if !self.agents.contains_key(&node) {
                    // An agent told to reboot may still say how its kexec went (a note).
                    if let ToCoord::Step(s) = &msg {
                        if s.step == "kexec"
                            && matches!(self.wf.node_step(&node), Some((Step::BootNewEnv, _)))
                        {
                            self.step_note(&node, s);
                        }
                    }
                    return Vec::new();
                }
                self.agent_message(node, msg).await
            }

            Inbound::Repair {
                node,
                index,
                avoid,
                reply,
            } => {
                let _ = reply.send(self.repair_holder(&node, index, avoid.as_deref()));
                Vec::new()
            }
            Inbound::Lost {
                node,
                conn_id,
                reason,
            } => {
                let current = self
                    .agents
                    .get(&node)
                    .is_some_and(|a| a.conn.stable_id() == conn_id);
                if !current {
                    return Vec::new();
                }
                self.agents.remove(&node);
                // Its parent's window may be waiting for it: tell the parent at once.
                if let Some(a) = self.wf.round_parent(&node).and_then(|p| self.agents.get(p)) {
                    let _ = a.tx.try_send(ToAgent::ChildGone(node.clone()));
                }
                vec![Event::NodeLost {
                    node,
                    reason: format!("agent connection lost: {reason}"),
                }]
            }
        }
    }

    /// An agent's Hello: welcomed (its token checked, once) while its node waits for one.
    fn hello(
        &mut self,
        hello: kd_proto::msg::Hello,
        conn: quinn::Connection,
        tx: mpsc::Sender<ToAgent>,
        reply: tokio::sync::oneshot::Sender<Result<(), kd_proto::msg::WireError>>,
        waiting: bool,
    ) -> Vec<Event> {
        match broadcast::check_hello(&hello, &self.tokens, &self.used, !waiting) {
            Ok(()) => {
                let node = hello.node.clone();
                self.used.insert(node.clone());
                let _ = reply.send(Ok(()));
                self.note(format!(
                    "{node}: agent connected from {} ({})",
                    conn.remote_address(),
                    describe_inventory(&hello.inventory)
                ));
                self.event(broadcast::Event::Connected {
                    node: node.clone(),
                    addr: conn.remote_address(),
                });
                self.agents.insert(
                    node.clone(),
                    Agent {
                        conn,
                        tx,
                        data_port: hello.data_port,
                    },
                );
                vec![Event::AgentHello { node }]
            }
            Err(e) => {
                self.note(format!(
                    "refused agent {:?} from {}: {e}",
                    hello.node,
                    conn.remote_address()
                ));
                self.event(broadcast::Event::Refused {
                    addr: conn.remote_address(),
                    reason: e.to_string(),
                });
                let _ = reply.send(Err(e));
                Vec::new()
            }
        }
    }

    async fn agent_message(&mut self, node: String, msg: ToCoord) -> Vec<Event> {
        match msg {
            ToCoord::StepEnd(end) => {
                let result = match end.error {
                    None => Ok(()),
                    Some(e) => Err(e),
                };
                let step = match end.step {
                    AgentStep::Prepare => Step::Prepare,
                    AgentStep::Finish => Step::Finish,
                };
                let result = match (step, result) {
                    (Step::Finish, Err(e)) => Err(format!("finishing the disk failed: {e}")),
                    (_, r) => r,
                };
                vec![Event::StepDone { node, step, result }]
            }
            ToCoord::Report(r) => {
                if let Some(u) = &self.updates {
                    let _ = u.send(Update::Received {
                        node: node.clone(),
                        bytes: r.progress.bytes_received,
                    });
                }
                self.progress.insert(node.clone(), r.progress.clone());
                self.reports
                    .insert(node.clone(), (r.clone(), Instant::now()));
                let (expected, chunks) = self
                    .source
                    .as_ref()
                    .map(|s| {
                        let m = &s.chunks.image().manifest;
                        (m.image_hash(), m.chunk_count())
                    })
                    .unzip();
                let error = match (&r.error, r.image_hash) {
                    (Some(e), _) => Some(e.clone()),
                    (None, Some(h)) if Some(h) == expected => None,
                    (None, _) => Some("the agent reported a different image hash".into()),
                };
                let result = match error {
                    None => {
                        self.note(format!(
                            "{node}: image verified and written ({} chunks, {} refused as corrupt, {} fetched again)",
                            r.progress.chunks, r.progress.corrupt_chunks, r.refetched_chunks
                        ));
                        Ok(())
                    }
                    Some(e) => Err(format!("broadcast failed: {e}")),
                };
                match result {
                    // Its own copy failed, every chunk verified: it can go on relaying.
                    Err(reason) if r.error.is_some() && Some(r.progress.chunks) == chunks => {
                        vec![Event::CopyFailed { node, reason }]
                    }
                    result => vec![Event::StepDone {
                        node,
                        step: Step::Broadcast,
                        result,
                    }],
                }
            }
            ToCoord::ParentLost {
                parent: lost,
                next_chunk,
                reason,
            } => {
                tracing::info!(%node, ?lost, next_chunk, %reason, "parent lost");
                // The coordinator cannot serve a chunk: no node can complete the image.
                if let Some(e) = self.source.as_ref().and_then(|s| s.chunks.failure()) {
                    return vec![Event::NodeFailed {
                        node,
                        reason: format!(
                            "broadcast failed: the coordinator cannot serve the image: {e}"
                        ),
                    }];
                }
                self.note(format!(
                    "{node}: lost its upstream {} at chunk {next_chunk}: {reason}",
                    lost.as_deref().unwrap_or("(the coordinator)")
                ));
                vec![Event::ParentLost { node, parent: lost }]
            }
            ToCoord::ChildLost { child, reason } => {
                tracing::info!(%node, %child, %reason, "child lost");
                Vec::new()
            }
            ToCoord::Progress(p) => {
                self.progress.insert(node.clone(), p.clone());
                self.event(broadcast::Event::Progress { node, progress: p });
                Vec::new()
            }
            ToCoord::Step(s) => {
                self.step_note(&node, &s);
                self.event(broadcast::Event::Step { node, step: s });
                Vec::new()
            }
            ToCoord::Hello(_) => Vec::new(),
            ToCoord::Probed(p) => {
                tracing::info!(%node, link = ?p.link, disk = ?p.disk, "rates measured (bytes per second)");
                if let Some(e) = &p.error {
                    self.note(format!("{node}: rate probe: {e}"));
                }
                vec![Event::RatesMeasured {
                    node,
                    link: p.link,
                    disk: p.disk,
                }]
            }
        }
    }
}

impl Driver {
    /// One line for an agent's step report (kexec's with its output: what it loaded).
    fn step_note(&self, node: &str, s: &StepReport) {
        let out = if s.step != "kexec" || s.output.is_empty() {
            String::new()
        } else {
            format!(": {}", s.output)
        };
        match &s.error {
            None => self.note(format!("{node}:   {} ok ({} ms){out}", s.step, s.millis)),
            Some(e) => self.note(format!(
                "{node}:   {} FAILED ({} ms): {e}",
                s.step, s.millis
            )),
        }
    }
}

fn describe_inventory(inv: &kd_proto::msg::Inventory) -> String {
    let disks: Vec<String> = inv
        .disks
        .iter()
        .map(|d| {
            format!(
                "{} {:.1} GiB",
                d.name,
                d.size_bytes as f64 / (1u64 << 30) as f64
            )
        })
        .collect();
    format!(
        "{} CPU, {} MiB RAM, {:?}, disks: {}",
        inv.cpus,
        inv.ram_bytes >> 20,
        inv.boot_mode,
        if disks.is_empty() {
            "none".to_string()
        } else {
            disks.join(", ")
        }
    )
}

/// The agents' work for `env` on `cluster`: the cluster's disk layout (or a default one: a BIOS
/// boot partition and the rest for the system) with the environment's file system on the deploy
/// partition, the SSH key, the boot loader settings and the post-install archives (`archives`:
/// the bytes of each of `env.postinstalls`, in order). Checked here, before any node reboots.
///
/// `deploy_partition` (`-p N`): the image goes to partition N of the layout instead of its
/// deploy partition, which is then kept untouched; the disk's partition table is not written
/// again but checked against the layout (the other partitions keep their data).
pub fn job_for(
    env: &Environment,
    cluster: &ClusterConfig,
    image_kind: kd_proto::manifest::ImageKind,
    ssh_key: Option<String>,
    archives: Vec<Vec<u8>>,
    deploy_partition: Option<u32>,
) -> Result<DeployJob> {
    use serde_norway::Value;
    let tar = image_kind == kd_proto::manifest::ImageKind::Tar;
    let fs = env.filesystem.clone().unwrap_or_else(|| "ext4".into());
    let mut layout = match &cluster.disk.layout {
        Value::Null => serde_norway::from_str::<Value>(&format!(
            "label: gpt\npartitions:\n  - {{ number: 1, size: 1MiB, role: bios_grub }}\n  - {{ number: 2, size: rest, role: deploy, fs: {fs} }}\n"
        ))
        .context("default layout")?,
        v => v.clone(),
    };
    let Value::Mapping(m) = &mut layout else {
        anyhow::bail!("the cluster's disk.layout must be a mapping (device, label, partitions)");
    };
    if !m.contains_key("device") {
        m.insert(
            Value::from("device"),
            Value::from(cluster.disk.block_device.clone()),
        );
    }
    let check = |layout: &Value| -> Result<(String, kd_disk::Layout)> {
        let text = serde_norway::to_string(layout).context("layout")?;
        let l = kd_disk::Layout::from_yaml(&text).map_err(|e| {
            anyhow::anyhow!(
                "the disk layout for environment {} is not usable: {e}",
                env.name
            )
        })?;
        Ok((text, l))
    };
    if let Some(n) = deploy_partition {
        // Sizes do not matter here (the agents check them against their disks): only whether
        // partition N of the cluster's own layout exists and may take the image.
        let (_, checked) = check(&layout)?;
        checked
            .resolve(1 << 50, Some(n))
            .map_err(|e| anyhow::anyhow!("-p {n}: {e}"))?;
    }
    if tar && env.filesystem.is_some() {
        if let Some(Value::Sequence(parts)) = layout.get_mut("partitions") {
            for p in parts.iter_mut() {
                if let Value::Mapping(pm) = p {
                    let target = match deploy_partition {
                        Some(n) => pm.get("number").and_then(Value::as_u64) == Some(u64::from(n)),
                        None => pm.get("role").and_then(Value::as_str) == Some("deploy"),
                    };
                    if target {
                        pm.insert(Value::from("fs"), Value::from(fs.clone()));
                    }
                }
            }
        }
    }
    let (text, _) = check(&layout)?;
    if env.postinstalls.len() != archives.len() {
        anyhow::bail!(
            "post-install archives: {} given, {} expected",
            archives.len(),
            env.postinstalls.len()
        );
    }
    let boot = env
        .boot
        .kernel
        .clone()
        .map(|kernel| kd_proto::msg::BootSpec {
            kernel,
            initrd: env.boot.initrd.clone(),
            params: env.boot.kernel_params.clone().unwrap_or_default(),
            bios: true,
            efi: true,
        });
    Ok(DeployJob {
        layout: text,
        deploy_partition,
        image: if tar {
            kd_proto::msg::DeployImage::Tar
        } else {
            kd_proto::msg::DeployImage::RawPartition
        },
        partition: deploy_partition.is_none(),
        environment: format!("{}:{}", env.name, env.version),
        ssh_key,
        boot,
        postinstalls: env
            .postinstalls
            .iter()
            .zip(archives)
            .map(|(p, archive)| kd_proto::msg::PostInstallSpec {
                name: p
                    .archive
                    .rsplit('/')
                    .next()
                    .unwrap_or(&p.archive)
                    .to_string(),
                archive,
                script: p.script.clone(),
            })
            .collect(),
        postinstall_timeout_secs: 300,
    })
}

/// A local path of an environment's `image.file` or post-install `archive` (absolute paths,
/// `server://` and `local://`); URLs are refused with the reason.
pub fn local_path(location: &str) -> Result<std::path::PathBuf> {
    let p = location
        .strip_prefix("server://")
        .or_else(|| location.strip_prefix("local://"))
        .unwrap_or(location);
    if p.starts_with("http://") || p.starts_with("https://") {
        anyhow::bail!("{location}: fetching images over HTTP is not supported yet; give a path on the coordinator");
    }
    Ok(std::path::PathBuf::from(p))
}

/// Points `node`'s PXE profile at its local disk (no token, no deploy kernel).
pub fn write_local_profile(cluster: &ClusterConfig, node: &str) -> Result<()> {
    let nc = cluster
        .node(node)
        .with_context(|| format!("{node} is not in cluster {}", cluster.cluster))?;
    let profile = cluster.render_profile(nc, &ProfileBoot::LocalDisk);
    write_profile(&profile.path, profile.content.as_bytes())
        .with_context(|| format!("cannot write the PXE profile {}", profile.path.display()))
}

/// Resolves an environment's file location (`server://`, `local://` or a path) against
/// `dir`, the environment file's directory.
pub fn env_path(location: &str, dir: &Path) -> Result<std::path::PathBuf> {
    let p = local_path(location)?;
    Ok(if p.is_relative() { dir.join(p) } else { p })
}

/// Refuses a file `uid` could not read itself (the daemon reads files on a user's behalf).
pub fn check_readable_by(path: &Path, uid: Option<u32>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(uid) = uid else { return Ok(()) };
    if uid == 0 {
        return Ok(());
    }
    let m = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let mode = m.mode();
    let ok = mode & 0o004 != 0 || (m.uid() == uid && mode & 0o400 != 0);
    if !ok {
        anyhow::bail!(
            "{}: not readable by uid {uid} (owner {}, mode {:o}): the daemon reads files only \
             for users who may read them",
            path.display(),
            m.uid(),
            mode & 0o7777
        );
    }
    Ok(())
}

/// Checks that `text` holds an SSH public key.
pub fn check_ssh_key(text: &str) -> Result<()> {
    let ok = text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("ssh-") || l.starts_with("ecdsa-") || l.starts_with("sk-")
    });
    if !ok {
        anyhow::bail!("this does not look like an SSH public key (ssh-ed25519 AAAA...)");
    }
    Ok(())
}

/// What a deployment request names for [`prepare`].
pub struct JobInputs<'a> {
    /// The environment.
    pub env: &'a Environment,
    /// Directory its relative paths are resolved against.
    pub env_dir: &'a Path,
    /// Public SSH key text.
    pub ssh_key: Option<String>,
    /// Partition instead of the layout's deploy partition.
    pub partition: Option<u32>,
    /// Files must be readable by this uid (the daemon reads them for a user).
    pub reader: Option<u32>,
}

/// Everything a deployment needs besides its nodes: the image (packed once into
/// `STATE/images` when the environment names a plain archive) and the agents' job.
pub fn prepare(
    state: &Path,
    cluster: &ClusterConfig,
    inputs: &JobInputs<'_>,
    say: &dyn Fn(String),
) -> Result<(ImageFile, DeployJob)> {
    let JobInputs {
        env,
        env_dir,
        ssh_key,
        partition,
        reader,
    } = inputs;
    let (env, reader) = (*env, *reader);
    if let Some(k) = ssh_key {
        check_ssh_key(k)?;
    }
    let mut archives = Vec::new();
    for p in &env.postinstalls {
        let path = env_path(&p.archive, env_dir)?;
        check_readable_by(&path, reader)?;
        archives.push(
            std::fs::read(&path)
                .with_context(|| format!("post-install archive {}", path.display()))?,
        );
    }
    let source = env_path(&env.image.file, env_dir)?;
    check_readable_by(&source, reader)?;
    let image_path = image_for(&source, &state.join("images"), say)?;
    let img = ImageFile::open(&image_path)?;
    let job = job_for(
        env,
        cluster,
        img.manifest.kind,
        ssh_key.clone(),
        archives,
        *partition,
    )?;
    Ok((img, job))
}

/// The kd image for an environment's image file: the file itself when it is a `.kdi`,
/// otherwise `cache_dir/HASH.kdi`, packed once. Content-addressed: HASH is the blake3 of the
/// file's bytes, so two paths to the same bytes share one pack and a changed file is packed
/// again. The hash of a file is remembered in `image-sources/` beside `cache_dir`, by path,
/// size and modification time: an unchanged file is not read again.
pub fn image_for(
    file: &Path,
    cache_dir: &Path,
    notes: &dyn Fn(String),
) -> Result<std::path::PathBuf> {
    let meta = std::fs::metadata(file)
        .with_context(|| format!("the environment's image {}", file.display()))?;
    if file.extension().is_some_and(|e| e == "kdi") {
        return Ok(file.to_path_buf());
    }
    let abs = std::fs::canonicalize(file)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let fingerprint =
        blake3::hash(format!("{}\0{}\0{mtime}", abs.display(), meta.len()).as_bytes());
    let sources = cache_dir
        .parent()
        .unwrap_or(cache_dir)
        .join("image-sources");
    let remembered = sources.join(fingerprint.to_hex().as_str());
    let known = std::fs::read_to_string(&remembered)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    let hash = match known {
        Some(h) => h,
        None => {
            let t = Instant::now();
            let mut hasher = blake3::Hasher::new();
            let f = std::fs::File::open(&abs)
                .with_context(|| format!("the environment's image {}", abs.display()))?;
            hasher
                .update_reader(f)
                .with_context(|| format!("reading {}", abs.display()))?;
            let h = hasher.finalize().to_hex().to_string();
            notes(format!(
                "{}: content hash {} ({:.1} MiB in {:.1} s)",
                file.display(),
                &h[..16],
                meta.len() as f64 / 1048576.0,
                t.elapsed().as_secs_f64()
            ));
            crate::fsutil::write_atomic(&remembered, format!("{h}\n").as_bytes(), 0o644)
                .with_context(|| format!("cannot write {}", remembered.display()))?;
            h
        }
    };
    let out = cache_dir.join(format!("{}.kdi", &hash[..32]));
    if out.exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    // One packer at a time (the directory is the lock): a second deployment of the same new
    // environment waits for the first one's pack and uses it.
    let lock = std::fs::File::open(cache_dir)
        .with_context(|| format!("cannot open {}", cache_dir.display()))?;
    if lock.try_lock().is_err() {
        notes(format!(
            "waiting for another deployment packing into {}",
            cache_dir.display()
        ));
        lock.lock()
            .with_context(|| format!("cannot lock {}", cache_dir.display()))?;
    }
    if out.exists() {
        return Ok(out);
    }
    notes(format!(
        "packing {} ({:.1} MiB) into {} (once)",
        file.display(),
        meta.len() as f64 / 1048576.0,
        out.display()
    ));
    let t = Instant::now();
    // pack writes beside `out` under a name of its own and renames: two deployments packing
    // the same new environment at once each finish with a whole file.
    crate::image::pack(&abs, &out, &crate::image::PackOptions::default())
        .with_context(|| format!("cannot pack {}", file.display()))?;
    notes(format!("packed in {:.1} s", t.elapsed().as_secs_f64()));
    Ok(out)
}

/// Runs `cmd` with `sh -c`, killed after `limit`. A non-zero exit carries the end of its output.
async fn run_shell(cmd: &str, limit: Duration) -> CommandStatus {
    match run_shell_output(cmd, limit).await {
        Ok(_) => CommandStatus::Exited(0),
        Err(e) => CommandStatus::Failed(e),
    }
}

/// Runs `cmd` with `sh -c`, killed after `limit`: its standard output when it exits 0,
/// otherwise why not (exit status or signal, and the tail of what it said).
pub(crate) async fn run_shell_output(cmd: &str, limit: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return Err(format!("cannot run {cmd:?}: {e}")),
    };
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => Err(format!("killed after {} s", limit.as_secs())),
        Ok(Err(e)) => Err(format!("{cmd:?}: {e}")),
        Ok(Ok(out)) => match out.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&out.stdout).to_string()),
            code => {
                let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if text.is_empty() {
                    text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                }
                let tail: String = text
                    .chars()
                    .rev()
                    .take(300)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                match code {
                    Some(c) => Err(format!("exit status {c}: {tail}")),
                    None => Err(format!("killed by a signal: {tail}")),
                }
            }
        },
    }
}

/// Writes a profile through a temporary file and a rename (a node never reads half a
/// profile). Mode 0644: the TFTP and HTTP servers read it.
fn write_profile(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::fsutil::write_atomic(path, bytes, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shell_commands_report_their_failure() {
        assert_eq!(
            run_shell("true", Duration::from_secs(5)).await,
            CommandStatus::Exited(0)
        );
        match run_shell("echo no such node >&2; exit 3", Duration::from_secs(5)).await {
            CommandStatus::Failed(m) => assert!(m.contains("exit status 3: no such node"), "{m}"),
            other => panic!("{other:?}"),
        }
        match run_shell("sleep 5", Duration::from_millis(200)).await {
            CommandStatus::Failed(m) => assert!(m.contains("killed after"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    const CLUSTER: &str = "cluster: t
nodes:
  - {name: n1, address: 127.0.0.11, mac: \"52:54:00:00:00:01\"}
pxe: {tftp_root: /tmp/x, profile_naming: mac}
commands:
  reboot: {soft: echo HOSTNAME}
coordinator: {address: 127.0.0.1}
";
    const ENV: &str = "name: e
version: 2
image: {file: /e.tar.zst, kind: tar}
boot: {kernel: /vmlinuz, initrd: /initrd.img, kernel_params: rw}
filesystem: xfs
";

    #[test]
    fn job_from_environment_and_cluster() {
        use kd_proto::manifest::ImageKind;
        let env = Environment::parse(ENV).unwrap();
        // No layout in the cluster: the default one, on the cluster's disk, with the env's fs.
        let mut cluster = ClusterConfig::parse(&format!("{CLUSTER}disk: /dev/sdb\n")).unwrap();
        let job = job_for(
            &env,
            &cluster,
            ImageKind::Tar,
            Some("ssh-ed25519 K".into()),
            vec![],
            None,
        )
        .unwrap();
        let l = kd_disk::Layout::from_yaml(&job.layout).unwrap();
        assert_eq!(l.device, std::path::PathBuf::from("/dev/sdb"));
        assert!(
            job.layout.contains("bios_grub") && job.layout.contains("xfs"),
            "{}",
            job.layout
        );
        assert_eq!(job.environment, "e:2");
        assert_eq!(job.image, kd_proto::msg::DeployImage::Tar);
        assert_eq!(job.ssh_key.as_deref(), Some("ssh-ed25519 K"));
        let boot = job.boot.unwrap();
        assert_eq!(
            (boot.kernel.as_str(), boot.params.as_str()),
            ("/vmlinuz", "rw")
        );
        // The cluster's layout is kept; its deploy partition takes the env's file system.
        cluster = ClusterConfig::parse(&format!(
            "{CLUSTER}disk:\n  block_device: /dev/vda\n  layout:\n    label: msdos\n    partitions:\n      - {{number: 1, size: 256MiB, role: swap, fs: swap}}\n      - {{number: 2, size: rest, role: deploy, fs: ext4}}\n"
        ))
        .unwrap();
        let job = job_for(&env, &cluster, ImageKind::Tar, None, vec![], None).unwrap();
        assert!(
            job.layout.contains("msdos") && job.layout.contains("xfs"),
            "{}",
            job.layout
        );
        assert!(!job.layout.contains("ext4"), "{}", job.layout);
        assert!(job.partition && job.deploy_partition.is_none());
        // -p: another partition takes the image (and the env's file system); the table stays.
        let three = format!(
            "{CLUSTER}disk:\n  block_device: /dev/vda\n  layout:\n    label: gpt\n    partitions:\n      - {{number: 1, size: 1MiB, role: bios_grub}}\n      - {{number: 2, size: 4GiB, role: deploy, fs: ext4}}\n      - {{number: 3, size: rest, role: tmp, fs: ext4}}\n"
        );
        let c3 = ClusterConfig::parse(&three).unwrap();
        let job = job_for(&env, &c3, ImageKind::Tar, None, vec![], Some(3)).unwrap();
        assert_eq!(job.deploy_partition, Some(3));
        assert!(
            !job.partition,
            "-p must not write the partition table again"
        );
        let l = kd_disk::Layout::from_yaml(&job.layout).unwrap();
        let plan = l.resolve(16 << 30, Some(3)).unwrap();
        let d = plan.deploy().unwrap();
        assert_eq!((d.number, d.fs), (3, Some(kd_disk::FsType::Xfs)));
        for (n, want) in [
            (9, "not in the layout"),
            (1, "cannot be the deploy partition"),
        ] {
            let e = job_for(&env, &c3, ImageKind::Tar, None, vec![], Some(n)).unwrap_err();
            assert!(format!("{e:#}").contains(want), "-p {n}: {e:#}");
        }
        // A raw image keeps the layout's file system; a broken layout is refused up front.
        let job = job_for(&env, &cluster, ImageKind::Raw, None, vec![], None).unwrap();
        assert!(job.layout.contains("ext4"));
        cluster = ClusterConfig::parse(&format!(
            "{CLUSTER}disk:\n  block_device: /dev/vda\n  layout:\n    label: gpt\n    partitions: []\n"
        ))
        .unwrap();
        let e = job_for(&env, &cluster, ImageKind::Tar, None, vec![], None).unwrap_err();
        assert!(format!("{e:#}").contains("not usable"), "{e:#}");
    }

    #[test]
    fn image_locations() {
        assert_eq!(
            local_path("server:///srv/a.kdi").unwrap(),
            std::path::PathBuf::from("/srv/a.kdi")
        );
        assert_eq!(
            local_path("/srv/a.tar").unwrap(),
            std::path::PathBuf::from("/srv/a.tar")
        );
        assert!(local_path("http://x/a.tar").is_err());
    }

    /// What "replaced whole" means for a profile writer, checked on `write`: the new content
    /// replaces the old (not appended, not mixed), through a new file renamed into place (a
    /// reader that opened the old file keeps reading the old content whole: it is never
    /// truncated or rewritten in place), readers running meanwhile only ever see one whole
    /// version, and no temporary file stays.
    fn check_replaced_whole(write: fn(&Path, &[u8]) -> std::io::Result<()>) -> Result<(), String> {
        use std::io::Read;
        let d = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = d.path().join("nodes/a.ipxe");
        let version = |b: u8| vec![b; 256 * 1024];
        write(&p, &version(b'a')).map_err(|e| e.to_string())?;
        let mut old = std::fs::File::open(&p).map_err(|e| e.to_string())?;
        write(&p, &version(b'b')).map_err(|e| e.to_string())?;
        let mut seen = Vec::new();
        old.read_to_end(&mut seen).map_err(|e| e.to_string())?;
        if seen != version(b'a') {
            return Err("a reader of the old file saw it change: written in place".into());
        }
        if std::fs::read(&p).map_err(|e| e.to_string())? != version(b'b') {
            return Err("the new content is not exactly what was written".into());
        }
        // Readers while versions alternate (bounded: 200 writes).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let t0 = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && t0.elapsed() < Duration::from_secs(20)
                {
                    let Ok(b) = std::fs::read(&p) else { continue };
                    let whole = b.len() == 256 * 1024 && b.iter().all(|&x| x == b[0]);
                    if !whole {
                        return Err(format!(
                            "a reader saw a partial profile ({} bytes)",
                            b.len()
                        ));
                    }
                }
                Ok(())
            })
        };
        let mut result = Ok(());
        for i in 0..200u32 {
            if let Err(e) = write(&p, &version(b'c' + (i % 2) as u8)) {
                result = Err(e.to_string());
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().map_err(|_| "reader panicked".to_string())??;
        result?;
        let left = std::fs::read_dir(d.path().join("nodes"))
            .map_err(|e| e.to_string())?
            .count();
        if left != 1 {
            return Err(format!(
                "{left} files in the directory: a temporary file stayed"
            ));
        }
        Ok(())
    }

    #[test]
    fn profiles_are_replaced_whole() {
        assert_eq!(check_replaced_whole(write_profile), Ok(()));
        // The check fails for writers that are not atomic: in place, or appending.
        let in_place: fn(&Path, &[u8]) -> std::io::Result<()> = |p, b| {
            std::fs::create_dir_all(p.parent().unwrap())?;
            std::fs::write(p, b)
        };
        let e = check_replaced_whole(in_place).unwrap_err();
        assert!(e.contains("in place") || e.contains("partial"), "{e}");
        let appending: fn(&Path, &[u8]) -> std::io::Result<()> = |p, b| {
            use std::io::Write;
            std::fs::create_dir_all(p.parent().unwrap())?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            f.write_all(b)
        };
        assert!(check_replaced_whole(appending).is_err());
        assert_eq!(crate::tokens::random_token().unwrap().len(), 32);
    }

    #[tokio::test]
    async fn a_failed_nodes_profile_no_longer_boots_the_deploy_kernel() {
        use crate::workflow::{NodeReport, NodeResult};
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("img.raw");
        std::fs::write(&raw, vec![1u8; 8192]).unwrap();
        let kdi = d.path().join("img.kdi");
        crate::image::pack(&raw, &kdi, &crate::image::PackOptions::default()).unwrap();
        let tftp = d.path().join("tftp");
        let cluster = ClusterConfig::parse(&format!(
            "{}disk: /dev/sdb\n",
            CLUSTER.replace("/tmp/x", tftp.to_str().unwrap())
        ))
        .unwrap();
        let env = Environment::parse(ENV).unwrap();
        let job = job_for(
            &env,
            &cluster,
            kd_proto::manifest::ImageKind::Raw,
            None,
            vec![],
            None,
        )
        .unwrap();
        let path = cluster
            .render_profile(&cluster.nodes[0], &ProfileBoot::LocalDisk)
            .path;
        let cfg = DeployConfig {
            cluster,
            nodes: vec!["n1".into()],
            job,
            arity: Arity::Chain,
            deployment: 1,
            listen: None,
        };
        let (ev_tx, _ev_rx) = mpsc::unbounded_channel();
        let (notes, _notes_rx) = mpsc::unbounded_channel();
        let source = Arc::new(Source::new(
            ImageFile::open(&kdi).unwrap(),
            1,
            broadcast::Liveness::default(),
        ));
        let id = CoordIdentity::generate().unwrap();
        let mut drv = Driver::new(
            Setup::deploy(cfg),
            &id,
            Some(source),
            ev_tx,
            notes,
            Instant::now(),
        )
        .unwrap();
        let ev = drv
            .execute(Action::WritePxe {
                node: "n1".into(),
                profile: PxeKind::Deploy,
            })
            .await;
        assert_eq!(
            ev,
            vec![Event::PxeWritten {
                node: "n1".into(),
                result: Ok(())
            }]
        );
        let token = drv.tokens["n1"].clone();
        let deploy = std::fs::read_to_string(&path).unwrap();
        assert!(deploy.contains(&format!("kd.token={token}")), "{deploy}");
        drv.execute(Action::NodeDone {
            node: "n1".into(),
            report: NodeReport {
                node: "n1".into(),
                result: NodeResult::Failed {
                    step: Step::Prepare,
                    reason: "disk too small".into(),
                },
                steps: vec![],
                barrier_wait: Duration::ZERO,
                total: Duration::ZERO,
            },
        })
        .await;
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            !after.contains("kd.token") && !after.contains(&token) && after.contains("sanboot"),
            "{after}"
        );
        // The token is revoked: an agent booted with it is refused.
        let hello = kd_proto::msg::Hello {
            version: kd_proto::PROTOCOL_VERSION,
            node: "n1".into(),
            token,
            data_port: 1,
            inventory: Default::default(),
        };
        assert!(broadcast::check_hello(&hello, &drv.tokens, &drv.used, false).is_err());
    }
}
