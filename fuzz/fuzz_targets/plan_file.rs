//! Replaying a plan file of arbitrary bytes on two small models: an error or a
//! plan, never a panic.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tch::{Device, Kind, Tensor};
use transplant::{Checkpoint, Format, Plan};

fn model(names: &[&str]) -> Checkpoint {
    let tensors = names.iter().map(|n| (n.to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu)))).collect();
    Checkpoint::from_tensors("fuzz", Format::Safetensors, tensors, BTreeMap::new()).expect("model")
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("plan.json");
    std::fs::write(&path, data).expect("write");
    let (source, target) = (model(&["a.weight", "a.bias"]), model(&["b.weight", "b.bias"]));
    let _ = Plan::replay(&path, &source, &target);
});
