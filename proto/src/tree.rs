//! The broadcast tree planner: who sends the image to whom.
//!
//! The source (the coordinator) is the root of the tree and is not one of the nodes; nodes are
//! indexed `0..n` in the order they were given (usually the order of the node set). A node's
//! parent is another node or the source (`None`).
//!
//! * [`Arity::Kary`]`(k)`: breadth-first heap order. The source has `k` children (nodes
//!   `0..k`), and the children of node `i` are `k*(i+1) .. k*(i+1)+k-1` (clipped to `n`).
//!   Every sender, the source included, has at most `k` children.
//! * [`Arity::Chain`] is `Kary(1)`: `source -> 0 -> 1 -> ... -> n-1`.
//! * [`Arity::Star`]: every node is a child of the source.
//!
//! Depths count hops from the source: the children of the source have depth 1. A k-ary tree of
//! `n` nodes has the smallest depth `d` with `k + k^2 + ... + k^d >= n`, a chain has depth `n`,
//! a star depth 1.
//!
//! [`plan_grouped`] plans the same shapes over nodes that carry a group (a rack or a switch)
//! so that the tree crosses between groups as few times as it can: each group gets a tree of
//! its own (the shape's, in the group's node order), and the groups are hung one below the
//! other, each group's first node under a free slot of the source or of an earlier group's
//! shallowest leaves. A chain visits each group's nodes together (one hop into each group); a
//! k-ary tree keeps every group's subtree inside it; every sender keeps at most `k` children.
//!
//! When a node dies mid-broadcast, [`Tree::remove`] re-attaches its children to its parent (or
//! to the source). That keeps every other node where it was and costs the adopting parent more
//! fan-out (its children minus one plus the orphans): after repairs the fan-out bound of the
//! plan no longer holds, the tree stays valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The shape of a broadcast tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arity {
    /// A chain in the given order: the same as `Kary(1)`.
    Chain,
    /// Every sender (the source included) has up to `k` children. `Kary(0)` is planned as
    /// `Kary(1)`.
    Kary(u32),
    /// Every node is a child of the source.
    Star,
    /// Chosen per broadcast from the nodes' measured link and disk rates
    /// ([`crate::auto::plan_auto`]); planned as a chain where no rates are known.
    Auto,
}

impl Arity {
    /// Most children of any sender (the source included) in a planned tree of `n` nodes.
    pub fn fan_out(self, n: usize) -> usize {
        match self {
            Arity::Chain | Arity::Auto => 1,
            Arity::Kary(k) => usize::try_from(k.max(1)).unwrap_or(usize::MAX),
            Arity::Star => n.max(1),
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arity::Chain => f.write_str("chain"),
            Arity::Kary(k) => write!(f, "{k}"),
            Arity::Star => f.write_str("star"),
            Arity::Auto => f.write_str("auto"),
        }
    }
}

/// A string that names no [`Arity`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad tree arity {0:?}: expected \"auto\", \"chain\", \"star\" or a positive integer")]
pub struct ParseArityError(pub String);

impl FromStr for Arity {
    type Err = ParseArityError;

    /// Accepts `auto`, `chain`, `star` (any case) or a positive integer `k`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(Arity::Auto);
        }
        if t.eq_ignore_ascii_case("chain") {
            return Ok(Arity::Chain);
        }
        if t.eq_ignore_ascii_case("star") {
            return Ok(Arity::Star);
        }
        match t.parse::<u32>() {
            Ok(k) if k > 0 && t.bytes().all(|b| b.is_ascii_digit()) => Ok(Arity::Kary(k)),
            _ => Err(ParseArityError(s.to_owned())),
        }
    }
}

/// One change made by a repair: `child` now receives from `new_parent` (`None`: the source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reattach {
    /// The node that changes parent.
    pub child: usize,
    /// Its new parent; `None` is the source.
    pub new_parent: Option<usize>,
}

/// A refused [`Tree::add_child`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The child is neither a removed node nor the next new index.
    #[error("node {0} cannot be added: it is in the tree or beyond the next index")]
    BadChild(usize),
    /// The parent is not a live node.
    #[error("parent {0} is not in the tree")]
    BadParent(usize),
    /// Some node is its own ancestor: not reachable from the source.
    #[error("the parents make a cycle")]
    Cycle,
}

