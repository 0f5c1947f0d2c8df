//! A planned merge written: each output tensor gathered from every input,
//! merged and streamed into the output file; what was written ([`Merged`]).
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::Tensor;

use super::methods::{self, mask_key};
use super::options::{refused, Method};
use super::{MergePlan, Treatment};
use crate::dtype::Dtype;
use crate::entry::Format;
use crate::error::{Error, Result};
use crate::format::{npz, safetensors, torch_pickle, Outgoing};
use crate::plan::Plan;
use crate::store::Source;

/// An integer or bool tensor whose values differ between inputs (the
/// reference's were written).
#[derive(Debug, Clone, Serialize)]
pub struct Differing {
    /// The output tensor.
    pub tensor: String,
    /// The inputs whose values differ from the reference's.
    pub inputs: Vec<String>,
}

/// What a merge wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Merged {
    /// The method.
    pub method: Method,
    /// The inputs, the base first where there is one.
    pub inputs: Vec<String>,
    /// The input the output's names, order, dtypes and integer tensors come from.
    pub reference: String,
    /// The file written.
    pub output: PathBuf,
    /// Its format.
    pub format: String,
    /// Tensors written.
    pub tensors: usize,
    /// Of those, merged (floating).
    pub merged: usize,
    /// Of those, integer or bool tensors taken from the reference.
    pub from_reference: Vec<String>,
    /// Integer or bool tensors whose values differ between inputs.
    pub differing: Vec<Differing>,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Seconds spent.
    pub seconds: f64,
}

impl fmt::Display for Merged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::dotted::escaped;
        writeln!(f, "merge ({}) of {} inputs:", self.method, self.inputs.len())?;
        for input in &self.inputs {
            writeln!(f, "  {}", escaped(input))?;
        }
        writeln!(
            f,
            "  {} tensors written, {} merged, {} taken from {} (integer or bool)",
            self.tensors,
            self.merged,
            self.from_reference.len(),
            escaped(&self.reference)
        )?;
        for d in &self.differing {
            let inputs: Vec<String> = d.inputs.iter().map(|i| escaped(i).into_owned()).collect();
            writeln!(
                f,
                "  note: {} differs in {} (the reference's values written)",
                escaped(&d.tensor),
                inputs.join(", ")
            )?;
        }
        write!(
            f,
            "  wrote {} ({}, {:.1} MB) in {:.2} s",
            self.output.display(),
            self.format,
            self.bytes as f64 / 1e6,
            self.seconds
        )
    }
}

/// Writes `outgoing` to `out` in `format`, each tensor made by `produce`
/// when the writer reaches it; whole or not at all.
pub(super) fn write_file(
    out: &Path,
    format: Format,
    outgoing: &[Outgoing],
    metadata: &std::collections::BTreeMap<String, String>,
    produce: crate::format::Produce,
) -> Result<()> {
    crate::files::write_atomically(out, |temp| match format {
        Format::Safetensors => safetensors::write_stream(temp, outgoing, metadata, produce),
        Format::Npz => npz::write_stream(temp, outgoing, produce),
        _ => torch_pickle::write_stream(temp, outgoing, None, &[], produce),
    })
}

/// The format `out` is written in.
pub(super) fn format_of(out: &Path) -> Result<Format> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    match Format::for_extension(out).or_else(|| name.ends_with(".pt").then_some(Format::TorchSave)) {
        Some(f @ (Format::Safetensors | Format::TorchSave | Format::Npz)) => Ok(f),
        _ => Err(Error::Output {
            path: out.into(),
            reason: "cannot tell the format to write from the name: a merge writes .safetensors, \
                     .pth, .bin, .pt (torch.save) or .npz"
                .into(),
        }),
    }
}

/// Input `source`'s value of output entry `name` through `plan`'s pairs into
/// it (`pairs`), as `dtype`: what a conversion makes of it.
fn gather(
    plan: &Plan,
    pairs: &[usize],
    source: &dyn Source,
    shape: &[i64],
    dtype: Dtype,
    name: &str,
) -> Result<Tensor> {
    let into = crate::convert::Into { shape, dtype, name, store: source.origin() };
    crate::convert::assemble(plan, pairs, source, into, None)
}

impl MergePlan {
    /// The merged value of output tensor `name` from every input's value
    /// (`xs`, in the compute dtype; the base first where there is one).
    fn combine(&self, xs: &[Tensor], name: &str) -> std::result::Result<Tensor, tch::TchError> {
        let models = if self.has_base { &xs[1..] } else { xs };
        let deltas = || -> std::result::Result<Vec<Tensor>, tch::TchError> {
            models.iter().map(|x| x.f_sub(&xs[0])).collect()
        };
        let dare = |deltas: Vec<Tensor>| -> std::result::Result<Vec<Tensor>, tch::TchError> {
            deltas
                .iter()
                .enumerate()
                .map(|(m, d)| methods::drop_and_rescale(d, self.density, mask_key(self.seed, m, name)))
                .collect()
        };
        match self.method {
            Method::Linear => methods::linear(models, &self.weights),
            Method::TaskArithmetic => methods::task_sum(&xs[0], &deltas()?, &self.weights, self.lambda),
            Method::Ties => {
                let trimmed = deltas()?
                    .iter()
                    .map(|d| methods::trim(d, self.density))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                methods::elect_and_mean(&xs[0], &trimmed, &self.weights, self.lambda)
            }
            Method::DareLinear => methods::task_sum(&xs[0], &dare(deltas()?)?, &self.weights, self.lambda),
            Method::DareTies => {
                methods::elect_and_mean(&xs[0], &dare(deltas()?)?, &self.weights, self.lambda)
            }
            Method::Slerp => methods::slerp(&xs[0], &xs[1], self.t),
        }
    }
}

