//! Executing a checked plan: under a no-grad guard, `dst.copy_(src)` for each
//! pair, in place (the target's tensors keep their storage, dtype and device),
//! then every pair verified.
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::{Plan, Policy};
use crate::store::Store;

/// What a copy did.
#[derive(Debug, Clone, Serialize)]
pub struct Copied {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes written into the target.
    pub bytes: u64,
    /// Seconds spent copying.
    pub copy_seconds: f64,
    /// Seconds spent verifying.
    pub verify_seconds: f64,
}

/// Checks `plan` under `policy`, then copies every pair from `source` into
/// `target` and verifies each: bit-exact where the dtypes are equal, equal to
/// the source converted to the target's dtype otherwise. Nothing is written if
/// the check fails or the stores are not the ones the plan was made for.
pub fn execute(plan: &Plan, source: &dyn Store, target: &dyn Store, policy: &Policy) -> Result<Copied> {
    plan.check(policy)?;
    if !plan.fits(source, target) {
        return Err(Error::PlanRejected {
            from: plan.source.clone(),
            target: plan.target.clone(),
            problems: vec![format!(
                "{} -> {} are not the stores this plan was made for",
                source.origin(),
                target.origin()
            )],
        });
    }
    let tensor = |store: &dyn Store, index: usize, name: &str| {
        store.tensor(index).map(|t| t.shallow_clone()).ok_or_else(|| Error::Verification {
            source_name: name.to_string(),
            target: format!("<missing entry {index} of {}>", store.origin()),
        })
    };
    // Never broadcast: the tensors themselves must agree, whatever the plan said.
    for pair in &plan.pairs {
        let (src, dst) = (
            tensor(source, pair.source, &pair.source_name)?,
            tensor(target, pair.target, &pair.target_name)?,
        );
        if src.size() != dst.size() {
            return Err(Error::PlanRejected {
                from: plan.source.clone(),
                target: plan.target.clone(),
                problems: vec![format!(
                    "shape mismatch: {} {:?} -> {} {:?}",
                    pair.source_name,
                    src.size(),
                    pair.target_name,
                    dst.size()
                )],
            });
        }
    }
    let _no_grad = tch::no_grad_guard();
    let start = Instant::now();
    let mut bytes = 0;
    for pair in &plan.pairs {
        let src = tensor(source, pair.source, &pair.source_name)?;
        let mut dst = tensor(target, pair.target, &pair.target_name)?;
        dst.f_copy_(&src).map_err(|e| Error::Tensor { tensor: pair.target_name.clone(), source: e })?;
        bytes += target.entries()[pair.target].bytes();
    }
    let copy_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for pair in &plan.pairs {
        let src = tensor(source, pair.source, &pair.source_name)?;
        let dst = tensor(target, pair.target, &pair.target_name)?;
        let expected = src
            .f_to_device(dst.device())
            .and_then(|t| t.f_to_kind(dst.kind()))
            .map_err(|e| Error::Tensor { tensor: pair.source_name.clone(), source: e })?;
        if !bit_equal(&dst, &expected) {
            return Err(Error::Verification {
                source_name: pair.source_name.clone(),
                target: pair.target_name.clone(),
            });
        }
    }
    Ok(Copied {
        tensors: plan.pairs.len(),
        bytes,
        copy_seconds,
        verify_seconds: start.elapsed().as_secs_f64(),
    })
}

/// Bit-for-bit equality (NaN equals the same NaN; `-0.0` differs from `0.0`).
fn bit_equal(a: &tch::Tensor, b: &tch::Tensor) -> bool {
    use tch::Kind;
    if a.size() != b.size() || a.kind() != b.kind() {
        return false;
    }
    let as_bits = |t: &tch::Tensor| match t.kind().elt_size_in_bytes() {
        1 => t.f_view_dtype(Kind::Uint8),
        2 => t.f_view_dtype(Kind::Int16),
        4 => t.f_view_dtype(Kind::Int),
        8 => t.f_view_dtype(Kind::Int64),
        _ => Ok(t.shallow_clone()),
    };
    match (as_bits(a), as_bits(b)) {
        (Ok(x), Ok(y)) => x.equal(&y),
        _ => false,
    }
}
