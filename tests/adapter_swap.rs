//! Live adapter swaps (`ModelSlot::swap_adapter`): a served conv net takes a
//! PEFT adapter, goes back to its base, takes another adapter — under load,
//! every response computed by one weight set (PEFT's merged model's, within
//! 1e-5), never a mix; an adapter that does not fit never goes live.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;
use transplant::{Adapter, ModelSlot, ScriptModule};

fn close(a: &Tensor, b: &Tensor) -> bool {
    let diff = (a - b).abs().max().double_value(&[]);
    diff <= 1e-5 * b.abs().max().double_value(&[]).max(1e-3)
}

#[test]
fn adapters_go_live_whole_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let made = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/lora_reference.py"))
        .arg("make")
        .arg(d)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the venv's python runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(d.join("swap_expected.safetensors")).unwrap().into_iter().collect();
    let input = expected["input"].shallow_clone();
    let wants: Vec<Tensor> = ["base", "conv", "conv2"].iter().map(|k| expected[*k].shallow_clone()).collect();
    assert!(!close(&wants[0], &wants[1]) && !close(&wants[1], &wants[2]) && !close(&wants[0], &wants[2]));

    tch::set_num_threads(1);
    let slot = Arc::new(ModelSlot::new(ScriptModule::load(d.join("conv_base_script.pt")).unwrap()).unwrap());
    let base = transplant::open(d.join("conv_base.pth")).unwrap();
    let adapters =
        [Adapter::open(&d.join("conv_adapter")).unwrap(), Adapter::open(&d.join("conv2_adapter")).unwrap()];

    // An adapter for another model never goes live.
    let llama = Adapter::open(&d.join("llama_a_adapter")).unwrap();
    let error = slot.swap_adapter(base.as_ref(), Some(&llama)).unwrap_err().to_string();
    assert!(error.contains("lacks"), "{error}");
    assert_eq!(slot.generation(), 0);
    assert!(close(&slot.forward(&[input.shallow_clone()]).unwrap()[0], &wants[0]));

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // base, a, b, mixed
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (slot, stop, counts) = (Arc::clone(&slot), Arc::clone(&stop), Arc::clone(&counts));
            let (input, wants) =
                (input.shallow_clone(), wants.iter().map(Tensor::shallow_clone).collect::<Vec<_>>());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = slot.forward(&[input.shallow_clone()]).unwrap().remove(0);
                    let which = wants.iter().position(|w| close(&out, w)).unwrap_or(3);
                    counts[which].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let order = [Some(0), None, Some(1), Some(0), Some(1), None];
    for round in 0..4 {
        for which in order {
            let swap = slot.swap_adapter(base.as_ref(), which.map(|i| &adapters[i])).unwrap();
            assert_eq!(swap.copied.tensors, 11);
            // Once live, every new request computes that weight set.
            let out = slot.forward(&[input.shallow_clone()]).unwrap().remove(0);
            let want = &wants[which.map_or(0, |i| i + 1)];
            assert!(close(&out, want), "round {round}, adapter {which:?}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let [base_n, a, b, mixed] = [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    assert_eq!(mixed, 0, "responses of no weight set: {mixed} (base {base_n}, a {a}, b {b})");
    assert!(base_n > 0 && a > 0 && b > 0, "base {base_n}, a {a}, b {b}");
    assert_eq!(slot.generation(), 24);
}
