//! Copy speed on two models (scripts/bench.sh prints them next to PyTorch):
//! - deep: 4,000 × [Linear(64, 64), BatchNorm1d(64)] — 28,000 tensors, 71 MB;
//! - wide: 16 × [Linear(4096, 4096), BatchNorm1d(4096)] — 112 tensors, 1.07 GB.
//!
//! `copy transformed`: the wide model copied through rules with transforms
//! (a reshape, a transpose, a split in two, a concatenation of two), each
//! against the untransformed copy of the same bytes, plan + copy + verify.
//!
//! For each: transplant plan + copy + verify, the plan, the copy and the
//! verification each alone (each timed whole, checks and set-up included), and
//! one flat `copy_` of the same number of bytes (the floor). Best of several runs.
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use transplant::{
    copy_with, verify, Checkpoint, CopyOptions, Format, Mapping, Matcher, Plan, Policy, Rules, Target,
};

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

/// The wide model with each Linear weight ([4096, 4096]) stored as `layout`
/// makes it: its other tensors as they are.
fn wide_with(layout: impl Fn(&str, Tensor) -> Vec<(String, Tensor)>) -> Result<Checkpoint> {
    let model = model(16, 4096, Device::Cpu)?;
    let mut tensors = Vec::new();
    for (name, tensor) in model.named_tensors() {
        if tensor.dim() == 2 {
            tensors.extend(layout(&name, tensor));
        } else {
            tensors.push((name, tensor));
        }
    }
    Ok(Checkpoint::from_tensors("bench", Format::Safetensors, tensors, BTreeMap::new())?)
}

/// Plan + copy of `source` into `target` under `rules`, and plan + copy +
/// verify, each the best of `rounds`.
fn timed_transfer(
    source: &Checkpoint,
    target: &mut Checkpoint,
    rules: &str,
    rounds: usize,
) -> Result<[f64; 2]> {
    let mapping =
        Mapping { rules: Rules::parse(rules, "bench")?, matcher: Matcher::Exact, source_order: None };
    let policy = Policy { strict: true, allow_lossy_casts: false };
    let mut best = [f64::MAX; 2];
    for _ in 0..rounds {
        for (best, verify) in best.iter_mut().zip([false, true]) {
            *best = best.min(seconds(|| {
                let plan = Plan::build(source, &*target, &mapping).expect("plan");
                copy_with(&plan, source, target, &policy, CopyOptions { verify, progress: None })
                    .expect("copy");
                plan
            }));
        }
    }
    Ok(best)
}

fn bench_transformed(rounds: usize) -> Result<()> {
    let whole = |name: &str, t: Tensor| vec![(name.to_string(), t)];
    let halves = |name: &str, t: Tensor| {
        let parts = t.chunk(2, 1);
        vec![(format!("{name}_a"), parts[0].contiguous()), (format!("{name}_b"), parts[1].contiguous())]
    };
    let source = wide_with(whole)?;
    let mut plain = wide_with(whole)?;
    let mut cube = wide_with(|name, t| vec![(name.to_string(), t.reshape([4096, 64, 64]))])?;
    let mut parts = wide_with(halves)?;
    let split_source = wide_with(halves)?;
    let untransformed = timed_transfer(&source, &mut plain, "", rounds)?;
    let weights = r"(\d*[02468])\.weight";
    let cases = [
        (
            "reshape",
            timed_transfer(
                &source,
                &mut cube,
                &format!("{weights} => $1.weight | reshape(4096, 64, 64)\n"),
                rounds,
            )?,
        ),
        (
            "transpose",
            timed_transfer(
                &source,
                &mut plain,
                &format!("{weights} => $1.weight | transpose(0, 1)\n"),
                rounds,
            )?,
        ),
        (
            "split",
            timed_transfer(
                &source,
                &mut parts,
                &format!("{weights} => $1.weight_a, $1.weight_b | split(1)\n"),
                rounds,
            )?,
        ),
        (
            "cat",
            timed_transfer(
                &split_source,
                &mut plain,
                r"(\d+)\.weight_a + (\d+)\.weight_b => $1.weight | cat(1)
",
                rounds,
            )?,
        ),
    ];
    let fields: Vec<String> = cases
        .iter()
        .map(|(name, [copy, verified])| format!("\"{name}\": {copy:.6}, \"{name}_verified\": {verified:.6}"))
        .collect();
    let [copy, verified] = untransformed;
    println!(
        "{{\"untransformed\": {copy:.6}, \"untransformed_verified\": {verified:.6}, {}}}",
        fields.join(", ")
    );
    Ok(())
}

/// `copy [deep|wide|both|transformed] [cpu|gpu]`: `gpu` runs GPU→GPU and CPU→GPU.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let which = args.first().map_or("both", String::as_str);
    if which == "transformed" {
        return bench_transformed(3);
    }
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
