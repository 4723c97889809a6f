//! An agent's judgement of its upstream, without I/O: how long a silence may last before the
//! upstream counts as lost, when a failed stream is tried again on the same parent, and when
//! the agent asks the coordinator for another one. The agent's session is the driver: it tells
//! a [`Watch`] what happened (a stream opened, data arrived, a chunk completed, the stream
//! failed) with the time as a value, and asks it how long to wait ([`Watch::patience`]) and
//! what to do ([`Watch::failed`]). Unit-tested here in virtual time.
//!
//! **Patience**: a silent upstream is judged against what its stream has shown: [`FACTOR`]
//! times the longest of the last [`HISTORY`] chunk intervals (the time the agent waited on
//! the stream for one chunk: what it spent not reading — its window full of chunks a slow
//! child still needs, its writer's queue full — is its own, not the stream's pace, and would
//! otherwise feed on itself), never less than the floor (a
//! second or two on a LAN: a stream whose chunks come every 30 ms and then stops for 2 s is
//! gone; a TCG lab keeps a longer floor in its cluster configuration) and never more than the
//! ceiling (the stall timeout). Before the transfer has shown two chunks (nothing to judge by
//! yet: the tree is still being wired, the first chunk crosses every hop) the ceiling holds.
//!
//! **Dead or starving** ([`Watch::judge`]): past its patience, a silent upstream counts as
//! lost only if its connection has also brought no packet at all for its quiet limit
//! ([`Policy::quiet`]: a parent agent's data connection carries QUIC keep-alives every 250 ms
//! even when it has no data, so [`MIN_QUIET`] at the default floor, half the floor in a lab
//! with a longer one, at most [`PEER_QUIET`]; the coordinator's control connection, with its
//! keep-alives every 2 s, [`PEER_QUIET`]). A relay that lost its own upstream is alive and
//! silent: its children keep waiting (up to the ceiling) while it finds another, instead of
//! all of them reporting it at once — which would have the coordinator take the starving relay
//! for a dead one. A killed or frozen upstream is found after max(patience, quiet limit): about
//! a second with the default floor. The driver samples the connection's packet count every
//! [`Watch::sample_every`], so that "no packet since" is known to within a quarter of the
//! limit.
//!
//! **A silent child** ([`Policy::child_quiet`]): the parent's side of the same judgement. A
//! child's connection that brought no packet (no acknowledgement, no keep-alive) for the floor,
//! and at least the quiet limit, is a dead or frozen child: the parent drops it, so that its
//! window and its other children's pacing stop waiting for it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::msg::StallLimits;

/// A silence may last this many recent chunk intervals.
pub const FACTOR: u32 = 4;
/// Chunk intervals remembered (the longest counts).
pub const HISTORY: usize = 8;
/// Default floor of the patience (`workflow.stall_floor`; a TCG lab sets a longer one).
pub const DEFAULT_FLOOR: Duration = Duration::from_secs(1);
/// Default ceiling of the patience (the stall timeout).
pub const DEFAULT_CEILING: Duration = Duration::from_secs(30);
/// Shortest floor accepted (a silence shorter than this is a scheduler hiccup, not a death).
pub const MIN_FLOOR: Duration = Duration::from_millis(200);
/// A new upstream that fails before its first frame and within this time of its opening has
/// most likely not been told about this node yet (its `Adopt` comes a moment after our
/// `Reparent`): it is tried again rather than reported lost.
pub const QUICK_WINDOW: Duration = Duration::from_secs(3);
/// Such quick retries on one upstream before it counts as lost.
pub const QUICK_RETRIES: u32 = 4;
/// Pause before a quick retry.
pub const QUICK_PAUSE: Duration = Duration::from_millis(500);
/// A connection that brought no packet for this long is dead or frozen: kd's QUIC keep-alive
/// on the control connection (`kd_net::endpoint::KEEP_ALIVE`, 2 s) with a margin for the
/// network and the scheduler. The longest quiet limit (a lab's; the coordinator's).
pub const PEER_QUIET: Duration = Duration::from_millis(2500);
/// The shortest quiet limit, for a parent agent's data connection: four of its keep-alives
/// (`kd_net::endpoint::DATA_KEEP_ALIVE`, 250 ms) missed.
pub const MIN_QUIET: Duration = Duration::from_millis(1000);

