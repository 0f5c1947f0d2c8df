//! The rule files that ship in `rules/`: each moves a torchvision model into
//! timm's model of the same family (built by `scripts/make_fixtures.py`, random
//! weights, BatchNorm statistics from training batches); the plan is complete
//! under `--strict`, and timm's model then computes what torchvision's did.
use crate::common;

use std::path::PathBuf;

use common::{expected_tensor, fixture, transplant};
use tch::Tensor;
use transplant::{copy, Mapping, Matcher, ModuleStore, Plan, Policy, Rules, Source};

const STRICT: Policy = Policy { strict: true, allow_lossy_casts: false };

fn rules_file(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("rules/torchvision_to_timm/{family}.rules"))
}

fn output(module: &ModuleStore, family: &str) -> Tensor {
    let input = expected_tensor(&format!("rules/{family}.expected.safetensors"), "input");
    module.module().forward(&[input]).unwrap().remove(0)
}

/// Equal within float tolerance: the two libraries compute the same function
/// in different orders of operations.
fn assert_close(got: &Tensor, want: &Tensor, family: &str) {
    assert_eq!(got.size(), want.size(), "{family}");
    let diff = (got - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(diff <= 1e-4 * scale, "{family}: outputs differ by {diff} (scale {scale})");
}

fn transfer(family: &str) {
    let source = transplant::open(fixture(&format!("rules/{family}_torchvision.safetensors"))).unwrap();
    let mut target = ModuleStore::open(fixture(&format!("rules/{family}_timm.pt"))).unwrap();
    target.module_mut().set_training(false).unwrap();
    let want = expected_tensor(&format!("rules/{family}.expected.safetensors"), "output");
    let before = output(&target, family);
    assert!(
        (&before - &want).abs().max().double_value(&[]) > 1e-3,
        "{family}: the models agree before the copy"
    );
    let mapping = Mapping {
        rules: Rules::from_file(&rules_file(family)).unwrap(),
        matcher: Matcher::Exact,
        source_order: None,
    };
    let plan = Plan::build(source.as_ref(), &target, &mapping).unwrap();
    plan.check(&STRICT).unwrap_or_else(|e| panic!("{family}: {e}"));
    assert!(plan.is_complete(), "{family}: {:?}", plan.findings);
    assert_eq!(plan.pairs.len(), target.entries().len(), "{family}");
    copy(&plan, source.as_ref(), &mut target, &STRICT).unwrap();
    assert_close(&output(&target, family), &want, family);
}

#[test]
fn convnext() {
    transfer("convnext");
}

#[test]
fn vgg() {
    transfer("vgg");
}

#[test]
fn efficientnet() {
    transfer("efficientnet");
}

#[test]
fn mobilenet_v3_small() {
    transfer("mobilenet_v3_small");
}

#[test]
fn vit() {
    transfer("vit");
}

/// The same through the command line, as the README shows it: `copy --strict
/// --rules rules/torchvision_to_timm/convnext.rules`, then the written module
/// computes torchvision's outputs.
#[test]
fn the_cli_copies_with_a_library_rules_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("convnext_timm.pt");
    let run = transplant([
        "copy".as_ref(),
        fixture("rules/convnext_torchvision.safetensors").as_os_str(),
        fixture("rules/convnext_timm.pt").as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--strict".as_ref(),
        "--rules".as_ref(),
        rules_file("convnext").as_os_str(),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("<- features.1.0.layer_scale | reshape(-1)"), "{}", run.stdout);
    let mut written = ModuleStore::open(&out).unwrap();
    written.module_mut().set_training(false).unwrap();
    let want = expected_tensor("rules/convnext.expected.safetensors", "output");
    assert_close(&output(&written, "convnext"), &want, "convnext via the CLI");
}
