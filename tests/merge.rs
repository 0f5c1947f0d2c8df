//! `transplant merge`: every method against an independent PyTorch reference
//! (`scripts/merge_reference.py`) on a ResNet-style net with BatchNorm buffers
//! and a small transformer, with weights, densities, seeds, mixed dtypes and
//! formats, and per-input rules; integer buffers; bad input refused with
//! nothing written.
use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{file_hash, transplant};
use serde_json::{json, Value};

/// The models, made once per test binary by the reference script.
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let status = std::process::Command::new(root.join(".venv/bin/python"))
            .arg(root.join("scripts/merge_reference.py"))
            .arg("make")
            .arg(&dir)
            .status()
            .expect("the venv's python runs");
        assert!(status.success(), "merge_reference.py make failed");
        dir
    })
}

/// `transplant merge` of `case` (the JSON the reference reads), asserting success.
fn run_case(case: &Value) -> Value {
    let dir = models();
    let mut args: Vec<String> = vec!["merge".into()];
    args.extend(
        case["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| dir.join(m.as_str().unwrap()).display().to_string()),
    );
    args.extend(["-o".into(), case["out"].as_str().unwrap().into(), "--method".into()]);
    args.push(case["method"].as_str().unwrap().into());
    if let Some(base) = case["base"].as_str() {
        args.extend(["--base".into(), dir.join(base).display().to_string()]);
    }
    if let Some(weights) = case["weights"].as_array() {
        args.push("--weights".into());
        args.extend(weights.iter().map(|w| w.to_string()));
    }
    for (flag, key) in [("--density", "density"), ("--lambda", "lambda"), ("--t", "t"), ("--seed", "seed")] {
        if !case[key].is_null() {
            args.extend([flag.into(), case[key].to_string()]);
        }
    }
    if let Some(dtype) = case["dtype"].as_str() {
        args.extend(["--dtype".into(), dtype.into()]);
    }
    if let Some(rules_for) = case["rules_for"].as_str() {
        args.extend(["--rules-for".into(), format!("{rules_for}={}", dir.join("strip.rules").display())]);
    }
    args.push("--json".into());
    let run = transplant(&args);
    assert_eq!(run.code, 0, "merge {args:?}: {}", run.stderr);
    run.json()
}

fn check_against_reference(cases: &[Value]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_string(cases).unwrap()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/merge_reference.py"))
        .arg("check")
        .arg(models())
        .arg(file.path())
        .output()
        .expect("the venv's python runs");
    assert!(
        output.status.success(),
        "transplant's merges differ from the reference:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_method_matches_the_pytorch_reference_on_a_resnet_with_batchnorm() {
    let out = tempfile::tempdir().unwrap();
    let o = |name: &str| out.path().join(name).display().to_string();
    let renamed = json!({ "r_ft3_renamed.pth": "backbone." });
    let three = json!(["r_ft1.pth", "r_ft2.safetensors", "r_ft3_renamed.pth"]);
    let cases = vec![
        json!({ "method": "linear", "models": three, "weights": [0.5, 0.3, 0.2], "rules_for": "3",
                "rename": renamed, "out": o("linear.safetensors") }),
        json!({ "method": "linear", "models": ["r_base.pth", "r_ft1.pth"], "out": o("soup.pth") }),
        json!({ "method": "linear", "models": ["r_ft1.pth", "r_ft2.safetensors"], "dtype": "bf16",
                "out": o("soup_bf16.safetensors") }),
        json!({ "method": "task-arithmetic", "base": "r_base.pth", "models": three, "weights": [1.0, 0.5, 0.25],
                "lambda": 0.7, "rules_for": "3", "rename": renamed, "out": o("task.safetensors") }),
        json!({ "method": "ties", "base": "r_base.pth", "models": three, "weights": [1.0, 2.0, 1.0],
                "density": 0.3, "rules_for": "3", "rename": renamed, "out": o("ties.safetensors") }),
        json!({ "method": "ties", "base": "r_base.pth", "models": ["r_ft1.pth", "r_ft2.safetensors"],
                "density": 1.0, "lambda": 0.5, "out": o("ties_full.npz") }),
        json!({ "method": "dare-linear", "base": "r_base.pth", "models": ["r_ft1.pth", "r_ft2.safetensors"],
                "weights": [0.6, 0.4], "density": 0.5, "seed": 3, "out": o("dare_linear.safetensors") }),
        json!({ "method": "dare-ties", "base": "r_base.pth", "models": three, "density": 0.4, "seed": 11,
                "rules_for": "3", "rename": renamed, "out": o("dare_ties.safetensors") }),
        json!({ "method": "slerp", "models": ["r_ft1.pth", "r_ft2.safetensors"], "t": 0.3,
                "out": o("slerp.safetensors") }),
        json!({ "method": "slerp", "base": "r_base.pth", "models": ["r_ft1.pth"], "out": o("slerp_base.pth") }),
    ];
    let mut differing = Vec::new();
    for case in &cases {
        let merged = run_case(case);
        differing.push(merged["differing"].clone());
        let from_reference: Vec<&str> =
            merged["from_reference"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        // Every num_batches_tracked is an integer taken from the reference, never averaged.
        assert_eq!(from_reference.len(), 5, "{from_reference:?}");
        assert!(from_reference.iter().all(|n| n.ends_with("num_batches_tracked")));
    }
    // The fine-tunes trained for different numbers of batches: reported.
    let first: Vec<&str> =
        differing[0].as_array().unwrap().iter().map(|d| d["tensor"].as_str().unwrap()).collect();
    assert!(first.contains(&"bn.num_batches_tracked"), "{first:?}");
    check_against_reference(&cases);
}

#[test]
fn every_method_matches_the_pytorch_reference_on_a_transformer() {
    let out = tempfile::tempdir().unwrap();
    let o = |name: &str| out.path().join(name).display().to_string();
    let fts = json!(["t_ft1.safetensors", "t_ft2.safetensors", "t_ft3.safetensors"]);
    let cases = vec![
        json!({ "method": "linear", "models": fts, "out": o("linear.safetensors") }),
        json!({ "method": "task-arithmetic", "base": "t_base.safetensors", "models": fts, "lambda": 1.3,
                "out": o("task.pth") }),
        json!({ "method": "ties", "base": "t_base.safetensors", "models": fts, "density": 0.2,
                "weights": [0.7, 1.0, 0.4], "out": o("ties.safetensors") }),
        json!({ "method": "dare-linear", "base": "t_base.safetensors", "models": fts, "density": 0.9, "seed": 5,
                "out": o("dare.safetensors") }),
        json!({ "method": "dare-ties", "base": "t_base.safetensors", "models": fts, "density": 0.3, "seed": 2,
                "lambda": 0.8, "out": o("dare_ties.safetensors"), "dtype": "f16" }),
        json!({ "method": "slerp", "models": ["t_ft1.safetensors", "t_ft3.safetensors"], "t": 0.6,
                "out": o("slerp.safetensors") }),
    ];
    for case in &cases {
        let merged = run_case(case);
        // position_ids, an integer buffer, is the reference's.
        assert_eq!(merged["from_reference"], json!(["position_ids"]));
        assert_eq!(merged["differing"], json!([]));
    }
    check_against_reference(&cases);
}

#[test]
fn dare_masks_are_reproducible_from_the_seed() {
    let dir = models();
    let out = tempfile::tempdir().unwrap();
    let merge = |seed: &str, name: &str| {
        let path = out.path().join(name);
        let run = transplant([
            "merge",
            &dir.join("t_ft1.safetensors").display().to_string(),
            &dir.join("t_ft2.safetensors").display().to_string(),
            "--base",
            &dir.join("t_base.safetensors").display().to_string(),
            "--method",
            "dare-ties",
            "--density",
            "0.5",
            "--seed",
            seed,
            "-o",
            &path.display().to_string(),
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        file_hash(&path)
    };
    assert_eq!(merge("7", "a.safetensors"), merge("7", "b.safetensors"));
    assert_ne!(merge("7", "a.safetensors"), merge("8", "c.safetensors"));
}

/// Runs a merge that must fail: exit 1, a message containing each of `says`, no OUT.
fn refused(args: &[&str], says: &[&str]) {
    let dir = models();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("out.safetensors");
    let mut all: Vec<String> = vec!["merge".into()];
    for a in args {
        all.push(if a.ends_with(".pth") || a.ends_with(".safetensors") {
            dir.join(a).display().to_string()
        } else {
            a.to_string()
        });
    }
    all.extend(["-o".into(), path.display().to_string()]);
    let run = transplant(&all);
    assert_eq!(run.code, 1, "{all:?}: {}", run.stderr);
    for s in says {
        assert!(run.stderr.contains(s), "{all:?}: expected {s:?} in {}", run.stderr);
    }
    assert!(std::fs::read_dir(out.path()).unwrap().next().is_none(), "{all:?} wrote something");
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    // Different architectures, no rules.
    refused(
        &["r_ft1.pth", "t_ft1.safetensors", "--method", "linear"],
        &["t_ft1.safetensors", "no counterpart"],
    );
    // Another naming, no rules for it.
    refused(&["r_ft1.pth", "r_ft3_renamed.pth", "--method", "linear"], &["backbone.", "no counterpart"]);
    // A tensor of another shape.
    refused(&["r_ft1.pth", "r_badshape.pth", "--method", "linear"], &["fc.weight", "[5, 8]"]);
    // Density out of range, or missing.
    for d in ["0", "1.5", "-0.2"] {
        refused(
            &["r_ft1.pth", "--base", "r_base.pth", "--method", "ties", "--density", d],
            &["--density", "out of range"],
        );
    }
    refused(&["r_ft1.pth", "--base", "r_base.pth", "--method", "dare-linear"], &["needs --density"]);
    // One weight per model.
    refused(
        &["r_ft1.pth", "r_ft2.safetensors", "r_base.pth", "--method", "linear", "--weights", "1", "2"],
        &["2 weight(s) for 3 model(s)"],
    );
    // Methods and their inputs.
    refused(&["r_ft1.pth", "r_ft2.safetensors", "--method", "ties", "--density", "0.5"], &["--base"]);
    refused(&["r_ft1.pth", "r_ft2.safetensors", "r_base.pth", "--method", "slerp"], &["exactly two"]);
    refused(&["r_ft1.pth", "r_ft2.safetensors", "--method", "slerp", "--t", "1.5"], &["--t", "out of range"]);
    refused(
        &["r_ft1.pth", "r_ft2.safetensors", "--method", "linear", "--density", "0.5"],
        &["takes no --density"],
    );
}
