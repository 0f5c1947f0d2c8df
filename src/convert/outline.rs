//! [`Outline`]: what a conversion will write, worked out from the source's
//! entries and the rules alone.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::dtype::Dtype;
use crate::entry::{Entry, EntryOrder, Format};
use crate::plan::{unstack_parts, Mapping};
use crate::rules::{Action, Outcome};
use crate::store::{Source, StoreKind};
use crate::transform::{normalize, shape_after};

/// The tensors a conversion will write: entries only, no values. A [`Source`]
/// so that a [`Plan`](crate::Plan) can be made into it.
#[derive(Debug, Clone)]
pub struct Outline {
    pub(super) origin: String,
    pub(super) entries: Vec<Entry>,
    order: EntryOrder,
}

impl Source for Outline {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Checkpoint(Format::Safetensors)
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entry_order(&self) -> EntryOrder {
        self.order
    }
    /// An outline has no values.
    fn tensor(&self, _: usize) -> Option<&Tensor> {
        None
    }
}

/// The dtype a source tensor of `kind` is written as: `dtype` for float16,
/// bfloat16, float32 and float64 tensors when asked, else its own (integer
/// buffers stay integers; float8 and the other stored-only dtypes keep theirs).
fn written_kind(kind: Dtype, dtype: Option<Kind>) -> Dtype {
    match dtype {
        Some(to) if kind.is_castable_float() => to.into(),
        _ => kind,
    }
}

/// A `cat` group as the outline sees it: where its first member is, the
/// target's name, each member's shape once found, the entry it will make.
struct Group {
    first: usize,
    to: String,
    shapes: Vec<Option<Vec<i64>>>,
    entry: Entry,
    /// For a `stack`: one more than the largest index found.
    count: Option<i64>,
}

/// The sizes of a split's parts, if they fit the shape the rule's ops make.
fn split_shapes(shape: &[i64], dim: i64, sizes: Option<&Vec<i64>>, parts: usize) -> Option<Vec<Vec<i64>>> {
    let d = normalize(dim, shape.len(), shape).ok()?;
    let sizes = match sizes {
        Some(sizes) => sizes.clone(),
        None if parts > 0 && shape[d] % parts as i64 == 0 => vec![shape[d] / parts as i64; parts],
        None => return None,
    };
    (sizes.iter().try_fold(0i64, |a, &b| a.checked_add(b)) == Some(shape[d])).then(|| {
        sizes
            .iter()
            .map(|&s| {
                let mut part = shape.to_vec();
                part[d] = s;
                part
            })
            .collect()
    })
}

/// The shape a stack of `count` tensors of each of `shapes` makes along a
/// new `dim`, the stacks concatenated along `cat` (none where they cannot be:
/// the plan reports why).
fn stacked_shape(shapes: &[Vec<i64>], dim: i64, cat: Option<i64>, count: i64) -> Option<Vec<i64>> {
    let rank = shapes.first()?.len() + 1;
    let d = normalize(dim, rank, &vec![0; rank]).ok()?;
    let stacked: Vec<Vec<i64>> = shapes
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.insert(d.min(s.len()), count);
            s
        })
        .collect();
    match cat {
        None => Some(stacked[0].clone()),
        Some(c) => {
            let c = normalize(c, rank, &stacked[0]).ok()?;
            let mut shape = stacked[0].clone();
            shape[c] = stacked.iter().try_fold(0i64, |a, s| a.checked_add(*s.get(c)?))?;
            Some(shape)
        }
    }
}

