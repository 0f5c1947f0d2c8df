//! Copy speed on two models (scripts/bench.sh prints them next to PyTorch):
//! - deep: 4,000 × [Linear(64, 64), BatchNorm1d(64)] — 28,000 tensors, 71 MB;
//! - wide: 16 × [Linear(4096, 4096), BatchNorm1d(4096)] — 112 tensors, 1.07 GB.
//!
//! For each: transplant plan + copy + verify, the plan, the copy and the
//! verification each alone (each timed whole, checks and set-up included), and
//! one flat `copy_` of the same number of bytes (the floor). Best of several runs.
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use transplant::{copy_with, verify, Checkpoint, CopyOptions, Format, Mapping, Plan, Policy, Target};

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

/// Seconds `f` takes; what it returns is dropped after the clock stops.
fn seconds<T>(f: impl FnOnce() -> T) -> f64 {
    let start = Instant::now();
    let value = f();
    let elapsed = start.elapsed().as_secs_f64();
    drop(value);
    elapsed
}

fn bench(name: &str, blocks: usize, width: i64, rounds: usize, from: Device, into: Device) -> Result<()> {
    let (source, mut target) = (model(blocks, width, from)?, model(blocks, width, into)?);
    let (policy, mapping) = (Policy::default(), Mapping::default());
    let verified = CopyOptions { verify: true, progress: None };
    let unverified = CopyOptions { verify: false, progress: None };
    let plan = Plan::build(&source, &target, &mapping)?;
    let bytes = copy_with(&plan, &source, &mut target, &policy, unverified)?.bytes as i64;
    // The floor: one copy of the same bytes between the same devices (from
    // pinned memory when the source is the host and the target a GPU).
    let mut flat_src = Tensor::randn([bytes / 4], (Kind::Float, from));
    if from == Device::Cpu && into != Device::Cpu {
        flat_src = flat_src.pin_memory(into);
    }
    let mut flat_dst = Tensor::zeros([bytes / 4], (Kind::Float, into));
    let mut flat_copy = || {
        flat_dst.copy_(&flat_src);
        if let Device::Cuda(i) = into {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // The plan is returned, and so dropped after the clock stops.
    let plan_and_copy = |target: &mut dyn Target, options: CopyOptions| {
        let plan = Plan::build(&source, &*target, &mapping).expect("plan");
        copy_with(&plan, &source, target, &policy, options).expect("copy");
        plan
    };
    // Each round times every step once, so that all of them meet the same
    // machine (this one's speed drifts); the best round of each is printed.
    // The copy and the verification are each timed whole, checks and set-up included.
    let mut best = [f64::MAX; 5];
    for _ in 0..rounds {
        let times = [
            seconds(|| plan_and_copy(&mut target, verified)),
            seconds(|| Plan::build(&source, &target, &mapping).expect("plan")),
            seconds(|| copy_with(&plan, &source, &mut target, &policy, unverified).expect("copy")),
            seconds(|| verify(&plan, &source, &target).expect("verify")),
            seconds(&mut flat_copy),
        ];
        for (best, time) in best.iter_mut().zip(times) {
            *best = best.min(time);
        }
    }
    let [full, plan_only, copy_only, verify_only, flat] = best;
    // Then back to back, caches warm: plan + copy repeated, the flat copy repeated.
    let warm_plan_copy =
        (0..rounds).map(|_| seconds(|| plan_and_copy(&mut target, unverified))).fold(f64::MAX, f64::min);
    let warm_flat = (0..rounds).map(|_| seconds(&mut flat_copy)).fold(f64::MAX, f64::min);
    println!(
        "{{\"model\": \"{name}\", \"from\": \"{from:?}\", \"into\": \"{into:?}\", \"tensors\": {}, \"bytes\": {bytes}, \"plan_copy_verify\": {full:.6}, \
         \"plan\": {plan_only:.6}, \"copy\": {copy_only:.6}, \"verify\": {verify_only:.6}, \"flat_copy\": {flat:.6}, \
         \"warm_plan_copy\": {warm_plan_copy:.6}, \"warm_flat_copy\": {warm_flat:.6}}}",
        plan.pairs.len()
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
            bench("deep", 4000, 64, 20, from, into)?;
        }
        if which == "wide" || which == "both" {
            bench("wide", 16, 4096, 5, from, into)?;
        }
    }
    Ok(())
}
