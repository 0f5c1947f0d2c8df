//! The module tree of one side of the order matcher, from the module paths of
//! the store's own names: what a side's order is known to be.
//!
//! PyTorch lists a model's tensors in pre-order — a module's own tensors, then
//! each child's in registration order — so a store that keeps that order
//! ([`Sequence::Registration`]) is read as it is. A store that does not
//! ([`Sequence::Natural`]) still shows its tree in its names; what is lost is
//! the order of siblings:
//!
//! - indexed children (`Sequential`, `ModuleList`) are in index order;
//! - named children whose subtrees all differ cannot be mistaken for one
//!   another, so their order only matters for lining them up with the other
//!   side: it is borrowed from the other side's module with the same subtree
//!   (or, when both sides lost their order, both use one canonical order);
//! - other named children (two alike, or no counterpart) are *open*: the
//!   matcher tries several orders and keeps what holds in all of them.
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::Sequence;
use crate::dotted::{is_index, natural_cmp, segments};

/// How a node's children are ordered.
#[derive(Debug, Clone)]
enum Children {
    /// In this order (node indices).
    Known(Vec<usize>),
    /// Unknown: each of these orders is tried (every distinct order of the
    /// children's subtrees, up to [`MAX_ORDERS`]).
    Open(Vec<Vec<usize>>),
}

/// Orders of one group of open siblings tried at most; also the most linear
/// orders of a side aligned.
const MAX_ORDERS: usize = 48;
/// Linear orders tried at least when some siblings are open.
const MIN_ATTEMPTS: usize = 8;

#[derive(Debug)]
struct Node<'a> {
    segment: &'a str,
    parent: usize,
    /// Modules whose path is this node's, in index order.
    modules: Vec<usize>,
    /// Children, in order of first appearance.
    children: Vec<usize>,
    /// The subtree's signature: equal ids, equal subtrees (tokens and shape of
    /// the tree), shared by both sides.
    id: u32,
    order: Children,
    /// For open children: whether their orders are *every* order they can
    /// have (no two alike, all enumerated), so that one of them is the true one.
    every_order: bool,
}

/// One side's module tree.
pub(super) struct Tree<'a> {
    nodes: Vec<Node<'a>>,
    sequence: Sequence,
    /// The node of each module.
    node_of: Vec<usize>,
}

/// Subtree signatures of both sides: (own tokens, child ids) -> id.
pub(super) type SubtreeIds = HashMap<(Vec<u32>, Vec<u32>), u32>;

impl<'a> Tree<'a> {
    /// The tree of modules with these paths (module `i` has `paths[i]`), listed
    /// in the side's order.
    pub fn new(paths: impl Iterator<Item = &'a str>, sequence: Sequence) -> Self {
        let root = Node {
            segment: "",
            parent: 0,
            modules: Vec::new(),
            children: Vec::new(),
            id: 0,
            order: Children::Known(Vec::new()),
            every_order: false,
        };
        let mut nodes = vec![root];
        let mut child_of: HashMap<(usize, &str), usize> = HashMap::new();
        let mut node_of = Vec::new();
        for (i, path) in paths.enumerate() {
            let mut at = 0;
            for segment in segments(path) {
                at = match child_of.get(&(at, segment)) {
                    Some(&child) => child,
                    None => {
                        let child = nodes.len();
                        nodes.push(Node {
                            segment,
                            parent: at,
                            modules: Vec::new(),
                            children: Vec::new(),
                            id: 0,
                            order: Children::Known(Vec::new()),
                            every_order: false,
                        });
                        nodes[at].children.push(child);
                        child_of.insert((at, segment), child);
                        child
                    }
                };
            }
            nodes[at].modules.push(i);
            node_of.push(at);
        }
        Tree { nodes, sequence, node_of }
    }

    /// Gives every node the id of its subtree (`tokens[i]`: module `i`'s).
    pub fn assign_ids(&mut self, tokens: &[u32], ids: &mut SubtreeIds) {
        // Children are created after their parents: backwards is bottom-up.
        for n in (0..self.nodes.len()).rev() {
            let mut own: Vec<u32> = self.nodes[n].modules.iter().map(|&m| tokens[m]).collect();
            own.sort_unstable();
            let mut children: Vec<u32> = self.nodes[n].children.iter().map(|&c| self.nodes[c].id).collect();
            children.sort_unstable();
            let next = ids.len() as u32;
            self.nodes[n].id = *ids.entry((own, children)).or_insert(next);
        }
    }

    /// Decides how each node's children are ordered (see the module docs);
    /// `other` is the other side, with its ids assigned.
    pub fn settle(&mut self, other: &Tree) {
        let mut other_by_id: HashMap<u32, usize> = HashMap::new();
        for (n, node) in other.nodes.iter().enumerate() {
            other_by_id.entry(node.id).or_insert(n);
        }
        for n in 0..self.nodes.len() {
            let (order, every) = match self.child_order(n, other, &other_by_id) {
                Children::Open(orders) => {
                    let every = self.every_order_listed(n, &orders);
                    (Children::Open(orders), every)
                }
                known => (known, false),
            };
            self.nodes[n].order = order;
            self.nodes[n].every_order = every;
        }
    }

