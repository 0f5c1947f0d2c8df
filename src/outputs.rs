//! `verify`: two TorchScript modules run in eval mode on the same seeded random
//! inputs, their outputs compared.
use std::fmt;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::script_module::ScriptModule;

/// One output of the two modules compared.
#[derive(Debug, Clone, Serialize)]
pub struct OutputDiff {
    /// Position in the (flattened) outputs.
    pub index: usize,
    /// Shape from A.
    pub shape_a: Vec<i64>,
    /// Shape from B.
    pub shape_b: Vec<i64>,
    /// Largest |a - b|; `None` when the shapes differ.
    pub max_abs: Option<f64>,
    /// Whether within `atol` (and the same shape).
    pub close: bool,
}

/// The outputs of two modules on the same inputs.
#[derive(Debug, Clone, Serialize)]
pub struct OutputComparison {
    /// Module A.
    pub a: String,
    /// Module B.
    pub b: String,
    /// Input shapes.
    pub inputs: Vec<Vec<i64>>,
    /// The seed of the random inputs.
    pub seed: i64,
    /// The tolerance on |a - b|.
    pub atol: f64,
    /// Each output compared.
    pub outputs: Vec<OutputDiff>,
    /// Output counts, when they differ.
    pub counts: Option<(usize, usize)>,
}

impl OutputComparison {
    /// Whether the modules gave the same number of outputs, all within `atol`.
    pub fn is_same(&self) -> bool {
        self.counts.is_none() && self.outputs.iter().all(|o| o.close)
    }
}

/// Input elements [`compare_outputs`] makes at most unless told otherwise (all
/// inputs together: 1 GiB of float32).
pub const MAX_INPUT_ELEMENTS: u64 = 1 << 28;

/// Runs `a` and `b` in eval mode on float32 inputs of `shapes`, drawn from a
/// normal distribution seeded with `seed`, and compares the outputs. The inputs
/// together hold at most `max_elements` (checked before anything is allocated).
pub fn compare_outputs(
    a: &mut ScriptModule,
    b: &mut ScriptModule,
    shapes: &[Vec<i64>],
    seed: i64,
    atol: f64,
    max_elements: u64,
) -> Result<OutputComparison> {
    let elements = shapes.iter().try_fold(0u64, |total, shape| {
        let n = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))?;
        total.checked_add(n)
    });
    if elements.is_none_or(|n| n > max_elements) {
        return Err(Error::InputTooLarge { shapes: shapes.to_vec(), elements, limit: max_elements });
    }
    a.set_training(false)?;
    b.set_training(false)?;
    tch::manual_seed(seed);
    let input_error =
        |source| Error::Tensor { store: "verify's inputs".into(), tensor: "input".into(), source };
    let inputs: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::f_randn(s.as_slice(), (Kind::Float, Device::Cpu)).map_err(input_error))
        .collect::<Result<_>>()?;
    let run = |m: &ScriptModule| -> Result<Vec<Tensor>> {
        let device = m.named_tensors()?.first().map_or(Device::Cpu, |n| n.tensor.device());
        let moved: Vec<Tensor> =
            inputs.iter().map(|t| t.f_to_device(device).map_err(input_error)).collect::<Result<_>>()?;
        m.forward(&moved)
    };
    let (out_a, out_b) = (run(a)?, run(b)?);
    let mut outputs = Vec::new();
    for (index, (x, y)) in out_a.iter().zip(&out_b).enumerate() {
        let (shape_a, shape_b) = (x.size(), y.size());
        let max_abs = if shape_a == shape_b {
            let err = |source| Error::Tensor {
                store: format!("{} and {}", a.origin(), b.origin()),
                tensor: format!("output {index}"),
                source,
            };
            let as_double = |t: &Tensor| t.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double));
            let delta =
                as_double(x).and_then(|x| x.f_sub(&as_double(y)?)).and_then(|d| d.f_abs()).map_err(err)?;
            Some(if delta.numel() == 0 {
                0.0
            } else {
                delta.f_max().and_then(|m| m.f_double_value(&[])).map_err(err)?
            })
        } else {
            None
        };
        let close = max_abs.is_some_and(|d| d <= atol);
        outputs.push(OutputDiff { index, shape_a, shape_b, max_abs, close });
    }
    Ok(OutputComparison {
        a: a.origin().to_string(),
        b: b.origin().to_string(),
        inputs: shapes.to_vec(),
        seed,
        atol,
        outputs,
        counts: (out_a.len() != out_b.len()).then_some((out_a.len(), out_b.len())),
    })
}

impl fmt::Display for OutputComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "A: {}\nB: {}", crate::dotted::escaped(&self.a), crate::dotted::escaped(&self.b))?;
        writeln!(f, "  inputs {:?} (normal, seed {}), eval mode", self.inputs, self.seed)?;
        if let Some((na, nb)) = self.counts {
            writeln!(f, "  A gives {na} outputs, B gives {nb}")?;
        }
        for o in &self.outputs {
            match o.max_abs {
                Some(d) => writeln!(
                    f,
                    "  output {} {:?}: max |a-b| = {d:.3e} ({} atol {})",
                    o.index,
                    o.shape_a,
                    if o.close { "within" } else { "above" },
                    self.atol
                )?,
                None => {
                    writeln!(f, "  output {}: shapes differ {:?} vs {:?}", o.index, o.shape_a, o.shape_b)?
                }
            }
        }
        write!(f, "  verdict: {}", if self.is_same() { "same outputs" } else { "outputs differ" })
    }
}
