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
mod methods;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::{Kind, Tensor};

use methods::mask_key;

use crate::convert::Outline;
use crate::dtype::{class, Dtype, DtypeClass};
use crate::entry::Format;
use crate::error::{Error, Result};
use crate::format::{npz, safetensors, torch_pickle, Outgoing};
use crate::matching::Matcher;
use crate::plan::{Mapping, Plan, Policy};
use crate::store::Source;
use crate::transform::Transform;

/// How the models are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The weighted mean of the models (a model soup; checkpoint averaging).
    Linear,
    /// The base plus λ times the weighted sum of the task vectors (model − base).
    TaskArithmetic,
    /// TIES-Merging: task vectors trimmed to their largest magnitudes, a sign
    /// elected per element, the agreeing values averaged.
    Ties,
    /// DARE's drop and rescale of each task vector, then task arithmetic.
    DareLinear,
    /// DARE's drop and rescale of each task vector, then TIES' sign election and mean.
    DareTies,
    /// Spherical interpolation between two models, per tensor.
    Slerp,
}

impl Method {
    /// The method's name on the command line (`task-arithmetic`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task-arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare-linear",
            Method::DareTies => "dare-ties",
            Method::Slerp => "slerp",
        }
    }

    /// Whether the method works on task vectors against a base.
    fn needs_base(self) -> bool {
        matches!(self, Method::TaskArithmetic | Method::Ties | Method::DareLinear | Method::DareTies)
    }

    fn uses_density(self) -> bool {
        matches!(self, Method::Ties | Method::DareLinear | Method::DareTies)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A merge's parameters. A parameter the method does not use is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOptions {
    /// The method.
    pub method: Method,
    /// One weight per model (not the base); default 1 each.
    pub weights: Option<Vec<f64>>,
    /// TIES and DARE: the fraction of each task vector kept, in (0, 1]; required.
    pub density: Option<f64>,
    /// Task arithmetic, TIES, DARE: the scale of the merged task vector; default 1.
    pub lambda: Option<f64>,
    /// SLERP: where between the two models, in [0, 1]; default 0.5.
    pub t: Option<f64>,
    /// DARE: the seed of the drop masks (see the `methods` module: SplitMix64
    /// keyed by FNV-1a of `"{seed}/{model}/{tensor}"`).
    pub seed: u64,
    /// The output's floating tensors converted to this dtype, last.
    pub dtype: Option<Kind>,
    /// Unused rules and warnings of the inputs' plans are errors.
    pub strict: bool,
}

impl MergeOptions {
    /// `method` with its defaults.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            weights: None,
            density: None,
            lambda: None,
            t: None,
            seed: 0,
            dtype: None,
            strict: false,
        }
    }
}

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

fn refused(message: impl Into<String>) -> Error {
    Error::Merge { message: message.into() }
}