/// What to do about an upstream silent past its patience ([`Watch::judge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Keep reading; judge again after this long.
    Wait(Duration),
    /// It is lost ([`Problem::Silent`]).
    Dead,
}

/// The bounds of the patience.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    floor: Duration,
    ceiling: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            floor: DEFAULT_FLOOR,
            ceiling: DEFAULT_CEILING,
        }
    }
}

impl Policy {
    /// A policy waiting at least `floor` and at most `ceiling`; both within
    /// [`crate::bounds::MAX_SECS`], the floor at least [`MIN_FLOOR`] and at most the ceiling.
    pub fn new(floor: Duration, ceiling: Duration) -> Result<Self, String> {
        let max = Duration::from_secs(crate::bounds::MAX_SECS);
        if ceiling > max {
            return Err(format!(
                "stall timeout {ceiling:?} is more than the limit of {max:?} (1 day)"
            ));
        }
        if floor < MIN_FLOOR {
            return Err(format!(
                "stall floor {floor:?} is less than the minimum of {MIN_FLOOR:?}"
            ));
        }
        if floor > ceiling {
            return Err(format!(
                "stall floor {floor:?} is more than the stall timeout {ceiling:?}"
            ));
        }
        Ok(Self { floor, ceiling })
    }

    /// The policy a plan carries (checked: it comes from the network).
    pub fn from_limits(l: &StallLimits) -> Result<Self, String> {
        let max_ms = crate::bounds::MAX_SECS.saturating_mul(1000);
        if l.timeout_ms > max_ms || l.floor_ms > max_ms {
            return Err(format!(
                "stall limits {} ms / {} ms: more than the limit of {max_ms} ms (1 day)",
                l.floor_ms, l.timeout_ms
            ));
        }
        Self::new(
            Duration::from_millis(l.floor_ms),
            Duration::from_millis(l.timeout_ms),
        )
    }

    /// The same bounds for the wire.
    pub fn limits(&self) -> StallLimits {
        StallLimits {
            floor_ms: self.floor.as_millis() as u64,
            timeout_ms: self.ceiling.as_millis() as u64,
        }
    }

    /// Shortest wait.
    pub fn floor(&self) -> Duration {
        self.floor
    }

    /// Longest wait (the stall timeout).
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// How long an upstream's connection may bring no packet at all before a silent upstream
    /// counts as dead: a parent agent's (`from_peer`: keep-alives every 250 ms) half the floor,
    /// between [`MIN_QUIET`] and [`PEER_QUIET`] (a lab's longer floor keeps the longer limit);
    /// the coordinator's (keep-alives every 2 s) [`PEER_QUIET`].
    pub fn quiet(&self, from_peer: bool) -> Duration {
        if from_peer {
            (self.floor / 2).clamp(MIN_QUIET, PEER_QUIET)
        } else {
            PEER_QUIET
        }
    }

    /// How long a child's connection may bring no packet at all (no acknowledgement, no
    /// keep-alive: it sends them every 250 ms) before its parent drops it as dead or frozen:
    /// the floor, and at least the quiet limit. A lab's longer floor keeps its TCG guests'
    /// pauses of seconds from costing them their parent.
    pub fn child_quiet(&self) -> Duration {
        self.floor.max(self.quiet(true))
    }
}

/// What went wrong with the current upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No data for `silent`, and no packet at all for `quiet` ([`Watch::judge`]).
    Silent {
        /// Time without data.
        silent: Duration,
        /// Time without any packet on the upstream's connection.
        quiet: Duration,
    },
    /// The stream broke, ended early, or sent something wrong (what the agent saw).
    Broken(String),
    /// The upstream closed the connection because it heard nothing from this node for its
    /// child limit ([`Policy::child_quiet`]): this node is alive (it stalled, or its packets
    /// were lost), so the same upstream is tried again at once, a few times.
    Dropped,
    /// The upstream could not be reached at all.
    Unreachable(String),
}

