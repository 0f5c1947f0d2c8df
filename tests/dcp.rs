//! Distributed Checkpoints: one saved by two ranks (tensors sharded, replicated
//! and plain, an optimizer beside the model, a step) read equal to the model
//! PyTorch holds and copied into a TorchScript module that then computes what
//! the original did; what transplant writes, PyTorch loads in one process and
//! in two ranks with tensors sharded; broken metadata refused, naming the tensor.
use crate::common;

use std::path::{Path, PathBuf};

use common::{expected_tensor, fixture, parse_records, store_records, transplant, transplant_measured};
use transplant::{Checkpoint, ModuleStore, Source};

fn two_ranks() -> PathBuf {
    fixture("dcp/two_ranks")
}

fn python(args: &[&str]) -> (bool, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/dcp_check.py"))
        .args(args)
        .output()
        .expect("the venv's python runs");
    (
        output.status.success(),
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_checkpoint_saved_by_two_ranks_reads_equal_to_the_model() {
    let message = Checkpoint::open(two_ranks()).unwrap_err().to_string();
    assert!(message.contains("model, optim") && message.contains("--key"), "{message}");
    let model = Checkpoint::open_with_key(two_ranks(), Some("model")).unwrap();
    let text = std::fs::read_to_string(fixture("dcp/dcp.expected.json")).unwrap();
    let (want, _) = parse_records(&serde_json::from_str(&text).unwrap());
    assert_eq!(store_records(&model), want, "every tensor, sharded or not, put together");
    let others = model.others();
    assert!(others.contains(&("step".to_string(), "5".to_string())), "{others:?}");
    assert!(others.contains(&("optim".to_string(), "2 tensors (not read)".to_string())), "{others:?}");
    let run = transplant(["inspect", s(&two_ranks()), "--key", "model"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("distributed checkpoint, state dict under key \"model\""), "{}", run.stdout);
}

/// torch.distributed.checkpoint's safetensors layout (HuggingFaceStorageWriter)
/// is sharded safetensors with an index: read through the index.
#[test]
fn the_safetensors_layout_reads_through_its_index() {
    let hf = transplant::open(fixture("dcp/hf/model.safetensors.index.json")).unwrap();
    let text = std::fs::read_to_string(fixture("dcp/dcp.expected.json")).unwrap();
    let (mut want, _) = parse_records(&serde_json::from_str(&text).unwrap());
    let mut got = store_records(hf.as_ref());
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn copied_into_a_module_it_computes_what_the_original_did() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("restored.pt");
    let run = transplant([
        "copy",
        s(&two_ranks()),
        s(&fixture("bn_net_b.pt")),
        "-o",
        s(&out),
        "--key",
        "model",
        "--strict",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let mut module = ModuleStore::open(&out).unwrap();
    module.module_mut().set_training(false).unwrap();
    let input = expected_tensor("bn_net.expected.safetensors", "input");
    let got = module.module().forward(&[input]).unwrap().remove(0);
    assert!(got.equal(&expected_tensor("bn_net.expected.safetensors", "output_a")));
}

#[test]
fn what_transplant_writes_pytorch_loads_in_one_process_and_in_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let module = fixture("bn_net_a.pt");
    // convert: a model into a checkpoint folder (names as they are).
    let flat = dir.path().join("flat/");
    let run = transplant(["convert", s(&module), "-o", s(&flat)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for mode in ["load", "load2"] {
        let (ok, out) = python(&[mode, s(&flat), s(&module)]);
        assert!(ok, "{mode}: {out}");
    }
    // copy into the DCP layout of a destination read under `model`.
    let nested = dir.path().join("nested/");
    let run = transplant(["copy", s(&module), s(&two_ranks()), "--key", "model", "-o", s(&nested)]);
    // The destination holds two state dicts (model, optim): it must be read under one.
    assert_eq!(run.code, 1, "{}", run.stderr);
    let from_dcp = dir.path().join("from_dcp/");
    let run = transplant(["convert", s(&two_ranks()), "--key", "model", "-o", s(&from_dcp)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (ok, out) = python(&["load", s(&from_dcp), s(&module)]);
    assert!(ok, "{out}");
    // A checkpoint folder is replaced whole; a folder holding anything else is not.
    let run = transplant(["convert", s(&fixture("bn_net_a.pt")), "-o", s(&flat)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (ok, out) = python(&["load", s(&flat), s(&fixture("bn_net_a.pt"))]);
    assert!(ok, "{out}");
    std::fs::write(flat.join("notes.txt"), "mine").unwrap();
    let run = transplant(["convert", s(&module), "-o", s(&flat)]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("holds more than a Distributed Checkpoint"), "{}", run.stderr);
    assert!(flat.join("notes.txt").exists());
}

#[test]
fn broken_metadata_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good/");
    let run = transplant(["convert", s(&fixture("bn_net_a.pt")), "-o", s(&good)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (case, needle) in [
        ("overlap", "overlap"),
        ("missing", "cover"),
        ("outside", "lies outside"),
        ("past_end", "past the end of the file"),
        ("escape", "not a file name inside"),
        ("transforms", "transforms"),
    ] {
        let bad = dir.path().join(case);
        let (ok, name) = python(&["corrupt", s(&good), s(&bad), case]);
        assert!(ok, "{name}");
        let run = transplant(["inspect", s(&bad)]);
        assert_eq!(run.code, 1, "{case}: {}", run.stdout);
        assert!(run.stderr.contains(needle) && run.stderr.contains(name.trim()), "{case}: {}", run.stderr);
    }
}

/// Sizes are checked against the bytes behind them before anything is
/// allocated: two chunks claiming 3 GB each over 16 bytes, and a size past an
/// i64, are refused at once, naming the file, in little memory.
#[test]
fn sizes_are_checked_against_the_bytes_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good/");
    let run = transplant(["convert", s(&fixture("bn_net_a.pt")), "-o", s(&good)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (case, file, needle) in [
        ("huge", "huge.distcp", "needs more bytes than the 8 its storage holds"),
        ("overflow", ".metadata", "counts more elements than an i64 holds"),
    ] {
        let bad = dir.path().join(case);
        let (ok, name) = python(&["corrupt", s(&good), s(&bad), case]);
        assert!(ok, "{name}");
        let (run, rss) = transplant_measured(&["inspect", s(&bad)]);
        assert_eq!(run.code, 1, "{case}: {}", run.stderr);
        assert!(run.stderr.contains(needle) && run.stderr.contains(file), "{case}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked") && !run.stderr.contains("frame #"), "{}", run.stderr);
        assert!(rss < 600 << 20, "{case}: {} MB", rss >> 20);
    }
}

/// Many chunks: 120,000 one-element chunks of a tensor are checked (inside
/// the tensor, bytes of their own, no overlap, coverage) in time proportional
/// to their number, reaching the first chunk's bytes (zeros, not a torch.save
/// stream); 200,000 are more than a checkpoint may list and are refused
/// before the metadata is all parsed, in bounded memory.
#[test]
fn many_chunks_are_checked_in_bounded_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good/");
    let run = transplant(["convert", s(&fixture("bn_net_a.pt")), "-o", s(&good)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let within = dir.path().join("within");
    let (ok, out) = python(&["many", s(&good), s(&within), "120000"]);
    assert!(ok, "{out}");
    let started = std::time::Instant::now();
    let (run, rss) = transplant_measured(&["inspect", s(&within)]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("many.distcp") && run.stderr.contains("torch.save"), "{}", run.stderr);
    assert!(rss < 1200 << 20, "{} MB for 120,000 chunks", rss >> 20);
    assert!(started.elapsed().as_secs() < 120, "a guard against a quadratic check");
    let over = dir.path().join("over");
    let (ok, out) = python(&["many", s(&good), s(&over), "200000"]);
    assert!(ok, "{out}");
    let (run, rss) = transplant_measured(&["inspect", s(&over)]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains(".metadata") && run.stderr.contains("131072 chunks"), "{}", run.stderr);
    assert!(rss < 1200 << 20, "{} MB refusing 200,000 chunks", rss >> 20);
}

/// Chunks whose storage shares bytes in one file are refused by name: each
/// chunk reads bytes of its own, so a checkpoint never makes more than its
/// files hold.
#[test]
fn storage_ranges_that_overlap_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good/");
    let run = transplant(["convert", s(&fixture("bn_net_a.pt")), "-o", s(&good)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let bad = dir.path().join("shared");
    let (ok, name) = python(&["corrupt", s(&good), s(&bad), "shared_bytes"]);
    assert!(ok, "{name}");
    let run = transplant(["inspect", s(&bad)]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("__0_0.distcp") && run.stderr.contains("overlap"), "{}", run.stderr);
}
