//! The `order` matcher: modules aligned, tensors paired inside aligned modules
//! by leaf name — never across leaves (DESIGN.md, "Matchers").
//!
//! 1. Entries are grouped into modules (the name without its leaf). A module's
//!    signature is its leaves with role, dtype class and shape;
//!    `num_batches_tracked` is left out of it (tch's `batch_norm` and old
//!    checkpoints have none) and pairs only where both modules have one.
//! 2. Modules are compatible when their signatures are equal. A conv with a bias
//!    and one without are *not*: pairing the weight alone would leave half a
//!    layer with the target's own values while the module looks transferred, and
//!    loosening signatures makes the alignment guess more. Both stay over, and a
//!    rule pairs them on purpose.
//! 3. The two module sequences are aligned ([`super::align`]); name evidence
//!    (equal non-index path segments) breaks ties. A module pair is made only
//!    when every best alignment makes it; otherwise it is reported as ambiguous
//!    and left over: position alone never decides.
//! 4. A side without a registration order ([`Sequence::Natural`]) still shows
//!    its module tree in its names ([`super::tree`]): indexed children are in
//!    index order; named children whose subtrees all differ take the order of
//!    the other side's identical subtree; other named children are *open*. The
//!    alignment is repeated over the distinct orders of open groups (in turn,
//!    then chosen by seeds), and a pair stands only if every one makes it. A
//!    module whose signature occurs inside an open group is never paired by
//!    position: the group's order would decide which module of that signature
//!    lines up with which.
//!
//! With both orders known and the two models differing by layers added on one
//! side, a pair that every best alignment makes is the true one (the true
//! correspondence is one of the best alignments). On a reconstructed order that
//! argument holds for the orders tried; `order_cases` checks the whole on random
//! nested networks whose true correspondence is known.
use std::collections::{HashMap, HashSet};

use super::align::{align, Alignment};
use super::tree::{SubtreeIds, Tree};
use super::{How, Item, Matches, ModuleAmbiguity, ModuleMatch, Sequence, Unsure};
use crate::dotted::{is_index, leaf, module_and_leaf};
use crate::entry::Role;

/// Tokens from here up never pair (modules with no signature, modules whose
/// place is unknown): each module gets its own.
const UNIQUE: u32 = 1 << 31;
/// The leaf that is not part of a signature.
const NBT: &str = "num_batches_tracked";
/// Candidates listed per ambiguous module.
const CANDIDATES_SHOWN: usize = 8;

/// One module of one side, as the matcher sees it.
struct Module<'a> {
    /// Module path of the (renamed) names: what pairs.
    path: &'a str,
    /// Module path of the store's own names: what is shown, and what the
    /// natural order and its unknowns are worked out on.
    original: &'a str,
    /// Indices of its entries.
    leaves: Vec<usize>,
    /// Its signature's token (equal tokens: compatible modules).
    token: u32,
}

type Leaf<'a> = (&'a str, Role, crate::dtype::DtypeClass, &'a [i64]);

fn group<'a>(items: &[Item<'a>], taken: &[bool]) -> Vec<Module<'a>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut modules: Vec<Module> = Vec::new();
    for (i, item) in items.iter().enumerate().filter(|(i, _)| !taken[*i]) {
        let path = module_and_leaf(item.name).0;
        let at = *index.entry(path).or_insert_with(|| {
            let original = module_and_leaf(item.original).0;
            modules.push(Module { path, original, leaves: Vec::new(), token: 0 });
            modules.len() - 1
        });
        modules[at].leaves.push(i);
    }
    modules
}

