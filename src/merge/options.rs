//! A merge's options ([`Method`], [`MergeOptions`]) checked against its
//! inputs, with the defaults filled in.
use std::fmt;

use serde::Serialize;
use tch::Kind;

use crate::error::{Error, Result};

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
    pub(super) fn needs_base(self) -> bool {
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

pub(super) fn refused(message: impl Into<String>) -> Error {
    Error::Merge { message: message.into() }
}

/// Checks `options` against the number of models, fills in the defaults:
/// (weights, density, λ, t).
pub(super) fn parameters(
    options: &MergeOptions,
    has_base: bool,
    models: usize,
) -> Result<(Vec<f64>, f64, f64, f64)> {
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
