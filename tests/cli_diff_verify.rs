//! `transplant diff` and `transplant verify`.
use crate::common;

use common::{fixture, transplant};

fn s(path: &std::path::Path) -> String {
    path.to_str().unwrap().to_string()
}

#[test]
fn diff_of_a_model_with_itself_is_the_same_and_of_two_models_is_not() {
    let a = s(&fixture("bn_net_a.pt"));
    let run = transplant(["diff", &a, &a]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(run.stdout.contains("20 identical"), "{}", run.stdout);
    let run = transplant(["diff", &a, &s(&fixture("bn_net_b.pt")), "--json"]);
    assert_eq!(run.code, 3);
    let json = run.json();
    assert!(json["differing"].as_u64().unwrap() > 0);
    assert!(json["pairs"][1]["max_abs"].as_f64().unwrap() > 0.0);
    // The same weights in another format and with wrapper prefixes: the same.
    let run = transplant(["diff", &s(&fixture("wrapped_module.safetensors")), &a]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    // Leftovers make models differ.
    let run = transplant(["diff", &s(&fixture("mlp_bn.pt")), &s(&fixture("mlp.pt"))]);
    assert_eq!(run.code, 3);
    assert!(run.stdout.contains("only in A"), "{}", run.stdout);
}

#[test]
fn diff_tolerances_decide() {
    let dir = tempfile::tempdir().unwrap();
    let half = dir.path().join("half.pt");
    let run = transplant([
        "copy",
        &s(&fixture("bn_net_a.pt")),
        &s(&fixture("bn_net_b.pt")),
        "-o",
        &s(&half),
        "--dtype",
        "f16",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let a = s(&fixture("bn_net_a.pt"));
    assert_eq!(transplant(["diff", &a, &s(&half)]).code, 3, "float16 rounding is a difference by default");
    assert_eq!(transplant(["diff", &a, &s(&half), "--rtol", "1e-2", "--atol", "1e-3"]).code, 0);
}

#[test]
fn verify_compares_outputs_on_seeded_inputs() {
    let a = s(&fixture("bn_net_a.pt"));
    let traced = s(&fixture("bn_net_a_traced.pt"));
    let run = transplant(["verify", &a, &traced, "--input", "2,3,8,8", "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json = run.json();
    assert_eq!(json["inputs"][0], serde_json::json!([2, 3, 8, 8]));
    assert!(json["outputs"][0]["max_abs"].as_f64().unwrap() <= 1e-5);
    let run = transplant(["verify", &a, &s(&fixture("bn_net_b.pt")), "--input", "2,3,8,8", "--seed", "7"]);
    assert_eq!(run.code, 3);
    assert!(run.stdout.contains("outputs differ"));
}

#[test]
fn verify_refuses_bad_shapes_and_non_modules() {
    let a = s(&fixture("bn_net_a.pt"));
    for shape in ["1,x,3", "", "0,3", "-1,2"] {
        let run = transplant(["verify", &a, &a, "--input", shape]);
        assert_eq!(run.code, 2, "{shape:?}: {}", run.stderr);
    }
    assert_eq!(transplant(["verify", &a, &a]).code, 2, "--input is required");
    let run = transplant(["verify", &a, &s(&fixture("dtypes.safetensors")), "--input", "2,3,8,8"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("TorchScript") && run.stderr.contains("dtypes.safetensors"),
        "{}",
        run.stderr
    );
    let run = transplant(["verify", &a, &a, "--input", "2,5"]);
    assert_eq!(run.code, 1, "a shape the model cannot take is an error: {}", run.stderr);
    assert!(run.stderr.contains("forward"), "{}", run.stderr);
}

#[test]
fn verify_refuses_inputs_beyond_its_bound_before_allocating() {
    let a = fixture("bn_net_a.pt");
    let a = a.to_str().unwrap();
    // 10^15 elements (once a panic inside tch), 2.7e9 (once an unbounded allocation),
    // and more than a u64 holds.
    for shape in ["100000,100000,100000", "1,3,30000,30000", "4294967296,4294967296,4294967296"] {
        let run = transplant(["verify", a, a, "--input", shape]);
        assert_eq!(run.code, 1, "{shape}: {}", run.stderr);
        assert!(
            run.stderr.contains("--max-input-elements") && run.stderr.contains("elements"),
            "{}",
            run.stderr
        );
    }
    // The bound is a flag.
    let run = transplant(["verify", a, a, "--input", "4,3,8,8", "--max-input-elements", "100"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let run = transplant(["verify", a, a, "--input", "4,3,8,8", "--max-input-elements", "768"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}
