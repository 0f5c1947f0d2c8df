//! Names that rules make many of, or one of many: the parts of a `split`, the
//! groups of a `cat` (sources of one rule whose captures are equal), and the
//! collisions among every name the rules make. Each split part and each group
//! member becomes a pair with a [`Transform`]: a narrow of the source, or a
//! region of the target.
use std::collections::HashMap;

use super::build::{Builder, Renamed};
use super::Finding;
use crate::dotted::NameLookup;
use crate::matching::How;
use crate::rules::{Action, Rules};
use crate::transform::{normalize, shape_after, shape_and_way_back, shape_text, Op, Transform};

/// A source split by a rule.
pub(super) struct SplitOf {
    pub(super) source: usize,
    pub(super) rule: usize,
    pub(super) to: Vec<String>,
    pub(super) live: bool,
}

/// A source that is one member of a `cat`.
pub(super) struct MemberOf {
    pub(super) source: usize,
    pub(super) rule: usize,
    pub(super) member: usize,
    pub(super) to: String,
    pub(super) key: Vec<String>,
    /// For a `stack`: the index's text.
    pub(super) index: Option<String>,
}

/// A `cat` rule's sources for one target, one per pattern, in order (a
/// `stack`'s: index-major, one per pattern at each index).
pub(super) struct Group {
    pub(super) rule: usize,
    pub(super) to: String,
    pub(super) sources: Vec<usize>,
    pub(super) live: bool,
}

/// What claims a new name: a source (renamed or not), a part of a split, a group.
#[derive(Clone, Copy)]
enum Claim {
    Source(usize),
    Part(usize),
    Group(usize),
}

impl Builder<'_> {
    /// The groups of `cat` rules: sources of one rule with equal captures,
    /// one per pattern. A group lacking a member, or with two sources for one,
    /// is an error; its sources are set aside.
    fn form_groups(&mut self, rules: &Rules, r: &mut Renamed) {
        let sources = self.source.entries();
        let mut index: HashMap<(usize, &[String]), usize> = HashMap::new();
        let mut found: Vec<(usize, &str, Vec<Vec<usize>>)> = Vec::new();
        let is_stack = |rule: usize| matches!(rules.rules()[rule].action, Action::Stack { .. });
        let members = std::mem::take(&mut r.members);
        let stacked: Vec<&MemberOf> = members.iter().filter(|m| is_stack(m.rule)).collect();
        if !stacked.is_empty() {
            self.form_stacks(rules, &stacked, r);
        }
        for m in members.iter().filter(|m| !is_stack(m.rule)) {
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
    pub(super) fn set_aside_collisions(&mut self, rules: &Rules, r: &mut Renamed) {
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
    pub(super) fn transform_problem(
        &mut self,
        rule: usize,
        sources: &[usize],
        targets: &[&str],
        problem: String,
    ) {
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
    pub(super) fn free_target(
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
    pub(super) fn pair_splits(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed) {
        let sources = self.source.entries();
        for k in 0..r.splits.len() {
            if !r.splits[k].live {
                continue;
            }
            let (i, rule) = (r.splits[k].source, r.splits[k].rule);
            if let Action::Unstack { .. } = &rules.rules()[rule].action {
                self.pair_unstack(rules, lookup, r, k);
                continue;
            }
            if let Action::Quantize { .. } = &rules.rules()[rule].action {
                self.pair_quantize(rules, lookup, r, k);
                continue;
            }
            let Action::Split { dim, sizes, .. } = &rules.rules()[rule].action else { continue };
            let ops = &rules.rules()[rule].ops;
            let names: Vec<&str> = r.splits[k].to.iter().map(String::as_str).collect();
            let parts = (|| {
                let shape = shape_after(ops, &sources[i].shape)?;
                let d = normalize(*dim, shape.len(), &shape)?;
                let size = shape[d];
                let total = sizes.as_ref().map(|s| s.iter().try_fold(0i64, |a, &b| a.checked_add(b)));
                let sizes = match sizes {
                    Some(sizes) if total != Some(Some(size)) => {
                        let total =
                            total.flatten().map_or("more than an i64 holds".to_string(), |t| t.to_string());
                        return Err(format!(
                            "the parts of split({dim}, {}) add up to {total}, dimension {dim} of {} has {size}",
                            sizes.iter().map(i64::to_string).collect::<Vec<_>>().join(", "),
                            shape_text(&shape)
                        ));
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
    pub(super) fn pair_groups(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed) {
        let (sources, targets) = (self.source.entries(), self.target.entries());
        for g in 0..r.groups.len() {
            if !r.groups[g].live {
                continue;
            }
            let (rule, members) = (r.groups[g].rule, r.groups[g].sources.clone());
            if let Action::Stack { .. } = &rules.rules()[rule].action {
                self.pair_stack(rules, lookup, r, g);
                continue;
            }
            if let Action::Dequantize { .. } = &rules.rules()[rule].action {
                self.pair_dequantize(rules, lookup, r, g);
                continue;
            }
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
                shape[d] = shapes.iter().try_fold(0i64, |a, s| a.checked_add(s[d])).ok_or_else(|| {
                    format!("the members' sizes along dimension {dim} add up past what an i64 holds")
                })?;
                // The inverse of the ops after cat, from the target back to the concatenation.
                let (shape, back) = shape_and_way_back(ops, &shape)?;
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
}
