//! LoRA adapters (PEFT's `save_pretrained` layout) merged into their base
//! model: `W + scale·B·A` per adapted module, as PEFT's `merge_and_unload`.
//!
//! An adapter is a folder with `adapter_config.json` and
//! `adapter_model.safetensors` (or `adapter_model.bin`). Its tensors are named
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight` (Linear, GPT-2's
//! `Conv1D` with `fan_in_fan_out`, convolutions), `lora_B.bias` (`lora_bias`),
//! `lora_embedding_A` / `lora_embedding_B` (embeddings); other tensors replace
//! the base's of the same name (`modules_to_save`, and `<module>.base_layer.*`,
//! an embedding saved with the adapter). The scale is `alpha / r` (`alpha /
//! √r` with `use_rslora`), `r` the rank of `A` and `alpha` the `alpha_pattern`
//! entry whose pattern matches the module's name as PEFT matches it
//! (`(.*\.)?(PATTERN)$`), else `lora_alpha`. DoRA (`use_dora`, magnitude
//! vectors) and other PEFT methods are refused by name.
use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::store::{Source, Target};

/// What a LoRA does to one base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `B·A`, transposed with `fan_in_fan_out`.
    Linear { transpose: bool },
    /// `B·A` over the flattened kernel, reshaped to the weight's shape.
    Conv,
    /// `(B·A)ᵀ`.
    Embedding,
}

/// One adapted weight: the adapter's entries of `A` and `B` (and `B`'s bias,
/// added to the base's bias), the scale.
#[derive(Debug, Clone)]
struct Delta {
    a: usize,
    b: usize,
    shape: Shape,
    scale: f64,
}

/// What the merged model's tensor `j` is made of.
#[derive(Debug, Clone, Default)]
pub(crate) struct Edit {
    /// An adapter entry that replaces the base's value.
    replace: Option<usize>,
    /// A low-rank delta added.
    delta: Option<Delta>,
    /// `lora_B.bias` entries added times their scale (the base's bias).
    bias: Option<(usize, f64)>,
}

/// A PEFT LoRA adapter, opened.
pub struct Adapter {
    folder: String,
    weights: Box<dyn Target>,
    config: serde_json::Value,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter").field("folder", &self.folder).finish()
    }
}

fn refused(folder: &str, message: impl std::fmt::Display) -> Error {
    Error::Merge { message: format!("adapter {folder}: {message}") }
}

impl Adapter {
    /// Opens the adapter in `folder`: `adapter_config.json` and
    /// `adapter_model.safetensors` (else `adapter_model.bin`).
    pub fn open(folder: &Path) -> Result<Self> {
        let name = folder.display().to_string();
        let config_path = folder.join("adapter_config.json");
        let text = crate::files::read_bounded(&config_path, 16 << 20, "adapter config")?;
        let config: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| refused(&name, format!("adapter_config.json is not JSON: {e}")))?;
        match config.get("peft_type").and_then(|v| v.as_str()) {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(refused(
                    &name,
                    format!("peft_type {other} is not LoRA; only LoRA adapters are merged"),
                ))
            }
        }
        if config.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(refused(
                &name,
                "a DoRA adapter (use_dora: true): DoRA's magnitude vectors are not merged by transplant",
            ));
        }
        // LoRA on bare parameters (mixture-of-experts weights) and trainable
        // tokens change tensors in ways `W + scale·B·A` per module does not say.
        for key in ["target_parameters", "trainable_token_indices"] {
            if config.get(key).is_some_and(|v| !v.is_null()) {
                return Err(refused(
                    &name,
                    format!("{key} is set: such adapters are not merged by transplant"),
                ));
            }
        }
        let file = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|f| folder.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| refused(&name, "holds neither adapter_model.safetensors nor adapter_model.bin"))?;
        let weights = crate::store::open(&file)?;
        Ok(Self { folder: name, weights, config })
    }

    /// The adapter's tensors.
    pub fn weights(&self) -> &dyn Source {
        self.weights.as_ref()
    }

    /// Where it was read from.
    pub fn origin(&self) -> &str {
        &self.folder
    }

    fn number(&self, key: &str) -> Option<f64> {
        self.config.get(key).and_then(serde_json::Value::as_f64)
    }

    fn flag(&self, key: &str) -> bool {
        self.config.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false)
    }

    /// `alpha` for `module`: the first `alpha_pattern` entry whose pattern
    /// matches as PEFT's `get_pattern_key` matches, else `lora_alpha`.
    fn alpha(&self, module: &str) -> Result<f64> {
        if let Some(patterns) = self.config.get("alpha_pattern").and_then(|v| v.as_object()) {
            for (pattern, alpha) in patterns {
                let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
                    .map_err(|e| refused(&self.folder, format!("alpha_pattern {pattern:?}: {e}")))?;
                if re.is_match(module) {
                    return alpha.as_f64().ok_or_else(|| {
                        refused(&self.folder, format!("alpha_pattern {pattern:?} is not a number"))
                    });
                }
            }
        }
        self.number("lora_alpha")
            .ok_or_else(|| refused(&self.folder, "adapter_config.json has no lora_alpha"))
    }
}