/// Gives every module the token of its signature; shared by both sides so that
/// equal signatures get equal tokens.
fn tokenize<'a>(
    items: &[Item<'a>],
    modules: &mut [Module<'a>],
    ids: &mut HashMap<Vec<Leaf<'a>>, u32>,
    unique: &mut u32,
) {
    for module in modules {
        let mut signature: Vec<Leaf> = module
            .leaves
            .iter()
            .map(|&i| &items[i])
            .filter(|item| leaf(item.name) != NBT)
            .map(|item| (leaf(item.name), item.role, item.class, item.shape))
            .collect();
        module.token = if signature.is_empty() {
            *unique += 1;
            *unique
        } else {
            signature.sort_unstable();
            let next = ids.len() as u32;
            *ids.entry(signature).or_insert(next)
        };
    }
}

/// Name evidence that two module paths are the same module: equal named
/// segments at equal distance from the end (indices are no evidence: inserting
/// a layer renumbers a `Sequential`).
fn evidence(a: &str, b: &str) -> u64 {
    a.rsplit('.').zip(b.rsplit('.')).filter(|(x, y)| x == y && !x.is_empty() && !is_index(x)).count() as u64
}

/// Pairs what is free in `sources` and `targets` by module alignment.
pub(super) fn run(
    sources: &[Item],
    targets: &[Item],
    taken_source: &[bool],
    taken_target: &[bool],
    (source_sequence, target_sequence): (Sequence, Sequence),
    out: &mut Matches,
) {
    let mut s = group(sources, taken_source);
    let mut t = group(targets, taken_target);
    // Modules whose place a reconstructed order cannot tell keep their places
    // in the alignment (taking them out would look like a layer removed) but are
    // never paired.
    let mut ids = HashMap::new();
    let mut unique = UNIQUE;
    tokenize(sources, &mut s, &mut ids, &mut unique);
    tokenize(targets, &mut t, &mut ids, &mut unique);

    // Modules whose place a reconstructed order cannot tell: left over, each
    // with the modules of the other side it could have been.
    let (s_tokens, t_tokens): (Vec<u32>, Vec<u32>) =
        (s.iter().map(|m| m.token).collect(), t.iter().map(|m| m.token).collect());
    let mut s_tree = Tree::new(s.iter().map(|m| m.original), source_sequence);
    let mut t_tree = Tree::new(t.iter().map(|m| m.original), target_sequence);
    let mut subtrees = SubtreeIds::new();
    s_tree.assign_ids(&s_tokens, &mut subtrees);
    t_tree.assign_ids(&t_tokens, &mut subtrees);
    s_tree.settle(&t_tree);
    t_tree.settle(&s_tree);
    let every = every_combination(&s_tree, &t_tree);
    let (unknown_s, unknown_t) = match every {
        // Every order is tried: none is placed by a guess (see `every_combination`).
        Some(_) => (vec![false; s.len()], vec![false; t.len()]),
        None => (s_tree.place_unknown(&s_tokens), t_tree.place_unknown(&t_tokens)),
    };
    for (modules, others, unknown, from_source) in [(&s, &t, &unknown_s, true), (&t, &s, &unknown_t, false)] {
        for (m, _) in modules.iter().zip(unknown).filter(|(_, u)| **u) {
            let candidates: Vec<&Module> = others.iter().filter(|o| o.token == m.token).collect();
            if !candidates.is_empty() {
                out.module_ambiguities.push(ambiguity(
                    m.original,
                    from_source,
                    &candidates,
                    Unsure::PlaceUnknown,
                ));
            }
        }
    }
    // Align in every linear order tried; a pair stands only if every one of
    // them makes it in every best alignment.
    let (s_orders, t_orders): (Vec<Vec<usize>>, Vec<Vec<usize>>) = match &every {
        Some(combinations) => {
            combinations.iter().map(|(sc, tc)| (s_tree.linear_chosen(sc), t_tree.linear_chosen(tc))).unzip()
        }
        None => {
            let tries = s_tree.attempts().max(t_tree.attempts());
            let orders = |tree: &Tree| -> Vec<Vec<usize>> { (0..tries).map(|e| tree.linear(e)).collect() };
            (orders(&s_tree), orders(&t_tree))
        }
    };
    let tries = s_orders.len().max(t_orders.len());
    let mut alignments = Vec::with_capacity(tries);
    for attempt in 0..tries {
        let (so, to) = (&s_orders[attempt % s_orders.len()], &t_orders[attempt % t_orders.len()]);
        let a: Vec<u32> = so.iter().map(|&i| s[i].token).collect();
        let b: Vec<u32> = to.iter().map(|&j| t[j].token).collect();
        let alignment = align(&a, &b, |i, j| evidence(s[so[i]].path, t[to[j]].path));
        if alignment.gave_up {
            out.unaligned = Some((s.len(), t.len()));
            return;
        }
        alignments.push((so, to, alignment));
    }
    if every.is_some() {
        // Every order was tried, so the true one is among them; and with the
        // models differing by layers added on one side, the true order aligns
        // every module of the smaller side: the most modules any order aligns.
        // Orders that align fewer are not the true one.
        let most = alignments.iter().map(|(_, _, a)| a.length).max().unwrap_or(0);
        alignments.retain(|(_, _, a)| a.length == most);
    }
    let mut certain: Vec<(usize, usize)> = Vec::new();
    for (attempt, (so, to, alignment)) in alignments.into_iter().enumerate() {
        let Alignment { certain: found, uncertain, .. } = alignment;
        let found: Vec<(usize, usize)> = found.into_iter().map(|(i, j)| (so[i], to[j])).collect();
        if attempt == 0 {
            for (i, candidates) in uncertain {
                let candidates: Vec<&Module> = candidates.iter().map(|&j| &t[to[j]]).collect();
                out.module_ambiguities.push(ambiguity(s[so[i]].original, true, &candidates, Unsure::Tie));
            }
            certain = found;
        } else {
            let kept: HashSet<(usize, usize)> = found.into_iter().collect();
            let (stay, go): (Vec<_>, Vec<_>) = certain.into_iter().partition(|p| kept.contains(p));
            // (Reported once per source module.)
            for (i, j) in go {
                out.module_ambiguities.push(ambiguity(s[i].original, true, &[&t[j]], Unsure::PlaceUnknown));
            }
            certain = stay;
        }
    }
    certain.retain(|&(i, j)| !unknown_s[i] && !unknown_t[j]);
    // One report per module: the first reason found.
    let mut reported = HashSet::new();
    out.module_ambiguities.retain(|a| reported.insert((a.from_source, a.module.clone())));
    let reconstructed = source_sequence == Sequence::Natural || target_sequence == Sequence::Natural;
    for (i, j) in certain {
        let (sm, tm) = (&s[i], &t[j]);
        let how = if reconstructed && evidence(sm.path, tm.path) == 0 {
            How::ReconstructedOrder
        } else {
            How::Order
        };
        let by_leaf: HashMap<&str, usize> = tm.leaves.iter().map(|&y| (leaf(targets[y].name), y)).collect();
        let mut tensors = 0;
        for &x in &sm.leaves {
            // Equal signatures have equal leaves; num_batches_tracked may be on one side only.
            if let Some(&y) = by_leaf.get(leaf(sources[x].name)) {
                out.pairs.push((x, y, how));
                tensors += 1;
            }
        }
        out.modules.push(ModuleMatch {
            source: sm.original.to_string(),
            target: tm.path.to_string(),
            how,
            tensors,
        });
    }
}

/// Linear orders tried at most when every combination of open groups'
/// orders is tried.
const MAX_COMBINATIONS: usize = 64;

/// Every combination of the open groups' orders of both sides — `(source
/// choice, target choice)`, an order index per open group — when every open
/// group lists every order its children can have and there are at most
/// [`MAX_COMBINATIONS`]; `None` when some group is open with orders left out
/// (alike children, too many), or nothing is open.
///
/// Then the true order is one of those tried, and a pair that every best
/// alignment of every order that aligns the most modules makes is true, as on
/// known orders (see the module docs): no module needs to be left over only
/// because its signature occurs inside an open group. One open pair of
/// siblings (`features` and `classifier`) no longer blocks every module below it.
fn every_combination(s: &Tree, t: &Tree) -> Option<Vec<(Vec<usize>, Vec<usize>)>> {
    let (sc, tc) = (s.every_order()?, t.every_order()?);
    if sc.is_empty() && tc.is_empty() {
        return None;
    }
    let total = sc.iter().chain(&tc).try_fold(1usize, |acc, &k| acc.checked_mul(k))?;
    if total > MAX_COMBINATIONS {
        return None;
    }
    let counts: Vec<usize> = sc.iter().chain(&tc).copied().collect();
    let mut out = Vec::with_capacity(total);
    for mut index in 0..total {
        let mut choice = Vec::with_capacity(counts.len());
        for &k in &counts {
            choice.push(index % k);
            index /= k;
        }
        let target = choice.split_off(sc.len());
        out.push((choice, target));
    }
    Some(out)
}

fn ambiguity(module: &str, from_source: bool, candidates: &[&Module], why: Unsure) -> ModuleAmbiguity {
    ModuleAmbiguity {
        from_source,
        module: module.to_string(),
        candidates: candidates.iter().take(CANDIDATES_SHOWN).map(|m| m.original.to_string()).collect(),
        more: candidates.len().saturating_sub(CANDIDATES_SHOWN),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_counts_equal_names_not_indices() {
        assert_eq!(evidence("encoder.layer1.0.conv1", "backbone.layer1.0.conv1"), 2);
        assert_eq!(evidence("features.3", "blocks.3"), 0);
        assert_eq!(evidence("", ""), 0);
    }
}
