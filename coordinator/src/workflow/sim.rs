//! A simulated cluster that drives [`Deployment`] in virtual time, with no sockets and no sleeps
//! (quinn-proto's `Pair` harness, for a whole cluster). Each node follows a [`Script`].
#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::{ClusterConfig, WorkflowConfig};

/// How a simulated node behaves (seconds).
#[derive(Debug, Clone)]
struct Script {
    /// Reboot command run time.
    cmd: u64,
    /// A reboot command never ends (the machine must kill it).
    cmd_hangs: Vec<Level>,
    /// Reboot commands at these levels exit non-zero.
    cmd_fails: Vec<Level>,
    /// Lowest level whose reboot really reboots the node; `None`: never boots.
    min_level: Option<Level>,
    /// From reboot to the agent's Hello.
    boot: u64,
    /// The agent's own reboot works.
    agent_reboot_works: bool,
    prepare: u64,
    /// Prepare reports an error this many times first.
    prepare_fails: u32,
    /// Prepare never answers.
    prepare_hangs: bool,
    broadcast: u64,
    /// The node dies this long after the broadcast starts.
    lost_in_broadcast: Option<u64>,
    broadcast_fails: u32,
    finish: u64,
    finish_fails: u32,
    /// From reboot into the local disk to the port open; `None`: never answers.
    os_boot: Option<u64>,
    /// What a kexec asked of the agent does.
    kexec: KexecSim,
}

/// What a simulated node does when its agent is asked to kexec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KexecSim {
    /// The deployed kernel starts; its port opens this long after (no firmware, no PXE).
    Boots(u64),
    /// Loading fails: the agent reboots the node as without kexec.
    FallsBack,
    /// `kexec -e` starts a kernel that hangs: nothing answers until a reboot command.
    Hangs,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            cmd: 1,
            cmd_hangs: vec![],
            cmd_fails: vec![],
            min_level: Some(Level::Soft),
            boot: 15,
            agent_reboot_works: true,
            prepare: 5,
            prepare_fails: 0,
            prepare_hangs: false,
            broadcast: 40,
            lost_in_broadcast: None,
            broadcast_fails: 0,
            finish: 5,
            finish_fails: 0,
            os_boot: Some(45),
            kexec: KexecSim::Boots(20),
        }
    }
}

#[derive(Debug, Clone)]
enum SimEvent {
    Deliver(Event),
    /// The node finished booting whatever its PXE profile said (if `gen` is still current).
    Booted {
        node: usize,
        gen: u64,
    },
    /// The kexec'd deployed kernel is up (if `gen` is still current), whatever the profile.
    Kexeced {
        node: usize,
        gen: u64,
    },
}

#[derive(Debug, Default)]
struct SimNode {
    gen: u64,
    profile: Option<PxeKind>,
    os_up: bool,
    agent: bool,
    dead: bool,
    prepare_fails: u32,
    broadcast_fails: u32,
    finish_fails: u32,
}

/// What a run produced.
#[derive(Debug)]
struct Outcome {
    summary: Summary,
    actions: Vec<(Duration, Action)>,
    max_in_flight: usize,
    reports: HashMap<String, NodeReport>,
    iterations: usize,
}

impl Outcome {
    fn report(&self, node: &str) -> &NodeReport {
        &self.reports[node]
    }

    fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.actions.iter().filter(|(_, a)| f(a)).count()
    }
}

struct SimCluster {
    names: Vec<String>,
    index: HashMap<String, usize>,
    scripts: Vec<Script>,
    nodes: Vec<SimNode>,
    settings: Settings,
    t0: Instant,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: Vec<Option<SimEvent>>,
    in_flight: HashMap<CommandId, ()>,
    /// The tree as the driver was told (StartBroadcast, Reparent): each node's parent.
    parent: HashMap<usize, Option<usize>>,
    /// Nodes of the running round that have not reported (or been lost) yet.
    receiving: HashSet<usize>,
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn settings(policy: WorkflowConfig) -> Settings {
    Settings {
        policy,
        reboot_levels: Level::ALL.to_vec(),
        arity: Arity::Kary(2),
        profile: Profile::Deploy,
        racks: Default::default(),
        boot: NewEnvBoot::Reboot,
        image: Default::default(),
    }
}

/// [`settings`] with the cluster's `boot: kexec`.
fn kexec_settings(policy: WorkflowConfig) -> Settings {
    Settings {
        boot: NewEnvBoot::Kexec,
        ..settings(policy)
    }
}

impl SimCluster {
    fn new(scripts: Vec<Script>, settings: Settings) -> Self {
        let names: Vec<String> = (1..=scripts.len()).map(|i| format!("node{i}")).collect();
        SimCluster {
            index: names.iter().cloned().zip(0..).collect(),
            names,
            nodes: scripts.iter().map(|_| SimNode::default()).collect(),
            scripts,
            settings,
            t0: Instant::now(),
            queue: BinaryHeap::new(),
            events: Vec::new(),
            in_flight: HashMap::new(),
            parent: HashMap::new(),
            receiving: HashSet::new(),
        }
    }

    fn at(&mut self, t: Instant, e: SimEvent) {
        self.events.push(Some(e));
        let seq = self.events.len() - 1;
        self.queue.push(Reverse((t, seq as u64, seq)));
    }

    fn idx(&self, node: &str) -> usize {
        self.index[node]
    }

    /// The node reboots at `t` into whatever its profile says.
    fn reboot(&mut self, i: usize, t: Instant) {
        let n = &mut self.nodes[i];
        if n.dead {
            return;
        }
        n.gen += 1;
        n.os_up = false;
        n.agent = false;
        let took = match n.profile {
            Some(PxeKind::Deploy) => Some(self.scripts[i].boot),
            Some(PxeKind::LocalDisk) => self.scripts[i].os_boot,
            None => None,
        };
        let gen = n.gen;
        if let Some(s) = took {
            self.at(t + secs(s), SimEvent::Booted { node: i, gen });
        }
    }

    fn execute(&mut self, a: &Action, now: Instant, out: &mut Outcome) {
        let deliver = |e: Event| SimEvent::Deliver(e);
        match a {
            Action::WritePxe { node, profile } => {
                let i = self.idx(node);
                self.nodes[i].profile = Some(*profile);
                let e = Event::PxeWritten {
                    node: node.clone(),
                    result: Ok(()),
                };
                self.at(now, deliver(e));
            }
            Action::RunCommand {
                node, id, level, ..
            } => {
                let i = self.idx(node);
                self.in_flight.insert(*id, ());
                out.max_in_flight = out.max_in_flight.max(self.in_flight.len());
                let s = self.scripts[i].clone();
                if s.cmd_hangs.contains(level) {
                    return;
                }
                let done = now + secs(s.cmd);
                let status = if s.cmd_fails.contains(level) || self.nodes[i].dead {
                    CommandStatus::Exited(1)
                } else {
                    if s.min_level.is_some_and(|m| *level >= m) {
                        self.reboot(i, done);
                    }
                    CommandStatus::Exited(0)
                };
                let e = Event::CommandDone {
                    node: node.clone(),
                    id: *id,
                    status,
                };
                self.at(done, deliver(e));
            }
            Action::RebootAgent { node, id, kexec } => {
                let i = self.idx(node);
                // A relay reboots only when no node still receiving reads from it.
                let mut above = HashSet::new();
                for &r in &self.receiving {
                    let mut cur = self.parent.get(&r).copied().flatten();
                    while let Some(c) = cur {
                        assert_ne!(c, i, "{node} rebooted while node{} reads from it", r + 1);
                        if !above.insert(c) {
                            break;
                        }
                        assert!(above.len() <= self.names.len(), "a cycle in the tree");
                        cur = self.parent.get(&c).copied().flatten();
                    }
                }
                let status = if self.nodes[i].agent {
                    match (*kexec, self.scripts[i].kexec) {
                        (true, KexecSim::Boots(took)) => {
                            let n = &mut self.nodes[i];
                            n.gen += 1;
                            n.os_up = false;
                            n.agent = false;
                            let gen = n.gen;
                            self.at(now + secs(took), SimEvent::Kexeced { node: i, gen });
                        }
                        (true, KexecSim::Hangs) => {
                            let n = &mut self.nodes[i];
                            n.gen += 1;
                            n.os_up = false;
                            n.agent = false;
                        }
                        (true, KexecSim::FallsBack) | (false, _) => {
                            if self.scripts[i].agent_reboot_works {
                                self.reboot(i, now);
                            }
                        }
                    }
                    CommandStatus::Exited(0)
                } else {
                    CommandStatus::Failed("agent not connected".into())
                };
                let e = Event::CommandDone {
                    node: node.clone(),
                    id: *id,
                    status,
                };
                self.at(now, deliver(e));
            }
            Action::KillCommand { id, .. } => {
                self.in_flight.remove(id);
            }
            Action::SendPrepare { node } => {
                let i = self.idx(node);
                if self.scripts[i].prepare_hangs || !self.nodes[i].agent {
                    return;
                }
                let result = if self.nodes[i].prepare_fails < self.scripts[i].prepare_fails {
                    self.nodes[i].prepare_fails += 1;
                    Err("sfdisk: device busy".to_string())
                } else {
                    Ok(())
                };
                let e = Event::StepDone {
                    node: node.clone(),
                    step: Step::Prepare,
                    result,
                };
                self.at(now + secs(self.scripts[i].prepare), deliver(e));
            }
            Action::ProbeRates { nodes, .. } => {
                // Every live node measures its link in a second (no disk: a null sink).
                for node in nodes {
                    let i = self.idx(node);
                    if self.nodes[i].dead {
                        continue;
                    }
                    let e = Event::RatesMeasured {
                        node: node.clone(),
                        link: Some(12_000_000),
                        disk: None,
                    };
                    self.at(now + secs(1), deliver(e));
                }
            }
            Action::StartBroadcast { nodes, parents, .. } => {
                assert_eq!(nodes.len(), parents.len());
                assert!(
                    self.receiving.is_empty(),
                    "a round started before the last ended"
                );
                self.parent.clear();
                for (k, node) in nodes.iter().enumerate() {
                    let i = self.idx(node);
                    self.parent
                        .insert(i, parents[k].map(|p| self.idx(&nodes[p])));
                    self.receiving.insert(i);
                }
                for node in nodes {
                    let i = self.idx(node);
                    let s = self.scripts[i].clone();
                    if let Some(after) = s.lost_in_broadcast {
                        let e = Event::NodeLost {
                            node: node.clone(),
                            reason: "connection timed out".into(),
                        };
                        self.at(now + secs(after), deliver(e));
                        // Powered off: nothing it does counts any more.
                        self.nodes[i].dead = true;
                        self.nodes[i].gen += 1;
                        continue;
                    }
                    let result = if self.nodes[i].broadcast_fails < s.broadcast_fails {
                        self.nodes[i].broadcast_fails += 1;
                        Err("write: no space left on device".to_string())
                    } else {
                        Ok(())
                    };
                    let done = now + secs(s.broadcast);
                    if result.is_ok() {
                        // The agent finishes its disk by itself after its report.
                        let fin = if self.nodes[i].finish_fails < s.finish_fails {
                            self.nodes[i].finish_fails += 1;
                            Err("grub-install failed".to_string())
                        } else {
                            Ok(())
                        };
                        let e = Event::StepDone {
                            node: node.clone(),
                            step: Step::Finish,
                            result: fin,
                        };
                        self.at(done + secs(s.finish), deliver(e));
                    }
                    let e = Event::StepDone {
                        node: node.clone(),
                        step: Step::Broadcast,
                        result,
                    };
                    self.at(done, deliver(e));
                }
            }
            Action::Reparent { node, parent, .. } => {
                let i = self.idx(node);
                let p = parent.as_ref().map(|p| self.idx(p));
                assert_ne!(p, Some(i), "{node} made its own parent");
                self.parent.insert(i, p);
            }
            Action::ProbePort { node } => {
                let i = self.idx(node);
                let e = if self.nodes[i].os_up {
                    Event::PortOpen { node: node.clone() }
                } else {
                    Event::PortClosed { node: node.clone() }
                };
                self.at(now, deliver(e));
            }
            Action::NodeDone { node, report } => {
                assert!(
                    out.reports.insert(node.clone(), report.clone()).is_none(),
                    "two NodeDone for {node}"
                );
            }
            Action::Finished { summary } => {
                assert!(out.summary.reports.is_empty(), "two Finished");
                out.summary = summary.clone();
            }
            Action::CancelStep { node, .. } => {
                let i = self.idx(node);
                self.receiving.remove(&i);
            }
            Action::StepStarted { .. } => {}
        }
    }

