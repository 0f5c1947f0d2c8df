//! Values a pair computes rather than copies (FP8 block scales), made from
//! the source as the copy reads it.
use tch::Tensor;

use super::rejected;
use crate::error::Result;
use crate::plan::Plan;
use crate::store::Source;
use crate::transform::Compute;

/// The values pair `k` computes from `input` (its source after its ops), if
/// it computes any (FP8 block scales); a dequantize is checked bit for bit
/// against the same arithmetic done another way before it is used, so that
/// what the copy then verifies it wrote is the independent result.
pub(crate) fn computed(plan: &Plan, k: usize, input: &Tensor, source: &dyn Source) -> Result<Option<Tensor>> {
    let pair = &plan.pairs[k];
    let Some(compute) = pair.transform.as_ref().and_then(|t| t.compute.as_ref()) else { return Ok(None) };
    let failed = |message: String| {
        let rule = pair.rule.as_deref().map_or(String::new(), |r| format!("rule `{r}`: "));
        rejected(plan, format!("{rule}{} -> {}: {compute}: {message}", pair.source_name, pair.target_name))
    };
    let scale = match compute {
        Compute::Dequantize { scale, scale_name, .. } => Some(
            source
                .tensor(*scale)
                .ok_or_else(|| failed(format!("{} has no tensor {scale_name}", source.origin())))?,
        ),
        Compute::Quantize { .. } => None,
    };
    let values = compute.apply(input, scale).map_err(failed)?;
    if let Some(check) = compute.check_value(input, scale) {
        let check = check.map_err(failed)?;
        if !values.equal(&check) {
            return Err(failed("the values differ from the same arithmetic done block by block".into()));
        }
    }
    Ok(Some(values))
}
