//! An inference service that swaps its weights while it serves.
//!
//! What it teaches: `ModelSlot` serves a TorchScript model from many threads;
//! new weights are copied into a standby copy, checked and verified there, then
//! made live by replacing one pointer. Every response comes entirely from the
//! old weights or entirely from the new ones, requests never wait for a copy,
//! and a checkpoint that fails its check never goes live: the service keeps
//! serving the old weights and says why.
//!
//! It prints requests served, swaps made, and request latency (median, p99)
//! without swaps and while swapping every few milliseconds.
//!
//! Run: `cargo run --release --example hot_swap [FIXTURES_DIR]`.
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use tch::Tensor;
use transplant::{Mapping, ModelSlot, ModuleStore, Policy, ScriptModule, Source};

const WORKERS: usize = 4;

struct Load {
    latencies: Mutex<Vec<f64>>,
    served: AtomicU64,
    mixed: AtomicU64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// Serves requests on `WORKERS` threads for `duration`, while `swapper` runs.
fn serve(
    slot: &Arc<ModelSlot>,
    input: &Tensor,
    answers: &[Tensor; 2],
    duration: Duration,
    swapper: impl FnOnce(&AtomicBool),
) -> Result<Load> {
    let load = Arc::new(Load {
        latencies: Mutex::new(Vec::new()),
        served: AtomicU64::new(0),
        mixed: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (slot, load, stop) = (Arc::clone(slot), Arc::clone(&load), Arc::clone(&stop));
            let input = input.shallow_clone();
            let answers = [answers[0].shallow_clone(), answers[1].shallow_clone()];
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let Ok(mut out) = slot.forward(&[input.shallow_clone()]) else { continue };
                    mine.push(start.elapsed().as_secs_f64());
                    let out = out.remove(0);
                    if !answers.iter().any(|a| a.equal(&out)) {
                        load.mixed.fetch_add(1, Ordering::Relaxed);
                    }
                    load.served.fetch_add(1, Ordering::Relaxed);
                }
                load.latencies.lock().expect("latencies").extend(mine);
            })
        })
        .collect();
    let deadline = Instant::now() + duration;
    swapper(&stop);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
    }
    Arc::try_unwrap(load).map_err(|_| anyhow::anyhow!("workers still hold the load"))
}

fn report(label: &str, load: &Load) -> (f64, f64) {
    let mut l = load.latencies.lock().expect("latencies").clone();
    l.sort_by(f64::total_cmp);
    let (median, p99) = (percentile(&l, 0.5) * 1e3, percentile(&l, 0.99) * 1e3);
    println!(
        "  {label:<22} {:>7} requests   median {median:.3} ms   p99 {p99:.3} ms",
        load.served.load(Ordering::Relaxed)
    );
    (median, p99)
}

fn main() -> Result<()> {
    let fixtures = support::fixtures()?;
    tch::set_num_threads(1); // one core per request: reproducible, and the service's threads do the parallelism
    let input = support::expected(&fixtures.join("bn_net.expected.safetensors"), "input")?;
    let weights =
        [ModuleStore::open(fixtures.join("bn_net_a.pt"))?, ModuleStore::open(fixtures.join("bn_net_b.pt"))?];
    let mut answers = Vec::new();
    for w in &weights {
        let mut m = w.module().deep_copy()?;
        m.set_training(false)?;
        answers.push(m.forward(&[input.shallow_clone()])?.remove(0));
    }
    let answers: [Tensor; 2] = [answers.remove(0), answers.remove(0)];
    let slot = Arc::new(ModelSlot::new(ScriptModule::load(fixtures.join("bn_net_a.pt"))?)?);
    let (mapping, policy) = (Mapping::default(), Policy::default());

    println!("{WORKERS} threads serving {} for 1 s each way:", fixtures.join("bn_net_a.pt").display());
    let quiet = serve(&slot, &input, &answers, Duration::from_secs(1), |_| {})?;
    let (quiet_median, quiet_p99) = report("without swaps", &quiet);

    let corrupt =
        std::env::temp_dir().join(format!("transplant-hot-swap-{}.safetensors", std::process::id()));
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"broken\": tru")?;
    let swaps = AtomicU64::new(0);
    let busy = serve(&slot, &input, &answers, Duration::from_secs(1), |stop| {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) && i < 40 {
            let source: &dyn Source = &weights[(i + 1) % 2];
            if slot.swap_from(source, &mapping, &policy).is_ok() {
                swaps.fetch_add(1, Ordering::Relaxed);
            }
            if i == 20 {
                match slot.swap_from_file(&corrupt, &mapping, &policy) {
                    Ok(_) => println!("  unexpected: a corrupt checkpoint went live"),
                    Err(e) => println!(
                        "  corrupt checkpoint rejected, still serving generation {}: {e}",
                        slot.generation()
                    ),
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    })?;
    let _ = std::fs::remove_file(&corrupt);
    let (busy_median, busy_p99) = report("while swapping", &busy);
    let swaps = swaps.load(Ordering::Relaxed);
    let mixed = quiet.mixed.load(Ordering::Relaxed) + busy.mixed.load(Ordering::Relaxed);
    println!("  {swaps} swaps went live; {mixed} responses mixed two weight sets");
    println!(
        "  latency while swapping: median x{:.2}, p99 x{:.2} of the quiet run",
        busy_median / quiet_median,
        busy_p99 / quiet_p99
    );
    ensure!(mixed == 0, "{mixed} responses mixed weights");
    ensure!(swaps >= 20, "only {swaps} swaps");
    Ok(())
}
