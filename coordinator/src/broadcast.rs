//! The coordinator's side of a broadcast's data and connections: accept agents (admission,
//! handshake, Hello, routing to their deployment's driver), serve the roots and repairs from
//! the image file, and write each round's plans. Who is in the tree, who re-attaches where and
//! when a node is done are the workflow's (`crate::workflow`), executed by `crate::deploy`'s
//! driver; `run` (`kd-coord broadcast`) is that driver with the broadcast-only profile.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kd_net::wire;
use kd_proto::msg::{
    Asked, DataFrame, DataRequest, ErrorCode, Hello, Job, PeerInfo, Plan, Progress, Report,
    ToAgent, ToCoord, Upstream, Welcome, WireError, DATA_REQUEST_WAIT,
};
use kd_proto::tree::Arity;
use tokio::sync::{mpsc, oneshot};

use crate::image::ImageFile;
use crate::pki::{CoordIdentity, DeploymentCa};

/// What to broadcast to whom.
#[derive(Debug, Clone)]
pub struct BroadcastConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The nodes, in tree order.
    pub nodes: Vec<String>,
    /// The one-time token of each node.
    pub tokens: HashMap<String, String>,
    /// Tree shape.
    pub arity: Arity,
    /// How long to wait for every agent's Hello.
    pub hello_timeout: Duration,
    /// How long the transfer may take once planned.
    pub run_timeout: Duration,
    /// Deployment identifier.
    pub deployment: u64,
    /// What the agents do with the image.
    pub job: Job,
    /// Each node's rack (the tree enters each rack once); empty: the plain plan.
    pub racks: std::collections::BTreeMap<String, String>,
    /// How silence is judged, on the agents' side and on the coordinator's.
    pub liveness: Liveness,
}

/// How silence is judged: the plans' stall limits (an agent's patience with a silent upstream)
/// and how long the coordinator hears nothing from an agent before it counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// An agent's connection that brought no packet for this long is closed and the agent
    /// lost (its QUIC keep-alives come every [`kd_net::endpoint::KEEP_ALIVE`]): a killed or
    /// frozen relay is replaced within seconds instead of QUIC's idle timeout
    /// ([`kd_net::endpoint::IDLE_TIMEOUT`], which still applies beyond this).
    pub agent_silence: Duration,
    /// What each plan tells its agent (`None`: the agents' own settings).
    pub stall: Option<kd_proto::msg::StallLimits>,
}

/// Default [`Liveness::agent_silence`]: three keep-alives missed.
pub const AGENT_SILENCE: Duration = Duration::from_secs(6);

impl Default for Liveness {
    fn default() -> Self {
        Self {
            agent_silence: AGENT_SILENCE,
            stall: None,
        }
    }
}

impl Liveness {
    /// A cluster's settings (`workflow.stall_floor`, `stall_timeout`, `agent_silence`).
    pub fn of_cluster(w: &crate::config::WorkflowConfig) -> Self {
        Self {
            agent_silence: Duration::from_secs(w.agent_silence),
            stall: Some(kd_proto::msg::StallLimits {
                floor_ms: w.stall_floor.saturating_mul(1000),
                timeout_ms: w.stall_timeout.saturating_mul(1000),
            }),
        }
    }
}

/// Something that happened, for live progress.
#[derive(Debug, Clone)]
pub enum Event {
    /// The endpoint is listening.
    Listening(SocketAddr),
    /// An agent was accepted.
    Connected {
        /// Node.
        node: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// A connection was refused.
    Refused {
        /// Remote address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The tree was planned.
    Planned {
        /// (node, parent) pairs; parent `None` is the coordinator.
        edges: Vec<(String, Option<String>)>,
        /// The tree's shape in words (`chain`, `auto: chain of 15 at 11.8 MB/s, ...`).
        shape: String,
    },
    /// Progress of a node.
    Progress {
        /// Node.
        node: String,
        /// Counters.
        progress: Progress,
    },
    /// A node got a new upstream.
    Reparented {
        /// Node.
        node: String,
        /// New parent (`None`: the coordinator).
        parent: Option<String>,
    },
    /// A disk-pipeline step ended on a node.
    Step {
        /// Node.
        node: String,
        /// The step.
        step: kd_proto::msg::StepReport,
    },
    /// A node finished (ok or not).
    Done {
        /// Node.
        node: String,
        /// `None` if ok.
        error: Option<String>,
    },
}

/// How one node ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeOutcome {
    /// Node name.
    pub node: String,
    /// True when the node verified and wrote the whole image.
    pub ok: bool,
    /// Why not.
    pub reason: Option<String>,
    /// Seconds from the plan (an `auto` tree: from the start of its rate probe) to the
    /// node's report.
    pub seconds: Option<f64>,
    /// The node's final report.
    #[serde(skip)]
    pub report: Option<Report>,
    /// CPU seconds the agent used.
    pub cpu_seconds: Option<f64>,
    /// Chunks the node refused as corrupt.
    pub corrupt_chunks: u32,
    /// Chunks fetched again.
    pub refetched_chunks: u32,
    /// Of those, the chunks another node served (swarm repair).
    pub refetched_from_peers: u32,
}

/// The result of a broadcast.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// Per node, in the configured order.
    pub nodes: Vec<NodeOutcome>,
    /// Seconds from the plan (an `auto` tree: from the start of its rate probe) to the last
    /// report.
    pub transfer_seconds: f64,
    /// Of those, the rate probe's (0 without one).
    pub probe_seconds: f64,
    /// Compressed image size.
    pub compressed_bytes: u64,
    /// The image hash.
    pub image_hash: String,
    /// Repairs (single chunks) the coordinator served itself.
    pub repairs_served: u64,
    /// Repairs the coordinator sent to a peer that held the chunk (swarm repair).
    pub repairs_redirected: u64,
}

