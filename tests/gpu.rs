//! Copies that involve a GPU. They run where `tch::Cuda::is_available()`; on a
//! machine without one each test says so and passes, unless
//! TRANSPLANT_REQUIRE_CUDA=1 (as scripts/gpu_check.sh sets), which makes a
//! missing GPU a failure.
use crate::common;

use std::collections::BTreeMap;

use common::{bit_equal, fixture};
use tch::{Device, Kind, Tensor};
use transplant::{copy, Checkpoint, Format, Mapping, ModuleStore, Plan, Policy, Source};

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        return Some(Device::Cuda(0));
    }
    assert!(
        std::env::var_os("TRANSPLANT_REQUIRE_CUDA").is_none(),
        "TRANSPLANT_REQUIRE_CUDA is set but CUDA is not available"
    );
    eprintln!("no CUDA device: skipped");
    None
}

fn store(device: Device, kind: Kind, fill: Option<f64>) -> Checkpoint {
    tch::manual_seed(3);
    let tensors = [("a.weight", vec![64, 32]), ("a.bias", vec![64]), ("bn.running_var", vec![64])]
        .into_iter()
        .map(|(n, shape)| {
            let t = match fill {
                Some(v) => Tensor::full(shape.as_slice(), v, (kind, device)),
                None => Tensor::randn(shape.as_slice(), (Kind::Float, device)).to_kind(kind),
            };
            (n.to_string(), t)
        })
        .chain([("bn.num_batches_tracked".to_string(), Tensor::from(9i64).to_device(device))])
        .collect();
    Checkpoint::from_tensors(format!("{device:?}"), Format::Safetensors, tensors, BTreeMap::new()).unwrap()
}

fn transfer(source: &Checkpoint, target: &mut Checkpoint) {
    let plan = Plan::build(source, &*target, &Mapping::default()).unwrap();
    let copied = copy(&plan, source, &mut *target, &Policy::default()).unwrap();
    assert_eq!(copied.tensors, 4);
    for (i, e) in target.entries().iter().enumerate() {
        let got = target.tensor(i).unwrap();
        assert_eq!(got.device(), e.device, "{} moved", e.name);
        let want = source.tensor(i).unwrap().to_device(got.device()).to_kind(got.kind());
        assert!(bit_equal(got, &want), "{}", e.name);
    }
}

#[test]
fn cpu_to_gpu() {
    let Some(gpu) = cuda() else { return };
    transfer(&store(Device::Cpu, Kind::Float, None), &mut store(gpu, Kind::Float, Some(0.0)));
}

#[test]
fn gpu_to_gpu() {
    let Some(gpu) = cuda() else { return };
    transfer(&store(gpu, Kind::Float, None), &mut store(gpu, Kind::Float, Some(0.0)));
}

#[test]
fn gpu_to_cpu() {
    let Some(gpu) = cuda() else { return };
    transfer(&store(gpu, Kind::Float, None), &mut store(Device::Cpu, Kind::Float, Some(0.0)));
}

#[test]
fn cpu_float_into_gpu_bfloat16() {
    let Some(gpu) = cuda() else { return };
    transfer(&store(Device::Cpu, Kind::Float, None), &mut store(gpu, Kind::BFloat16, Some(0.0)));
}

#[test]
fn module_on_the_gpu_takes_a_cpu_module_state() {
    let Some(gpu) = cuda() else { return };
    let source = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    let mut target = ModuleStore::open_on(fixture("bn_net_b.pt"), gpu).unwrap();
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    let input = common::expected_tensor("bn_net.expected.safetensors", "input").to_device(gpu);
    let mut module = target.into_module();
    module.set_training(false).unwrap();
    let got = module.forward(&[input]).unwrap().remove(0).to_device(Device::Cpu);
    let want = common::expected_tensor("bn_net.expected.safetensors", "output_a");
    assert!(got.allclose(&want, 1e-4, 1e-5, false));
}

