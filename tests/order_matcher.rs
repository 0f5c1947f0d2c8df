//! The order matcher on models made by real PyTorch: modules aligned, tensors
//! paired by leaf, sources that lost their order (safetensors) reconstructed or
//! lent one by `--order-from`, and never a pair across leaves.
use crate::common;

use std::collections::HashMap;

use common::{expected_tensor, fixture, transplant};
use tch::Tensor;
use transplant::{
    copy, Checkpoint, Finding, Format, How, Mapping, Matcher, ModuleStore, NameOrder, OrderUsed, Plan,
    Policy, Source,
};

const STRICT: Policy = Policy { strict: true, allow_lossy_casts: false };

fn order(source_order: Option<NameOrder>) -> Mapping {
    Mapping { matcher: Matcher::Order, source_order, ..Mapping::default() }
}

fn pairs_by_name(plan: &Plan) -> HashMap<String, String> {
    plan.pairs.iter().map(|p| (p.source_name.to_string(), p.target_name.to_string())).collect()
}

fn leaf(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

fn output_of(module: &ModuleStore, expected_file: &str) -> Tensor {
    let input = expected_tensor(expected_file, "input");
    module.module().forward(&[input]).unwrap().remove(0)
}

#[test]
fn a_sequential_network_saved_as_safetensors_goes_whole_into_a_renamed_module() {
    let source = transplant::open(fixture("seq_net.safetensors")).unwrap();
    let mut target = ModuleStore::open(fixture("renamed_seq_net.pt")).unwrap();
    target.module_mut().set_training(false).unwrap();
    let plan = Plan::build(source.as_ref(), &target, &order(None)).unwrap();
    assert!(plan.is_complete(), "{:?}", plan.findings);
    assert_eq!(plan.pairs.len(), source.entries().len());
    assert_eq!(plan.order.as_ref().map(|o| o.source.clone()), Some(OrderUsed::Reconstructed));
    assert!(plan.findings.iter().any(|f| matches!(f, Finding::OrderReconstructed { .. })));
    // Indices past 10 sort before 2 as text; natural order keeps blocks.N <- 0.N.
    for p in &plan.pairs {
        assert_eq!(leaf(&p.source_name), leaf(&p.target_name), "{} <- {}", p.target_name, p.source_name);
        assert_eq!(p.how, How::ReconstructedOrder);
    }
    let names = pairs_by_name(&plan);
    assert_eq!(names["0.11.1.running_var"], "blocks.11.norm.running_var");
    assert_eq!(names["3.weight"], "classifier.weight");
    assert_eq!(plan.modules.len(), 25, "12 conv + 12 BatchNorm + the classifier");

    copy(&plan, source.as_ref(), &mut target, &Policy::default()).unwrap();
    let want = expected_tensor("seq_net.expected.safetensors", "output");
    let got = output_of(&target, "seq_net.expected.safetensors");
    assert!(got.equal(&want), "outputs differ by {}", (&got - &want).abs().max().double_value(&[]));
}

#[test]
fn attribute_named_children_without_their_order_are_left_over_never_swapped() {
    let source = transplant::open(fixture("named_net.safetensors")).unwrap();
    let target = ModuleStore::open(fixture("renamed_named_net.pt")).unwrap();
    let plan = Plan::build(source.as_ref(), &target, &order(None)).unwrap();
    // Registered z_proj, a_proj, norm, head; stored sorted a_proj, head, norm, z_proj.
    let truth = [("z_proj", "first"), ("a_proj", "second"), ("norm", "bn"), ("head", "out")];
    for p in &plan.pairs {
        let (module, leaf_name) = p.source_name.rsplit_once('.').unwrap();
        let true_target = truth.iter().find(|(s, _)| *s == module).unwrap().1;
        assert_eq!(p.target_name, format!("{true_target}.{leaf_name}"), "a wrong pair");
    }
    assert!(!plan.is_complete());
    assert!(!plan.source_leftovers.is_empty());
    let unplaced: Vec<&str> = plan
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::AmbiguousModule { module, .. } => Some(module.as_str()),
            _ => None,
        })
        .collect();
    assert!(unplaced.contains(&"a_proj") && unplaced.contains(&"z_proj"), "{unplaced:?}");
    assert!(plan
        .findings
        .iter()
        .any(|f| matches!(f, Finding::OrderReconstructed { side, .. } if side.to_string() == "source")));

    // The source architecture, scripted, lends its registration order.
    let lender = ModuleStore::open(fixture("named_net.pt")).unwrap();
    let lent = NameOrder::of(&lender).unwrap();
    let plan = Plan::build(source.as_ref(), &target, &order(Some(lent))).unwrap();
    assert!(plan.is_complete(), "{:?}", plan.findings);
    plan.check(&STRICT).unwrap();
    let names = pairs_by_name(&plan);
    assert_eq!(names["z_proj.weight"], "first.weight");
    assert_eq!(names["a_proj.bias"], "second.bias");
    assert!(
        matches!(&plan.order.as_ref().unwrap().source, OrderUsed::From { model } if model.ends_with("named_net.pt"))
    );
}

