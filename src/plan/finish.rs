//! What follows from the pairs once they are made: shape, cast and role
//! findings per pair; leftovers, and which of them are explained
//! (`num_batches_tracked` with no counterpart); hints for leftovers that a rule
//! would pair; BatchNorm modules copied in part.
use std::collections::HashMap;

use super::build::{Builder, PAIRS_PER_THREAD};
use super::{Cast, Finding, Leftover, Pair, Plan, Side};
use crate::chunks;
use crate::dotted::module_and_leaf;
use crate::entry::Entry;
use crate::matching::Matcher;

/// What is wrong with one pair, if anything: shapes, a lossy cast, roles.
fn pair_findings(p: &Pair, s: &Entry, t: &Entry, out: &mut Vec<Finding>) {
    if s.shape != t.shape {
        out.push(Finding::ShapeMismatch {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_shape: s.shape.clone(),
            target_shape: t.shape.clone(),
            provenance: p.provenance(),
        });
    }
    if let Some(Cast { lossy: Some(reason), .. }) = &p.cast {
        out.push(Finding::LossyCast {
            source: s.name.to_string(),
            target: t.name.to_string(),
            reason: reason.clone(),
        });
    }
    if s.role != t.role && !s.role_inferred && !t.role_inferred {
        out.push(Finding::RoleMismatch {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_role: s.role,
            target_role: t.role,
        });
    }
}

/// Hints most worth giving per plan.
const MAX_PAIR_HINTS: usize = 64;

/// Left over on both sides with as many elements (`temperature [1]` and
/// `scale [1]`; `[96, 1, 1]` and `[96]`): said, with the rule that would pair
/// them, where the pairing is unique — by element count alone, or by element
/// count and leaf name.
fn pair_hints(
    sources: &[Entry],
    targets: &[Entry],
    source_leftovers: &[Leftover],
    target_leftovers: &[Leftover],
    findings: &mut Vec<Finding>,
) {
    /// How many open leftovers a key has on each side, and the first of each.
    #[derive(Default)]
    struct Count {
        sources: usize,
        source: usize,
        targets: usize,
        target: usize,
    }
    let mut by_numel: HashMap<u64, Count> = HashMap::new();
    let mut by_numel_and_leaf: HashMap<(u64, &str), Count> = HashMap::new();
    for (list, entries, is_source) in [(source_leftovers, sources, true), (target_leftovers, targets, false)]
    {
        for l in list.iter().filter(|l| l.explained.is_none()) {
            let e = &entries[l.index];
            let numel = e.numel();
            if numel == 0 {
                continue;
            }
            for count in [
                by_numel.entry(numel).or_default(),
                by_numel_and_leaf.entry((numel, crate::dotted::leaf(&e.name))).or_default(),
            ] {
                if is_source {
                    count.sources += 1;
                    count.source = l.index;
                } else {
                    count.targets += 1;
                    count.target = l.index;
                }
            }
        }
    }
    let one_each = |c: &Count| (c.sources == 1 && c.targets == 1).then_some((c.source, c.target));
    let mut hints: Vec<(usize, usize)> = by_numel.values().filter_map(one_each).collect();
    hints.extend(
        by_numel_and_leaf
            .iter()
            .filter(|((numel, _), _)| one_each(&by_numel[numel]).is_none())
            .filter_map(|(_, c)| one_each(c)),
    );
    hints.sort_unstable();
    for (i, j) in hints.into_iter().take(MAX_PAIR_HINTS) {
        let (s, t) = (&sources[i], &targets[j]);
        let rule = (s.shape == t.shape)
            .then(|| format!("{} => {}", regex::escape(&s.name), t.name.replace('$', "$$")));
        findings.push(Finding::CouldPair {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_shape: s.shape.clone(),
            target_shape: t.shape.clone(),
            rule,
        });
    }
}