/// The adapter's name of a tensor without PEFT's `base_model.model.` prefix.
fn unprefixed(name: &str) -> &str {
    name.strip_prefix("base_model.model.").unwrap_or(name)
}

/// How an adapter's tensors change each of `base`'s, checked against the
/// base's entries (names, shapes) before anything is read.
pub(crate) fn plan_lora(base: &dyn Source, adapter: &Adapter) -> Result<Vec<Edit>> {
    let folder = adapter.origin();
    let index: BTreeMap<&str, usize> =
        base.entries().iter().enumerate().map(|(i, e)| (e.name.as_str(), i)).collect();
    let entries = adapter.weights().entries();
    let mut parts: BTreeMap<String, [Option<usize>; 5]> = BTreeMap::new(); // A, B, B bias, emb A, emb B
    let mut replaced: Vec<(String, usize)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let name = unprefixed(&e.name);
        if name.contains("lora_magnitude_vector") {
            return Err(refused(
                folder,
                format!("{} is a DoRA magnitude vector: DoRA is not merged", e.name),
            ));
        }
        let slot =
            [".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B"]
                .iter()
                .enumerate()
                .find_map(|(k, suffix)| name.strip_suffix(suffix).map(|m| (k, m)));
        match slot {
            Some((k, module)) => parts.entry(module.to_string()).or_default()[k] = Some(i),
            None if name.contains(".lora_") => {
                return Err(refused(folder, format!("{}: a LoRA tensor transplant does not know", e.name)))
            }
            None => replaced.push((name.replacen(".base_layer.", ".", 1), i)),
        }
    }
    let mut edits = vec![Edit::default(); base.entries().len()];
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    for (name, i) in replaced {
        match index.get(name.as_str()) {
            Some(&j) if base.entries()[j].shape == entries[i].shape => edits[j].replace = Some(i),
            Some(&j) => problems.push(format!(
                "{} is {:?} in the adapter and {:?} in the base",
                name,
                entries[i].shape,
                base.entries()[j].shape
            )),
            None => missing.push(name),
        }
    }
    for (module, [a, b, bias, ea, eb]) in &parts {
        let weight = format!("{module}.weight");
        let Some(&j) = index.get(weight.as_str()) else {
            missing.push(weight);
            continue;
        };
        let (a, b, shape) = match (a, b, ea, eb) {
            (Some(a), Some(b), None, None) => {
                let conv = entries[*a].shape.len() > 2;
                let shape = if conv {
                    Shape::Conv
                } else {
                    Shape::Linear { transpose: adapter.flag("fan_in_fan_out") }
                };
                (*a, *b, shape)
            }
            (None, None, Some(a), Some(b)) => (*a, *b, Shape::Embedding),
            _ => {
                problems.push(format!(
                    "{module}: lora_A and lora_B (or lora_embedding_A and _B) must both be there"
                ));
                continue;
            }
        };
        let (sa, sb, sw) = (&entries[a].shape, &entries[b].shape, &base.entries()[j].shape);
        let r = sa.first().copied().unwrap_or(0);
        let made: Option<Vec<i64>> = match shape {
            _ if sb.len() < 2 || sb[1] != r || r <= 0 => None,
            Shape::Linear { transpose } if sa.len() == 2 && sb.len() == 2 => {
                Some(if transpose { vec![sa[1], sb[0]] } else { vec![sb[0], sa[1]] })
            }
            Shape::Conv if sb[2..].iter().all(|&d| d == 1) => Some([&[sb[0]], &sa[1..]].concat()),
            Shape::Embedding if sa.len() == 2 && sb.len() == 2 => Some(vec![sa[1], sb[0]]),
            _ => None,
        };
        if made.as_ref() != Some(sw) {
            problems.push(format!(
                "{module}: A {sa:?} and B {sb:?} do not make a delta of {weight}'s shape {sw:?}"
            ));
            continue;
        }
        let alpha = adapter.alpha(module)?;
        let scale = if adapter.flag("use_rslora") { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        edits[j].delta = Some(Delta { a, b, shape, scale });
        if let Some(bias) = bias {
            let name = format!("{module}.bias");
            match index.get(name.as_str()) {
                Some(&k) if base.entries()[k].shape == entries[*bias].shape => {
                    edits[k].bias = Some((*bias, scale))
                }
                Some(_) => problems.push(format!("{name}: the adapter's bias has another shape")),
                None => missing.push(name),
            }
        }
    }
    if !missing.is_empty() {
        return Err(refused(
            folder,
            format!(
                "targets tensors that {} lacks (an adapter for another model?): {}",
                base.origin(),
                missing.join(", ")
            ),
        ));
    }
    if !problems.is_empty() {
        return Err(refused(folder, problems.join("; ")));
    }
    for (j, e) in base.entries().iter().enumerate() {
        let edit = &edits[j];
        if (edit.delta.is_some() || edit.bias.is_some()) && !e.dtype.is_castable_float() {
            return Err(refused(
                folder,
                format!("{} is {} in the base: only floating weights take a LoRA", e.name, e.dtype),
            ));
        }
    }
    Ok(edits)
}

