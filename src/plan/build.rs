//! [`Plan::build`], in steps that can be read one at a time: the rules (renames,
//! skips, collisions), the pairs the renamed names make, the matcher for the
//! rest; then what follows from the pairs (shape, cast and role findings,
//! leftovers and their explanations, BatchNorm groups).
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::{Cast, Finding, Leftover, Mapping, OrderUsed, Orders, Pair, Plan, Side};
use crate::chunks;
use crate::dotted::module_and_leaf;
use crate::dtype;
use crate::entry::{Entry, EntryOrder, Role};
use crate::error::Result;
use crate::matching::{self, How, Item, Matcher, ModuleMatch, Sequence};
use crate::rules::{Outcome, Rules};
use crate::store::Source;

/// Pairs per core above which pairing and checking pairs is split across cores.
const PAIRS_PER_THREAD: usize = 8192;

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

/// What the rules do to each entry's name, in order; large lists are split
/// across the machine's cores.
fn apply_rules(rules: &Rules, entries: &[Entry]) -> Vec<Outcome> {
    if rules.is_empty() {
        return vec![Outcome::Kept; entries.len()];
    }
    chunks::map(entries.len(), PAIRS_PER_THREAD, |range| {
        entries[range].iter().map(|e| rules.apply(&e.name)).collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// Accumulates a plan while it is being built.
pub(super) struct Builder<'a> {
    source: &'a dyn Source,
    target: &'a dyn Source,
    /// Each rule as written, rendered once.
    rule_texts: Vec<Arc<str>>,
    pub(super) pairs: Vec<Pair>,
    findings: Vec<Finding>,
    source_explained: HashMap<usize, String>,
    modules: Vec<ModuleMatch>,
    order: Option<Orders>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(source: &'a dyn Source, target: &'a dyn Source, rule_texts: Vec<Arc<str>>) -> Self {
        Builder {
            source,
            target,
            rule_texts,
            pairs: Vec::with_capacity(source.entries().len().min(target.entries().len())),
            findings: Vec::new(),
            source_explained: HashMap::new(),
            modules: Vec::new(),
            order: None,
        }
    }

    pub(super) fn pair(&mut self, i: usize, j: usize, rule: Option<usize>, how: How) {
        let pair = self.make_pair(i, j, rule, how);
        self.pairs.push(pair);
    }

    fn make_pair(&self, i: usize, j: usize, rule: Option<usize>, how: How) -> Pair {
        let (s, t) = (&self.source.entries()[i], &self.target.entries()[j]);
        let cast = (s.dtype != t.dtype).then(|| {
            let lossy = dtype::static_loss(s.dtype, t.dtype);
            Cast { from: s.dtype, to: t.dtype, lossy }
        });
        Pair {
            source: i,
            target: j,
            source_name: s.name.clone(),
            target_name: t.name.clone(),
            rule: rule.map(|r| Arc::clone(&self.rule_texts[r])),
            how,
            cast,
        }
    }
}

impl Plan {
    /// Maps `source` onto `target`: rules, then the matcher; then every finding.
    /// Reads tensor values only to decide whether a narrowing cast fits.
    pub fn build(source: &dyn Source, target: &dyn Source, mapping: &Mapping) -> Result<Self> {
        let lent = match &mapping.source_order {
            Some(order) if mapping.matcher == Matcher::Order => Some(order.sequence(source.entries())?),
            _ => None,
        };
        Ok(Self::finish(Self::pair_up(source, target, mapping, lent.as_deref()), mapping.matcher))
    }

    /// Rules, then the matcher: every pair, and the findings about how they were
    /// made. `lent`: the source's indices in an order lent by `--order-from`.
    fn pair_up<'a>(
        source: &'a dyn Source,
        target: &'a dyn Source,
        mapping: &Mapping,
        lent: Option<&[usize]>,
    ) -> Builder<'a> {
        let (sources, targets) = (source.entries(), target.entries());
        // Two models of one architecture list the same names in the same order.
        // With no rules, the exact and auto matchers pair those by index and find
        // nothing else to say, so that is done directly. (The order matcher aligns
        // by shape, not name, so it always takes the long way.)
        if mapping.rules.rules().is_empty()
            && mapping.matcher != Matcher::Order
            && sources.len() == targets.len()
        {
            let mut b = Builder::new(source, target, Vec::new());
            let parts = chunks::map(sources.len(), PAIRS_PER_THREAD, |range| {
                range
                    .map(|i| {
                        (sources[i].name == targets[i].name).then(|| b.make_pair(i, i, None, How::Exact))
                    })
                    .collect::<Option<Vec<Pair>>>()
            });
            if let Some(parts) = parts.into_iter().collect::<Option<Vec<_>>>() {
                b.pairs.extend(parts.into_iter().flatten());
                return b;
            }
        }
        Self::pair_by_rules_and_matcher(source, target, mapping, lent)
    }

    /// [`Plan::pair_up`] the long way: rules, collisions, then the matcher.
    fn pair_by_rules_and_matcher<'a>(
        source: &'a dyn Source,
        target: &'a dyn Source,
        mapping: &Mapping,
        lent: Option<&[usize]>,
    ) -> Builder<'a> {
        let (sources, targets) = (source.entries(), target.entries());
        let rules = &mapping.rules;
        let rule_texts = rules.rules().iter().map(|r| Arc::from(r.to_string())).collect();
        let mut b = Builder::new(source, target, rule_texts);

        // 1. Rules: rename, skip, count what fired, find collisions.
        let mut names: Vec<Cow<str>> = Vec::with_capacity(sources.len());
        let mut rule_of: Vec<Option<usize>> = vec![None; sources.len()];
        let mut fired = vec![false; rules.rules().len()];
        let mut taken_source = vec![false; sources.len()];
        for (i, (entry, outcome)) in sources.iter().zip(apply_rules(rules, sources)).enumerate() {
            match outcome {
                Outcome::Kept => names.push(Cow::Borrowed(&entry.name)),
                Outcome::Renamed { to, rule } => {
                    fired[rule] = true;
                    rule_of[i] = Some(rule);
                    names.push(Cow::Owned(to));
                }
                Outcome::Skipped { rule } => {
                    fired[rule] = true;
                    taken_source[i] = true;
                    b.source_explained.insert(i, format!("skipped by rule `{}`", rules.rules()[rule]));
                    names.push(Cow::Borrowed(&entry.name));
                }
            }
        }
        // Collisions: one new name reached by several sources, a rule among them
        // (store names are unique, so without renames there are none).
        let renamed = rule_of.iter().any(Option::is_some);
        let mut first_with_name: HashMap<&str, usize> =
            HashMap::with_capacity(if renamed { sources.len() } else { 0 });
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: HashMap<usize, usize> = HashMap::new();
        for i in (0..sources.len()).filter(|&i| renamed && !taken_source[i]) {
            let first = *first_with_name.entry(&names[i]).or_insert(i);
            if first != i {
                let group = *group_of.entry(first).or_insert_with(|| {
                    groups.push(vec![first]);
                    groups.len() - 1
                });
                groups[group].push(i);
            }
        }
        for group in groups.into_iter().filter(|g| g.iter().any(|&i| rule_of[i].is_some())) {
            let name = names[group[0]].to_string();
            let sources_named = group
                .iter()
                .map(|&i| {
                    let how = rule_of[i]
                        .map_or("its own name".to_string(), |r| format!("rule `{}`", rules.rules()[r]));
                    (sources[i].name.to_string(), how)
                })
                .collect();
            for &i in &group {
                taken_source[i] = true;
                b.source_explained.insert(i, format!("collides on {name}"));
            }
            b.findings.push(Finding::Collision { target: name, sources: sources_named });
        }
        for (rule, used) in rules.rules().iter().zip(&fired) {
            if !used {
                b.findings.push(Finding::UnusedRule { rule: rule.to_string(), at: rule.source.to_string() });
            }
        }

        // 2. Names a rule produced that exist in the target pair first, whatever the matcher.
        // Renaming usually keeps the order: a name found at its own index needs
        // no lookup (target names are unique), and the index of every target
        // name is only built for the first one that is not.
        let mut taken_target = vec![false; targets.len()];
        let mut target_index: Option<HashMap<&str, usize>> = None;
        for i in 0..sources.len() {
            if taken_source[i] || rule_of[i].is_none() {
                continue;
            }
            let j = if targets.get(i).is_some_and(|t| t.name.as_str() == &*names[i]) {
                Some(i)
            } else {
                target_index
                    .get_or_insert_with(|| {
                        targets.iter().enumerate().map(|(j, t)| (t.name.as_str(), j)).collect()
                    })
                    .get(&*names[i])
                    .copied()
            };
            if let Some(j) = j {
                if !taken_target[j] {
                    taken_source[i] = true;
                    taken_target[j] = true;
                    b.pair(i, j, rule_of[i], How::Exact);
                }
            }
        }

        // 3. The matcher, for the rest. Roles only constrain it when both stores
        // record them (a checkpoint file's roles are guesses).
        let roles_known = !sources.iter().chain(targets).any(|e| e.role_inferred);
        let role = |e: &Entry| if roles_known { e.role } else { Role::Parameter };
        // The source as the matcher sees it: in its own order, or in one lent.
        let sequence: Vec<usize> = lent.map_or_else(|| (0..sources.len()).collect(), <[usize]>::to_vec);
        fn item<'x>(e: &'x Entry, name: &'x str, role: Role) -> Item<'x> {
            Item { name, original: &e.name, role, class: dtype::class(e.dtype), shape: &e.shape }
        }
        let source_items: Vec<Item> =
            sequence.iter().map(|&i| item(&sources[i], &names[i], role(&sources[i]))).collect();
        let taken_in_sequence: Vec<bool> = sequence.iter().map(|&i| taken_source[i]).collect();
        let target_items: Vec<Item> = targets.iter().map(|e| item(e, &e.name, role(e))).collect();
        let own = |store: &dyn Source| match store.entry_order() {
            EntryOrder::Registration => (Sequence::Registration, OrderUsed::Registration),
            EntryOrder::Unknown => (Sequence::Natural, OrderUsed::Reconstructed),
        };
        let (source_sequence, source_order) = match (&mapping.source_order, lent) {
            (Some(order), Some(_)) => {
                (Sequence::Registration, OrderUsed::From { model: order.origin.clone() })
            }
            _ => own(source),
        };
        let (target_sequence, target_order) = own(target);
        if mapping.matcher == Matcher::Order {
            for (side, used, store) in
                [(Side::Source, &source_order, source), (Side::Target, &target_order, target)]
            {
                if *used == OrderUsed::Reconstructed {
                    b.findings.push(Finding::OrderReconstructed { side, store: store.origin().to_string() });
                }
            }
            b.order = Some(Orders { source: source_order, target: target_order });
        }
        let matches = matching::run(
            mapping.matcher,
            &source_items,
            &target_items,
            &taken_in_sequence,
            &taken_target,
            (source_sequence, target_sequence),
        );
        for &(k, j, how) in &matches.pairs {
            let i = sequence[k];
            taken_source[i] = true;
            taken_target[j] = true;
            b.pair(i, j, rule_of[i], how);
        }
        for a in &matches.ambiguities {
            let (name, candidates) = if a.from_source {
                (
                    sources[sequence[a.item]].name.clone(),
                    a.candidates.iter().map(|&j| targets[j].name.to_string()).collect(),
                )
            } else {
                (
                    targets[a.item].name.clone(),
                    a.candidates.iter().map(|&k| sources[sequence[k]].name.to_string()).collect(),
                )
            };
            let side = if a.from_source { Side::Source } else { Side::Target };
            b.findings.push(Finding::Ambiguous {
                side,
                name: name.to_string(),
                candidates,
                how: a.how,
                paired: a.paired,
            });
        }
        for a in matches.module_ambiguities {
            b.findings.push(Finding::AmbiguousModule {
                side: if a.from_source { Side::Source } else { Side::Target },
                module: a.module,
                candidates: a.candidates,
                more: a.more,
                why: a.why,
            });
        }
        if let Some((source_modules, target_modules)) = matches.unaligned {
            b.findings.push(Finding::Unaligned { source_modules, target_modules });
        }
        b.modules = matches.modules;
        b.pairs.sort_by_key(|p| p.target);
        b
    }

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
                explained = Some("num_batches_tracked with no counterpart".into());
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
                Some("num_batches_tracked with no counterpart: keeps its value".into())
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tch::{Kind, Tensor};

    use super::*;
    use crate::store::Checkpoint;
    use crate::Format;

    fn store(tensors: Vec<(&str, Tensor)>) -> Checkpoint {
        let tensors = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        Checkpoint::from_tensors("test", Format::Safetensors, tensors, BTreeMap::new()).expect("store")
    }

    fn bn(prefix: &str, n: i64, kind: Kind) -> Vec<(String, Tensor)> {
        ["weight", "bias", "running_mean", "running_var"]
            .into_iter()
            .map(|leaf| (format!("{prefix}.{leaf}"), Tensor::ones([n], (kind, tch::Device::Cpu))))
            .chain([(format!("{prefix}.num_batches_tracked"), Tensor::from(3i64))])
            .collect()
    }

    #[test]
    fn renamed_sources_find_their_targets_at_their_own_index_or_elsewhere() {
        let t = || Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
        let source = store(vec![("a.x", t()), ("a.y", t()), ("a.z", t())]);
        // b.x at its source's index; b.y and b.z swapped.
        let target = store(vec![("b.x", t()), ("b.z", t()), ("b.y", t())]);
        let mapping = Mapping {
            rules: Rules::parse("a\\.(.*) => b.$1\n", "test").expect("rules"),
            matcher: Matcher::Exact,
            source_order: None,
        };
        let plan = Plan::build(&source, &target, &mapping).expect("plan");
        let pairs: Vec<(usize, usize, String)> =
            plan.pairs.iter().map(|p| (p.source, p.target, p.provenance())).collect();
        let rule = "rule `a\\.(.*) => b.$1`".to_string();
        assert_eq!(pairs, vec![(0, 0, rule.clone()), (2, 1, rule.clone()), (1, 2, rule)]);
        assert!(plan.is_complete());
    }

    /// The shortcut for equal name lists must say exactly what the long way says.
    #[test]
    fn equal_name_lists_are_planned_as_the_rules_and_matcher_would() {
        let base = || {
            let mut t =
                vec![("fc.weight".to_string(), Tensor::ones([4, 3], (Kind::Float, tch::Device::Cpu)))];
            t.extend(bn("bn", 4, Kind::Float));
            t
        };
        // Equal lists; then equal names with another shape, another dtype and a
        // float into an integer tensor (a lossy cast).
        let mut other = base();
        other[0].1 = Tensor::ones([5, 3], (Kind::Float, tch::Device::Cpu));
        other[1].1 = Tensor::ones([4], (Kind::Double, tch::Device::Cpu));
        other[3].1 = Tensor::from_slice(&[0.5f32, 1.0, 2.0, 3.0]);
        other[5].1 = Tensor::from(2.5f64);
        for (source_tensors, findings) in [(base(), 0), (other, 2)] {
            let source = store(source_tensors.iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect());
            let target = store(base().iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect());
            for matcher in [Matcher::Exact, Matcher::Auto] {
                let mapping = Mapping { rules: Rules::new(), matcher, source_order: None };
                let short = Plan::finish(Plan::pair_up(&source, &target, &mapping, None), matcher);
                let long =
                    Plan::finish(Plan::pair_by_rules_and_matcher(&source, &target, &mapping, None), matcher);
                assert_eq!((short.pairs.len(), short.findings.len()), (6, findings), "{:?}", short.findings);
                assert_eq!(
                    serde_json::to_value(&short).expect("json"),
                    serde_json::to_value(&long).expect("json"),
                    "{matcher}"
                );
            }
        }
    }
}