impl Plan {
    /// Everything that follows from the pairs: shape, cast and role findings,
    /// leftovers, BatchNorm groups.
    pub(super) fn finish(mut b: Builder, matcher: Matcher) -> Self {
        let (sources, targets) = (b.source.entries(), b.target.entries());
        let per_pair = chunks::map(b.pairs.len(), PAIRS_PER_THREAD, |range| {
            let mut findings = Vec::new();
            for p in &b.pairs[range] {
                pair_findings(p, &sources[p.source], &targets[p.target], &mut findings);
            }
            findings
        });
        b.findings.extend(per_pair.into_iter().flatten());
        let mut paired_source = vec![false; sources.len()];
        let mut paired_target = vec![false; targets.len()];
        for p in &b.pairs {
            paired_source[p.source] = true;
            paired_target[p.target] = true;
        }
        let is_nbt = |name: &str| module_and_leaf(name).1 == "num_batches_tracked";
        // A num_batches_tracked left over is explained only when the other side
        // has none left over either: otherwise the two should probably pair.
        let open_nbt = |entries: &[Entry], paired: &[bool]| {
            entries.iter().zip(paired).any(|(e, &p)| !p && is_nbt(&e.name))
        };
        let (source_nbt_open, target_nbt_open) =
            (open_nbt(sources, &paired_source), open_nbt(targets, &paired_target));
        let mut source_leftovers = Vec::new();
        for (i, e) in sources.iter().enumerate().filter(|(i, _)| !paired_source[*i]) {
            let mut explained = b.source_explained.get(&i).cloned();
            if explained.is_none() && is_nbt(&e.name) && !target_nbt_open {
                explained = Some(
                    "num_batches_tracked with no counterpart: harmless, it only counts training batches"
                        .into(),
                );
                b.findings.push(Finding::NumBatchesTracked { side: Side::Source, name: e.name.to_string() });
            } else if explained.is_none() {
                b.findings.push(Finding::Leftover { side: Side::Source, name: e.name.to_string() });
            }
            source_leftovers.push(Leftover { side: Side::Source, index: i, name: e.name.clone(), explained });
        }
        let mut target_leftovers = Vec::new();
        for (j, e) in targets.iter().enumerate().filter(|(j, _)| !paired_target[*j]) {
            let explained = if is_nbt(&e.name) && !source_nbt_open {
                b.findings.push(Finding::NumBatchesTracked { side: Side::Target, name: e.name.to_string() });
                Some(
                    "num_batches_tracked with no counterpart: keeps its value (harmless, it only counts \
                     training batches)"
                        .into(),
                )
            } else {
                b.findings.push(Finding::Leftover { side: Side::Target, name: e.name.to_string() });
                None
            };
            target_leftovers.push(Leftover { side: Side::Target, index: j, name: e.name.clone(), explained });
        }
        // BatchNorm groups of the target (modules with running statistics):
        // weight, bias and statistics go together. Only a module with a target
        // entry left over can be copied in part, so only those are counted.
        #[derive(Default)]
        struct Group {
            mean: bool,
            var: bool,
            copied: usize,
            missing: usize,
        }
        let mut groups: HashMap<&str, Group> = target_leftovers
            .iter()
            .filter(|l| !is_nbt(&l.name))
            .map(|l| (module_and_leaf(&targets[l.index].name).0, Group::default()))
            .collect();
        if !groups.is_empty() {
            for (j, e) in targets.iter().enumerate() {
                let (module, leaf) = module_and_leaf(&e.name);
                let Some(group) = groups.get_mut(module) else { continue };
                group.mean |= leaf == "running_mean";
                group.var |= leaf == "running_var";
                if leaf != "num_batches_tracked" {
                    if paired_target[j] {
                        group.copied += 1;
                    } else {
                        group.missing += 1;
                    }
                }
            }
        }
        let mut partial: Vec<&str> = groups
            .iter()
            .filter(|(_, g)| g.mean && g.var && g.copied > 0 && g.missing > 0)
            .map(|(m, _)| *m)
            .collect();
        partial.sort_unstable();
        for module in partial {
            let members = targets
                .iter()
                .enumerate()
                .filter(|(_, e)| module_and_leaf(&e.name).0 == module && !is_nbt(&e.name));
            let (copied, missing): (Vec<_>, Vec<_>) = members.partition(|(j, _)| paired_target[*j]);
            let leaf = |(_, e): &(usize, &Entry)| module_and_leaf(&e.name).1.to_string();
            b.findings.push(Finding::PartialBatchNorm {
                module: module.to_string(),
                copied: copied.iter().map(leaf).collect(),
                missing: missing.iter().map(leaf).collect(),
            });
        }
        pair_hints(sources, targets, &source_leftovers, &target_leftovers, &mut b.findings);
        Plan {
            source: b.source.origin().to_string(),
            target: b.target.origin().to_string(),
            matcher,
            pairs: b.pairs,
            modules: b.modules,
            order: b.order,
            source_leftovers,
            target_leftovers,
            findings: b.findings,
        }
    }
}
