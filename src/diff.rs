//! `diff`: two models compared tensor by tensor after mapping.
use std::fmt;

use serde::Serialize;
use tch::{Device, Kind};

use crate::dotted::{escaped, shown};
use crate::dtype::{self, Dtype};
use crate::error::{Error, Result};
use crate::plan::{Plan, Side};
use crate::store::Source;

/// How close two tensors must be to count as the same:
/// `|a - b| <= atol + rtol * |b|` everywhere (NaN matches NaN).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

/// One pair compared.
#[derive(Debug, Clone, Serialize)]
pub struct TensorDiff {
    /// Name in A.
    pub a: String,
    /// Name in B.
    pub b: String,
    /// Bit for bit equal (same dtype, shape and bytes).
    pub identical: bool,
    /// Within the tolerance.
    pub close: bool,
    /// Largest |a - b|, when the shapes agree.
    pub max_abs: Option<f64>,
    /// Largest |a - b| / |b| (where b != 0), when the shapes agree.
    pub max_rel: Option<f64>,
    /// Shapes, when they differ.
    pub shapes: Option<(Vec<i64>, Vec<i64>)>,
    /// Dtypes, when they differ.
    pub dtypes: Option<(String, String)>,
}

/// Two models compared.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    /// Model A.
    pub a: String,
    /// Model B.
    pub b: String,
    /// The tolerance used.
    pub tolerance: Tolerance,
    /// Every pair, in B's order.
    pub pairs: Vec<TensorDiff>,
    /// Names in A with no counterpart in B.
    pub only_in_a: Vec<String>,
    /// Names in B with no counterpart in A.
    pub only_in_b: Vec<String>,
    /// Pairs not within the tolerance.
    pub differing: usize,
}

impl Diff {
    /// Whether every tensor has a counterpart and every pair is within the tolerance.
    pub fn is_same(&self) -> bool {
        self.differing == 0 && self.only_in_a.is_empty() && self.only_in_b.is_empty()
    }
}

fn value(t: tch::Tensor, store: &str, name: &str) -> Result<f64> {
    t.f_double_value(&[]).map_err(|source| Error::Tensor {
        store: store.to_string(),
        tensor: name.to_string(),
        source,
    })
}

/// Whether libtorch converts `dtype`'s values to float64 (the `bits`, packed
/// float4 and quantized types have no values it can convert: they are compared
/// byte for byte only).
fn has_values(dtype: Dtype) -> bool {
    !matches!(
        dtype,
        Dtype::Bits1x8
            | Dtype::Bits2x4
            | Dtype::Bits4x2
            | Dtype::Bits8
            | Dtype::Bits16
            | Dtype::Float4E2M1FnX2
            | Dtype::QInt8
            | Dtype::QUInt8
            | Dtype::QInt32
            | Dtype::QUInt4x2
            | Dtype::QUInt2x4
    )
}

/// Whether `x` and `y` (of one dtype and shape) hold the same bytes, in row-major order.
fn same_bytes(x: &tch::Tensor, y: &tch::Tensor, dtype: Dtype) -> std::result::Result<bool, tch::TchError> {
    let bytes = |t: &tch::Tensor| -> std::result::Result<tch::Tensor, tch::TchError> {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let element = dtype.size() as i64;
        crate::ffi::strided_view(
            &t,
            Dtype::UInt8,
            &[t.numel() as i64 * element],
            &[1],
            t.storage_offset() * element,
        )
        .map_err(tch::TchError::Kind)
    };
    bytes(x)?.f_equal(&bytes(y)?)
}

