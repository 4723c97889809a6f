//! The agent's session decisions, without I/O: what each control message means in each phase
//! of the session, what each frame of the upstream's stream asks for, when a chunk's pieces
//! are refused (and fetched again), how a repair is asked for and which answer counts, when a
//! failed attempt to join the coordinator is tried again, what the report's verdict is, and how
//! the session ends (exit, reboot, or kexec then reboot).
//! The agent's session (`agent/src/session.rs`) is the driver: it reads the sockets and the
//! clock, hands what it got to these functions and does what they answer. Its upstream's
//! silence and the retry of a failed stream are [`crate::upstream::Watch`]'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{DataIn, Whole};
use crate::manifest::{verify_chunk, Manifest};
use crate::msg::{
    DataFrame, DataRequest, DeployJob, Digest, ErrorCode, Job, Kexec, PeerInfo, Plan, Probe,
    ToAgent, Upstream, Welcome,
};
use crate::piece::{check_piece_hashes, piece_count};

/// How long a node waits for its children to attach before it asks for the image itself: the
/// tree is wired before data flows (bytes a relay receives before its child is attached stay
/// queued ahead of everything it relays next).
pub const CHILDREN_WAIT: Duration = Duration::from_secs(3);
/// How long an agent that reported its upstream lost waits for the coordinator's `Reparent`.
pub const REPARENT_WAIT: Duration = Duration::from_secs(60);
/// How often the agent sends its progress while it receives.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Requests to the coordinator for one chunk's repair before it counts as lost.
pub const REPAIR_TRIES: u32 = 3;

// ---------------------------------------------------------------------------------------------
// Control messages.

/// Where the session is: what a control message means depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase<'a> {
    /// Waiting for the plan (for at most `timeout`): probes and a staged `Prepare` meanwhile.
    BeforePlan {
        /// The plan's time limit (for the error).
        timeout: Duration,
    },
    /// Reading the image from an upstream.
    Receiving,
    /// The upstream was lost (for `reason`); waiting for the coordinator's `Reparent`.
    Lost {
        /// Why it was lost (for the error).
        reason: &'a str,
    },
    /// The report is sent; serving children until the coordinator releases this agent.
    Serving,
}

/// What came from the control stream.
#[derive(Debug)]
pub enum ControlIn {
    /// A message.
    Message(ToAgent),
    /// The control stream ended (with the coordinator's close reason, when it gave one).
    Ended {
        /// The connection's close reason.
        reason: Option<String>,
    },
    /// The phase's time limit passed.
    TimedOut,
}

impl From<Option<ToAgent>> for ControlIn {
    fn from(m: Option<ToAgent>) -> Self {
        match m {
            Some(m) => ControlIn::Message(m),
            None => ControlIn::Ended { reason: None },
        }
    }
}

/// What the session does about a control message ([`control`]).
#[derive(Debug, PartialEq)]
pub enum Control {
    /// Nothing (not for this phase; `Adopt` and `ChildGone` are done by the control reader
    /// when they arrive).
    Ignore,
    /// The plan: start the broadcast.
    Plan(Box<Plan>),
    /// Measure the link and the disk now.
    Probe(Box<Probe>),
    /// Prepare the disk now (a second one starts over).
    Prepare(Box<DeployJob>),
    /// Read the image from this upstream from now on.
    Reparent(Upstream),
    /// Released: reboot, through a kexec into this kernel when one is given (before the plan
    /// there is no deployed system: a plain reboot, and the session ends with an error).
    Reboot(Option<Kexec>),
    /// Released: the broadcast is over.
    Finish,
    /// The session ends with this error.
    Fail(String),
}

/// What `input` means in `phase`.
pub fn control(phase: Phase<'_>, input: ControlIn) -> Control {
    let m = match (phase, input) {
        (_, ControlIn::Message(m)) => m,
        (Phase::BeforePlan { timeout }, ControlIn::TimedOut) => {
            return Control::Fail(format!("no plan from the coordinator within {timeout:?}"))
        }
        (Phase::BeforePlan { .. }, ControlIn::Ended { reason }) => {
            return Control::Fail(match reason {
                Some(r) => format!("the coordinator closed the connection before the plan: {r}"),
                None => "the control stream ended before the plan".into(),
            })
        }
        (Phase::Receiving, ControlIn::Ended { .. }) => {
            return Control::Fail("the coordinator connection was lost".into())
        }
        (Phase::Lost { reason }, ControlIn::TimedOut) => {
            return Control::Fail(format!(
                "upstream lost ({reason}) and no new one within {} s",
                REPARENT_WAIT.as_secs()
            ))
        }
        (Phase::Lost { reason }, ControlIn::Ended { .. }) => {
            return Control::Fail(format!(
                "upstream lost ({reason}) and the coordinator is gone"
            ))
        }
        (Phase::Serving, ControlIn::Ended { .. }) => {
            return Control::Fail("the coordinator went away before releasing this agent".into())
        }
        // No time limit while receiving (the upstream's is the Watch's) or serving.
        (Phase::Receiving | Phase::Serving, ControlIn::TimedOut) => return Control::Ignore,
    };
    match (phase, m) {
        (Phase::BeforePlan { .. }, m) => before_plan(m),
        (_, ToAgent::Abort { reason }) => {
            Control::Fail(format!("aborted by the coordinator: {reason}"))
        }
        // The control reader accepted the child the moment the `Adopt` arrived, whatever the
        // session was waiting on: nothing is left for the session to do.
        (_, ToAgent::Adopt(_)) => Control::Ignore,
        (Phase::Receiving | Phase::Lost { .. }, ToAgent::Reparent(u)) => Control::Reparent(u),
        (Phase::Serving, ToAgent::Finish) => Control::Finish,
        (Phase::Serving, ToAgent::Reboot { kexec }) => Control::Reboot(kexec),
        _ => Control::Ignore,
    }
}