    fn sim_event(&mut self, e: SimEvent) -> Option<Event> {
        match e {
            SimEvent::Deliver(ev) => {
                match &ev {
                    Event::CommandDone { id, .. } => {
                        self.in_flight.remove(id);
                    }
                    Event::StepDone {
                        node,
                        step: Step::Broadcast,
                        ..
                    }
                    | Event::NodeLost { node, .. } => {
                        let i = self.idx(node);
                        self.receiving.remove(&i);
                    }
                    _ => {}
                }
                Some(ev)
            }
            SimEvent::Booted { node, gen } => {
                let n = &mut self.nodes[node];
                if n.gen != gen || n.dead {
                    return None;
                }
                match n.profile {
                    Some(PxeKind::Deploy) => {
                        n.agent = true;
                        Some(Event::AgentHello {
                            node: self.names[node].clone(),
                        })
                    }
                    Some(PxeKind::LocalDisk) => {
                        n.os_up = true;
                        None
                    }
                    None => None,
                }
            }
            SimEvent::Kexeced { node, gen } => {
                let n = &mut self.nodes[node];
                if n.gen == gen && !n.dead {
                    n.os_up = true;
                }
                None
            }
        }
    }

    /// Runs the deployment to its end (or `abort_at`), jumping from event to timeout.
    fn run(mut self, abort_at: Option<u64>) -> Outcome {
        let t0 = self.t0;
        let mut d = Deployment::new(self.names.clone(), self.settings.clone(), t0);
        let mut out = Outcome {
            summary: Summary {
                ok: vec![],
                ko: vec![],
                reports: vec![],
                rounds: 0,
                elapsed: Duration::ZERO,
            },
            actions: vec![],
            max_in_flight: 0,
            reports: HashMap::new(),
            iterations: 0,
        };
        if let Some(a) = abort_at {
            self.at(
                t0 + secs(a),
                SimEvent::Deliver(Event::Abort {
                    reason: "operator".into(),
                }),
            );
        }
        let mut actions = d.start(t0);
        let mut now = t0;
        for iter in 0..10_000_000usize {
            out.iterations = iter;
            for a in &actions {
                self.execute(a, now, &mut out);
            }
            out.actions.extend(actions.drain(..).map(|a| (now - t0, a)));
            assert!(
                out.max_in_flight <= self.settings.policy.reboot_window,
                "reboot window exceeded"
            );
            if d.is_finished() {
                return out;
            }
            let next_event = self.queue.peek().map(|Reverse((t, _, _))| *t);
            let next_timeout = d.poll_timeout();
            let event_first = match (next_event, next_timeout) {
                (Some(te), to) => to.is_none_or(|to| te <= to),
                (None, Some(_)) => false,
                (None, None) => panic!("stuck: no event and no timeout, not finished"),
            };
            match next_timeout {
                _ if event_first => {
                    let Reverse((t, _, slot)) = self.queue.pop().unwrap();
                    assert!(t >= now, "time went backwards");
                    now = t;
                    let e = self.events[slot].take().unwrap();
                    if let Some(ev) = self.sim_event(e) {
                        actions = d.handle(ev, now);
                    }
                }
                Some(to) => {
                    assert!(to >= now, "timeout in the past");
                    now = to;
                    actions = d.handle_timeout(now);
                }
                None => unreachable!(),
            }
        }
        panic!("did not finish");
    }
}

fn run(scripts: Vec<Script>, policy: WorkflowConfig) -> Outcome {
    SimCluster::new(scripts, settings(policy)).run(None)
}

fn ok_scripts(n: usize) -> Vec<Script> {
    vec![Script::default(); n]
}

fn check_bound(out: &Outcome, policy: &WorkflowConfig, n: usize) {
    check_bound_with(out, &settings(policy.clone()), n)
}

fn check_bound_with(out: &Outcome, settings: &Settings, n: usize) {
    let bound = Deployment::time_bound(settings, n);
    assert!(
        out.summary.elapsed <= bound,
        "elapsed {:?} > bound {:?}",
        out.summary.elapsed,
        bound
    );
    assert_eq!(out.reports.len(), n, "every node gets one NodeDone");
    assert_eq!(out.summary.reports.len(), n);
}

#[test]
fn all_ok() {
    let p = WorkflowConfig::default();
    let out = run(ok_scripts(3), p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok, vec!["node1", "node2", "node3"]);
    assert!(out.summary.ko.is_empty());
    assert_eq!(out.summary.rounds, 1);
    // 1 s command + 15 s boot, 5 s prepare, 40 s broadcast, 5 s finish, 45 s OS boot.
    assert_eq!(out.summary.elapsed, secs(111));
    let r = out.report("node2");
    let durations: Vec<(Step, u64, u32, Vec<Level>)> = r
        .steps
        .iter()
        .map(|s| (s.step, s.duration.as_secs(), s.attempts, s.reboots.clone()))
        .collect();
    assert_eq!(
        durations,
        vec![
            (Step::SetDeploymentEnv, 16, 1, vec![Level::Soft]),
            (Step::Prepare, 5, 1, vec![]),
            (Step::Broadcast, 40, 1, vec![]),
            (Step::Finish, 5, 1, vec![]),
            (Step::BootNewEnv, 45, 1, vec![Level::Soft]),
        ]
    );
    assert_eq!(r.total, secs(111));
    assert_eq!(r.barrier_wait, Duration::ZERO);
    // The order of the first actions for one node.
    let first: Vec<&Action> = out
        .actions
        .iter()
        .map(|(_, a)| a)
        .filter(|a| match a {
            Action::WritePxe { node, .. }
            | Action::RunCommand { node, .. }
            | Action::RebootAgent { node, .. }
            | Action::SendPrepare { node } => node == "node1",
            Action::StartBroadcast { .. } => true,
            _ => false,
        })
        .collect();
    assert!(matches!(
        first[..],
        [
            Action::WritePxe {
                profile: PxeKind::Deploy,
                ..
            },
            Action::RunCommand {
                level: Level::Soft,
                op: Operation::Reboot,
                ..
            },
            Action::SendPrepare { .. },
            Action::StartBroadcast { round: 1, .. },
            Action::WritePxe {
                profile: PxeKind::LocalDisk,
                ..
            },
            Action::RebootAgent { .. },
        ]
    ));
    // Probes: at +10, +15, ... +45 s after the agent reboot.
    assert_eq!(
        out.count(|a| matches!(a, Action::ProbePort { node } if node == "node1")),
        8
    );
}

#[test]
fn dead_node_escalates_then_fails() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(3);
    s[1].min_level = None; // commands succeed, the node never boots
    let out = run(s, p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok, vec!["node1", "node3"]);
    let r = out.report("node2");
    assert_eq!(
        r.result,
        NodeResult::Failed {
            step: Step::SetDeploymentEnv,
            reason: "no agent Hello within 300 s after a very_hard reboot".into()
        }
    );
    assert_eq!(r.steps.len(), 1);
    assert_eq!(r.steps[0].attempts, 3);
    assert_eq!(
        r.steps[0].reboots,
        vec![Level::Soft, Level::Hard, Level::VeryHard]
    );
    // Three attempts of (1 s command + 300 s wait).
    assert_eq!(r.total, secs(903));
    let levels: Vec<Level> = out
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::RunCommand { node, level, .. } if node == "node2" => Some(*level),
            _ => None,
        })
        .collect();
    assert_eq!(levels, vec![Level::Soft, Level::Hard, Level::VeryHard]);
    // The profile is written again on each retry (fresh token).
    assert_eq!(
        out.count(|a| matches!(a, Action::WritePxe { node, .. } if node == "node2")),
        3
    );
    // The others waited broadcast_wait for it, not longer.
    assert_eq!(out.report("node1").barrier_wait, secs(120));
    assert_eq!(
        out.report("node1").step_duration(Step::Broadcast),
        Some(secs(160))
    );
    assert_eq!(out.report("node1").total, secs(16 + 5 + 120 + 40 + 5 + 45));
    assert_eq!(out.summary.elapsed, secs(903));
}

#[test]
fn failing_commands_escalate_at_once() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(2);
    s[0].cmd_fails = vec![Level::Soft];
    s[1].cmd_fails = Level::ALL.to_vec();
    let out = run(s, p.clone());
    check_bound(&out, &p, 2);
    let r = out.report("node1");
    assert!(r.is_ok());
    assert_eq!(r.steps[0].reboots, vec![Level::Soft, Level::Hard]);
    assert_eq!(r.steps[0].duration, secs(17));
    let r = out.report("node2");
    assert_eq!(
        r.result,
        NodeResult::Failed {
            step: Step::SetDeploymentEnv,
            reason: "very_hard reboot command failed: exit status 1".into()
        }
    );
    // soft, hard, very_hard, then two retries that start at very_hard.
    assert_eq!(
        r.steps[0].reboots,
        vec![
            Level::Soft,
            Level::Hard,
            Level::VeryHard,
            Level::VeryHard,
            Level::VeryHard
        ]
    );
    assert_eq!(r.total, secs(5));
}

