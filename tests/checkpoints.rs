//! The checkpoints people have, read without running anything: training
//! dicts with Python objects and numpy values, whole pickled modules, integer
//! keys, numpy arrays as weights, `torch.save` shards behind an index; each
//! equal to what PyTorch loads; and what is not read, said.
use crate::common;

use common::{fixture, parse_records, read_back, store_records, transplant, Record};
use serde_json::Value;
use transplant::{Checkpoint, Source};

fn expected(file: &str) -> Vec<Record> {
    let text = std::fs::read_to_string(fixture("torch_save.expected.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    parse_records(&all[file]).0
}

fn path(file: &str) -> std::path::PathBuf {
    fixture(&format!("torch_save/{file}"))
}

#[test]
fn a_research_training_dict_reads_by_key_and_says_what_it_did_not_read() {
    // Two state dicts: a key is needed; argparse.Namespace and numpy no longer refuse the file.
    let message = Checkpoint::open(path("research.pth")).unwrap_err().to_string();
    assert!(message.contains("state_dict, state_dict_ema") && message.contains("--key"), "{message}");
    let ema = Checkpoint::open_with_key(path("research.pth"), Some("state_dict_ema")).unwrap();
    assert_eq!(store_records(&ema), expected("research.pth"));
    let others: Vec<(String, String)> = ema.others();
    let find = |k: &str| others.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(find("args"), "argparse.Namespace (not read)");
    assert_eq!(find("epoch"), "12");
    assert_eq!(find("metric"), "0.93");
    assert_eq!(find("step"), "1000");
    assert_eq!(find("history"), "a numpy array");
    assert!(find("state_dict").contains("20 tensors"), "{others:?}");
    assert!(others.iter().all(|(k, _)| k != "state_dict_ema"));
    let run = transplant(["inspect", path("research.pth").to_str().unwrap(), "--key", "state_dict_ema"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("also in the file, not read as tensors:"), "{}", run.stdout);
    assert!(run.stdout.contains("  args        argparse.Namespace (not read)"), "{}", run.stdout);
    let json =
        transplant(["inspect", path("research.pth").to_str().unwrap(), "--key", "state_dict_ema", "--json"])
            .json();
    assert!(json["others"].as_array().unwrap().iter().any(|o| o["key"] == "args"));
    // A key holding no tensors of its own says where they are.
    let message = Checkpoint::open_with_key(path("research.pth"), Some("optimizer")).unwrap_err().to_string();
    assert!(message.contains("only dicts that do: optimizer.state.0"), "{message}");
}

#[test]
fn a_pickled_module_reads_as_its_state_dict_in_registration_order() {
    for file in ["pickled_module.pth", "pickled_dataparallel.pth"] {
        let model = Checkpoint::open(path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        // Parameters and persistent buffers in state_dict() order; `cache`
        // (registered non-persistent) left out, as state_dict() leaves it.
        assert_eq!(store_records(&model), expected(file), "{file}");
        assert!(model.entries().iter().all(|e| !e.name.ends_with("cache")));
        assert_eq!(model.entry_order(), transplant::EntryOrder::Registration);
        let class = model.others().into_iter().find(|(k, _)| k == "(pickled module)").map(|(_, v)| v);
        let want = if file.contains("dataparallel") { "DataParallel" } else { "WithNonPersistent" };
        assert!(class.as_deref().is_some_and(|c| c.contains(want)), "{class:?}");
    }
}

#[test]
fn integer_keys_numpy_arrays_and_torch_save_shards_read_equal_to_pytorch() {
    let int_keys = Checkpoint::open(path("int_keys.pth")).unwrap();
    assert_eq!(store_records(&int_keys), expected("int_keys.pth"));
    let names: Vec<&str> = int_keys.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["0", "1", "7"]);
    let arrays = Checkpoint::open(path("numpy_arrays.pth")).unwrap();
    assert_eq!(store_records(&arrays), expected("numpy_arrays.pth"), "C and Fortran order read as C order");
    let message = Checkpoint::open(path("object_array.pth")).unwrap_err().to_string();
    assert!(message.contains("object array") && message.contains("tensor x"), "{message}");
    // pytorch_model.bin.index.json: torch.save shards, read through the index.
    let shards = transplant::open(path("sharded_bin/pytorch_model.bin.index.json")).unwrap();
    let legacy = expected("legacy.pth"); // the same state dict
    let mut got = store_records(shards.as_ref());
    let mut want = legacy;
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn classes_are_kept_inert_and_code_runners_refused() {
    // An object whose class would create a file when unpickled: nothing is created.
    let marker = path("TOUCHED");
    let checkpoint = Checkpoint::open(path("inert_payload.pth")).unwrap();
    assert_eq!(store_records(&checkpoint), expected("inert_payload.pth"));
    assert!(!marker.exists(), "the payload ran");
    let hook = checkpoint.others().into_iter().find(|(k, _)| k == "hook").map(|(_, v)| v);
    assert_eq!(hook.as_deref(), Some("__main__.TouchOnLoad (not read)"));
    // os.system is refused by name, and nothing runs.
    let message = Checkpoint::open(path("malicious.pth")).unwrap_err().to_string();
    assert!(
        message.contains("executes code or touches the system") && message.contains("hostile"),
        "{message}"
    );
}

#[test]
fn copy_writes_sharded_safetensors_that_safetensors_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let src = path("training.pth");
    let run = transplant([
        "copy",
        src.to_str().unwrap(),
        src.to_str().unwrap(),
        "-o",
        index.to_str().unwrap(),
        "--max-shard-size",
        "4kB",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let shards = std::fs::read_dir(dir.path()).unwrap().count() - 1;
    assert!(shards > 1, "{shards} shard(s)");
    let mut got = read_back(&index).0;
    let mut want = expected("training.pth");
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let run = transplant([
        "copy",
        src.to_str().unwrap(),
        src.to_str().unwrap(),
        "-o",
        dir.path().join("x.safetensors").to_str().unwrap(),
        "--max-shard-size",
        "4kB",
    ]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("name the index"), "{}", run.stderr);
}

/// Each way of holding one state dict (zip, legacy, torch.save shards behind
/// an index, next to an inert placeholder), copied into a TorchScript module,
/// makes it compute exactly what the zip checkpoint makes it compute.
#[test]
fn copied_into_a_module_every_form_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let input = common::expected_tensor("bn_net.expected.safetensors", "input");
    let output_of = |file: &str| {
        let out = dir.path().join(format!("{}.pt", file.replace('/', "_")));
        let run = transplant([
            "copy",
            path(file).to_str().unwrap(),
            fixture("bn_net_b.pt").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--strict",
        ]);
        assert_eq!(run.code, 0, "{file}: {}{}", run.stdout, run.stderr);
        let mut module = transplant::ModuleStore::open(&out).unwrap();
        module.module_mut().set_training(false).unwrap();
        module.module().forward(&[input.shallow_clone()]).unwrap().remove(0)
    };
    let want = output_of("training.pth");
    let untouched = common::expected_tensor("bn_net.expected.safetensors", "output_b");
    assert!(!want.equal(&untouched), "the copy changed the module");
    for file in ["legacy.pth", "sharded_bin/pytorch_model.bin.index.json", "inert_payload.pth"] {
        assert!(output_of(file).equal(&want), "{file}");
    }
}
