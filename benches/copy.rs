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

fn model(blocks: usize, width: i64, device: Device) -> Result<Checkpoint> {
    let opts = (Kind::Float, device);
    let mut tensors = Vec::with_capacity(blocks * 7);
    for b in 0..blocks {
        tensors.push((format!("{}.weight", 2 * b), Tensor::randn([width, width], opts)));
        tensors.push((format!("{}.bias", 2 * b), Tensor::randn([width], opts)));
        for leaf in ["weight", "bias", "running_mean", "running_var"] {
            tensors.push((format!("{}.{leaf}", 2 * b + 1), Tensor::randn([width], opts)));
        }
        tensors.push((format!("{}.num_batches_tracked", 2 * b + 1), Tensor::from(7i64).to_device(device)));
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

fn bench(name: &str, blocks: usize, width: i64, runs: usize, from: Device, into: Device) -> Result<()> {
    let (source, target) = (model(blocks, width, from)?, model(blocks, width, into)?);
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
    // The floor: one copy of the same bytes between the same devices (from
    // pinned memory when the source is the host and the target a GPU).
    let mut flat_src = Tensor::randn([bytes / 4], (Kind::Float, from));
    if from == Device::Cpu && into != Device::Cpu {
        flat_src = flat_src.pin_memory(into);
    }
    let mut flat_dst = Tensor::zeros([bytes / 4], (Kind::Float, into));
    let (flat, _) = best_of(runs, || {
        flat_dst.copy_(&flat_src);
        if let Device::Cuda(i) = into {
            tch::Cuda::synchronize(i as i64);
        }
    });
    println!(
        "{{\"model\": \"{name}\", \"from\": \"{from:?}\", \"into\": \"{into:?}\", \"tensors\": {}, \"bytes\": {bytes}, \"plan_copy_verify\": {full:.6}, \
         \"plan\": {plan_only:.6}, \"copy\": {copy_only:.6}, \"verify\": {verify_only:.6}, \"flat_copy\": {flat:.6}}}",
        copies[0].tensors
    );
    Ok(())
}

/// `copy [deep|wide|both] [cpu|gpu]`: `gpu` runs GPU→GPU and CPU→GPU.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let which = args.first().map_or("both", String::as_str);
    let routes: Vec<(Device, Device)> = match args.get(1).map(String::as_str) {
        Some("gpu") if tch::Cuda::is_available() => {
            vec![(Device::Cuda(0), Device::Cuda(0)), (Device::Cpu, Device::Cuda(0))]
        }
        Some("gpu") => anyhow::bail!("no CUDA device"),
        _ => vec![(Device::Cpu, Device::Cpu)],
    };
    for (from, into) in routes {
        if which == "deep" || which == "both" {
            bench("deep", 4000, 64, 5, from, into)?;
        }
        if which == "wide" || which == "both" {
            bench("wide", 16, 4096, 3, from, into)?;
        }
    }
    Ok(())
}
