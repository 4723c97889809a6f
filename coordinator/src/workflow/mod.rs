//! The deployment workflow as a pure state machine (quinn-proto style).
//!
//! [`Deployment`] holds the state of one deployment over a set of nodes. It does no I/O and reads
//! no clock: a driver feeds it [`Event`]s and the current time, and executes the [`Action`]s it
//! returns. Per node it runs the macro-steps of the brief, in order:
//!
//! | step | what the machine asks | what ends it |
//! |---|---|---|
//! | [`Step::SetDeploymentEnv`] | `WritePxe{Deploy}`, then `RunCommand{Reboot, level}` (escalating soft → hard → very_hard, at most `reboot_window` commands in flight) | `AgentHello` |
//! | [`Step::Prepare`] | `SendPrepare` | `StepDone{Prepare}` |
//! | [`Step::Broadcast`] | `StartBroadcast{round, nodes, parents}` (a barrier and a tree, see below), `Reparent` | `StepDone{Broadcast}` |
//! | [`Step::Finish`] | nothing: the agent finishes its disk by itself after its report | `StepDone{Finish}` |
//! | [`Step::BootNewEnv`] | `WritePxe{LocalDisk}`, `RebootAgent` (soft; with the cluster's `boot: kexec`, a kexec), then `RunCommand{Reboot}` (hard, very_hard; after a kexec: soft first); `ProbePort` every `probe_interval` | `PortOpen` |
//!
//! Nodes move independently: a node that passes a step goes on at once, a node that fails
//! retries or drops out ([`Action::NodeDone`] with the reason), and the deployment ends
//! ([`Action::Finished`]) when every node is done.
//!
//! **Timeouts, retries, escalation** (Kadeploy's automata, see `WorkflowConfig`):
//! * a reboot command that fails (non-zero exit, or runs longer than `command_timeout`) moves
//!   that node to the next configured level at once;
//! * a step attempt fails when its timeout passes (for the reboot steps: counted from the
//!   successful reboot command to the Hello / the open port), or when the agent reports an
//!   error. The step is then retried up to `retries` times; a retry of a reboot step starts one
//!   level above the highest level used so far (so a dead node goes soft → hard → very_hard);
//! * a retry of Prepare with the node's agent still connected sends `SendPrepare` again; a
//!   retry of Prepare without an agent, and every retry of Broadcast or Finish (an agent takes
//!   one plan and finishes a disk once), starts the node over from SetDeploymentEnv (a fresh
//!   deploy profile and token, a reboot, a new agent, Prepare) and puts it in the next round;
//!   the attempt counts against the retries of the step that failed. A node that fails for good
//!   on the way back names both (`... (retrying Broadcast after: ...)`);
//! * with the cluster's `boot: kexec`, BootNewEnv's reboot through the agent is a kexec into
//!   the deployed kernel (the agent falls back to a plain reboot by itself when the kexec
//!   fails to load or to start). A node that does not answer within `boot_new_env`'s timeout
//!   after it (or whose agent could not be told) gets the reboot commands at once, in the same
//!   attempt, from soft up; then timeouts and retries go on as for a reboot;
//! * an agent lost during Prepare, Broadcast or Finish fails that step's attempt (and is
//!   retried as above); `NodeFailed` (a cause no retry can mend) ends the node at once;
//! * the deployment always ends by [`Deployment::time_bound`] after its start.
//!
//! **Broadcast barrier.** The broadcast runs in rounds. A round starts when no round runs and
//! some nodes are ready, and either no node is still before the broadcast (rebooting or
//! preparing) or `broadcast_wait` has passed since the first ready node became ready. Nodes that
//! become ready during a round (late nodes, retries) go into the next round.
//!
//! **The tree is the machine's.** A round's tree is planned here (`kd_proto::tree`, with
//! `Settings::arity`) and given with `StartBroadcast`; the machine keeps each node's current
//! parent. A node that stops serving (failed, cancelled, lost, rebooted) leaves the tree: each
//! of its children still receiving gets `Reparent` to the nearest ancestor still serving (else
//! the coordinator), and so does a node whose agent says it lost its parent (`ParentLost`).
//! A node keeps relaying after its own report: its soft reboot in BootNewEnv is **held** (no
//! timer runs) until no node still receiving reads from it, directly or further down; so is
//! the failure of a node whose own copy failed though it verified every chunk (`CopyFailed`:
//! a full disk, a write error), or whose disk could not be finished (post-install, GRUB): its
//! children lose nothing, and nobody moves.
//!
//! # Driving it
//! ```text
//! let mut d = Deployment::new(names, Settings::from_config(&cluster), Instant::now());
//! let mut queue: VecDeque<Action> = d.start(Instant::now()).into();
//! loop {
//!     execute every queued action (see below), collecting the events they produce;
//!     wait for the next event, or until d.poll_timeout();
//!     let now = Instant::now();
//!     if d.poll_timeout() <= now { queue.extend(d.handle_timeout(now)); }
//!     for event in events { queue.extend(d.handle(event, now)); }
//!     if d.is_finished() { break; }
//! }
//! ```
//! What each action asks of the driver:
//! * `WritePxe{node, profile}`: render with `ClusterConfig::render_profile` (for `Deploy`, with a
//!   fresh one-time token for that node, which invalidates the previous one) and write the file;
//!   answer `PxeWritten{node, result}`.
//! * `RunCommand{node, id, op, level}`: run `ClusterConfig::command(op, level, node)` in the
//!   background; answer `CommandDone{node, id, status}`. `KillCommand{id}` asks to kill it
//!   (no answer needed; a late `CommandDone` is ignored).
//! * `RebootAgent{node, id, kexec}`: tell the node's agent to reboot (with `kexec`: to kexec
//!   into the deployed kernel, falling back to a reboot); answer `CommandDone` with
//!   `Exited(0)` once sent, `Failed(..)` if the agent is not connected.
//! * `SendPrepare{node}`: send the agent its disk preparation; answer
//!   `StepDone{node, Prepare, result}` when it reports.
//! * `StartBroadcast{round, nodes, parents}`: broadcast to `nodes` over this tree
//!   (`parents[i]`: the index in `nodes` of node i's parent, `None`: the coordinator); answer
//!   one `StepDone{Broadcast}`, `CopyFailed` (its own copy failed though it verified every
//!   chunk: it can still relay), `NodeLost` or `NodeFailed` per node. The agent then finishes its
//!   disk by itself: answer its `StepDone{Finish}` (it may come at any time after the
//!   broadcast's; the machine keeps it until the node enters Finish).
//! * `Reparent{round, node, parent}`: tell `node` to read from `parent` (`None`: the
//!   coordinator) from the first chunk it lacks, and `parent` to accept it.
//! * `CancelStep{node, step, reason}`: the machine stopped waiting (timeout); drop the node's
//!   current work (in a broadcast: take it out of the tree and re-parent its children).
//! * `ProbePort{node}`: try one TCP connection to the node's check port with a timeout shorter
//!   than `probe_interval`; answer `PortOpen` or `PortClosed`.
//! * `StepStarted`, `NodeDone`, `Finished`: progress and results, for display and records.
//!   On `NodeDone` with a failure, close the node's agent connection if any, revoke its token
//!   and write its local-disk profile.
//! * The agent's `Hello` (token already checked by the driver) is `AgentHello{node}`; a lost
//!   control connection is `NodeLost{node, reason}` (ignored while the node is rebooting); an
//!   agent that lost its upstream is `ParentLost{node, parent}`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use kd_proto::auto::{ImageShape, NodeRates};
use kd_proto::tree::Arity;

use crate::config::{ClusterConfig, Level, NewEnvBoot, Operation, StepPolicy, WorkflowConfig};

#[cfg(test)]
mod sim;

/// A macro-step of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// PXE deploy profile, reboot, agent Hello.
    SetDeploymentEnv,
    /// Partition, mkfs, mount.
    Prepare,
    /// Receive and write the image.
    Broadcast,
    /// Post-installs, SSH key, bootloader.
    Finish,
    /// PXE local profile, reboot, the deployed OS answers.
    BootNewEnv,
}

impl Step {
    /// All steps, in order.
    pub const ALL: [Step; 5] = [
        Step::SetDeploymentEnv,
        Step::Prepare,
        Step::Broadcast,
        Step::Finish,
        Step::BootNewEnv,
    ];