impl Problem {
    /// The problem as judged: a stream that broke because the upstream closed the connection
    /// as a silent child's (`dropped_as_silent`) is [`Problem::Dropped`] (this node is alive:
    /// not a lost parent).
    pub fn or_dropped(self, dropped_as_silent: bool) -> Problem {
        match self {
            Problem::Broken(_) if dropped_as_silent => Problem::Dropped,
            p => p,
        }
    }
}

/// When a connection last brought a packet, known from its packet count sampled now and then
/// by a task that may itself not run on time: time the sampler did not run (the agent starved
/// of CPU, packets waiting unread) is not the peer's silence. Used by the judgement of an
/// upstream ([`Watch::judge`]) and a parent's of its children ([`Policy::child_quiet`]).
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    seen: u64,
    heard: Instant,
    woke: Instant,
}

impl Heard {
    /// Starts at `now`, the connection having received `packets` so far.
    pub fn new(now: Instant, packets: u64) -> Self {
        Self {
            seen: packets,
            heard: now,
            woke: now,
        }
    }

    /// The sampler woke at `now` after asking to sleep `slept` (it samples every `tick`), the
    /// connection having received `packets` so far: how long it has brought no packet. A wake
    /// later than `slept` by more than two ticks counts as if a packet came a tick ago.
    pub fn sample(
        &mut self,
        now: Instant,
        slept: Duration,
        tick: Duration,
        packets: u64,
    ) -> Duration {
        if now.saturating_duration_since(self.woke) > slept + tick.saturating_mul(2) {
            let recent = now.checked_sub(tick).unwrap_or(now);
            self.heard = self.heard.max(recent);
        }
        self.woke = now;
        if packets != self.seen {
            self.seen = packets;
            self.heard = now;
        }
        now.saturating_duration_since(self.heard)
    }
}

/// What to do about a [`Problem`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Open a stream to the same upstream again after this pause.
    RetrySame {
        /// How long to wait first.
        pause: Duration,
    },
    /// The upstream is lost: tell the coordinator (`ParentLost`, with this reason) and wait
    /// for another.
    Lost(String),
}

/// The stream being read.
#[derive(Debug, Clone, Copy)]
struct Stream {
    opened: Instant,
    from_peer: bool,
    got_frame: bool,
    /// Chunks completed on it (its first one includes the stream's start: not an interval).
    chunks: u32,
    /// When the read under way began, if one is.
    reading: Option<Instant>,
    /// Time waited on reads for the chunk under way.
    waited: Duration,
}

/// The agent's view of its upstream. See the module documentation.
#[derive(Debug, Clone)]
pub struct Watch {
    policy: Policy,
    intervals: VecDeque<Duration>,
    stream: Option<Stream>,
    quick_retries: u32,
}