/// A message before the plan.
fn before_plan(m: ToAgent) -> Control {
    match m {
        ToAgent::Plan(p) => Control::Plan(p),
        ToAgent::Probe(p) => Control::Probe(p),
        ToAgent::Prepare(j) => Control::Prepare(j),
        // No deployed system to kexec into before the plan: a plain reboot.
        ToAgent::Reboot { .. } => Control::Reboot(None),
        ToAgent::Abort { reason } => Control::Fail(format!(
            "aborted by the coordinator before the plan: {reason}"
        )),
        ToAgent::Finish => {
            Control::Fail("the coordinator finished without giving this node a plan".into())
        }
        _ => Control::Ignore,
    }
}

/// The parent a node reads from (`None`: the coordinator): the one `ParentLost` names, and the
/// one a repair of a chunk it no longer holds avoids.
pub fn parent(upstream: &Upstream) -> Option<&str> {
    match upstream {
        Upstream::Coordinator => None,
        Upstream::Peer(p) => Some(p.node.as_str()),
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream's stream.

/// What a frame of the upstream's stream asks for ([`Incoming::frame`]).
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Read the next frame (after logging `warning`, if any).
    Continue {
        /// Piece hashes that do not add up: the chunk will be verified whole.
        warning: Option<String>,
    },
    /// Chunk `index`'s `len` bytes of data follow: receive them piece by piece, each checked
    /// against `hashes`, or whole without them.
    Receive {
        /// The chunk.
        index: u32,
        /// Its compressed length (the manifest's).
        len: usize,
        /// Its piece hashes, checked against the manifest.
        hashes: Option<Arc<[Digest]>>,
    },
    /// The upstream no longer holds chunk `index`: repair it elsewhere ([`parent`] avoided).
    Repair {
        /// The chunk.
        index: u32,
    },
    /// The stream is broken (a [`crate::upstream::Problem::Broken`]).
    Broken(String),
}

/// The frames of one stream from an upstream: the piece hashes announced for the next chunk
/// wait here for its data.
#[derive(Debug, Default)]
pub struct Incoming {
    pending: Option<Arc<[Digest]>>,
}

impl Incoming {
    /// `frame` came while chunk `next` is the first this node lacks.
    pub fn frame(&mut self, manifest: &Manifest, next: u32, frame: DataIn) -> Step {
        let info = manifest.chunks.get(next as usize);
        match frame {
            DataIn::Other(DataFrame::Pieces { index, hashes }) if index == next => {
                let Some(info) = info else {
                    return Step::Broken(format!("chunk {index} is not in the manifest"));
                };
                match check_piece_hashes(info.comp_len as usize, &hashes, &info.hash) {
                    Ok(()) => {
                        self.pending = Some(hashes.into());
                        Step::Continue { warning: None }
                    }
                    Err(e) => {
                        self.pending = None;
                        Step::Continue {
                            warning: Some(format!("chunk {index}: {e}; it will be verified whole")),
                        }
                    }
                }
            }
            DataIn::Other(DataFrame::Pieces { index, .. }) => Step::Broken(format!(
                "got the piece hashes of chunk {index}, expected {next}"
            )),
            DataIn::ChunkStart { index, len } if index == next => {
                let Some(info) = info else {
                    return Step::Broken(format!("chunk {index} is not in the manifest"));
                };
                let expected = info.comp_len as usize;
                if len != expected {
                    return Step::Broken(format!(
                        "chunk {index} announces {len} bytes, the manifest says {expected}"
                    ));
                }
                Step::Receive {
                    index,
                    len,
                    hashes: self.pending.take(),
                }
            }
            DataIn::ChunkStart { index, .. } => {
                Step::Broken(format!("got chunk {index}, expected {next}"))
            }
            DataIn::Other(DataFrame::Unavailable { index }) if index == next => {
                Step::Repair { index }
            }
            DataIn::Other(DataFrame::Unavailable { index }) => {
                Step::Broken(format!("unexpected Unavailable({index})"))
            }
            DataIn::Other(DataFrame::Error(e)) => {
                Step::Broken(format!("the upstream refused: {e}"))
            }
            DataIn::Other(DataFrame::Chunk { index, .. }) => Step::Broken(format!(
                "bad frame from the upstream: chunk {index} mis-framed"
            )),
            DataIn::Other(DataFrame::Redirect(p)) => Step::Broken(format!(
                "the upstream redirected a stream to {} (only repairs are)",
                p.node
            )),
        }
    }
}

/// One chunk received piece by piece: which pieces are checked and kept, and whether the chunk
/// is refused. Pieces already held (a new upstream resends the chunk from its start) are read
/// and skipped; after a piece that does not match its hash nothing more is kept: the chunk is
/// refused and fetched again from the coordinator, its missing pieces taken from that copy
/// (nothing unverified is kept or forwarded; only a repair that fails ends the session).
#[derive(Debug, Clone)]
pub struct ChunkPieces {
    index: u32,
    count: usize,
    held: usize,
    bad: Option<usize>,
}

impl ChunkPieces {
    /// Chunk `index` of `len` bytes, of which this node holds the first `held` pieces.
    pub fn new(index: u32, len: usize, held: usize) -> Self {
        Self {
            index,
            count: piece_count(len),
            held,
            bad: None,
        }
    }

    /// Its pieces (each is read from the stream, whatever [`ChunkPieces::wants`] says).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether piece `p`, once read, is checked and kept.
    pub fn wants(&self, p: usize) -> bool {
        p >= self.held && self.bad.is_none()
    }

    /// Piece `p` was checked: `ok` if it matched its hash (then it is kept).
    pub fn checked(&mut self, p: usize, ok: bool) {
        if !ok && self.bad.is_none() {
            self.bad = Some(p);
        }
    }

    /// Whole, or why it is refused (then repaired from the coordinator).
    pub fn outcome(&self) -> Result<(), String> {
        match self.bad {
            None => Ok(()),
            Some(p) => Err(format!(
                "chunk {}: piece {p} does not match its hash",
                self.index
            )),
        }
    }
}

/// The final verdict of a receipt: the first fatal error of the session, else the writer's,
/// else a content hash (the decompressed bytes' blake3) that is not the image's.
pub fn verdict(
    fatal: Option<String>,
    writer: Option<String>,
    content_hash: Option<Digest>,
    expected: &Digest,
) -> Option<String> {
    fatal.or(writer).or_else(|| {
        content_hash
            .is_some_and(|h| h != *expected)
            .then(|| "the written content does not match the image's content hash".into())
    })
}

/// When a deployment's disk is finished (post-installs, SSH key, fstab, GRUB: [`when_to_finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishDisk {
    /// Not at all: the image did not arrive whole (the report says why).
    Never,
    /// Before the report, which then covers both.
    BeforeReport,
    /// After the report (which ends the Broadcast step), then a `StepEnd{Finish}`.
    AfterReport,
}