    /// Kadeploy-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::SetDeploymentEnv => "SetDeploymentEnv",
            Step::Prepare => "Prepare",
            Step::Broadcast => "Broadcast",
            Step::Finish => "Finish",
            Step::BootNewEnv => "BootNewEnv",
        }
    }

    fn next(self) -> Option<Step> {
        match self {
            Step::SetDeploymentEnv => Some(Step::Prepare),
            Step::Prepare => Some(Step::Broadcast),
            Step::Broadcast => Some(Step::Finish),
            Step::Finish => Some(Step::BootNewEnv),
            Step::BootNewEnv => None,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one command the machine asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(pub u64);

/// Which PXE profile to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PxeKind {
    /// Boot the deploy kernel and initrd (with a fresh token).
    Deploy,
    /// Boot from the local disk.
    LocalDisk,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandStatus {
    /// It exited with this code (0 = success).
    Exited(i32),
    /// It could not run, was killed, or the agent could not be told.
    Failed(String),
}

impl CommandStatus {
    fn failure(&self) -> Option<String> {
        match self {
            CommandStatus::Exited(0) => None,
            CommandStatus::Exited(c) => Some(format!("exit status {c}")),
            CommandStatus::Failed(m) => Some(m.clone()),
        }
    }
}

/// What the driver tells the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `WritePxe` was executed.
    PxeWritten {
        /// Node.
        node: String,
        /// `Err` with the reason if the file could not be written.
        result: Result<(), String>,
    },
    /// A `RunCommand` or `RebootAgent` ended.
    CommandDone {
        /// Node.
        node: String,
        /// The id from the action.
        id: CommandId,
        /// How it ended.
        status: CommandStatus,
    },
    /// The node's agent said Hello (token checked).
    AgentHello {
        /// Node.
        node: String,
    },
    /// The agent reported the end of a step.
    StepDone {
        /// Node.
        node: String,
        /// Which step.
        step: Step,
        /// `Err` with the reason on failure.
        result: Result<(), String>,
    },
    /// The node's broadcast failed on the node itself (its disk full, a write error) though it
    /// verified every chunk of the image: it can go on relaying. Its children keep reading from
    /// it; the failure counts (`StepDone{Broadcast, Err}`) once no node still receiving reads
    /// from it, directly or further down.
    CopyFailed {
        /// Node.
        node: String,
        /// Why its copy failed.
        reason: String,
    },
    /// The node's agent connection is gone.
    NodeLost {
        /// Node.
        node: String,
        /// What the driver saw.
        reason: String,
    },
    /// The node's agent says it lost its upstream during the broadcast.
    ParentLost {
        /// Node.
        node: String,
        /// The parent it lost (`None`: the coordinator).
        parent: Option<String>,
    },
    /// The node fails now, with no retry (a cause no retry can mend, such as an image the
    /// coordinator cannot serve).
    NodeFailed {
        /// Node.
        node: String,
        /// Why.
        reason: String,
    },
    /// A node answered a `ProbeRates`: what it measured (`None`: not measured).
    RatesMeasured {
        /// Node.
        node: String,
        /// Bytes per second it fetched from its probe peer.
        link: Option<u64>,
        /// Bytes per second it wrote where the image goes.
        disk: Option<u64>,
    },
    /// A `ProbePort` connected.
    PortOpen {
        /// Node.
        node: String,
    },
    /// A `ProbePort` did not connect (informational).
    PortClosed {
        /// Node.
        node: String,
    },
    /// Stop everything: every node not done fails with this reason.
    Abort {
        /// Why (shown per node).
        reason: String,
    },
}

/// What the machine asks the driver to do. See the module documentation for the answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the node's PXE profile; answer `PxeWritten`.
    WritePxe {
        /// Node.
        node: String,
        /// Which profile.
        profile: PxeKind,
    },
    /// Run a remote-operation command template; answer `CommandDone`.
    RunCommand {
        /// Node.
        node: String,
        /// Id to answer with.
        id: CommandId,
        /// Operation (always `Reboot` in a deployment).
        op: Operation,
        /// Level.
        level: Level,
    },
    /// Ask the node's agent to reboot (soft reboot out of the deploy environment); answer
    /// `CommandDone`.
    RebootAgent {
        /// Node.
        node: String,
        /// Id to answer with.
        id: CommandId,
        /// Kexec into the deployed kernel (the agent reboots if that fails), not a reboot.
        kexec: bool,
    },
    /// Kill a command that ran too long (no answer needed).
    KillCommand {
        /// Node.
        node: String,
        /// The command.
        id: CommandId,
    },
    /// Send the agent its disk preparation; answer `StepDone{Prepare}`.
    SendPrepare {
        /// Node.
        node: String,
    },
    /// Broadcast the image to these nodes over this tree; answer `StepDone{Broadcast}`,
    /// `NodeLost` or `NodeFailed` per node, then each agent's `StepDone{Finish}`.
    StartBroadcast {
        /// Round number (1, 2, …).
        round: u32,
        /// The nodes, in configuration order.
        nodes: Vec<String>,
        /// Each node's parent, as an index in `nodes` (`None`: the coordinator).
        parents: Vec<Option<usize>>,
        /// Each node's pace group: the coordinator feeds its children in step within a group
        /// only (an `auto` tree's speed classes; 0 for every node otherwise).
        pace_groups: Vec<u64>,
        /// The tree's shape in words (`chain`, `auto: chain of 15 at 11.8 MB/s, ...`).
        shape: String,
    },
    /// Before an `auto` round: each node measures its rates (fetches `bytes` from
    /// `nodes[fetch[i]]`, serves them to whoever fetches from it, times a disk write); answer
    /// `RatesMeasured` per node (or nothing: the round starts without it after a while).
    ProbeRates {
        /// Round number the probe is for.
        round: u32,
        /// The nodes, in configuration order.
        nodes: Vec<String>,
        /// Whom each node fetches its probe from, as an index in `nodes`.
        fetch: Vec<Option<usize>>,
        /// Bytes of each probe.
        bytes: u32,
    },
    /// A node of the round reads from a new parent from now on (no answer).
    Reparent {
        /// Round number.
        round: u32,
        /// The node that moves.
        node: String,
        /// Its new parent (`None`: the coordinator).
        parent: Option<String>,
    },
    /// Try one TCP connection to the node's check port; answer `PortOpen` or `PortClosed`.
    ProbePort {
        /// Node.
        node: String,
    },
    /// The machine stopped waiting for this step on this node (timeout): drop its work.
    CancelStep {
        /// Node.
        node: String,
        /// Step.
        step: Step,
        /// Why.
        reason: String,
    },
    /// Progress: the node starts (or retries) a step.
    StepStarted {
        /// Node.
        node: String,
        /// Step.
        step: Step,
        /// 0 for the first attempt.
        attempt: u32,
    },
    /// The node is done.
    NodeDone {
        /// Node.
        node: String,
        /// Its result and timings.
        report: NodeReport,
    },
    /// Every node is done.
    Finished {
        /// All results.
        summary: Summary,
    },
}

/// Outcome of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeResult {
    /// The deployed OS answers.
    Deployed,
    /// The node dropped out.
    Failed {
        /// In which step.
        step: Step,
        /// Why.
        reason: String,
    },
}

/// One macro-step as a node went through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// Step.
    pub step: Step,
    /// Attempts made (1 = no retry).
    pub attempts: u32,
    /// From the first attempt's start to the end (for Broadcast: includes the barrier wait).
    pub duration: Duration,
    /// Whether the step succeeded.
    pub ok: bool,
    /// Reboots issued during the step, in order (soft in BootNewEnv = through the agent).
    pub reboots: Vec<Level>,
    /// The node was asked to kexec into the deployed kernel during the step (its first soft
    /// reboot in BootNewEnv, through the agent).
    pub kexec: bool,
}

/// Result and timings of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Node name.
    pub node: String,
    /// Outcome.
    pub result: NodeResult,
    /// Steps entered, in order.
    pub steps: Vec<StepRecord>,
    /// Time spent ready, waiting for the broadcast to start.
    pub barrier_wait: Duration,
    /// From the deployment's start to this node's end.
    pub total: Duration,
}

impl NodeReport {
    /// Duration of one step, if the node entered it.
    pub fn step_duration(&self, step: Step) -> Option<Duration> {
        self.steps
            .iter()
            .find(|r| r.step == step)
            .map(|r| r.duration)
    }

    /// Whether the node was deployed.
    pub fn is_ok(&self) -> bool {
        self.result == NodeResult::Deployed
    }
}

/// Results of a whole deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Deployed nodes, in configuration order.
    pub ok: Vec<String>,
    /// Failed nodes with step and reason, in configuration order.
    pub ko: Vec<(String, Step, String)>,
    /// Every node's report, in the order given to [`Deployment::new`].
    pub reports: Vec<NodeReport>,
    /// Broadcast rounds run.
    pub rounds: u32,
    /// From start to the last node's end.
    pub elapsed: Duration,
}

/// How far ahead of a chunk a node may be and still be asked for it in a repair: agents keep
/// a window of the last chunks they relayed (16 by default); half of it leaves room for
/// progress reports up to a second old.
pub const REPAIR_WINDOW: u32 = 8;

/// Swarm repair: the node to fetch chunk `index` from instead of the coordinator, among
/// `holders` (name, chunks received so far: they arrive in order): one that has it and is at
/// most `window` chunks past it (it likely still holds it), the closest first (then by name).
/// `None`: nobody likely holds it; the coordinator serves it.
pub fn repair_holder<'a>(
    index: u32,
    holders: impl IntoIterator<Item = (&'a str, u32)>,
    window: u32,
) -> Option<&'a str> {
    holders
        .into_iter()
        .filter(|&(_, have)| have > index && have - index <= window)
        .min_by_key(|&(name, have)| (have, name))
        .map(|(name, _)| name)
}

/// What the machine needs from the cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Timeouts, retries, windows.
    pub policy: WorkflowConfig,
    /// Reboot levels that have a command template, in escalation order.
    pub reboot_levels: Vec<Level>,
    /// Shape of each broadcast round's tree.
    pub arity: Arity,
    /// What this run does with its nodes.
    pub profile: Profile,
    /// Each node's rack or switch (`rack:` in the cluster configuration): a round's tree
    /// enters each rack once ([`kd_proto::tree::plan_grouped`]). Empty: the plain plan.
    pub racks: std::collections::BTreeMap<String, String>,
    /// How BootNewEnv's reboot through the agent boots the deployed system.
    pub boot: NewEnvBoot,
    /// The image's sizes, for an `auto` tree's model ([`kd_proto::auto`]); set by the driver.
    pub image: ImageShape,
}

/// What a run of the machine does with its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A deployment: the five steps.
    Deploy,
    /// The broadcast alone (`kd-coord broadcast`): agents started by other means say Hello
    /// (SetDeploymentEnv is only that wait: no PXE profile, no reboot), then Broadcast ends
    /// each node (no Prepare, Finish or BootNewEnv; the plan's job holds the whole disk work,
    /// if any). No retries: an agent takes one plan and nothing here can start another.
    BroadcastOnly,
    /// A remote operation (`kd-coord reboot`, `power on|off`): BootNewEnv's machinery alone,
    /// with `op`'s command templates from level `from` up (escalation, window, command
    /// timeout, `boot_new_env`'s timeout and retries), never through an agent.
    Operate {
        /// The command templates run.
        op: Operation,
        /// Write the local-disk PXE profile first (`reboot -r recorded_env`).
        local_profile: bool,
        /// Then probe the check port until it answers (a reboot); otherwise the node is done
        /// when a command succeeds (power on/off).
        check: bool,
        /// The lowest level tried.
        from: Level,
    },
}

impl Settings {
    /// From a validated cluster configuration, with broadcast trees of `arity`.
    pub fn from_config(cfg: &ClusterConfig, arity: Arity) -> Self {
        Settings {
            policy: cfg.workflow.clone(),
            reboot_levels: cfg.commands.reboot.levels(),
            arity,
            profile: Profile::Deploy,
            racks: cfg
                .nodes
                .iter()
                .filter_map(|n| Some((n.name.clone(), n.rack.clone()?)))
                .collect(),
            boot: cfg.boot,
            image: ImageShape::default(),
        }
    }

    /// A remote operation on a cluster's nodes (see [`Profile::Operate`]); the levels are
    /// `op`'s templates from `from` up.
    pub fn operate(
        cfg: &ClusterConfig,
        op: Operation,
        local_profile: bool,
        check: bool,
        from: Level,
    ) -> Self {
        Settings {
            policy: cfg.workflow.clone(),
            reboot_levels: cfg
                .commands
                .of(op)
                .levels()
                .into_iter()
                .filter(|l| *l >= from)
                .collect(),
            arity: Arity::Chain,
            profile: Profile::Operate {
                op,
                local_profile,
                check,
                from,
            },
            racks: Default::default(),
            boot: NewEnvBoot::Reboot,
            image: ImageShape::default(),
        }
    }

