//! The library's types can be shared where that is sound, and copies on two
//! threads from one shared source give what serial copies give.
use crate::common;

use std::collections::BTreeMap;

use common::{bit_equal, fixture};
use tch::{Device, Tensor};
use transplant::{
    copy, Checkpoint, Format, Mapping, ModelSlot, ModuleStore, Plan, Policy, Report, ScriptModule, Source,
    VarStoreView,
};

fn send_sync<T: Send + Sync>() {}

#[test]
fn shareable_types_are_send_and_sync() {
    send_sync::<Checkpoint>();
    send_sync::<ModuleStore>();
    send_sync::<VarStoreView>();
    send_sync::<ScriptModule>();
    send_sync::<ModelSlot>();
    send_sync::<Plan>();
    send_sync::<Report>();
    send_sync::<Box<dyn Source>>();
}

fn zeros_like(store: &ModuleStore) -> Checkpoint {
    let tensors = store
        .entries()
        .iter()
        .map(|e| {
            (e.name.to_string(), Tensor::zeros(e.shape.as_slice(), (e.dtype.kind().unwrap(), Device::Cpu)))
        })
        .collect();
    Checkpoint::from_tensors("zeros", Format::Safetensors, tensors, BTreeMap::new()).unwrap()
}

#[test]
fn two_threads_copying_from_one_source_match_serial_copies() {
    let source = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    let policy = Policy::default();
    let mut serial = zeros_like(&source);
    let plan = Plan::build(&source, &serial, &Mapping::default()).unwrap();
    copy(&plan, &source, &mut serial, &policy).unwrap();

    let mut targets = [zeros_like(&source), zeros_like(&source)];
    std::thread::scope(|scope| {
        for target in &mut targets {
            let source = &source;
            scope.spawn(move || {
                for _ in 0..20 {
                    let plan = Plan::build(source, &*target, &Mapping::default()).unwrap();
                    copy(&plan, source, &mut *target, &Policy::default()).unwrap();
                }
            });
        }
    });
    for target in &targets {
        for (i, e) in serial.entries().iter().enumerate() {
            assert!(bit_equal(serial.tensor(i).unwrap(), target.tensor(i).unwrap()), "{}", e.name);
        }
    }
}