    /// Whether `orders` of node `n`'s open children are every order they can
    /// have: no two children alike (alike ones are tried in one assignment
    /// only) and all distinct sequences listed.
    fn every_order_listed(&self, n: usize, orders: &[Vec<usize>]) -> bool {
        let children = &self.nodes[n].children;
        let mut ids: Vec<u32> = children.iter().map(|&c| self.nodes[c].id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return false;
        }
        // Named children (indices keep their order among themselves): k! orders.
        let named = children.iter().filter(|&&c| !is_index(self.nodes[c].segment)).count();
        let indexed = children.len() - named;
        // Orders of n children whose `indexed` ones keep their relative order:
        // n! / indexed!.
        let mut all: usize = 1;
        for k in (indexed + 1)..=children.len() {
            all = all.saturating_mul(k);
        }
        orders.len() == all
    }

    fn child_order(&self, n: usize, other: &Tree, other_by_id: &HashMap<u32, usize>) -> Children {
        let node = &self.nodes[n];
        if self.sequence == Sequence::Registration {
            return Children::Known(node.children.clone());
        }
        let mut natural = node.children.clone();
        natural.sort_by(|&x, &y| natural_cmp(self.nodes[x].segment, self.nodes[y].segment));
        let named = node.children.iter().filter(|&&c| !is_index(self.nodes[c].segment)).count();
        if named == 0 || node.children.len() == 1 {
            return Children::Known(natural);
        }
        if named < node.children.len() {
            return self.open(n);
        }
        let mut child_ids: Vec<u32> = node.children.iter().map(|&c| self.nodes[c].id).collect();
        child_ids.sort_unstable();
        let alike = child_ids.windows(2).any(|w| w[0] == w[1]);
        // Named children, all different: ordered as the other side's identical
        // subtree orders them, if it has one. (An edit inside a child makes the
        // two differ: then the order stays open.)
        let Some(&twin) = other_by_id.get(&node.id) else { return self.open(n) };
        if alike {
            // Alike children (a block's `bn1` and `bn2`) cannot be told apart by
            // what they hold; where the identical subtree on the other side
            // holds them under the same names, the names tell them apart.
            return match self.by_twin_names(n, other, twin) {
                Some(order) => Children::Known(order),
                None => self.open(n),
            };
        }
        let order: Vec<u32> = match other.sequence {
            Sequence::Registration => other.nodes[twin].children.iter().map(|&c| other.nodes[c].id).collect(),
            // Both sides lost their order: the twins share one canonical order.
            Sequence::Natural => child_ids,
        };
        let mut ranked = node.children.clone();
        ranked.sort_by_key(|&c| order.iter().position(|&id| id == self.nodes[c].id));
        Children::Known(ranked)
    }

    /// Node `n`'s children in the order of `twin`'s (an identical subtree of
    /// `other`), each taken as the child of `twin` with its id *and* its name;
    /// `None` unless every child has such a counterpart.
    fn by_twin_names(&self, n: usize, other: &Tree, twin: usize) -> Option<Vec<usize>> {
        let mut theirs: Vec<usize> = other.nodes[twin].children.clone();
        if other.sequence == Sequence::Natural {
            // Both sides lost their order: one canonical order, by id then name.
            theirs.sort_by(|&x, &y| {
                (other.nodes[x].id, other.nodes[x].segment).cmp(&(other.nodes[y].id, other.nodes[y].segment))
            });
        }
        let mine = &self.nodes[n].children;
        if theirs.len() != mine.len() {
            return None;
        }
        theirs
            .iter()
            .map(|&c| {
                let (id, segment) = (other.nodes[c].id, other.nodes[c].segment);
                mine.iter().copied().find(|&m| self.nodes[m].id == id && self.nodes[m].segment == segment)
            })
            .collect()
    }

    /// The orders tried for node `n`'s children, whose order is lost: every
    /// distinct sequence of their subtrees (children with equal subtrees are
    /// interchangeable), indices kept in index order; names ascending first.
    fn open(&self, n: usize) -> Children {
        let node = &self.nodes[n];
        let mut children = node.children.clone();
        children.sort_by(|&x, &y| self.open_cmp(x, y));
        // Each distinct sequence of ids, from the sorted one on (next permutation).
        let mut ids: Vec<u32> = children.iter().map(|&c| self.nodes[c].id).collect();
        ids.sort_unstable();
        let mut orders: Vec<Vec<usize>> = vec![children.clone()];
        let ids_of = |order: &[usize]| -> Vec<u32> { order.iter().map(|&c| self.nodes[c].id).collect() };
        let mut seen: Vec<Vec<u32>> = vec![ids_of(&children)];
        // From the sorted sequence on, the sorted one included (it need not be
        // the names' order, which is tried first).
        let mut steps = 0;
        loop {
            steps += 1;
            if !seen.contains(&ids) {
                let mut unused = children.clone();
                let order: Vec<usize> = ids
                    .iter()
                    .map(|&id| {
                        let at = unused.iter().position(|&c| self.nodes[c].id == id).unwrap_or(0);
                        unused.remove(at)
                    })
                    .collect();
                let indices: Vec<&str> =
                    order.iter().map(|&c| self.nodes[c].segment).filter(|s| is_index(s)).collect();
                if indices.windows(2).all(|w| natural_cmp(w[0], w[1]) == Ordering::Less) {
                    seen.push(ids.clone());
                    orders.push(order);
                }
            }
            if orders.len() >= MAX_ORDERS || steps >= 100 * MAX_ORDERS || !next_permutation(&mut ids) {
                break;
            }
        }
        Children::Open(orders)
    }

