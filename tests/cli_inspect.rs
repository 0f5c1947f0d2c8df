//! `transplant inspect`.
use crate::common;

use common::{fixture, transplant};

#[test]
fn inspect_lists_entries_totals_kind_and_key() {
    let run = transplant([fixture("torch_save/training.pth")]);
    assert_eq!(run.code, 2, "no subcommand is a usage error");
    let run = transplant(["inspect".as_ref(), fixture("torch_save/training.pth").as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("torch.save checkpoint, state dict under key \"state_dict\""),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("features.1.0.bn.num_batches_tracked") && run.stdout.contains("totals:"));
}

#[test]
fn inspect_json_is_one_document_with_the_documented_fields() {
    let run = transplant(["inspect".as_ref(), fixture("bn_net_a.pt").as_os_str(), "--json".as_ref()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json = run.json();
    assert_eq!(json["kind"], "TorchScript module");
    assert_eq!(json["tensors"], 20);
    let first = &json["entries"][0];
    for field in ["name", "role", "shape", "dtype", "device"] {
        assert!(!first[field].is_null(), "entries have {field}");
    }
    assert!(json["totals"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["role"] == "buffer" && t["dtype"] == "int64"));
    assert!(json["bytes"].as_u64().unwrap() > 0);
}

#[test]
fn inspect_errors_name_the_file_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("notes.txt");
    std::fs::write(&bad, "hello").unwrap();
    for path in [bad, dir.path().join("missing.pt"), dir.path().to_path_buf()] {
        let run = transplant(["inspect".as_ref(), path.as_os_str()]);
        assert_eq!(run.code, 1, "{}", path.display());
        assert!(run.stderr.contains(&path.display().to_string()), "{}", run.stderr);
        assert!(run.stdout.is_empty());
    }
    let run = transplant(["inspect".as_ref(), fixture("torch_save/two_models.pth").as_os_str()]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("--key"), "{}", run.stderr);
    let run =
        transplant(["inspect", fixture("torch_save/two_models.pth").to_str().unwrap(), "--key", "model_ema"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn an_error_names_the_file_and_says_its_cause_once() {
    let run = transplant(["inspect", "/nonexistent/model.pt"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("/nonexistent/model.pt"), "{}", run.stderr);
    assert_eq!(run.stderr.matches("No such file or directory").count(), 1, "{}", run.stderr);
}

#[test]
fn inspect_digest_is_pytorchs_sha256_of_each_tensors_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views.pth");
    common::python(
        r#"
import sys, torch
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
shared = torch.arange(10, dtype=torch.int64)
torch.save({
    "transposed": base.t(),
    "strided": base[:, ::2],
    "offset": shared[3:7],
    "scalar": torch.tensor(2.5, dtype=torch.float64),
    "empty": torch.zeros(0, 3),
    "tied_a": shared, "tied_b": shared,
    "mask": torch.tensor([True, False, True]),
    "half": torch.linspace(-2, 2, 7, dtype=torch.bfloat16),
}, sys.argv[1])
"#,
        &[&path],
    );
    let (pytorch, _) = common::read_back(&path);
    assert_eq!(common::inspected(&path), pytorch, "name by name: dtype, shape and sha256");
    let empty = pytorch.iter().find(|r| r.name == "empty").unwrap();
    assert_eq!(empty.sha256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    let text = transplant(["inspect".as_ref(), path.as_os_str(), "--digest".as_ref()]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("sha256") && text.stdout.contains(&pytorch[0].sha256), "{}", text.stdout);
    let plain = transplant(["inspect".as_ref(), path.as_os_str(), "--json".as_ref()]);
    assert!(plain.json()["entries"][0].get("sha256").is_none(), "a digest only when asked for");
}