impl Watch {
    /// A watch with no history.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            intervals: VecDeque::with_capacity(HISTORY),
            stream: None,
            quick_retries: 0,
        }
    }

    /// Its bounds.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// A stream to the upstream was opened at `now` (`from_peer`: a parent agent, not the
    /// coordinator).
    pub fn opened(&mut self, now: Instant, from_peer: bool) {
        self.stream = Some(Stream {
            opened: now,
            from_peer,
            got_frame: false,
            chunks: 0,
            reading: None,
            waited: Duration::ZERO,
        });
    }

    /// A read from the stream begins at `now` (it may wait [`Watch::patience`]).
    pub fn reading(&mut self, now: Instant) {
        if let Some(s) = &mut self.stream {
            s.reading = Some(now);
        }
    }

    /// A frame or a piece of data arrived at `now`.
    pub fn data(&mut self, now: Instant) {
        if let Some(s) = &mut self.stream {
            s.got_frame = true;
            if let Some(t) = s.reading.take() {
                s.waited = s.waited.saturating_add(now.saturating_duration_since(t));
            }
        }
        self.quick_retries = 0;
    }

    /// A chunk completed (from the stream, or repaired while reading it).
    pub fn chunk_done(&mut self) {
        let Some(s) = &mut self.stream else {
            return;
        };
        if s.chunks > 0 {
            if self.intervals.len() == HISTORY {
                self.intervals.pop_front();
            }
            self.intervals.push_back(s.waited);
        }
        s.chunks = s.chunks.saturating_add(1);
        s.waited = Duration::ZERO;
    }

    /// The longest recent chunk interval, once there is one.
    pub fn interval(&self) -> Option<Duration> {
        self.intervals.iter().max().copied()
    }

    /// How long the next read from the upstream may wait before the upstream counts as silent.
    pub fn patience(&self) -> Duration {
        match self.interval() {
            None => self.policy.ceiling,
            Some(i) => i
                .saturating_mul(FACTOR)
                .clamp(self.policy.floor, self.policy.ceiling),
        }
    }

    /// How long a full window waits for a child that still needs its oldest chunk before that
    /// child is overtaken (it then gets `Unavailable` and repairs it elsewhere): a few times
    /// this node's own patience with a silent upstream, so that a frozen child holds its
    /// siblings and its parent's stream back about as long as a frozen parent would hold it.
    pub fn grace(&self) -> Duration {
        self.patience().saturating_mul(3)
    }

    /// The quiet limit of the current upstream ([`Policy::quiet`]; the coordinator's before
    /// any stream).
    pub fn quiet_limit(&self) -> Duration {
        self.policy.quiet(self.stream.is_some_and(|s| s.from_peer))
    }

    /// How often the driver should look at the upstream connection's packet count while it
    /// waits: a quarter of the quiet limit, so that "no packet for the limit" is known within
    /// a quarter of it after the last packet.
    pub fn sample_every(&self) -> Duration {
        (self.quiet_limit() / 4).max(Duration::from_millis(50))
    }

    /// The read under way has brought nothing for `silent`, and the upstream's connection no
    /// packet at all for `quiet` (it may have sent keep-alives or acknowledgements: it is alive).
    pub fn judge(&self, silent: Duration, quiet: Duration) -> Judgement {
        let patience = self.patience();
        let ceiling = self.policy.ceiling;
        let limit = self.quiet_limit();
        if silent < patience {
            return Judgement::Wait(patience - silent);
        }
        if silent >= ceiling || quiet >= limit {
            return Judgement::Dead;
        }
        // Alive but with nothing to send (a starving relay): its own patience moves it.
        Judgement::Wait((limit - quiet).min(ceiling - silent))
    }

    /// The current stream failed at `now`: retry the same upstream, or report it lost. After
    /// `Lost` the stream is forgotten (the next one is [`Watch::opened`] on the new upstream).
    pub fn failed(&mut self, now: Instant, problem: Problem) -> Verdict {
        let stream = self.stream.take();
        let reason = match problem {
            Problem::Silent { silent, quiet } => {
                let limit = self.policy.quiet(stream.is_some_and(|s| s.from_peer));
                let packets = if quiet >= limit {
                    format!(", no packet for {:.1} s", quiet.as_secs_f64())
                } else {
                    String::new()
                };
                match self.interval() {
                    Some(i) => format!(
                        "no data for {:.1} s{packets} (recent chunk interval {:.2} s)",
                        silent.as_secs_f64(),
                        i.as_secs_f64()
                    ),
                    None => format!("no data for {:.1} s{packets}", silent.as_secs_f64()),
                }
            }
            Problem::Unreachable(e) => return Verdict::Lost(e),
            Problem::Dropped => {
                if self.quick_retries < QUICK_RETRIES {
                    self.quick_retries += 1;
                    return Verdict::RetrySame {
                        pause: Duration::ZERO,
                    };
                }
                "dropped by the upstream as silent, again and again".to_string()
            }
            Problem::Broken(e) => {
                let refused_at_once = stream.is_some_and(|s| {
                    s.from_peer
                        && !s.got_frame
                        && now.saturating_duration_since(s.opened) < QUICK_WINDOW
                });
                if refused_at_once && self.quick_retries < QUICK_RETRIES {
                    self.quick_retries += 1;
                    return Verdict::RetrySame { pause: QUICK_PAUSE };
                }
                e
            }
        };
        self.quick_retries = 0;
        Verdict::Lost(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn silent(silent: u64, quiet: u64) -> Problem {
        Problem::Silent {
            silent: ms(silent),
            quiet: ms(quiet),
        }
    }

    fn watch(floor: u64, ceiling: u64) -> Watch {
        Watch::new(Policy::new(ms(floor), ms(ceiling)).unwrap())
    }

    /// Feeds `n` chunks `every` apart from `t` (two reads each, waiting all that time);
    /// returns the time of the last one.
    fn chunks(w: &mut Watch, mut t: Instant, n: u32, every: Duration) -> Instant {
        for _ in 0..n {
            w.reading(t);
            t += every / 2;
            w.data(t);
            w.reading(t);
            t += every - every / 2;
            w.data(t);
            w.chunk_done();
        }
        t
    }

    #[test]
    fn the_ceiling_holds_until_the_stream_has_shown_its_pace() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        assert_eq!(w.patience(), ms(30_000));
        assert_eq!(w.grace(), ms(90_000));
        w.opened(t0, true);
        assert_eq!(w.patience(), ms(30_000));
        // One chunk: still no interval.
        chunks(&mut w, t0, 1, ms(5000));
        assert_eq!(w.interval(), None);
        assert_eq!(w.patience(), ms(30_000));
        // A second one: an interval.
        chunks(&mut w, t0 + ms(5000), 1, ms(40));
        assert_eq!(w.interval(), Some(ms(40)));
    }

    #[test]
    fn a_fast_stream_is_judged_at_the_floor() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        w.opened(t0, true);
        chunks(&mut w, t0, 20, ms(30));
        // 4 × 30 ms is well under the floor.
        assert_eq!(w.patience(), ms(2000));
        // A window waits for a child three times that.
        assert_eq!(w.grace(), ms(6000));
    }

    #[test]
    fn a_slow_stream_gets_a_few_of_its_intervals_up_to_the_ceiling() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        w.opened(t0, false);
        let t = chunks(&mut w, t0, 5, ms(1500));
        assert_eq!(w.patience(), ms(6000));
        // One slow chunk among fast ones counts while it is recent …
        let t = chunks(&mut w, t, 1, ms(5000));
        let t = chunks(&mut w, t, 3, ms(100));
        assert_eq!(w.patience(), ms(20_000));
        // … and is forgotten after HISTORY chunks.
        chunks(&mut w, t, HISTORY as u32, ms(100));
        assert_eq!(w.patience(), ms(2000));
        // A stream slower than ceiling / FACTOR is capped.
        let mut w = watch(2000, 30_000);
        w.opened(t0, false);
        chunks(&mut w, t0, 3, ms(20_000));
        assert_eq!(w.patience(), ms(30_000));
    }

    #[test]
    fn time_spent_not_reading_is_not_the_streams_pace() {
        // The agent's window is full (a child is slow or frozen): it stops reading for 6 s
        // between chunks. The stream itself delivers each chunk in 30 ms: still judged at the
        // floor, not at 4 × 6 s.
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        w.opened(t0, true);
        let mut t = t0;
        for _ in 0..10 {
            t = chunks(&mut w, t, 1, ms(30));
            t += ms(6000);
        }
        assert_eq!(w.interval(), Some(ms(30)));
        assert_eq!(w.patience(), ms(2000));
    }

    #[test]
    fn a_lab_keeps_its_longer_floor() {
        let t0 = Instant::now();
        let mut w = watch(10_000, 30_000);
        w.opened(t0, true);
        chunks(&mut w, t0, 10, ms(200));
        assert_eq!(w.patience(), ms(10_000));
    }

    #[test]
    fn the_time_a_change_of_upstream_takes_is_not_an_interval() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        w.opened(t0, true);
        let t = chunks(&mut w, t0, 4, ms(50));
        assert!(matches!(
            w.failed(t + ms(2000), silent(2500, 2500)),
            Verdict::Lost(_)
        ));
        // The new stream's first chunk comes 7 s after the last one of the old stream.
        let t = t + ms(6000);
        w.opened(t, true);
        chunks(&mut w, t, 1, ms(1000));
        assert_eq!(w.interval(), Some(ms(50)));
        assert_eq!(w.patience(), ms(2000));
    }

    #[test]
    fn silence_is_reported_with_what_the_stream_had_shown() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        w.opened(t0, true);
        let t = chunks(&mut w, t0, 3, ms(250));
        match w.failed(t + ms(2500), silent(2500, 2500)) {
            Verdict::Lost(r) => {
                assert_eq!(
                    r,
                    "no data for 2.5 s, no packet for 2.5 s (recent chunk interval 0.25 s)"
                )
            }
            v => panic!("{v:?}"),
        }
        let mut w = watch(2000, 5000);
        w.opened(t0, false);
        assert_eq!(
            w.failed(t0 + ms(5000), silent(5000, 100)),
            Verdict::Lost("no data for 5.0 s".into())
        );
    }

    #[test]
    fn a_new_parent_that_refuses_at_once_is_tried_again_a_few_times() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        let mut t = t0;
        for _ in 0..QUICK_RETRIES {
            w.opened(t, true);
            t += ms(100);
            assert_eq!(
                w.failed(t, Problem::Broken("closed".into())),
                Verdict::RetrySame { pause: QUICK_PAUSE }
            );
            t += QUICK_PAUSE;
        }
        w.opened(t, true);
        assert_eq!(
            w.failed(t + ms(100), Problem::Broken("closed".into())),
            Verdict::Lost("closed".into())
        );
        // The count starts over after the loss …
        w.opened(t, true);
        assert!(matches!(
            w.failed(t + ms(100), Problem::Broken("closed".into())),
            Verdict::RetrySame { .. }
        ));
        // … and once a stream delivered.
        for _ in 0..3 {
            w.opened(t, true);
            let _ = w.failed(t + ms(100), Problem::Broken("closed".into()));
        }
        w.opened(t, true);
        w.data(t + ms(10));
        assert!(matches!(
            w.failed(t + ms(100), Problem::Broken("reset".into())),
            Verdict::Lost(_)
        ));
        w.opened(t, true);
        assert!(matches!(
            w.failed(t + ms(100), Problem::Broken("closed".into())),
            Verdict::RetrySame { .. }
        ));
    }

    #[test]
    fn a_child_dropped_as_silent_goes_back_to_the_same_parent() {
        // Its parent heard nothing from it for a while (it stalled, or its packets were lost)
        // and closed its connection: it is alive, so it reconnects at once, not elsewhere.
        let t0 = Instant::now();
        let mut w = watch(1000, 30_000);
        w.opened(t0, true);
        let t = chunks(&mut w, t0, 10, ms(85));
        for _ in 0..QUICK_RETRIES {
            assert_eq!(
                w.failed(t, Problem::Dropped),
                Verdict::RetrySame {
                    pause: Duration::ZERO
                }
            );
            w.opened(t, true);
        }
        // Dropped again and again with no data in between: that parent is lost after all.
        assert!(matches!(w.failed(t, Problem::Dropped), Verdict::Lost(_)));
        // Data in between starts the count over.
        w.opened(t, true);
        assert!(matches!(
            w.failed(t, Problem::Dropped),
            Verdict::RetrySame { .. }
        ));
        w.opened(t, true);
        w.data(t + ms(10));
        for _ in 0..QUICK_RETRIES {
            assert!(matches!(
                w.failed(t, Problem::Dropped),
                Verdict::RetrySame { .. }
            ));
            w.opened(t, true);
        }
    }

    #[test]
    fn late_failures_silence_the_coordinator_and_unreachable_parents_are_lost_at_once() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        // Late: more than QUICK_WINDOW after the opening.
        w.opened(t0, true);
        assert!(matches!(
            w.failed(t0 + QUICK_WINDOW, Problem::Broken("closed".into())),
            Verdict::Lost(_)
        ));
        // The coordinator is not a new parent that may not know us yet.
        w.opened(t0, false);
        assert!(matches!(
            w.failed(t0 + ms(10), Problem::Broken("closed".into())),
            Verdict::Lost(_)
        ));
        // Silence is never retried on the same upstream here (the coordinator decides).
        w.opened(t0, true);
        assert!(matches!(
            w.failed(t0 + ms(10), silent(2000, 3000)),
            Verdict::Lost(_)
        ));
        assert_eq!(
            w.failed(t0, Problem::Unreachable("cannot connect".into())),
            Verdict::Lost("cannot connect".into())
        );
    }

    #[test]
    fn a_frozen_upstream_is_dead_a_starving_one_is_waited_for() {
        let t0 = Instant::now();
        let mut w = watch(2000, 30_000);
        w.opened(t0, true);
        chunks(&mut w, t0, 10, ms(30));
        // A parent agent's connection: keep-alives every 250 ms, judged quiet after MIN_QUIET.
        assert_eq!(w.quiet_limit(), MIN_QUIET);
        // Within its patience: read on.
        assert_eq!(w.judge(ms(500), ms(500)), Judgement::Wait(ms(1500)));
        // Past it, with no packet at all for the quiet limit: killed, frozen or cut off.
        assert_eq!(w.judge(ms(2000), MIN_QUIET), Judgement::Dead);
        // Past it but not yet that long without a packet: wait until that is known.
        assert_eq!(w.judge(ms(2000), ms(600)), Judgement::Wait(ms(400)));
        // Its keep-alives still come: a relay that lost its own upstream. Wait (its own
        // patience moves it), judging again within the quiet limit …
        assert_eq!(w.judge(ms(4000), ms(300)), Judgement::Wait(ms(700)));
        assert_eq!(w.judge(ms(20_000), ms(0)), Judgement::Wait(MIN_QUIET));
        // … but never past the ceiling.
        assert_eq!(w.judge(ms(29_500), ms(0)), Judgement::Wait(ms(500)));
        assert_eq!(w.judge(ms(30_000), ms(0)), Judgement::Dead);
        // The coordinator's control connection (keep-alives every 2 s) keeps PEER_QUIET.
        w.opened(t0, false);
        assert_eq!(w.quiet_limit(), PEER_QUIET);
        assert_eq!(w.judge(ms(2000), ms(2000)), Judgement::Wait(ms(500)));
        assert_eq!(w.judge(ms(2500), PEER_QUIET), Judgement::Dead);
        // Before the stream has shown its pace, the ceiling is the patience.
        let w = watch(2000, 30_000);
        assert_eq!(w.judge(ms(2500), ms(2500)), Judgement::Wait(ms(27_500)));
        assert_eq!(w.judge(ms(30_000), ms(30_000)), Judgement::Dead);
    }

    #[test]
    fn a_dead_parent_is_found_in_about_a_second_at_the_default_floor() {
        // 1 MiB chunks at 100 Mbit/s: one every ~85 ms.
        let t0 = Instant::now();
        let mut w = Watch::new(Policy::default());
        w.opened(t0, true);
        let t = chunks(&mut w, t0, 20, ms(85));
        assert_eq!(w.patience(), DEFAULT_FLOOR);
        assert_eq!(w.quiet_limit(), ms(1000));
        // Sampled every 250 ms: the last packet is known to within that.
        assert_eq!(w.sample_every(), ms(250));
        // Killed at `t` (its last packet): dead once both the floor and the quiet limit have
        // passed, 1 s later, not 2 s + 2.5 s as with the old limits.
        assert_eq!(w.judge(ms(750), ms(750)), Judgement::Wait(ms(250)));
        assert_eq!(w.judge(ms(1000), ms(1000)), Judgement::Dead);
        match w.failed(t + ms(1000), silent(1000, 1000)) {
            Verdict::Lost(r) => assert_eq!(
                r,
                "no data for 1.0 s, no packet for 1.0 s (recent chunk interval 0.09 s)"
            ),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_lab_keeps_its_longer_quiet_limits() {
        // The TCG lab's floor of 10 s: half of it, capped at PEER_QUIET, for a parent's
        // connection; its children are dropped only after the whole floor.
        let lab = Policy::new(ms(10_000), ms(60_000)).unwrap();
        assert_eq!(lab.quiet(true), PEER_QUIET);
        assert_eq!(lab.child_quiet(), ms(10_000));
        let mut w = Watch::new(lab);
        w.opened(Instant::now(), true);
        assert_eq!(w.sample_every(), ms(625));
        // The default: a second both ways; a floor of 3 s: 1.5 s quiet, children after 3 s.
        let d = Policy::default();
        assert_eq!((d.quiet(true), d.child_quiet()), (MIN_QUIET, MIN_QUIET));
        let p = Policy::new(ms(3000), ms(30_000)).unwrap();
        assert_eq!((p.quiet(true), p.child_quiet()), (ms(1500), ms(3000)));
        // The smallest floor still waits for MIN_QUIET without a packet.
        let p = Policy::new(MIN_FLOOR, ms(30_000)).unwrap();
        assert_eq!((p.quiet(true), p.child_quiet()), (MIN_QUIET, MIN_QUIET));
        assert_eq!(p.quiet(false), PEER_QUIET);
    }

    #[test]
    fn a_parent_that_dropped_this_node_as_silent_is_not_lost() {
        let broken = Problem::Broken("closed".into());
        assert_eq!(broken.clone().or_dropped(true), Problem::Dropped);
        assert_eq!(broken.clone().or_dropped(false), broken);
        // Only a broken stream: silence stays silence.
        assert_eq!(silent(1, 2).or_dropped(true), silent(1, 2));
    }

    #[test]
    fn packets_tell_when_a_connection_was_last_heard_and_a_late_sampler_is_not_silence() {
        let t0 = Instant::now();
        let tick = ms(250);
        let mut h = Heard::new(t0, 10);
        // No packet: the silence grows with the samples.
        assert_eq!(h.sample(t0 + ms(250), tick, tick, 10), ms(250));
        assert_eq!(h.sample(t0 + ms(500), tick, tick, 10), ms(500));
        // A packet: heard now.
        assert_eq!(h.sample(t0 + ms(750), tick, tick, 11), ms(0));
        assert_eq!(h.sample(t0 + ms(1000), tick, tick, 11), ms(250));
        // The sampler itself did not run for 3 s: counted as heard a tick ago.
        assert_eq!(h.sample(t0 + ms(4000), tick, tick, 11), tick);
        // A long sleep asked for is not lateness.
        let mut h = Heard::new(t0, 0);
        assert_eq!(h.sample(t0 + ms(2000), ms(2000), tick, 0), ms(2000));
    }

    #[test]
    fn limits_are_checked() {
        assert!(Policy::new(ms(100), ms(30_000))
            .unwrap_err()
            .contains("minimum"));
        assert!(Policy::new(ms(3000), ms(2000))
            .unwrap_err()
            .contains("more than the stall timeout"));
        assert!(Policy::new(ms(2000), Duration::from_secs(86_401))
            .unwrap_err()
            .contains("limit"));
        let p = Policy::new(ms(2000), ms(30_000)).unwrap();
        assert_eq!(Policy::from_limits(&p.limits()), Ok(p));
        for bad in [
            StallLimits {
                floor_ms: u64::MAX,
                timeout_ms: u64::MAX,
            },
            StallLimits {
                floor_ms: 0,
                timeout_ms: 1000,
            },
            StallLimits {
                floor_ms: 5000,
                timeout_ms: 1000,
            },
        ] {
            assert!(Policy::from_limits(&bad).is_err(), "{bad:?}");
        }
    }
}
