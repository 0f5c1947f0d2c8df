//! A folder holding one model, as `save_pretrained` lays it out: which file
//! is the model, chosen as transformers' `from_pretrained` chooses (safetensors
//! first). A Distributed Checkpoint folder (`.metadata`) is a model itself.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files a model folder may hold, in the order `from_pretrained` tries them.
const MODEL_FILES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// The model file `path` stands for: `path` itself unless it is a folder that
/// is not a Distributed Checkpoint; then the first it holds of
/// `model.safetensors`, `model.safetensors.index.json`, `pytorch_model.bin`,
/// `pytorch_model.bin.index.json` (the order `from_pretrained` prefers).
/// Every other one it holds must list the same tensors (names, dtypes,
/// shapes), or the folder is refused naming both.
pub fn model_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() || crate::format::dcp::is_checkpoint(path) {
        return Ok(path.to_path_buf());
    }
    let present: Vec<PathBuf> = MODEL_FILES.iter().map(|f| path.join(f)).filter(|p| p.is_file()).collect();
    let Some(chosen) = present.first() else {
        return Err(Error::ModelFolder {
            path: path.into(),
            message: format!(
                "is a folder holding no model: expected one of {} or a Distributed Checkpoint's .metadata",
                MODEL_FILES.join(", ")
            ),
        });
    };
    if present.len() > 1 {
        let listing = |file: &Path| -> Result<BTreeSet<(String, String, Vec<i64>)>> {
            let store = super::open(file)?;
            Ok(store
                .entries()
                .iter()
                .map(|e| (e.name.to_string(), crate::dtype::name(e.dtype).to_string(), e.shape.clone()))
                .collect())
        };
        let first = listing(chosen)?;
        for other in &present[1..] {
            let second = listing(other)?;
            if let Some((name, dtype, shape)) = first.symmetric_difference(&second).next() {
                let holder = if first.contains(&(name.clone(), dtype.clone(), shape.clone())) {
                    chosen
                } else {
                    other
                };
                return Err(Error::ModelFolder {
                    path: path.into(),
                    message: format!(
                        "holds two models that disagree: {} and {} ({} has {name} {dtype} {shape:?}, the other \
                         not); name the file to read",
                        chosen.display(),
                        other.display(),
                        holder.display()
                    ),
                });
            }
        }
    }
    Ok(chosen.clone())
}
