//! Tensor transforms of the rule language (`| reshape(…)`, `| transpose(…)`,
//! `| permute(…)`, `| narrow(…)`; `split` and `cat` become narrows of the
//! source or of the target): each [`Op`] worked out on shapes, for the plan,
//! and on tensors, as strided views, for the copy.
//!
//! A [`Transform`] is what one pair does: ops applied to the source (a view of
//! it, or a reshaped copy where no view exists), and ops applied to the target
//! — always views — giving the region of the target that receives the result.
//! A split gives each part a narrow of the source; a concatenation gives each
//! member a narrow of the target (after the inverse of the ops that follow the
//! `cat`), so that every transfer stays one in-place write per target region.
use std::fmt;

use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use crate::fp8::Compute;

/// One op of a chain. Dimensions may be negative (counted from the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// `reshape(D0, D1, …)`: same elements, another shape; one `-1` is inferred.
    Reshape {
        /// The new shape.
        shape: Vec<i64>,
    },
    /// `transpose(A, B)`: swaps two dimensions.
    Transpose {
        /// The two dimensions.
        dims: [i64; 2],
    },
    /// `permute(D0, D1, …)`: reorders every dimension.
    Permute {
        /// Dimension `k` of the result is dimension `dims[k]` of the input.
        dims: Vec<i64>,
    },
    /// `narrow(D, START, LENGTH)`: `LENGTH` indices of dimension `D` from `START`.
    Narrow {
        /// The dimension.
        dim: i64,
        /// The first index (negative: from the end).
        start: i64,
        /// How many indices.
        length: i64,
    },
}

fn list(values: &[i64]) -> String {
    values.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

/// `[3, 4]`: a shape as messages write it.
pub(crate) fn shape_text(shape: &[i64]) -> String {
    format!("[{}]", list(shape))
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Reshape { shape } => write!(f, "reshape({})", list(shape)),
            Op::Transpose { dims } => write!(f, "transpose({}, {})", dims[0], dims[1]),
            Op::Permute { dims } => write!(f, "permute({})", list(dims)),
            Op::Narrow { dim, start, length } => write!(f, "narrow({dim}, {start}, {length})"),
        }
    }
}

/// `dim` counted from the front of a shape of `rank` dimensions.
pub(crate) fn normalize(dim: i64, rank: usize, shape: &[i64]) -> Result<usize, String> {
    let rank_i = rank as i64;
    let d = if dim < 0 { dim + rank_i } else { dim };
    if (0..rank_i).contains(&d) {
        Ok(d as usize)
    } else {
        Err(format!("dimension {dim} is out of range for shape {}", shape_text(shape)))
    }
}

/// The elements of `shape`, or why they cannot be counted (a negative size,
/// or more than an `i64` holds).
fn numel(shape: &[i64]) -> Result<i64, String> {
    shape
        .iter()
        .try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) })
        .ok_or_else(|| format!("{} has no element count (a negative size or an overflow)", shape_text(shape)))
}

impl Op {
    /// The shape this op makes of `shape`, or why it cannot apply. Every
    /// number is checked here, with checked arithmetic, so that libtorch only
    /// ever sees ops that fit.
    pub fn shape(&self, shape: &[i64]) -> Result<Vec<i64>, String> {
        let rank = shape.len();
        match self {
            Op::Reshape { shape: to } => {
                let total = numel(shape)?;
                let inferred = to.iter().filter(|&&d| d == -1).count();
                if inferred > 1 || to.iter().any(|&d| d < -1) {
                    return Err(format!("{self}: sizes are at least 0, and one at most is -1 (inferred)"));
                }
                let known = to
                    .iter()
                    .filter(|&&d| d != -1)
                    .try_fold(1i64, |n, &d| n.checked_mul(d))
                    .ok_or_else(|| format!("{self}: its sizes multiply past what an i64 holds"))?;
                let mut out = to.clone();
                if let Some(at) = to.iter().position(|&d| d == -1) {
                    if known == 0 || total % known != 0 {
                        return Err(format!(
                            "{self} cannot apply to {} ({total} elements)",
                            shape_text(shape)
                        ));
                    }
                    out[at] = total / known;
                } else if known != total {
                    return Err(format!("{self} needs {known} elements, {} has {total}", shape_text(shape)));
                }
                Ok(out)
            }
            Op::Transpose { dims } => {
                let (a, b) = (normalize(dims[0], rank, shape)?, normalize(dims[1], rank, shape)?);
                let mut out = shape.to_vec();
                out.swap(a, b);
                Ok(out)
            }
            Op::Permute { dims } => {
                let order = self.permutation(shape)?;
                debug_assert_eq!(order.len(), dims.len());
                Ok(order.iter().map(|&d| shape[d]).collect())
            }
            Op::Narrow { dim, start, length } => {
                let d = normalize(*dim, rank, shape)?;
                let size = shape[d];
                let from = if *start < 0 { start.checked_add(size) } else { Some(*start) };
                let fits = from
                    .filter(|&from| from >= 0 && *length >= 0)
                    .and_then(|from| from.checked_add(*length))
                    .is_some_and(|end| end <= size);
                if !fits {
                    return Err(format!(
                        "{self} is out of range: dimension {dim} of {} has {size} indices",
                        shape_text(shape)
                    ));
                }
                let mut out = shape.to_vec();
                out[d] = *length;
                Ok(out)
            }
        }
    }