#[test]
fn hanging_command_is_killed_and_escalated() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(1);
    s[0].cmd_hangs = vec![Level::Soft];
    let out = run(s, p.clone());
    check_bound(&out, &p, 1);
    assert!(out.report("node1").is_ok());
    assert_eq!(out.count(|a| matches!(a, Action::KillCommand { .. })), 1);
    assert_eq!(
        out.report("node1").steps[0].reboots,
        vec![Level::Soft, Level::Hard]
    );
    assert_eq!(out.report("node1").steps[0].duration, secs(60 + 1 + 15));
}

#[test]
fn retry_upgrades_soft_to_hard() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(1);
    s[0].min_level = Some(Level::Hard); // soft "works" but the node stays hung
    let out = run(s, p.clone());
    check_bound(&out, &p, 1);
    let r = out.report("node1");
    assert!(r.is_ok());
    assert_eq!(r.steps[0].attempts, 2);
    assert_eq!(r.steps[0].reboots, vec![Level::Soft, Level::Hard]);
    assert_eq!(r.steps[0].duration, secs(1 + 300 + 1 + 15));
}

#[test]
fn prepare_fails_once_then_passes() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(3);
    s[2].prepare_fails = 1;
    let out = run(s, p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok.len(), 3);
    let r = out.report("node3");
    assert_eq!(r.steps[1].step, Step::Prepare);
    assert_eq!(r.steps[1].attempts, 2);
    assert_eq!(r.steps[1].duration, secs(10));
    assert_eq!(
        out.count(|a| matches!(a, Action::SendPrepare { node } if node == "node3")),
        2
    );
    assert_eq!(
        out.count(|a| matches!(a, Action::StepStarted { node, step: Step::Prepare, attempt: 1 } if node == "node3")),
        1
    );
    // Everyone waited 5 s for node3 at the barrier.
    assert_eq!(out.report("node1").barrier_wait, secs(5));
    assert_eq!(out.summary.rounds, 1);
}

#[test]
fn prepare_fails_too_often() {
    let mut p = WorkflowConfig::default();
    p.prepare.retries = 1;
    let mut s = ok_scripts(2);
    s[0].prepare_fails = 2;
    s[1].prepare_hangs = true;
    let out = run(s, p.clone());
    check_bound(&out, &p, 2);
    assert_eq!(
        out.report("node1").result,
        NodeResult::Failed {
            step: Step::Prepare,
            reason: "sfdisk: device busy".into()
        }
    );
    assert_eq!(
        out.report("node2").result,
        NodeResult::Failed {
            step: Step::Prepare,
            reason: "no Prepare report within 120 s".into()
        }
    );
    assert_eq!(
        out.count(
            |a| matches!(a, Action::CancelStep { node, step: Step::Prepare, .. } if node == "node2")
        ),
        2
    );
    assert_eq!(out.summary.rounds, 0);
    assert!(out.summary.ok.is_empty());
}

#[test]
fn node_lost_mid_broadcast() {
    // No retry: the node ends at once, the others are not held up.
    let mut p = WorkflowConfig::default();
    p.broadcast.retries = 0;
    let mut s = ok_scripts(3);
    s[1].lost_in_broadcast = Some(20);
    let out = run(s, p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok, vec!["node1", "node3"]);
    assert_eq!(
        out.summary.ko,
        vec![(
            "node2".to_string(),
            Step::Broadcast,
            "agent lost during Broadcast: connection timed out".to_string()
        )]
    );
    assert_eq!(out.report("node2").total, secs(16 + 5 + 20));
    assert_eq!(out.summary.rounds, 1);
    assert_eq!(out.summary.elapsed, secs(111));
}

#[test]
fn a_node_lost_mid_broadcast_is_retried_from_a_fresh_boot_and_named_when_it_stays_dead() {
    let p = WorkflowConfig::default(); // broadcast: 1 retry
    let mut s = ok_scripts(3);
    s[1].lost_in_broadcast = Some(20);
    let out = run(s, p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok, vec!["node1", "node3"]);
    // It went back to SetDeploymentEnv (a deploy profile again, then every reboot level) and
    // stayed dead: the failure names what it was retrying and why.
    assert_eq!(
        out.summary.ko,
        vec![(
            "node2".to_string(),
            Step::SetDeploymentEnv,
            "very_hard reboot command failed: exit status 1 (retrying Broadcast after: agent \
             lost during Broadcast: connection timed out)"
                .to_string()
        )]
    );
    assert_eq!(
        out.count(
            |a| matches!(a, Action::WritePxe { node, profile: PxeKind::Deploy } if node == "node2")
        ),
        1 + 1 + 2, // the first boot, the retry of Broadcast, two retries of SetDeploymentEnv
    );
    let r = out.report("node2");
    let b = r.steps.iter().find(|s| s.step == Step::Broadcast).unwrap();
    assert_eq!((b.attempts, b.ok), (1, false));
    // The others were not held up by it.
    assert_eq!(out.report("node1").total, secs(111));
    assert_eq!(out.summary.rounds, 1);
}

#[test]
fn finish_failure_is_retried_from_a_fresh_boot() {
    let p = WorkflowConfig::default(); // finish: 1 retry
    let mut s = ok_scripts(2);
    s[0].finish_fails = 1;
    let out = run(s, p.clone());
    check_bound(&out, &p, 2);
    assert_eq!(out.summary.ok, vec!["node1", "node2"]);
    assert_eq!(out.summary.rounds, 2);
    let r = out.report("node1");
    let steps: Vec<(Step, u32, bool)> =
        r.steps.iter().map(|s| (s.step, s.attempts, s.ok)).collect();
    assert_eq!(
        steps,
        vec![
            (Step::SetDeploymentEnv, 2, true),
            (Step::Prepare, 2, true),
            (Step::Broadcast, 2, true),
            (Step::Finish, 2, true),
            (Step::BootNewEnv, 1, true),
        ]
    );
    // Failed at 16 + 5 + 40 + 5 = 66 s; again: 16 + 5 + 40 + 5, then 45 s to the port.
    assert_eq!(r.total, secs(66 + 66 + 45));
}

#[test]
fn a_lost_relay_s_children_read_from_its_parent_and_relays_reboot_last() {
    // A chain node1 -> node2 -> node3 -> node4: node2 dies; node3 (and so node4 below it)
    // reads from node1. node1 reports first but relays: its reboot waits for node3 and node4.
    let mut p = WorkflowConfig::default();
    p.broadcast.retries = 0;
    let mut s = ok_scripts(4);
    s[1].lost_in_broadcast = Some(10);
    s[0].broadcast = 20;
    s[2].broadcast = 60;
    s[3].broadcast = 90;
    let mut settings = settings(p.clone());
    settings.arity = Arity::Chain;
    let out = SimCluster::new(s, settings).run(None);
    check_bound(&out, &p, 4);
    assert_eq!(out.summary.ok, vec!["node1", "node3", "node4"]);
    let tree: Vec<(String, Option<String>)> = out
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Reparent { node, parent, .. } => Some((node.clone(), parent.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(tree, vec![("node3".to_string(), Some("node1".to_string()))]);
    let reboot_at = |n: &str| {
        out.actions
            .iter()
            .find(|(_, a)| matches!(a, Action::RebootAgent { node, .. } if node == n))
            .map(|(t, _)| *t)
            .unwrap()
    };
    // The round started at 21 s; node4 reported at 21 + 90 = 111 s: node1 and node3 (its
    // ancestors) reboot then, although they finished at 21 + 20 + 5 and 21 + 60 + 5.
    assert_eq!(reboot_at("node1"), secs(111));
    assert_eq!(reboot_at("node3"), secs(111));
    assert_eq!(reboot_at("node4"), secs(116));
    // The held time is not counted as a slow reboot.
    let b = |n: &str| out.report(n).step_duration(Step::BootNewEnv).unwrap();
    assert_eq!(b("node1"), secs(111 - 46 + 45));
}

#[test]
fn the_broadcast_alone_waits_for_hellos_then_ends_each_node_with_its_report() {
    // kd-coord broadcast: no PXE, no reboot, no Prepare/Finish/BootNewEnv, no retries.
    let settings = Settings::broadcast_only(Arity::Chain, secs(10), secs(60));
    let t0 = Instant::now();
    let names: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
    let mut d = Deployment::new(names, settings, t0);
    let a = d.start(t0);
    assert!(
        a.iter().all(|a| matches!(
            a,
            Action::StepStarted {
                step: Step::SetDeploymentEnv,
                ..
            }
        )),
        "{a:?}"
    );
    assert_eq!(d.poll_timeout(), Some(t0 + secs(10)));
    assert!(d
        .handle(Event::AgentHello { node: "n1".into() }, t0 + secs(1))
        .iter()
        .all(|a| !matches!(a, Action::StartBroadcast { .. })));
    d.handle(Event::AgentHello { node: "n2".into() }, t0 + secs(2));
    // n3 never says Hello: at 10 s it fails, and the round starts over n1 and n2.
    let a = d.handle_timeout(t0 + secs(10));
    assert!(a.iter().any(|a| matches!(a, Action::NodeDone { node, report } if node == "n3"
        && report.result == NodeResult::Failed { step: Step::SetDeploymentEnv, reason: "never connected (no Hello within 10 s)".into() })), "{a:?}");
    assert!(
        a.contains(&Action::StartBroadcast {
            round: 1,
            nodes: vec!["n1".into(), "n2".into()],
            parents: vec![None, Some(0)],
            pace_groups: vec![0, 0],
            shape: "chain".into(),
        }),
        "{a:?}"
    );
    // A late Hello is not for a node that waits any more.
    assert_eq!(d.node_step("n3"), Some((Step::SetDeploymentEnv, true)));
    // n2's agent reports an error: no retry, it ends at once; n1's report ends n1 and all.
    let a = d.handle(
        Event::StepDone {
            node: "n2".into(),
            step: Step::Broadcast,
            result: Err("broadcast failed: disk full".into()),
        },
        t0 + secs(20),
    );
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::NodeDone { node, .. } if node == "n2")),
        "{a:?}"
    );
    assert!(
        !a.iter()
            .any(|a| matches!(a, Action::WritePxe { .. } | Action::RunCommand { .. })),
        "{a:?}"
    );
    let a = d.handle(
        Event::StepDone {
            node: "n1".into(),
            step: Step::Broadcast,
            result: Ok(()),
        },
        t0 + secs(30),
    );
    let summary = a
        .iter()
        .find_map(|a| match a {
            Action::Finished { summary } => Some(summary.clone()),
            _ => None,
        })
        .expect("finished");
    assert_eq!(summary.ok, vec!["n1"]);
    assert_eq!(summary.ko.len(), 2);
    assert_eq!(
        summary.reports[0]
            .steps
            .iter()
            .map(|s| s.step)
            .collect::<Vec<_>>(),
        vec![Step::SetDeploymentEnv, Step::Broadcast]
    );
}

