//! Mapping and planning on real PyTorch models: each classic case, and every
//! finding the check must make before anything is written.
use crate::common;

use std::collections::BTreeMap;

use common::{expected_tensor, fixture, store_records};
use tch::{Kind, Tensor};
use transplant::{
    copy, Checkpoint, Finding, Format, How, Mapping, Matcher, ModuleStore, Plan, Policy, Rules, Severity,
    Side, Source,
};

fn mapping(matcher: Matcher, rules: &str) -> Mapping {
    Mapping { rules: Rules::parse(rules, "rules.txt").unwrap(), matcher, source_order: None }
}

fn plan(source: &dyn Source, target: &dyn Source, matcher: Matcher, rules: &str) -> Plan {
    Plan::build(source, target, &mapping(matcher, rules)).unwrap()
}

fn pair_names(plan: &Plan) -> Vec<(String, String)> {
    plan.pairs.iter().map(|p| (p.source_name.to_string(), p.target_name.to_string())).collect()
}

fn eval_output(module: &ModuleStore, expected_file: &str) -> Tensor {
    let input = expected_tensor(expected_file, "input");
    module.module().forward(&[input]).unwrap().remove(0)
}

fn module(name: &str) -> ModuleStore {
    let mut m = ModuleStore::open(fixture(name)).unwrap();
    m.module_mut().set_training(false).unwrap();
    m
}

const STRICT: Policy = Policy { strict: true, allow_lossy_casts: false };

#[test]
fn identical_models_pair_everything_exactly_including_nested_buffers() {
    let (source, mut target) = (module("bn_net_a.pt"), module("bn_net_b.pt"));
    let plan = plan(&source, &target, Matcher::Auto, "");
    assert_eq!(plan.pairs.len(), 20);
    assert!(plan.pairs.iter().all(|p| p.how == How::Exact && p.source_name == p.target_name));
    assert!(
        plan.pairs.iter().any(|p| p.target_name == "features.1.0.bn.running_var"),
        "depth-4 buffer paired"
    );
    assert!(plan.is_complete());
    plan.check(&STRICT).unwrap();
    copy(&plan, &source, &mut target, &STRICT).unwrap();
    let want = expected_tensor("bn_net.expected.safetensors", "output_a");
    assert!(eval_output(&target, "bn_net.expected.safetensors").allclose(&want, 1e-5, 1e-6, false));
}

#[test]
fn batchnorm_in_the_source_only_is_left_out_by_the_order_matcher() {
    let (source, mut target) = (module("mlp_bn.pt"), module("mlp.pt"));
    let plan = plan(&source, &target, Matcher::Order, "");
    assert_eq!(
        pair_names(&plan),
        [("0.weight", "0.weight"), ("0.bias", "0.bias"), ("3.weight", "2.weight"), ("3.bias", "2.bias")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let left: Vec<&str> = plan.source_leftovers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(left, ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]);
    assert!(!plan.is_complete(), "the BatchNorm's tensors go nowhere");
    plan.check(&Policy::default()).unwrap();
    assert!(plan.check(&STRICT).is_err(), "strict refuses leftovers");
    copy(&plan, &source, &mut target, &Policy::default()).unwrap();
    let weight = |s: &ModuleStore, name: &str| {
        let i = s.entries().iter().position(|e| e.name == name).unwrap();
        s.tensor(i).unwrap().shallow_clone()
    };
    assert!(weight(&target, "2.weight").equal(&weight(&source, "3.weight")));

    // The auto matcher, by names, cannot see that 3.* became 2.*.
    let by_name = Plan::build(&source, &target, &Mapping::default()).unwrap();
    assert_eq!(by_name.pairs.len(), 2);
}

#[test]
fn wrapper_prefixes_are_stripped_by_the_auto_matcher() {
    let target = module("bn_net_b.pt");
    for file in ["wrapped_module.safetensors", "wrapped_orig_mod.safetensors"] {
        let source = Checkpoint::open(fixture(file)).unwrap();
        let plan = plan(&source, &target, Matcher::Auto, "");
        assert_eq!(plan.pairs.len(), 20, "{file}");
        assert!(plan.pairs.iter().all(|p| p.how == How::Prefix), "{file}");
        assert!(plan.is_complete(), "{file}");
        // Exact names alone pair nothing.
        assert!(Plan::build(&source, &target, &mapping(Matcher::Exact, "")).unwrap().pairs.is_empty());
    }
}

#[test]
fn backbone_renamed_to_encoder_by_a_rule_gives_the_same_outputs() {
    let source = Checkpoint::open(fixture("backbone.safetensors")).unwrap();
    let mut target = module("encoder.pt");
    let plan = plan(&source, &target, Matcher::Auto, "backbone\\.(.*) => encoder.$1\n");
    assert_eq!(plan.pairs.len(), 20);
    assert!(plan.is_complete());
    let by_rule =
        plan.pairs.iter().filter(|p| p.rule.as_deref() == Some("backbone\\.(.*) => encoder.$1")).count();
    assert_eq!(by_rule, 12, "the features' 12 tensors come through the rule");
    copy(&plan, &source, &mut target, &STRICT).unwrap();
    let want = expected_tensor("bn_net.expected.safetensors", "output_a");
    assert!(eval_output(&target, "bn_net.expected.safetensors").allclose(&want, 1e-5, 1e-6, false));
}

#[test]
fn torchvision_resnet18_into_the_same_network_with_other_names() {
    let (source, mut target) = (module("resnet18.pt"), module("renamed_resnet18.pt"));
    let names_shared =
        source.entries().iter().filter(|s| target.entries().iter().any(|t| t.name == s.name)).count();
    assert_eq!(names_shared, 0, "every name differs");
    let plan = plan(&source, &target, Matcher::Order, "");
    assert_eq!(plan.pairs.len(), source.entries().len());
    assert_eq!(plan.pairs.len(), target.entries().len());
    assert!(plan.is_complete());
    assert!(!plan.findings.iter().any(|f| matches!(f, Finding::Ambiguous { .. })), "{:?}", plan.findings);
    plan.check(&STRICT).unwrap();
    copy(&plan, &source, &mut target, &STRICT).unwrap();
    let want = expected_tensor("resnet18.expected.safetensors", "output");
    let got = eval_output(&target, "resnet18.expected.safetensors");
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "eval outputs differ by {diff}");
}