    /// A permute's dimensions counted from the front, checked to be a
    /// permutation of `shape`'s dimensions.
    fn permutation(&self, shape: &[i64]) -> Result<Vec<usize>, String> {
        let Op::Permute { dims } = self else { unreachable!("only permute has a permutation") };
        if dims.len() != shape.len() {
            return Err(format!(
                "{self} names {} dimensions, {} has {}",
                dims.len(),
                shape_text(shape),
                shape.len()
            ));
        }
        let order = dims.iter().map(|&d| normalize(d, shape.len(), shape)).collect::<Result<Vec<_>, _>>()?;
        let mut seen = vec![false; order.len()];
        for &d in &order {
            if std::mem::replace(&mut seen[d], true) {
                return Err(format!("{self} names dimension {d} twice"));
            }
        }
        Ok(order)
    }

    /// The op that takes this op's result (of `input`'s shape) back to
    /// `input`'s shape, as a view; `None` for `narrow`, which loses indices.
    pub(crate) fn inverse(&self, input: &[i64]) -> Result<Option<Op>, String> {
        Ok(match self {
            Op::Reshape { .. } => Some(Op::Reshape { shape: input.to_vec() }),
            Op::Transpose { dims } => Some(Op::Transpose { dims: *dims }),
            Op::Permute { .. } => {
                let order = self.permutation(input)?;
                let mut back = vec![0i64; order.len()];
                for (k, &d) in order.iter().enumerate() {
                    back[d] = k as i64;
                }
                Some(Op::Permute { dims: back })
            }
            Op::Narrow { .. } => None,
        })
    }

    /// This op on a tensor. `view_only`: a reshape must be a view (for the
    /// target, which is written through it); otherwise a reshape that no view
    /// can express copies (a transposed source reshaped, say).
    pub(crate) fn apply(&self, tensor: &Tensor, view_only: bool) -> Result<Tensor, tch::TchError> {
        match self {
            Op::Reshape { shape } if view_only => tensor.f_view(shape.as_slice()),
            Op::Reshape { shape } => tensor.f_reshape(shape.as_slice()),
            Op::Transpose { dims } => tensor.f_transpose(dims[0], dims[1]),
            Op::Permute { dims } => tensor.f_permute(dims.as_slice()),
            Op::Narrow { dim, start, length } => tensor.f_narrow(*dim, *start, *length),
        }
    }
}

/// The shape `ops` make of `shape`, and the ops that take a tensor of that
/// shape back to `shape` (the inverses, last op first).
pub(crate) fn shape_and_way_back(ops: &[Op], shape: &[i64]) -> Result<(Vec<i64>, Vec<Op>), String> {
    let (mut shape, mut back) = (shape.to_vec(), Vec::new());
    for op in ops {
        let next = op.shape(&shape)?;
        back.extend(op.inverse(&shape)?);
        shape = next;
    }
    back.reverse();
    Ok((shape, back))
}

/// The shape `ops` make of `shape`, applied left to right.
pub(crate) fn shape_after(ops: &[Op], shape: &[i64]) -> Result<Vec<i64>, String> {
    let mut shape = shape.to_vec();
    for op in ops {
        shape = op.shape(&shape)?;
    }
    Ok(shape)
}

