//! Merging several models into one: model soups, task arithmetic, TIES, DARE
//! and SLERP ([`methods`] has the formulas), streamed one output tensor at a time.
//!
//! The flow is the copy's, with several sources. The *reference* input (the
//! base where the method has one, else the first model) makes the output: its
//! names after its rules, in its order, with its dtypes (then `dtype`), as
//! [`Outline`] makes a conversion's. Every input is planned into that outline
//! with its own [`Mapping`] — the reference by its rules' names alone, the
//! others by their rules and matcher — and every plan must be complete and
//! pass its check, and every output tensor's dtypes must merge, before a single
//! value is read ([`plan_merge`]). [`merge`] then writes the output one tensor
//! at a time: each input's value of it is made from the input's bytes (a view
//! through the pair's transform where it can be), the values are merged in
//! float32 (float64 for a float64 output) and written in the output's dtype,
//! and the inputs' pages are handed back, so that memory holds about
//! (inputs + 1) tensors, not the models.
//!
//! Floating tensors, parameters and buffers alike (BatchNorm running
//! statistics), are merged. Integer and bool tensors (`num_batches_tracked`,
//! masks, position ids) never are: they are taken from the reference, and
//! those whose values differ between inputs are listed in [`Merged`].
//! Complex and stored-only dtypes (float8, …) are refused by name.
mod lora;
mod methods;
mod options;
mod write;

use std::path::Path;

pub use lora::{merge_lora, Adapter, LoraMerged};
pub(crate) use lora::{merged_value, plan_lora, Edit};
use options::{parameters, refused};
pub use options::{MergeOptions, Method};
pub use write::{merge, Differing, Merged};

use crate::convert::Outline;
use crate::dtype::{class, DtypeClass};
use crate::error::Result;
use crate::matching::Matcher;
use crate::plan::{Mapping, Plan, Policy};
use crate::store::Source;

/// One model to merge: where its tensors come from, and how its names map
/// onto the output's (the reference input's names after its rules).
pub struct MergeInput<'a> {
    /// The model.
    pub source: &'a dyn Source,
    /// Its rules and matcher.
    pub mapping: Mapping,
}

/// What is done with one output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Treatment {
    /// Floating: merged.
    Merged,
    /// Integer or bool: the reference's values.
    FromReference,
}

/// A merge, worked out and checked from the inputs' entries alone.
#[derive(Debug)]
pub struct MergePlan {
    /// The options, with every default filled in.
    pub method: Method,
    /// The output's tensors.
    pub outline: Outline,
    /// One plan per input into the outline: the base first where there is
    /// one, then the models in order.
    pub plans: Vec<Plan>,
    /// Whether `plans[0]` is the base's.
    pub has_base: bool,
    /// The models' weights.
    pub weights: Vec<f64>,
    density: f64,
    lambda: f64,
    t: f64,
    seed: u64,
    treatments: Vec<Treatment>,
}

/// Plans merging `models` (and `base`) into `out` by `options`: the outline
/// of the output, one complete plan per input into it, every output tensor's
/// dtypes checked. Nothing is read but entries.
pub fn plan_merge(
    base: Option<&MergeInput>,
    models: &[MergeInput],
    out: &Path,
    options: &MergeOptions,
) -> Result<MergePlan> {
    let (weights, density, lambda, t) = parameters(options, base.is_some(), models.len())?;
    let inputs: Vec<&MergeInput> = base.into_iter().chain(models).collect();
    let reference = inputs[0];
    let outline =
        Outline::of(reference.source, &reference.mapping, &out.display().to_string(), options.dtype);
    let policy = Policy { strict: options.strict, allow_lossy_casts: true };
    let mut plans = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let mapping = if i == 0 {
            // The reference's names after its rules are the outline's.
            Mapping {
                rules: input.mapping.rules.without_keeps(),
                matcher: Matcher::Exact,
                source_order: None,
            }
        } else {
            input.mapping.clone()
        };
        let plan = Plan::build(input.source, &outline, &mapping)?;
        plan.check(&policy)?;
        plan.ensure_complete(&format!("a merge (every input mapped onto {})", reference.source.origin()))?;
        plans.push(plan);
    }
    let treatments = treatments(&outline, &plans, &inputs)?;
    Ok(MergePlan {
        method: options.method,
        outline,
        plans,
        has_base: base.is_some(),
        weights,
        density,
        lambda,
        t,
        seed: options.seed,
        treatments,
    })
}

/// What each output tensor gets, from its dtype and every input's: floats
/// merge (from floats only), integers and bools come from the reference (of
/// the same class in every input); anything else is refused by name.
fn treatments(outline: &Outline, plans: &[Plan], inputs: &[&MergeInput]) -> Result<Vec<Treatment>> {
    let entries = outline.entries();
    let mut treatments = Vec::with_capacity(entries.len());
    for entry in entries {
        let treatment = if entry.dtype.is_castable_float() {
            Treatment::Merged
        } else if matches!(class(entry.dtype), DtypeClass::Integer | DtypeClass::Bool) {
            Treatment::FromReference
        } else {
            return Err(refused(format!(
                "tensor {} is {}: only float16, bfloat16, float32 and float64 tensors are merged \
                 (integer and bool tensors are taken from {})",
                entry.name,
                entry.dtype,
                inputs[0].source.origin()
            )));
        };
        treatments.push(treatment);
    }
    for (plan, input) in plans.iter().zip(inputs) {
        for pair in &plan.pairs {
            let source = &input.source.entries()[pair.source];
            let fits = match treatments[pair.target] {
                Treatment::Merged => source.dtype.is_castable_float(),
                Treatment::FromReference => class(source.dtype) == class(entries[pair.target].dtype),
            };
            if !fits {
                return Err(refused(format!(
                    "tensor {} is {} in {} (as {}) and {} in {}: a floating tensor merges only with floating \
                     ones, an integer or bool tensor only with its own kind",
                    pair.target_name,
                    entries[pair.target].dtype,
                    inputs[0].source.origin(),
                    pair.source_name,
                    source.dtype,
                    input.source.origin()
                )));
            }
        }
    }
    Ok(treatments)
}