impl Outline {
    /// What `mapping`'s rules make of `source`'s entries: one tensor per kept or
    /// renamed name (shaped by its ops), per part of a split, per group of a
    /// `cat`; skipped names make none. Where a transform cannot apply, the
    /// source's own shape stands in: the plan then reports the problem. Two
    /// sources making one name make one entry: the plan reports the collision.
    /// `dtype` converts floating tensors.
    pub fn of(source: &dyn Source, mapping: &Mapping, origin: &str, dtype: Option<Kind>) -> Self {
        let rules = &mapping.rules;
        // (position, entry), the position being the first source's index and the
        // part's place, so the result keeps the source's order.
        let mut made: Vec<((usize, usize), Entry)> = Vec::new();
        let mut groups: HashMap<(usize, Vec<String>), Group> = HashMap::new();
        for (i, e) in source.entries().iter().enumerate() {
            let entry = |name: &str, shape: Vec<i64>| Entry {
                name: name.into(),
                shape,
                dtype: written_kind(e.dtype, dtype),
                device: tch::Device::Cpu,
                ..e.clone()
            };
            match rules.apply(&e.name) {
                Outcome::Skipped { .. } => {}
                Outcome::Kept => made.push(((i, 0), entry(&e.name, e.shape.clone()))),
                Outcome::Renamed { to, rule } => {
                    let shape =
                        shape_after(&rules.rules()[rule].ops, &e.shape).unwrap_or_else(|_| e.shape.clone());
                    made.push(((i, 0), entry(&to, shape)));
                }
                Outcome::Split { to, rule } => {
                    let r = &rules.rules()[rule];
                    if let Action::Quantize { block, dtype: fp8, .. } = &r.action {
                        // The weight in FP8, its scales in float32 on their grid.
                        let grid =
                            crate::fp8::scale_grid(&e.shape, *block).unwrap_or_else(|_| e.shape.clone());
                        let made_as =
                            |name: &str, shape: Vec<i64>, dtype: Dtype| Entry { dtype, ..entry(name, shape) };
                        made.push(((i, 0), made_as(&to[0], e.shape.clone(), *fp8)));
                        made.push(((i, 1), made_as(&to[1], grid, Dtype::Float32)));
                        continue;
                    }
                    let Action::Split { dim, sizes, .. } = &r.action else { continue };
                    let shapes = shape_after(&r.ops, &e.shape)
                        .ok()
                        .and_then(|shape| split_shapes(&shape, *dim, sizes.as_ref(), to.len()));
                    for (k, name) in to.iter().enumerate() {
                        let shape = shapes.as_ref().map_or_else(|| e.shape.clone(), |s| s[k].clone());
                        made.push(((i, k), entry(name, shape)));
                    }
                }
                Outcome::Member { to, rule, member, key, index } => {
                    let members = rules.rules()[rule].patterns().len();
                    let group = groups.entry((rule, key)).or_insert_with(|| Group {
                        first: i,
                        to,
                        shapes: vec![None; members],
                        entry: entry("", e.shape.clone()),
                        count: None,
                    });
                    group.shapes[member].get_or_insert_with(|| e.shape.clone());
                    if let Some(k) = index.and_then(|k| k.parse::<i64>().ok()) {
                        group.count = Some(group.count.unwrap_or(0).max(k.saturating_add(1)));
                    }
                }
                Outcome::Unstack { parts, rule } => {
                    // Where the rule cannot apply, the plan says why: no entry.
                    let Ok((shapes, u, count)) = unstack_parts(&rules.rules()[rule], &e.shape) else {
                        continue;
                    };
                    let names = crate::rules::unstacked_names(&parts, count as usize);
                    for (k, name) in names.iter().enumerate() {
                        let mut shape = shapes[k % shapes.len()].1.clone();
                        shape.remove(u);
                        made.push(((i, k), entry(name, shape)));
                    }
                }
            }
        }
        for ((rule, _), Group { first, to, shapes, entry: mut e, count }) in groups {
            let r = &rules.rules()[rule];
            if let (Action::Stack { dim, cat, .. }, Some(count)) = (&r.action, count) {
                if let Some(shape) = shapes.into_iter().collect::<Option<Vec<_>>>().and_then(|shapes| {
                    let stacked = stacked_shape(&shapes, *dim, *cat, count)?;
                    shape_after(&r.ops, &stacked).ok()
                }) {
                    e.shape = shape;
                }
                e.name = to.as_str().into();
                made.push(((first, 0), e));
                continue;
            }
            if let Action::Dequantize { dtype, .. } = &r.action {
                // The weight's shape (the first pattern's), in the dtype computed.
                if let Some(Some(shape)) = shapes.into_iter().next() {
                    e.shape = shape;
                }
                e.dtype = *dtype;
                e.name = to.as_str().into();
                made.push(((first, 0), e));
                continue;
            }
            let Action::Cat { dim, .. } = &r.action else { continue };
            if let Some(shapes) = shapes.into_iter().collect::<Option<Vec<_>>>() {
                let joined = normalize(*dim, shapes[0].len(), &shapes[0]).ok().and_then(|d| {
                    let mut shape = shapes[0].clone();
                    shape[d] =
                        shapes.iter().try_fold(0i64, |a, s| a.checked_add(s.get(d).copied().unwrap_or(0)))?;
                    Some(shape)
                });
                if let Some(shape) = joined.and_then(|s| shape_after(&r.ops, &s).ok()) {
                    e.shape = shape;
                }
            }
            e.name = to.as_str().into();
            made.push(((first, 0), e));
        }
        made.sort_by_key(|(at, _)| *at);
        let mut seen = std::collections::HashSet::new();
        let entries = made.into_iter().map(|(_, e)| e).filter(|e| seen.insert(e.name.clone())).collect();
        Self { origin: origin.to_string(), entries, order: source.entry_order() }
    }
}