    /// How many linear orders of this side to align: one when nothing is open;
    /// else enough to try every order of the most open group at least twice.
    pub fn attempts(&self) -> u64 {
        let most = self
            .nodes
            .iter()
            .map(|n| match &n.order {
                Children::Open(orders) => orders.len(),
                Children::Known(_) => 1,
            })
            .max()
            .unwrap_or(1);
        if most == 1 {
            1
        } else {
            (2 * most).clamp(MIN_ATTEMPTS, MAX_ORDERS) as u64
        }
    }

    /// Module indices in pre-order; an open group's children in the
    /// `attempt`-th of its orders (in turn, then chosen by a seed).
    pub fn linear(&self, attempt: u64) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.node_of.len());
        let mut stack = vec![0usize];
        while let Some(n) = stack.pop() {
            let node = &self.nodes[n];
            out.extend(&node.modules);
            let children = match &node.order {
                Children::Known(order) => order,
                Children::Open(orders) => {
                    let k = attempt as usize;
                    let pick = if k < 2 {
                        k % orders.len()
                    } else {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        (attempt, n).hash(&mut h);
                        (h.finish() % orders.len() as u64) as usize
                    };
                    &orders[pick]
                }
            };
            stack.extend(children.iter().rev());
        }
        out
    }

    /// The number of orders of each open group (in node order) when every
    /// open group lists every order its children can have; `None` otherwise.
    pub fn every_order(&self) -> Option<Vec<usize>> {
        let mut counts = Vec::new();
        for node in &self.nodes {
            if let Children::Open(orders) = &node.order {
                if !node.every_order {
                    return None;
                }
                counts.push(orders.len());
            }
        }
        Some(counts)
    }

    /// Module indices in pre-order, open group `k` (in node order) in its
    /// `choice[k]`-th order.
    pub fn linear_chosen(&self, choice: &[usize]) -> Vec<usize> {
        let mut group_of: HashMap<usize, usize> = HashMap::new();
        for (n, node) in self.nodes.iter().enumerate() {
            if matches!(node.order, Children::Open(_)) {
                let k = group_of.len();
                group_of.insert(n, k);
            }
        }
        let mut out = Vec::with_capacity(self.node_of.len());
        let mut stack = vec![0usize];
        while let Some(n) = stack.pop() {
            let node = &self.nodes[n];
            out.extend(&node.modules);
            let children = match &node.order {
                Children::Known(order) => order,
                Children::Open(orders) => {
                    let pick = group_of.get(&n).and_then(|&k| choice.get(k)).copied().unwrap_or(0);
                    &orders[pick.min(orders.len() - 1)]
                }
            };
            stack.extend(children.iter().rev());
        }
        out
    }

    /// Open siblings as first tried: indices first, as numbers, then names.
    fn open_cmp(&self, x: usize, y: usize) -> Ordering {
        let (a, b) = (self.nodes[x].segment, self.nodes[y].segment);
        match (is_index(a), is_index(b)) {
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            _ => natural_cmp(a, b),
        }
    }

    /// For each module: whether its token occurs inside a group of open
    /// siblings. The order of such a group decides which of the modules of that
    /// token line up with which on the other side — inside the group or next to
    /// it — so none of them is paired by position.
    pub fn place_unknown(&self, tokens: &[u32]) -> Vec<bool> {
        let inside_open = |m: usize| {
            let mut child = self.node_of[m];
            while child != 0 {
                let parent = self.nodes[child].parent;
                if matches!(self.nodes[parent].order, Children::Open(_)) {
                    return true;
                }
                child = parent;
            }
            false
        };
        let open_tokens: std::collections::HashSet<u32> =
            tokens.iter().enumerate().filter(|(m, _)| inside_open(*m)).map(|(_, &t)| t).collect();
        tokens.iter().map(|t| open_tokens.contains(t)).collect()
    }
}

/// Rearranges `v` into the next greater permutation; `false` after the last.
fn next_permutation(v: &mut [u32]) -> bool {
    let Some(i) = (1..v.len()).rev().find(|&i| v[i - 1] < v[i]) else { return false };
    let j = (i..v.len()).rev().find(|&j| v[j] > v[i - 1]).unwrap_or(i);
    v.swap(i - 1, j);
    v[i..].reverse();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_permutation_walks_distinct_orders_of_a_multiset() {
        let mut v = vec![3, 3, 4];
        let mut seen = vec![v.clone()];
        while next_permutation(&mut v) {
            seen.push(v.clone());
        }
        assert_eq!(seen, [vec![3, 3, 4], vec![3, 4, 3], vec![4, 3, 3]]);
    }
}
