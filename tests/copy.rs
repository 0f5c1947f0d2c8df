//! The copy engine: in place, converted, verified, and the report of it.
use crate::common;

use std::collections::BTreeMap;

use common::{bit_equal, fixture};
use tch::{Device, Kind, Tensor};
use transplant::{
    copy, copy_with, verify, Checkpoint, CopyOptions, Format, Mapping, ModuleStore, Plan, Policy, Progress,
    Report, Source,
};

fn checkpoint(tensors: Vec<(&str, Tensor)>) -> Checkpoint {
    let tensors = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    Checkpoint::from_tensors("memory", Format::Safetensors, tensors, BTreeMap::new()).unwrap()
}

fn tensor_of<'a>(store: &'a dyn Source, name: &str) -> &'a Tensor {
    let index = store.entries().iter().position(|e| e.name == name).unwrap();
    store.tensor(index).unwrap()
}

fn grad_mode_on() -> bool {
    let x = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&x * 2.0).requires_grad()
}

#[test]
fn copies_in_place_without_reallocating_the_module_tensors() {
    let source = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    let mut target = ModuleStore::open(fixture("bn_net_b.pt")).unwrap();
    let before: Vec<usize> =
        (0..target.entries().len()).map(|i| target.tensor(i).unwrap().data_ptr() as usize).collect();
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let copied = copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    assert_eq!(copied.tensors, 20);
    assert!(copied.verified);
    let after: Vec<usize> =
        (0..target.entries().len()).map(|i| target.tensor(i).unwrap().data_ptr() as usize).collect();
    assert_eq!(before, after, "a tensor was reallocated");
    for e in source.entries() {
        assert!(bit_equal(tensor_of(&source, &e.name), tensor_of(&target, &e.name)), "{}", e.name);
    }
    // The module itself sees the new values (not a copy of its tensors).
    let fresh = target.module().named_tensors().unwrap();
    let mean = fresh.iter().find(|n| n.name == "features.1.0.bn.running_mean").unwrap();
    assert!(bit_equal(&mean.tensor, tensor_of(&source, "features.1.0.bn.running_mean")));
}