/// When the disk is finished after a receipt (`ok`: the image arrived whole and verified):
/// after the report when the disk was `staged` (prepared on the coordinator's `Prepare`: its
/// steps are reported one by one), before it otherwise.
pub fn when_to_finish(ok: bool, staged: bool) -> FinishDisk {
    match (ok, staged) {
        (false, _) => FinishDisk::Never,
        (true, true) => FinishDisk::AfterReport,
        (true, false) => FinishDisk::BeforeReport,
    }
}

/// What the node does when the agent's session is over ([`ending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The agent exits (with the session's error, if any).
    Exit,
    /// The node reboots into the deployed system (an agent that may not reboot, one not
    /// started by the deploy initrd, says so and exits).
    Reboot,
    /// A kexec into the kernel loaded for it; a reboot if that fails.
    KexecThenReboot,
}

/// How the session ends: `job` the plan's; `reboot_asked`, the coordinator released the agent
/// with `Reboot` (with or without a kexec), not `Finish`; `kexec_loaded`, the kexec it asked for
/// is loaded; `failed`, the session ends with an error (the report's or the release's). A
/// failed session exits; a deployment (whose disk now holds a system) or a session released
/// with `Reboot` reboots, through the kexec when one is loaded; anything else exits.
pub fn ending(job: &Job, reboot_asked: bool, kexec_loaded: bool, failed: bool) -> Ending {
    if failed || !(reboot_asked || matches!(job, Job::Deploy(_))) {
        Ending::Exit
    } else if kexec_loaded {
        Ending::KexecThenReboot
    } else {
        Ending::Reboot
    }
}

// ---------------------------------------------------------------------------------------------
// Repairs.

/// A chunk's repair: the coordinator is asked first (`DataRequest::Repair`); it may point at a
/// peer that holds the chunk (swarm repair), which is asked next; after a redirect, whatever the
/// peer did, the coordinator is asked for the chunk itself (`DataRequest::One`), at most
/// [`REPAIR_TRIES`] requests in all.
#[derive(Debug, Clone)]
pub struct Repair {
    deployment: u64,
    index: u32,
    avoid: Option<String>,
    tries: u32,
    peers_ok: bool,
}