/// The merged value of base tensor `j` by `edit`, in `dtype`.
pub(crate) fn merged_value(
    base: &dyn Source,
    adapter: &Adapter,
    edit: &Edit,
    j: usize,
    dtype: Dtype,
) -> Result<Tensor> {
    let entry = &base.entries()[j];
    let failed = |e: tch::TchError| Error::Tensor {
        store: base.origin().to_string(),
        tensor: entry.name.to_string(),
        source: e,
    };
    let of = |store: &dyn Source, i: usize| -> Result<Tensor> {
        let t = store.tensor(i).ok_or_else(|| Error::MissingTensor {
            store: store.origin().to_string(),
            tensor: store.entries().get(i).map_or_else(String::new, |e| e.name.to_string()),
        })?;
        if t.device() == tch::Device::Cpu {
            Ok(t.shallow_clone())
        } else {
            t.f_to_device(tch::Device::Cpu).map_err(failed)
        }
    };
    let value = match edit.replace {
        Some(i) => of(adapter.weights(), i)?,
        None => of(base, j)?,
    };
    if edit.delta.is_none() && edit.bias.is_none() {
        return crate::ffi::to_dtype(&value, dtype).map_err(failed);
    }
    let compute = if dtype == Dtype::Float64 { Dtype::Float64 } else { Dtype::Float32 };
    let as_compute = |t: &Tensor| crate::ffi::to_dtype(t, compute).map_err(failed);
    let mut sum = as_compute(&value)?;
    if let Some(d) = &edit.delta {
        let a = as_compute(&of(adapter.weights(), d.a)?)?;
        let b = as_compute(&of(adapter.weights(), d.b)?)?;
        let delta = (|| -> std::result::Result<Tensor, tch::TchError> {
            let (out, r) = (b.size()[0], b.size()[1]);
            let product = b.f_reshape([out, r])?.f_matmul(&a.f_reshape([r, -1])?)?;
            match d.shape {
                Shape::Linear { transpose: false } => Ok(product),
                Shape::Linear { transpose: true } | Shape::Embedding => product.f_t_copy(),
                Shape::Conv => product.f_reshape(entry.shape.as_slice()),
            }
        })()
        .map_err(failed)?;
        sum = sum.f_add(&delta.f_mul_scalar(d.scale).map_err(failed)?).map_err(failed)?;
    }
    if let Some((i, scale)) = edit.bias {
        let bias = as_compute(&of(adapter.weights(), i)?)?;
        sum = sum.f_add(&bias.f_mul_scalar(scale).map_err(failed)?).map_err(failed)?;
    }
    crate::ffi::to_dtype(&sum, dtype).map_err(failed)
}