/// The case of the issue: torchvision's resnet18 as safetensors (names sorted)
/// into a renamed module. Every BatchNorm used to be paired crosswise.
#[test]
fn resnet18_as_safetensors_never_pairs_across_leaves_and_order_from_completes_it() {
    let source = transplant::open(fixture("resnet18.safetensors")).unwrap();
    let scripted = ModuleStore::open(fixture("resnet18.pt")).unwrap();
    let mut target = ModuleStore::open(fixture("renamed_resnet18.pt")).unwrap();
    target.module_mut().set_training(false).unwrap();
    // The trusted correspondence: the scripted source keeps its order.
    let truth = pairs_by_name(&Plan::build(&scripted, &target, &order(None)).unwrap());
    assert_eq!(truth.len(), scripted.entries().len());

    let plan = Plan::build(source.as_ref(), &target, &order(None)).unwrap();
    for p in &plan.pairs {
        assert_eq!(truth[p.source_name.as_str()], p.target_name.as_str(), "a wrong pair");
    }
    assert!(!plan.is_complete(), "named children (conv1, bn1, ...) keep no order once sorted");

    let lent = NameOrder::of(&scripted).unwrap();
    let plan = Plan::build(source.as_ref(), &target, &order(Some(lent))).unwrap();
    assert!(plan.is_complete(), "{:?}", plan.findings);
    assert_eq!(pairs_by_name(&plan), truth);
    assert!(plan.pairs.iter().all(|p| p.how == How::Order));
    copy(&plan, source.as_ref(), &mut target, &STRICT).unwrap();
    let want = expected_tensor("resnet18.expected.safetensors", "output");
    let got = output_of(&target, "resnet18.expected.safetensors");
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "eval outputs differ by {diff}");
}