#[test]
fn two_sources_renamed_onto_one_target_is_an_error_naming_both_and_the_rule() {
    let (source, target) = (module("bn_net_a.pt"), module("bn_net_b.pt"));
    let plan = plan(&source, &target, Matcher::Auto, "features\\.0\\.bn\\.(weight|bias) => head.2.bias\n");
    let collision =
        plan.findings.iter().find(|f| matches!(f, Finding::Collision { .. })).expect("a collision");
    let text = collision.to_string();
    assert!(text.contains("features.0.bn.weight") && text.contains("features.0.bn.bias"), "{text}");
    assert!(text.contains("features\\.0\\.bn\\.(weight|bias) => head.2.bias"), "{text}");
    let message = plan.check(&Policy::default()).unwrap_err().to_string();
    assert!(message.contains("collision") && message.contains("nothing was written"), "{message}");
}

#[test]
fn an_unused_rule_is_reported_and_an_error_under_strict() {
    let (source, target) = (module("bn_net_a.pt"), module("bn_net_b.pt"));
    let plan = plan(&source, &target, Matcher::Auto, "# nothing is called this\nnothing\\.(.*) => x.$1\n");
    let unused: Vec<(Severity, String)> = plan
        .problems(&Policy::default())
        .into_iter()
        .filter(|(_, f)| matches!(f, Finding::UnusedRule { .. }))
        .map(|(s, f)| (s, f.to_string()))
        .collect();
    assert_eq!(unused.len(), 1);
    assert_eq!(unused[0].0, Severity::Warning);
    assert!(unused[0].1.contains("rules.txt:2"), "{}", unused[0].1);
    plan.check(&Policy::default()).unwrap();
    assert!(plan.check(&STRICT).unwrap_err().to_string().contains("unused rule"));
}

fn checkpoint(names: &[(&str, &[i64])]) -> Checkpoint {
    let tensors = names
        .iter()
        .map(|(n, s)| (n.to_string(), Tensor::ones(*s, (Kind::Float, tch::Device::Cpu))))
        .collect();
    Checkpoint::from_tensors("test", Format::Safetensors, tensors, BTreeMap::new()).unwrap()
}

#[test]
fn ambiguous_suffixes_are_reported_not_guessed() {
    let source = checkpoint(&[("a.head.weight", &[2]), ("b.head.weight", &[2]), ("trunk.conv.weight", &[3])]);
    let target = checkpoint(&[("head.weight", &[2]), ("conv.weight", &[3])]);
    let plan = plan(&source, &target, Matcher::Auto, "");
    assert_eq!(pair_names(&plan), [("trunk.conv.weight".to_string(), "conv.weight".to_string())]);
    let ambiguous: Vec<&Finding> =
        plan.findings.iter().filter(|f| matches!(f, Finding::Ambiguous { .. })).collect();
    assert_eq!(ambiguous.len(), 2, "{ambiguous:?}");
    assert!(ambiguous[0].to_string().contains("head.weight"));
    assert!(plan.target_leftovers.iter().any(|l| l.name == "head.weight"));
}

