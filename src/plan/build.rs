//! [`Plan::build`], in steps that can be read one at a time: the rules (renames,
//! skips, collisions), the pairs the renamed names make, the matcher for the
//! rest; then what follows from the pairs (shape, cast and role findings,
//! leftovers and their explanations, BatchNorm groups).
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::{Cast, Finding, Mapping, OrderUsed, Orders, Pair, Plan, Side};
use crate::chunks;
use crate::dotted::NameLookup;
use crate::dtype;
use crate::entry::{Entry, EntryOrder, Role};
use crate::error::Result;
use crate::matching::{self, How, Item, Matcher, ModuleMatch, Sequence};
use crate::rules::{Action, Outcome, Rules};
use crate::store::Source;
use crate::transform::{normalize, shape_after, shape_text, Op, Transform};

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
    names: Vec<Cow<'a, str>>,
    /// The rule that renamed each, if one did.
    rule_of: Vec<Option<usize>>,
    /// Source entries paired, skipped or set aside.
    taken_source: Vec<bool>,
    /// Target entries paired.
    taken_target: Vec<bool>,
    /// Sources a `split` rule makes several targets of.
    splits: Vec<SplitOf>,
    /// Sources a `cat` rule joins with others.
    members: Vec<MemberOf>,
    /// The complete groups of `cat` rules.
    groups: Vec<Group>,
}

/// A source split by a rule.
struct SplitOf {
    source: usize,
    rule: usize,
    to: Vec<String>,
    live: bool,
}

/// A source that is one member of a `cat`.
struct MemberOf {
    source: usize,
    rule: usize,
    member: usize,
    to: String,
    key: Vec<String>,
}

/// A `cat` rule's sources for one target, one per pattern, in order.
struct Group {
    rule: usize,
    to: String,
    sources: Vec<usize>,
    live: bool,
}