impl Outcome {
    /// True when every node verified the image.
    pub fn all_ok(&self) -> bool {
        self.nodes.iter().all(|n| n.ok)
    }
}

/// What a connection task tells the main loop (shared by `broadcast` and `deploy`).
pub(crate) enum Inbound {
    /// An agent said Hello; answer on `reply` (Ok: Welcome, Err: refused and closed).
    Hello {
        hello: Hello,
        conn: quinn::Connection,
        tx: mpsc::Sender<ToAgent>,
        reply: oneshot::Sender<Result<(), WireError>>,
    },
    Msg {
        node: String,
        msg: ToCoord,
    },
    Lost {
        node: String,
        /// `quinn::Connection::stable_id` of the lost connection.
        conn_id: usize,
        reason: String,
    },
    /// `node` asks the coordinator for chunk `index` again: answer with a peer that holds it
    /// (which is told to accept `node`), or `None` for the coordinator to serve it.
    Repair {
        node: String,
        index: u32,
        /// A node that does not hold it (the asker's upstream said so).
        avoid: Option<String>,
        reply: oneshot::Sender<Option<PeerInfo>>,
    },
}

/// Shared, read-only state of the data service.
pub(crate) struct Source {
    /// The image served, each chunk read and checked once for all streams.
    pub(crate) chunks: crate::chunks::ChunkCache,
    /// Data requests must name this deployment.
    pub(crate) deployment: u64,
    /// The root streams move in step (see `kd_net::pace`), each with the streams of its pace
    /// group: a node's speed class in an `auto` tree (`pace_groups`, set at each plan; a node
    /// not in it is in group 0).
    pub(crate) pacer: kd_net::pace::Pacer,
    pub(crate) pace_groups: std::sync::Mutex<HashMap<String, u64>>,
    /// How that deployment judges silence.
    pub(crate) liveness: Liveness,
    /// Repairs served here, and sent to a peer instead.
    pub(crate) repairs_served: std::sync::atomic::AtomicU64,
    pub(crate) repairs_redirected: std::sync::atomic::AtomicU64,
}

impl Source {
    /// Serves `image` to the streams of `deployment`.
    pub(crate) fn new(image: ImageFile, deployment: u64, liveness: Liveness) -> Self {
        Self {
            chunks: crate::chunks::ChunkCache::new(image),
            deployment,
            pacer: Default::default(),
            pace_groups: Default::default(),
            liveness,
            repairs_served: Default::default(),
            repairs_redirected: Default::default(),
        }
    }
}

