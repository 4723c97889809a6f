//! Automatic arity: the broadcast tree chosen from what the nodes measured.
//!
//! Before an `auto` round the coordinator has every node measure two rates (the probe, see
//! [`crate::msg::Probe`]): its **link**, by fetching a few MiB from the next node of a ring
//! ([`ring`]; all fetches run at once, each link carries one probe each way), and its
//! **disk**, by writing and syncing a few MiB where the image will go. [`node_links`] turns
//! the ring's measures into one rate per node; [`plan_auto`] plans the tree.
//!
//! The model behind [`plan_auto`] (rates in bytes per second of the compressed image):
//! * A node receives at most at `e = min(link, disk × compressed/raw)`; a relay with `k`
//!   children sends each at most `link / k`. A relay's window couples its children (a slow
//!   child holds its siblings, and by backpressure every node above it), so one slow node
//!   anywhere in a tree slows the whole tree; the coordinator, which reads the image from its
//!   file, does not couple its children.
//! * So nodes are split into **classes** of similar speed (each within [`CLASS_SPREAD`] of its
//!   class's fastest; at most [`MAX_CLASSES`]), and each class gets a subtree of its own under
//!   the coordinator: a slow link or a slow disk then slows only its own class.
//! * Each class's shape: the `k` in `1..=`[`MAX_AUTO_FANOUT`] with the least estimated time
//!   `S/rate_k + depth_k × step/rate_k` (`rate_k = min(class receive rate, class relay rate
//!   / k, coordinator share / k)`; `step`: what a hop holds before forwarding, a 128 KiB piece
//!   in kd): a chain when links are all alike (one copy per link; the pipeline fills in N
//!   steps), a k-ary tree when disks are slower than links by k or more and the chain is deep
//!   enough for its fill to matter (the same rate with a shallower tree). Ties (within 1 %) go
//!   to the smaller fan-out: with full-duplex links of equal speed that is a chain, as
//!   Kascade found.
//! * The coordinator's uplink is taken as fast as the fastest node's link; the slower classes
//!   take their share first, the fastest class has what is left.
//!
//! Within a class nodes keep their order and their racks ([`crate::tree::plan_grouped`]).

use crate::tree::{plan_grouped, Arity, Tree};

/// A class holds nodes at least this fraction of its fastest node's rate: a node worth a
/// class of its own is twice as slow (a 1 Gbit/s link among 10 Gbit/s ones, a failing disk),
/// not one the probe's noise (±30 % on a busy host) set apart.
pub const CLASS_SPREAD: f64 = 0.5;
/// Most classes (subtrees of the coordinator); slower nodes join the last class.
pub const MAX_CLASSES: usize = 3;
/// Largest fan-out `auto` picks.
pub const MAX_AUTO_FANOUT: usize = 8;

/// What one node measured; `None`: not measured (no answer, or nothing to measure: a node
/// that writes nowhere has no disk rate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeRates {
    /// Link rate, bytes per second (see [`node_links`]).
    pub link: Option<u64>,
    /// Disk write rate, bytes per second of raw image.
    pub disk: Option<u64>,
    /// The node answered the probe: a disk rate it did not give is no limit (it writes
    /// nowhere); the rates of a node that did not answer are taken as typical.
    pub answered: bool,
}

/// The image as the model needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageShape {
    /// Bytes sent (compressed).
    pub compressed: u64,
    /// Bytes written (raw).
    pub raw: u64,
    /// Bytes a hop holds before it forwards them (the pipeline's step: a chunk for a
    /// store-and-forward relay, a piece for kd's, which forwards each piece once verified).
    pub step: u64,
}

/// One class: nodes of similar speed under one subtree of the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct Class {
    /// Its nodes (indices into the planned nodes), in their order.
    pub nodes: Vec<usize>,
    /// Its shape.
    pub arity: Arity,
    /// Estimated rate of its broadcast, bytes per second of compressed image.
    pub rate: f64,
    /// Estimated seconds for its last node.
    pub seconds: f64,
}

/// The planned tree and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoPlan {
    /// The tree over the planned nodes.
    pub tree: Tree,
    /// Its classes, fastest first (empty when nothing was measured: a plain chain).
    pub classes: Vec<Class>,
}

impl AutoPlan {
    /// The most children any sender has in the plan (the coordinator's per class).
    pub fn fan_out(&self) -> usize {
        self.classes
            .iter()
            .map(|c| match c.arity {
                Arity::Kary(k) => k as usize,
                _ => 1,
            })
            .max()
            .unwrap_or(1)
    }