/// Writes the merge `plan` (made by [`plan_merge`](super::plan_merge) from the same inputs:
/// `base` and `models`) to `out` (`.safetensors`, `.pth`/`.bin`/`.pt`,
/// `.npz`), whole or not at all, one tensor at a time.
pub fn merge(
    plan: &MergePlan,
    base: Option<&dyn Source>,
    models: &[&dyn Source],
    out: &Path,
) -> Result<Merged> {
    let start = Instant::now();
    let sources: Vec<&dyn Source> = base.into_iter().chain(models.iter().copied()).collect();
    if sources.len() != plan.plans.len() || base.is_some() != plan.has_base {
        return Err(refused("the inputs are not those the merge was planned for"));
    }
    for (p, s) in plan.plans.iter().zip(&sources) {
        p.ensure_fits(*s, &plan.outline)?;
    }
    let format = format_of(out)?;
    let entries = crate::store::Source::entries(&plan.outline);
    let mut into: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); entries.len()]; sources.len()];
    for (i, p) in plan.plans.iter().enumerate() {
        for (k, pair) in p.pairs.iter().enumerate() {
            into[i][pair.target].push(k);
        }
    }
    let outgoing: Vec<Outgoing> = entries
        .iter()
        .map(|e| Outgoing { name: e.name.to_string(), kind: e.dtype, shape: e.shape.clone() })
        .collect();
    let differing = std::cell::RefCell::new(Vec::new());
    let releaser = std::cell::RefCell::new(crate::format::PageReleaser::default());
    let release = |j: usize| {
        for (i, s) in sources.iter().enumerate() {
            for &k in &into[i][j] {
                if let Some(t) = s.tensor(plan.plans[i].pairs[k].source) {
                    releaser.borrow_mut().release(t);
                }
            }
        }
    };
    let mut last: Option<usize> = None;
    let mut produce = |j: usize| -> Result<Tensor> {
        if let Some(previous) = last.replace(j) {
            release(previous);
        }
        let entry = &entries[j];
        let name = entry.name.as_str();
        let failed = |e: tch::TchError| Error::Tensor {
            store: out.display().to_string(),
            tensor: name.to_string(),
            source: e,
        };
        match plan.treatments[j] {
            Treatment::FromReference => {
                let xs = sources
                    .iter()
                    .enumerate()
                    .map(|(i, s)| gather(&plan.plans[i], &into[i][j], *s, &entry.shape, entry.dtype, name))
                    .collect::<Result<Vec<_>>>()?;
                let differ: Vec<String> = sources
                    .iter()
                    .zip(&xs)
                    .skip(1)
                    .filter(|(_, x)| !x.f_equal(&xs[0]).unwrap_or(false))
                    .map(|(s, _)| s.origin().to_string())
                    .collect();
                if !differ.is_empty() {
                    differing.borrow_mut().push(Differing { tensor: name.to_string(), inputs: differ });
                }
                Ok(xs[0].shallow_clone())
            }
            Treatment::Merged => {
                let compute = if entry.dtype == Dtype::Float64 { Dtype::Float64 } else { Dtype::Float32 };
                let xs = sources
                    .iter()
                    .enumerate()
                    .map(|(i, s)| gather(&plan.plans[i], &into[i][j], *s, &entry.shape, compute, name))
                    .collect::<Result<Vec<_>>>()?;
                let merged = plan.combine(&xs, name).map_err(failed)?;
                if let Some(why) = crate::copy::value_loss(&merged, compute, entry.dtype) {
                    return Err(refused(format!(
                        "tensor {name}: the merged values do not fit {}: {why}",
                        entry.dtype
                    )));
                }
                crate::ffi::to_dtype(&merged, entry.dtype).map_err(failed)
            }
        }
    };
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("transplant_merge".to_string(), plan.method.name().to_string());
    write_file(out, format, &outgoing, &metadata, &mut produce)?;
    if let Some(j) = last {
        release(j);
    }
    releaser.borrow_mut().flush();
    let from_reference: Vec<String> = entries
        .iter()
        .zip(&plan.treatments)
        .filter(|(_, t)| **t == Treatment::FromReference)
        .map(|(e, _)| e.name.to_string())
        .collect();
    Ok(Merged {
        method: plan.method,
        inputs: sources.iter().map(|s| s.origin().to_string()).collect(),
        reference: sources[0].origin().to_string(),
        output: out.into(),
        format: format.to_string(),
        tensors: entries.len(),
        merged: entries.len() - from_reference.len(),
        from_reference,
        differing: differing.into_inner(),
        bytes: outgoing.iter().map(|o| o.bytes() as u64).sum(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
