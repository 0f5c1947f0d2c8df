//! What the examples share: where the fixtures are, and loading an expected tensor.
#![allow(dead_code)] // each example uses its own part

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tch::Tensor;

/// The fixtures folder: the first argument, or target/fixtures (scripts/fixtures.sh makes it).
pub fn fixtures() -> Result<PathBuf> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    if !dir.join("COMPLETE").exists() {
        bail!("no fixtures in {}: run scripts/fixtures.sh first", dir.display());
    }
    Ok(dir)
}

/// One tensor of a safetensors file the fixture script wrote.
pub fn expected(file: &PathBuf, name: &str) -> Result<Tensor> {
    Ok(Tensor::read_safetensors(file)?
        .into_iter()
        .find(|(n, _)| n == name)
        .with_context(|| format!("{} has no {name}", file.display()))?
        .1)
}

/// Largest |a - b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b).f_abs()?.f_max()?.f_double_value(&[])?)
}
