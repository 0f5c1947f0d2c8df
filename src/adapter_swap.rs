//! Live adapter swaps: a base model served by a [`ModelSlot`] takes a LoRA
//! adapter merged into its standby copy and goes live in one swap — and back
//! to the base, or to another adapter, the same way. Requests never see a mix
//! (the slot's guarantee: the standby is written whole, then one pointer is
//! replaced), and an adapter that does not fit the base never goes live.
use std::time::Instant;

use crate::copy::Copied;
use crate::error::{Error, Result};
use crate::matching::Matcher;
use crate::merge::{merged_value, plan_lora, Adapter, Edit};
use crate::plan::{Mapping, Plan};
use crate::slot::{ModelSlot, Swap};
use crate::store::{Source, Target};

impl ModelSlot {
    /// Makes the slot serve `base`'s weights with `adapter` merged in
    /// (`W + scale·B·A`, as [`merge_lora`](crate::merge_lora) writes them), or
    /// `base`'s alone with `None`. `base` holds the served model's tensors
    /// under the same names (its checkpoint, say); every tensor of the model
    /// must come from it. Each merged tensor is computed from `base` and the
    /// adapter straight into the standby copy (no second copy of the model),
    /// then the standby goes live. On any error the live model is untouched.
    pub fn swap_adapter(&self, base: &dyn Source, adapter: Option<&Adapter>) -> Result<Swap> {
        let edits = match adapter {
            Some(adapter) => plan_lora(base, adapter)?,
            None => vec![Edit::default(); base.entries().len()],
        };
        let label = match adapter {
            Some(adapter) => format!("{} + {}", base.origin(), adapter.origin()),
            None => base.origin().to_string(),
        };
        self.swap_with(&label, |standby| {
            let mapping = Mapping { matcher: Matcher::Exact, ..Mapping::default() };
            let plan = Plan::build(base, &*standby, &mapping)?;
            plan.ensure_complete("an adapter swap")?;
            if let Some(pair) = plan.pairs.iter().find(|p| p.transform.is_some()) {
                return Err(Error::Merge {
                    message: format!("{}: an adapter swap copies names as they are", pair.source_name),
                });
            }
            let _no_grad = tch::no_grad_guard();
            let start = Instant::now();
            let mut bytes = 0u64;
            for pair in &plan.pairs {
                let dtype = standby.entries()[pair.target].dtype;
                let value = match adapter {
                    Some(adapter) => merged_value(base, adapter, &edits[pair.source], pair.source, dtype)?,
                    None => {
                        let t = base.tensor(pair.source).ok_or_else(|| Error::MissingTensor {
                            store: base.origin().to_string(),
                            tensor: pair.source_name.to_string(),
                        })?;
                        crate::ffi::to_dtype(t, dtype).map_err(|source| Error::Tensor {
                            store: base.origin().to_string(),
                            tensor: pair.source_name.to_string(),
                            source,
                        })?
                    }
                };
                let target = &mut standby.tensors_mut()[pair.target];
                target.f_copy_(&value).map_err(|source| Error::Tensor {
                    store: "the standby model".into(),
                    tensor: pair.target_name.to_string(),
                    source,
                })?;
                bytes += standby.entries()[pair.target].bytes();
            }
            Ok(Copied {
                tensors: plan.pairs.len(),
                bytes,
                casts: plan.pairs.iter().filter(|p| p.cast.is_some()).count(),
                copy_seconds: start.elapsed().as_secs_f64(),
                verified: false,
                verify_seconds: 0.0,
                file_bytes: None,
            })
        })
    }
}