/// A broadcast tree over nodes `0..len()`, rooted at the source.
///
/// Removed nodes keep their index: they are not live, have no parent and no children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    parent: Vec<Option<usize>>,
    children: Vec<Vec<usize>>,
    roots: Vec<usize>,
    live: Vec<bool>,
}

/// Plans a tree of `n` nodes with the given shape.
pub fn plan(n: usize, arity: Arity) -> Tree {
    Tree::plan(n, arity)
}

/// Plans a tree of `groups.len()` nodes, node `i` in group `groups[i]`, with the given shape,
/// entering each group once (see the module documentation). Groups are taken in the order of
/// their first node; within a group, nodes keep their order. A star ignores groups (every node
/// is a child of the source either way). With one group this is [`plan`]. O(N k log N).
pub fn plan_grouped(groups: &[usize], arity: Arity) -> Tree {
    let n = groups.len();
    if matches!(arity, Arity::Star) || n == 0 {
        return plan(n, arity);
    }
    let k = arity.fan_out(n);
    // The groups in order of first appearance, each with its nodes in order.
    let mut order: Vec<usize> = Vec::new();
    let mut members: std::collections::HashMap<usize, Vec<usize>> =
        std::collections::HashMap::new();
    for (i, &g) in groups.iter().enumerate() {
        members
            .entry(g)
            .or_insert_with(|| {
                order.push(g);
                Vec::new()
            })
            .push(i);
    }
    if order.len() == 1 {
        return plan(n, arity);
    }
    let mut parent: Vec<Option<usize>> = vec![None; n];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut roots: Vec<usize> = Vec::new();
    // Free sending slots, shallowest first, then first offered: (depth, seq, parent). The
    // source's k are at depth 0.
    let mut slots: std::collections::BinaryHeap<std::cmp::Reverse<(usize, usize, Option<usize>)>> =
        (0..k).map(|i| std::cmp::Reverse((0, i, None))).collect();
    let mut seq = k;
    for g in order {
        let nodes = members.remove(&g).unwrap_or_default();
        // The group's own tree: its first node under the slot, the others in heap order
        // below it (the children of the group's j-th node are its k*j+1 .. k*j+k-th).
        let Some(std::cmp::Reverse((top_depth, _, top))) = slots.pop() else {
            // Never: each group leaves at least one leaf with k free slots.
            break;
        };
        let mut depth = vec![0usize; nodes.len()];
        for (j, &node) in nodes.iter().enumerate() {
            if j == 0 {
                parent[node] = top;
                depth[0] = top_depth + 1;
                match top {
                    Some(t) => children[t].push(node),
                    None => roots.push(node),
                }
            } else {
                let pj = (j - 1) / k;
                parent[node] = Some(nodes[pj]);
                children[nodes[pj]].push(node);
                depth[j] = depth[pj] + 1;
            }
        }
        // The group's leaves offer their slots to later groups, shallowest first.
        let mut leaves: Vec<(usize, usize)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, &node)| children[node].is_empty())
            .map(|(j, &node)| (depth[j], node))
            .collect();
        leaves.sort_unstable();
        for (d, leaf) in leaves {
            for _ in 0..k {
                slots.push(std::cmp::Reverse((d, seq, Some(leaf))));
                seq += 1;
            }
        }
    }
    Tree {
        parent,
        children,
        roots,
        live: vec![true; n],
    }
}

/// How many tree edges cross between groups (node `i` in `groups[i]`); an edge from the
/// source counts as a crossing (the source is in no group).
pub fn crossings(tree: &Tree, groups: &[usize]) -> usize {
    (0..tree.len())
        .filter(|&i| tree.is_live(i))
        .filter(|&i| match tree.parent(i) {
            None => true,
            Some(p) => groups.get(p) != groups.get(i),
        })
        .count()
}