/// Runs a whole broadcast (`kd-coord broadcast`) with the one driver of every deployment and
/// the workflow's broadcast-only profile (`deploy::broadcast`). `events` receives live progress
/// (dropped events are fine).
pub async fn run(
    image: ImageFile,
    cfg: BroadcastConfig,
    identity: &CoordIdentity,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Outcome> {
    crate::deploy::broadcast(image, cfg, identity, events).await
}

/// Where an accepted agent's messages go: one deployment's driver and image.
#[derive(Clone)]
pub(crate) struct Route {
    /// The driver's inbox.
    pub(crate) in_tx: mpsc::Sender<Inbound>,
    /// The image that deployment serves.
    pub(crate) source: Arc<Source>,
    /// The driver's event channel (refusals after Hello).
    pub(crate) events: mpsc::UnboundedSender<Event>,
}

/// How an endpoint routes agents: to its only deployment, or by node name to the deployment
/// that holds the node (a daemon's one endpoint serves every deployment at once; a node is
/// in at most one deployment).
#[derive(Clone)]
pub(crate) enum Routes {
    /// Every agent goes to this deployment.
    One(Route),
    /// Agents go to the deployment that registered their node.
    ByNode(RouteTable),
}

/// Node name → deployment, shared between an endpoint and the deployments that use it.
#[derive(Clone, Default)]
pub struct RouteTable(Arc<std::sync::RwLock<HashMap<String, Route>>>);

impl RouteTable {
    /// Sends `nodes`' agents to `route` (replacing any previous route of theirs).
    pub(crate) fn register(&self, nodes: &[String], route: &Route) {
        let mut t = self.0.write().unwrap_or_else(|p| p.into_inner());
        for n in nodes {
            t.insert(n.clone(), route.clone());
        }
    }

    /// Forgets `nodes` (their deployment is over).
    pub(crate) fn unregister(&self, nodes: &[String]) {
        let mut t = self.0.write().unwrap_or_else(|p| p.into_inner());
        for n in nodes {
            t.remove(n);
        }
    }

    fn get(&self, node: &str) -> Option<Route> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// Nodes routed now.
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no node is routed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Accepts connections on `endpoint` until it closes; each one is handled by its own task that
/// reports to its route. `events` receives the refusals made before a route is known.
///
/// Connections are admitted a few at a time ([`Slots`], in the order they arrived): a storm of
/// agents (a whole cluster rebooted at once) is served at the rate the machine can handshake,
/// and the others wait their turn unaccepted, which costs quinn their first packets only. The
/// slots follow how long admitted handshakes take (fewer when they take long: a machine that
/// cannot serve more gets no more at once). An admitted handshake and Hello fail only on the
/// agent's own silence ([`HANDSHAKE_QUIET`], the coordinator's own lateness not counted), not
/// on the wall time a saturated machine takes: no agent is refused for waiting.
pub(crate) fn spawn_accept(
    endpoint: &quinn::Endpoint,
    routes: Routes,
    events: mpsc::UnboundedSender<Event>,
) -> tokio::task::JoinHandle<()> {
    let endpoint = endpoint.clone();
    let admission = Admission::new(handshake_slots());
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let arrived = tokio::time::Instant::now();
            let admission = admission.clone();
            let (routes, events) = (routes.clone(), events.clone());
            tokio::spawn(async move {
                if let Some(permit) = admission.admit(&incoming, arrived).await {
                    handle_connection(incoming, Some(permit), routes, events).await;
                } else {
                    // The endpoint closed, or the peer stopped waiting: no answer is owed.
                    incoming.ignore();
                }
            });
        }
        // The endpoint is closed: connections still waiting are not admitted any more.
        admission.sem.close();
    })
}

/// Most connections in their handshake (QUIC and TLS, the control stream, the Hello) at once.
/// A coordinator's share of a handshake is a signature and a key exchange (well under a
/// millisecond); what takes time under a storm is each agent's own turn on a busy host, so
/// enough are in flight to keep the machine busy. [`Slots`] lowers it while handshakes take
/// long.
pub(crate) fn handshake_slots() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (32 * cores).clamp(64, 512)
}

/// Fewest handshake slots [`Slots`] goes down to.
pub(crate) const MIN_SLOTS: usize = 8;
/// A handshake (admission to Hello) that took longer than this was slow: one slot less.
pub(crate) const SLOW_HANDSHAKE: Duration = Duration::from_secs(2);
/// One that took less than this was quick: one slot more (up to the most).
pub(crate) const QUICK_HANDSHAKE: Duration = Duration::from_millis(500);

/// How many handshakes may run at once, adapted to how long they take (pure: durations in,
/// slot changes out). Starts at the most; each slow handshake takes one slot away (down to
/// [`MIN_SLOTS`]), each quick one gives one back: under a storm that saturates the machine,
/// fewer handshakes share it and each one finishes sooner, instead of many crawling towards
/// their limits together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slots {
    target: usize,
    max: usize,
}

/// What to do with a finished handshake's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotChange {
    /// Give it back.
    Keep,
    /// Give it back, and one more.
    Grow,
    /// Do not give it back.
    Shrink,
}

impl Slots {
    /// At most `max` slots (at least [`MIN_SLOTS`]), all open.
    pub(crate) fn new(max: usize) -> Self {
        let max = max.max(MIN_SLOTS);
        Self { target: max, max }
    }

    /// Slots now.
    pub(crate) fn target(&self) -> usize {
        self.target
    }

