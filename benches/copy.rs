//! Copy speed on two models (scripts/bench.sh prints them next to PyTorch):
//! - deep: 4,000 × [Linear(64, 64), BatchNorm1d(64)] — 28,000 tensors, 71 MB;
//! - wide: 16 × [Linear(4096, 4096), BatchNorm1d(4096)] — 112 tensors, 1.07 GB.
//!
//! For each: transplant plan + copy + verify, the copy alone, the verification
//! alone, and one flat `copy_` of the same number of bytes (the floor).
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use transplant::copy::{self, Options};
use transplant::store::Checkpoint;
use transplant::{Format, Mapping, Plan, Policy};

fn model(blocks: usize, width: i64) -> Result<Checkpoint> {
    let opts = (Kind::Float, Device::Cpu);
    let mut tensors = Vec::with_capacity(blocks * 7);
    for b in 0..blocks {
        tensors.push((format!("{}.weight", 2 * b), Tensor::randn([width, width], opts)));
        tensors.push((format!("{}.bias", 2 * b), Tensor::randn([width], opts)));
        for leaf in ["weight", "bias", "running_mean", "running_var"] {
            tensors.push((format!("{}.{leaf}", 2 * b + 1), Tensor::randn([width], opts)));
        }
        tensors.push((format!("{}.num_batches_tracked", 2 * b + 1), Tensor::from(7i64)));
    }
    Ok(Checkpoint::from_tensors("bench", Format::Safetensors, tensors, BTreeMap::new())?)
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let value = f();
        best = best.min(start.elapsed().as_secs_f64());
        last = Some(value);
    }
    (best, last.expect("at least one run"))
}

fn bench(name: &str, blocks: usize, width: i64, runs: usize) -> Result<()> {
    let (source, target) = (model(blocks, width)?, model(blocks, width)?);
    let policy = Policy::default();
    let quiet = Options { verify: true, progress: false };
    let (full, _) = best_of(runs, || {
        let plan = Plan::build(&source, &target, &Mapping::default()).expect("plan");
        copy::execute_with(&plan, &source, &target, &policy, quiet).expect("copy")
    });
    let (plan_only, plan) =
        best_of(runs, || Plan::build(&source, &target, &Mapping::default()).expect("plan"));
    let mut copies = Vec::new();
    for _ in 0..runs {
        copies.push(copy::execute_with(&plan, &source, &target, &policy, quiet)?);
    }
    let copy_only = copies.iter().map(|c| c.copy_seconds).fold(f64::MAX, f64::min);
    let verify_only = copies.iter().map(|c| c.verify_seconds).fold(f64::MAX, f64::min);
    let bytes = copies[0].bytes as i64;
    let flat_src = Tensor::randn([bytes / 4], (Kind::Float, Device::Cpu));
    let mut flat_dst = Tensor::zeros([bytes / 4], (Kind::Float, Device::Cpu));
    let (flat, _) = best_of(runs, || flat_dst.copy_(&flat_src));
    println!(
        "{{\"model\": \"{name}\", \"tensors\": {}, \"bytes\": {bytes}, \"plan_copy_verify\": {full:.6}, \
         \"plan\": {plan_only:.6}, \"copy\": {copy_only:.6}, \"verify\": {verify_only:.6}, \"flat_copy\": {flat:.6}}}",
        copies[0].tensors
    );
    Ok(())
}

fn main() -> Result<()> {
    let which = std::env::args().skip(1).find(|a| !a.starts_with("--")).unwrap_or_else(|| "both".into());
    if which == "deep" || which == "both" {
        bench("deep", 4000, 64, 5)?;
    }
    if which == "wide" || which == "both" {
        bench("wide", 16, 4096, 3)?;
    }
    Ok(())
}
