//! A model trained in Rust with tch's `nn` moves into a TorchScript module of
//! the same network exported from PyTorch — and back again.
//!
//! What it teaches:
//! - a tch `VarStore` is a store like any other: trainable variables are
//!   parameters, BatchNorm's running statistics buffers;
//! - its names (`0.weight`, `1.running_mean`) are the PyTorch module's names
//!   when the layers are built under the same paths, so names pair exactly;
//! - tch's `batch_norm` keeps no `num_batches_tracked`: the plan names that as
//!   a harmless, explained difference instead of failing;
//! - after each direction both models compute the same outputs in eval mode,
//!   running statistics included.
//!
//! The PyTorch side, made by scripts/make_fixtures.py (small_mlp.pt):
//! `nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))`.
//!
//! Run: `cargo run --example varstore_to_script [FIXTURES_DIR]`.
mod support;

use anyhow::{ensure, Result};
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use transplant::{copy, Mapping, ModuleStore, Plan, Policy, Report, Source, VarStoreView};

/// The network of small_mlp.pt, in tch: layers under the same paths as PyTorch's.
fn network(vs: &nn::VarStore) -> impl ModuleT {
    let root = vs.root();
    nn::seq_t()
        .add(nn::linear(&root / "0", 8, 16, Default::default()))
        .add(nn::batch_norm1d(&root / "1", 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "3", 16, 4, Default::default()))
}

fn main() -> Result<()> {
    let fixtures = support::fixtures()?;
    tch::manual_seed(7);

    // Train a little in Rust, so weights and running statistics are our own.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = network(&vs);
    let mut optimizer = nn::Adam::default().build(&vs, 1e-2)?;
    for _ in 0..50 {
        let x = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
        let y = x.narrow(1, 0, 4).sin();
        let loss = net.forward_t(&x, true).mse_loss(&y, tch::Reduction::Mean);
        optimizer.backward_step(&loss);
    }
    let rust_model = VarStoreView::new(&vs)?;

    // Rust -> TorchScript.
    let mut module = ModuleStore::open(fixtures.join("small_mlp.pt"))?;
    let plan = Plan::build(&rust_model, &module, &Mapping::default())?;
    println!("{}\n", Report::new(&plan, &Policy::default(), None));
    ensure!(plan.is_complete(), "every tensor pairs (the missing num_batches_tracked is explained)");
    copy(&plan, &rust_model, &mut module, &Policy { strict: true, ..Policy::default() })?;
    module.module_mut().set_training(false)?;
    let x = Tensor::randn([5, 8], (Kind::Float, Device::Cpu));
    let from_rust = tch::no_grad(|| net.forward_t(&x, false));
    let from_script = module.module().forward(&[x.shallow_clone()])?.remove(0);
    let there = support::max_abs_diff(&from_rust, &from_script)?;
    println!("VarStore -> TorchScript: eval outputs agree to {there:.2e}");
    ensure!(there < 1e-5, "outputs differ by {there}");

    // TorchScript -> a fresh VarStore (new random weights) and back to the same outputs.
    let fresh = nn::VarStore::new(Device::Cpu);
    let fresh_net = network(&fresh);
    let mut fresh_view = VarStoreView::new(&fresh)?;
    let back = Plan::build(&module, &fresh_view, &Mapping::default())?;
    copy(&back, &module, &mut fresh_view, &Policy::default())?;
    let again = tch::no_grad(|| fresh_net.forward_t(&x, false));
    let diff = support::max_abs_diff(&again, &from_script)?;
    println!("TorchScript -> VarStore: eval outputs agree to {diff:.2e}");
    ensure!(diff < 1e-5, "outputs differ by {diff}");
    let mean = |view: &VarStoreView| -> Result<Tensor> {
        let i = view.entries().iter().position(|e| e.name == "1.running_mean").expect("running_mean");
        Ok(view.tensor(i).expect("tensor").shallow_clone())
    };
    ensure!(mean(&fresh_view)?.equal(&mean(&rust_model)?), "running statistics made the round trip");
    println!("BatchNorm running statistics made the round trip bit for bit");
    Ok(())
}