impl Tree {
    /// Plans a tree of `n` nodes with the given shape (see the module documentation).
    pub fn plan(n: usize, arity: Arity) -> Tree {
        let k = arity.fan_out(n);
        let mut parent = vec![None; n];
        let mut children = vec![Vec::new(); n];
        let mut roots = Vec::new();
        for (j, p) in parent.iter_mut().enumerate() {
            if j < k {
                roots.push(j);
            } else {
                // Children of i are k*(i+1) .. k*(i+1)+k-1.
                let i = j / k - 1;
                *p = Some(i);
                children[i].push(j);
            }
        }
        Tree {
            parent,
            children,
            roots,
            live: vec![true; n],
        }
    }

    /// The tree whose node `i` has parent `parents[i]` (`None`: the source); children keep
    /// the order of their indices. Fails on a parent out of range, a node its own ancestor.
    pub fn from_parents(parents: &[Option<usize>]) -> Result<Tree, TreeError> {
        let n = parents.len();
        let mut children = vec![Vec::new(); n];
        let mut roots = Vec::new();
        for (i, p) in parents.iter().enumerate() {
            match *p {
                None => roots.push(i),
                Some(p) if p < n && p != i => children[p].push(i),
                Some(p) => return Err(TreeError::BadParent(p)),
            }
        }
        let t = Tree {
            parent: parents.to_vec(),
            children,
            roots,
            live: vec![true; n],
        };
        // Every node reachable from the source: no cycle.
        if t.check().is_err() {
            return Err(TreeError::Cycle);
        }
        Ok(t)
    }

    /// Number of node indices, removed nodes included.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True if the tree was planned with no node.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Number of live (not removed) nodes.
    pub fn live_count(&self) -> usize {
        self.live.iter().filter(|l| **l).count()
    }

    /// True if `i` is a node of the tree that was not removed.
    pub fn is_live(&self, i: usize) -> bool {
        self.live.get(i).copied().unwrap_or(false)
    }

    /// The parent of node `i`; `None` for a child of the source (and for a removed or unknown
    /// node: see [`Tree::is_live`]).
    pub fn parent(&self, i: usize) -> Option<usize> {
        self.parent.get(i).copied().flatten()
    }

    /// The children of node `i`, in sending order (empty for a removed or unknown node).
    pub fn children(&self, i: usize) -> &[usize] {
        self.children.get(i).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The children of the source, in sending order.
    pub fn roots(&self) -> &[usize] {
        &self.roots
    }

    /// Hops from the source to node `i` (1 for a child of the source; 0 for a removed or
    /// unknown node).
    pub fn depth(&self, i: usize) -> usize {
        if !self.is_live(i) {
            return 0;
        }
        let mut d = 1;
        let mut cur = i;
        // Bounded: a valid tree has no cycle, so at most len() steps.
        while let Some(p) = self.parent(cur) {
            d += 1;
            cur = p;
            if d > self.len() {
                break;
            }
        }
        d
    }

    /// The largest depth of a live node (0 for a tree with no live node).
    pub fn max_depth(&self) -> usize {
        let mut depth = 0;
        let mut level: Vec<usize> = self.roots.clone();
        while !level.is_empty() && depth < self.len() {
            depth += 1;
            level = level
                .iter()
                .flat_map(|&i| self.children(i).iter().copied())
                .collect();
        }
        depth
    }

    /// Every node below `i` (breadth-first), not `i` itself: the nodes that starve if `i` stalls.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self.children(i).to_vec();
        let mut next = 0;
        while next < out.len() && out.len() <= self.len() {
            let c = out[next];
            out.extend_from_slice(self.children(c));
            next += 1;
        }
        out
    }

    /// The children list of `parent` (`None`: the source).
    fn kids_mut(&mut self, parent: Option<usize>) -> &mut Vec<usize> {
        match parent {
            Some(p) => &mut self.children[p],
            None => &mut self.roots,
        }
    }

    /// Removes a dead node and gives its children to its parent (or to the source), in the
    /// dead node's place in the parent's sending order. Returns the parent changes; nothing
    /// happens (empty list) if `dead` is unknown or already removed.
    ///
    /// The adopting parent's fan-out grows by the number of orphans minus one.
    pub fn remove(&mut self, dead: usize) -> Vec<Reattach> {
        if !self.is_live(dead) {
            return Vec::new();
        }
        let up = self.parent[dead];
        let orphans = std::mem::take(&mut self.children[dead]);
        for &c in &orphans {
            self.parent[c] = up;
        }
        let kids = self.kids_mut(up);
        if let Some(at) = kids.iter().position(|&c| c == dead) {
            kids.splice(at..=at, orphans.iter().copied());
        }
        self.parent[dead] = None;
        self.live[dead] = false;
        orphans
            .into_iter()
            .map(|child| Reattach {
                child,
                new_parent: up,
            })
            .collect()
    }

