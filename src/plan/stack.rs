//! Names that rules make over a capture's whole range: the groups of a `stack`
//! (every source one rule's pattern matches, in the order of its index
//! capture, with the captures `T` uses equal) and the parts of an `unstack`
//! (one target per index of a dimension). Both stay strided views: a stacked
//! member writes the slice `narrow(D, index, 1)` of its target, seen in the
//! member's shape; an unstacked part reads that slice of its source.
use std::collections::BTreeMap;
use std::collections::HashMap;

use super::build::{Builder, Renamed};
use super::many::{Group, MemberOf};
use super::Finding;
use crate::dotted::NameLookup;
use crate::matching::How;
use crate::rules::{Action, Rule, Rules};
use crate::transform::{normalize, shape_after, shape_and_way_back, shape_text, Op, Transform};

/// `shape` with `size` inserted at `dim` (`dim` counted in the result).
fn inserted(shape: &[i64], dim: usize, size: i64) -> Vec<i64> {
    let mut out = shape.to_vec();
    out.insert(dim, size);
    out
}

/// The ops that take a tensor of `shape` to its index `k` along `dim`, as a
/// tensor without that dimension: a narrow and a reshape (views both).
fn select(shape: &[i64], dim: usize, k: i64) -> [Op; 2] {
    let mut without = shape.to_vec();
    without.remove(dim);
    [Op::Narrow { dim: dim as i64, start: k, length: 1 }, Op::Reshape { shape: without }]
}

/// The parts an unstack rule makes of a source of `shape`: for each target
/// listed, the split's narrow (if any) and its shape; and the unstacked
/// dimension (of a part) with its size.
#[allow(clippy::type_complexity)]
pub(crate) fn unstack_parts(
    rule: &Rule,
    shape: &[i64],
) -> Result<(Vec<(Option<Op>, Vec<i64>)>, usize, i64), String> {
    let Action::Unstack { targets, dim, split } = &rule.action else {
        return Err("not an unstack".into());
    };
    let shape = shape_after(&rule.ops, shape)?;
    let parts: Vec<(Option<Op>, Vec<i64>)> = match split {
        None => vec![(None, shape.clone())],
        Some((c, sizes)) => {
            let d = normalize(*c, shape.len(), &shape)?;
            let size = shape[d];
            let sizes = match sizes {
                Some(sizes) => {
                    if sizes.iter().try_fold(0i64, |a, &b| a.checked_add(b)) != Some(size) {
                        return Err(format!(
                            "the parts of split({c}, …) do not add up to dimension {c} of {} ({size})",
                            shape_text(&shape)
                        ));
                    }
                    sizes.clone()
                }
                None if size % targets.len() as i64 == 0 => vec![size / targets.len() as i64; targets.len()],
                None => {
                    return Err(format!(
                        "dimension {c} of {} ({size}) does not split into {} equal parts",
                        shape_text(&shape),
                        targets.len()
                    ))
                }
            };
            let mut start = 0;
            sizes
                .iter()
                .map(|&s| {
                    let mut part = shape.clone();
                    part[d] = s;
                    let op = Op::Narrow { dim: d as i64, start, length: s };
                    start += s;
                    (Some(op), part)
                })
                .collect()
        }
    };
    let u = normalize(*dim, shape.len(), &shape)?;
    if let Some((c, _)) = split {
        if normalize(*c, shape.len(), &shape)? == u {
            return Err(format!("split({c}) and unstack({dim}) name one dimension"));
        }
    }
    Ok((parts, u, shape[u]))
}

/// How many targets an unstack rule makes of a source of `shape` (0 where it
/// cannot apply: the plan then reports why).
pub(super) fn unstack_count(rule: &Rule, shape: &[i64]) -> usize {
    unstack_parts(rule, shape).map_or(0, |(parts, _, n)| parts.len() * n as usize)
}

/// A stack group's members, one per pattern and index, before it is checked.
type Found = BTreeMap<u64, Vec<Vec<usize>>>;