    /// One line for the logs: `chain of 15 at 11.8 MB/s, chain of 1 at 3.0 MB/s`.
    pub fn describe(&self) -> String {
        if self.classes.is_empty() {
            return "chain (no rates measured)".into();
        }
        self.classes
            .iter()
            .map(|c| {
                let shape = match c.arity {
                    Arity::Kary(k) if k > 1 => format!("{k}-ary tree"),
                    _ => "chain".into(),
                };
                format!(
                    "{shape} of {} at {:.1} MB/s",
                    c.nodes.len(),
                    c.rate / 1_000_000.0
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The probe ring over `groups` (node `i` in group `groups[i]`): `ring(groups)[i]` is the node
/// `i` fetches its probe from. Nodes are ringed group by group (a probe crosses between groups
/// once per group, not once per node); `None` for a single node.
pub fn ring(groups: &[usize]) -> Vec<Option<usize>> {
    let n = groups.len();
    if n < 2 {
        return vec![None; n];
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Groups in order of first appearance.
    let mut first: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for (i, &g) in groups.iter().enumerate() {
        first.entry(g).or_insert(i);
    }
    order.sort_by_key(|&i| (first.get(&groups[i]).copied().unwrap_or(i), i));
    let mut from = vec![None; n];
    for (pos, &i) in order.iter().enumerate() {
        from[i] = Some(order[(pos + 1) % n]);
    }
    from
}

/// One link rate per node from the ring's measures: `fetched[i]` is what node `i` measured
/// fetching from `from[i]` (the ring), a rate bounded by `i`'s receiving and `from[i]`'s
/// sending. A node's rate is the better of the two measures it took part in (as receiver and
/// as sender): a slow node is slow in both, a fast node beside a slow one is fast in one.
pub fn node_links(from: &[Option<usize>], fetched: &[Option<u64>]) -> Vec<Option<u64>> {
    let n = from.len();
    let mut best: Vec<Option<u64>> = fetched.iter().take(n).copied().collect();
    best.resize(n, None);
    for (i, f) in from.iter().enumerate() {
        let (Some(src), Some(rate)) = (*f, fetched.get(i).copied().flatten()) else {
            continue;
        };
        if let Some(b) = best.get_mut(src) {
            *b = Some(b.map_or(rate, |x| x.max(rate)));
        }
    }
    best
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// Smallest depth of a `k`-ary tree of `n` nodes (`n` for a chain).
fn depth(n: usize, k: usize) -> usize {
    if k <= 1 {
        return n;
    }
    let (mut d, mut level, mut total) = (0usize, 1usize, 0usize);
    while total < n {
        level = level.saturating_mul(k);
        total = total.saturating_add(level);
        d += 1;
    }
    d
}

/// Plans the tree over nodes `0..rates.len()` (racks in `groups`, same length, or empty for
/// none) from their measured rates. See the module documentation for the model. O(N log N).
pub fn plan_auto(rates: &[NodeRates], groups: &[usize], image: ImageShape) -> AutoPlan {
    let n = rates.len();
    let groups: Vec<usize> = if groups.len() == n {
        groups.to_vec()
    } else {
        vec![0; n]
    };
    let chain = || AutoPlan {
        tree: plan_grouped(&groups, Arity::Chain),
        classes: Vec::new(),
    };
    let links: Vec<u64> = rates.iter().filter_map(|r| r.link).collect();
    let disks: Vec<u64> = rates.iter().filter_map(|r| r.disk).collect();
    if n == 0 || (links.is_empty() && disks.is_empty()) {
        return chain();
    }
    // Unmeasured values: the median of the measured (unknown is taken as typical).
    let typical_link = median(links.clone());
    let typical_disk = median(disks);
    // Compressed bytes per raw byte: the disk writes raw bytes, the links carry compressed.
    let ratio = if image.raw == 0 {
        1.0
    } else {
        image.compressed as f64 / image.raw as f64
    };
    let unbounded = f64::INFINITY;
    let link_of = |r: &NodeRates| r.link.or(typical_link).map_or(unbounded, |v| v as f64);
    let send: Vec<f64> = rates.iter().map(link_of).collect();
    let recv: Vec<f64> = rates
        .iter()
        .map(|r| {
            let disk = match (r.disk, r.answered) {
                (Some(d), _) => d as f64 * ratio,
                (None, true) => unbounded,
                (None, false) => typical_disk.map_or(unbounded, |d| d as f64 * ratio),
            };
            link_of(r).min(disk)
        })
        .collect();
    if recv.iter().all(|r| !r.is_finite()) {
        return chain();
    }
    // Classes, fastest first: each holds the nodes within CLASS_SPREAD of its fastest.
    let mut by_speed: Vec<usize> = (0..n).collect();
    by_speed.sort_by(|&a, &b| recv[b].total_cmp(&recv[a]).then(a.cmp(&b)));
    let mut classes: Vec<Vec<usize>> = Vec::new();
    let mut top = f64::NAN;
    for &i in &by_speed {
        let fits = !classes.is_empty() && recv[i] >= top * CLASS_SPREAD;
        if fits || classes.len() == MAX_CLASSES {
            if let Some(c) = classes.last_mut() {
                c.push(i);
            }
        } else {
            top = recv[i];
            classes.push(vec![i]);
        }
    }
    for c in &mut classes {
        c.sort_unstable();
    }
    // The coordinator's uplink: as fast as the fastest link seen.
    let mut source = send
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    if source == 0.0 {
        source = unbounded;
    }
    let model = Model {
        recv: &recv,
        send: &send,
        s: image.compressed.max(1) as f64,
        step: image.step.max(1) as f64,
        source,
    };
    // Splitting costs the coordinator's uplink (each class is fed on its own): try keeping
    // the first c-1 classes apart and the rest together, for each c, and take the plan whose
    // last node is done first (within 2 %: the one whose nodes are done first on average,
    // then the one with fewer classes).
    let mut best: Option<(f64, f64, Vec<Class>)> = None;
    for c in 1..=classes.len() {
        let mut cand: Vec<Vec<usize>> = classes[..c - 1].to_vec();
        let mut rest: Vec<usize> = classes[c - 1..].concat();
        rest.sort_unstable();
        cand.push(rest);
        let planned = model.plan(&cand);
        let last = planned.iter().map(|k| k.seconds).fold(0.0f64, f64::max);
        let mean = planned
            .iter()
            .map(|k| k.seconds * k.nodes.len() as f64)
            .sum::<f64>()
            / n as f64;
        let better = match &best {
            None => true,
            Some((bl, bm, _)) => last < bl * 0.98 || (last <= bl * 1.02 && mean < bm * 0.98),
        };
        if better {
            best = Some((last, mean, planned));
        }
    }
    let Some((_, _, planned)) = best else {
        return chain();
    };
    let mut parent: Vec<Option<usize>> = vec![None; n];
    for class in &planned {
        let sub_groups: Vec<usize> = class.nodes.iter().map(|&i| groups[i]).collect();
        let sub = plan_grouped(&sub_groups, class.arity);
        for (j, &i) in class.nodes.iter().enumerate() {
            parent[i] = sub.parent(j).map(|p| class.nodes[p]);
        }
    }
    match Tree::from_parents(&parent) {
        Ok(tree) => AutoPlan {
            tree,
            classes: planned,
        },
        // Never: each class's subtree is a tree and the classes are disjoint.
        Err(_) => chain(),
    }
}

/// The time model over the nodes' rates (see the module documentation).
struct Model<'a> {
    /// Receive rate of each node (bytes of compressed image per second).
    recv: &'a [f64],
    /// Send rate of each node.
    send: &'a [f64],
    /// Compressed image bytes.
    s: f64,
    /// A hop's step, bytes.
    step: f64,
    /// The coordinator's uplink.
    source: f64,
}

impl Model<'_> {
    /// Shapes each class (fastest first) as a subtree of the coordinator: the slower classes
    /// take their share of the uplink first, the fastest has what is left.
    fn plan(&self, classes: &[Vec<usize>]) -> Vec<Class> {
        let mut source = self.source;
        let mut planned: Vec<Class> = Vec::with_capacity(classes.len());
        for (ci, members) in classes.iter().enumerate().rev() {
            let r_in = members
                .iter()
                .map(|&i| self.recv[i])
                .fold(f64::INFINITY, f64::min);
            let r_out = members
                .iter()
                .map(|&i| self.send[i])
                .fold(f64::INFINITY, f64::min);
            let m = members.len();
            let mut best: Option<(f64, usize, f64)> = None;
            for k in 1..=MAX_AUTO_FANOUT.min(m.max(1)) {
                let mut rate = r_in.min(source / k as f64);
                if m > k {
                    rate = rate.min(r_out / k as f64);
                }
                if !rate.is_finite() || rate <= 0.0 {
                    continue;
                }
                let t = self.s / rate + depth(m, k) as f64 * self.step / rate;
                // Ties (within 1 %) go to the smaller fan-out.
                if best.is_none_or(|(bt, _, _)| t < bt * 0.99) {
                    best = Some((t, k, rate));
                }
            }
            let (seconds, k, rate) = best.unwrap_or((f64::INFINITY, 1, f64::INFINITY));
            if ci > 0 && source.is_finite() {
                source = (source - rate * k as f64).max(source * 0.1);
            }
            planned.push(Class {
                nodes: members.clone(),
                arity: if k == 1 {
                    Arity::Chain
                } else {
                    Arity::Kary(k as u32)
                },
                rate,
                seconds,
            });
        }
        planned.reverse();
        planned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn shape() -> ImageShape {
        // 256 MiB incompressible, forwarded 1 MiB at a time.
        ImageShape {
            compressed: 256 << 20,
            raw: 256 << 20,
            step: 1 << 20,
        }
    }

    fn links(v: &[u64]) -> Vec<NodeRates> {
        v.iter()
            .map(|&l| NodeRates {
                link: Some(l),
                disk: None,
                answered: true,
            })
            .collect()
    }

    #[test]
    fn nothing_measured_is_a_chain() {
        let p = plan_auto(&[NodeRates::default(); 5], &[], shape());
        assert_eq!(p.tree, crate::tree::plan(5, Arity::Chain));
        assert!(p.classes.is_empty());
        assert_eq!(p.describe(), "chain (no rates measured)");
        assert!(plan_auto(&[], &[], shape()).tree.is_empty());
    }

    #[test]
    fn equal_links_make_a_chain() {
        let p = plan_auto(&links(&[12 * MB; 16]), &[], shape());
        assert_eq!(p.classes.len(), 1);
        assert_eq!(p.classes[0].arity, Arity::Chain);
        assert_eq!(p.tree, crate::tree::plan(16, Arity::Chain));
        assert_eq!(p.fan_out(), 1);
    }

    #[test]
    fn a_slow_link_gets_its_own_subtree_and_the_chain_keeps_its_order() {
        let mut v = vec![12 * MB; 16];
        v[4] = 3 * MB;
        let p = plan_auto(&links(&v), &[], shape());
        p.tree.check().unwrap();
        assert_eq!(p.classes.len(), 2);
        assert_eq!(p.classes[1].nodes, vec![4]);
        assert_eq!(
            p.tree.parent(4),
            None,
            "the slow node reads from the coordinator"
        );
        assert!(p.tree.children(4).is_empty(), "and relays to no one");
        // The others: one chain in their order, 3 -> 5.
        assert_eq!(p.tree.parent(5), Some(3));
        assert_eq!(p.tree.roots().len(), 2);
        // The fast class gets what the slow one leaves of the uplink.
        assert!(p.classes[0].rate < 12.0e6 && p.classes[0].rate > 8.0e6);
        assert!(p.describe().contains("chain of 15"), "{}", p.describe());
    }

    #[test]
    fn slow_disks_everywhere_make_a_shallow_tree_at_the_disk_rate() {
        // Links 12 MB/s, disks 3.5 MB/s: a chain is disk-bound; a binary tree sends 6 MB/s per
        // child, still more than the disks take, with 4 levels instead of 16 (a 3-ary tree
        // would save one more step: less than the 1 % a tie needs).
        let r: Vec<NodeRates> = (0..16)
            .map(|_| NodeRates {
                link: Some(12 * MB),
                disk: Some(3_500_000),
                answered: true,
            })
            .collect();
        let p = plan_auto(&r, &[], shape());
        assert_eq!(p.classes.len(), 1);
        assert_eq!(p.classes[0].arity, Arity::Kary(2));
        assert!((p.classes[0].rate - 3.5e6).abs() < 1.0);
        // A compressible image: the disk writes 2 raw bytes per byte sent, so 3.5 MB/s of disk
        // takes 1.75 MB/s of link.
        let half = ImageShape {
            raw: 512 << 20,
            ..shape()
        };
        let p = plan_auto(&r, &[], half);
        assert!((p.classes[0].rate - 1.75e6).abs() < 1.0);
        assert_eq!(p.classes[0].arity, Arity::Kary(2));
        // Disks faster than links: a chain.
        let fast: Vec<NodeRates> = (0..16)
            .map(|_| NodeRates {
                link: Some(12 * MB),
                disk: Some(50 * MB),
                answered: true,
            })
            .collect();
        assert_eq!(
            plan_auto(&fast, &[], shape()).classes[0].arity,
            Arity::Chain
        );
    }

    #[test]
    fn half_the_disks_slow_split_the_tree_in_two() {
        let r: Vec<NodeRates> = (0..16)
            .map(|i| NodeRates {
                link: Some(12 * MB),
                disk: Some(if i % 2 == 0 { 100 * MB } else { 3 * MB }),
                answered: true,
            })
            .collect();
        let p = plan_auto(&r, &[], shape());
        p.tree.check().unwrap();
        assert_eq!(p.classes.len(), 2);
        let slow: Vec<usize> = (0..16).filter(|i| i % 2 == 1).collect();
        assert_eq!(p.classes[1].nodes, slow);
        // No fast node reads from a slow one.
        for i in (0..16).step_by(2) {
            assert!(p.tree.parent(i).is_none_or(|q| q % 2 == 0));
        }
    }

    #[test]
    fn links_a_little_apart_stay_one_class() {
        // Two groups 35 % apart: apart, the fast class would get what the slow one leaves
        // of the uplink (12 - 7.8): one chain at 7.8 MB/s is done first.
        let v: Vec<u64> = (0..16)
            .map(|i| if i < 8 { 12 * MB } else { 7_800_000 })
            .collect();
        let p = plan_auto(&links(&v), &[], shape());
        assert_eq!(p.classes.len(), 1, "{}", p.describe());
        assert_eq!(p.tree, crate::tree::plan(16, Arity::Chain));
    }

    #[test]
    fn a_node_that_writes_nowhere_has_no_disk_limit() {
        // One slow disk among null sinks: the others are not slow for it.
        let mut r = links(&[12 * MB; 8]);
        r[1].disk = Some(2 * MB);
        let p = plan_auto(&r, &[], shape());
        assert_eq!(p.classes.len(), 2, "{}", p.describe());
        assert_eq!(p.classes[1].nodes, vec![1]);
        // ... but one that did not answer is taken as typical.
        r[1].disk = None;
        r[1].answered = false;
        r[2].disk = Some(2 * MB);
        let p = plan_auto(&r, &[], shape());
        assert_eq!(p.classes[1].nodes, vec![1, 2], "{}", p.describe());
    }

    #[test]
    fn unmeasured_nodes_count_as_typical() {
        let mut r = links(&[12 * MB; 8]);
        r[3].link = None;
        r[3].answered = false;
        let p = plan_auto(&r, &[], shape());
        assert_eq!(p.classes.len(), 1);
        assert_eq!(p.tree, crate::tree::plan(8, Arity::Chain));
    }

    #[test]
    fn classes_are_capped() {
        let v: Vec<u64> = (0..10).map(|i| (100 * MB) >> i).collect();
        let p = plan_auto(&links(&v), &[], shape());
        assert_eq!(p.classes.len(), MAX_CLASSES);
        p.tree.check().unwrap();
        assert_eq!(p.tree.live_count(), 10);
    }

    #[test]
    fn racks_are_kept_within_a_class() {
        // Two racks interleaved by name: the chain visits each rack once.
        let groups: Vec<usize> = (0..8).map(|i| i % 2).collect();
        let p = plan_auto(&links(&[12 * MB; 8]), &groups, shape());
        assert_eq!(crate::tree::crossings(&p.tree, &groups), 2);
    }

    #[test]
    fn the_ring_goes_rack_by_rack_and_links_take_the_better_direction() {
        assert_eq!(ring(&[0]), vec![None]);
        assert_eq!(ring(&[0, 0, 0]), vec![Some(1), Some(2), Some(0)]);
        // Racks 0,1,0,1: order 0,2,1,3.
        assert_eq!(
            ring(&[0, 1, 0, 1]),
            vec![Some(2), Some(3), Some(1), Some(0)]
        );
        // Node 2 slow both ways in a ring of 4: 1 fetched from 2 (slow), 2 from 3 (slow).
        let from = ring(&[0; 4]);
        let fetched = [Some(10), Some(2), Some(2), Some(10)];
        assert_eq!(
            node_links(&from, &fetched),
            vec![Some(10), Some(10), Some(2), Some(10)]
        );
        // A node that measured nothing still gets its rate as a sender.
        let fetched = [None, Some(7), Some(9), Some(10)];
        assert_eq!(node_links(&from, &fetched)[2], Some(9));
        assert_eq!(node_links(&from, &fetched)[0], Some(10));
    }

    #[test]
    fn depths() {
        assert_eq!(depth(16, 1), 16);
        assert_eq!(depth(16, 2), 4);
        assert_eq!(depth(16, 3), 3);
        assert_eq!(depth(1, 4), 1);
        assert_eq!(depth(0, 4), 0);
    }
}
