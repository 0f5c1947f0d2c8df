//! [`Plan::build`], in steps that can be read one at a time: the rules (renames,
//! skips, collisions), the pairs the renamed names make, the matcher for the
//! rest; then what follows from the pairs (shape, cast and role findings,
//! leftovers and their explanations, BatchNorm groups). Splits, groups of a
//! `cat` and collisions among all the names rules make are in `many.rs`.
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::many::{Group, MemberOf, SplitOf};
use super::{Cast, Finding, Mapping, OrderUsed, Orders, Pair, Plan, Side};
use crate::chunks;
use crate::dotted::NameLookup;
use crate::dtype;
use crate::entry::{Entry, EntryOrder, Role};
use crate::error::Result;
use crate::matching::{self, How, Item, Matcher, ModuleMatch, Sequence};
use crate::rules::{Action, Outcome, Rules};
use crate::store::Source;
use crate::transform::{shape_after, Op, Transform};

/// Pairs per core above which pairing and checking pairs is split across cores.
pub(super) const PAIRS_PER_THREAD: usize = 8192;

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
    pub(super) source: &'a dyn Source,
    pub(super) target: &'a dyn Source,
    /// Each rule as written, rendered once.
    pub(super) rule_texts: Vec<Arc<str>>,
    /// Each rule's ops on the source, for a rename with transforms (empty for
    /// the others: a split's and a cat's pairs get their transforms made).
    pub(super) rule_ops: Vec<Vec<Op>>,
    pub(super) pairs: Vec<Pair>,
    pub(super) findings: Vec<Finding>,
    pub(super) source_explained: HashMap<usize, String>,
    /// Per target entry, the `keep` rule that keeps it (empty: no keep rules).
    pub(super) kept_by: Vec<Option<usize>>,
    /// Each `keep` rule as written, with where it was written.
    pub(super) keep_texts: Vec<(String, String)>,
    /// Each source's name after the rules, and the rule that renamed it (empty
    /// when no rule ran).
    pub(super) renamed: Vec<(Cow<'a, str>, Option<usize>)>,
    pub(super) modules: Vec<ModuleMatch>,
    pub(super) order: Option<Orders>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(source: &'a dyn Source, target: &'a dyn Source, rule_texts: Vec<Arc<str>>) -> Self {
        Builder {
            source,
            target,
            rule_texts,
            rule_ops: Vec::new(),
            pairs: Vec::with_capacity(source.entries().len().min(target.entries().len())),
            findings: Vec::new(),
            source_explained: HashMap::new(),
            kept_by: Vec::new(),
            keep_texts: Vec::new(),
            renamed: Vec::new(),
            modules: Vec::new(),
            order: None,
        }
    }

    pub(super) fn pair(&mut self, i: usize, j: usize, rule: Option<usize>, how: How) {
        let ops = rule.and_then(|r| self.rule_ops.get(r)).filter(|ops| !ops.is_empty());
        let transform = ops.map(|ops| Transform { source_ops: ops.clone(), ..Transform::default() });
        self.pair_with(i, j, rule, how, transform);
    }

    /// A pair with its transform (whose shapes are filled in here).
    pub(super) fn pair_with(
        &mut self,
        i: usize,
        j: usize,
        rule: Option<usize>,
        how: How,
        transform: Option<Transform>,
    ) {
        let mut pair = self.make_pair(i, j, rule, how);
        pair.transform = transform.map(|mut t| {
            t.source_shape = self.source.entries()[i].shape.clone();
            t.target_shape = self.target.entries()[j].shape.clone();
            t
        });
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
            recorded: None,
            transform: None,
        }
    }
}

/// The source names as the rules left them, and what is paired so far.
pub(super) struct Renamed<'a> {
    /// Each source entry's name after the rules.
    pub(super) names: Vec<Cow<'a, str>>,
    /// The rule that renamed each, if one did.
    pub(super) rule_of: Vec<Option<usize>>,
    /// Source entries paired, skipped or set aside.
    pub(super) taken_source: Vec<bool>,
    /// Target entries paired.
    pub(super) taken_target: Vec<bool>,
    /// Sources a `split` rule makes several targets of.
    pub(super) splits: Vec<SplitOf>,
    /// Sources a `cat` rule joins with others.
    pub(super) members: Vec<MemberOf>,
    /// The complete groups of `cat` rules.
    pub(super) groups: Vec<Group>,
}