/// Whether `regions` (ops from a tensor of `shape` to a region of it) cover
/// it exactly once: ops they all start with are followed; where they narrow,
/// the narrows of one dimension must lie side by side from 0 to its end, and
/// the regions within each narrow tile it in turn.
pub(crate) fn tiles(regions: &[&[Op]], shape: &[i64]) -> bool {
    if regions.iter().all(|r| r.is_empty()) {
        return regions.len() == 1;
    }
    if regions.iter().any(|r| r.is_empty()) {
        return false;
    }
    let first = &regions[0][0];
    let tails: Vec<&[Op]> = regions.iter().map(|r| &r[1..]).collect();
    let Op::Narrow { dim, .. } = first else {
        return regions.iter().all(|r| r[0] == *first)
            && first.shape(shape).is_ok_and(|next| tiles(&tails, &next));
    };
    let Ok(d) = normalize(*dim, shape.len(), shape) else { return false };
    let mut slices = Vec::with_capacity(regions.len());
    for (r, tail) in regions.iter().zip(&tails) {
        let Op::Narrow { dim, start, length } = r[0] else { return false };
        if normalize(dim, shape.len(), shape) != Ok(d) {
            return false;
        }
        let start = if start < 0 { start + shape[d] } else { start };
        slices.push((start, length, *tail));
    }
    slices.sort_by_key(|s| (s.0, s.1));
    let mut next = 0;
    let mut k = 0;
    while k < slices.len() {
        let (start, length) = (slices[k].0, slices[k].1);
        let same = slices[k..].iter().take_while(|s| (s.0, s.1) == (start, length)).count();
        if start != next {
            return false;
        }
        let mut part = shape.to_vec();
        part[d] = length;
        let inner: Vec<&[Op]> = slices[k..k + same].iter().map(|s| s.2).collect();
        if !tiles(&inner, &part) {
            return false;
        }
        next = start + length;
        k += same;
    }
    next == shape[d]
}

/// What one pair does to the tensors it joins.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Transform {
    /// Applied to the source, left to right: what is written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ops: Vec<Op>,
    /// Applied to the target, left to right, as views: where it is written
    /// (a member of a `cat` writes one slice of its target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_ops: Vec<Op>,
    /// The source tensor's shape, before the ops.
    #[serde(default, skip_deserializing)]
    pub source_shape: Vec<i64>,
    /// The target tensor's shape, before the ops.
    #[serde(default, skip_deserializing)]
    pub target_shape: Vec<i64>,
    /// Values computed from the source (after its ops), not copied: FP8
    /// block scales applied or made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<Compute>,
}

impl Transform {
    /// The shapes written and written into: the source after its ops, the
    /// target's region after its ops; or why an op cannot apply.
    pub fn result_shapes(&self) -> Result<(Vec<i64>, Vec<i64>), String> {
        let mut written =
            shape_after(&self.source_ops, &self.source_shape).map_err(|e| format!("source: {e}"))?;
        if let Some(compute) = &self.compute {
            written = compute.shape(&written).map_err(|e| format!("{compute}: {e}"))?;
        }
        let region = shape_after(&self.target_ops, &self.target_shape).map_err(|e| format!("target: {e}"))?;
        Ok((written, region))
    }

    /// The source as written: a view where one exists.
    pub(crate) fn source_view(&self, tensor: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut out = tensor.shallow_clone();
        for op in &self.source_ops {
            out = op.apply(&out, false)?;
        }
        Ok(out)
    }

    /// The region of the target written into: always a view of it.
    pub(crate) fn target_view(&self, tensor: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut out = tensor.shallow_clone();
        for op in &self.target_ops {
            out = op.apply(&out, true)?;
        }
        Ok(out)
    }

    /// ` | reshape(-1)`: the source's ops as a rule writes them.
    pub fn source_text(&self) -> String {
        let ops: String = self.source_ops.iter().map(|op| format!(" | {op}")).collect();
        match &self.compute {
            Some(compute) => format!("{ops} | computed: {compute}"),
            None => ops,
        }
    }