/// What `merge_lora` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraMerged {
    /// The base model.
    pub base: String,
    /// The adapter folder.
    pub adapter: String,
    /// The file written.
    pub output: std::path::PathBuf,
    /// Its format.
    pub format: String,
    /// Tensors written.
    pub tensors: usize,
    /// Base weights a low-rank delta was added to.
    pub adapted: Vec<String>,
    /// Base tensors the adapter replaced (`modules_to_save`, saved base layers).
    pub replaced: Vec<String>,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Seconds spent.
    pub seconds: f64,
}

impl std::fmt::Display for LoraMerged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::dotted::escaped;
        writeln!(f, "merge-lora: {} + {}", escaped(&self.base), escaped(&self.adapter))?;
        writeln!(
            f,
            "  {} tensors written, {} adapted (W + scale·B·A), {} replaced by the adapter",
            self.tensors,
            self.adapted.len(),
            self.replaced.len()
        )?;
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

/// Merges `adapter` into `base` and writes the result to `out`
/// (`.safetensors`, `.pth`/`.bin`/`.pt`, `.npz`): every tensor of the base, in
/// its order, adapted ones as `W + scale·B·A` computed in float32 and written
/// in the base's dtype (then `dtype`, for floating tensors). Every name the
/// adapter targets must be in the base, with shapes that fit, before
/// anything is written; the file appears whole or not at all.
pub fn merge_lora(
    base: &dyn Source,
    adapter: &Adapter,
    out: &Path,
    dtype: Option<tch::Kind>,
) -> Result<LoraMerged> {
    let start = std::time::Instant::now();
    let edits = plan_lora(base, adapter)?;
    let format = super::write::format_of(out)?;
    let outgoing: Vec<crate::format::Outgoing> = base
        .entries()
        .iter()
        .map(|e| crate::format::Outgoing {
            name: e.name.to_string(),
            kind: match dtype {
                Some(kind) if e.dtype.is_castable_float() => kind.into(),
                _ => e.dtype,
            },
            shape: e.shape.clone(),
        })
        .collect();
    let mut releaser = crate::format::PageReleaser::default();
    let mut last: Option<usize> = None;
    let mut produce = |j: usize| -> Result<Tensor> {
        if let Some(previous) = last.replace(j) {
            if let Some(t) = base.tensor(previous) {
                releaser.release(t);
            }
        }
        merged_value(base, adapter, &edits[j], j, outgoing[j].kind)
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("transplant_merge_lora".to_string(), adapter.origin().to_string());
    super::write::write_file(out, format, &outgoing, &metadata, &mut produce)?;
    let names = |keep: &dyn Fn(&Edit) -> bool| -> Vec<String> {
        base.entries().iter().zip(&edits).filter(|(_, e)| keep(e)).map(|(e, _)| e.name.to_string()).collect()
    };
    Ok(LoraMerged {
        base: base.origin().to_string(),
        adapter: adapter.origin().to_string(),
        output: out.into(),
        format: format.to_string(),
        tensors: outgoing.len(),
        adapted: names(&|e| e.delta.is_some() || e.bias.is_some()),
        replaced: names(&|e| e.replace.is_some()),
        bytes: outgoing.iter().map(|o| o.bytes() as u64).sum(),
        seconds: start.elapsed().as_secs_f64(),
    })
}