#[test]
fn plan_json_shows_module_pairs_and_the_reconstructed_order() {
    let run = transplant([
        "plan",
        fixture("seq_net.safetensors").to_str().unwrap(),
        fixture("renamed_seq_net.pt").to_str().unwrap(),
        "--match",
        "order",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json = run.json();
    assert_eq!(json["order_reconstructed"], true);
    assert_eq!(json["order"]["source"]["order"], "reconstructed");
    assert_eq!(json["order"]["target"]["order"], "registration");
    let modules = json["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 25);
    assert_eq!(modules[1]["source"], "0.0.1");
    assert_eq!(modules[1]["target"], "blocks.0.norm");
    assert_eq!(modules[1]["tensors"], 5);
    assert_eq!(modules[1]["how"], "reconstructed_order");
    assert_eq!(json["pairs"].as_array().unwrap().len(), 74);

    // The table shows a line per module pair, marked as resting on a
    // reconstructed order.
    let text = transplant([
        "plan",
        fixture("seq_net.safetensors").to_str().unwrap(),
        fixture("renamed_seq_net.pt").to_str().unwrap(),
        "--match",
        "order",
    ]);
    assert!(text.stdout.contains("module pairs: 25"), "{}", text.stdout);
    assert!(
        text.stdout.contains("blocks.0.norm <- 0.0.1  (order, reconstructed, 5 tensors)"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("order: source reconstructed from names"), "{}", text.stdout);
}

#[test]
fn order_from_must_name_every_source_tensor_and_needs_the_order_matcher() {
    let (src, dst) = (fixture("named_net.safetensors"), fixture("renamed_named_net.pt"));
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", src.to_str().unwrap(), dst.to_str().unwrap()];
        args.extend(extra);
        transplant(args)
    };
    let run = plan(&["--match", "order", "--order-from", dst.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("--order-from") && run.stderr.contains("a_proj.weight"), "{}", run.stderr);
    let run = plan(&["--order-from", fixture("named_net.pt").to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("--match order"), "{}", run.stderr);
    // A file that keeps no order of its own cannot lend one.
    let run = plan(&["--match", "order", "--order-from", src.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no registration order"), "{}", run.stderr);
}

#[test]
fn leftovers_that_differ_by_a_reshape_or_a_name_are_explained() {
    use std::collections::BTreeMap;
    let ckpt = |tensors: &[(&str, &[i64])]| {
        let named = tensors
            .iter()
            .map(|(n, s)| (n.to_string(), Tensor::ones(*s, (tch::Kind::Float, tch::Device::Cpu))))
            .collect();
        Checkpoint::from_tensors("test", Format::Safetensors, named, BTreeMap::new()).unwrap()
    };
    let source = ckpt(&[("features.1.layer_scale", &[96, 1, 1]), ("classifier.0.weight", &[10, 64])]);
    let target = ckpt(&[("stages.0.gamma", &[96]), ("head.fc.weight", &[10, 64])]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let hints: Vec<(String, String, Option<String>)> = plan
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::CouldPair { source, target, rule, .. } => {
                Some((source.clone(), target.clone(), rule.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        hints,
        [
            (
                "features.1.layer_scale".into(),
                "stages.0.gamma".into(),
                Some(r"features\.1\.layer_scale => stages.0.gamma | reshape(-1)".into())
            ),
            (
                "classifier.0.weight".into(),
                "head.fc.weight".into(),
                Some(r"classifier\.0\.weight => head.fc.weight".into())
            ),
        ]
    );
    let text = plan.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    assert!(text.contains("[96, 1, 1]") && text.contains("have the same number of elements"), "{text}");
}

/// #28: torchvision's EfficientNet from safetensors (no registration order)
/// into timm's, with the order matcher alone: names under `features` are
/// numbered indices, and the one open pair at the root (`features`,
/// `classifier`) no longer blocks every module below it. The copy is
/// complete and timm's model computes torchvision's outputs. A family the
/// matcher cannot finish (ConvNeXt's layer scale is `[C, 1, 1]` in one and
/// `[C]` in the other) says what to pass.
#[test]
fn torchvision_efficientnet_from_safetensors_pairs_whole_by_order_alone() {
    let file = "rules/efficientnet.expected.safetensors";
    let source = transplant::open(fixture("rules/efficientnet_torchvision.safetensors")).unwrap();
    let mut target = ModuleStore::open(fixture("rules/efficientnet_timm.pt")).unwrap();
    target.module_mut().set_training(false).unwrap();
    let plan = Plan::build(source.as_ref(), &target, &order(None)).unwrap();
    plan.check(&STRICT).unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.is_complete(), "{:?}", plan.findings);
    assert_eq!(plan.order.as_ref().map(|o| o.source.clone()), Some(OrderUsed::Reconstructed));
    let names = pairs_by_name(&plan);
    assert_eq!(names["classifier.1.weight"], "classifier.weight");
    assert_eq!(names["features.0.1.running_var"], "bn1.running_var");
    copy(&plan, source.as_ref(), &mut target, &STRICT).unwrap();
    let (got, want) = (output_of(&target, file), expected_tensor(file, "output"));
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff <= 1e-4 * want.abs().max().double_value(&[]).max(1.0), "outputs differ by {diff}");

    let plan = transplant(
        [
            "plan",
            fixture("rules/convnext_torchvision.safetensors").to_str().unwrap(),
            fixture("rules/convnext_timm.pt").to_str().unwrap(),
            "--match",
            "order",
        ]
        .as_slice(),
    );
    assert_eq!(plan.code, 3, "{}", plan.stdout);
    assert!(
        plan.stdout.contains("| reshape(") && plan.stdout.contains("--order-from MODEL"),
        "{}",
        plan.stdout
    );
}
