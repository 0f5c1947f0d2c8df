//! What follows from the pairs once they are made: shape, cast and role
//! findings per pair; leftovers, and which of them are explained
//! (`num_batches_tracked` with no counterpart); hints for leftovers that a rule
//! would pair; BatchNorm modules copied in part.
use std::collections::HashMap;

use super::build::{Builder, PAIRS_PER_THREAD};
use super::{Cast, Finding, Kept, Leftover, Pair, Plan, Side};
use crate::chunks;
use crate::dotted::module_and_leaf;
use crate::entry::Entry;
use crate::matching::Matcher;
use crate::transform::{shape_text, Op};

/// Where the pairs into one target write, when a transform writes into a
/// region of it: the regions must tile the target exactly (a `cat`'s members
/// side by side, a `stack`'s members one index each), or some of it would keep
/// old values or be written twice.
fn regions_problem(pairs: &[&Pair], target: &Entry) -> Option<String> {
    let regions: Vec<&[Op]> =
        pairs.iter().map(|p| p.transform.as_ref().map_or(&[][..], |t| t.target_ops.as_slice())).collect();
    if regions.len() == 1 && regions[0].is_empty() {
        return None;
    }
    (!crate::transform::tiles(&regions, &target.shape)).then(|| {
        format!("{} receives {} pair(s) whose regions do not tile it exactly", target.name, pairs.len())
    })
}

/// What is wrong with one pair, if anything: shapes, a lossy cast, roles.
fn pair_findings(p: &Pair, s: &Entry, t: &Entry, out: &mut Vec<Finding>) {
    if let Some(transform) = &p.transform {
        let problem = match transform.result_shapes() {
            Err(problem) => Some(problem),
            Ok((written, region)) if written != region => Some(format!(
                "it makes {} of {} {}, and {} receives {}",
                shape_text(&written),
                s.name,
                shape_text(&s.shape),
                t.name,
                shape_text(&region)
            )),
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            let rule = p.rule.as_deref().map_or_else(|| p.provenance(), str::to_string);
            out.push(Finding::Transform {
                rule,
                tensors: vec![
                    format!("{} {}", s.name, shape_text(&s.shape)),
                    format!("{} {}", t.name, shape_text(&t.shape)),
                ],
                problem,
            });
        }
    } else if s.shape != t.shape {
        out.push(Finding::ShapeMismatch {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_shape: s.shape.clone(),
            target_shape: t.shape.clone(),
            provenance: p.provenance(),
        });
    }
    if let Some(Cast { from, to, lossy: Some(reason) }) = &p.cast {
        let (source, target, reason) = (s.name.to_string(), t.name.to_string(), reason.clone());
        if from.is_stored_only() || to.is_stored_only() {
            out.push(Finding::RefusedCast { source, target, reason });
        } else {
            out.push(Finding::LossyCast { source, target, reason });
        }
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

/// Whether shapes `a` and `b` (of as many elements) differ only by merging
/// neighbouring dimensions or splitting them (and dimensions of size 1): a
/// reshape between them keeps every row where it was.
pub(super) fn merges_or_splits(a: &[i64], b: &[i64]) -> bool {
    let a: Vec<i64> = a.iter().copied().filter(|&d| d != 1).collect();
    let b: Vec<i64> = b.iter().copied().filter(|&d| d != 1).collect();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (mut pa, mut pb, start_i, start_j) = (a[i], b[j], i, j);
        i += 1;
        j += 1;
        while pa != pb {
            if pa < pb && i < a.len() {
                pa *= a[i];
                i += 1;
            } else if pb < pa && j < b.len() {
                pb *= b[j];
                j += 1;
            } else {
                return false;
            }
        }
        if i - start_i > 1 && j - start_j > 1 {
            return false;
        }
    }
    i == a.len() && j == b.len()
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
        // A reshape is only suggested where it merges or splits neighbouring
        // dimensions ([96, 1, 1] and [96]; [4096, 25088] and [4096, 512, 7, 7]):
        // between [3, 5] and [5, 3] it would scramble what a transpose keeps,
        // so no rule is offered for those.
        let reshape = match t.shape.len() {
            _ if s.shape == t.shape => Some(String::new()),
            _ if !merges_or_splits(&s.shape, &t.shape) => None,
            1 => Some(" | reshape(-1)".to_string()),
            _ => Some(format!(
                " | reshape({})",
                t.shape.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            )),
        };
        let rule = reshape.map(|r| format!("{} => {}{r}", regex::escape(&s.name), t.name.replace('$', "$$")));
        findings.push(Finding::CouldPair {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_shape: s.shape.clone(),
            target_shape: t.shape.clone(),
            rule,
        });
    }
}