    /// A handshake ended `took` after its admission (Hello read, or failed).
    pub(crate) fn done(&mut self, took: Duration) -> SlotChange {
        if took >= SLOW_HANDSHAKE && self.target > MIN_SLOTS {
            self.target -= 1;
            SlotChange::Shrink
        } else if took < QUICK_HANDSHAKE && self.target < self.max {
            self.target += 1;
            SlotChange::Grow
        } else {
            SlotChange::Keep
        }
    }
}

/// The admission of connections: a semaphore of [`Slots`].
#[derive(Clone)]
struct Admission {
    sem: Arc<tokio::sync::Semaphore>,
    slots: Arc<std::sync::Mutex<Slots>>,
}

/// A connection's handshake slot; given back (or not, see [`Slots`]) when dropped.
pub(crate) struct Admitted {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    slots: Arc<std::sync::Mutex<Slots>>,
    at: tokio::time::Instant,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let took = self.at.elapsed();
        let change = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .done(took);
        match change {
            SlotChange::Keep => drop(permit),
            SlotChange::Grow => {
                let sem = permit.semaphore().clone();
                drop(permit);
                sem.add_permits(1);
            }
            SlotChange::Shrink => {
                permit.forget();
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    "slow handshake: one handshake slot less"
                );
            }
        }
    }
}

impl Admission {
    fn new(max: usize) -> Self {
        let slots = Slots::new(max);
        Self {
            sem: Arc::new(tokio::sync::Semaphore::new(slots.target())),
            slots: Arc::new(std::sync::Mutex::new(slots)),
        }
    }