    /// The commands' name in messages.
    fn op_name(&self) -> &'static str {
        self.operating()
            .map_or(Operation::Reboot, |(op, _, _)| op)
            .words()
    }

    fn broadcast_only_profile(&self) -> bool {
        self.profile == Profile::BroadcastOnly
    }

    fn operating(&self) -> Option<(Operation, bool, bool)> {
        match self.profile {
            Profile::Operate {
                op,
                local_profile,
                check,
                ..
            } => Some((op, local_profile, check)),
            _ => None,
        }
    }

    /// The broadcast alone (see [`Profile::BroadcastOnly`]): every agent's Hello within
    /// `hello` (the round starts when all are in, or then), the transfer within `run`.
    pub fn broadcast_only(arity: Arity, hello: Duration, run: Duration) -> Self {
        let secs = |d: Duration| d.as_secs().max(1);
        let policy = WorkflowConfig {
            broadcast_wait: secs(hello),
            set_deployment_env: StepPolicy {
                timeout: secs(hello),
                retries: 0,
            },
            broadcast: StepPolicy {
                timeout: secs(run),
                retries: 0,
            },
            ..WorkflowConfig::default()
        };
        Settings {
            policy,
            reboot_levels: Vec::new(),
            arity,
            profile: Profile::BroadcastOnly,
            racks: Default::default(),
            boot: NewEnvBoot::Reboot,
            image: ImageShape::default(),
        }
    }

    fn policy(&self, step: Step) -> StepPolicy {
        let p = &self.policy;
        match step {
            Step::SetDeploymentEnv => p.set_deployment_env,
            Step::Prepare => p.prepare,
            Step::Broadcast => p.broadcast,
            Step::Finish => p.finish,
            Step::BootNewEnv => p.boot_new_env,
        }
    }

    /// Levels used by a reboot step: the configured ones for SetDeploymentEnv; for
    /// BootNewEnv, soft through the agent, then the configured hard and very_hard.
    fn levels(&self, step: Step) -> Vec<Level> {
        match step {
            Step::BootNewEnv if self.operating().is_some() => self.reboot_levels.clone(),
            Step::BootNewEnv => std::iter::once(Level::Soft)
                .chain(
                    self.reboot_levels
                        .iter()
                        .copied()
                        .filter(|l| *l > Level::Soft),
                )
                .collect(),
            _ => self.reboot_levels.clone(),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// BootNewEnv's reboot through the agent is a kexec.
    fn kexec(&self) -> bool {
        self.boot == NewEnvBoot::Kexec && self.operating().is_none()
    }
}

/// A BootNewEnv reboot asked of the node's agent (not a command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentBoot {
    Reboot,
    Kexec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// WritePxe asked; waiting for PxeWritten.
    WritingPxe,
    /// Waiting for a reboot-window slot.
    QueuedReboot { level: Level, token: u64 },
    /// Reboot command running.
    Rebooting { level: Level, id: CommandId },
    /// BootNewEnv's soft reboot through the agent, held while nodes still receiving read from
    /// this node (no timer: the round's own timeouts bound it).
    HeldReboot,
    /// Broadcast failed on the node itself (`CopyFailed`) or finishing its disk failed, held
    /// while nodes still receiving read from it: it relays until then (no timer: the round's
    /// own timeouts bound it); the reason waits in `Node::held_failure`.
    HeldFailure,
    /// Reboot done; waiting for the Hello (SetDeploymentEnv) or the port (BootNewEnv).
    WaitingBoot,
    /// Agent working on Prepare, Broadcast or Finish.
    Running,
    /// Prepared; waiting for a broadcast round.
    Ready,
    /// Finished (ok or not).
    Done,
}

#[derive(Debug)]
struct Node {
    name: String,
    step: Step,
    phase: Phase,
    attempt: u32,
    step_started: Instant,
    /// Highest reboot level used in the current step.
    level_max: Option<Level>,
    reboots: Vec<Level>,
    /// Deadline of the current phase and its generation.
    deadline: Option<(Instant, u64)>,
    next_probe: Option<(Instant, u64)>,
    ready_since: Option<Instant>,
    barrier_wait: Duration,
    records: Vec<StepRecord>,
    report: Option<NodeReport>,
    /// The node's agent is connected (as far as the machine knows).
    agent: bool,
    /// Failed attempts per step (in [`Step::ALL`] order), against the step's retries.
    failures: [u32; 5],
    /// Attempts started per step, over every time the node entered it.
    starts: [u32; 5],
    /// The node went back to SetDeploymentEnv to retry this step, after this failure.
    redo: Option<(Step, String)>,
    /// The agent's Finish result, when it came before the node entered Finish.
    early_finish: Option<Result<(), String>>,
    /// Why its copy failed, while its failure is held ([`Phase::HeldFailure`]).
    held_failure: Option<String>,
    /// The reboot under way (`Rebooting`, `WaitingBoot`) was asked of the agent, and how.
    agent_boot: Option<AgentBoot>,
    /// A kexec was asked in the current step (its soft reboots are commands from then on).
    kexec_asked: bool,
    /// Rates the node measured for an `auto` tree (kept for later rounds).
    rates: Option<NodeRates>,
}

