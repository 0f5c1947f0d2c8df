//! A service that serves a model on several threads while a PyTorch trainer
//! pushes new weights into it over torch.distributed (live weight sync).
//!
//! What it teaches: a [`Receiver`] plans the trainer's tensors against the
//! served model once per trainer session (with rules where the names
//! differ), then takes each sync into a standby copy of the [`ModelSlot`]:
//! every bucket's digest is checked and every tensor copied and verified
//! before the new weights go live. Requests never see a mix of two weight
//! sets; a trainer that dies mid-sync leaves the service on its old weights,
//! and the next trainer's sync goes live.
//!
//! It serves the store itself (on a free loopback port, written to
//! `--port-file`), runs `--workers` request threads on `--model`, takes
//! syncs until `--syncs` went live (or `--seconds` passed), and prints one
//! JSON line per sync, then a summary: syncs, refused syncs, responses that
//! mixed two weight sets, the largest difference to the trainer's own output
//! (files `expected_<session>_<sync>.safetensors` in `--expected`, written by
//! `scripts/sync_trainer.py`), and request latency without and during syncs.
//!
//! Run by `scripts/sync_demo.sh` and `scripts/bench.sh`:
//! `cargo run --release --example sync_serve -- --model M.pt --input-shape 1,3,8,8 --port-file F [...]`.
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};
use transplant::sync::{Endpoint, Receiver, SyncOptions};
use transplant::{Mapping, Matcher, ModelSlot, Policy, Rules, ScriptModule};

struct Args {
    model: PathBuf,
    input: Option<PathBuf>,
    input_shape: Vec<i64>,
    port_file: PathBuf,
    expected: Option<PathBuf>,
    rules: Option<PathBuf>,
    workers: usize,
    syncs: usize,
    seconds: f64,
    channel: String,
}

fn args() -> Result<Args> {
    let mut map: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(key) = it.next() {
        let Some(name) = key.strip_prefix("--") else { bail!("unexpected argument {key}") };
        map.insert(name.to_string(), it.next().with_context(|| format!("{key} needs a value"))?);
    }
    let get = |k: &str| map.get(k).cloned();
    Ok(Args {
        model: get("model").context("--model M.pt")?.into(),
        input: get("input").map(PathBuf::from),
        input_shape: get("input-shape")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().context("--input-shape 1,3,8,8"))
            .collect::<Result<_>>()?,
        port_file: get("port-file").context("--port-file F")?.into(),
        expected: get("expected").map(PathBuf::from),
        rules: get("rules").map(PathBuf::from),
        workers: get("workers").map_or(Ok(4), |s| s.parse())?,
        syncs: get("syncs").map_or(Ok(1), |s| s.parse())?,
        seconds: get("seconds").map_or(Ok(300.0), |s| s.parse())?,
        channel: get("channel").unwrap_or_else(|| "default".into()),
    })
}

/// One request: when it started and ended, and which answer it got.
struct Request {
    start: Instant,
    end: Instant,
    answer: u64,
}

fn fingerprint(t: &Tensor) -> u64 {
    let t = t.contiguous();
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, t.numel());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