/// Checks `options` against the number of models, fills in the defaults:
/// (weights, density, λ, t).
fn parameters(options: &MergeOptions, has_base: bool, models: usize) -> Result<(Vec<f64>, f64, f64, f64)> {
    let method = options.method;
    if models == 0 {
        return Err(refused("no models to merge"));
    }
    match (method.needs_base(), has_base) {
        (true, false) => {
            return Err(refused(format!("{method} merges task vectors against a base: name it with --base")))
        }
        (false, true) if method == Method::Linear => {
            return Err(refused(
                "linear averages the models and takes no --base (name the base as one of the models)",
            ))
        }
        _ => {}
    }
    if method == Method::Linear && models < 2 {
        return Err(refused("linear needs at least two models"));
    }
    if method == Method::Slerp && models + usize::from(has_base) != 2 {
        return Err(refused(format!(
            "slerp interpolates between exactly two models (t = 0 the first, or the base), and {} were given",
            models + usize::from(has_base)
        )));
    }
    let unused = |what: &str| refused(format!("{method} takes no {what}"));
    let weights = match &options.weights {
        Some(_) if method == Method::Slerp => return Err(unused("--weights (use --t)")),
        Some(w) if w.len() != models => {
            return Err(refused(format!(
                "{} weight(s) for {models} model(s): give one weight per model{}",
                w.len(),
                if has_base { " (the base takes none)" } else { "" }
            )))
        }
        Some(w) => w.clone(),
        None => vec![1.0; models],
    };
    if let Some(bad) = weights.iter().find(|w| !w.is_finite()) {
        return Err(refused(format!("weight {bad} is not a finite number")));
    }
    if method == Method::Linear && weights.iter().sum::<f64>() == 0.0 {
        return Err(refused("the weights of a linear merge sum to zero"));
    }
    let density = match options.density {
        Some(_) if !method.uses_density() => return Err(unused("--density")),
        Some(d) if !(d > 0.0 && d <= 1.0) => {
            return Err(refused(format!("--density {d} is out of range: the fraction kept is in (0, 1]")))
        }
        Some(d) => d,
        None if method.uses_density() => {
            return Err(refused(format!(
                "{method} needs --density D, the fraction of each task vector kept (0 < D <= 1)"
            )))
        }
        None => 1.0,
    };
    let lambda = match options.lambda {
        Some(_) if !method.needs_base() => return Err(unused("--lambda")),
        Some(l) if !l.is_finite() => return Err(refused(format!("--lambda {l} is not a finite number"))),
        Some(l) => l,
        None => 1.0,
    };
    let t = match options.t {
        Some(_) if method != Method::Slerp => return Err(unused("--t")),
        Some(t) if !(0.0..=1.0).contains(&t) => {
            return Err(refused(format!("--t {t} is out of range: slerp's t is in [0, 1]")))
        }
        Some(t) => t,
        None => 0.5,
    };
    Ok((weights, density, lambda, t))
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

/// The format `out` is written in.
fn format_of(out: &Path) -> Result<Format> {
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

/// Input `source`'s value of output entry `j` through `plan`'s pairs into it
/// (`pairs`), as `dtype`: a view of the source through the pair's ops where one
/// pair fills it whole, else a new tensor each pair writes its region of.
fn gather(
    plan: &Plan,
    pairs: &[usize],
    source: &dyn Source,
    shape: &[i64],
    dtype: Dtype,
    name: &str,
) -> Result<Tensor> {
    let failed = |e: tch::TchError| Error::Tensor {
        store: source.origin().to_string(),
        tensor: name.to_string(),
        source: e,
    };
    let view = |k: usize| -> Result<Tensor> {
        let pair = &plan.pairs[k];
        let tensor = source.tensor(pair.source).ok_or_else(|| Error::MissingTensor {
            store: source.origin().to_string(),
            tensor: pair.source_name.to_string(),
        })?;
        match &pair.transform {
            Some(t) => t.source_view(tensor).map_err(failed),
            None => Ok(tensor.shallow_clone()),
        }
    };
    let whole =
        |k: usize| plan.pairs[k].transform.as_ref().is_none_or(|t: &Transform| t.target_ops.is_empty());
    if let [k] = pairs {
        if whole(*k) {
            let v = view(*k)?;
            let v = if v.device() == tch::Device::Cpu {
                v
            } else {
                v.f_to_device(tch::Device::Cpu).map_err(failed)?
            };
            return crate::ffi::to_dtype(&v, dtype).map_err(failed);
        }
    }
    let out = crate::ffi::empty(shape, dtype).map_err(failed)?;
    for &k in pairs {
        let mut region = match &plan.pairs[k].transform {
            Some(t) => t.target_view(&out).map_err(failed)?,
            None => out.shallow_clone(),
        };
        region.f_copy_(&view(k)?).map_err(failed)?;
    }
    Ok(out)
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

/// Writes the merge `plan` (made by [`plan_merge`] from the same inputs:
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
    crate::files::write_atomically(out, |temp| match format {
        Format::Safetensors => safetensors::write_stream(temp, &outgoing, &metadata, &mut produce),
        Format::Npz => npz::write_stream(temp, &outgoing, &mut produce),
        _ => torch_pickle::write_stream(temp, &outgoing, None, &[], &mut produce),
    })?;
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