fn op_settings(op: Operation, local_profile: bool, check: bool, from: Level) -> Settings {
    Settings {
        reboot_levels: Level::ALL.iter().copied().filter(|l| *l >= from).collect(),
        profile: Profile::Operate {
            op,
            local_profile,
            check,
            from,
        },
        ..settings(WorkflowConfig::default())
    }
}

#[test]
fn reboot_recorded_env_writes_the_local_profile_reboots_and_waits_for_the_port() {
    // Through the simulated cluster: the nodes boot what the profile says.
    let out = SimCluster::new(
        ok_scripts(2),
        op_settings(Operation::Reboot, true, true, Level::Soft),
    )
    .run(None);
    assert_eq!(out.summary.ok, vec!["node1", "node2"]);
    assert_eq!(out.summary.rounds, 0);
    let kinds: Vec<String> = out
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::WritePxe { node, profile } if node == "node1" => {
                Some(format!("pxe {profile:?}"))
            }
            Action::RunCommand {
                node, op, level, ..
            } if node == "node1" => Some(format!("{op:?} {level}")),
            Action::RebootAgent { .. }
            | Action::SendPrepare { .. }
            | Action::StartBroadcast { .. } => Some("agent work".into()),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec!["pxe LocalDisk", "Reboot soft"]);
    // 1 s command + 45 s boot; the probes find the port.
    assert_eq!(out.report("node1").total, secs(46));
    assert_eq!(out.report("node1").steps.len(), 1);
}

#[test]
fn power_off_is_done_when_a_command_succeeds_and_escalates_when_one_fails() {
    let t0 = Instant::now();
    let mut d = Deployment::new(
        vec!["a".into(), "b".into()],
        op_settings(Operation::PowerOff, false, false, Level::Hard),
        t0,
    );
    let a = d.start(t0);
    // No PXE profile, no agent: the hard power-off command of each node at once.
    let cmds: Vec<(String, Operation, Level)> = a
        .iter()
        .filter_map(|a| match a {
            Action::RunCommand {
                node, op, level, ..
            } => Some((node.clone(), *op, *level)),
            _ => None,
        })
        .collect();
    assert_eq!(
        cmds,
        vec![
            ("a".into(), Operation::PowerOff, Level::Hard),
            ("b".into(), Operation::PowerOff, Level::Hard)
        ]
    );
    assert!(!a.iter().any(|a| matches!(a, Action::WritePxe { .. })));
    let a = d.handle(
        Event::CommandDone {
            node: "a".into(),
            id: CommandId(1),
            status: CommandStatus::Exited(0),
        },
        t0 + secs(1),
    );
    assert!(
        a.iter().any(
            |a| matches!(a, Action::NodeDone { node, report } if node == "a" && report.is_ok())
        ),
        "{a:?}"
    );
    assert!(!a.iter().any(|a| matches!(a, Action::ProbePort { .. })));
    // b's command fails: very_hard next, then it fails for good with the reason.
    let a = d.handle(
        Event::CommandDone {
            node: "b".into(),
            id: CommandId(2),
            status: CommandStatus::Exited(3),
        },
        t0 + secs(1),
    );
    assert!(a.iter().any(|a| matches!(a, Action::RunCommand { node, op: Operation::PowerOff, level: Level::VeryHard, .. } if node == "b")), "{a:?}");
    let mut a = d.handle(
        Event::CommandDone {
            node: "b".into(),
            id: CommandId(3),
            status: CommandStatus::Exited(3),
        },
        t0 + secs(2),
    );
    // boot_new_env's retries: the attempt starts again at the highest level.
    for id in 4.. {
        if d.is_finished() {
            break;
        }
        assert!(id < 10, "{a:?}");
        a = d.handle(
            Event::CommandDone {
                node: "b".into(),
                id: CommandId(id),
                status: CommandStatus::Exited(3),
            },
            t0 + secs(id),
        );
    }
    let summary = a
        .iter()
        .find_map(|a| match a {
            Action::Finished { summary } => Some(summary.clone()),
            _ => None,
        })
        .expect("finished");
    assert_eq!(summary.ok, vec!["a"]);
    assert_eq!(
        summary.ko,
        vec![(
            "b".to_string(),
            Step::BootNewEnv,
            "very_hard power off command failed: exit status 3".to_string()
        )]
    );
}

/// A deployment of `n` nodes driven by hand up to the end of Prepare (the first round, or
/// an `auto` round's probe, starts then).
fn prepared(n: usize, settings: Settings) -> (Deployment, Instant, Vec<Action>) {
    let t0 = Instant::now();
    let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let mut d = Deployment::new(names.clone(), settings, t0);
    d.start(t0);
    for n in &names {
        d.handle(
            Event::PxeWritten {
                node: n.clone(),
                result: Ok(()),
            },
            t0,
        );
    }
    for id in 1..=n as u64 {
        d.handle(
            Event::CommandDone {
                node: String::new(),
                id: CommandId(id),
                status: CommandStatus::Exited(0),
            },
            t0,
        );
    }
    for n in &names {
        d.handle(Event::AgentHello { node: n.clone() }, t0);
    }
    let mut last = Vec::new();
    for n in &names {
        last = d.handle(
            Event::StepDone {
                node: n.clone(),
                step: Step::Prepare,
                result: Ok(()),
            },
            t0,
        );
    }
    (d, t0, last)
}

fn measured(node: &str, link: u64) -> Event {
    Event::RatesMeasured {
        node: node.into(),
        link: Some(link),
        disk: None,
    }
}

#[test]
fn an_auto_round_measures_the_nodes_then_plans_from_their_rates() {
    let mut s = settings(WorkflowConfig::default());
    s.arity = Arity::Auto;
    s.image = kd_proto::auto::ImageShape {
        compressed: 256 << 20,
        raw: 256 << 20,
        step: 1 << 20,
    };
    let (mut d, t0, a) = prepared(4, s.clone());
    // No round yet: the probe, over a ring n1 <- n2 <- n3 <- n4 <- n1.
    assert_eq!(d.current_round(), None);
    assert_eq!(
        a.last(),
        Some(&Action::ProbeRates {
            round: 1,
            nodes: vec!["n1".into(), "n2".into(), "n3".into(), "n4".into()],
            fetch: vec![Some(1), Some(2), Some(3), Some(0)],
            bytes: PROBE_BYTES,
        })
    );
    // n4's link is slow both ways: n3 fetched slowly from it, n4 slowly from n1.
    let fast = 12_000_000;
    assert!(d.handle(measured("n1", fast), t0 + secs(1)).is_empty());
    d.handle(measured("n2", fast), t0 + secs(1));
    d.handle(measured("n3", 3_000_000), t0 + secs(1));
    let a = d.handle(measured("n4", 3_000_000), t0 + secs(1));
    let Some(Action::StartBroadcast {
        round,
        parents,
        pace_groups,
        shape,
        ..
    }) = a
        .iter()
        .find(|a| matches!(a, Action::StartBroadcast { .. }))
    else {
        panic!("no round: {a:?}");
    };
    assert_eq!(*round, 1);
    // The fast three in a chain; n4 alone under the coordinator, in its own pace group.
    assert_eq!(parents, &vec![None, Some(0), Some(1), None]);
    assert_eq!(pace_groups, &vec![0, 0, 0, 1]);
    assert!(shape.starts_with("auto: chain of 3"), "{shape}");
    assert_eq!(d.current_round(), Some(1));

    // A node that never answers: the round starts without its rates after PROBE_WAIT.
    let (mut d, t0, _) = prepared(3, s);
    d.handle(measured("n1", fast), t0 + secs(1));
    d.handle(measured("n2", fast), t0 + secs(1));
    assert_eq!(d.current_round(), None);
    assert_eq!(d.poll_timeout(), Some(t0 + PROBE_WAIT));
    let a = d.handle_timeout(t0 + PROBE_WAIT);
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::StartBroadcast { parents, .. } if parents == &vec![None, Some(0), Some(1)])),
        "{a:?}"
    );
}

#[test]
fn a_whole_auto_deployment_runs() {
    let mut s = settings(WorkflowConfig::default());
    s.arity = Arity::Auto;
    let out = SimCluster::new(vec![Script::default(); 6], s).run(None);
    assert_eq!(out.summary.ok.len(), 6, "{:?}", out.summary.ko);
    assert_eq!(out.count(|a| matches!(a, Action::ProbeRates { .. })), 1);
}

#[test]
fn a_repair_goes_to_a_member_that_likely_holds_the_chunk() {
    // n1 -> n2 -> n3 -> n4.
    let (d, _) = in_round(4, Arity::Chain);
    let progress = |n: &str| match n {
        "n1" => 10,
        "n4" => 2,
        _ => 0,
    };
    let all = |_: &str| true;
    // n3's parent n2 reported nothing yet but relayed chunk 5 to it: the closest holder.
    assert_eq!(
        d.repair_peer("n3", 5, None, progress, all).as_deref(),
        Some("n2")
    );
    // n2 just said it no longer holds it: n1 (5 chunks past it, within the window).
    assert_eq!(
        d.repair_peer("n3", 5, Some("n2"), progress, all).as_deref(),
        Some("n1")
    );
    // Too far past it (n1 at 10, chunk 1): nobody likely holds it; nor does an agent the
    // driver cannot reach.
    assert_eq!(d.repair_peer("n4", 1, Some("n3"), progress, all), None);
    assert_eq!(
        d.repair_peer("n3", 5, Some("n2"), progress, |n: &str| n != "n1"),
        None
    );
    // Never the asker itself.
    assert_eq!(
        d.repair_peer("n1", 5, None, |_: &str| 9, all).as_deref(),
        Some("n2")
    );
}

/// A deployment of `n` nodes driven by hand up to its first broadcast round.
fn in_round(n: usize, arity: Arity) -> (Deployment, Instant) {
    let mut settings = settings(WorkflowConfig::default());
    settings.arity = arity;
    in_round_with(n, settings)
}

/// The same with these settings.
fn in_round_with(n: usize, settings: Settings) -> (Deployment, Instant) {
    let (d, t0, _) = prepared(n, settings);
    assert_eq!(d.current_round(), Some(1));
    (d, t0)
}