#[test]
fn shape_mismatch_is_caught_by_the_check_and_nothing_is_written() {
    let (source, mut target) = (module("mlp_bn.pt"), module("mlp.pt"));
    let before = store_records(&target);
    // 1.weight is [64]; 2.bias is [10]; 0.* pair by name.
    let plan = plan(&source, &target, Matcher::Auto, "1\\.weight => 2.bias\n");
    let mismatch =
        plan.findings.iter().find(|f| matches!(f, Finding::ShapeMismatch { .. })).expect("mismatch");
    assert!(mismatch.to_string().contains("[64]") && mismatch.to_string().contains("[10]"), "{mismatch}");
    let error = copy(&plan, &source, &mut target, &Policy::default()).unwrap_err().to_string();
    assert!(error.contains("shape mismatch") && error.contains("nothing was written"), "{error}");
    assert_eq!(store_records(&target), before, "the target changed");
}

#[test]
fn lossy_casts_are_refused_unless_allowed() {
    let source = checkpoint(&[("w", &[3])]);
    let mut target = Checkpoint::from_tensors(
        "int target",
        Format::Safetensors,
        vec![("w".into(), Tensor::zeros([3], (Kind::Int64, tch::Device::Cpu)))],
        BTreeMap::new(),
    )
    .unwrap();
    let plan_ = plan(&source, &target, Matcher::Exact, "");
    assert!(plan_.pairs[0].cast.as_ref().unwrap().lossy.is_some());
    assert!(plan_.check(&Policy::default()).unwrap_err().to_string().contains("lossy cast"));
    copy(&plan_, &source, &mut target, &Policy { strict: false, allow_lossy_casts: true }).unwrap();
    // f32 -> f16 within range is a plain cast; out of range is lossy.
    target = Checkpoint::from_tensors(
        "half",
        Format::Safetensors,
        vec![("w".into(), Tensor::zeros([3], (Kind::Half, tch::Device::Cpu)))],
        BTreeMap::new(),
    )
    .unwrap();
    let fits = plan(&source, &target, Matcher::Exact, "");
    assert!(fits.pairs[0].cast.as_ref().unwrap().lossy.is_none());
    let big = Checkpoint::from_tensors(
        "big",
        Format::Safetensors,
        vec![("w".into(), Tensor::full([3], 1e6, (Kind::Float, tch::Device::Cpu)))],
        BTreeMap::new(),
    )
    .unwrap();
    // The plan reads no values; the copy checks them before writing anything.
    let overflow = plan(&big, &target, Matcher::Exact, "");
    assert!(overflow.pairs[0].cast.as_ref().unwrap().lossy.is_none());
    let refused = copy(&overflow, &big, &mut target, &Policy::default()).unwrap_err().to_string();
    assert!(refused.contains("do not fit float16") && refused.contains("nothing was written"), "{refused}");
    assert_eq!(target.tensor(0).unwrap().abs().sum(Kind::Double).double_value(&[]), 0.0, "written");
    copy(&overflow, &big, &mut target, &Policy { strict: false, allow_lossy_casts: true }).unwrap();
}

#[test]
fn batchnorm_copied_without_its_statistics_is_a_warning() {
    let (source, target) = (module("bn_net_a.pt"), module("bn_net_b.pt"));
    let plan = plan(&source, &target, Matcher::Auto, "skip features\\.0\\.bn\\.running_.*\n");
    let partial =
        plan.findings.iter().find(|f| matches!(f, Finding::PartialBatchNorm { .. })).expect("partial BN");
    let text = partial.to_string();
    assert!(text.contains("features.0.bn") && text.contains("running_mean"), "{text}");
    assert_eq!(partial.severity(&Policy::default()), Severity::Warning);
    assert_eq!(partial.severity(&STRICT), Severity::Error);
}