/// What a repair request brought ([`answer`]).
#[derive(Debug, PartialEq)]
pub enum Answer<T> {
    /// The chunk, verified.
    Chunk(T),
    /// The coordinator names a peer that holds it.
    Redirect(PeerInfo),
}

impl Repair {
    /// Repairs chunk `index` of `deployment`, not from node `avoid` (the upstream that no longer
    /// holds it).
    pub fn new(deployment: u64, index: u32, avoid: Option<&str>) -> Self {
        Self {
            deployment,
            index,
            avoid: avoid.map(str::to_string),
            tries: 0,
            peers_ok: true,
        }
    }

    /// The next request to the coordinator; `None` once the tries are spent (the last
    /// failure is the repair's).
    pub fn next_ask(&mut self) -> Option<DataRequest> {
        if self.tries >= REPAIR_TRIES {
            return None;
        }
        self.tries += 1;
        let (deployment, index) = (self.deployment, self.index);
        Some(if self.peers_ok {
            DataRequest::Repair {
                deployment,
                index,
                avoid: self.avoid.clone(),
            }
        } else {
            DataRequest::One { deployment, index }
        })
    }

    /// The coordinator named a peer: later requests ask the coordinator for the chunk itself.
    pub fn redirected(&mut self) {
        self.peers_ok = false;
    }

    /// The request to a peer the coordinator named.
    pub fn peer_ask(&self) -> DataRequest {
        DataRequest::One {
            deployment: self.deployment,
            index: self.index,
        }
    }
}