/// Transforms on a GPU: a transposed CPU source into a GPU target (staged
/// through pinned memory), a split of a GPU source, and a cat into slices of a
/// GPU target; each verified against the transformed source.
#[test]
fn transforms_copy_into_and_on_the_gpu() {
    let Some(gpu) = cuda() else { return };
    tch::manual_seed(5);
    let (w, qkv, a, b) = (
        Tensor::randn([48, 32], (Kind::Float, Device::Cpu)),
        Tensor::randn([96, 16], (Kind::Float, gpu)),
        Tensor::randn([16, 8], (Kind::Float, gpu)),
        Tensor::randn([16, 24], (Kind::Float, Device::Cpu)),
    );
    let source = Checkpoint::from_tensors(
        "mixed",
        Format::Safetensors,
        vec![
            ("w".into(), w.shallow_clone()),
            ("qkv".into(), qkv.shallow_clone()),
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ],
        BTreeMap::new(),
    )
    .unwrap();
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, gpu));
    let mut target = Checkpoint::from_tensors(
        "gpu",
        Format::Safetensors,
        vec![
            ("wt".into(), zeros(&[32, 48])),
            ("q".into(), zeros(&[32, 16])),
            ("k".into(), zeros(&[32, 16])),
            ("v".into(), zeros(&[32, 16])),
            ("ab".into(), zeros(&[16, 32])),
        ],
        BTreeMap::new(),
    )
    .unwrap();
    let rules = "w => wt | transpose(0, 1)\nqkv => q, k, v | split(0)\na + b => ab | cat(1)\n";
    let mapping = Mapping { rules: transplant::Rules::parse(rules, "rules").unwrap(), ..Mapping::default() };
    let plan = Plan::build(&source, &target, &mapping).unwrap();
    assert!(plan.is_complete(), "{:?}", plan.findings);
    copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    let get = |name: &str| {
        let i = target.entries().iter().position(|e| e.name == name).unwrap();
        target.tensor(i).unwrap().to_device(Device::Cpu)
    };
    assert!(get("wt").equal(&w.transpose(0, 1)));
    assert!(get("k").equal(&qkv.narrow(0, 32, 32).to_device(Device::Cpu)));
    assert!(get("ab").equal(&Tensor::cat(&[a.to_device(Device::Cpu), b], 1)));
}

/// Live sync into a model served on the GPU, over Gloo: the buckets arrive in
/// host memory and are copied into the standby model on the device.
#[test]
fn a_sync_goes_live_in_a_model_served_on_the_gpu() {
    use std::time::Duration;
    use transplant::sync::{Endpoint, Receiver, Sender, SyncOptions};
    use transplant::{Matcher, ModelSlot, Rules, ScriptModule};
    let Some(device) = cuda() else { return };
    let slot =
        ModelSlot::new(ScriptModule::load_on(fixture("transforms/fused_attn.pt"), device).unwrap()).unwrap();
    let rules =
        "q_proj\\.(weight|bias) + k_proj\\.(weight|bias) + v_proj\\.(weight|bias) => qkv.$1 | cat(0)\n\
                 o_proj\\.(.*) => proj.$1\n";
    let mapping =
        Mapping { rules: Rules::parse(rules, "rules").unwrap(), matcher: Matcher::Exact, source_order: None };
    let options =
        SyncOptions { timeout: Duration::from_secs(30), bucket_bytes: 256, ..SyncOptions::default() };
    let endpoint = Endpoint { host: "127.0.0.1".into(), port: 0, serve_store: true, channel: "gpu".into() };
    let mut receiver =
        Receiver::connect(&endpoint, 1, 1, mapping, Policy::default(), options.clone()).unwrap();
    let endpoint =
        Endpoint { channel: "gpu".into(), ..Endpoint::new("127.0.0.1", receiver.store_port().unwrap()) };
    let source = transplant::open(fixture("transforms/split_attn.pt")).unwrap();
    std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| Sender::connect(&endpoint, 1, source.as_ref(), options.clone())?.sync(source.as_ref()));
        let mut received = None;
        for _ in 0..100 {
            if let Some(r) = receiver.receive(&slot, Duration::from_millis(300)).unwrap() {
                received = Some(r);
                break;
            }
        }
        assert_eq!(received.expect("a sync").swap.expect("went live").generation, 1);
        sender.join().unwrap().unwrap();
    });
    let live = slot.current().unwrap().named_tensors().unwrap();
    let qkv = &live.iter().find(|n| n.name == "qkv.weight").unwrap().tensor;
    assert_eq!(qkv.device(), device, "the model stays on the GPU");
    let part = |name: &str| {
        let i = source.entries().iter().position(|e| e.name.as_str() == name).unwrap();
        source.tensor(i).unwrap().shallow_clone()
    };
    let expected = Tensor::cat(&[part("q_proj.weight"), part("k_proj.weight"), part("v_proj.weight")], 0);
    assert!(bit_equal(&qkv.to_device(Device::Cpu), &expected));
}