/// Candidates of one leaf and shape compared by name, at most.
const MAX_NEAR_CANDIDATES: usize = 256;

/// For each open leftover, the open leftover of the other side it most likely
/// is: one of the same leaf, shape and dtype class (what the order matcher
/// would align), nearest in name. Structure first, spelling second: two
/// models that number their stages differently put `layers.1.x` where the
/// other has `layers.3.x`, which spelling alone would not find.
fn near_leftovers<'n>(
    sources: &'n [Entry],
    targets: &'n [Entry],
    source_name: impl Fn(usize) -> &'n str,
    source_leftovers: &mut [Leftover],
    target_leftovers: &mut [Leftover],
) {
    type Key<'k> = (&'k str, &'k [i64], crate::dtype::DtypeClass);
    let key =
        |e: &'n Entry| -> Key<'n> { (crate::dotted::leaf(&e.name), &e.shape, crate::dtype::class(e.dtype)) };
    let bucket = |list: &[Leftover], entries: &'n [Entry]| {
        let mut by: HashMap<Key<'n>, Vec<usize>> = HashMap::new();
        for l in list.iter().filter(|l| l.explained.is_none()) {
            by.entry(key(&entries[l.index])).or_default().push(l.index);
        }
        by
    };
    let nearest = |name: &str, candidates: &[usize], other: &dyn Fn(usize) -> &'n str| {
        candidates
            .iter()
            .take(MAX_NEAR_CANDIDATES)
            .map(|&c| (strsim::normalized_levenshtein(name, other(c)), c))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| c)
    };
    let (by_target, by_source) = (bucket(target_leftovers, targets), bucket(source_leftovers, sources));
    let target_name = |j: usize| targets[j].name.as_str();
    for l in source_leftovers.iter_mut().filter(|l| l.explained.is_none()) {
        if let Some(candidates) = by_target.get(&key(&sources[l.index])) {
            l.near = nearest(source_name(l.index), candidates, &target_name).map(|j| targets[j].name.clone());
        }
    }
    for l in target_leftovers.iter_mut().filter(|l| l.explained.is_none()) {
        if let Some(candidates) = by_source.get(&key(&targets[l.index])) {
            l.near = nearest(&l.name, candidates, &source_name).map(|i| sources[i].name.clone());
        }
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
        if b.pairs.iter().any(|p| p.transform.as_ref().is_some_and(|t| !t.target_ops.is_empty())) {
            let mut into: HashMap<usize, Vec<&Pair>> = HashMap::new();
            for p in &b.pairs {
                into.entry(p.target).or_default().push(p);
            }
            let mut problems: Vec<(usize, Finding)> = into
                .iter()
                .filter_map(|(&j, pairs)| {
                    let problem = regions_problem(pairs, &targets[j])?;
                    let rule = pairs[0].rule.as_deref().map_or_else(|| pairs[0].provenance(), str::to_string);
                    let tensors = pairs.iter().map(|p| p.source_name.to_string()).collect();
                    Some((j, Finding::Transform { rule, tensors, problem }))
                })
                .collect();
            problems.sort_by_key(|(j, _)| *j);
            b.findings.extend(problems.into_iter().map(|(_, f)| f));
        }
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
        // A source tied to a paired one goes with it: not left over.
        let open_source =
            |i: usize, explained: &HashMap<usize, String>| !paired_source[i] && !explained.contains_key(&i);
        if (0..sources.len()).any(|i| open_source(i, &b.source_explained)) {
            for group in b.source.ties() {
                let Some(&with) = group.iter().find(|&&i| paired_source[i]) else { continue };
                for i in
                    group.iter().copied().filter(|&i| open_source(i, &b.source_explained)).collect::<Vec<_>>()
                {
                    let (name, with) = (sources[i].name.to_string(), sources[with].name.to_string());
                    b.source_explained.insert(i, format!("tied to {with}: one tensor, paired through it"));
                    b.findings.push(Finding::SourceTied { source: name, with });
                }
            }
        }
        let mut source_leftovers = Vec::new();
        for (i, e) in sources.iter().enumerate().filter(|(i, _)| !paired_source[*i]) {
            let mut explained = b.source_explained.get(&i).cloned();
            if explained.is_none() && is_nbt(&e.name) && !target_nbt_open {
                explained = Some(
                    "num_batches_tracked with no counterpart: harmless, it only counts training batches"
                        .into(),
                );
                b.findings.push(Finding::NumBatchesTracked { side: Side::Source, name: e.name.to_string() });
            }
            let renamed = match b.renamed.get(i) {
                Some((to, Some(rule))) if explained.is_none() && *to != *e.name => {
                    Some(format!("{to} by rule `{}`", b.rule_texts[*rule]))
                }
                _ => None,
            };
            if explained.is_none() {
                b.findings.push(Finding::Leftover {
                    side: Side::Source,
                    name: e.name.to_string(),
                    renamed: renamed.clone(),
                });
            }
            source_leftovers.push(Leftover {
                side: Side::Source,
                index: i,
                name: e.name.clone(),
                explained,
                renamed,
                near: None,
            });
        }
        // A target tied to a paired one is filled through it: not left over.
        if paired_target.iter().any(|&p| !p) {
            for group in b.target.ties() {
                let Some(&filled) = group.iter().find(|&&j| paired_target[j]) else { continue };
                let unfilled: Vec<usize> = group.iter().copied().filter(|&j| !paired_target[j]).collect();
                for j in unfilled {
                    paired_target[j] = true;
                    b.findings.push(Finding::Tied {
                        target: targets[j].name.to_string(),
                        with: targets[filled].name.to_string(),
                    });
                }
            }
        }
        let mut target_leftovers = Vec::new();
        let mut kept = Vec::new();
        for (j, e) in targets.iter().enumerate().filter(|(j, _)| !paired_target[*j]) {
            if let Some(&Some(k)) = b.kept_by.get(j) {
                let (rule, at) = b.keep_texts[k].clone();
                kept.push(Kept { index: j, name: e.name.clone(), rule, at });
                continue;
            }
            let explained = if is_nbt(&e.name) && !source_nbt_open {
                b.findings.push(Finding::NumBatchesTracked { side: Side::Target, name: e.name.to_string() });
                Some(
                    "num_batches_tracked with no counterpart: keeps its value (harmless, it only counts \
                     training batches)"
                        .into(),
                )
            } else {
                b.findings.push(Finding::Leftover {
                    side: Side::Target,
                    name: e.name.to_string(),
                    renamed: None,
                });
                None
            };
            target_leftovers.push(Leftover {
                side: Side::Target,
                index: j,
                name: e.name.clone(),
                explained,
                renamed: None,
                near: None,
            });
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
        let renamed_name =
            |i: usize| b.renamed.get(i).map_or(sources[i].name.as_str(), |(to, _)| to.as_ref());
        near_leftovers(sources, targets, renamed_name, &mut source_leftovers, &mut target_leftovers);
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
            kept,
            findings: b.findings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::merges_or_splits;

    #[test]
    fn reshapes_are_suggested_only_where_rows_stay_rows() {
        assert!(merges_or_splits(&[96, 1, 1], &[96]));
        assert!(merges_or_splits(&[4096, 25088], &[4096, 512, 7, 7]));
        assert!(merges_or_splits(&[1, 197, 768], &[197, 768]));
        assert!(merges_or_splits(&[6, 4, 5], &[24, 5]));
        assert!(!merges_or_splits(&[3, 5], &[5, 3]));
        assert!(!merges_or_splits(&[6, 4], &[4, 6]));
        assert!(!merges_or_splits(&[6, 4], &[8, 3]));
    }
}