/// What `got`, the answer to `ask` for chunk `index`, means: the chunk (verified against the
/// manifest), a redirect (only to a `Repair` request), or why it is none.
pub fn answer<T: AsRef<[u8]>>(
    manifest: &Manifest,
    ask: &DataRequest,
    index: u32,
    got: Whole<T>,
) -> Result<Answer<T>, String> {
    match got {
        Whole::Chunk(i, data) if i == index => {
            verify_chunk(manifest, index, data.as_ref())?;
            Ok(Answer::Chunk(data))
        }
        Whole::Other(DataFrame::Redirect(peer)) if matches!(ask, DataRequest::Repair { .. }) => {
            Ok(Answer::Redirect(peer))
        }
        Whole::Other(DataFrame::Unavailable { .. }) => Err("no longer held".into()),
        Whole::Other(DataFrame::Error(e)) => Err(format!("refused: {e}")),
        Whole::Chunk(i, _) => Err(format!("got chunk {i} instead")),
        Whole::Other(f) => Err(format!("unexpected answer {f:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Joining the coordinator.

/// How long an agent waits for the Welcome once its Hello is sent. Under a storm the
/// coordinator may take long to finish a handshake while being silent: its socket, on a
/// saturated machine, dropped this agent's last handshake packet, which QUIC sends again only
/// after a backoff that grows with the slow first round trip (measured: 13–27 s for a few
/// agents of 1000 on 2 cores). A coordinator that is gone is found by QUIC's idle timeout
/// (30 s without a packet) before this.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest pause between two attempts to join the coordinator.
pub const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest pause between two attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// Why one attempt to join the coordinator failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinFailure {
    /// Trying again cannot help (a wrong pinned certificate, a definitive refusal).
    Fatal(String),
    /// The connection was refused, cut or silent before the Welcome: worth another attempt.
    Retry(String),
}

/// Whether a coordinator's refusal of a Hello holds for any later attempt (the token, the node
/// or the protocol is wrong) rather than for this connection (a Hello cut or late under load).
pub fn definitive(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::BadToken
            | ErrorCode::UnknownNode
            | ErrorCode::VersionMismatch
            | ErrorCode::Forbidden
    )
}

/// A handshake with the coordinator at `coord` failed with `error` (`transport`: QUIC's
/// transport error, when it was one): a certificate that does not match the pin will not get
/// better by retrying; anything else may.
pub fn handshake_failed(coord: SocketAddr, error: &str, transport: Option<&str>) -> JoinFailure {
    match transport {
        Some(t) if t.contains("pinned") || t.contains("certificate") => JoinFailure::Fatal(
            format!("the coordinator at {coord} is not the one pinned: {t}"),
        ),
        _ => JoinFailure::Retry(format!(
            "cannot connect to the coordinator at {coord}: {error}"
        )),
    }
}

/// The coordinator's first answer to the Hello.
pub fn welcome(m: ToAgent) -> Result<Welcome, JoinFailure> {
    match m {
        ToAgent::Welcome(w) => Ok(w),
        ToAgent::Error(e) if definitive(e.code) => Err(JoinFailure::Fatal(format!(
            "the coordinator refused this agent: {e}"
        ))),
        ToAgent::Error(e) => Err(JoinFailure::Retry(format!(
            "the coordinator refused this attempt: {e}"
        ))),
        other => Err(JoinFailure::Fatal(format!(
            "unexpected first message from the coordinator: {other:?}"
        ))),
    }
}

/// The pause before attempt `attempt + 1`: between [`RETRY_MIN`] and a ceiling that doubles
/// from twice it up to [`RETRY_MAX`], placed by `r` (in [0, 1)) so that agents cut at the same
/// moment do not come back at the same moment.
pub fn retry_pause(attempt: u32, r: f64) -> Duration {
    let ceiling = RETRY_MIN
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(RETRY_MAX);
    RETRY_MIN + (ceiling - RETRY_MIN).mul_f64(r.clamp(0.0, 1.0))
}

/// Attempts to join the coordinator at `coord` within a time limit: after each failed one, a
/// pause ([`retry_pause`]) or the end.
#[derive(Debug, Clone)]
pub struct Joining {
    coord: SocketAddr,
    limit: Duration,
    deadline: Instant,
    attempts: u32,
}

impl Joining {
    /// Attempts from `now` for at most `limit` (a day when that is past the clock's range).
    pub fn new(coord: SocketAddr, now: Instant, limit: Duration) -> Self {
        let deadline = now
            .checked_add(limit)
            .unwrap_or_else(|| now + Duration::from_secs(86_400));
        Self {
            coord,
            limit,
            deadline,
            attempts: 0,
        }
    }

    /// When the last attempt must be over.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Attempts made.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// An attempt failed at `now` for `why`, worth retrying: the pause before the next one
    /// (jittered by `r`, in [0, 1)), or the error when the time is up.
    pub fn failed(&mut self, now: Instant, why: &str, r: f64) -> Result<Duration, String> {
        self.attempts = self.attempts.saturating_add(1);
        let left = self.deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(format!(
                "could not join the coordinator at {} in {:?} ({} attempts): {why}",
                self.coord, self.limit, self.attempts
            ));
        }
        Ok(retry_pause(self.attempts, r).min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ImageKind, ManifestBuilder};
    use crate::msg::{DeployImage, PeerIdentity, WireError};
    use crate::piece::{piece_hashes, PIECE_LEN};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn peer(node: &str) -> PeerInfo {
        PeerInfo {
            node: node.into(),
            addr: "127.0.0.1:7000".parse().unwrap(),
            cert_sha256: [7; 32],
        }
    }

    /// Two chunks: "ABCDE" and two pieces and a bit of 0x5a.
    fn manifest() -> (Manifest, Vec<u8>) {
        let big = vec![0x5au8; PIECE_LEN * 2 + 10];
        let mut b = ManifestBuilder::new(ImageKind::Raw, 4);
        b.push(b"abcd", b"ABCDE").unwrap();
        b.push(b"efgh", &big).unwrap();
        (b.finish(), big)
    }

    fn kexec() -> Option<Kexec> {
        Some(Kexec {
            kernel: "/vmlinuz".into(),
            initrd: None,
            params: String::new(),
        })
    }

    fn probe() -> Box<Probe> {
        Box::new(Probe {
            deployment: 1,
            identity: PeerIdentity {
                cert_der: vec![],
                key_der: vec![],
                ca_der: vec![],
            },
            serve: vec![],
            fetch: None,
            bytes: 1,
        })
    }

    fn msg(m: ToAgent) -> ControlIn {
        ControlIn::Message(m)
    }

    fn abort() -> ToAgent {
        ToAgent::Abort {
            reason: "operator".into(),
        }
    }

    /// Checks what each input means in `phase`.
    fn decides(phase: Phase<'_>, table: Vec<(ControlIn, Control)>) {
        for (input, expected) in table {
            let shown = format!("{input:?}");
            assert_eq!(control(phase, input), expected, "{phase:?}: {shown}");
        }
    }

    fn fail(why: &str) -> Control {
        Control::Fail(why.into())
    }

    fn ended() -> ControlIn {
        ControlIn::Ended { reason: None }
    }

    #[test]
    fn before_the_plan_probes_and_prepares_are_done_and_the_rest_ends_the_session() {
        let p = Phase::BeforePlan {
            timeout: Duration::from_secs(5),
        };
        assert!(matches!(
            control(p, msg(ToAgent::Probe(probe()))),
            Control::Probe(_)
        ));
        let closed = ControlIn::Ended {
            reason: Some("closed by peer".into()),
        };
        decides(
            p,
            vec![
                // No kexec before the plan: a plain reboot.
                (
                    msg(ToAgent::Reboot { kexec: kexec() }),
                    Control::Reboot(None),
                ),
                (
                    msg(abort()),
                    fail("aborted by the coordinator before the plan: operator"),
                ),
                (
                    msg(ToAgent::Finish),
                    fail("the coordinator finished without giving this node a plan"),
                ),
                // An Adopt before the plan is the control reader's alone.
                (msg(ToAgent::Adopt(peer("n2"))), Control::Ignore),
                (
                    ControlIn::TimedOut,
                    fail("no plan from the coordinator within 5s"),
                ),
                (ended(), fail("the control stream ended before the plan")),
                (
                    closed,
                    fail("the coordinator closed the connection before the plan: closed by peer"),
                ),
            ],
        );
    }

    #[test]
    fn while_receiving_only_a_reparent_or_an_abort_count() {
        decides(
            Phase::Receiving,
            vec![
                (
                    msg(ToAgent::Reparent(Upstream::Coordinator)),
                    Control::Reparent(Upstream::Coordinator),
                ),
                // The control reader's alone: it accepted the child on arrival.
                (msg(ToAgent::Adopt(peer("n3"))), Control::Ignore),
                (msg(abort()), fail("aborted by the coordinator: operator")),
                (msg(ToAgent::Finish), Control::Ignore),
                (msg(ToAgent::Reboot { kexec: None }), Control::Ignore),
                (msg(ToAgent::ChildGone("n4".into())), Control::Ignore),
                (ended(), fail("the coordinator connection was lost")),
                (ControlIn::TimedOut, Control::Ignore),
            ],
        );
    }

    #[test]
    fn a_lost_upstream_waits_for_a_reparent_and_says_why_it_gave_up() {
        let to_n1 = Upstream::Peer(peer("n1"));
        decides(
            Phase::Lost {
                reason: "no data for 1.0 s",
            },
            vec![
                (
                    msg(ToAgent::Reparent(to_n1.clone())),
                    Control::Reparent(to_n1),
                ),
                // The control reader's alone: it accepted the child on arrival.
                (msg(ToAgent::Adopt(peer("n3"))), Control::Ignore),
                (msg(ToAgent::Finish), Control::Ignore),
                (
                    ControlIn::TimedOut,
                    fail("upstream lost (no data for 1.0 s) and no new one within 60 s"),
                ),
                (
                    ended(),
                    fail("upstream lost (no data for 1.0 s) and the coordinator is gone"),
                ),
                (msg(abort()), fail("aborted by the coordinator: operator")),
            ],
        );
    }

    #[test]
    fn after_the_report_the_agent_serves_until_released() {
        decides(
            Phase::Serving,
            vec![
                (msg(ToAgent::Finish), Control::Finish),
                (
                    msg(ToAgent::Reboot { kexec: kexec() }),
                    Control::Reboot(kexec()),
                ),
                // The control reader's alone: it accepted the child on arrival.
                (msg(ToAgent::Adopt(peer("n5"))), Control::Ignore),
                (
                    msg(ToAgent::Reparent(Upstream::Coordinator)),
                    Control::Ignore,
                ),
                (msg(abort()), fail("aborted by the coordinator: operator")),
                (
                    ended(),
                    fail("the coordinator went away before releasing this agent"),
                ),
            ],
        );
    }

    #[test]
    fn the_parent_is_named_and_avoided_the_coordinator_is_not() {
        assert_eq!(parent(&Upstream::Coordinator), None);
        assert_eq!(parent(&Upstream::Peer(peer("n1"))), Some("n1"));
    }

    #[test]
    fn a_chunks_hashes_wait_for_its_data_and_bad_ones_mean_verify_whole() {
        let (m, big) = manifest();
        let mut inc = Incoming::default();
        let hashes = piece_hashes(&big);
        let pieces = |hashes| DataIn::Other(DataFrame::Pieces { index: 1, hashes });
        let start = || DataIn::ChunkStart {
            index: 1,
            len: big.len(),
        };
        assert_eq!(
            inc.frame(&m, 1, pieces(hashes.clone())),
            Step::Continue { warning: None }
        );
        assert_eq!(
            inc.frame(&m, 1, start()),
            Step::Receive {
                index: 1,
                len: big.len(),
                hashes: Some(hashes.clone().into())
            }
        );
        // Taken: the next chunk without hashes is verified whole.
        let whole = |s: Step| matches!(s, Step::Receive { hashes: None, .. });
        assert!(whole(inc.frame(&m, 1, start())));
        // Hashes that do not add up to the chunk's: a warning, and verified whole.
        let mut wrong = hashes;
        wrong[0][0] ^= 1;
        let step = inc.frame(&m, 1, pieces(wrong));
        assert!(
            matches!(&step, Step::Continue { warning: Some(w) } if w.contains("verified whole")),
            "{step:?}"
        );
        assert!(whole(inc.frame(&m, 1, start())));
    }

    #[test]
    fn frames_out_of_order_or_out_of_place_break_the_stream() {
        let (m, _) = manifest();
        let mut inc = Incoming::default();
        let broken = |s: Step| match s {
            Step::Broken(b) => b,
            s => panic!("{s:?}"),
        };
        let f = |index, len| DataIn::ChunkStart { index, len };
        assert_eq!(
            broken(inc.frame(&m, 0, f(0, 4))),
            "chunk 0 announces 4 bytes, the manifest says 5"
        );
        assert_eq!(broken(inc.frame(&m, 0, f(1, 5))), "got chunk 1, expected 0");
        assert_eq!(
            broken(inc.frame(
                &m,
                0,
                DataIn::Other(DataFrame::Pieces {
                    index: 1,
                    hashes: vec![]
                })
            )),
            "got the piece hashes of chunk 1, expected 0"
        );
        let other = |f| DataIn::Other(f);
        assert_eq!(
            broken(inc.frame(&m, 0, other(DataFrame::Unavailable { index: 1 }))),
            "unexpected Unavailable(1)"
        );
        assert!(broken(inc.frame(
            &m,
            0,
            other(DataFrame::Error(WireError::new(ErrorCode::Forbidden, "no")))
        ))
        .starts_with("the upstream refused"));
        assert!(broken(inc.frame(
            &m,
            0,
            other(DataFrame::Chunk {
                index: 0,
                data: vec![]
            })
        ))
        .contains("mis-framed"));
        assert!(
            broken(inc.frame(&m, 0, other(DataFrame::Redirect(peer("n9")))))
                .contains("only repairs are")
        );
        // Past the manifest (cannot happen while chunks are missing, but never indexes out).
        assert!(broken(inc.frame(&m, 2, f(2, 5))).contains("not in the manifest"));
        // The next chunk gone from the upstream's window: a repair.
        assert_eq!(
            inc.frame(&m, 0, other(DataFrame::Unavailable { index: 0 })),
            Step::Repair { index: 0 }
        );
    }

    #[test]
    fn a_bad_piece_refuses_the_chunk_and_nothing_after_it_is_kept() {
        let mut c = ChunkPieces::new(4, PIECE_LEN * 3 + 1, 1);
        assert_eq!(c.count(), 4);
        // The first piece is held already (a resumed chunk).
        assert!(!c.wants(0));
        assert!(c.wants(1));
        c.checked(1, true);
        c.checked(2, false);
        assert!(!c.wants(3));
        c.checked(3, false);
        assert_eq!(
            c.outcome(),
            Err("chunk 4: piece 2 does not match its hash".into())
        );
        let mut c = ChunkPieces::new(0, 10, 0);
        assert!(c.wants(0));
        c.checked(0, true);
        assert_eq!(c.outcome(), Ok(()));
    }

    #[test]
    fn the_report_says_the_first_thing_that_went_wrong() {
        let h = [1; 32];
        assert_eq!(verdict(None, None, Some(h), &h), None);
        assert_eq!(verdict(None, None, None, &h), None);
        assert_eq!(
            verdict(None, None, Some([2; 32]), &h),
            Some("the written content does not match the image's content hash".into())
        );
        assert_eq!(
            verdict(None, Some("disk full".into()), Some([2; 32]), &h),
            Some("disk full".into())
        );
        assert_eq!(
            verdict(Some("aborted".into()), Some("disk full".into()), None, &h),
            Some("aborted".into())
        );
    }

    #[test]
    fn a_staged_disk_is_finished_after_the_report_and_a_failed_one_never() {
        assert_eq!(when_to_finish(false, true), FinishDisk::Never);
        assert_eq!(when_to_finish(false, false), FinishDisk::Never);
        assert_eq!(when_to_finish(true, true), FinishDisk::AfterReport);
        assert_eq!(when_to_finish(true, false), FinishDisk::BeforeReport);
    }

    #[test]
    fn a_session_ends_in_an_exit_a_reboot_or_a_kexec() {
        let local = Job::LocalSink;
        let deploy = Job::Deploy(Box::new(DeployJob {
            layout: String::new(),
            deploy_partition: None,
            image: DeployImage::Tar,
            partition: true,
            environment: "debian12".into(),
            ssh_key: None,
            boot: None,
            postinstalls: Vec::new(),
            postinstall_timeout_secs: 60,
        }));
        // (job, reboot asked, kexec loaded, failed) -> ending
        let cases = [
            // A failed session exits, whatever it was asked (nothing to boot into).
            (&deploy, true, false, true, Ending::Exit),
            (&deploy, false, false, true, Ending::Exit),
            (&local, true, false, true, Ending::Exit),
            (&deploy, true, true, true, Ending::Exit),
            // A broadcast to a local sink released with Finish: the agent just exits.
            (&local, false, false, false, Ending::Exit),
            // Released with Reboot: a reboot, whatever the job.
            (&local, true, false, false, Ending::Reboot),
            (&deploy, true, false, false, Ending::Reboot),
            // A deployment reboots into its system even when released with Finish.
            (&deploy, false, false, false, Ending::Reboot),
            // A loaded kexec goes first (a reboot if it fails).
            (&deploy, true, true, false, Ending::KexecThenReboot),
            (&local, true, true, false, Ending::KexecThenReboot),
        ];
        for (job, reboot_asked, kexec_loaded, failed, want) in cases {
            assert_eq!(
                ending(job, reboot_asked, kexec_loaded, failed),
                want,
                "{job:?} reboot asked {reboot_asked}, kexec loaded {kexec_loaded}, failed {failed}"
            );
        }
    }

    #[test]
    fn a_repair_asks_the_coordinator_then_a_peer_then_the_coordinator_itself() {
        let mut r = Repair::new(9, 3, Some("n1"));
        assert_eq!(
            r.next_ask(),
            Some(DataRequest::Repair {
                deployment: 9,
                index: 3,
                avoid: Some("n1".into())
            })
        );
        // Asked again after a failure: still a repair (a peer may hold it).
        assert!(matches!(r.next_ask(), Some(DataRequest::Repair { .. })));
        r.redirected();
        assert_eq!(
            r.peer_ask(),
            DataRequest::One {
                deployment: 9,
                index: 3
            }
        );
        assert_eq!(
            r.next_ask(),
            Some(DataRequest::One {
                deployment: 9,
                index: 3
            })
        );
        assert_eq!(r.next_ask(), None);
    }

    #[test]
    fn a_repairs_answer_is_verified_and_a_redirect_only_answers_a_repair() {
        let (m, _) = manifest();
        let repair = Repair::new(1, 0, None).next_ask().unwrap();
        let one = DataRequest::One {
            deployment: 1,
            index: 0,
        };
        let chunk = |i, d: &'static [u8]| Whole::Chunk(i, d);
        assert_eq!(
            answer(&m, &one, 0, chunk(0, b"ABCDE")),
            Ok(Answer::Chunk(&b"ABCDE"[..]))
        );
        assert!(answer(&m, &one, 0, chunk(0, b"ABCDF")).is_err());
        assert_eq!(
            answer(&m, &one, 0, chunk(1, b"ABCDE")),
            Err("got chunk 1 instead".into())
        );
        let redirect = || Whole::<&[u8]>::Other(DataFrame::Redirect(peer("n2")));
        assert_eq!(
            answer(&m, &repair, 0, redirect()),
            Ok(Answer::Redirect(peer("n2")))
        );
        assert!(answer(&m, &one, 0, redirect())
            .unwrap_err()
            .starts_with("unexpected answer"));
        let other = |f| Whole::<&[u8]>::Other(f);
        assert_eq!(
            answer(&m, &one, 0, other(DataFrame::Unavailable { index: 0 })),
            Err("no longer held".into())
        );
        assert!(answer(
            &m,
            &one,
            0,
            other(DataFrame::Error(WireError::new(ErrorCode::Internal, "x")))
        )
        .unwrap_err()
        .starts_with("refused"));
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
            assert!(matches!(
                welcome(ToAgent::Error(WireError::new(c, "no"))),
                Err(JoinFailure::Fatal(_))
            ));
        }
        // "bad Hello: timed out", "no control stream": this connection, not this node.
        assert!(!definitive(ErrorCode::Unexpected));
        assert!(!definitive(ErrorCode::Internal));
        assert!(matches!(
            welcome(ToAgent::Error(WireError::new(ErrorCode::Internal, "busy"))),
            Err(JoinFailure::Retry(_))
        ));
        assert_eq!(
            welcome(ToAgent::Welcome(Welcome { deployment: 4 })),
            Ok(Welcome { deployment: 4 })
        );
        assert!(matches!(
            welcome(ToAgent::Finish),
            Err(JoinFailure::Fatal(_))
        ));
    }

    #[test]
    fn a_coordinator_that_is_not_the_pinned_one_is_not_retried() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        assert!(matches!(
            handshake_failed(a, "x", Some("invalid peer certificate: not the pinned one")),
            JoinFailure::Fatal(_)
        ));
        assert_eq!(
            handshake_failed(a, "timed out", None),
            JoinFailure::Retry(
                "cannot connect to the coordinator at 10.0.0.1:7000: timed out".into()
            )
        );
        assert!(matches!(
            handshake_failed(a, "x", Some("connection refused")),
            JoinFailure::Retry(_)
        ));
    }

    #[test]
    fn retry_pauses_stay_between_200_ms_and_2_s_and_grow() {
        for attempt in 1..40 {
            for r in [0.0, 0.3, 0.999, 1.0, -1.0, 7.0] {
                let p = retry_pause(attempt, r);
                assert!(p >= RETRY_MIN && p <= RETRY_MAX, "{attempt} {r}: {p:?}");
            }
        }
        assert_eq!(retry_pause(1, 0.0), RETRY_MIN);
        assert_eq!(retry_pause(1, 1.0), ms(400));
        assert_eq!(retry_pause(2, 1.0), ms(800));
        assert_eq!(retry_pause(5, 1.0), RETRY_MAX);
        assert_eq!(retry_pause(u32::MAX, 1.0), RETRY_MAX);
    }

    #[test]
    fn joining_pauses_until_the_time_is_up_and_then_says_so() {
        let t0 = Instant::now();
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let mut j = Joining::new(a, t0, ms(1000));
        assert_eq!(j.deadline(), t0 + ms(1000));
        assert_eq!(j.failed(t0 + ms(10), "refused", 1.0), Ok(ms(400)));
        // The pause never goes past the deadline.
        assert_eq!(j.failed(t0 + ms(900), "refused", 1.0), Ok(ms(100)));
        assert_eq!(j.attempts(), 2);
        assert_eq!(
            j.failed(t0 + ms(1000), "refused", 1.0),
            Err(
                "could not join the coordinator at 10.0.0.1:7000 in 1s (3 attempts): refused"
                    .into()
            )
        );
        // A limit past the clock's range: a day.
        let j = Joining::new(a, t0, Duration::MAX);
        assert_eq!(j.deadline(), t0 + Duration::from_secs(86_400));
    }
}