fn step_index(step: Step) -> usize {
    match step {
        Step::SetDeploymentEnv => 0,
        Step::Prepare => 1,
        Step::Broadcast => 2,
        Step::Finish => 3,
        Step::BootNewEnv => 4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Deadline(usize, u64),
    Probe(usize, u64),
    /// The rate probe before round `.0` is over, answered or not.
    RateProbe(u32),
    Command(CommandId),
    Barrier,
}

#[derive(Debug)]
struct Command {
    node: usize,
    deadline: Instant,
    windowed: bool,
}

/// The running broadcast round: its tree as it is now.
#[derive(Debug)]
struct Round {
    id: u32,
    /// Each member's current parent (`None`: the coordinator).
    parent: HashMap<usize, Option<usize>>,
    /// Members that have not received the whole image yet (and have not left).
    receiving: HashSet<usize>,
    /// Members still serving their children (not failed, lost or rebooted).
    serving: HashSet<usize>,
    /// Members a child said it lost (maybe dead, maybe frozen): they get no new children.
    suspect: HashSet<usize>,
    /// Members that lost their own upstream, until then: their children's silence is theirs
    /// (starved, not dead), so those children stay where they are.
    starving: HashMap<usize, Instant>,
    /// A lost member → the orphan of it that took its place: its other orphans read from the
    /// heir (the tree keeps its shape whichever learns of the loss first, the orphans or the
    /// coordinator).
    heirs: HashMap<usize, usize>,
    /// Most children the plan gives a sender (a repair gives at most one more).
    fan_out: usize,
}

/// The rate probe before an `auto` round.
#[derive(Debug)]
struct Probing {
    /// The round it is for.
    round: u32,
    /// The nodes measured, in order.
    members: Vec<usize>,
    /// Whom each fetches from (index in `members`).
    fetch: Vec<Option<usize>>,
    /// What each fetched (bytes per second) and wrote, once answered.
    link: Vec<Option<u64>>,
    disk: Vec<Option<u64>>,
    answered: Vec<bool>,
    deadline: Instant,
}

/// Bytes each node fetches in the rate probe: a few round trips' worth at 10 Gbit/s, 0.17 s
/// at 100 Mbit/s.
pub const PROBE_BYTES: u32 = 2 << 20;
/// Longest the round waits for the probe's answers.
pub const PROBE_WAIT: Duration = Duration::from_secs(10);

/// How long a node that lost its upstream counts as starving: long enough for its new
/// upstream to feed it again and for its children's stall timers to fire meanwhile.
const STARVING: Duration = Duration::from_secs(60);

/// One deployment's state machine. See the module documentation.
#[derive(Debug)]
pub struct Deployment {
    settings: Settings,
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    started: Instant,
    now: Instant,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    timer_seq: u64,
    gen: u64,
    commands: HashMap<CommandId, Command>,
    next_command: u64,
    in_window: usize,
    queue: VecDeque<(usize, u64)>,
    /// Nodes not done and still in SetDeploymentEnv or Prepare.
    pre_broadcast: usize,
    /// Nodes waiting for a round, in order of readiness (may hold nodes that left since).
    ready: VecDeque<usize>,
    round: Option<Round>,
    /// The rate probe before the next round, while it runs.
    probing: Option<Probing>,
    rounds: u32,
    barrier_deadline: Option<Instant>,
    remaining: usize,
    started_flag: bool,
    finished: bool,
}

impl Deployment {
    /// A deployment of `nodes` (names, as in the configuration; duplicates are ignored).
    /// Nothing happens until [`Deployment::start`].
    pub fn new(nodes: Vec<String>, settings: Settings, now: Instant) -> Self {
        let mut index = HashMap::new();
        let mut list = Vec::new();
        for name in nodes {
            if index.contains_key(&name) {
                continue;
            }
            index.insert(name.clone(), list.len());
            list.push(Node {
                name,
                step: Step::SetDeploymentEnv,
                phase: Phase::WritingPxe,
                attempt: 0,
                step_started: now,
                level_max: None,
                reboots: Vec::new(),
                deadline: None,
                next_probe: None,
                ready_since: None,
                barrier_wait: Duration::ZERO,
                records: Vec::new(),
                report: None,
                agent: false,
                failures: [0; 5],
                starts: [0; 5],
                redo: None,
                early_finish: None,
                held_failure: None,
                agent_boot: None,
                kexec_asked: false,
                rates: None,
            });
        }
        let n = list.len();
        Deployment {
            settings,
            nodes: list,
            index,
            started: now,
            now,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            gen: 0,
            commands: HashMap::new(),
            next_command: 1,
            in_window: 0,
            queue: VecDeque::new(),
            pre_broadcast: n,
            ready: VecDeque::new(),
            round: None,
            probing: None,
            rounds: 0,
            barrier_deadline: None,
            remaining: n,
            started_flag: false,
            finished: false,
        }
    }

    /// Starts every node on SetDeploymentEnv. Calling it again does nothing.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.started_flag {
            return out;
        }
        self.started_flag = true;
        self.started = now;
        self.now = now;
        let first = if self.settings.operating().is_some() {
            // No broadcast in this run.
            self.pre_broadcast = 0;
            Step::BootNewEnv
        } else {
            Step::SetDeploymentEnv
        };
        for i in 0..self.nodes.len() {
            self.begin_step(i, first, &mut out);
        }
        self.after(&mut out);
        out
    }

    /// Feeds one event. Events about unknown nodes, stale commands or steps a node is no longer
    /// in are ignored.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.now = self.now.max(now);
        if !self.started_flag || self.finished {
            return out;
        }
        match event {
            Event::PxeWritten { node, result } => {
                if let Some(i) = self.lookup(&node) {
                    if self.nodes[i].phase == Phase::WritingPxe {
                        match result {
                            Ok(()) => self.first_reboot(i, &mut out),
                            Err(e) => self.fail_attempt(
                                i,
                                format!("writing the PXE profile failed: {e}"),
                                false,
                                &mut out,
                            ),
                        }
                    }
                }
            }
            Event::CommandDone {
                node: _,
                id,
                status,
            } => self.command_done(id, status, &mut out),
            Event::AgentHello { node } => {
                if let Some(i) = self.lookup(&node) {
                    if self.nodes[i].step == Step::SetDeploymentEnv {
                        self.nodes[i].agent = true;
                        self.step_ok(i, &mut out);
                    }
                }
            }
            Event::StepDone { node, step, result } => {
                if let Some(i) = self.lookup(&node) {
                    let n = &mut self.nodes[i];
                    if step == Step::Finish
                        && n.step == Step::Broadcast
                        && n.phase == Phase::Running
                    {
                        // The agent finishes right after its report: keep the result until
                        // the node enters Finish.
                        n.early_finish = Some(result);
                    } else if n.step == step && n.phase == Phase::Running {
                        self.step_result(i, result, &mut out);
                    }
                }
            }
            Event::CopyFailed { node, reason } => {
                if let Some(i) = self.lookup(&node) {
                    let n = &self.nodes[i];
                    if n.step == Step::Broadcast && n.phase == Phase::Running {
                        self.copy_failed(i, reason, &mut out);
                    }
                }
            }
            Event::NodeLost { node, reason } => {
                if let Some(i) = self.lookup(&node) {
                    let (step, phase) = (self.nodes[i].step, self.nodes[i].phase);
                    if phase == Phase::HeldFailure {
                        // Its copy had failed already: that is the reason that counts.
                        let held = self.unhold(i);
                        self.agent_gone(i, &mut out);
                        self.fail_attempt(i, held, false, &mut out);
                        return out;
                    }
                    match (step, phase) {
                        (Step::Prepare | Step::Broadcast | Step::Finish, _) => {
                            self.agent_gone(i, &mut out);
                            self.fail_attempt(
                                i,
                                format!("agent lost during {step}: {reason}"),
                                false,
                                &mut out,
                            );
                        }
                        (Step::BootNewEnv, Phase::HeldReboot) => {
                            // No agent to reboot through any more: the reboot commands do it.
                            self.agent_gone(i, &mut out);
                            self.escalate(
                                i,
                                Level::Soft,
                                format!("agent lost before its reboot: {reason}"),
                                &mut out,
                            );
                        }
                        _ => self.agent_gone(i, &mut out),
                    }
                }
            }
            Event::ParentLost { node, parent } => {
                if let Some(i) = self.lookup(&node) {
                    let lost = parent.as_deref().and_then(|p| self.index.get(p).copied());
                    let current = self.round.as_ref().and_then(|r| {
                        r.receiving
                            .contains(&i)
                            .then(|| r.parent.get(&i).copied().flatten())
                    });
                    // Only about the parent it has now: a late word about an older one is
                    // already mended.
                    if let Some(current) = current {
                        if parent.is_none() || (lost.is_some() && lost == current) {
                            self.parent_lost(i, lost, &mut out);
                        }
                    }
                }
            }
            Event::NodeFailed { node, reason } => {
                if let Some(i) = self.lookup(&node) {
                    self.node_failed(i, reason, &mut out);
                }
            }
            Event::PortOpen { node } => {
                if let Some(i) = self.lookup(&node) {
                    let n = &self.nodes[i];
                    if n.step == Step::BootNewEnv && n.phase == Phase::WaitingBoot {
                        self.step_ok(i, &mut out);
                    }
                }
            }
            Event::RatesMeasured { node, link, disk } => {
                if let (Some(i), Some(p)) = (self.lookup(&node), self.probing.as_mut()) {
                    if let Some(k) = p.members.iter().position(|&m| m == i) {
                        p.link[k] = link;
                        p.disk[k] = disk;
                        p.answered[k] = true;
                    }
                    let all = p
                        .members
                        .iter()
                        .zip(&p.answered)
                        .all(|(&m, &a)| a || self.nodes[m].phase != Phase::Ready);
                    if all {
                        self.probe_done(&mut out);
                    }
                }
            }
            Event::PortClosed { .. } => {}
            Event::Abort { reason } => {
                // Everyone stops: no tree to mend.
                self.round = None;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].phase == Phase::Done {
                        continue;
                    }
                    if self.nodes[i].phase == Phase::Running {
                        let step = self.nodes[i].step;
                        out.push(Action::CancelStep {
                            node: self.nodes[i].name.clone(),
                            step,
                            reason: format!("aborted: {reason}"),
                        });
                    }
                    self.node_failed(i, format!("aborted: {reason}"), &mut out);
                }
                let mut ids: Vec<CommandId> = self.commands.keys().copied().collect();
                ids.sort();
                for id in ids {
                    if let Some(c) = self.commands.remove(&id) {
                        out.push(Action::KillCommand {
                            node: self.nodes[c.node].name.clone(),
                            id,
                        });
                    }
                }
                self.in_window = 0;
                self.round = None;
            }
        }
        self.after(&mut out);
        out
    }

    /// When [`Deployment::handle_timeout`] should be called next (`None`: nothing scheduled).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        self.timers.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Processes every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.now = self.now.max(now);
        if !self.started_flag {
            return out;
        }
        while let Some(Reverse((t, _, timer))) = self.timers.peek().copied() {
            if t > self.now || self.finished {
                break;
            }
            self.timers.pop();
            self.fire(t, timer, &mut out);
        }
        self.after(&mut out);
        out
    }

    /// Whether every node is done (`Finished` was returned).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The nodes of this deployment, in order.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.name.as_str())
    }

    /// Where a node is: its step and whether it is done. `None` for an unknown node.
    pub fn node_step(&self, node: &str) -> Option<(Step, bool)> {
        self.index
            .get(node)
            .map(|&i| (self.nodes[i].step, self.nodes[i].phase == Phase::Done))
    }

    /// How many nodes are in each step (not done), and how many are done ok / ko.
    pub fn progress(&self) -> Progress {
        let mut p = Progress::default();
        for n in &self.nodes {
            match (&n.phase, &n.report) {
                (Phase::Done, Some(r)) if r.is_ok() => p.ok += 1,
                (Phase::Done, _) => p.ko += 1,
                _ => p.in_step[Step::ALL.iter().position(|s| *s == n.step).unwrap_or(0)] += 1,
            }
        }
        p
    }

    /// The latest time the deployment can end, counted from its start, whatever the nodes do
    /// (assuming the driver answers every action it must answer).
    pub fn time_bound(settings: &Settings, nodes: usize) -> Duration {
        // Saturating: settings that were not validated (see `kd_proto::bounds`) give a huge
        // bound, not a panic.
        let p = &settings.policy;
        let c = Settings::secs(p.command_timeout);
        // A retry of Prepare, Broadcast or Finish may start the node over from its deploy
        // boot: each is one more pass through the steps before BootNewEnv. A step's failed
        // attempts are counted over every pass, so each step runs at most its attempts plus
        // one per extra pass.
        let passes = 1u32
            .saturating_add(p.prepare.retries)
            .saturating_add(p.broadcast.retries)
            .saturating_add(p.finish.retries);
        let attempts = |s: StepPolicy| s.retries.saturating_add(passes);
        let set_levels = settings.levels(Step::SetDeploymentEnv).len() as u32;
        let boot_levels = settings.levels(Step::BootNewEnv).len() as u32;
        let set = c
            .saturating_mul(1 + set_levels)
            .saturating_add(p.set_deployment_env.timeout())
            .saturating_mul(attempts(p.set_deployment_env));
        let prepare = p.prepare.timeout().saturating_mul(attempts(p.prepare));
        let bcast = Settings::secs(p.broadcast_wait)
            .saturating_add(p.broadcast.timeout().saturating_mul(2))
            .saturating_mul(attempts(p.broadcast));
        let finish = p.finish.timeout().saturating_mul(attempts(p.finish));
        let once = |s: StepPolicy| s.retries.saturating_add(1);
        // A kexec that does not bring the node up: one more wait and a soft command, once.
        let kexec = if settings.kexec() {
            c.saturating_mul(2).saturating_add(p.boot_new_env.timeout())
        } else {
            Duration::ZERO
        };
        let boot = c
            .saturating_mul(1 + boot_levels)
            .saturating_add(p.boot_new_env.timeout())
            .saturating_mul(once(p.boot_new_env))
            .saturating_add(kexec)
            // A soft reboot held while the last round runs.
            .saturating_add(p.broadcast.timeout());
        let commands = (nodes as u64).saturating_mul(u64::from(
            set_levels
                .saturating_mul(attempts(p.set_deployment_env))
                .saturating_add(boot_levels.saturating_mul(once(p.boot_new_env)))
                .saturating_add(u32::from(settings.kexec())),
        ));
        let windows = commands.div_ceil(p.reboot_window.max(1) as u64);
        let queue = c.saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX));
        [
            set,
            prepare,
            bcast,
            finish,
            boot,
            queue,
            Duration::from_secs(1),
        ]
        .into_iter()
        .fold(Duration::ZERO, Duration::saturating_add)
    }

    // ---------------------------------------------------------------- internals

    /// The step after `step` in this deployment's profile.
    fn next_step(&self, step: Step) -> Option<Step> {
        match (self.settings.profile, step) {
            (Profile::BroadcastOnly, Step::SetDeploymentEnv) => Some(Step::Broadcast),
            (Profile::BroadcastOnly | Profile::Operate { .. }, _) => None,
            (Profile::Deploy, s) => s.next(),
        }
    }

    fn lookup(&self, node: &str) -> Option<usize> {
        let i = *self.index.get(node)?;
        (self.nodes[i].phase != Phase::Done).then_some(i)
    }

    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq, timer)));
    }

    fn set_deadline(&mut self, i: usize, after: Duration) {
        self.gen += 1;
        let at = later(self.now, after);
        self.nodes[i].deadline = Some((at, self.gen));
        self.schedule(at, Timer::Deadline(i, self.gen));
    }

    fn set_probe(&mut self, i: usize, after: Duration) {
        self.gen += 1;
        let at = later(self.now, after);
        self.nodes[i].next_probe = Some((at, self.gen));
        self.schedule(at, Timer::Probe(i, self.gen));
    }

    fn new_command(&mut self, i: usize, windowed: bool) -> CommandId {
        let id = CommandId(self.next_command);
        self.next_command += 1;
        let deadline = later(
            self.now,
            Settings::secs(self.settings.policy.command_timeout),
        );
        self.commands.insert(
            id,
            Command {
                node: i,
                deadline,
                windowed,
            },
        );
        if windowed {
            self.in_window += 1;
        }
        self.schedule(deadline, Timer::Command(id));
        id
    }

    /// Runs after every entry point: window, barrier, stale timers, end.
    fn after(&mut self, out: &mut Vec<Action>) {
        self.pump_window(out);
        self.maybe_start_round(out);
        if self.remaining == 0 && !self.finished {
            self.finished = true;
            out.push(Action::Finished {
                summary: self.summary(),
            });
        }
        // Drop stale timers from the top so that poll_timeout is exact.
        while let Some(Reverse((t, _, timer))) = self.timers.peek().copied() {
            if self.timer_valid(t, timer) {
                break;
            }
            self.timers.pop();
        }
    }

    fn timer_valid(&self, t: Instant, timer: Timer) -> bool {
        match timer {
            Timer::Deadline(i, g) => self.nodes[i].deadline == Some((t, g)),
            Timer::Probe(i, g) => self.nodes[i].next_probe == Some((t, g)),
            Timer::Command(id) => self.commands.get(&id).is_some_and(|c| c.deadline == t),
            Timer::Barrier => self.round.is_none() && self.barrier_deadline == Some(t),
            Timer::RateProbe(r) => self
                .probing
                .as_ref()
                .is_some_and(|p| p.round == r && p.deadline == t),
        }
    }

    fn fire(&mut self, t: Instant, timer: Timer, out: &mut Vec<Action>) {
        if !self.timer_valid(t, timer) {
            return;
        }
        match timer {
            Timer::Deadline(i, _) => {
                self.nodes[i].deadline = None;
                self.deadline_passed(i, out);
            }
            Timer::Probe(i, _) => {
                self.nodes[i].next_probe = None;
                let n = &self.nodes[i];
                if n.step == Step::BootNewEnv && n.phase == Phase::WaitingBoot {
                    out.push(Action::ProbePort {
                        node: n.name.clone(),
                    });
                    self.set_probe(i, Settings::secs(self.settings.policy.probe_interval));
                }
            }
            Timer::Command(id) => {
                if let Some(c) = self.commands.remove(&id) {
                    if c.windowed {
                        self.in_window -= 1;
                    }
                    out.push(Action::KillCommand {
                        node: self.nodes[c.node].name.clone(),
                        id,
                    });
                    if let Phase::Rebooting { level, id: cur } = self.nodes[c.node].phase {
                        if cur == id && self.nodes[c.node].agent_boot == Some(AgentBoot::Kexec) {
                            let secs = self.settings.policy.command_timeout;
                            self.after_kexec(
                                c.node,
                                format!("the kexec through the agent did not end in {secs} s"),
                                out,
                            );
                        } else if cur == id {
                            let secs = self.settings.policy.command_timeout;
                            self.escalate(
                                c.node,
                                level,
                                format!(
                                    "{level} {} command timed out after {secs} s",
                                    self.settings.op_name()
                                ),
                                out,
                            );
                        }
                    }
                }
            }
            Timer::Barrier => {
                self.barrier_deadline = None;
                self.start_round(out);
            }
            Timer::RateProbe(_) => self.probe_done(out),
        }
    }

    fn deadline_passed(&mut self, i: usize, out: &mut Vec<Action>) {
        let n = &self.nodes[i];
        let step = n.step;
        let secs = self.settings.policy(step).timeout;
        let last = n.reboots.last().copied().unwrap_or(Level::Soft);
        let reason = match (n.phase, step) {
            (Phase::WritingPxe, _) => "the PXE profile was not written in time".to_string(),
            (Phase::WaitingBoot, Step::SetDeploymentEnv)
                if self.settings.broadcast_only_profile() =>
            {
                format!("never connected (no Hello within {secs} s)")
            }
            (Phase::WaitingBoot, Step::SetDeploymentEnv) => {
                format!("no agent Hello within {secs} s after a {last} reboot")
            }
            (Phase::WaitingBoot, Step::BootNewEnv) if n.agent_boot == Some(AgentBoot::Kexec) => {
                // The kexec did not bring the system up (hung, or the agent's own fallback
                // reboot did not either): the reboot commands, in this attempt.
                let reason =
                    format!("the deployed system did not answer within {secs} s after a kexec");
                self.after_kexec(i, reason, out);
                return;
            }
            (Phase::WaitingBoot, _) if self.settings.operating().is_some() => {
                format!("the node did not answer within {secs} s after a {last} reboot")
            }
            (Phase::WaitingBoot, _) => {
                format!("the deployed system did not answer within {secs} s after a {last} reboot")
            }
            (Phase::Running, _) => format!("no {step} report within {secs} s"),
            _ => return,
        };
        let cancel = n.phase == Phase::Running;
        self.fail_attempt(i, reason, cancel, out);
    }

    fn begin_step(&mut self, i: usize, step: Step, out: &mut Vec<Action>) {
        let now = self.now;
        let n = &mut self.nodes[i];
        n.step = step;
        n.attempt = n.failures[step_index(step)];
        if n.redo.as_ref().is_some_and(|(s, _)| *s == step) {
            n.redo = None;
        }
        n.step_started = now;
        n.level_max = None;
        n.reboots.clear();
        n.kexec_asked = false;
        self.begin_attempt(i, out);
    }

    fn begin_attempt(&mut self, i: usize, out: &mut Vec<Action>) {
        let n = &mut self.nodes[i];
        n.deadline = None;
        n.next_probe = None;
        n.agent_boot = None;
        let step = n.step;
        n.starts[step_index(step)] += 1;
        let node = n.name.clone();
        out.push(Action::StepStarted {
            node: node.clone(),
            step,
            attempt: n.attempt,
        });
        let timeout = self.settings.policy(step).timeout();
        match step {
            Step::SetDeploymentEnv if self.settings.broadcast_only_profile() => {
                // Agents are started by other means: wait for the Hello.
                self.nodes[i].phase = Phase::WaitingBoot;
                self.set_deadline(i, timeout);
            }
            Step::BootNewEnv
                if self
                    .settings
                    .operating()
                    .is_some_and(|(_, local, _)| !local) =>
            {
                // Reboot or power with the PXE profile as it is.
                self.first_reboot(i, out);
            }
            Step::SetDeploymentEnv | Step::BootNewEnv => {
                self.nodes[i].phase = Phase::WritingPxe;
                let profile = if step == Step::SetDeploymentEnv {
                    // A new deploy profile means a new boot: the agent it had (if any) goes.
                    self.agent_gone(i, out);
                    PxeKind::Deploy
                } else {
                    PxeKind::LocalDisk
                };
                out.push(Action::WritePxe { node, profile });
                self.set_deadline(i, Settings::secs(self.settings.policy.command_timeout));
            }
            Step::Prepare => {
                self.nodes[i].phase = Phase::Running;
                out.push(Action::SendPrepare { node });
                self.set_deadline(i, timeout);
            }
            Step::Finish => {
                // The agent finishes by itself after its report; its result may be in already.
                self.nodes[i].phase = Phase::Running;
                self.set_deadline(i, timeout);
                if let Some(result) = self.nodes[i].early_finish.take() {
                    self.step_result(i, result, out);
                }
            }
            Step::Broadcast => {
                let n = &mut self.nodes[i];
                n.phase = Phase::Ready;
                n.ready_since = Some(self.now);
                self.ready.push_back(i);
            }
        }
    }

    /// First reboot of an attempt: the lowest level on the first attempt, then one above the
    /// highest level used so far (capped at the highest).
    fn first_reboot(&mut self, i: usize, out: &mut Vec<Action>) {
        let n = &self.nodes[i];
        let levels = self.settings.levels(n.step);
        let level = match n.level_max {
            None => levels.first().copied(),
            Some(max) => levels
                .iter()
                .copied()
                .find(|l| *l > max)
                .or(levels.last().copied()),
        };
        match level {
            Some(l) => self.issue_reboot(i, l, out),
            None => self.node_failed(i, "no reboot command configured".into(), out),
        }
    }

    fn issue_reboot(&mut self, i: usize, level: Level, out: &mut Vec<Action>) {
        let n = &mut self.nodes[i];
        n.deadline = None;
        n.level_max = Some(n.level_max.map_or(level, |m| m.max(level)));
        n.reboots.push(level);
        n.agent_boot = None;
        let step = n.step;
        let operating = self.settings.operating().is_some();
        // After a kexec, a soft reboot is the soft command.
        let via_agent = !n.kexec_asked;
        if step == Step::BootNewEnv && level == Level::Soft && !operating && via_agent {
            let held = self
                .round
                .as_ref()
                .is_some_and(|r| r.serving.contains(&i) && relays(r).contains(&i));
            if held {
                // Nodes still receiving read from it: it reboots when none does.
                self.nodes[i].phase = Phase::HeldReboot;
            } else {
                self.reboot_through_agent(i, out);
            }
        } else {
            if step == Step::BootNewEnv {
                // A hard reboot ends whatever the node still served.
                self.agent_gone(i, out);
            }
            self.gen += 1;
            let token = self.gen;
            self.nodes[i].phase = Phase::QueuedReboot { level, token };
            self.queue.push_back((i, token));
        }
    }

    fn pump_window(&mut self, out: &mut Vec<Action>) {
        while self.in_window < self.settings.policy.reboot_window.max(1) {
            let Some((i, token)) = self.queue.pop_front() else {
                break;
            };
            let Phase::QueuedReboot { level, token: t } = self.nodes[i].phase else {
                continue;
            };
            if t != token {
                continue;
            }
            let id = self.new_command(i, true);
            self.nodes[i].phase = Phase::Rebooting { level, id };
            out.push(Action::RunCommand {
                node: self.nodes[i].name.clone(),
                id,
                op: self
                    .settings
                    .operating()
                    .map_or(Operation::Reboot, |(op, _, _)| op),
                level,
            });
        }
    }

    fn command_done(&mut self, id: CommandId, status: CommandStatus, out: &mut Vec<Action>) {
        let Some(c) = self.commands.remove(&id) else {
            return;
        };
        if c.windowed {
            self.in_window -= 1;
        }
        let i = c.node;
        let Phase::Rebooting { level, id: cur } = self.nodes[i].phase else {
            return;
        };
        if cur != id {
            return;
        }
        match status.failure() {
            None if self
                .settings
                .operating()
                .is_some_and(|(_, _, check)| !check) =>
            {
                // Power on/off: the command's success is the end.
                self.step_ok(i, out);
            }
            None => {
                self.nodes[i].phase = Phase::WaitingBoot;
                let step = self.nodes[i].step;
                self.set_deadline(i, self.settings.policy(step).timeout());
                if step == Step::BootNewEnv {
                    self.set_probe(i, Settings::secs(self.settings.policy.probe_delay));
                }
            }
            Some(why) => {
                let what = match self.nodes[i].agent_boot {
                    Some(AgentBoot::Kexec) => {
                        let reason = format!("kexec through the agent failed: {why}");
                        self.after_kexec(i, reason, out);
                        return;
                    }
                    Some(AgentBoot::Reboot) => "reboot through the agent".to_string(),
                    None => format!("{level} {} command", self.settings.op_name()),
                };
                self.escalate(i, level, format!("{what} failed: {why}"), out);
            }
        }
    }

    /// The kexec asked of the node's agent did not bring it up: the reboot commands from soft
    /// (the agent path is not taken again in this step), or the attempt fails when there are
    /// none.
    fn after_kexec(&mut self, i: usize, reason: String, out: &mut Vec<Action>) {
        self.nodes[i].agent_boot = None;
        match self.settings.reboot_levels.first().copied() {
            Some(first) => self.issue_reboot(i, first, out),
            None => self.fail_attempt(i, reason, false, out),
        }
    }

    /// A reboot at `from` failed: next configured level, or the attempt fails.
    fn escalate(&mut self, i: usize, from: Level, reason: String, out: &mut Vec<Action>) {
        let levels = self.settings.levels(self.nodes[i].step);
        match levels.into_iter().find(|l| *l > from) {
            Some(next) => self.issue_reboot(i, next, out),
            None => self.fail_attempt(i, reason, false, out),
        }
    }

    fn fail_attempt(&mut self, i: usize, reason: String, cancel: bool, out: &mut Vec<Action>) {
        let step = self.nodes[i].step;
        if cancel {
            out.push(Action::CancelStep {
                node: self.nodes[i].name.clone(),
                step,
                reason: reason.clone(),
            });
            if matches!(
                step,
                Step::SetDeploymentEnv | Step::Prepare | Step::Broadcast | Step::Finish
            ) {
                // The driver drops the agent's work, and the agent with it.
                self.agent_gone(i, out);
            }
        }
        let retries = self.settings.policy(step).retries;
        let n = &mut self.nodes[i];
        let f = &mut n.failures[step_index(step)];
        *f = f.saturating_add(1);
        if *f > retries {
            self.node_failed(i, reason, out);
            return;
        }
        // An agent takes one plan and finishes a disk once; without an agent, nothing is
        // prepared: those retries start the node over from a fresh deploy boot.
        if self.settings.broadcast_only_profile() {
            self.node_failed(i, reason, out);
            return;
        }
        let over = match step {
            Step::Broadcast | Step::Finish => true,
            Step::Prepare => !n.agent,
            Step::SetDeploymentEnv | Step::BootNewEnv => false,
        };
        if over {
            self.record(i, false);
            self.nodes[i].redo = Some((step, reason));
            if matches!(step, Step::Broadcast | Step::Finish) {
                self.pre_broadcast += 1;
            }
            self.nodes[i].early_finish = None;
            self.begin_step(i, Step::SetDeploymentEnv, out);
        } else {
            let n = &mut self.nodes[i];
            n.attempt = n.failures[step_index(step)];
            self.begin_attempt(i, out);
        }
    }

    /// Records the end of the node's current step (merged with an earlier record of the same
    /// step when the node went through it before).
    fn record(&mut self, i: usize, ok: bool) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let duration = now.saturating_duration_since(n.step_started);
        let reboots = std::mem::take(&mut n.reboots);
        let attempts = n.starts[step_index(n.step)].max(1);
        match n.records.iter_mut().find(|r| r.step == n.step) {
            Some(r) => {
                r.attempts = attempts;
                r.duration = r.duration.saturating_add(duration);
                r.ok = ok;
                r.reboots.extend(reboots);
                r.kexec |= n.kexec_asked;
            }
            None => n.records.push(StepRecord {
                step: n.step,
                attempts,
                duration,
                ok,
                reboots,
                kexec: n.kexec_asked,
            }),
        }
    }

    /// The agent reported the end of the node's current (running) step.
    fn step_result(&mut self, i: usize, result: Result<(), String>, out: &mut Vec<Action>) {
        match result {
            Ok(()) => {
                if self.nodes[i].step == Step::Broadcast {
                    self.round_received(i, out);
                }
                self.step_ok(i, out);
            }
            // Finishing the disk runs while the node still relays.
            Err(e) if self.nodes[i].step == Step::Finish => self.fail_when_unneeded(i, e, out),
            Err(e) => self.fail_attempt(i, e, false, out),
        }
    }

    fn step_ok(&mut self, i: usize, out: &mut Vec<Action>) {
        self.record(i, true);
        let step = self.nodes[i].step;
        let next = self.next_step(step);
        if next == Some(Step::Broadcast) {
            self.pre_broadcast -= 1;
        }
        match next {
            Some(next) => self.begin_step(i, next, out),
            None => self.finish_node(i, NodeResult::Deployed, out),
        }
    }

    fn node_failed(&mut self, i: usize, reason: String, out: &mut Vec<Action>) {
        self.record(i, false);
        let step = self.nodes[i].step;
        if matches!(step, Step::SetDeploymentEnv | Step::Prepare) {
            self.pre_broadcast -= 1;
        }
        let reason = match self.nodes[i].redo.take() {
            Some((s, cause)) => format!("{reason} (retrying {s} after: {cause})"),
            None => reason,
        };
        // Its agent is dropped (and stops serving).
        self.agent_gone(i, out);
        self.finish_node(i, NodeResult::Failed { step, reason }, out);
    }

    fn finish_node(&mut self, i: usize, result: NodeResult, out: &mut Vec<Action>) {
        let total = self.now.saturating_duration_since(self.started);
        let n = &mut self.nodes[i];
        n.phase = Phase::Done;
        n.deadline = None;
        n.next_probe = None;
        let report = NodeReport {
            node: n.name.clone(),
            result,
            steps: n.records.clone(),
            barrier_wait: n.barrier_wait,
            total,
        };
        n.report = Some(report.clone());
        self.remaining -= 1;
        out.push(Action::NodeDone {
            node: n.name.clone(),
            report,
        });
    }

    /// The node's agent is gone, or about to be (dropped, rebooted): it serves no one now.
    fn agent_gone(&mut self, i: usize, out: &mut Vec<Action>) {
        self.nodes[i].agent = false;
        self.round_gone(i, out);
    }

    /// Soft reboot of a BootNewEnv node through its agent (a kexec with `boot: kexec`).
    fn reboot_through_agent(&mut self, i: usize, out: &mut Vec<Action>) {
        let id = self.new_command(i, false);
        let kexec = self.settings.kexec();
        let n = &mut self.nodes[i];
        n.phase = Phase::Rebooting {
            level: Level::Soft,
            id,
        };
        n.agent_boot = Some(if kexec {
            AgentBoot::Kexec
        } else {
            AgentBoot::Reboot
        });
        n.kexec_asked |= kexec;
        out.push(Action::RebootAgent {
            node: self.nodes[i].name.clone(),
            id,
            kexec,
        });
        self.agent_gone(i, out);
    }

    /// A member of the round has the whole image (it still serves its children).
    fn round_received(&mut self, i: usize, out: &mut Vec<Action>) {
        if let Some(r) = &mut self.round {
            r.receiving.remove(&i);
        }
        self.round_changed(out);
    }

    /// `CopyFailed`: the node receives nothing more, and fails once no one needs it as a relay.
    fn copy_failed(&mut self, i: usize, reason: String, out: &mut Vec<Action>) {
        if let Some(r) = &mut self.round {
            r.receiving.remove(&i);
        }
        self.fail_when_unneeded(i, reason, out);
    }

    /// The node's attempt failed (its own copy, or finishing its disk) while it may still relay:
    /// while nodes still receiving read from it, its failure waits ([`Phase::HeldFailure`],
    /// released by [`Self::round_changed`]); otherwise it counts at once.
    fn fail_when_unneeded(&mut self, i: usize, reason: String, out: &mut Vec<Action>) {
        let needed = self
            .round
            .as_ref()
            .is_some_and(|r| r.serving.contains(&i) && relays(r).contains(&i));
        if needed {
            let n = &mut self.nodes[i];
            n.phase = Phase::HeldFailure;
            n.deadline = None;
            n.held_failure = Some(reason);
            // Releasing the held nodes others no longer need.
            self.round_changed(out);
        } else {
            self.fail_attempt(i, reason, false, out);
        }
    }

    /// Ends a held failure ([`Phase::HeldFailure`]): the node is running its step again, and
    /// the failure's reason is returned for it to count.
    fn unhold(&mut self, i: usize) -> String {
        let n = &mut self.nodes[i];
        n.phase = Phase::Running;
        n.held_failure.take().unwrap_or_default()
    }

    /// A member of the round stops serving: each of its children still receiving reads from
    /// the nearest ancestor still serving.
    fn round_gone(&mut self, i: usize, out: &mut Vec<Action>) {
        let Some(r) = &mut self.round else {
            return;
        };
        if !r.serving.remove(&i) {
            return;
        }
        r.receiving.remove(&i);
        let mut orphans: Vec<usize> = r
            .receiving
            .iter()
            .copied()
            .filter(|c| r.parent.get(c) == Some(&Some(i)))
            .collect();
        orphans.sort_unstable();
        // The first orphan takes the gone node's place (unless one that reported the loss
        // already did); the others read from it while it has room (a chain stays a chain, a
        // k-ary tree keeps its fan-out).
        let mut heir = r.heirs.get(&i).copied();
        for o in orphans {
            self.reattach_preferring(o, Some(i), heir, out);
            if heir.is_none() {
                heir = Some(o);
                if let Some(r) = &mut self.round {
                    r.heirs.insert(i, o);
                }
            }
        }
        self.round_changed(out);
    }

    /// `node`'s agent says it lost its parent `lost` (`None`: the coordinator's stream).
    /// A parent that is itself starving (it lost its own upstream a moment ago) is not dead:
    /// the node reconnects to it and the tree keeps its shape. Otherwise the parent is suspect
    /// (it gets no new children) and the node moves.
    fn parent_lost(&mut self, node: usize, lost: Option<usize>, out: &mut Vec<Action>) {
        let now = self.now;
        let Some(r) = &mut self.round else {
            return;
        };
        r.starving.insert(node, later(now, STARVING));
        if let Some(p) = lost {
            let starved = r.starving.get(&p).is_some_and(|until| *until > now)
                && r.serving.contains(&p)
                && !r.suspect.contains(&p);
            if starved {
                out.push(Action::Reparent {
                    round: r.id,
                    node: self.nodes[node].name.clone(),
                    parent: Some(self.nodes[p].name.clone()),
                });
                return;
            }
            r.suspect.insert(p);
        }
        let heir = lost.and_then(|p| r.heirs.get(&p).copied());
        self.reattach_preferring(node, lost, heir, out);
        if let (Some(p), None, Some(r)) = (lost, heir, self.round.as_mut()) {
            r.heirs.insert(p, node);
        }
    }

    /// `node` lost its parent `lost`: it reads from `prefer` if that has room, else from the
    /// nearest ancestor of `lost` still serving that has room, else from the first node with
    /// room under that ancestor (nearest first), else from the coordinator. Room: fewer
    /// children than the round's fan-out + 1, so that no parent is ever much busier than the
    /// plan made it. Never from `node` itself or below it.
    fn reattach_preferring(
        &mut self,
        node: usize,
        lost: Option<usize>,
        prefer: Option<usize>,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = &self.round else {
            return;
        };
        let cap = r.fan_out.saturating_add(1);
        let usable = |c: usize| {
            r.serving.contains(&c)
                && !r.suspect.contains(&c)
                && Some(c) != lost
                && c != node
                && !is_below(r, c, node)
        };
        let room = |c: usize| children_of(r, c).len() < cap;
        // The ancestors of `lost` still serving, nearest first.
        let mut ancestors = Vec::new();
        let mut cur = lost.and_then(|l| r.parent.get(&l).copied().flatten());
        let mut hops = 0;
        while let Some(c) = cur {
            hops += 1;
            if hops > r.parent.len() {
                break;
            }
            if usable(c) {
                ancestors.push(c);
            }
            cur = r.parent.get(&c).copied().flatten();
        }
        let np = prefer
            .filter(|&p| usable(p) && room(p))
            .or_else(|| ancestors.iter().copied().find(|&a| room(a)))
            .or_else(|| {
                // `lost` was a root (or every node above it is gone): take its place.
                if ancestors.is_empty() {
                    return None;
                }
                // Breadth first under the nearest ancestor.
                let mut queue: VecDeque<usize> = children_of(r, ancestors[0]).into();
                let mut seen = 0;
                while let Some(c) = queue.pop_front() {
                    seen += 1;
                    if seen > r.parent.len() {
                        break;
                    }
                    if usable(c) && room(c) {
                        return Some(c);
                    }
                    if c != node {
                        queue.extend(children_of(r, c));
                    }
                }
                None
            });
        let Some(r) = &mut self.round else {
            return;
        };
        r.parent.insert(node, np);
        out.push(Action::Reparent {
            round: r.id,
            node: self.nodes[node].name.clone(),
            parent: np.map(|p| self.nodes[p].name.clone()),
        });
    }

    /// After the round changed: held reboots no receiving node needs go out; the round ends
    /// when no member receives any more.
    fn round_changed(&mut self, out: &mut Vec<Action>) {
        let Some(r) = &self.round else {
            return;
        };
        let mut held: Vec<usize> = r
            .serving
            .iter()
            .copied()
            .filter(|&m| matches!(self.nodes[m].phase, Phase::HeldReboot | Phase::HeldFailure))
            .collect();
        held.sort_unstable();
        if !held.is_empty() {
            let needed = relays(r);
            for h in held {
                // (Releasing one changes no other's need: it relays for no one receiving.)
                if needed.contains(&h) {
                    continue;
                }
                match self.nodes[h].phase {
                    Phase::HeldReboot => self.reboot_through_agent(h, out),
                    Phase::HeldFailure => {
                        let reason = self.unhold(h);
                        self.step_result(h, Err(reason), out);
                    }
                    _ => {}
                }
            }
        }
        if self.round.as_ref().is_some_and(|r| r.receiving.is_empty()) {
            self.round = None;
        }
    }

    fn maybe_start_round(&mut self, out: &mut Vec<Action>) {
        if self.round.is_some() || self.probing.is_some() {
            return;
        }
        // The oldest node still ready (entries are in order of readiness).
        while self
            .ready
            .front()
            .is_some_and(|&i| self.nodes[i].phase != Phase::Ready)
        {
            self.ready.pop_front();
        }
        let Some(&oldest) = self.ready.front() else {
            self.barrier_deadline = None;
            return;
        };
        let first = self.nodes[oldest].ready_since.unwrap_or(self.now);
        let at = later(first, Settings::secs(self.settings.policy.broadcast_wait));
        if self.pre_broadcast == 0 || at <= self.now {
            self.start_round(out);
        } else if self.barrier_deadline != Some(at) {
            self.barrier_deadline = Some(at);
            self.schedule(at, Timer::Barrier);
        }
    }

    /// Each member's rack as a small number (racks numbered in order of first appearance;
    /// nodes without one share a group); empty when no node has a rack.
    fn groups_of(&self, members: &[usize]) -> Vec<usize> {
        if self.settings.racks.is_empty() {
            return Vec::new();
        }
        let mut ids: HashMap<&str, usize> = HashMap::new();
        members
            .iter()
            .map(|&i| {
                let rack = self
                    .settings
                    .racks
                    .get(&self.nodes[i].name)
                    .map_or("", String::as_str);
                let next = ids.len();
                *ids.entry(rack).or_insert(next)
            })
            .collect()
    }

    fn start_round(&mut self, out: &mut Vec<Action>) {
        if self.round.is_some() || self.probing.is_some() {
            return;
        }
        let mut members: Vec<usize> = std::mem::take(&mut self.ready)
            .into_iter()
            .filter(|&i| self.nodes[i].phase == Phase::Ready)
            .collect();
        if members.is_empty() {
            return;
        }
        members.sort_unstable();
        members.dedup();
        self.barrier_deadline = None;
        // An `auto` tree needs every member's rates: the nodes not measured yet (in an earlier
        // round of this deployment) measure them first.
        if self.settings.arity == Arity::Auto
            && members.len() > 1
            && members.iter().any(|&i| self.nodes[i].rates.is_none())
        {
            let groups = self.groups_of(&members);
            let groups = if groups.is_empty() {
                vec![0; members.len()]
            } else {
                groups
            };
            let fetch = kd_proto::auto::ring(&groups);
            let n = members.len();
            let deadline = later(self.now, PROBE_WAIT);
            let round = self.rounds + 1;
            out.push(Action::ProbeRates {
                round,
                nodes: members
                    .iter()
                    .map(|&i| self.nodes[i].name.clone())
                    .collect(),
                fetch: fetch.clone(),
                bytes: PROBE_BYTES,
            });
            self.probing = Some(Probing {
                round,
                members,
                fetch,
                link: vec![None; n],
                disk: vec![None; n],
                answered: vec![false; n],
                deadline,
            });
            self.schedule(deadline, Timer::RateProbe(round));
            return;
        }
        self.launch_round(members, out);
    }

    /// The rate probe is over (every node answered, or its time is up): the nodes keep their
    /// rates and the round starts with those still ready.
    fn probe_done(&mut self, out: &mut Vec<Action>) {
        let Some(p) = self.probing.take() else {
            return;
        };
        let links = kd_proto::auto::node_links(&p.fetch, &p.link);
        for (k, &i) in p.members.iter().enumerate() {
            self.nodes[i].rates = Some(NodeRates {
                link: links.get(k).copied().flatten(),
                disk: p.disk.get(k).copied().flatten(),
                answered: p.answered.get(k).copied().unwrap_or(false),
            });
        }
        let mut members: Vec<usize> = p
            .members
            .into_iter()
            .filter(|&i| self.nodes[i].phase == Phase::Ready)
            .collect();
        // Nodes that became ready meanwhile join (unmeasured: taken as typical).
        while let Some(i) = self.ready.pop_front() {
            if self.nodes[i].phase == Phase::Ready {
                members.push(i);
            }
        }
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            self.maybe_start_round(out);
            return;
        }
        self.launch_round(members, out);
    }

    fn launch_round(&mut self, members: Vec<usize>, out: &mut Vec<Action>) {
        self.rounds += 1;
        let groups = self.groups_of(&members);
        let (tree, fan_out, pace_groups, shape) = if self.settings.arity == Arity::Auto {
            let rates: Vec<NodeRates> = members
                .iter()
                .map(|&i| self.nodes[i].rates.unwrap_or_default())
                .collect();
            let plan = kd_proto::auto::plan_auto(&rates, &groups, self.settings.image);
            let mut pace = vec![0u64; members.len()];
            for (c, class) in plan.classes.iter().enumerate() {
                for &k in &class.nodes {
                    if let Some(g) = pace.get_mut(k) {
                        *g = c as u64;
                    }
                }
            }
            let shape = format!("auto: {}", plan.describe());
            let fan_out = plan.fan_out();
            (plan.tree, fan_out, pace, shape)
        } else {
            let tree = if groups.is_empty() {
                kd_proto::tree::plan(members.len(), self.settings.arity)
            } else {
                kd_proto::tree::plan_grouped(&groups, self.settings.arity)
            };
            let fan_out = self.settings.arity.fan_out(members.len());
            (
                tree,
                fan_out,
                vec![0; members.len()],
                self.settings.arity.to_string(),
            )
        };
        let parents: Vec<Option<usize>> = (0..members.len()).map(|k| tree.parent(k)).collect();
        let timeout = self.settings.policy.broadcast.timeout();
        for &i in &members {
            let now = self.now;
            let n = &mut self.nodes[i];
            n.phase = Phase::Running;
            if let Some(since) = n.ready_since.take() {
                n.barrier_wait += now.saturating_duration_since(since);
            }
            self.set_deadline(i, timeout);
        }
        self.round = Some(Round {
            id: self.rounds,
            parent: members
                .iter()
                .zip(&parents)
                .map(|(&m, p)| (m, p.map(|k| members[k])))
                .collect(),
            receiving: members.iter().copied().collect(),
            serving: members.iter().copied().collect(),
            suspect: HashSet::new(),
            starving: HashMap::new(),
            heirs: HashMap::new(),
            fan_out,
        });
        out.push(Action::StartBroadcast {
            round: self.rounds,
            nodes: members
                .iter()
                .map(|&i| self.nodes[i].name.clone())
                .collect(),
            parents,
            pace_groups,
            shape,
        });
    }

    fn summary(&self) -> Summary {
        let mut s = Summary {
            ok: Vec::new(),
            ko: Vec::new(),
            reports: Vec::new(),
            rounds: self.rounds,
            elapsed: self.now.saturating_duration_since(self.started),
        };
        for n in &self.nodes {
            if let Some(r) = &n.report {
                match &r.result {
                    NodeResult::Deployed => s.ok.push(n.name.clone()),
                    NodeResult::Failed { step, reason } => {
                        s.ko.push((n.name.clone(), *step, reason.clone()))
                    }
                }
                s.reports.push(r.clone());
            }
        }
        s
    }

    /// The current broadcast round's number, if one runs.
    pub fn current_round(&self) -> Option<u32> {
        self.round.as_ref().map(|r| r.id)
    }

    /// The nodes of the current round still receiving the image, in configuration order.
    pub fn receiving(&self) -> Vec<&str> {
        let mut v: Vec<usize> = self
            .round
            .as_ref()
            .map(|r| r.receiving.iter().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v.into_iter().map(|i| self.nodes[i].name.as_str()).collect()
    }

    /// Swarm repair in the running round: the member `node` should fetch chunk `index` from
    /// (it is then told to accept `node`), or `None` (the coordinator serves it). Candidates:
    /// the members still serving but `node` and `avoid` for which `reachable` holds (the
    /// driver has their control stream), with `chunks` received as last reported; `node`'s
    /// parent relayed everything before `index` and usually `index` itself (a corrupt copy),
    /// so it counts as holding `index + 1` whatever its report says. Members done receiving are
    /// left out but for that parent (busy finishing their disk, they would take the request
    /// to accept `node` too late). The pick is [`repair_holder`]'s.
    pub fn repair_peer(
        &self,
        node: &str,
        index: u32,
        avoid: Option<&str>,
        chunks: impl Fn(&str) -> u32,
        reachable: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let r = self.round.as_ref()?;
        let parent = self.round_parent(node);
        let mut members: Vec<usize> = r.serving.iter().copied().collect();
        members.sort_unstable();
        let candidates: Vec<(&str, u32)> = members
            .into_iter()
            .map(|m| (m, self.nodes[m].name.as_str()))
            .filter(|&(_, n)| n != node && Some(n) != avoid && reachable(n))
            .filter(|&(m, n)| r.receiving.contains(&m) || Some(n) == parent)
            .map(|(_, n)| {
                let known = if Some(n) == parent { index + 1 } else { 0 };
                (n, chunks(n).max(known))
            })
            .collect();
        repair_holder(index, candidates, REPAIR_WINDOW).map(str::to_string)
    }

    /// The parent of `node` in the running round, if it has one (not the coordinator).
    pub fn round_parent(&self, node: &str) -> Option<&str> {
        let r = self.round.as_ref()?;
        let p = (*r.parent.get(self.index.get(node)?)?)?;
        Some(self.nodes[p].name.as_str())
    }

    /// Each member still serving and its current parent in the running round (`None`: the
    /// coordinator), in configuration order.
    pub fn round_parents(&self) -> Vec<(&str, Option<&str>)> {
        let Some(r) = &self.round else {
            return Vec::new();
        };
        let mut v: Vec<(usize, Option<usize>)> = r
            .parent
            .iter()
            .filter(|(k, _)| r.serving.contains(k))
            .map(|(&k, &p)| (k, p))
            .collect();
        v.sort_unstable();
        v.into_iter()
            .map(|(k, p)| {
                (
                    self.nodes[k].name.as_str(),
                    p.map(|p| self.nodes[p].name.as_str()),
                )
            })
            .collect()
    }
}

