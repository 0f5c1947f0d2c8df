//! A model trained in Rust (tch VarStore) into a TorchScript module exported
//! from PyTorch and back: eval outputs agree after each direction.
use crate::common;

use common::fixture;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use transplant::{copy, Mapping, ModuleStore, Plan, Policy, VarStoreView};

fn network(vs: &nn::VarStore) -> impl ModuleT {
    let root = vs.root();
    nn::seq_t()
        .add(nn::linear(&root / "0", 8, 16, Default::default()))
        .add(nn::batch_norm1d(&root / "1", 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "3", 16, 4, Default::default()))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn varstore_to_script_and_back_agree_in_eval_mode() {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = network(&vs);
    let mut optimizer = nn::Sgd::default().build(&vs, 0.05).unwrap();
    for _ in 0..20 {
        let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
        let loss = net.forward_t(&x, true).pow_tensor_scalar(2).mean(Kind::Float);
        optimizer.backward_step(&loss);
    }
    let x = Tensor::randn([6, 8], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| net.forward_t(&x, false));

    let rust = VarStoreView::new(&vs).unwrap();
    let mut module = ModuleStore::open(fixture("small_mlp.pt")).unwrap();
    module.module_mut().set_training(false).unwrap();
    let before = module.module().forward(&[x.shallow_clone()]).unwrap().remove(0);
    assert!(max_diff(&before, &want) > 1e-3, "the module starts with other weights");
    let there = Plan::build(&rust, &module, &Mapping::default()).unwrap();
    assert!(there.is_complete());
    copy(&there, &rust, &mut module, &Policy { strict: true, allow_lossy_casts: false }).unwrap();
    let got = module.module().forward(&[x.shallow_clone()]).unwrap().remove(0);
    assert!(max_diff(&got, &want) < 1e-5, "VarStore -> TorchScript: {}", max_diff(&got, &want));

    let fresh = nn::VarStore::new(Device::Cpu);
    let fresh_net = network(&fresh);
    let mut view = VarStoreView::new(&fresh).unwrap();
    let back = Plan::build(&module, &view, &Mapping::default()).unwrap();
    copy(&back, &module, &mut view, &Policy::default()).unwrap();
    let again = tch::no_grad(|| fresh_net.forward_t(&x, false));
    assert!(max_diff(&again, &want) < 1e-5, "TorchScript -> VarStore: {}", max_diff(&again, &want));
}