impl Builder<'_> {
    /// The groups of `stack` rules: sources of one rule with equal captures
    /// (the index aside), every index from 0 for every pattern. An index that
    /// is not a number, a gap, a pattern missing at an index or two sources
    /// for one place are errors naming the rule and the sources; the group's
    /// sources are set aside.
    pub(super) fn form_stacks(&mut self, rules: &Rules, members: &[&MemberOf], r: &mut Renamed) {
        let sources = self.source.entries();
        let mut index: HashMap<(usize, &[String]), usize> = HashMap::new();
        let mut found: Vec<(usize, &str, Found, Vec<usize>)> = Vec::new();
        for m in members {
            let patterns = rules.rules()[m.rule].patterns().len();
            let g = *index.entry((m.rule, &m.key)).or_insert_with(|| {
                found.push((m.rule, &m.to, BTreeMap::new(), Vec::new()));
                found.len() - 1
            });
            let text = m.index.as_deref().unwrap_or_default();
            // A number as written in names: digits, no sign, no leading zero.
            let number = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.parse::<u64>().ok())
                .flatten()
                .filter(|n| n.to_string() == text);
            match number {
                Some(n) => {
                    found[g].2.entry(n).or_insert_with(|| vec![Vec::new(); patterns])[m.member].push(m.source)
                }
                None => found[g].3.push(m.source),
            }
        }
        for (rule, to, by_index, not_numbers) in found {
            let patterns = rules.rules()[rule].patterns();
            let text = rules.rules()[rule].to_string();
            let all: Vec<usize> =
                by_index.values().flatten().flatten().chain(&not_numbers).copied().collect();
            let name = |i: usize| sources[i].name.to_string();
            let problem = if !not_numbers.is_empty() {
                Some(format!(
                    "the index of {} is not a number from 0 (as 0, 1, 12)",
                    not_numbers.iter().map(|&i| name(i)).collect::<Vec<_>>().join(", ")
                ))
            } else {
                by_index.values().flatten().find(|m| m.len() > 1).map(|twice| {
                    format!(
                        "{} are one place of the stack",
                        twice.iter().map(|&i| name(i)).collect::<Vec<_>>().join(" and ")
                    )
                })
            };
            if let Some(problem) = problem {
                self.set_aside_stack(&all, to);
                self.findings.push(Finding::Transform {
                    rule: text,
                    tensors: all.iter().take(8).map(|&i| name(i)).collect(),
                    problem,
                });
                continue;
            }
            let count = by_index.keys().next_back().map_or(0, |&n| n + 1);
            let mut missing = Vec::new();
            for k in 0..count {
                match by_index.get(&k) {
                    None => {
                        missing.push(format!("index {k} (a gap: the indices found run to {})", count - 1))
                    }
                    Some(at) => missing.extend(
                        (patterns.iter().zip(at))
                            .filter(|(_, m)| m.is_empty())
                            .map(|(p, _)| format!("index {k} of {p}")),
                    ),
                }
            }
            if !missing.is_empty() {
                self.set_aside_stack(&all, to);
                let found = by_index
                    .values()
                    .flat_map(|at| {
                        patterns
                            .iter()
                            .zip(at)
                            .filter_map(|(p, m)| m.first().map(|&i| (p.to_string(), name(i))))
                    })
                    .take(4)
                    .collect();
                self.findings.push(Finding::IncompleteGroup {
                    rule: text,
                    target: to.to_string(),
                    found,
                    missing,
                });
                continue;
            }
            // Index-major, pattern-minor.
            let sources: Vec<usize> = by_index.values().flat_map(|at| at.iter().map(|m| m[0])).collect();
            r.groups.push(Group { rule, to: to.to_string(), sources, live: true });
        }
    }

    fn set_aside_stack(&mut self, all: &[usize], to: &str) {
        for &i in all {
            self.source_explained.insert(i, format!("its stack for {to} is incomplete"));
        }
    }

    /// A stack group: member (pattern `m`, index `k`), given the stack's
    /// dimension (of size 1), writes the slice `k` along it of its pattern's
    /// part of the target, seen through the inverse of the ops after the
    /// stack (and cat).
    pub(super) fn pair_stack(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed, g: usize) {
        let (sources, targets) = (self.source.entries(), self.target.entries());
        let (rule, members) = (r.groups[g].rule, r.groups[g].sources.clone());
        let Action::Stack { dim, cat, .. } = &rules.rules()[rule].action else { return };
        let ops = &rules.rules()[rule].ops;
        let patterns = rules.rules()[rule].patterns().len();
        let count = (members.len() / patterns) as i64;
        let to = r.groups[g].to.clone();
        let regions = (|| {
            // Every index of one pattern has the pattern's shape.
            let mut shapes: Vec<&[i64]> = Vec::with_capacity(patterns);
            for m in 0..patterns {
                let first = sources[members[m]].shape.as_slice();
                if let Some(&odd) =
                    members[m..].iter().step_by(patterns).find(|&&i| sources[i].shape != first)
                {
                    return Err(format!(
                        "cannot stack {} {} with {} {}",
                        sources[members[m]].name,
                        shape_text(first),
                        sources[odd].name,
                        shape_text(&sources[odd].shape)
                    ));
                }
                shapes.push(first);
            }
            let rank = shapes[0].len() + 1;
            let s = normalize(*dim, rank, &inserted(shapes[0], 0, count))?;
            let stacked: Vec<Vec<i64>> =
                shapes.iter().map(|sh| inserted(sh, s.min(sh.len()), count)).collect();
            // Several patterns: their stacks concatenated along `cat`.
            let (shape, c) = match cat {
                None => (stacked[0].clone(), None),
                Some(c) => {
                    let c = normalize(*c, rank, &stacked[0])?;
                    let fits = |st: &Vec<i64>| {
                        st.len() == rank && (0..rank).all(|k| k == c || st[k] == stacked[0][k])
                    };
                    if c == s || !stacked.iter().all(fits) {
                        let list: Vec<String> = stacked.iter().map(|st| shape_text(st)).collect();
                        return Err(format!(
                            "cannot concatenate the stacks {} along dimension {c}",
                            list.join(", ")
                        ));
                    }
                    let mut shape = stacked[0].clone();
                    shape[c] =
                        stacked.iter().try_fold(0i64, |a, st| a.checked_add(st[c])).ok_or_else(|| {
                            "the stacks' sizes along the cat's dimension add up past what an i64 holds"
                                .to_string()
                        })?;
                    (shape, Some(c))
                }
            };
            let (shape, back) = shape_and_way_back(ops, &shape)?;
            let j = self.free_target(lookup, &to, r)?;
            if targets[j].shape != shape {
                return Err(format!(
                    "the result is {}, {to} is {}",
                    shape_text(&shape),
                    shape_text(&targets[j].shape)
                ));
            }
            let mut starts = vec![0i64; patterns];
            if let Some(c) = c {
                for m in 1..patterns {
                    starts[m] = starts[m - 1] + stacked[m - 1][c];
                }
            }
            let regions = (0..members.len()).map(|at| {
                let (k, m) = ((at / patterns) as i64, at % patterns);
                let mut target_ops = back.clone();
                let mut part = stacked[m].clone();
                if let Some(c) = c {
                    target_ops.push(Op::Narrow { dim: c as i64, start: starts[m], length: stacked[m][c] });
                    part[c] = stacked[m][c];
                }
                target_ops.push(Op::Narrow { dim: s as i64, start: k, length: 1 });
                // The member, seen with the stack's dimension (of size 1).
                (target_ops, vec![Op::Reshape { shape: inserted(shapes[m], s, 1) }])
            });
            Ok((j, regions.collect::<Vec<_>>()))
        })();
        match regions {
            Err(problem) => {
                let shown: Vec<usize> = members.iter().take(8).copied().collect();
                self.transform_problem(rule, &shown, &[&to], problem);
                for &i in &members {
                    self.source_explained.insert(i, "its rule's transform cannot apply".into());
                }
            }
            Ok((j, regions)) => {
                r.taken_target[j] = true;
                for (i, (target_ops, source_ops)) in members.into_iter().zip(regions) {
                    let transform = Transform { source_ops, target_ops, ..Transform::default() };
                    self.pair_with(i, j, Some(rule), How::Exact, Some(transform));
                }
            }
        }
    }

    /// An unstack: each (index, part) a narrow of the source after the rule's
    /// ops (the split's, then the index's), into its own target.
    pub(super) fn pair_unstack(&mut self, rules: &Rules, lookup: &NameLookup, r: &mut Renamed, k: usize) {
        let (i, rule) = (r.splits[k].source, r.splits[k].rule);
        let names: Vec<String> = r.splits[k].to.clone();
        let ops = &rules.rules()[rule].ops;
        let made = (|| {
            let (parts, u, count) = unstack_parts(&rules.rules()[rule], &self.source.entries()[i].shape)?;
            if count == 0 || names.len() != parts.len() * count as usize {
                return Err(format!("dimension {u} has no index to unstack"));
            }
            let mut pairs = Vec::with_capacity(names.len());
            for (at, name) in names.iter().enumerate() {
                let (e, m) = ((at / parts.len()) as i64, at % parts.len());
                let mut source_ops = ops.clone();
                source_ops.extend(parts[m].0.clone());
                source_ops.extend(select(&parts[m].1, u, e));
                pairs.push((self.free_target(lookup, name, r)?, source_ops));
            }
            Ok(pairs)
        })();
        match made {
            Err(problem) => {
                let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
                self.transform_problem(rule, &[i], &shown, problem);
            }
            Ok(pairs) => {
                for (j, source_ops) in pairs {
                    r.taken_target[j] = true;
                    let transform = Transform { source_ops, ..Transform::default() };
                    self.pair_with(i, j, Some(rule), How::Exact, Some(transform));
                }
            }
        }
    }
}