    /// Attaches `child` as the last child of `parent` (`None`: the source). `child` is either a
    /// removed node (a node that came back) or `len()` (a new node, which grows the tree).
    pub fn add_child(&mut self, parent: Option<usize>, child: usize) -> Result<(), TreeError> {
        if let Some(p) = parent {
            if !self.is_live(p) {
                return Err(TreeError::BadParent(p));
            }
        }
        if child == self.len() {
            self.parent.push(None);
            self.children.push(Vec::new());
            self.live.push(false);
        } else if child > self.len() || self.live[child] {
            return Err(TreeError::BadChild(child));
        }
        self.live[child] = true;
        self.parent[child] = parent;
        self.kids_mut(parent).push(child);
        Ok(())
    }

    /// Checks the invariants: every live node has exactly one parent (a live node or the
    /// source) that lists it once, removed nodes appear nowhere, and every live node is
    /// reachable from the source (so there is no cycle).
    pub fn check(&self) -> Result<(), String> {
        let n = self.len();
        if self.parent.len() != n || self.children.len() != n {
            return Err("inconsistent vector lengths".into());
        }
        // How many times each node is listed as a child (of a node or of the source).
        let mut listed = vec![0usize; n];
        let lists = std::iter::once((None, &self.roots))
            .chain(self.children.iter().enumerate().map(|(i, c)| (Some(i), c)));
        for (owner, kids) in lists {
            if let Some(o) = owner {
                if !self.live[o] && !kids.is_empty() {
                    return Err(format!("removed node {o} has children {kids:?}"));
                }
            }
            for &c in kids {
                if c >= n {
                    return Err(format!("child {c} of {owner:?} is out of range"));
                }
                if !self.live[c] {
                    return Err(format!("removed node {c} is a child of {owner:?}"));
                }
                if self.parent[c] != owner {
                    return Err(format!(
                        "node {c} is listed under {owner:?} but its parent is {:?}",
                        self.parent[c]
                    ));
                }
                listed[c] += 1;
            }
        }
        for (i, &times) in listed.iter().enumerate() {
            match (self.live[i], times) {
                (true, 1) | (false, 0) => {}
                (true, k) => return Err(format!("live node {i} is listed {k} times")),
                (false, _) => return Err(format!("removed node {i} is listed")),
            }
            if !self.live[i] && self.parent[i].is_some() {
                return Err(format!("removed node {i} has a parent"));
            }
            if let Some(p) = self.parent[i] {
                if p >= n || !self.live[p] {
                    return Err(format!("node {i} has a bad parent {p}"));
                }
            }
        }
        // Reachability from the source; each visit is counted, so a cycle cannot loop forever
        // (nodes on a cycle are never reached from the source).
        let mut seen = vec![false; n];
        let mut stack: Vec<usize> = self.roots.clone();
        let mut reached = 0;
        while let Some(i) = stack.pop() {
            if seen[i] {
                return Err(format!("node {i} reached twice"));
            }
            seen[i] = true;
            reached += 1;
            stack.extend_from_slice(&self.children[i]);
        }
        let live = self.live_count();
        if reached != live {
            let lost: Vec<usize> = (0..n).filter(|&i| self.live[i] && !seen[i]).collect();
            return Err(format!("nodes not reachable from the source: {lost:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Smallest `e` with `k^e >= m` (integer ceil of log_k m), for k >= 2.
    fn ceil_log(k: usize, m: usize) -> usize {
        let (mut e, mut p) = (0, 1usize);
        while p < m {
            p = p.saturating_mul(k);
            e += 1;
        }
        e
    }

    /// Expected depth of a planned tree: the smallest d with k + ... + k^d >= n, that is
    /// ceil(log_k(n(k-1)+k)) - 1 for k >= 2; n for a chain; 1 for a star.
    fn expected_depth(n: usize, arity: Arity) -> usize {
        if n == 0 {
            return 0;
        }
        match arity.fan_out(n) {
            1 => n,
            _ if arity == Arity::Star => 1,
            k => ceil_log(k, n * (k - 1) + k) - 1,
        }
    }

    #[test]
    fn chain_of_8() {
        let t = plan(8, Arity::Chain);
        t.check().unwrap();
        assert_eq!(t.roots(), &[0]);
        for i in 0..7 {
            assert_eq!(t.children(i), &[i + 1]);
            assert_eq!(t.parent(i + 1), Some(i));
        }
        assert_eq!(t.children(7), &[] as &[usize]);
        assert_eq!(t.depth(7), 8);
        assert_eq!(t.max_depth(), 8);
        assert_eq!(plan(8, Arity::Kary(1)), t);
        assert_eq!(plan(8, Arity::Kary(0)), t);
    }

    #[test]
    fn binary_tree_layout() {
        // source -> 0,1; 0 -> 2,3; 1 -> 4,5; 2 -> 6.
        let t = plan(7, Arity::Kary(2));
        t.check().unwrap();
        assert_eq!(t.roots(), &[0, 1]);
        assert_eq!(t.children(0), &[2, 3]);
        assert_eq!(t.children(1), &[4, 5]);
        assert_eq!(t.children(2), &[6]);
        assert_eq!(t.parent(6), Some(2));
        assert_eq!(t.parent(1), None);
        assert_eq!(t.depth(0), 1);
        assert_eq!(t.depth(5), 2);
        assert_eq!(t.max_depth(), 3);
        // 2 + 4 nodes fill two levels.
        assert_eq!(plan(6, Arity::Kary(2)).max_depth(), 2);
        assert_eq!(t.descendants(0), vec![2, 3, 6]);
    }

    #[test]
    fn star_and_small_trees() {
        let t = plan(5, Arity::Star);
        t.check().unwrap();
        assert_eq!(t.roots(), &[0, 1, 2, 3, 4]);
        assert_eq!(t.max_depth(), 1);
        let e = plan(0, Arity::Kary(3));
        e.check().unwrap();
        assert!(e.is_empty());
        assert_eq!(e.max_depth(), 0);
        assert_eq!(plan(3, Arity::Kary(10)).roots(), &[0, 1, 2]);
    }

    #[test]
    fn unknown_nodes_do_not_panic() {
        let mut t = plan(3, Arity::Chain);
        assert_eq!(t.parent(99), None);
        assert!(t.children(99).is_empty());
        assert_eq!(t.depth(99), 0);
        assert!(t.remove(99).is_empty());
        assert!(t.descendants(99).is_empty());
    }

    #[test]
    fn remove_reattaches_in_place() {
        let mut t = plan(7, Arity::Kary(2));
        let r = t.remove(0);
        assert_eq!(
            r,
            vec![
                Reattach {
                    child: 2,
                    new_parent: None
                },
                Reattach {
                    child: 3,
                    new_parent: None
                }
            ]
        );
        t.check().unwrap();
        assert_eq!(t.roots(), &[2, 3, 1]);
        assert_eq!(t.depth(6), 2);
        assert!(!t.is_live(0));
        assert_eq!(t.live_count(), 6);
        assert!(t.remove(0).is_empty());
        let r = t.remove(2);
        assert_eq!(
            r,
            vec![Reattach {
                child: 6,
                new_parent: None
            }]
        );
        assert_eq!(t.roots(), &[6, 3, 1]);
        t.check().unwrap();

        let mut c = plan(4, Arity::Chain);
        assert_eq!(
            c.remove(1),
            vec![Reattach {
                child: 2,
                new_parent: Some(0)
            }]
        );
        assert_eq!(c.children(0), &[2]);
        assert_eq!(c.max_depth(), 3);
        assert!(c.remove(3).is_empty());
        assert_eq!(c.children(2), &[] as &[usize]);
        c.check().unwrap();
    }

    #[test]
    fn add_child_brings_back_or_grows() {
        let mut t = plan(3, Arity::Chain);
        t.remove(1);
        assert_eq!(t.add_child(Some(1), 1), Err(TreeError::BadParent(1)));
        assert_eq!(t.add_child(None, 0), Err(TreeError::BadChild(0)));
        assert_eq!(t.add_child(None, 9), Err(TreeError::BadChild(9)));
        t.add_child(Some(2), 1).unwrap();
        assert_eq!(t.parent(1), Some(2));
        assert_eq!(t.depth(1), 3);
        t.add_child(None, 3).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t.roots(), &[0, 3]);
        t.check().unwrap();
    }

    /// Racks interleaved in name order: node i in rack i % racks.
    fn interleaved(n: usize, racks: usize) -> Vec<usize> {
        (0..n).map(|i| i % racks).collect()
    }

    #[test]
    fn a_grouped_chain_visits_each_group_once() {
        let g = interleaved(12, 3);
        let t = plan_grouped(&g, Arity::Chain);
        t.check().unwrap();
        // One hop into each rack, nodes of a rack together in their order.
        assert_eq!(crossings(&t, &g), 3);
        let mut order = Vec::new();
        let mut cur = t.roots().first().copied();
        while let Some(i) = cur {
            order.push(i);
            cur = t.children(i).first().copied();
        }
        assert_eq!(order, [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]);
        // The name-ordered chain crosses on every hop.
        assert_eq!(crossings(&plan(12, Arity::Chain), &g), 12);
    }

    #[test]
    fn grouped_kary_trees_keep_each_group_in_one_subtree() {
        for k in [2u32, 3, 4] {
            for (n, racks) in [(40, 4), (300, 10), (17, 5), (9, 9)] {
                let g = interleaved(n, racks);
                let t = plan_grouped(&g, Arity::Kary(k));
                t.check().unwrap();
                assert_eq!(crossings(&t, &g), racks, "k={k} n={n} racks={racks}");
                for i in 0..n {
                    assert!(t.children(i).len() <= k as usize, "k={k} n={n} node {i}");
                }
                assert!(t.roots().len() <= k as usize);
                if racks < n {
                    assert!(crossings(&plan(n, Arity::Kary(k)), &g) > racks);
                }
            }
        }
    }

    #[test]
    fn grouped_plans_stay_shallow() {
        // 300 nodes in 10 racks of 30, binary: each rack's tree is 5 deep, racks hang from
        // the shallowest leaves of earlier ones.
        let g = interleaved(300, 10);
        let t = plan_grouped(&g, Arity::Kary(2));
        assert!(t.max_depth() <= 3 * 5, "{}", t.max_depth());
        // One rack per node: every node is its own group, still a binary tree of depth ~log2.
        let g: Vec<usize> = (0..1000).collect();
        let t = plan_grouped(&g, Arity::Kary(2));
        t.check().unwrap();
        assert!(t.max_depth() <= 11, "{}", t.max_depth());
    }

    #[test]
    fn one_group_or_a_star_is_the_plain_plan() {
        for a in [Arity::Chain, Arity::Kary(3), Arity::Star] {
            assert_eq!(plan_grouped(&[7; 20], a), plan(20, a));
            assert_eq!(
                plan_grouped(&interleaved(20, 4), Arity::Star),
                plan(20, Arity::Star)
            );
        }
        assert_eq!(plan_grouped(&[], Arity::Chain), plan(0, Arity::Chain));
    }

    proptest! {
        #[test]
        fn grouped_plans_are_valid_trees_within_the_fan_out(
            groups in proptest::collection::vec(0usize..6, 0..80),
            k in 1u32..5,
        ) {
            let t = plan_grouped(&groups, Arity::Kary(k));
            prop_assert!(t.check().is_ok());
            prop_assert_eq!(t.live_count(), groups.len());
            for i in 0..groups.len() {
                prop_assert!(t.children(i).len() <= k as usize);
            }
            let distinct: std::collections::HashSet<_> = groups.iter().collect();
            prop_assert!(crossings(&t, &groups) <= distinct.len().max(k as usize).min(groups.len()));
        }
    }

    #[test]
    fn check_catches_broken_trees() {
        let mut t = plan(4, Arity::Chain);
        // A cycle 2 -> 3 -> 2, cut from the source.
        t.children[1].clear();
        t.parent[2] = Some(3);
        t.children[3].push(2);
        assert!(t.check().is_err());
        let mut t = plan(4, Arity::Kary(2));
        t.roots.push(2);
        assert!(t.check().is_err());
    }

    #[test]
    fn arity_strings() {
        for (s, a) in [
            ("chain", Arity::Chain),
            ("Star", Arity::Star),
            (" 1 ", Arity::Kary(1)),
            ("4", Arity::Kary(4)),
            ("AUTO", Arity::Auto),
        ] {
            assert_eq!(s.parse::<Arity>(), Ok(a));
        }
        for s in ["0", "-2", "+2", "", "k=3", "two", "99999999999"] {
            assert!(s.parse::<Arity>().is_err(), "{s}");
        }
        for a in [Arity::Chain, Arity::Star, Arity::Kary(3), Arity::Auto] {
            assert_eq!(a.to_string().parse::<Arity>(), Ok(a));
        }
        assert_eq!(
            "x".parse::<Arity>().unwrap_err().to_string(),
            "bad tree arity \"x\": expected \"auto\", \"chain\", \"star\" or a positive integer"
        );
    }

    #[test]
    fn trees_from_parents() {
        let t = Tree::from_parents(&[None, Some(0), Some(0), None]).unwrap();
        assert_eq!(t.roots(), &[0, 3]);
        assert_eq!(t.children(0), &[1, 2]);
        t.check().unwrap();
        assert_eq!(
            Tree::from_parents(&[Some(1), Some(0)]),
            Err(TreeError::Cycle)
        );
        assert_eq!(Tree::from_parents(&[Some(5)]), Err(TreeError::BadParent(5)));
        assert_eq!(Tree::from_parents(&[Some(0)]), Err(TreeError::BadParent(0)));
    }

    fn arity() -> impl Strategy<Value = Arity> {
        prop_oneof![
            Just(Arity::Chain),
            Just(Arity::Star),
            (1u32..10).prop_map(Arity::Kary)
        ]
    }

    proptest! {
        #[test]
        fn planned_trees_are_valid(n in 1usize..200, a in arity()) {
            let t = plan(n, a);
            prop_assert_eq!(t.check(), Ok(()));
            let k = a.fan_out(n);
            prop_assert!(t.roots().len() <= k);
            for i in 0..n {
                prop_assert!(t.children(i).len() <= k);
                prop_assert_eq!(t.depth(i), t.parent(i).map_or(1, |p| t.depth(p) + 1));
            }
            prop_assert_eq!(t.max_depth(), expected_depth(n, a));
            prop_assert_eq!(t.max_depth(), (0..n).map(|i| t.depth(i)).max().unwrap_or(0));
            // Heap order: parents come before their children, so the order is breadth-first.
            for i in 0..n {
                if let Some(p) = t.parent(i) { prop_assert!(p < i); }
            }
        }

        #[test]
        fn removals_keep_the_tree_valid(
            n in 1usize..200,
            a in arity(),
            kills in prop::collection::vec(any::<prop::sample::Index>(), 0..50),
        ) {
            let mut t = plan(n, a);
            for kill in kills {
                let dead = kill.index(n);
                let was_live = t.is_live(dead);
                let up = t.parent(dead);
                let orphans = t.children(dead).to_vec();
                let depths: Vec<usize> = t.descendants(dead).iter().map(|&d| t.depth(d)).collect();
                let below = t.descendants(dead);
                let live = t.live_count();
                let changes = t.remove(dead);
                prop_assert_eq!(t.check(), Ok(()));
                prop_assert!(!t.is_live(dead));
                if !was_live {
                    prop_assert!(changes.is_empty());
                    continue;
                }
                prop_assert_eq!(t.live_count(), live - 1);
                let moved: Vec<usize> = changes.iter().map(|r| r.child).collect();
                prop_assert_eq!(&moved, &orphans);
                for r in &changes {
                    prop_assert_eq!(r.new_parent, up);
                    prop_assert_eq!(t.parent(r.child), up);
                }
                // Everything below the dead node moved up one level.
                for (d, before) in below.iter().zip(depths) {
                    prop_assert_eq!(t.depth(*d), before - 1);
                }
            }
            prop_assert_eq!(t.max_depth(), (0..n).map(|i| t.depth(i)).max().unwrap_or(0));
        }
    }
}
