//! `transplant plan`.
use crate::common;

use common::{file_hash, fixture, transplant};

#[test]
fn a_complete_plan_exits_0_and_writes_nothing() {
    let (src, dst) = (fixture("bn_net_a.pt"), fixture("bn_net_b.pt"));
    let before = (file_hash(&src), file_hash(&dst));
    let run = transplant(["plan".as_ref(), src.as_os_str(), dst.as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("pairs: 20") && run.stdout.contains("verdict: complete"), "{}", run.stdout);
    assert_eq!((file_hash(&src), file_hash(&dst)), before);
}

#[test]
fn an_incomplete_plan_exits_3_and_names_the_leftovers() {
    let run = transplant([
        "plan",
        fixture("mlp_bn.pt").to_str().unwrap(),
        fixture("mlp.pt").to_str().unwrap(),
        "--match",
        "order",
    ]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stdout.contains("left over in the source (5)") && run.stdout.contains("1.running_var"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_plan_that_fails_its_check_exits_1() {
    let (src, dst) = (fixture("mlp_bn.pt"), fixture("mlp.pt"));
    let run =
        transplant(["plan", src.to_str().unwrap(), dst.to_str().unwrap(), "--map", r"1\.weight=>2.bias"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("shape mismatch"), "{}", run.stderr);
    let strict = transplant([
        "plan",
        fixture("mlp_bn.pt").to_str().unwrap(),
        fixture("mlp.pt").to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(strict.code, 1, "strict refuses leftovers");
}

#[test]
fn plan_json_and_save_plan() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("plan.json");
    let run = transplant([
        "plan",
        fixture("backbone.safetensors").to_str().unwrap(),
        fixture("encoder.pt").to_str().unwrap(),
        "--map",
        r"backbone\.(.*)=>encoder.$1",
        "--json",
        "--save-plan",
        saved.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json = run.json();
    for field in
        ["source", "target", "matcher", "complete", "ok", "pairs", "leftovers", "problems", "plan_file"]
    {
        assert!(json.get(field).is_some(), "JSON has {field}: {json}");
    }
    assert_eq!(json["complete"], true);
    assert!(json["pairs"][0]["provenance"].is_string());
    assert!(json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["provenance"].as_str().unwrap().contains("rule")));
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(file["pairs"].as_array().unwrap().len(), 20);
}

#[test]
fn bad_rules_exit_1_naming_the_rule_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.txt");
    std::fs::write(&rules, "ok => fine\nbroken( => x\n").unwrap();
    let (src, dst) = (fixture("bn_net_a.pt"), fixture("bn_net_b.pt"));
    let run = transplant([
        "plan",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("rules.txt:2"), "{}", run.stderr);
    let run = transplant(["plan", src.to_str().unwrap(), dst.to_str().unwrap(), "--match", "fuzzy"]);
    assert_eq!(run.code, 2);
    let run = transplant(["plan", src.to_str().unwrap()]);
    assert_eq!(run.code, 2);
}

#[test]
fn save_plan_never_overwrites_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.pt"), dir.path().join("dst.pt"));
    std::fs::copy(fixture("bn_net_a.pt"), &src).unwrap();
    std::fs::copy(fixture("bn_net_b.pt"), &dst).unwrap();
    let rules = dir.path().join("rules.txt");
    std::fs::write(&rules, "nothing\\.(.*) => x.$1\n").unwrap();
    let before = (file_hash(&src), file_hash(&dst), file_hash(&rules));
    for input in [&src, &dst, &rules] {
        let run = transplant([
            "plan",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
            "--save-plan",
            input.to_str().unwrap(),
        ]);
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert!(run.stderr.contains("inputs are never modified"), "{}", run.stderr);
    }
    assert_eq!((file_hash(&src), file_hash(&dst), file_hash(&rules)), before);
}