    /// Waits for a handshake slot for `incoming` (which arrived at `arrived`): `None` when the
    /// endpoint closed or the peer has stopped waiting ([`ADMISSION_WAIT`]).
    async fn admit(
        &self,
        incoming: &quinn::Incoming,
        arrived: tokio::time::Instant,
    ) -> Option<Admitted> {
        let deadline = arrived + ADMISSION_WAIT;
        let permit = tokio::time::timeout_at(deadline, self.sem.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        let waited = arrived.elapsed();
        if waited >= Duration::from_secs(1) {
            tracing::debug!(
                peer = %incoming.remote_address(),
                waited_ms = waited.as_millis() as u64,
                "connection admitted after waiting its turn"
            );
        }
        Some(Admitted {
            permit: Some(permit),
            slots: self.slots.clone(),
            at: tokio::time::Instant::now(),
        })
    }
}

/// Longest a connection waits for admission. A client that has heard nothing for its idle
/// timeout (kd's: [`kd_net::endpoint::IDLE_TIMEOUT`], from its first packet, which came before
/// it arrived here) has given up and connects again: its old attempt is then ignored.
const ADMISSION_WAIT: Duration = kd_net::endpoint::IDLE_TIMEOUT;

/// An admitted connection's handshake, control stream and Hello fail when the agent sent no
/// packet for this long (a live agent's handshake packets are retransmitted within a second or
/// two, and then come its keep-alives); time the coordinator itself did not run does not count
/// ([`silent_for`]). Wall time does not count either: on a saturated machine an agent may wait
/// seconds for its turn on a CPU while it still speaks.
const HANDSHAKE_QUIET: Duration = Duration::from_secs(10);
/// Each of those steps takes at most this long in all (a peer that keeps sending but never
/// gets on).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(60);

/// Waits for `step` while the agent on `conn` speaks: `Err` with why once it has been silent
/// for [`HANDSHAKE_QUIET`] or the step took [`HANDSHAKE_LIMIT`].
async fn while_heard<T>(
    conn: &quinn::Connection,
    step: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    tokio::select! {
        r = step => Ok(r),
        quiet = silent_for(conn, HANDSHAKE_QUIET) => {
            Err(format!("no packet from the agent for {:.1} s", quiet.as_secs_f64()))
        }
        _ = tokio::time::sleep(HANDSHAKE_LIMIT) => {
            Err(format!("not done in {} s", HANDSHAKE_LIMIT.as_secs()))
        }
    }
}

/// One round's tree: each node's parent (`None`: the coordinator), its peer address and
/// certificate fingerprint, and the plan to send it.
pub(crate) struct PlannedRound {
    /// Parent of each node.
    pub(crate) parent: HashMap<String, Option<String>>,
    /// Peer address and fingerprint of each node.
    pub(crate) info: HashMap<String, PeerInfo>,
    /// The plan of each node, in `live` order.
    pub(crate) plans: Vec<(String, Plan)>,
}

/// Issues each node of `live` its certificate from `ca` and writes every node's plan for the
/// tree `parents` (`parents[i]`: the index in `live` of node i's parent, `None`: the
/// coordinator). `data_addr` gives the address a node serves children on; `source` gives the
/// deployment, its manifest and the stall limits every plan carries.
pub(crate) fn plan_round(
    live: &[String],
    parents: &[Option<usize>],
    ca: &DeploymentCa,
    data_addr: impl Fn(&str) -> Option<SocketAddr>,
    source: &Source,
    job: &Job,
) -> Result<PlannedRound> {
    let (deployment, stall) = (source.deployment, source.liveness.stall);
    let manifest = &source.chunks.image().manifest;
    anyhow::ensure!(
        parents.len() == live.len()
            && parents
                .iter()
                .enumerate()
                .all(|(i, p)| p.is_none_or(|p| p < live.len() && p != i)),
        "a tree of {} parents for {} nodes",
        parents.len(),
        live.len()
    );
    let parent_of = |i: usize| parents.get(i).copied().flatten();
    let mut kids: Vec<Vec<usize>> = vec![Vec::new(); live.len()];
    for (c, p) in parents.iter().enumerate() {
        if let Some(p) = p {
            kids[*p].push(c);
        }
    }
    let children_of = |i: usize| kids[i].clone();
    let mut info = HashMap::new();
    let mut identities = HashMap::new();
    for name in live {
        let id = ca.issue(name)?;
        let addr = data_addr(name).with_context(|| format!("no address for {name}"))?;
        info.insert(
            name.clone(),
            PeerInfo {
                node: name.clone(),
                addr,
                cert_sha256: kd_net::cert_sha256(&id.cert_der),
            },
        );
        identities.insert(name.clone(), id);
    }
    let info_of = |name: &str| {
        info.get(name)
            .cloned()
            .with_context(|| format!("no peer info for {name}"))
    };
    let mut parent = HashMap::new();
    let mut plans = Vec::new();
    for (i, name) in live.iter().enumerate() {
        parent.insert(name.clone(), parent_of(i).map(|j| live[j].clone()));
        let upstream = match parent_of(i) {
            None => Upstream::Coordinator,
            Some(j) => Upstream::Peer(info_of(&live[j])?),
        };
        let children = children_of(i)
            .into_iter()
            .map(|c| info_of(&live[c]))
            .collect::<Result<Vec<_>>>()?;
        let plan = Plan {
            deployment,
            identity: identities.remove(name).context("identity")?,
            upstream,
            children,
            manifest: manifest.clone(),
            job: job.clone(),
            stall,
        };
        plans.push((name.clone(), plan));
    }
    Ok(PlannedRound {
        parent,
        info,
        plans,
    })
}

/// Checks an agent's Hello against the expected tokens (`used`: nodes whose token was spent;
/// `started`: no new agent is wanted any more).
pub(crate) fn check_hello(
    h: &Hello,
    tokens: &HashMap<String, String>,
    used: &HashSet<String>,
    started: bool,
) -> Result<(), WireError> {
    if h.version != kd_proto::PROTOCOL_VERSION {
        return Err(WireError::new(
            ErrorCode::VersionMismatch,
            format!(
                "agent speaks protocol {}, coordinator {}",
                h.version,
                kd_proto::PROTOCOL_VERSION
            ),
        ));
    }
    let Some(expected) = tokens.get(&h.node) else {
        return Err(WireError::new(
            ErrorCode::UnknownNode,
            format!("node {:?} is not part of this deployment", h.node),
        ));
    };
    if !constant_time_eq(expected.as_bytes(), h.token.as_bytes()) {
        return Err(WireError::new(
            ErrorCode::BadToken,
            format!("wrong token for node {}", h.node),
        ));
    }
    if used.contains(&h.node) {
        return Err(WireError::new(
            ErrorCode::BadToken,
            format!("the token of node {} was already used", h.node),
        ));
    }
    if started {
        return Err(WireError::new(
            ErrorCode::Unexpected,
            "the broadcast has already started",
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Handshakes with one admitted connection (`admitted`: its handshake slot, given back once the
/// Hello is in), checks its Hello and routes it; then carries its control stream until it ends.
pub(crate) async fn handle_connection(
    incoming: quinn::Incoming,
    admitted: Option<Admitted>,
    routes: Routes,
    events: mpsc::UnboundedSender<Event>,
) {
    let remote = incoming.remote_address();
    let refused = |reason: String| {
        let _ = events.send(Event::Refused {
            addr: remote,
            reason,
        });
    };
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return refused(format!("handshake failed: {e}")),
    };
    // The connection as soon as it exists (a server's "0.5-RTT" connection: nothing is sent on
    // it before the handshake is over), so that the agent's packets can be counted while the
    // handshake goes on.
    let conn = match connecting.into_0rtt() {
        // It resolves when the handshake is over, either way (its value is about 0-RTT data,
        // which a server's handshake never has): the connection's close reason tells.
        Ok((conn, established)) => match while_heard(&conn, established).await {
            Ok(_) => match conn.close_reason() {
                None => conn,
                Some(e) => return refused(format!("handshake failed: {e}")),
            },
            Err(why) => {
                conn.close(kd_net::close::REFUSED.into(), b"handshake stalled");
                return refused(format!("handshake stalled: {why}"));
            }
        },
        // Not for a server (quinn always grants it); the plain handshake, bounded.
        Err(connecting) => match tokio::time::timeout(HANDSHAKE_LIMIT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return refused(format!("handshake failed: {e}")),
            Err(_) => return refused("handshake timed out".into()),
        },
    };
    let (mut send, mut recv) = match while_heard(&conn, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            conn.close(kd_net::close::REFUSED.into(), b"no control stream");
            return refused(format!("no control stream: {e}"));
        }
        Err(why) => {
            conn.close(kd_net::close::REFUSED.into(), b"no control stream");
            return refused(format!("no control stream: {why}"));
        }
    };
    let hello = match while_heard(
        &conn,
        wire::recv::<ToCoord>(&mut recv, HANDSHAKE_LIMIT, "Hello"),
    )
    .await
    {
        Ok(r) => r,
        Err(why) => Err(wire::WireError::Read(why)),
    };
    // The handshake is over (a refusal below is quick): the next connection may start its own.
    drop(admitted);
    let hello = match hello {
        Ok(ToCoord::Hello(h)) => h,
        Ok(_) => {
            refuse(
                &conn,
                &mut send,
                WireError::new(ErrorCode::Unexpected, "the first message must be Hello"),
                &events,
            )
            .await;
            return;
        }
        Err(e) => {
            refuse(
                &conn,
                &mut send,
                WireError::new(ErrorCode::Unexpected, format!("bad Hello: {e}")),
                &events,
            )
            .await;
            return;
        }
    };
    let node = hello.node.clone();
    let route = match &routes {
        Routes::One(r) => r.clone(),
        Routes::ByNode(t) => match t.get(&node) {
            Some(r) => r,
            None => {
                let msg = format!("no deployment is running on {node}");
                refuse(
                    &conn,
                    &mut send,
                    WireError::new(ErrorCode::UnknownNode, msg),
                    &events,
                )
                .await;
                return;
            }
        },
    };
    let Route {
        in_tx,
        source,
        events,
    } = route;
    let (tx, mut rx) = mpsc::channel::<ToAgent>(64);
    let (reply_tx, reply_rx) = oneshot::channel();
    if in_tx
        .send(Inbound::Hello {
            hello,
            conn: conn.clone(),
            tx,
            reply: reply_tx,
        })
        .await
        .is_err()
    {
        return;
    }
    match reply_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            refuse(&conn, &mut send, e, &events).await;
            return;
        }
        Err(_) => return,
    }
    if wire::send(
        &mut send,
        &ToAgent::Welcome(Welcome {
            deployment: source.deployment,
        }),
    )
    .await
    .is_err()
    {
        return;
    }
    // Writer: main loop -> agent.
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if wire::send(&mut send, &m).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    // Data service: the agent opens a stream per request (roots, repairs).
    {
        let conn = conn.clone();
        let source = source.clone();
        let asker = Asker {
            node: node.clone(),
            driver: in_tx.clone(),
        };
        tokio::spawn(async move {
            while let Ok((s, r)) = conn.accept_bi().await {
                tokio::spawn(serve_data(
                    s,
                    r,
                    source.clone(),
                    conn.clone(),
                    asker.clone(),
                ));
            }
        });
    }
    // Reader: agent -> main loop, until the connection ends or the agent falls silent.
    let silence = silent_for(&conn, source.liveness.agent_silence);
    tokio::pin!(silence);
    let reason = loop {
        let msg = tokio::select! {
            m = wire::recv_opt::<ToCoord>(&mut recv) => m,
            quiet = &mut silence => {
                conn.close(kd_net::close::DONE.into(), b"silent");
                break format!("no packet from the agent for {:.1} s", quiet.as_secs_f64());
            }
        };
        match msg {
            Ok(Some(msg)) => {
                if in_tx
                    .send(Inbound::Msg {
                        node: node.clone(),
                        msg,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break "the agent closed its control stream".to_string(),
            Err(e) => {
                break match conn.close_reason() {
                    Some(r) => describe_close(&r),
                    None => e.to_string(),
                }
            }
        }
    };
    let _ = in_tx
        .send(Inbound::Lost {
            node,
            conn_id: conn.stable_id(),
            reason,
        })
        .await;
}

/// Resolves once no datagram has come on `conn` for `limit` (a killed or frozen agent: a live
/// one sends keep-alives every [`kd_net::endpoint::KEEP_ALIVE`]), with how long it was. Time
/// this task itself did not run (a coordinator starved of CPU, whose packets may be waiting
/// unread) does not count as the peer's silence.
async fn silent_for(conn: &quinn::Connection, limit: Duration) -> Duration {
    let tick = (limit / 8).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut heard = tokio::time::Instant::now();
    let mut woke = heard;
    loop {
        tokio::time::sleep(tick).await;
        let now = tokio::time::Instant::now();
        if now.duration_since(woke) > tick * 3 {
            heard = heard.max(now - tick);
        }
        woke = now;
        let rx = conn.stats().udp_rx.datagrams;
        if rx != seen {
            seen = rx;
            heard = now;
        } else if now.duration_since(heard) >= limit {
            return now.duration_since(heard);
        }
    }
}

fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TimedOut => "timed out (no packet for 30 s)".into(),
        quinn::ConnectionError::ApplicationClosed(c) => {
            format!(
                "closed by the agent: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        other => other.to_string(),
    }
}

async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    e: WireError,
    events: &mpsc::UnboundedSender<Event>,
) {
    let _ = events.send(Event::Refused {
        addr: conn.remote_address(),
        reason: e.to_string(),
    });
    let _ = wire::send(send, &ToAgent::Error(e.clone())).await;
    let _ = send.finish();
    // Let the error reach the agent before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(kd_net::close::REFUSED.into(), e.message.as_bytes());
}

/// Who asks for data, and the driver that knows who else holds it.
#[derive(Clone)]
struct Asker {
    node: String,
    driver: mpsc::Sender<Inbound>,
}

impl Asker {
    /// A peer that holds chunk `index` and now accepts this node, if the driver knows one.
    async fn holder(&self, index: u32, avoid: Option<String>) -> Option<PeerInfo> {
        let (reply, answer) = oneshot::channel();
        let ask = Inbound::Repair {
            node: self.node.clone(),
            index,
            avoid,
            reply,
        };
        // Bounded: a busy driver means the coordinator serves the repair itself.
        let asked = tokio::time::timeout(Duration::from_secs(2), async {
            self.driver.send(ask).await.ok()?;
            answer.await.ok().flatten()
        });
        asked.await.ok().flatten()
    }
}

async fn serve_data(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    source: Arc<Source>,
    conn: quinn::Connection,
    asker: Asker,
) {
    let req = match wire::recv::<DataRequest>(&mut recv, DATA_REQUEST_WAIT, "a data request").await
    {
        Ok(r) => r,
        Err(e) => {
            let _ = send_frame(
                &mut send,
                &DataFrame::Error(WireError::new(ErrorCode::Unexpected, e.to_string())),
            )
            .await;
            return;
        }
    };
    let Some(Asked {
        deployment,
        chunks: range,
        paced,
    }) = req.asked(source.chunks.image().manifest.chunk_count())
    else {
        let e = WireError::new(ErrorCode::Unexpected, "the coordinator serves no probe");
        let _ = send_frame(&mut send, &DataFrame::Error(e)).await;
        return;
    };
    if deployment != source.deployment {
        let e = WireError::new(
            ErrorCode::Forbidden,
            format!("deployment {deployment:x} is not running here"),
        );
        let _ = send_frame(&mut send, &DataFrame::Error(e)).await;
        return;
    }
    if let DataRequest::Repair { index, avoid, .. } = req {
        // Swarm repair: a peer that holds the chunk serves it, not the coordinator's uplink.
        if let Some(peer) = asker.holder(index, avoid).await {
            source.repairs_redirected.fetch_add(1, Ordering::Relaxed);
            let _ = send_frame(&mut send, &DataFrame::Redirect(peer)).await;
            return;
        }
    }
    if !paced {
        source.repairs_served.fetch_add(1, Ordering::Relaxed);
    }
    let group = source
        .pace_groups
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&asker.node)
        .copied()
        .unwrap_or(0);
    let pace = paced.then(|| source.pacer.register_in(range.start, group));
    serve_range(&mut send, &source, range, pace, &conn).await;
    if let Some(id) = pace {
        source.pacer.unregister(id);
    }
}

/// Compressed image bytes the coordinator's data streams (root streams and repairs) handed to
/// QUIC in this process: with what the nodes received, how much the tree relayed.
pub static SERVED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sends chunks `range` on `send`, in step with the other root streams when `pace` is set.
async fn serve_range(
    send: &mut quinn::SendStream,
    source: &Arc<Source>,
    range: std::ops::Range<u32>,
    pace: Option<u64>,
    conn: &quinn::Connection,
) {
    let debug = tracing::enabled!(tracing::Level::DEBUG);
    for i in range {
        if let Some(id) = pace {
            source.pacer.pace(id, i).await;
        }
        kd_net::endpoint::log_conn_stats(conn, i, "serving a root stream");
        let chunk = match source.chunks.get(i).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("serving chunk {i}: {e}");
                let _ = send_frame(
                    send,
                    &DataFrame::Error(WireError::new(ErrorCode::Internal, e)),
                )
                .await;
                return;
            }
        };
        // A stream's chunk goes with its piece hashes (its receiver forwards each piece as soon
        // as it has verified it); a one-chunk request (a repair) is verified whole.
        if pace.is_some()
            && wire::send(
                send,
                &DataFrame::Pieces {
                    index: i,
                    hashes: chunk.hashes,
                },
            )
            .await
            .is_err()
        {
            return;
        }
        // The chunk's buffer goes to QUIC as is (no copy into its send buffer).
        let len = chunk.data.len() as u64;
        if wire::send_chunk(send, i, chunk.data).await.is_err() {
            return;
        }
        SERVED_BYTES.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        if debug {
            tracing::debug!(index = i, "chunk handed to QUIC");
        }
        if let Some(id) = pace {
            source.pacer.advance(id, i + 1);
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
}

async fn send_frame(send: &mut quinn::SendStream, f: &DataFrame) -> Result<(), wire::WireError> {
    wire::send(send, f).await?;
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_slots_shrink_while_handshakes_are_slow_and_come_back() {
        let ms = Duration::from_millis;
        let mut s = Slots::new(64);
        assert_eq!(s.target(), 64);
        // Ordinary handshakes change nothing; quick ones cannot grow past the most.
        assert_eq!(s.done(ms(1000)), SlotChange::Keep);
        assert_eq!(s.done(ms(10)), SlotChange::Keep);
        assert_eq!(s.target(), 64);
        // A saturated machine: each slow handshake takes a slot away, down to MIN_SLOTS.
        for i in 1..=(64 - MIN_SLOTS) {
            assert_eq!(s.done(SLOW_HANDSHAKE), SlotChange::Shrink);
            assert_eq!(s.target(), 64 - i);
        }
        assert_eq!(s.done(Duration::from_secs(30)), SlotChange::Keep);
        assert_eq!(s.target(), MIN_SLOTS);
        // Quick ones give them back, one each.
        assert_eq!(s.done(ms(100)), SlotChange::Grow);
        assert_eq!(s.target(), MIN_SLOTS + 1);
        assert_eq!(s.done(QUICK_HANDSHAKE), SlotChange::Keep);
        // Never fewer than MIN_SLOTS, even when asked for fewer.
        assert_eq!(Slots::new(2).target(), MIN_SLOTS);
    }

    #[test]
    fn hello_checks() {
        let cfg = BroadcastConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            nodes: vec!["a".into()],
            tokens: [("a".to_string(), "t".to_string())].into(),
            arity: Arity::Chain,
            hello_timeout: Duration::from_secs(1),
            run_timeout: Duration::from_secs(1),
            deployment: 1,
            racks: Default::default(),
            job: Job::LocalSink,
            liveness: Liveness::default(),
        };
        let mut h = Hello {
            version: kd_proto::PROTOCOL_VERSION,
            node: "a".into(),
            token: "t".into(),
            data_port: 1,
            inventory: Default::default(),
        };
        let used = HashSet::new();
        assert!(check_hello(&h, &cfg.tokens, &used, false).is_ok());
        h.token = "x".into();
        assert_eq!(
            check_hello(&h, &cfg.tokens, &used, false).unwrap_err().code,
            ErrorCode::BadToken
        );
        h.node = "zz".into();
        assert_eq!(
            check_hello(&h, &cfg.tokens, &used, false).unwrap_err().code,
            ErrorCode::UnknownNode
        );
        h.node = "a".into();
        h.token = "t".into();
        h.version = 99;
        assert_eq!(
            check_hello(&h, &cfg.tokens, &used, false).unwrap_err().code,
            ErrorCode::VersionMismatch
        );
    }
}
