//! The CLI contract under `--json`: whatever goes wrong — a missing file, a bad
//! file, a bad rule, a usage error — stdout holds exactly one JSON document
//! (with the error's kind, message and file), and the exit status is kept.
use crate::common;

use common::{fixture, transplant};

#[test]
fn every_command_prints_one_json_document_on_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pt");
    let bad = dir.path().join("bad.pt");
    std::fs::write(&bad, b"not a model at all").unwrap();
    let good = fixture("bn_net_a.pt");
    let out = dir.path().join("out.pt");
    let (missing, bad, good, out) =
        (missing.to_str().unwrap(), bad.to_str().unwrap(), good.to_str().unwrap(), out.to_str().unwrap());
    let bad_rule = ["--map", "(=>x"];
    let mut cases: Vec<(Vec<&str>, i32, Option<&str>)> = Vec::new();
    for file in [missing, bad] {
        cases.push((vec!["inspect", file], 1, Some(file)));
        cases.push((vec!["plan", file, good], 1, Some(file)));
        cases.push((vec!["copy", good, file, "-o", out], 1, Some(file)));
        cases.push((vec!["diff", good, file], 1, Some(file)));
        cases.push((vec!["verify", good, file, "--input", "1,3,8,8"], 1, Some(file)));
    }
    for command in [vec!["plan", good, good], vec!["copy", good, good, "-o", out], vec!["diff", good, good]] {
        let mut args = command.clone();
        args.extend(bad_rule);
        cases.push((args, 1, None));
    }
    cases.push((vec!["inspect"], 2, None));
    cases.push((vec!["copy", good, good], 2, None));
    for (mut args, code, file) in cases {
        args.push("--json");
        let run = transplant(&args);
        assert_eq!(run.code, code, "{args:?}: {}", run.stderr);
        let doc: serde_json::Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}):\n{}", run.stdout));
        let error = &doc["error"];
        assert!(error["kind"].is_string() && error["message"].is_string(), "{args:?}: {doc}");
        if let Some(file) = file {
            assert_eq!(error["file"], file, "{args:?}: {doc}");
        }
        assert!(!run.stderr.is_empty(), "{args:?}: the human message goes to stderr");
    }
}

#[test]
fn a_refused_copy_prints_its_report_with_the_error_as_the_one_document() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pt");
    let run = transplant([
        "copy",
        fixture("mlp_bn.pt").to_str().unwrap(),
        fixture("mlp.pt").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["complete"], false);
    assert!(doc["error"]["message"].as_str().unwrap().contains("--allow-partial"), "{doc}");
}