/// What claims a new name: a source (renamed or not), a part of a split, a group.
#[derive(Clone, Copy)]
enum Claim {
    Source(usize),
    Part(usize),
    Group(usize),
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
                Outcome::Member { to, rule, member, key } => {
                    fired[rule] = true;
                    r.rule_of[i] = Some(rule);
                    r.taken_source[i] = true;
                    r.names.push(Cow::Borrowed(&entry.name));
                    r.members.push(MemberOf { source: i, rule, member, to, key });
                }
                Outcome::Skipped { rule } => {
                    fired[rule] = true;
                    r.taken_source[i] = true;
                    self.source_explained.insert(i, format!("skipped by rule `{}`", rules.rules()[rule]));
                    r.names.push(Cow::Borrowed(&entry.name));
                }
            }
        }
        for (rule, used) in rules.rules().iter().zip(&fired) {
            if !used {
                self.findings
                    .push(Finding::UnusedRule { rule: rule.to_string(), at: rule.source.to_string() });
            }
        }
        r
    }

    /// The groups of `cat` rules: sources of one rule with equal captures,
    /// one per pattern. A group lacking a member, or with two sources for one,
    /// is an error; its sources are set aside.
    fn form_groups(&mut self, rules: &Rules, r: &mut Renamed) {
        let sources = self.source.entries();
        let mut index: HashMap<(usize, &[String]), usize> = HashMap::new();
        let mut found: Vec<(usize, &str, Vec<Vec<usize>>)> = Vec::new();
        for m in &r.members {
            let members = rules.rules()[m.rule].patterns().len();
            let g = *index.entry((m.rule, &m.key)).or_insert_with(|| {
                found.push((m.rule, &m.to, vec![Vec::new(); members]));
                found.len() - 1
            });
            found[g].2[m.member].push(m.source);
        }
        for (rule, to, members) in found {
            let patterns = rules.rules()[rule].patterns();
            let text = rules.rules()[rule].to_string();
            let all: Vec<usize> = members.iter().flatten().copied().collect();
            let set_aside = |b: &mut Self, why: String| {
                for &i in &all {
                    b.source_explained.insert(i, why.clone());
                }
            };
            if let Some(twice) = members.iter().find(|m| m.len() > 1) {
                let sources =
                    twice.iter().map(|&i| (sources[i].name.to_string(), format!("rule `{text}`"))).collect();
                set_aside(self, format!("collides on {to}"));
                self.findings.push(Finding::Collision { target: to.to_string(), sources });
                continue;
            }
            if members.iter().any(Vec::is_empty) {
                let found = (patterns.iter().zip(&members))
                    .filter_map(|(p, m)| m.first().map(|&i| (p.to_string(), sources[i].name.to_string())))
                    .collect();
                let missing = (patterns.iter().zip(&members))
                    .filter(|(_, m)| m.is_empty())
                    .map(|(p, _)| p.to_string())
                    .collect();
                set_aside(self, format!("its group for {to} is incomplete"));
                self.findings.push(Finding::IncompleteGroup {
                    rule: text,
                    target: to.to_string(),
                    found,
                    missing,
                });
                continue;
            }
            r.groups.push(Group { rule, to: to.to_string(), sources: all, live: true });
        }
    }

    /// Collisions: one new name claimed several times (by sources, parts of a
    /// split, groups of a cat), a rule among them, is an error naming every
    /// source and rule; none of them is paired. (Store names are unique, so
    /// without renames there are none.)
    fn set_aside_collisions(&mut self, rules: &Rules, r: &mut Renamed) {
        let sources = self.source.entries();
        if !r.rule_of.iter().any(Option::is_some) {
            return;
        }
        self.form_groups(rules, r);
        let mut claims: Vec<(&str, Claim)> = Vec::with_capacity(sources.len());
        claims.extend(
            (0..sources.len()).filter(|&i| !r.taken_source[i]).map(|i| (&*r.names[i], Claim::Source(i))),
        );
        for (k, split) in r.splits.iter().enumerate() {
            claims.extend(split.to.iter().map(|t| (t.as_str(), Claim::Part(k))));
        }
        claims.extend(r.groups.iter().enumerate().map(|(g, group)| (group.to.as_str(), Claim::Group(g))));
        let mut first_with_name: HashMap<&str, usize> = HashMap::with_capacity(claims.len());
        let mut same: Vec<Vec<usize>> = Vec::new();
        let mut same_of: HashMap<usize, usize> = HashMap::new();
        for (c, (name, _)) in claims.iter().enumerate() {
            let first = *first_with_name.entry(name).or_insert(c);
            if first != c {
                let k = *same_of.entry(first).or_insert_with(|| {
                    same.push(vec![first]);
                    same.len() - 1
                });
                same[k].push(c);
            }
        }
        let by_rule = |claim: Claim| match claim {
            Claim::Source(i) => r.rule_of[i].is_some(),
            Claim::Part(_) | Claim::Group(_) => true,
        };
        let mut set_aside: Vec<(String, Vec<Claim>)> = Vec::new();
        for list in same.into_iter().filter(|l| l.iter().any(|&c| by_rule(claims[c].1))) {
            set_aside.push((claims[list[0]].0.to_string(), list.iter().map(|&c| claims[c].1).collect()));
        }
        for (name, list) in set_aside {
            let mut sources_named = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for claim in list {
                let (members, rule): (Vec<usize>, Option<usize>) = match claim {
                    Claim::Source(i) => (vec![i], r.rule_of[i]),
                    Claim::Part(k) => {
                        r.splits[k].live = false;
                        (vec![r.splits[k].source], Some(r.splits[k].rule))
                    }
                    Claim::Group(g) => {
                        r.groups[g].live = false;
                        (r.groups[g].sources.clone(), Some(r.groups[g].rule))
                    }
                };
                for i in members.into_iter().filter(|&i| seen.insert(i)) {
                    let how =
                        rule.map_or("its own name".to_string(), |k| format!("rule `{}`", rules.rules()[k]));
                    sources_named.push((sources[i].name.to_string(), how));
                    r.taken_source[i] = true;
                    self.source_explained.insert(i, format!("collides on {name}"));
                }
            }
            self.findings.push(Finding::Collision { target: name, sources: sources_named });
        }
    }

    /// The problem of a transform, as a finding: an error naming the rule,
    /// the tensors and the shapes.
    fn transform_problem(&mut self, rule: usize, sources: &[usize], targets: &[&str], problem: String) {
        let entries = self.source.entries();
        let mut tensors: Vec<String> = sources
            .iter()
            .map(|&i| format!("{} {}", entries[i].name, shape_text(&entries[i].shape)))
            .collect();
        tensors.extend(targets.iter().map(|t| t.to_string()));
        for &i in sources {
            self.source_explained.insert(i, "its rule's transform cannot apply".into());
        }
        self.findings.push(Finding::Transform { rule: self.rule_texts[rule].to_string(), tensors, problem });
    }

    /// A target name a rule made, if the target has it and it is still free.
    fn free_target(
        &self,
        lookup: &NameLookup,
        name: &str,
        r: &Renamed,
    ) -> std::result::Result<usize, String> {
        match lookup.find(name, 0) {
            Some(j) if !r.taken_target[j] => Ok(j),
            Some(_) => Err(format!("{name} already receives another source")),
            None => Err(format!("the target has no tensor {name}")),
        }
    }

    /// Splits: each part a narrow of the source (after the rule's ops) into
    /// its own target; sizes checked against the source's shape.
    fn pair_splits(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed) {
        let sources = self.source.entries();
        for k in 0..r.splits.len() {
            if !r.splits[k].live {
                continue;
            }
            let (i, rule) = (r.splits[k].source, r.splits[k].rule);
            let Action::Split { dim, sizes, .. } = &rules.rules()[rule].action else { continue };
            let ops = &rules.rules()[rule].ops;
            let names: Vec<&str> = r.splits[k].to.iter().map(String::as_str).collect();
            let parts = (|| {
                let shape = shape_after(ops, &sources[i].shape)?;
                let d = normalize(*dim, shape.len(), &shape)?;
                let size = shape[d];
                let sizes = match sizes {
                    Some(sizes) if sizes.iter().sum::<i64>() != size => {
                        return Err(format!(
                            "the parts add up to {}, dimension {dim} of {} has {size}",
                            sizes.iter().sum::<i64>(),
                            shape_text(&shape)
                        ))
                    }
                    Some(sizes) => sizes.clone(),
                    None if size % names.len() as i64 != 0 => {
                        return Err(format!(
                            "dimension {dim} of {} ({size}) does not split into {} equal parts",
                            shape_text(&shape),
                            names.len()
                        ))
                    }
                    None => vec![size / names.len() as i64; names.len()],
                };
                let targets =
                    names.iter().map(|n| self.free_target(lookup, n, r)).collect::<Result<Vec<_>, _>>()?;
                Ok((d as i64, sizes, targets))
            })();
            match parts {
                Err(problem) => self.transform_problem(rule, &[i], &names, problem),
                Ok((d, sizes, targets)) => {
                    let mut start = 0;
                    for (size, j) in sizes.into_iter().zip(targets) {
                        let mut source_ops = ops.clone();
                        source_ops.push(Op::Narrow { dim: d, start, length: size });
                        start += size;
                        r.taken_target[j] = true;
                        let transform = Transform { source_ops, ..Transform::default() };
                        self.pair_with(i, j, Some(rule), How::Exact, Some(transform));
                    }
                }
            }
        }
    }

    /// Concatenations: each member written into its slice of the target (the
    /// slice seen through the inverse of the ops after `cat`).
    fn pair_groups(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed) {
        let (sources, targets) = (self.source.entries(), self.target.entries());
        for g in 0..r.groups.len() {
            if !r.groups[g].live {
                continue;
            }
            let (rule, members) = (r.groups[g].rule, r.groups[g].sources.clone());
            let Action::Cat { dim, .. } = &rules.rules()[rule].action else { continue };
            let ops = &rules.rules()[rule].ops;
            let to = r.groups[g].to.clone();
            let regions = (|| {
                let shapes: Vec<&[i64]> = members.iter().map(|&i| sources[i].shape.as_slice()).collect();
                let d = normalize(*dim, shapes[0].len(), shapes[0])?;
                let fits = |s: &&[i64]| {
                    s.len() == shapes[0].len() && (0..s.len()).all(|k| k == d || s[k] == shapes[0][k])
                };
                if !shapes.iter().all(fits) {
                    let list: Vec<String> = shapes.iter().map(|s| shape_text(s)).collect();
                    return Err(format!("cannot concatenate {} along dimension {dim}", list.join(", ")));
                }
                let mut shape = shapes[0].to_vec();
                shape[d] = shapes.iter().map(|s| s[d]).sum();
                // The inverse of the ops after cat, from the target back to the concatenation.
                let mut back = Vec::new();
                for op in ops {
                    let next = op.shape(&shape)?;
                    back.extend(op.inverse(&shape)?);
                    shape = next;
                }
                back.reverse();
                let j = self.free_target(lookup, &to, r)?;
                if targets[j].shape != shape {
                    return Err(format!(
                        "the result is {}, {to} is {}",
                        shape_text(&shape),
                        shape_text(&targets[j].shape)
                    ));
                }
                let mut start = 0;
                let regions = shapes.iter().map(|s| {
                    let mut target_ops = back.clone();
                    target_ops.push(Op::Narrow { dim: d as i64, start, length: s[d] });
                    start += s[d];
                    target_ops
                });
                Ok((j, regions.collect::<Vec<_>>()))
            })();
            match regions {
                Err(problem) => self.transform_problem(rule, &members, &[&to], problem),
                Ok((j, regions)) => {
                    r.taken_target[j] = true;
                    for (i, target_ops) in members.into_iter().zip(regions) {
                        let transform = Transform { target_ops, ..Transform::default() };
                        self.pair_with(i, j, Some(rule), How::Exact, Some(transform));
                    }
                }
            }
        }
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