/// Compares every pair of `plan` (A as source, B as target): `identical` is
/// bit for bit; values are compared as float64 (so a `uint64` above 2^53 is
/// rounded there, and only `identical` tells it apart); dtypes whose values
/// libtorch cannot convert (`bits8`, `float4_e2m1fn_x2`) are close only when identical.
pub fn diff(plan: &Plan, a: &dyn Source, b: &dyn Source, tolerance: Tolerance) -> Result<Diff> {
    let _no_grad = tch::no_grad_guard();
    let mut pairs = Vec::with_capacity(plan.pairs.len());
    for pair in &plan.pairs {
        let missing = |store: &dyn Source, name: &str| Error::MissingTensor {
            store: store.origin().to_string(),
            tensor: name.to_string(),
        };
        let x = a.tensor(pair.source).ok_or_else(|| missing(a, &pair.source_name))?;
        let y = b.tensor(pair.target).ok_or_else(|| missing(b, &pair.target_name))?;
        let (ex, ey) = (&a.entries()[pair.source], &b.entries()[pair.target]);
        let dtypes = (ex.dtype != ey.dtype)
            .then(|| (dtype::name(ex.dtype).to_string(), dtype::name(ey.dtype).to_string()));
        let mut diff = TensorDiff {
            a: pair.source_name.to_string(),
            b: pair.target_name.to_string(),
            identical: false,
            close: false,
            max_abs: None,
            max_rel: None,
            shapes: (ex.shape != ey.shape).then(|| (ex.shape.clone(), ey.shape.clone())),
            dtypes,
        };
        if diff.shapes.is_none() {
            let err = |source| Error::Tensor {
                store: b.origin().to_string(),
                tensor: pair.target_name.to_string(),
                source,
            };
            diff.identical = diff.dtypes.is_none() && same_bytes(x, y, ex.dtype).map_err(err)?;
            if !has_values(ex.dtype) || !has_values(ey.dtype) {
                diff.close = diff.identical;
                pairs.push(diff);
                continue;
            }
            let (x64, y64) = (
                x.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double)).map_err(err)?,
                y.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double)).map_err(err)?,
            );
            if x64.numel() == 0 {
                diff.close = true;
                diff.max_abs = Some(0.0);
                diff.max_rel = Some(0.0);
            } else {
                // Every operation on tensors of file-given sizes through the f_ variants:
                // an allocation that fails is an error naming the tensor, not a panic.
                let delta =
                    x64.f_sub(&y64).and_then(|d| d.f_abs()).and_then(|d| d.f_nan_to_num(0.0, None, None));
                let delta = delta.map_err(err)?;
                diff.max_abs = Some(value(delta.f_max().map_err(err)?, b.origin(), &pair.target_name)?);
                let rel = y64.f_abs().and_then(|scale| {
                    let zeros = scale.f_zeros_like()?;
                    delta
                        .f_where_self(&scale.f_gt(0.0)?, &zeros)?
                        .f_div(&scale.f_clamp_min(f64::MIN_POSITIVE)?)
                });
                diff.max_rel =
                    Some(value(rel.and_then(|r| r.f_max()).map_err(err)?, b.origin(), &pair.target_name)?);
                let close = x64.f_isclose(&y64, tolerance.rtol, tolerance.atol, true).map_err(err)?;
                let all = close.f_all().and_then(|a| a.f_to_kind(Kind::Int64)).map_err(err)?;
                diff.close = value(all, b.origin(), &pair.target_name)? != 0.0;
            }
        }
        pairs.push(diff);
    }
    let names = |side: Side| -> Vec<String> {
        let list = if side == Side::Source { &plan.source_leftovers } else { &plan.target_leftovers };
        list.iter().map(|l| l.name.to_string()).collect()
    };
    let differing = pairs.iter().filter(|p| !p.close).count();
    Ok(Diff {
        a: plan.source.clone(),
        b: plan.target.clone(),
        tolerance,
        pairs,
        only_in_a: names(Side::Source),
        only_in_b: names(Side::Target),
        differing,
    })
}

const SHOWN: usize = 20;

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "A: {}\nB: {}", escaped(&self.a), escaped(&self.b))?;
        let identical = self.pairs.iter().filter(|p| p.identical).count();
        let close = self.pairs.iter().filter(|p| p.close && !p.identical).count();
        writeln!(
            f,
            "  {} pairs: {identical} identical, {close} within rtol={} atol={}, {} differ",
            self.pairs.len(),
            self.tolerance.rtol,
            self.tolerance.atol,
            self.differing
        )?;
        for p in self.pairs.iter().filter(|p| !p.close).take(SHOWN) {
            let name = if p.a == p.b {
                shown(&p.a).into_owned()
            } else {
                format!("{} / {}", shown(&p.a), shown(&p.b))
            };
            match (&p.shapes, p.max_abs) {
                (Some((sa, sb)), _) => writeln!(f, "    {name}: shapes differ {sa:?} vs {sb:?}")?,
                (None, Some(abs)) => {
                    write!(
                        f,
                        "    {name}: max |a-b| = {abs:.3e}, max rel = {:.3e}",
                        p.max_rel.unwrap_or(0.0)
                    )?;
                    match &p.dtypes {
                        Some((da, db)) => writeln!(f, " ({da} vs {db})")?,
                        None => writeln!(f)?,
                    }
                }
                (None, None) => writeln!(f, "    {name}: differs")?,
            }
        }
        if self.differing > SHOWN {
            writeln!(f, "    … and {} more", self.differing - SHOWN)?;
        }
        for (label, list) in [("only in A", &self.only_in_a), ("only in B", &self.only_in_b)] {
            if !list.is_empty() {
                let names: Vec<String> = list.iter().take(SHOWN).map(|n| shown(n).into_owned()).collect();
                let more = if list.len() > SHOWN {
                    format!(" … and {} more", list.len() - SHOWN)
                } else {
                    String::new()
                };
                writeln!(f, "  {label} ({}): {}{more}", list.len(), names.join(", "))?;
            }
        }
        write!(f, "  verdict: {}", if self.is_same() { "same" } else { "different" })
    }
}