/// The members whose parent is `i`, still serving, in order.
fn children_of(r: &Round, i: usize) -> Vec<usize> {
    let mut v: Vec<usize> = r
        .parent
        .iter()
        .filter(|(k, p)| **p == Some(i) && r.serving.contains(k))
        .map(|(&k, _)| k)
        .collect();
    v.sort_unstable();
    v
}

/// True when `c` is `node` or reads from it, directly or further down.
fn is_below(r: &Round, c: usize, node: usize) -> bool {
    let mut cur = Some(c);
    let mut hops = 0;
    while let Some(x) = cur {
        if x == node {
            return true;
        }
        hops += 1;
        if hops > r.parent.len() + 1 {
            return false;
        }
        cur = r.parent.get(&x).copied().flatten();
    }
    false
}

/// The members some node still receiving reads from, directly or further down: each walk up
/// from a receiving node stops at a node already counted, so this is linear in the round.
fn relays(r: &Round) -> HashSet<usize> {
    let mut needed = HashSet::new();
    for &x in &r.receiving {
        let mut cur = r.parent.get(&x).copied().flatten();
        let mut hops = 0;
        while let Some(c) = cur {
            if !needed.insert(c) {
                break;
            }
            hops += 1;
            if hops > r.parent.len() {
                break;
            }
            cur = r.parent.get(&c).copied().flatten();
        }
    }
    needed
}