#[test]
fn a_round_s_tree_enters_each_rack_once() {
    // n1..n8 alternate between two racks (as names often do across racks).
    let mut s = settings(WorkflowConfig::default());
    s.arity = Arity::Chain;
    s.racks = (1..=8)
        .map(|i| (format!("n{i}"), format!("r{}", i % 2)))
        .collect();
    let (d, _) = in_round_with(8, s.clone());
    let parent: HashMap<&str, Option<&str>> = d.round_parents().into_iter().collect();
    let mut chain = Vec::new();
    let mut cur = parent.iter().find(|(_, p)| p.is_none()).map(|(n, _)| *n);
    while let Some(n) = cur {
        chain.push(n);
        cur = parent.iter().find(|(_, p)| **p == Some(n)).map(|(c, _)| *c);
    }
    assert_eq!(chain, ["n1", "n3", "n5", "n7", "n2", "n4", "n6", "n8"]);
    // A binary tree: one edge into each rack, every sender within the fan-out.
    s.arity = Arity::Kary(2);
    let (d, _) = in_round_with(8, s);
    let rack = |n: &str| n[1..].parse::<usize>().unwrap() % 2;
    let parents = d.round_parents();
    let crossing = parents
        .iter()
        .filter(|(n, p)| p.is_none_or(|p| rack(p) != rack(n)))
        .count();
    assert_eq!(crossing, 2, "{parents:?}");
    assert!(most_children(&d) <= 2);
}

fn most_children(d: &Deployment) -> usize {
    let parents = d.round_parents();
    let mut count: HashMap<Option<&str>, usize> = HashMap::new();
    for (_, p) in &parents {
        if p.is_some() {
            *count.entry(*p).or_default() += 1;
        }
    }
    count.values().copied().max().unwrap_or(0)
}

#[test]
fn a_dead_relay_s_first_child_takes_its_place_and_the_tree_keeps_its_shape() {
    // Chain n1 -> n2 -> ... -> n6: n3 dies; n4 reads from n2, the chain stays a chain.
    let (mut d, t0) = in_round(6, Arity::Chain);
    let a = d.handle(
        Event::NodeLost {
            node: "n3".into(),
            reason: "gone".into(),
        },
        t0,
    );
    assert!(
        a.contains(&Action::Reparent {
            round: 1,
            node: "n4".into(),
            parent: Some("n2".into())
        }),
        "{a:?}"
    );
    assert_eq!(most_children(&d), 1);
    // Binary tree of 15: n1, n2 are roots; n3 (a relay with two children, each with two)
    // dies: its first child takes its place, the second reads from the first; no parent
    // gets more than arity + 1 = 3 children, whatever else dies.
    let (mut d, t0) = in_round(15, Arity::Kary(2));
    let before = d.round_parents();
    let kids = |who: &str| -> Vec<String> {
        before
            .iter()
            .filter(|(_, p)| *p == Some(who))
            .map(|(n, _)| n.to_string())
            .collect()
    };
    let parent_of_n3 = before
        .iter()
        .find(|(n, _)| *n == "n3")
        .and_then(|(_, p)| *p)
        .map(str::to_string);
    let k = kids("n3");
    assert_eq!(k.len(), 2, "{before:?}");
    d.handle(
        Event::NodeLost {
            node: "n3".into(),
            reason: "gone".into(),
        },
        t0,
    );
    let after = d.round_parents();
    let parent = |who: &str| {
        after
            .iter()
            .find(|(n, _)| *n == who)
            .and_then(|(_, p)| *p)
            .map(str::to_string)
    };
    assert_eq!(parent(&k[0]), parent_of_n3, "{after:?}");
    assert_eq!(parent(&k[1]), Some(k[0].clone()), "{after:?}");
    assert!(most_children(&d) <= 3, "{after:?}");
    for dead in ["n1", "n5", "n2", "n8"] {
        d.handle(
            Event::NodeLost {
                node: dead.into(),
                reason: "gone".into(),
            },
            t0,
        );
        assert!(
            most_children(&d) <= 3,
            "after {dead}: {:?}",
            d.round_parents()
        );
    }
    // Every node still receiving reads from a node still serving, and no cycle.
    let now = d.round_parents();
    for (n, p) in &now {
        if let Some(p) = p {
            assert!(
                now.iter().any(|(m, _)| m == p),
                "{n} reads from {p}, gone: {now:?}"
            );
        }
    }
}

#[test]
fn a_starved_node_is_not_dead_its_children_stay_and_a_suspect_gets_no_children() {
    // Chain n1 -> n2 -> n3 -> n4 -> n5; n2 freezes (no word from its control connection).
    let (mut d, t0) = in_round(5, Arity::Chain);
    // n3 stalls first: it moves to n1, and n2 is suspect.
    let a = d.handle(
        Event::ParentLost {
            node: "n3".into(),
            parent: Some("n2".into()),
        },
        t0 + secs(30),
    );
    assert_eq!(
        a,
        vec![Action::Reparent {
            round: 1,
            node: "n3".into(),
            parent: Some("n1".into())
        }]
    );
    // n4 stalls next, starved by n3: it stays with n3 (reconnects), the chain keeps its shape.
    let a = d.handle(
        Event::ParentLost {
            node: "n4".into(),
            parent: Some("n3".into()),
        },
        t0 + secs(31),
    );
    assert_eq!(
        a,
        vec![Action::Reparent {
            round: 1,
            node: "n4".into(),
            parent: Some("n3".into())
        }]
    );
    assert_eq!(
        d.round_parents(),
        vec![
            ("n1", None),
            ("n2", Some("n1")),
            ("n3", Some("n1")),
            ("n4", Some("n3")),
            ("n5", Some("n4"))
        ]
    );
    // Much later n4 says n3 is silent again: n3 is not starving any more, so it is suspect
    // and n4 moves: never under the suspect n2 (which has room), and n1 is full (n2, n3): to
    // the coordinator.
    let a = d.handle(
        Event::ParentLost {
            node: "n4".into(),
            parent: Some("n3".into()),
        },
        t0 + secs(200),
    );
    assert_eq!(
        a,
        vec![Action::Reparent {
            round: 1,
            node: "n4".into(),
            parent: None
        }]
    );
    let a = d.handle(
        Event::ParentLost {
            node: "n5".into(),
            parent: Some("n4".into()),
        },
        t0 + secs(201),
    );
    assert_eq!(
        a,
        vec![Action::Reparent {
            round: 1,
            node: "n5".into(),
            parent: Some("n4".into())
        }]
    );
}

#[test]
fn parent_lost_moves_the_node_to_its_grandparent_and_a_stale_one_is_ignored() {
    let mut settings = settings(WorkflowConfig::default());
    settings.arity = Arity::Chain;
    let t0 = Instant::now();
    let names: Vec<String> = (1..=3).map(|i| format!("n{i}")).collect();
    let mut d = Deployment::new(names.clone(), settings, t0);
    d.start(t0);
    let mut actions = Vec::new();
    for n in &names {
        d.handle(
            Event::PxeWritten {
                node: n.clone(),
                result: Ok(()),
            },
            t0,
        );
    }
    for id in 1..=3 {
        d.handle(
            Event::CommandDone {
                node: String::new(),
                id: CommandId(id),
                status: CommandStatus::Exited(0),
            },
            t0,
        );
    }
    for n in &names {
        d.handle(Event::AgentHello { node: n.clone() }, t0);
    }
    for n in &names {
        actions.extend(d.handle(
            Event::StepDone {
                node: n.clone(),
                step: Step::Prepare,
                result: Ok(()),
            },
            t0,
        ));
    }
    assert!(actions.iter().any(|a| matches!(a, Action::StartBroadcast { parents, .. } if parents == &vec![None, Some(0), Some(1)])));
    assert_eq!(
        d.round_parents(),
        vec![("n1", None), ("n2", Some("n1")), ("n3", Some("n2"))]
    );
    // n3 lost n2 (a stall): it reads from n1 now.
    let a = d.handle(
        Event::ParentLost {
            node: "n3".into(),
            parent: Some("n2".into()),
        },
        t0,
    );
    assert_eq!(
        a,
        vec![Action::Reparent {
            round: 1,
            node: "n3".into(),
            parent: Some("n1".into())
        }]
    );
    // A late word about n2 again changes nothing.
    assert!(d
        .handle(
            Event::ParentLost {
                node: "n3".into(),
                parent: Some("n2".into())
            },
            t0
        )
        .is_empty());
    // n3 lost the coordinator's stream? It is not its upstream: ignored as well... but losing
    // its current parent n1 sends it to the coordinator.
    let a = d.handle(
        Event::ParentLost {
            node: "n3".into(),
            parent: Some("n1".into()),
        },
        t0,
    );
    assert_eq!(
        a,
        vec![Action::Reparent {
            round: 1,
            node: "n3".into(),
            parent: None
        }]
    );
    assert_eq!(d.receiving(), vec!["n1", "n2", "n3"]);
}

/// A chain n1 -> n2 -> n3 of a deployment, its round started.
fn chain_of_three_in_a_round() -> (Deployment, Instant) {
    let (d, t0) = in_round(3, Arity::Chain);
    assert_eq!(
        d.round_parents(),
        vec![("n1", None), ("n2", Some("n1")), ("n3", Some("n2"))]
    );
    (d, t0)
}

/// `node`'s copy failed (a full disk), every chunk verified.
fn copy_failed(node: &str) -> Event {
    Event::CopyFailed {
        node: node.into(),
        reason: "broadcast failed: no space left on device".into(),
    }
}

/// The actions start `node` over from the deploy environment (its failure counted, retried).
fn retried(actions: &[Action], node: &str) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::WritePxe { node: n, .. } if n == node))
}

fn about(actions: &[Action], node: &str) -> bool {
    format!("{actions:?}").contains(&format!("\"{node}\""))
}

#[test]
fn a_relay_whose_copy_failed_serves_its_children_before_it_fails() {
    let (mut d, t0) = chain_of_three_in_a_round();
    // n2's disk is full, n3 still reads from it: nobody moves, n2's failure waits.
    let a = d.handle(copy_failed("n2"), t0);
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(d.receiving(), vec!["n1", "n3"]);
    let late = t0 + Duration::from_secs(5);
    let a = d.handle(
        Event::StepDone {
            node: "n1".into(),
            step: Step::Broadcast,
            result: Ok(()),
        },
        late,
    );
    assert!(!about(&a, "n2"), "{a:?}");
    // n3 has it all: n2's failure counts now (a retry: back to the deploy environment).
    let a = d.handle(
        Event::StepDone {
            node: "n3".into(),
            step: Step::Broadcast,
            result: Ok(()),
        },
        late,
    );
    assert!(retried(&a, "n2"), "{a:?}");
    assert!(
        !a.iter().any(|x| matches!(x, Action::Reparent { .. })),
        "{a:?}"
    );
}