#[test]
fn grad_mode_is_restored_after_a_copy_and_after_a_refused_one() {
    let source = checkpoint(vec![("w", Tensor::ones([3], (Kind::Float, Device::Cpu)))]);
    let mut target = checkpoint(vec![("w", Tensor::zeros([3], (Kind::Float, Device::Cpu)))]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    assert!(grad_mode_on());
    let mut wrong = checkpoint(vec![("w", Tensor::zeros([4], (Kind::Float, Device::Cpu)))]);
    let bad = Plan::build(&source, &wrong, &Mapping::default()).unwrap();
    assert!(copy(&bad, &source, &mut wrong, &Policy::default()).is_err());
    assert!(grad_mode_on());
}

#[test]
fn dtypes_are_converted_to_the_targets_and_integers_stay_integers() {
    let values = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
    let source = checkpoint(vec![
        ("w", values.shallow_clone()),
        ("bn.num_batches_tracked", Tensor::from(123i64)),
        ("ids", Tensor::from_slice(&[1i64, -2, 3])),
    ]);
    let mut target = checkpoint(vec![
        ("w", Tensor::zeros([4, 5], (Kind::Half, Device::Cpu))),
        ("bn.num_batches_tracked", Tensor::from(0i64)),
        ("ids", Tensor::zeros([3], (Kind::Int, Device::Cpu))),
    ]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let copied = copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    assert_eq!(copied.casts, 2);
    assert_eq!(tensor_of(&target, "w").kind(), Kind::Half);
    assert!(bit_equal(tensor_of(&target, "w"), &values.to_kind(Kind::Half)));
    let counter = tensor_of(&target, "bn.num_batches_tracked");
    assert_eq!((counter.kind(), counter.int64_value(&[])), (Kind::Int64, 123));
    assert_eq!(tensor_of(&target, "ids").kind(), Kind::Int);
    assert_eq!(Vec::<i32>::try_from(tensor_of(&target, "ids")).unwrap(), vec![1, -2, 3]);
}

#[test]
fn non_contiguous_sources_and_targets_copy_correctly() {
    let base = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]);
    let source = checkpoint(vec![("w", base.tr())]);
    let holder = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
    let mut target = checkpoint(vec![("w", holder.tr())]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    assert!(bit_equal(&holder, &base), "the transposed target view got the transposed values");
}

#[test]
fn large_copies_go_in_several_batches_and_stay_exact() {
    let opts = (Kind::Float, Device::Cpu);
    let big: Vec<(&str, Tensor)> =
        ["a", "b", "c"].into_iter().map(|n| (n, Tensor::randn([8 << 20], opts))).collect();
    let source = checkpoint(big.iter().map(|(n, t)| (*n, t.shallow_clone())).collect());
    let mut target =
        checkpoint(["a", "b", "c"].into_iter().map(|n| (n, Tensor::zeros([8 << 20], opts))).collect());
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let copied = copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    assert_eq!(copied.bytes, 3 * (32 << 20));
    for (name, t) in &big {
        assert!(bit_equal(tensor_of(&target, name), t), "{name}");
    }
}

#[test]
fn verification_names_a_tensor_that_differs() {
    let source = checkpoint(vec![
        ("a", Tensor::ones([3], (Kind::Float, Device::Cpu))),
        ("b", Tensor::ones([2, 2], (Kind::Float, Device::Cpu))),
    ]);
    let mut target = checkpoint(vec![
        ("a", Tensor::zeros([3], (Kind::Float, Device::Cpu))),
        ("b", Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))),
    ]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    copy_with(&plan, &source, &mut target, &Policy::default(), CopyOptions { verify: false, progress: None })
        .unwrap();
    verify(&plan, &source, &target).unwrap();
    let _ = tensor_of(&target, "b").shallow_clone().fill_(5.0);
    let message = verify(&plan, &source, &target).unwrap_err().to_string();
    assert!(message.contains("target b") && message.contains("source b"), "{message}");
    // NaN compares equal to the same NaN, bit for bit.
    let nan = checkpoint(vec![("a", Tensor::full([2], f64::NAN, (Kind::Float, Device::Cpu)))]);
    let mut holder = checkpoint(vec![("a", Tensor::zeros([2], (Kind::Float, Device::Cpu)))]);
    let plan = Plan::build(&nan, &holder, &Mapping::default()).unwrap();
    copy(&plan, &nan, &mut holder, &Policy::default()).unwrap();
}