/// `t + d`, or an instant about a century later when that does not fit (`Instant + Duration`
/// panics on overflow): a timer that far away never fires, as the huge timeout meant.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(t)
}

/// Counts for a progress line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Nodes (not done) per step, in [`Step::ALL`] order.
    pub in_step: [usize; 5],
    /// Nodes deployed.
    pub ok: usize,
    /// Nodes failed.
    pub ko: usize,
}

/// Aggregate of one step over the nodes of a deployment (`kd-coord stats`).
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Step.
    pub step: Step,
    /// Nodes that entered it.
    pub nodes: usize,
    /// Nodes that failed in it.
    pub failed: usize,
    /// Retries over all nodes.
    pub retries: u32,
    /// Mean duration (seconds) over the nodes that passed it.
    pub mean_secs: f64,
    /// Longest duration (seconds) over the nodes that passed it.
    pub max_secs: f64,
}

impl Summary {
    /// The final table: one line per node with its result, per-step seconds (`-` when not
    /// reached), retries, total and reason. Columns are aligned; the reason comes last.
    pub fn table(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![{
            let mut h = vec!["node".to_string(), "result".to_string()];
            h.extend(Step::ALL.iter().map(|s| s.as_str().to_string()));
            h.extend(["retries", "total", "reason"].map(String::from));
            h
        }];
        for r in &self.reports {
            let mut row = vec![
                r.node.clone(),
                if r.is_ok() { "ok" } else { "ko" }.to_string(),
            ];
            for step in Step::ALL {
                row.push(match r.steps.iter().find(|s| s.step == step) {
                    Some(s) => format!("{:.1}", s.duration.as_secs_f64()),
                    None => "-".into(),
                });
            }
            let retries: u32 = r.steps.iter().map(|s| s.attempts.saturating_sub(1)).sum();
            row.push(retries.to_string());
            row.push(format!("{:.1}", r.total.as_secs_f64()));
            row.push(match &r.result {
                NodeResult::Deployed => String::new(),
                NodeResult::Failed { step, reason } => format!("{step}: {reason}"),
            });
            rows.push(row);
        }
        let cols = rows[0].len();
        let widths: Vec<usize> = (0..cols)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == cols {
                    line.push_str(cell);
                } else if c < 2 {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
                } else {
                    line.push_str(&format!("{cell:>w$}  ", w = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push_str(&format!(
            "{} ok, {} ko, {:.1} s, {} broadcast round(s)\n",
            self.ok.len(),
            self.ko.len(),
            self.elapsed.as_secs_f64(),
            self.rounds
        ));
        out
    }

    /// Per-step aggregates, in step order (steps no node entered are left out).
    pub fn step_stats(&self) -> Vec<StepStats> {
        let mut out = Vec::new();
        for step in Step::ALL {
            let recs: Vec<&StepRecord> = self
                .reports
                .iter()
                .flat_map(|r| r.steps.iter().filter(move |s| s.step == step))
                .collect();
            if recs.is_empty() {
                continue;
            }
            let passed: Vec<f64> = recs
                .iter()
                .filter(|s| s.ok)
                .map(|s| s.duration.as_secs_f64())
                .collect();
            out.push(StepStats {
                step,
                nodes: recs.len(),
                failed: recs.iter().filter(|s| !s.ok).count(),
                retries: recs.iter().map(|s| s.attempts.saturating_sub(1)).sum(),
                mean_secs: if passed.is_empty() {
                    0.0
                } else {
                    passed.iter().sum::<f64>() / passed.len() as f64
                },
                max_secs: passed.iter().copied().fold(0.0, f64::max),
            });
        }
        out
    }

    /// The report as JSON (`--json`): `{ok, ko: [{node, step, reason}], elapsed_secs, rounds,
    /// nodes: [{node, result, step, reason, total_secs, barrier_wait_secs,
    /// steps: [{step, ok, attempts, secs, reboots}]}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let nodes: Vec<serde_json::Value> = self
            .reports
            .iter()
            .map(|r| {
                let (result, step, reason) = match &r.result {
                    NodeResult::Deployed => ("ok", None, None),
                    NodeResult::Failed { step, reason } => {
                        ("ko", Some(step.as_str()), Some(reason.as_str()))
                    }
                };
                json!({
                    "node": r.node,
                    "result": result,
                    "step": step,
                    "reason": reason,
                    "total_secs": r.total.as_secs_f64(),
                    "barrier_wait_secs": r.barrier_wait.as_secs_f64(),
                    "steps": r.steps.iter().map(|s| json!({
                        "step": s.step.as_str(),
                        "ok": s.ok,
                        "attempts": s.attempts,
                        "secs": s.duration.as_secs_f64(),
                        "reboots": s.reboots.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
                        "kexec": s.kexec,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "ok": self.ok,
            "ko": self.ko.iter().map(|(n, s, r)| json!({"node": n, "step": s.as_str(), "reason": r})).collect::<Vec<_>>(),
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "rounds": self.rounds,
            "nodes": nodes,
        })
    }
}
