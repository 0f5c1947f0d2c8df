//! The classic copy between two models of the same architecture, done right.
//!
//! What it teaches:
//! - a model's state is its parameters **and** its buffers (BatchNorm's
//!   `running_mean`, `running_var`, `num_batches_tracked`, and any registered buffer);
//! - the copy happens in place, under a no-grad guard, into the target's own tensors,
//!   after checking that every name and shape agrees (`copy_` alone would broadcast);
//! - copying `parameters()` alone — what many guides show — leaves the running
//!   statistics behind, and the eval-mode outputs differ.
//!
//! The models are made by `scripts/make_fixtures.py` (two scripted `BnNet`s trained
//! from different seeds). Run: `cargo run --example identical [FIXTURES_DIR]`.
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use tch::Tensor;
use transplant::{Role, ScriptModule};

/// Copies every entry of `source` whose role is in `roles` into `target`, in place.
fn copy_state(source: &ScriptModule, target: &ScriptModule, roles: &[Role]) -> Result<usize> {
    let (from, into) = (source.named_tensors()?, target.named_tensors()?);
    ensure!(from.len() == into.len(), "the models differ: {} vs {} tensors", from.len(), into.len());
    // Check everything before writing anything: a failed copy must not leave a half-written model.
    for (src, dst) in from.iter().zip(&into) {
        ensure!(src.name == dst.name, "names differ: {} vs {}", src.name, dst.name);
        ensure!(src.tensor.size() == dst.tensor.size(), "{}: shapes differ", src.name);
        ensure!(src.tensor.kind() == dst.tensor.kind(), "{}: dtypes differ", src.name);
    }
    let _no_grad = tch::no_grad_guard();
    let mut copied = 0;
    for (src, dst) in from.iter().zip(into) {
        if roles.contains(&src.role) {
            let mut dst = dst.tensor;
            dst.f_copy_(&src.tensor).with_context(|| format!("copying {}", src.name))?;
            copied += 1;
        }
    }
    Ok(copied)
}

fn eval_output(module: &mut ScriptModule, input: &Tensor) -> Result<Tensor> {
    module.set_training(false)?;
    let mut outputs = module.forward(&[input.shallow_clone()])?;
    ensure!(outputs.len() == 1, "expected one output, got {}", outputs.len());
    Ok(outputs.remove(0))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b).f_abs()?.f_max()?.f_double_value(&[])?)
}

fn main() -> Result<()> {
    let fixtures = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    let (source_path, target_path) = (fixtures.join("bn_net_a.pt"), fixtures.join("bn_net_b.pt"));
    if !source_path.exists() {
        bail!("{} not found: run scripts/fixtures.sh first", source_path.display());
    }
    let input = Tensor::read_safetensors(fixtures.join("bn_net.expected.safetensors"))?
        .into_iter()
        .find(|(name, _)| name == "input")
        .context("bn_net.expected.safetensors has no `input`")?
        .1;

    let mut source = ScriptModule::load(&source_path)?;
    let entries = source.named_tensors()?;
    let buffers = entries.iter().filter(|e| e.role == Role::Buffer).count();
    println!(
        "source {}: {} tensors ({} parameters, {} buffers)",
        source_path.display(),
        entries.len(),
        entries.len() - buffers,
        buffers
    );
    println!("target {}: same architecture, different weights\n", target_path.display());
    let want = eval_output(&mut source, &input)?;

    // 1. What many guides do: copy parameters() only.
    let mut target = ScriptModule::load(&target_path)?;
    let copied = copy_state(&source, &target, &[Role::Parameter])?;
    let diff = max_abs_diff(&eval_output(&mut target, &input)?, &want)?;
    println!("parameters only       : {copied:>2} tensors copied, eval outputs differ by up to {diff:.6}");
    ensure!(diff > 0.0, "copying parameters alone unexpectedly matched");

    // 2. Done right: parameters and buffers, then save and reload to show it persisted.
    let target = ScriptModule::load(&target_path)?;
    let copied = copy_state(&source, &target, &[Role::Parameter, Role::Buffer])?;
    let dir = tempfile::tempdir()?;
    let saved = dir.path().join("bn_net_b_with_a_weights.pt");
    target.save(&saved)?;
    let mut reloaded = ScriptModule::load(&saved)?;
    let got = eval_output(&mut reloaded, &input)?;
    let identical = got.size() == want.size() && got.equal(&want);
    println!(
        "parameters and buffers: {copied:>2} tensors copied, saved, reloaded: eval outputs {}",
        if identical { "bit-identical" } else { "DIFFER" }
    );
    ensure!(identical, "outputs differ by up to {} after a full copy", max_abs_diff(&got, &want)?);
    Ok(())
}