#[test]
fn a_relay_whose_finish_failed_serves_its_children_before_it_fails() {
    let (mut d, t0) = chain_of_three_in_a_round();
    // n1 has the image and finishes its disk while n2 and n3 still read through it.
    for step in [Step::Broadcast, Step::Finish] {
        let result = match step {
            Step::Finish => Err("finishing the disk failed: grub-install: exit 1".to_string()),
            _ => Ok(()),
        };
        let a = d.handle(
            Event::StepDone {
                node: "n1".into(),
                step,
                result,
            },
            t0,
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::Reparent { .. })),
            "{a:?}"
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::WritePxe { .. })),
            "{a:?}"
        );
    }
    assert_eq!(d.receiving(), vec!["n2", "n3"]);
    assert_eq!(d.round_parent("n2"), Some("n1"));
    for n in ["n2", "n3"] {
        let a = d.handle(
            Event::StepDone {
                node: n.into(),
                step: Step::Broadcast,
                result: Ok(()),
            },
            t0,
        );
        let released = retried(&a, "n1");
        // Released (a retry from the deploy environment) once the last reader has it all.
        assert_eq!(released, n == "n3", "{n}: {a:?}");
    }
}

#[test]
fn a_leaf_whose_copy_failed_fails_at_once_and_a_lost_held_relay_keeps_its_reason() {
    let (mut d, t0) = chain_of_three_in_a_round();
    // The leaf n3: nobody reads from it.
    let a = d.handle(copy_failed("n3"), t0);
    assert!(retried(&a, "n3"), "{a:?}");
    // n2, held for n3's sake, then loses its agent: it fails with its copy's reason, and n3
    // (the broadcast no longer needs it) is not moved.
    let (mut d, t0) = chain_of_three_in_a_round();
    d.handle(copy_failed("n2"), t0);
    let a = d.handle(
        Event::NodeLost {
            node: "n2".into(),
            reason: "connection closed".into(),
        },
        t0,
    );
    assert!(retried(&a, "n2"), "{a:?}");
    assert_eq!(d.round_parent("n3"), Some("n1"), "{a:?}");
}

#[test]
fn broadcast_failure_retries_in_next_round() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(3);
    s[0].broadcast_fails = 1;
    let out = run(s, p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok.len(), 3);
    assert_eq!(out.summary.rounds, 2);
    let rounds: Vec<(u32, Vec<String>)> = out
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::StartBroadcast { round, nodes, .. } => Some((*round, nodes.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rounds,
        vec![
            (1, vec!["node1".into(), "node2".into(), "node3".into()]),
            (2, vec!["node1".into()])
        ]
    );
    let r = out.report("node1");
    assert_eq!(r.steps[2].attempts, 2);
    assert_eq!(r.steps[2].duration, secs(80));
}

#[test]
fn late_node_joins_a_second_round() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(3);
    s[2].boot = 200; // ready 185 s after the others; broadcast_wait is 120 s
    let out = run(s, p.clone());
    check_bound(&out, &p, 3);
    assert_eq!(out.summary.ok.len(), 3);
    assert_eq!(out.summary.rounds, 2);
    // Round 1 started at 21 + 120 = 141 s, ran 40 s; node3 was ready at 206 s.
    assert_eq!(out.report("node1").barrier_wait, secs(120));
    assert_eq!(out.report("node3").barrier_wait, secs(0));
    assert_eq!(out.report("node3").total, secs(201 + 5 + 40 + 5 + 45));
}

#[test]
fn boot_new_env_escalates_when_the_agent_reboot_does_nothing() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(2);
    s[0].agent_reboot_works = false;
    s[1].os_boot = None; // the deployed system never answers
    let out = run(s, p.clone());
    check_bound(&out, &p, 2);
    let r = out.report("node1");
    assert!(r.is_ok());
    assert_eq!(r.steps[4].reboots, vec![Level::Soft, Level::Hard]);
    assert_eq!(r.steps[4].duration, secs(300 + 1 + 45));
    let r = out.report("node2");
    assert_eq!(
        r.result,
        NodeResult::Failed {
            step: Step::BootNewEnv,
            reason: "the deployed system did not answer within 300 s after a very_hard reboot"
                .into()
        }
    );
    assert_eq!(
        r.steps[4].reboots,
        vec![Level::Soft, Level::Hard, Level::VeryHard]
    );
}