#[test]
fn num_batches_tracked_missing_on_one_side_is_a_harmless_named_case() {
    let target = module("bn_net_b.pt");
    let full = Checkpoint::open(fixture("sharded/model.safetensors.index.json")).unwrap();
    let without: Vec<(String, Tensor)> =
        full.named_tensors().into_iter().filter(|(n, _)| !n.ends_with("num_batches_tracked")).collect();
    let source =
        Checkpoint::from_tensors("no counters", Format::Safetensors, without, BTreeMap::new()).unwrap();
    let plan = plan(&source, &target, Matcher::Auto, "");
    let notes: Vec<&Finding> = plan
        .findings
        .iter()
        .filter(|f| matches!(f, Finding::NumBatchesTracked { side: Side::Target, .. }))
        .collect();
    assert_eq!(notes.len(), 3);
    assert!(notes.iter().all(|f| f.severity(&STRICT) == Severity::Note));
    assert!(plan.is_complete(), "missing counters do not make a transfer incomplete");
    plan.check(&STRICT).unwrap();
}

#[test]
fn a_saved_plan_replays_without_rules_and_refuses_changed_models() {
    let dir = tempfile::tempdir().unwrap();
    let source = Checkpoint::open(fixture("backbone.safetensors")).unwrap();
    let mut target = module("encoder.pt");
    let made = plan(&source, &target, Matcher::Auto, "backbone\\.(.*) => encoder.$1\n");
    let path = dir.path().join("plan.json");
    let other = module("bn_net_b.pt");
    let refused = made.save(&path, &source, &other).unwrap_err().to_string();
    assert!(refused.contains("not the stores this plan was made for"), "{refused}");
    assert!(!path.exists());
    made.save(&path, &source, &target).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(json["pairs"].as_array().unwrap().len(), 20);
    assert!(json["pairs"][0]["provenance"].is_string());
    assert_eq!(json["target_digest"], transplant::PlanFile::digest(target.entries()).as_str());

    let replayed = Plan::replay(&path, &source, &target).unwrap();
    assert_eq!(pair_names(&replayed), pair_names(&made));
    assert!(replayed.pairs.iter().all(|p| p.how == How::Plan));
    copy(&replayed, &source, &mut target, &STRICT).unwrap();

    let message = Plan::replay(&path, &source, &other).unwrap_err().to_string();
    assert!(message.contains("changed") && message.contains("target"), "{message}");
}

#[test]
fn a_plan_refuses_to_run_on_other_stores() {
    let (source, target) = (module("bn_net_a.pt"), module("bn_net_b.pt"));
    let plan = plan(&source, &target, Matcher::Auto, "");
    let mut other = transplant::open(fixture("mlp.pt")).unwrap();
    assert!(copy(&plan, &source, other.as_mut(), &Policy::default()).is_err());
}

#[test]
fn counters_left_over_on_both_sides_are_not_explained_away() {
    let source = Checkpoint::open(fixture("demo/state_dict.pth")).unwrap();
    let target = module("demo/renamed_module.pt");
    let by_name = plan(&source, &target, Matcher::Auto, "");
    assert!(by_name.pairs.is_empty());
    let nbt = by_name.source_leftovers.iter().find(|l| l.name.ends_with("num_batches_tracked")).unwrap();
    assert!(nbt.explained.is_none(), "the target has counters left over too: they should pair");
    assert!(!by_name.findings.iter().any(|f| matches!(f, Finding::NumBatchesTracked { .. })));
}

#[test]
fn a_report_names_each_unmatched_num_batches_tracked_once() {
    // tch's batch_norm has no num_batches_tracked: the source's are left over, explained.
    let mut source_tensors = vec![("bn.weight", &[4i64][..]), ("bn.bias", &[4]), ("bn.running_mean", &[4])];
    source_tensors.push(("bn.running_var", &[4]));
    let source = checkpoint(&source_tensors);
    let mut with_nbt: Vec<(String, Tensor)> = source_tensors
        .iter()
        .map(|(n, s)| (n.to_string(), Tensor::ones(*s, (Kind::Float, tch::Device::Cpu))))
        .collect();
    with_nbt.push(("bn.num_batches_tracked".into(), Tensor::from(7i64)));
    let source_nbt = Checkpoint::from_tensors("nbt", Format::Safetensors, with_nbt, BTreeMap::new()).unwrap();
    let plan = plan(&source_nbt, &source, Matcher::Exact, "");
    let report = transplant::Report::new(&plan, &Policy::default(), None);
    let text = report.to_string();
    assert_eq!(text.matches("bn.num_batches_tracked").count(), 1, "{text}");
    assert!(text.contains("harmless"), "{text}");
    let json = serde_json::to_string(&report).unwrap();
    assert_eq!(json.matches("\"bn.num_batches_tracked\"").count(), 1, "{json}");
}