#[test]
fn the_report_is_a_table_for_people_and_json_for_programs() {
    let source = ModuleStore::open(fixture("mlp_bn.pt")).unwrap();
    let target = ModuleStore::open(fixture("mlp.pt")).unwrap();
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let report = Report::new(&plan, &Policy::default(), None);
    assert!(!report.is_complete());
    let text = report.to_string();
    assert!(text.contains("pairs: 2"), "{text}");
    assert!(text.contains("left over in the source"), "{text}");
    assert!(text.contains("3.weight (did you mean 2.weight?)"), "{text}");
    assert!(text.contains("verdict: incomplete"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["complete"], false);
    assert_eq!(json["pairs"].as_array().unwrap().len(), 2);
    assert_eq!(json["pairs"][0]["provenance"], "exact");
    assert!(json["problems"].as_array().unwrap().iter().any(|p| p["finding"]["kind"] == "leftover"));

    let opts = (Kind::Float, Device::Cpu);
    let many: Vec<(String, Tensor)> =
        (0..40).map(|i| (format!("layer{i}.weight"), Tensor::ones([1], opts))).collect();
    let source = Checkpoint::from_tensors("many", Format::Safetensors, many, BTreeMap::new()).unwrap();
    let target_tensors = (0..40).map(|i| (format!("layer{i}.weight"), Tensor::zeros([1], opts))).collect();
    let mut target =
        Checkpoint::from_tensors("many", Format::Safetensors, target_tensors, BTreeMap::new()).unwrap();
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let copied = copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    let text = Report::new(&plan, &Policy::default(), Some(copied)).to_string();
    assert!(text.contains("… and 28 more"), "{text}");
    assert!(text.contains("verified bit for bit") && text.contains("verdict: complete"), "{text}");
}

/// Many small pairs, so that the copy and the verification split them across threads.
fn many(n: usize, value: f64) -> Checkpoint {
    let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    checkpoint(
        names
            .iter()
            .map(|name| (name.as_str(), Tensor::full([4], value, (Kind::Float, Device::Cpu))))
            .collect(),
    )
}

#[test]
fn a_target_reshaped_after_planning_is_refused_before_any_pair_is_written() {
    let (source, mut target) = (many(20_000, 1.0), many(20_000, 0.0));
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    // Someone changes the live target between the plan and the copy.
    for name in ["t17000", "t12345"] {
        let _ = tensor_of(&target, name).shallow_clone().resize_([2, 2]);
    }
    let message = copy(&plan, &source, &mut target, &Policy::default()).unwrap_err().to_string();
    assert!(message.contains("t12345") && message.contains("nothing was written"), "{message}");
    for i in 0..target.entries().len() {
        let sum = target.tensor(i).unwrap().abs().sum(Kind::Double).double_value(&[]);
        assert_eq!(sum, 0.0, "{} was written", target.entries()[i].name);
    }
}

#[test]
fn verification_names_the_first_of_many_pairs_that_differ() {
    let (source, mut target) = (many(20_000, 1.0), many(20_000, 0.0));
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let quiet = CopyOptions { verify: false, progress: None };
    copy_with(&plan, &source, &mut target, &Policy::default(), quiet).unwrap();
    for name in ["t19999", "t15000"] {
        let _ = tensor_of(&target, name).shallow_clone().fill_(3.0);
    }
    let message = verify(&plan, &source, &target).unwrap_err().to_string();
    assert!(message.contains("target t15000"), "{message}");
}

/// Three 32 MB tensors of ones, and of zeros: two copy batches (64 MB, then 32 MB).
fn three_by_32_mb() -> (Checkpoint, Checkpoint) {
    let opts = (Kind::Float, Device::Cpu);
    let filled = |f: fn([i64; 1], (Kind, Device)) -> Tensor| {
        checkpoint(["a", "b", "c"].into_iter().map(|n| (n, f([8 << 20], opts))).collect())
    };
    (filled(Tensor::ones), filled(Tensor::zeros))
}

#[test]
fn a_reshaped_target_in_a_later_batch_stops_the_earlier_batches_too() {
    // 3 × 32 MB: the first two pairs fill one 64 MB batch, the third goes in another.
    let (source, mut target) = three_by_32_mb();
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let _ = tensor_of(&target, "c").shallow_clone().resize_([2, 4 << 20]);
    let message = copy(&plan, &source, &mut target, &Policy::default()).unwrap_err().to_string();
    // The error names the target store and the tensor.
    assert!(message.starts_with("copying into memory, tensor c, failed: shape mismatch"), "{message}");
    assert!(message.contains("nothing was written"), "{message}");
    for name in ["a", "b"] {
        assert_eq!(
            tensor_of(&target, name).abs().sum(Kind::Double).double_value(&[]),
            0.0,
            "{name} was written"
        );
    }
}

fn floats(values: &[f32]) -> Tensor {
    Tensor::from_slice(values)
}

#[test]
fn tied_targets_that_would_receive_different_values_are_refused_before_writing() {
    // One target tensor under two names, as tied weights are.
    let tied = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let mut target =
        checkpoint(vec![("emb.weight", tied.shallow_clone()), ("head.weight", tied.shallow_clone())]);
    let differing = checkpoint(vec![("emb.weight", floats(&[1.0; 4])), ("head.weight", floats(&[2.0; 4]))]);
    let plan = Plan::build(&differing, &target, &Mapping::default()).unwrap();
    let message = copy(&plan, &differing, &mut target, &Policy::default()).unwrap_err().to_string();
    assert!(
        message.contains("emb.weight and head.weight share memory")
            && message.contains("nothing was written"),
        "{message}"
    );
    assert_eq!(tied.abs().sum(Kind::Double).double_value(&[]), 0.0, "the tied tensor was written");

    // Equal values, or one source tensor under both names (tied in the source
    // too): nothing to refuse.
    let equal = checkpoint(vec![("emb.weight", floats(&[3.0; 4])), ("head.weight", floats(&[3.0; 4]))]);
    let shared = floats(&[4.0; 4]);
    let tied_source =
        checkpoint(vec![("emb.weight", shared.shallow_clone()), ("head.weight", shared.shallow_clone())]);
    for (source, value) in [(&equal, 3.0), (&tied_source, 4.0)] {
        let plan = Plan::build(source, &target, &Mapping::default()).unwrap();
        copy(&plan, source, &mut target, &Policy::default()).unwrap();
        assert!(bit_equal(&tied, &floats(&[value; 4])));
    }
}

#[test]
fn overlapping_target_views_are_refused_only_where_their_values_disagree() {
    let base = Tensor::zeros([6], (Kind::Float, Device::Cpu));
    let mut target = checkpoint(vec![("a", base.narrow(0, 0, 4)), ("b", base.narrow(0, 2, 4))]);
    // base[2..4] is a[2..4] and b[0..2]: both sources say 1 there.
    let agree = checkpoint(vec![("a", floats(&[1.0, 1.0, 1.0, 1.0])), ("b", floats(&[1.0, 1.0, 2.0, 2.0]))]);
    let plan = Plan::build(&agree, &target, &Mapping::default()).unwrap();
    copy(&plan, &agree, &mut target, &Policy::default()).unwrap();
    assert!(bit_equal(&base, &floats(&[1.0, 1.0, 1.0, 1.0, 2.0, 2.0])));

    let disagree =
        checkpoint(vec![("a", floats(&[5.0, 5.0, 5.0, 5.0])), ("b", floats(&[6.0, 5.0, 7.0, 7.0]))]);
    let plan = Plan::build(&disagree, &target, &Mapping::default()).unwrap();
    let message = copy(&plan, &disagree, &mut target, &Policy::default()).unwrap_err().to_string();
    assert!(message.contains("a and b share memory"), "{message}");
    assert!(bit_equal(&base, &floats(&[1.0, 1.0, 1.0, 1.0, 2.0, 2.0])), "the target was written");
}

#[test]
fn progress_is_reported_to_an_observer_batch_by_batch() {
    use std::sync::Mutex;
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);
    impl Progress for Log {
        fn start(&self, bytes: u64) {
            self.0.lock().unwrap().push(format!("start {bytes}"));
        }
        fn advance(&self, bytes: u64) {
            self.0.lock().unwrap().push(format!("advance {bytes}"));
        }
        fn finish(&self) {
            self.0.lock().unwrap().push("finish".into());
        }
    }
    // 3 × 32 MB: two batches (64 MB, then 32 MB).
    let (source, mut target) = three_by_32_mb();
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let log = Log::default();
    let options = CopyOptions { verify: true, progress: Some(&log) };
    let copied = copy_with(&plan, &source, &mut target, &Policy::default(), options).unwrap();
    assert_eq!(copied.bytes, 3 * (32 << 20));
    let mb32 = 32u64 << 20;
    assert_eq!(
        *log.0.lock().unwrap(),
        [
            format!("start {}", 3 * mb32),
            format!("advance {}", 2 * mb32),
            format!("advance {mb32}"),
            "finish".into()
        ]
    );
}
