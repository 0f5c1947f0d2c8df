//! Copies that involve a GPU. They run where `tch::Cuda::is_available()`; on a
//! machine without one each test says so and passes, unless
//! TRANSPLANT_REQUIRE_CUDA=1 (as scripts/gpu_check.sh sets), which makes a
//! missing GPU a failure.
mod common;

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