impl<'a> Builder<'a> {
    /// Step 1: every rule applied to every source name: renames, skips (which
    /// explain their leftovers), and the rules that never fired.
    fn rename(&mut self, rules: &Rules) -> Renamed<'a> {
        let (sources, targets) = (self.source.entries(), self.target.entries());
        let mut r = Renamed {
            names: Vec::with_capacity(sources.len()),
            rule_of: vec![None; sources.len()],
            taken_source: vec![false; sources.len()],
            taken_target: vec![false; targets.len()],
            splits: Vec::new(),
            members: Vec::new(),
            groups: Vec::new(),
        };
        let mut fired = vec![false; rules.rules().len()];
        for (i, (entry, outcome)) in sources.iter().zip(apply_rules(rules, sources)).enumerate() {
            match outcome {
                Outcome::Kept => r.names.push(Cow::Borrowed(&entry.name)),
                Outcome::Renamed { to, rule } => {
                    fired[rule] = true;
                    r.rule_of[i] = Some(rule);
                    r.names.push(Cow::Owned(to));
                }
                Outcome::Split { to, rule } => {
                    fired[rule] = true;
                    r.rule_of[i] = Some(rule);
                    r.taken_source[i] = true;
                    r.names.push(Cow::Borrowed(&entry.name));
                    r.splits.push(SplitOf { source: i, rule, to, live: true });
                }
                Outcome::Member { to, rule, member, key, index } => {
                    fired[rule] = true;
                    r.rule_of[i] = Some(rule);
                    r.taken_source[i] = true;
                    r.names.push(Cow::Borrowed(&entry.name));
                    r.members.push(MemberOf { source: i, rule, member, to, key, index });
                }
                Outcome::Unstack { parts, rule } => {
                    fired[rule] = true;
                    r.rule_of[i] = Some(rule);
                    r.taken_source[i] = true;
                    r.names.push(Cow::Borrowed(&entry.name));
                    let count =
                        super::stack::unstack_count(&rules.rules()[rule], &entry.shape) / parts.len().max(1);
                    let to = crate::rules::unstacked_names(&parts, count);
                    r.splits.push(SplitOf { source: i, rule, to, live: true });
                }
                Outcome::Skipped { rule } => {
                    fired[rule] = true;
                    r.taken_source[i] = true;
                    self.source_explained.insert(i, format!("skipped by rule `{}`", rules.rules()[rule]));
                    r.names.push(Cow::Borrowed(&entry.name));
                }
            }
        }
        let mut absent_ties = None;
        for (rule, used) in rules.rules().iter().zip(&fired) {
            if *used {
                continue;
            }
            // A skip of a name the model ties to another is not unused where the
            // file simply does not hold that name (a safetensors file keeps one
            // name of a tie): one rules file serves both forms of a model.
            if rule.action == Action::Skip {
                let ties = absent_ties.get_or_insert_with(|| self.tied_names_not_in_source());
                if let Some((name, with)) = ties.iter().find(|(name, _)| rule.matches(name)) {
                    self.findings.push(Finding::SkipOfTie {
                        rule: rule.to_string(),
                        at: rule.source.to_string(),
                        name: name.clone(),
                        with: with.clone(),
                    });
                    continue;
                }
            }
            self.findings.push(Finding::UnusedRule { rule: rule.to_string(), at: rule.source.to_string() });
        }
        r
    }

    /// Step 2: a name a rule produced that exists in the target pairs with it,
    /// whatever the matcher.
    fn pair_renamed(&mut self, r: &mut Renamed) {
        let targets = self.target.entries();
        let lookup = NameLookup::new(targets.iter().map(|t| t.name.as_str()));
        for i in 0..r.names.len() {
            if r.taken_source[i] || r.rule_of[i].is_none() {
                continue;
            }
            if let Some(j) = lookup.find(&r.names[i], i).filter(|&j| !r.taken_target[j]) {
                r.taken_source[i] = true;
                r.taken_target[j] = true;
                self.pair(i, j, r.rule_of[i], How::Exact);
            }
        }
    }

    /// Step 3: the matcher, for the rest, in the order each side keeps (or one
    /// lent to the source); what it paired, and what it could not decide.
    fn run_matcher(&mut self, mapping: &Mapping, lent: Option<&[usize]>, r: &mut Renamed) {
        let (source, target) = (self.source, self.target);
        let (sources, targets) = (source.entries(), target.entries());
        // Roles only constrain the matcher when both stores record them (a
        // checkpoint file's roles are guesses).
        let roles_known = !sources.iter().chain(targets).any(|e| e.role_inferred);
        let role = |e: &Entry| if roles_known { e.role } else { Role::Parameter };
        let sequence: Vec<usize> = lent.map_or_else(|| (0..sources.len()).collect(), <[usize]>::to_vec);
        fn item<'x>(e: &'x Entry, name: &'x str, role: Role) -> Item<'x> {
            Item { name, original: &e.name, role, class: dtype::class(e.dtype), shape: &e.shape }
        }
        // A source renamed by a rule with transforms is matched by the shape it
        // will have.
        let transformed: Vec<Option<Vec<i64>>> = (0..sources.len())
            .map(|i| {
                let ops = self.rule_ops.get(r.rule_of[i]?)?;
                (!ops.is_empty()).then(|| shape_after(ops, &sources[i].shape).ok()).flatten()
            })
            .collect();
        let source_items: Vec<Item> = sequence
            .iter()
            .map(|&i| {
                let mut it = item(&sources[i], &r.names[i], role(&sources[i]));
                if let Some(shape) = &transformed[i] {
                    it.shape = shape;
                }
                it
            })
            .collect();
        let taken_in_sequence: Vec<bool> = sequence.iter().map(|&i| r.taken_source[i]).collect();
        let target_items: Vec<Item> = targets.iter().map(|e| item(e, &e.name, role(e))).collect();
        let (sequences, orders) = self.orders(mapping, lent.is_some());
        if mapping.matcher == Matcher::Order {
            self.order = Some(orders);
        }
        let matches = matching::run(
            mapping.matcher,
            &source_items,
            &target_items,
            &taken_in_sequence,
            &r.taken_target,
            sequences,
        );
        for &(k, j, how) in &matches.pairs {
            let i = sequence[k];
            r.taken_source[i] = true;
            r.taken_target[j] = true;
            self.pair(i, j, r.rule_of[i], how);
        }
        let source_name = |k: usize| sources[sequence[k]].name.to_string();
        for a in &matches.ambiguities {
            let (side, name, candidates) = if a.from_source {
                (
                    Side::Source,
                    source_name(a.item),
                    a.candidates.iter().map(|&j| targets[j].name.to_string()).collect(),
                )
            } else {
                (
                    Side::Target,
                    targets[a.item].name.to_string(),
                    a.candidates.iter().map(|&k| source_name(k)).collect(),
                )
            };
            self.findings.push(Finding::Ambiguous { side, name, candidates, how: a.how, paired: a.paired });
        }
        for a in matches.module_ambiguities {
            self.findings.push(Finding::AmbiguousModule {
                side: if a.from_source { Side::Source } else { Side::Target },
                module: a.module,
                candidates: a.candidates,
                more: a.more,
                why: a.why,
            });
        }
        if let Some((source_modules, target_modules)) = matches.unaligned {
            self.findings.push(Finding::Unaligned { source_modules, target_modules });
        }
        self.modules = matches.modules;
    }

    /// How each side is ordered for the matcher, and what the plan says of it
    /// (a reconstructed order is noted, for the order matcher).
    fn orders(&mut self, mapping: &Mapping, lent: bool) -> ((Sequence, Sequence), Orders) {
        let own = |store: &dyn Source| match store.entry_order() {
            EntryOrder::Registration => (Sequence::Registration, OrderUsed::Registration),
            EntryOrder::Unknown => (Sequence::Natural, OrderUsed::Reconstructed),
        };
        let (source_sequence, source_order) = match &mapping.source_order {
            Some(order) if lent => (Sequence::Registration, OrderUsed::From { model: order.origin.clone() }),
            _ => own(self.source),
        };
        let (target_sequence, target_order) = own(self.target);
        if mapping.matcher == Matcher::Order {
            for (side, used, store) in
                [(Side::Source, &source_order, self.source), (Side::Target, &target_order, self.target)]
            {
                if *used == OrderUsed::Reconstructed {
                    self.findings
                        .push(Finding::OrderReconstructed { side, store: store.origin().to_string() });
                }
            }
        }
        ((source_sequence, target_sequence), Orders { source: source_order, target: target_order })
    }
}

