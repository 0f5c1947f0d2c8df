//! A live weight swap under load: every response computed entirely by one
//! weight set, a corrupt checkpoint never goes live, serving never stops.
use crate::common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bit_equal, expected_tensor, fixture};
use transplant::{Checkpoint, Mapping, ModelSlot, ModuleStore, Policy, ScriptModule, Source, Target};

fn eval_output(path: &str, input: &tch::Tensor) -> tch::Tensor {
    let mut module = ScriptModule::load(fixture(path)).unwrap();
    module.set_training(false).unwrap();
    module.forward(&[input.shallow_clone()]).unwrap().remove(0)
}

#[test]
fn responses_are_never_a_mix_of_two_weight_sets() {
    // One thread per forward keeps results bit-for-bit reproducible under load.
    tch::set_num_threads(1);
    let input = expected_tensor("bn_net.expected.safetensors", "input");
    let (want_a, want_b) = (eval_output("bn_net_a.pt", &input), eval_output("bn_net_b.pt", &input));
    assert!(!bit_equal(&want_a, &want_b));
    let slot = Arc::new(ModelSlot::new(ScriptModule::load(fixture("bn_net_a.pt")).unwrap()).unwrap());
    let (weights_a, weights_b) = (
        ModuleStore::open(fixture("bn_net_a.pt")).unwrap(),
        ModuleStore::open(fixture("bn_net_b.pt")).unwrap(),
    );

    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.safetensors");
    let saved = dir.path().join("b.safetensors");
    let named = (0..weights_b.entries().len())
        .map(|i| (weights_b.entries()[i].name.to_string(), weights_b.tensor(i).unwrap().shallow_clone()))
        .collect();
    Checkpoint::from_tensors("b", transplant::Format::Safetensors, named, Default::default())
        .unwrap()
        .save(&saved)
        .unwrap();
    let bytes = std::fs::read(&saved).unwrap();
    std::fs::write(&corrupt, &bytes[..bytes.len() / 2]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (served, mixed, as_a, as_b) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (slot, stop) = (Arc::clone(&slot), Arc::clone(&stop));
            let (served, mixed, as_a, as_b) =
                (Arc::clone(&served), Arc::clone(&mixed), Arc::clone(&as_a), Arc::clone(&as_b));
            let (input, want_a, want_b) =
                (input.shallow_clone(), want_a.shallow_clone(), want_b.shallow_clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = slot.forward(&[input.shallow_clone()]).expect("serving never fails").remove(0);
                    if bit_equal(&out, &want_a) {
                        as_a.fetch_add(1, Ordering::Relaxed);
                    } else if bit_equal(&out, &want_b) {
                        as_b.fetch_add(1, Ordering::Relaxed);
                    } else {
                        mixed.fetch_add(1, Ordering::Relaxed);
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let policy = Policy::default();
    let mapping = Mapping::default();
    let started = Instant::now();
    let mut swaps = 0;
    let mut rejected = 0;
    for i in 0..24 {
        let source: &dyn Source = if i % 2 == 0 { &weights_b } else { &weights_a };
        let swap = slot.swap_from(source, &mapping, &policy).unwrap();
        assert!(swap.copied.verified);
        swaps += 1;
        if i == 10 {
            let before = slot.generation();
            let error = slot.swap_from_file(&corrupt, &mapping, &policy).unwrap_err().to_string();
            assert!(error.contains("corrupt.safetensors"), "{error}");
            assert_eq!(slot.generation(), before, "a corrupt checkpoint went live");
            rejected += 1;
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    while served.load(Ordering::Relaxed) < 4000 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (served, mixed, a, b) = (
        served.load(Ordering::Relaxed),
        mixed.load(Ordering::Relaxed),
        as_a.load(Ordering::Relaxed),
        as_b.load(Ordering::Relaxed),
    );
    eprintln!("served {served} requests ({a} by A, {b} by B, {mixed} mixed) across {swaps} swaps; {rejected} corrupt checkpoint rejected");
    assert_eq!(mixed, 0, "responses computed by a mix of weights");
    assert!(served >= 4000, "served only {served}");
    assert!(a > 0 && b > 0, "both weight sets served: {a} / {b}");
    assert_eq!(slot.generation(), 24);
    // The last swap put A's weights live.
    assert!(bit_equal(&slot.forward(&[input.shallow_clone()]).unwrap()[0], &want_a));
}

#[test]
fn an_incomplete_or_mismatched_checkpoint_never_goes_live() {
    let slot = ModelSlot::new(ScriptModule::load(fixture("mlp.pt")).unwrap()).unwrap();
    let other = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    let error = slot.swap_from(&other, &Mapping::default(), &Policy::default()).unwrap_err().to_string();
    assert!(error.contains("complete"), "{error}");
    assert_eq!(slot.generation(), 0);
    // And the slot still serves.
    let x = tch::Tensor::randn([2, 32], (tch::Kind::Float, tch::Device::Cpu));
    assert_eq!(slot.forward(&[x]).unwrap()[0].size(), vec![2, 10]);
}