/// The BootNewEnv actions of one node, as words: `kexec`/`agent reboot` through the agent,
/// `LEVEL command` for a reboot command (after the local-disk profile was written).
fn boot_new_env_actions(out: &Outcome, node: &str) -> Vec<String> {
    let start = out
        .actions
        .iter()
        .position(|(_, a)| {
            matches!(a, Action::WritePxe { node: n, profile: PxeKind::LocalDisk } if n == node)
        })
        .expect("no local-disk profile");
    out.actions[start..]
        .iter()
        .filter_map(|(_, a)| match a {
            Action::RebootAgent { node: n, kexec, .. } if n == node => {
                Some(if *kexec { "kexec" } else { "agent reboot" }.to_string())
            }
            Action::RunCommand { node: n, level, .. } if n == node => {
                Some(format!("{level} command"))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn kexec_boots_the_deployed_kernel_without_the_firmware() {
    let p = WorkflowConfig::default();
    let settings = kexec_settings(p.clone());
    let out = SimCluster::new(ok_scripts(2), settings.clone()).run(None);
    check_bound_with(&out, &settings, 2);
    assert_eq!(out.summary.ok, vec!["node1", "node2"]);
    for node in ["node1", "node2"] {
        let r = out.report(node);
        let b = &r.steps[4];
        assert_eq!(b.step, Step::BootNewEnv);
        assert!(b.ok && b.kexec, "{b:?}");
        assert_eq!(b.attempts, 1);
        assert_eq!(b.reboots, vec![Level::Soft]);
        // The kernel answers 20 s after the kexec; probes at +10, +15, +20 s.
        assert_eq!(b.duration, secs(20));
        assert_eq!(boot_new_env_actions(&out, node), vec!["kexec"]);
        // SetDeploymentEnv's reboot is a reboot whatever `boot` says.
        assert!(!r.steps[0].kexec);
    }
    // The same cluster with `boot: reboot` takes the firmware's 45 s.
    let out = run(ok_scripts(2), p);
    let b = &out.report("node1").steps[4];
    assert!(!b.kexec);
    assert_eq!(b.duration, secs(45));
    assert_eq!(boot_new_env_actions(&out, "node1"), vec!["agent reboot"]);
    // The record says so in JSON.
    let settings_json = SimCluster::new(ok_scripts(1), settings).run(None);
    let j = settings_json.summary.to_json();
    assert_eq!(j["nodes"][0]["steps"][4]["kexec"], true);
    assert_eq!(j["nodes"][0]["steps"][0]["kexec"], false);
}

#[test]
fn a_kexec_that_fails_to_load_is_the_agents_own_reboot() {
    let p = WorkflowConfig::default();
    let settings = kexec_settings(p);
    let mut s = ok_scripts(1);
    s[0].kexec = KexecSim::FallsBack;
    let out = SimCluster::new(s, settings.clone()).run(None);
    check_bound_with(&out, &settings, 1);
    let b = &out.report("node1").steps[4];
    assert!(b.ok && b.kexec);
    // The firmware's boot, and no command: the agent rebooted by itself.
    assert_eq!(b.duration, secs(45));
    assert_eq!(boot_new_env_actions(&out, "node1"), vec!["kexec"]);
}

/// A kexec'd kernel that never answers gets the reboot commands from soft up, in the same
/// attempt (no BootNewEnv retry needed), after `boot_new_env`'s timeout.
#[test]
fn a_hung_kexec_gets_the_reboot_commands_from_soft() {
    let p = WorkflowConfig {
        boot_new_env: StepPolicy {
            timeout: 300,
            retries: 0,
        },
        ..WorkflowConfig::default()
    };
    let settings = kexec_settings(p.clone());
    let mut s = ok_scripts(2);
    s[0].kexec = KexecSim::Hangs;
    s[1].kexec = KexecSim::Hangs;
    s[1].min_level = Some(Level::Hard); // the soft command does not help node2
    s[1].cmd_fails = vec![Level::Soft];
    let out = SimCluster::new(s, settings.clone()).run(None);
    check_bound_with(&out, &settings, 2);
    assert_eq!(out.summary.ok, vec!["node1", "node2"]);
    let b = &out.report("node1").steps[4];
    assert!(b.ok && b.kexec);
    assert_eq!(b.attempts, 1);
    assert_eq!(b.reboots, vec![Level::Soft, Level::Soft]);
    // 300 s waiting for the kexec'd kernel, the 1 s soft command, the firmware's 45 s.
    assert_eq!(b.duration, secs(300 + 1 + 45));
    assert_eq!(
        boot_new_env_actions(&out, "node1"),
        vec!["kexec", "soft command"]
    );
    // node2: the soft command fails, hard at once.
    let b = &out.report("node2").steps[4];
    assert!(b.ok);
    assert_eq!(b.reboots, vec![Level::Soft, Level::Soft, Level::Hard]);
    assert_eq!(b.duration, secs(300 + 1 + 1 + 45));
    assert_eq!(
        boot_new_env_actions(&out, "node2"),
        vec!["kexec", "soft command", "hard command"]
    );

    // Every level hangs: the node fails with the last reboot named, in bounded time.
    let mut s = ok_scripts(1);
    s[0].kexec = KexecSim::Hangs;
    s[0].os_boot = None;
    let out = SimCluster::new(s, settings.clone()).run(None);
    check_bound_with(&out, &settings, 1);
    let r = out.report("node1");
    assert_eq!(
        r.result,
        NodeResult::Failed {
            step: Step::BootNewEnv,
            reason: "the deployed system did not answer within 300 s after a soft reboot".into()
        }
    );
    assert_eq!(
        boot_new_env_actions(&out, "node1"),
        vec!["kexec", "soft command"]
    );

    // With retries, the retry goes on above soft (hard, very_hard): the kexec is not asked again.
    let settings = kexec_settings(WorkflowConfig::default());
    let mut s = ok_scripts(1);
    s[0].kexec = KexecSim::Hangs;
    s[0].os_boot = None;
    let out = SimCluster::new(s, settings.clone()).run(None);
    check_bound_with(&out, &settings, 1);
    assert!(!out.report("node1").is_ok());
    assert_eq!(
        boot_new_env_actions(&out, "node1"),
        vec!["kexec", "soft command", "hard command", "very_hard command"]
    );
}

/// No soft command in the cluster: after a hung kexec, hard; an agent that cannot be told
/// (gone before its kexec) gets the commands at once.
#[test]
fn after_a_kexec_without_a_soft_command_hard_comes_first() {
    let p = WorkflowConfig::default();
    let settings = Settings {
        reboot_levels: vec![Level::Hard, Level::VeryHard],
        ..kexec_settings(p)
    };
    let mut s = ok_scripts(1);
    s[0].kexec = KexecSim::Hangs;
    let out = SimCluster::new(s, settings.clone()).run(None);
    check_bound_with(&out, &settings, 1);
    let b = &out.report("node1").steps[4];
    assert!(b.ok);
    assert_eq!(b.reboots, vec![Level::Soft, Level::Hard]);
    assert_eq!(
        boot_new_env_actions(&out, "node1"),
        vec!["kexec", "hard command"]
    );

    // The driver could not tell the agent: the commands at once, no wait.
    let t0 = Instant::now();
    let mut d = Deployment::new(
        vec!["n".into()],
        kexec_settings(WorkflowConfig::default()),
        t0,
    );
    d.start(t0);
    let id = |a: &[Action]| {
        a.iter().find_map(|a| match a {
            Action::RunCommand { id, .. } | Action::RebootAgent { id, .. } => Some(*id),
            _ => None,
        })
    };
    let mut now = t0;
    let a = d.handle(
        Event::PxeWritten {
            node: "n".into(),
            result: Ok(()),
        },
        now,
    );
    let c = id(&a).unwrap();
    d.handle(
        Event::CommandDone {
            node: "n".into(),
            id: c,
            status: CommandStatus::Exited(0),
        },
        now,
    );
    d.handle(Event::AgentHello { node: "n".into() }, now);
    now += secs(5);
    // Nobody else to wait for: the round starts at once.
    let a = d.handle(
        Event::StepDone {
            node: "n".into(),
            step: Step::Prepare,
            result: Ok(()),
        },
        now,
    );
    assert!(
        a.iter().any(|a| matches!(a, Action::StartBroadcast { .. })),
        "{a:?}"
    );
    d.handle(
        Event::StepDone {
            node: "n".into(),
            step: Step::Broadcast,
            result: Ok(()),
        },
        now,
    );
    let a = d.handle(
        Event::StepDone {
            node: "n".into(),
            step: Step::Finish,
            result: Ok(()),
        },
        now,
    );
    assert!(
        a.contains(&Action::WritePxe {
            node: "n".into(),
            profile: PxeKind::LocalDisk
        }),
        "{a:?}"
    );
    let a = d.handle(
        Event::PxeWritten {
            node: "n".into(),
            result: Ok(()),
        },
        now,
    );
    let Some(Action::RebootAgent {
        id, kexec: true, ..
    }) = a
        .iter()
        .find(|a| matches!(a, Action::RebootAgent { .. }))
        .cloned()
    else {
        panic!("no kexec asked: {a:?}");
    };
    let a = d.handle(
        Event::CommandDone {
            node: "n".into(),
            id,
            status: CommandStatus::Failed("no agent connection to reboot".into()),
        },
        now,
    );
    assert!(
        a.iter().any(|a| matches!(
            a,
            Action::RunCommand {
                level: Level::Soft,
                ..
            }
        )),
        "{a:?}"
    );
}

#[test]
fn reboot_window_is_respected() {
    let p = WorkflowConfig {
        reboot_window: 10,
        ..WorkflowConfig::default()
    };
    let mut s = ok_scripts(50);
    for sc in &mut s {
        sc.cmd = 30;
    }
    let out = run(s, p.clone());
    check_bound(&out, &p, 50);
    assert_eq!(out.max_in_flight, 10);
    assert_eq!(out.summary.ok.len(), 50);
    // Five waves of 30 s commands: the last node said Hello at 150 + 15 s.
    let last_hello = out
        .reports
        .values()
        .map(|r| r.steps[0].duration)
        .max()
        .unwrap();
    assert_eq!(last_hello, secs(165));
}

#[test]
fn abort_ends_everything() {
    let p = WorkflowConfig::default();
    let out = SimCluster::new(ok_scripts(4), settings(p.clone())).run(Some(30));
    assert_eq!(out.summary.ok.len(), 0);
    assert_eq!(out.summary.ko.len(), 4);
    assert_eq!(out.summary.elapsed, secs(30));
    assert!(out
        .summary
        .ko
        .iter()
        .all(|(_, step, reason)| *step == Step::Broadcast && reason == "aborted: operator"));
    assert_eq!(
        out.count(|a| matches!(
            a,
            Action::CancelStep {
                step: Step::Broadcast,
                ..
            }
        )),
        4
    );
}

#[test]
fn stale_and_unknown_events_are_ignored() {
    let t0 = Instant::now();
    let mut d = Deployment::new(
        vec!["a".into(), "a".into()],
        settings(WorkflowConfig::default()),
        t0,
    );
    assert_eq!(d.nodes().count(), 1);
    assert!(d
        .handle(Event::AgentHello { node: "a".into() }, t0)
        .is_empty());
    let acts = d.start(t0);
    assert_eq!(acts.len(), 2);
    assert!(d.start(t0).is_empty());
    for e in [
        Event::AgentHello { node: "zz".into() },
        Event::PortOpen { node: "a".into() },
        Event::StepDone {
            node: "a".into(),
            step: Step::Finish,
            result: Ok(()),
        },
        Event::CommandDone {
            node: "a".into(),
            id: CommandId(99),
            status: CommandStatus::Exited(0),
        },
        Event::NodeLost {
            node: "a".into(),
            reason: "rebooting".into(),
        },
    ] {
        assert!(d.handle(e, t0).is_empty());
    }
    assert_eq!(d.node_step("a"), Some((Step::SetDeploymentEnv, false)));
    // Hello even before the profile is acknowledged: straight to Prepare.
    let acts = d.handle(Event::AgentHello { node: "a".into() }, t0);
    assert!(acts.contains(&Action::SendPrepare { node: "a".into() }));
    assert_eq!(d.node_step("a"), Some((Step::Prepare, false)));
    assert_eq!(d.progress().in_step, [0, 1, 0, 0, 0]);
}

#[test]
fn pxe_write_failure_is_retried_then_fails() {
    let t0 = Instant::now();
    let mut d = Deployment::new(vec!["a".into()], settings(WorkflowConfig::default()), t0);
    d.start(t0);
    let mut writes = 1;
    for _ in 0..3 {
        let acts = d.handle(
            Event::PxeWritten {
                node: "a".into(),
                result: Err("disk full".into()),
            },
            t0,
        );
        writes += acts
            .iter()
            .filter(|a| matches!(a, Action::WritePxe { .. }))
            .count();
    }
    assert_eq!(writes, 3);
    assert!(d.is_finished());
    assert_eq!(d.poll_timeout(), None);
}

/// xorshift64*: a tiny deterministic generator for the randomised runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn random_script(rng: &mut Rng) -> Script {
    let level = |rng: &mut Rng| Level::ALL[rng.below(3) as usize];
    let mut s = Script {
        cmd: 1 + rng.below(20),
        boot: 5 + rng.below(400),
        prepare: 1 + rng.below(150),
        broadcast: 10 + rng.below(1000),
        finish: 1 + rng.below(400),
        os_boot: Some(5 + rng.below(400)),
        ..Script::default()
    };
    if rng.chance(10) {
        s.cmd_hangs.push(level(rng));
    }
    if rng.chance(10) {
        s.cmd_fails.push(level(rng));
    }
    if rng.chance(10) {
        s.min_level = None;
    } else if rng.chance(20) {
        s.min_level = Some(level(rng));
    }
    s.agent_reboot_works = !rng.chance(10);
    s.prepare_fails = rng.below(3) as u32;
    s.prepare_hangs = rng.chance(5);
    if rng.chance(10) {
        s.lost_in_broadcast = Some(rng.below(900));
    }
    s.broadcast_fails = rng.below(3) as u32;
    s.finish_fails = rng.below(3) as u32;
    if rng.chance(10) {
        s.os_boot = None;
    }
    s
}

#[test]
fn timeouts_are_bounded_whatever_the_nodes_do() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..40 {
        let n = 1 + rng.below(40) as usize;
        let p = WorkflowConfig {
            reboot_window: 1 + rng.below(12) as usize,
            broadcast_wait: rng.below(300),
            ..WorkflowConfig::default()
        };
        let scripts: Vec<Script> = (0..n).map(|_| random_script(&mut rng)).collect();
        let out = run(scripts.clone(), p.clone());
        check_bound(&out, &p, n);
        for (i, sc) in scripts.iter().enumerate() {
            let r = out.report(&format!("node{}", i + 1));
            // Nodes whose every step can only fail never report success.
            if sc.min_level.is_none() || sc.prepare_hangs || sc.lost_in_broadcast.is_some() {
                assert!(!r.is_ok(), "case {case}: {r:?}");
            }
            for rec in &r.steps {
                assert!(rec.duration <= out.summary.elapsed);
            }
        }
    }
}

#[test]
fn three_hundred_nodes() {
    let mut rng = Rng(42);
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(300);
    for sc in s.iter_mut() {
        sc.boot = 10 + rng.below(60);
        sc.cmd = 1 + rng.below(5);
    }
    s[7].min_level = None;
    s[100].prepare_fails = 1;
    s[200].lost_in_broadcast = Some(10);
    s[250].cmd_fails = vec![Level::Soft];
    let started = std::time::Instant::now();
    let out = run(s, p.clone());
    let wall = started.elapsed();
    check_bound(&out, &p, 300);
    assert_eq!(out.summary.ok.len(), 298);
    assert_eq!(
        out.summary
            .ko
            .iter()
            .map(|k| k.0.as_str())
            .collect::<Vec<_>>(),
        vec!["node8", "node201"]
    );
    assert_eq!(out.max_in_flight, 10);
    assert!(out.report("node251").is_ok());
    assert!(wall < Duration::from_secs(5), "took {wall:?}");
    eprintln!(
        "300 nodes: {} iterations, {} actions, virtual {:?}, wall {:?}",
        out.iterations,
        out.actions.len(),
        out.summary.elapsed,
        wall
    );
}

#[test]
fn a_chain_of_a_thousand_reboots_its_relays_only_when_the_last_node_has_the_image() {
    let p = WorkflowConfig::default();
    let mut scripts = ok_scripts(1000);
    for (k, s) in scripts.iter_mut().enumerate() {
        s.broadcast = 40 + k as u64 / 10; // the deeper, the later
    }
    let mut settings = settings(p.clone());
    settings.arity = Arity::Chain;
    let out = SimCluster::new(scripts, settings).run(None);
    check_bound(&out, &p, 1000);
    assert_eq!(out.summary.ok.len(), 1000);
    // Every relay's reboot waited for the last node's report (the sim checks the rule itself
    // at every reboot): the first reboot is 40 + 99 s after the round started.
    let at = |f: &dyn Fn(&Action) -> bool| out.actions.iter().find(|(_, a)| f(a)).map(|(t, _)| *t);
    let start = at(&|a| matches!(a, Action::StartBroadcast { .. })).unwrap();
    let first = at(&|a| matches!(a, Action::RebootAgent { .. })).unwrap();
    assert_eq!(first, start + secs(40 + 99));
    assert_eq!(out.summary.rounds, 1);
}

#[test]
fn time_bound_grows_with_retries_and_window() {
    let p = WorkflowConfig::default();
    let b1 = Deployment::time_bound(&settings(p.clone()), 10);
    let b2 = Deployment::time_bound(&settings(p.clone()), 1000);
    assert!(b2 > b1);
    let mut q = p.clone();
    q.prepare.retries += 1;
    assert!(Deployment::time_bound(&settings(q), 10) > b1);
    // A retry of Broadcast starts the node over: more passes, a longer bound.
    let mut q = p.clone();
    q.broadcast.retries += 1;
    assert!(Deployment::time_bound(&settings(q), 10) > b1);
    // The default bound for 3 nodes, in minutes: every step's every retry, each retry of
    // Prepare, Broadcast or Finish going through a fresh deploy boot.
    let m = Deployment::time_bound(&settings(p), 3).as_secs() / 60;
    assert!((200..400).contains(&m), "{m} min");
}

#[test]
fn final_table_stats_and_json() {
    let p = WorkflowConfig::default();
    let mut s = ok_scripts(3);
    s[1].min_level = None;
    s[2].prepare_fails = 1;
    let out = run(s, p);
    assert_eq!(
        out.summary.table(),
        "\
node   result  SetDeploymentEnv  Prepare  Broadcast  Finish  BootNewEnv  retries  total  reason
node1  ok                  16.0      5.0      160.0     5.0        45.0        0  231.0
node2  ko                 903.0        -          -       -           -        2  903.0  SetDeploymentEnv: no agent Hello within 300 s after a very_hard reboot
node3  ok                  16.0     10.0      155.0     5.0        45.0        1  231.0
2 ok, 1 ko, 903.0 s, 1 broadcast round(s)
"
    );
    let stats = out.summary.step_stats();
    assert_eq!(stats.len(), 5);
    assert_eq!(
        stats[0],
        StepStats {
            step: Step::SetDeploymentEnv,
            nodes: 3,
            failed: 1,
            retries: 2,
            mean_secs: 16.0,
            max_secs: 16.0
        }
    );
    assert_eq!(stats[1].retries, 1);
    assert_eq!(stats[1].nodes, 2);
    let j = out.summary.to_json();
    assert_eq!(j["ok"], serde_json::json!(["node1", "node3"]));
    assert_eq!(j["ko"][0]["node"], "node2");
    assert_eq!(
        j["nodes"][1]["steps"][0]["reboots"],
        serde_json::json!(["soft", "hard", "very_hard"])
    );
    assert_eq!(j["nodes"][2]["steps"][1]["attempts"], 2);
    assert_eq!(j["elapsed_secs"], 903.0);
}

#[test]
fn ten_thousand_nodes() {
    let mut rng = Rng(7);
    let p = WorkflowConfig {
        reboot_window: 100,
        ..WorkflowConfig::default()
    };
    let mut s = ok_scripts(10_000);
    for sc in s.iter_mut() {
        sc.boot = 10 + rng.below(200);
        if rng.chance(1) {
            sc.min_level = None;
        }
    }
    let started = std::time::Instant::now();
    let out = run(s, p.clone());
    let wall = started.elapsed();
    check_bound(&out, &p, 10_000);
    assert_eq!(out.max_in_flight, 100);
    eprintln!(
        "10000 nodes: {} ok, {} actions, virtual {:?}, wall {:?}",
        out.summary.ok.len(),
        out.actions.len(),
        out.summary.elapsed,
        wall
    );
    assert!(wall < Duration::from_secs(20), "took {wall:?}");
}

#[test]
fn settings_from_a_cluster_config() {
    let cfg = ClusterConfig::parse(
        "\
cluster: c
nodes:
  - {name: n1, address: 10.0.0.1, mac: '02:00:00:00:00:01'}
  - {name: n2, address: 10.0.0.2, mac: '02:00:00:00:00:02'}
pxe: {tftp_root: /t, profile_naming: hostname, method: pxelinux}
commands:
  reboot: {hard: bmc HOSTNAME reset, very_hard: bmc HOSTNAME cycle}
coordinator: {address: 10.0.0.254, port: 7000}
disk: /dev/sda
workflow: {reboot_window: 1, set_deployment_env: {timeout: 60, retries: 0}}
",
    )
    .unwrap();
    let settings = Settings::from_config(&cfg, Arity::Chain);
    assert_eq!(settings.reboot_levels, vec![Level::Hard, Level::VeryHard]);
    assert_eq!(settings.policy.reboot_window, 1);
    let t0 = Instant::now();
    let names: Vec<String> = cfg.nodes.iter().map(|n| n.name.clone()).collect();
    let mut d = Deployment::new(names, settings, t0);
    d.start(t0);
    // No soft template: the first reboot is hard, and only one at a time.
    let a = d.handle(
        Event::PxeWritten {
            node: "n1".into(),
            result: Ok(()),
        },
        t0,
    );
    assert_eq!(
        a,
        vec![Action::RunCommand {
            node: "n1".into(),
            id: CommandId(1),
            op: Operation::Reboot,
            level: Level::Hard
        }]
    );
    let a = d.handle(
        Event::PxeWritten {
            node: "n2".into(),
            result: Ok(()),
        },
        t0,
    );
    assert!(a.is_empty(), "window of 1: n2 waits");
    let a = d.handle(
        Event::CommandDone {
            node: "n1".into(),
            id: CommandId(1),
            status: CommandStatus::Exited(0),
        },
        t0 + secs(2),
    );
    assert_eq!(
        a,
        vec![Action::RunCommand {
            node: "n2".into(),
            id: CommandId(2),
            op: Operation::Reboot,
            level: Level::Hard
        }]
    );
    // n1 has 60 s after its command for its Hello, then fails (no retries); n2's command hangs
    // and is killed at the same time, so n2 escalates to very_hard.
    assert_eq!(d.poll_timeout(), Some(t0 + secs(62)));
    let a = d.handle_timeout(t0 + secs(62));
    assert!(
        matches!(
            &a[..],
            [
                Action::NodeDone { node, .. },
                Action::KillCommand { id: CommandId(2), .. },
                Action::RunCommand { level: Level::VeryHard, id: CommandId(3), .. },
            ] if node == "n1"
        ),
        "{a:?}"
    );
}

/// Settings that skipped validation (huge timeouts and retries, as a library caller could
/// pass): every step and the time bound work with them instead of panicking on `Instant +
/// Duration` or `Duration * n` overflow.
#[test]
fn huge_unvalidated_timeouts_do_not_overflow_the_clock() {
    let huge = StepPolicy {
        timeout: u64::MAX,
        retries: u32::MAX,
    };
    let s = settings(WorkflowConfig {
        reboot_window: usize::MAX,
        command_timeout: u64::MAX,
        probe_delay: u64::MAX,
        probe_interval: u64::MAX,
        broadcast_wait: u64::MAX,
        stall_floor: u64::MAX,
        stall_timeout: u64::MAX,
        agent_silence: u64::MAX,
        set_deployment_env: huge,
        prepare: huge,
        broadcast: huge,
        finish: huge,
        boot_new_env: huge,
    });
    assert!(Deployment::time_bound(&s, 1000) > secs(100 * 365 * 86_400));
    let t0 = Instant::now();
    let names = vec!["n1".to_string(), "n2".to_string()];
    let mut d = Deployment::new(names, s, t0);
    d.start(t0);
    let n1 = || "n1".to_string();
    d.handle(
        Event::PxeWritten {
            node: n1(),
            result: Ok(()),
        },
        t0,
    );
    d.handle(
        Event::CommandDone {
            node: n1(),
            id: CommandId(1),
            status: CommandStatus::Exited(0),
        },
        t0,
    );
    d.handle(Event::AgentHello { node: n1() }, t0);
    d.handle(
        Event::StepDone {
            node: n1(),
            step: Step::Prepare,
            result: Ok(()),
        },
        t0,
    );
    // n1 waits at the barrier (n2 still reboots): the barrier's timer is far away, as are the
    // others; nothing fires within a year.
    let next = d.poll_timeout().expect("timers are set");
    assert!(next > t0 + secs(365 * 86_400), "{next:?}");
    assert!(d.handle_timeout(t0 + secs(365 * 86_400)).is_empty());
    assert_eq!(d.node_step("n1"), Some((Step::Broadcast, false)));
    // An abort still ends every node.
    let a = d.handle(
        Event::Abort {
            reason: "test".into(),
        },
        t0,
    );
    assert!(
        a.iter().any(|x| matches!(x, Action::Finished { .. })),
        "{a:?}"
    );
}

#[test]
fn a_repair_goes_to_the_closest_node_that_still_holds_the_chunk() {
    use super::repair_holder;
    let nodes = [("n1", 30u32), ("n2", 12), ("n3", 9), ("n4", 5), ("n5", 13)];
    // Chunk 7: n4 lacks it; n3 (9) is the closest holder; n1 is too far ahead.
    assert_eq!(repair_holder(7, nodes, 8), Some("n3"));
    // Chunk 9: n3 has 9 chunks (0..=8), not chunk 9; n2 and n5 are within 8.
    assert_eq!(repair_holder(9, nodes, 8), Some("n2"));
    // Chunk 20: only n1 has it, 10 chunks ahead: likely gone from its window.
    assert_eq!(repair_holder(20, nodes, 8), None);
    assert_eq!(repair_holder(20, nodes, 10), Some("n1"));
    // Ties go by name; nobody at all: the coordinator.
    assert_eq!(repair_holder(3, [("b", 6), ("a", 6)], 8), Some("a"));
    assert_eq!(repair_holder(0, [], 8), None);
}

#[test]
fn orphans_that_report_their_parent_lost_keep_the_tree_s_shape() {
    // Binary: n2's children are n5, n6; n5's are n11, n12. n5 dies; its children notice
    // before the coordinator does. The first takes n5's place under n2, the second reads from
    // it: no node gets a third child (n6 would, if the second went breadth first).
    let (mut d, t0) = in_round(14, Arity::Kary(2));
    for (i, n) in ["n11", "n12"].iter().enumerate() {
        d.handle(
            Event::ParentLost {
                node: (*n).into(),
                parent: Some("n5".into()),
            },
            t0 + secs(5 + i as u64),
        );
    }
    let parent: HashMap<&str, Option<&str>> = d.round_parents().into_iter().collect();
    assert_eq!(parent["n11"], Some("n2"));
    assert_eq!(parent["n12"], Some("n11"));
    assert_eq!(parent["n13"], Some("n6"));
    assert!(most_children(&d) <= 3, "{parent:?}");
    let kids = |p: &str| parent.values().filter(|v| **v == Some(p)).count();
    assert_eq!(kids("n6"), 2);
}