impl Plan {
    /// Maps `source` onto `target`: rules, then the matcher; then every finding.
    /// Reads names, roles, dtypes and shapes, never tensor values.
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
            && mapping.rules.keeps().is_empty()
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

    /// [`Plan::pair_up`] the long way: the rules, the pairs the renamed names
    /// make, then the matcher.
    fn pair_by_rules_and_matcher<'a>(
        source: &'a dyn Source,
        target: &'a dyn Source,
        mapping: &Mapping,
        lent: Option<&[usize]>,
    ) -> Builder<'a> {
        let rule_texts = mapping.rules.rules().iter().map(|r| Arc::from(r.to_string())).collect();
        let mut b = Builder::new(source, target, rule_texts);
        b.rule_ops = mapping
            .rules
            .rules()
            .iter()
            .map(|r| if matches!(r.action, Action::Rename(_)) { r.ops.clone() } else { Vec::new() })
            .collect();
        let mut renamed = b.rename(&mapping.rules);
        b.set_aside_collisions(&mapping.rules, &mut renamed);
        b.pair_renamed(&mut renamed);
        if !renamed.splits.is_empty() || !renamed.groups.is_empty() {
            let lookup = NameLookup::new(target.entries().iter().map(|t| t.name.as_str()));
            b.pair_splits(&mapping.rules, &lookup, &mut renamed);
            b.pair_groups(&mapping.rules, &lookup, &mut renamed);
        }
        b.run_matcher(mapping, lent, &mut renamed);
        b.hold_kept(&mapping.rules);
        b.renamed = renamed.names.into_iter().zip(renamed.rule_of).collect();
        b.pairs.sort_by_key(|p| p.target);
        b
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