fn latency(label: &str, mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    serde_json::json!({"phase": label, "requests": ms.len(), "median_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99)})
}

fn main() -> Result<()> {
    let args = args()?;
    tch::set_num_threads(1); // one core per request, as in the hot-swap example
    let input = match &args.input {
        Some(file) => {
            Tensor::read_safetensors(file)?.into_iter().find(|(n, _)| n == "input").context("no `input`")?.1
        }
        None => Tensor::ones(args.input_shape.as_slice(), (Kind::Float, tch::Device::Cpu)),
    };
    let slot = Arc::new(ModelSlot::new(ScriptModule::load(&args.model)?)?);
    let rules = match &args.rules {
        Some(file) => Rules::from_file(file)?,
        None => Rules::default(),
    };
    let mapping = Mapping { rules, matcher: Matcher::Exact, source_order: None };
    let endpoint =
        Endpoint { host: "127.0.0.1".into(), port: 0, serve_store: true, channel: args.channel.clone() };
    let options = SyncOptions { timeout: Duration::from_secs(60), ..SyncOptions::default() };
    let mut receiver =
        Receiver::connect(&endpoint, 1, 1, mapping, Policy { strict: true, ..Policy::default() }, options)?;
    let port = receiver.store_port()?;
    std::fs::write(&args.port_file, port.to_string())?;

    // The answers each generation gives; a response not among them mixed two weight sets.
    let answers: Mutex<HashSet<u64>> = Mutex::new(HashSet::new());
    if args.workers > 0 {
        answers.lock().unwrap().insert(fingerprint(&slot.forward(&[input.shallow_clone()])?.remove(0)));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let requests: Arc<Mutex<Vec<Request>>> = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..args.workers)
        .map(|_| {
            let (slot, stop, requests, input) =
                (Arc::clone(&slot), Arc::clone(&stop), Arc::clone(&requests), input.shallow_clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let Ok(mut out) = slot.forward(&[input.shallow_clone()]) else { continue };
                    let end = Instant::now();
                    mine.push(Request { start, end, answer: fingerprint(&out.remove(0)) });
                }
                requests.lock().unwrap().extend(mine);
            })
        })
        .collect();

    let began = Instant::now();
    let (mut done, mut refused, mut max_diff) = (0usize, 0usize, 0f64);
    let mut windows: Vec<(Instant, Instant, bool)> = Vec::new(); // (start, end, is a weight sync)
                                                                 // The workers are stopped before any error leaves main (libtorch must not
                                                                 // be torn down under running requests).
    let mut take_syncs = || -> Result<()> {
        while done < args.syncs && began.elapsed().as_secs_f64() < args.seconds {
            match receiver.receive(&slot, Duration::from_millis(200)) {
                Ok(None) => {}
                Ok(Some(received)) => {
                    let end = Instant::now();
                    windows.push((
                        end - Duration::from_secs_f64(received.seconds),
                        end,
                        received.swap.is_some(),
                    ));
                    let Some(swap) = &received.swap else {
                        println!(
                            "{}",
                            serde_json::json!({"raw_broadcast": received.sync, "seconds": received.seconds, "bytes": received.bytes})
                        );
                        continue;
                    };
                    done += 1;
                    // The new generation's answer (a response not among the
                    // answers mixed two weight sets); without requests or
                    // expected outputs nothing needs it.
                    let out = if args.workers > 0 || args.expected.is_some() {
                        let out = slot.forward(&[input.shallow_clone()])?.remove(0);
                        answers.lock().unwrap().insert(fingerprint(&out));
                        Some(out)
                    } else {
                        None
                    };
                    let mut line = serde_json::json!({
                        "session": received.session, "sync": received.sync, "generation": swap.generation,
                        "bytes": received.bytes, "buckets": received.buckets, "seconds": received.seconds,
                        "copy_seconds": swap.copied.copy_seconds, "verify_seconds": swap.copied.verify_seconds,
                        "reused_standby": swap.reused_standby,
                    });
                    if let (Some(dir), Some(out)) = (&args.expected, &out) {
                        let file =
                            dir.join(format!("expected_{}_{}.safetensors", received.session, received.sync));
                        let expected = transplant::open(&file)?;
                        let trainer = expected.tensor(0).context("an expected output")?;
                        let diff = (out - trainer).abs().max().double_value(&[]);
                        max_diff = max_diff.max(diff);
                        line["max_diff"] = diff.into();
                    }
                    println!("{line}");
                }
                Err(e) => {
                    refused += 1;
                    println!(
                        "{}",
                        serde_json::json!({"refused": e.to_string(), "generation": slot.generation()})
                    );
                }
            }
        }
        Ok(())
    };
    let taken = take_syncs();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
    }
    let answers = answers.into_inner().unwrap();
    let requests = std::mem::take(&mut *requests.lock().unwrap());
    let mixed = requests.iter().filter(|r| !answers.contains(&r.answer)).count();
    let overlaps = |r: &Request, weights: bool| {
        windows.iter().any(|&(s, e, w)| w == weights && r.start < e && r.end > s)
    };
    let ms = |r: &Request| (r.end - r.start).as_secs_f64() * 1e3;
    let quiet: Vec<f64> =
        requests.iter().filter(|r| !overlaps(r, true) && !overlaps(r, false)).map(ms).collect();
    let during: Vec<f64> = requests.iter().filter(|r| overlaps(r, true)).map(ms).collect();
    println!(
        "{}",
        serde_json::json!({
            "summary": true, "syncs": done, "refused_syncs": refused, "requests": requests.len(), "mixed": mixed,
            "max_diff": max_diff, "generation": slot.generation(),
            "quiet": latency("quiet", quiet), "during_syncs": latency("during syncs", during),
        })
    );
    taken?;
    if done < args.syncs {
        bail!("only {done} of {} syncs went live within {} s", args.syncs, args.seconds);
    }
    Ok(())
}