    /// `[narrow(0, 0, 64)]`: the target region, if it is not the whole target.
    pub fn target_text(&self) -> String {
        if self.target_ops.is_empty() {
            return String::new();
        }
        format!("[{}]", self.target_ops.iter().map(Op::to_string).collect::<Vec<_>>().join(" | "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn shapes_follow_torch() {
        let reshape = Op::Reshape { shape: vec![-1] };
        assert_eq!(reshape.shape(&[96, 1, 1]).unwrap(), vec![96]);
        assert!(Op::Reshape { shape: vec![5, -1] }.shape(&[96]).unwrap_err().contains("96 elements"));
        assert!(Op::Reshape { shape: vec![4, 4] }.shape(&[96]).unwrap_err().contains("needs 16"));
        assert_eq!(Op::Transpose { dims: [0, -1] }.shape(&[2, 3, 4]).unwrap(), vec![4, 3, 2]);
        assert!(Op::Transpose { dims: [0, 3] }.shape(&[2, 3]).unwrap_err().contains("out of range"));
        assert_eq!(Op::Permute { dims: vec![2, 0, 1] }.shape(&[2, 3, 4]).unwrap(), vec![4, 2, 3]);
        assert!(Op::Permute { dims: vec![0, 0] }.shape(&[2, 3]).unwrap_err().contains("twice"));
        assert!(Op::Permute { dims: vec![0] }.shape(&[2, 3]).unwrap_err().contains("names 1"));
        assert_eq!(Op::Narrow { dim: 0, start: -2, length: 2 }.shape(&[5, 3]).unwrap(), vec![2, 3]);
        assert!(Op::Narrow { dim: 0, start: 4, length: 2 }.shape(&[5]).unwrap_err().contains("out of range"));
    }

    /// Numbers that overflow are refused by name, never handed to libtorch.
    #[test]
    fn overflowing_numbers_are_refused() {
        let max = i64::MAX;
        for op in [
            Op::Narrow { dim: 0, start: max, length: max },
            Op::Narrow { dim: 0, start: 1, length: max },
            Op::Narrow { dim: 0, start: i64::MIN, length: 1 },
            Op::Narrow { dim: i64::MIN, start: 0, length: 1 },
        ] {
            assert!(op.shape(&[5]).unwrap_err().contains("out of range"), "{op}");
        }
        assert!(Op::Reshape { shape: vec![max, max, 0] }.shape(&[0]).unwrap_err().contains("multiply"));
        assert!(Op::Reshape { shape: vec![-1, -1] }.shape(&[4]).unwrap_err().contains("one at most"));
        assert!(Op::Reshape { shape: vec![-2, -2] }.shape(&[4]).unwrap_err().contains("at least 0"));
        assert!(Op::Reshape { shape: vec![-1] }.shape(&[max, max]).unwrap_err().contains("overflow"));
        assert!(Op::Transpose { dims: [i64::MIN, 0] }.shape(&[2]).unwrap_err().contains("out of range"));
        assert!(Op::Permute { dims: vec![i64::MIN] }.shape(&[2]).unwrap_err().contains("out of range"));
    }

    #[test]
    fn inverses_take_results_back() {
        let t = Tensor::arange(24, (Kind::Float, Device::Cpu)).view([2, 3, 4]);
        for op in [
            Op::Reshape { shape: vec![6, -1] },
            Op::Transpose { dims: [0, 2] },
            Op::Permute { dims: vec![1, -1, 0] },
        ] {
            let out = op.apply(&t, false).unwrap();
            let back = op.inverse(&[2, 3, 4]).unwrap().unwrap().apply(&out, false).unwrap();
            assert!(back.equal(&t), "{op}");
        }
        assert!(Op::Narrow { dim: 0, start: 0, length: 1 }.inverse(&[2]).unwrap().is_none());
    }

    /// Regions tile a target when they cover it once: side by side, nested
    /// (a stack's slices in a cat's), never overlapping or leaving a gap.
    #[test]
    fn regions_tile_exactly_once() {
        let n = |dim, start, length| Op::Narrow { dim, start, length };
        let t = Op::Transpose { dims: [0, 1] };
        let tiles_of =
            |regions: &[Vec<Op>]| tiles(&regions.iter().map(Vec::as_slice).collect::<Vec<_>>(), &[4, 6]);
        assert!(tiles_of(&[vec![n(0, 0, 1)], vec![n(0, 1, 3)]]));
        assert!(tiles_of(&[vec![t.clone(), n(0, 0, 6)]]));
        assert!(tiles_of(&[
            vec![n(1, 0, 3), n(0, 0, 2)],
            vec![n(1, 0, 3), n(0, 2, 2)],
            vec![n(1, -3, 3), n(0, 0, 4)],
        ]));
        assert!(!tiles_of(&[vec![n(0, 0, 2)], vec![n(0, 1, 3)]]), "overlap");
        assert!(!tiles_of(&[vec![n(0, 0, 1)], vec![n(0, 2, 2)]]), "gap");
        assert!(!tiles_of(&[vec![n(0, 0, 4)], vec![n(0, 0, 4)]]), "twice");
        assert!(!tiles_of(&[vec![n(1, 0, 3), n(0, 0, 2)], vec![n(1, 3, 3)]]), "nested gap");
        assert!(!tiles_of(&[vec![n(0, 0, 2)], vec![n(1, 0, 6)]]), "two dimensions");
        assert!(!tiles_of(&[vec![t.clone(), n(0, 0, 6)], vec![n(0, 0, 4)]]), "different ops");
        assert!(!tiles_of(&[vec![], vec![n(0, 0, 4)]]));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use tch::{Device, Kind};

        fn shape() -> impl Strategy<Value = Vec<i64>> {
            prop::collection::vec(1i64..5, 1..5)
        }

        fn tensor(shape: &[i64]) -> Tensor {
            Tensor::randn(shape, (Kind::Float, Device::Cpu))
        }

        proptest! {
            /// Every op's shape is libtorch's, and its view holds libtorch's values.
            #[test]
            fn ops_match_libtorch(shape in shape(), a in -4i64..4, b in -4i64..4, start in 0i64..4, len in 0i64..4, seed in any::<u64>()) {
                let t = tensor(&shape);
                let rank = shape.len() as i64;
                let mut order: Vec<i64> = (0..rank).collect();
                let mut s = seed;
                for i in (1..order.len()).rev() {
                    order.swap(i, (s % (i as u64 + 1)) as usize);
                    s /= i as u64 + 1;
                }
                let ops = [
                    (Op::Reshape { shape: vec![-1] }, t.f_reshape([-1])),
                    (Op::Reshape { shape: vec![shape[0], -1] }, t.f_reshape([shape[0], -1])),
                    (Op::Transpose { dims: [a, b] }, t.f_transpose(a, b)),
                    (Op::Permute { dims: order.clone() }, t.f_permute(order.as_slice())),
                    (Op::Narrow { dim: a, start, length: len }, t.f_narrow(a, start, len)),
                ];
                for (op, expected) in ops {
                    match (op.shape(&shape), expected) {
                        (Ok(out), Ok(expected)) => {
                            prop_assert_eq!(&out, &expected.size());
                            prop_assert!(op.apply(&t, false).unwrap().equal(&expected));
                        }
                        (Err(_), Err(_)) => {}
                        (ours, theirs) => prop_assert!(false, "{op} on {shape:?}: {ours:?} vs {:?}", theirs.map(|t| t.size())),
                    }
                }
            }

            /// Parts of a split are libtorch's `split`; members of a cat are the
            /// slices of libtorch's `cat`.
            #[test]
            fn splits_and_cats_are_narrows(shape in shape(), dim in 0usize..4, parts in 1i64..4) {
                let dim = dim % shape.len();
                let mut shape = shape;
                shape[dim] *= parts;
                let t = tensor(&shape);
                let size = shape[dim] / parts;
                let expected = t.split(size, dim as i64);
                for (k, part) in expected.iter().enumerate() {
                    let op = Op::Narrow { dim: dim as i64, start: k as i64 * size, length: size };
                    prop_assert!(op.apply(&t, false).unwrap().equal(part));
                }
                let members: Vec<Tensor> = (0..parts).map(|_| tensor(&{ let mut s = shape.clone(); s[dim] = size; s })).collect();
                let cat = Tensor::cat(&members, dim as i64);
                let target = Tensor::zeros(cat.size(), (Kind::Float, Device::Cpu));
                for (k, m) in members.iter().enumerate() {
                    let region = Transform {
                        target_ops: vec![Op::Narrow { dim: dim as i64, start: k as i64 * size, length: size }],
                        ..Transform::default()
                    };
                    region.target_view(&target).unwrap().copy_(m);
                }
                prop_assert!(target.equal(&cat));
            }
        }
    }
}
