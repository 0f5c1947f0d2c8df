//! `torch.save` checkpoints read without Python: values equal to what PyTorch
//! loads, views and tied storages kept, checkpoint keys chosen, hostile files
//! refused; and what we write, torch.load(weights_only=True) reads back equal.
use crate::common;

use std::path::Path;

use common::{fixture, parse_records, read_back, store_records, Record};
use serde_json::Value;
use transplant::{Checkpoint, Format, Source, StoreKind, Target};

fn expected(file: &str) -> (Option<String>, Vec<Record>, Value) {
    let text = std::fs::read_to_string(fixture("torch_save.expected.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let entry = &all[file];
    let (tensors, _) = parse_records(entry);
    (entry["key"].as_str().map(str::to_string), tensors, entry["metadata"].clone())
}

fn path(file: &str) -> std::path::PathBuf {
    fixture(&format!("torch_save/{file}"))
}

fn check_equal_to_pytorch(file: &str) -> Checkpoint {
    let checkpoint = Checkpoint::open(path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(checkpoint.kind(), StoreKind::Checkpoint(Format::TorchSave));
    let (key, tensors, _) = expected(file);
    assert_eq!(store_records(&checkpoint), tensors, "{file}");
    assert_eq!(checkpoint.key().map(str::to_string), key, "{file}");
    checkpoint
}

#[test]
fn torchvision_state_dicts_read_equal_to_pytorch() {
    let resnet = check_equal_to_pytorch("resnet18.pth");
    assert!(resnet.entries().iter().any(|e| e.name == "layer4.1.bn2.num_batches_tracked"));
    check_equal_to_pytorch("mobilenet_v2.pth");
}

#[test]
fn the_metadata_pytorch_keeps_versions_in_is_kept() {
    let resnet = Checkpoint::open(path("resnet18.pth")).unwrap();
    let json: Value = serde_json::from_str(&resnet.metadata()["torch._metadata"]).unwrap();
    let (_, _, want) = expected("resnet18.pth");
    assert_eq!(json, want);
    assert_eq!(json["bn1"]["version"], 2);
}

#[test]
fn training_checkpoint_picks_the_state_dict_and_skips_the_rest() {
    check_equal_to_pytorch("training.pth");
}

#[test]
fn several_state_dicts_need_a_key_and_keys_can_be_nested() {
    let message = Checkpoint::open(path("two_models.pth")).unwrap_err().to_string();
    assert!(message.contains("model, model_ema") && message.contains("--key"), "{message}");
    let ema = Checkpoint::open_with_key(path("two_models.pth"), Some("model_ema")).unwrap();
    let (_, tensors, _) = expected("two_models.pth");
    assert_eq!(store_records(&ema), tensors);
    assert_eq!(ema.key(), Some("model_ema"));

    check_equal_to_pytorch("nested.pth");
    let explicit =
        Checkpoint::open_with_key(path("nested.pth"), Some("checkpoint.model.state_dict")).unwrap();
    assert_eq!(store_records(&explicit), expected("nested.pth").1);
    let message =
        Checkpoint::open_with_key(path("nested.pth"), Some("checkpoint.optimizer")).unwrap_err().to_string();
    assert!(message.contains("checkpoint.optimizer") && message.contains("model"), "{message}");
}

#[test]
fn dataparallel_dtypes_and_a_parameter_saved_alone() {
    check_equal_to_pytorch("dataparallel.pth");
    check_equal_to_pytorch("dtypes.pth");
    check_equal_to_pytorch("parameter.pth");
}

#[test]
fn views_keep_offsets_and_strides_and_tied_tensors_share_storage() {
    let views = check_equal_to_pytorch("views.pth");
    let tensor = |name: &str| {
        let i = views.entries().iter().position(|e| e.name == name).unwrap();
        views.tensor(i).unwrap().shallow_clone()
    };
    assert_eq!(tensor("transposed").stride(), vec![1, 4], "a transposed view stays a view");
    assert_eq!(tensor("tied_a").data_ptr(), tensor("tied_b").data_ptr(), "tied weights share storage");
    let _guard = tch::no_grad_guard();
    let _ = tensor("tied_a").fill_(3.0);
    assert_eq!(tensor("tied_row").double_value(&[0]), 3.0, "a view of a tied tensor sees the write");
}

#[test]
fn a_pickle_that_would_run_a_command_is_refused_and_runs_nothing() {
    let marker = path("PWNED");
    let message = Checkpoint::open(path("malicious.pth")).unwrap_err().to_string();
    assert!(message.contains("posix.system") || message.contains("os.system"), "{message}");
    assert!(message.contains("not allowed") && message.contains("malicious.pth"), "{message}");
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn the_legacy_format_reads_equal_to_pytorch_with_views_and_ties() {
    for file in ["legacy.pth", "legacy_views.pth"] {
        let checkpoint = Checkpoint::open(path(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(checkpoint.kind(), StoreKind::Checkpoint(Format::TorchSaveLegacy));
        let (_, tensors, _) = expected(file);
        assert_eq!(store_records(&checkpoint), tensors, "{file}");
    }
    let views = Checkpoint::open(path("legacy_views.pth")).unwrap();
    let at = |name: &str| views.entries().iter().position(|e| e.name == name).unwrap();
    let (a, b) = (views.tensor(at("tied_a")).unwrap(), views.tensor(at("tied_b")).unwrap());
    assert_eq!(a.data_ptr(), b.data_ptr(), "tied tensors share one storage");
    assert_eq!(views.tensor(at("transposed")).unwrap().stride(), vec![1, 4], "a transposed view stays one");
}

#[test]
fn what_we_write_torch_load_reads_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["resnet18.pth", "dtypes.pth", "views.pth"] {
        let checkpoint = Checkpoint::open(path(file)).unwrap();
        let out = dir.path().join(file);
        checkpoint.save(&out).unwrap();
        let (got, _) = read_back(&out);
        assert_eq!(got, expected(file).1, "{file}");
        // And we read our own output back the same.
        assert_eq!(store_records(&Checkpoint::open(&out).unwrap()), expected(file).1, "{file}");
    }
    // _metadata survives the round trip.
    let resnet = Checkpoint::open(dir.path().join("resnet18.pth")).unwrap();
    assert!(resnet.metadata().contains_key("torch._metadata"));
}

#[test]
fn safetensors_saved_as_pth_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let source = Checkpoint::open(fixture("dtypes.safetensors")).unwrap();
    let out = dir.path().join("converted.pth");
    source.save(&out).unwrap();
    let mut want = store_records(&source);
    let mut got = read_back(&out).0;
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

// --- hostile input ---

fn refuse(bytes: &[u8], what: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.pth");
    std::fs::write(&file, bytes).unwrap();
    match Checkpoint::open(&file) {
        Ok(_) => panic!("{what}: opened"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("hostile.pth"), "{what}: {message}");
            message
        }
    }
}

/// A zip like torch.save's, with our own data.pkl and storages.
fn archive(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, data) in storages {
        zip.start_file(format!("archive/data/{key}"), options).unwrap();
        zip.write_all(data).unwrap();
    }
    // PyTorch refuses an archive without its version record.
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap().into_inner()
}

/// `{'w': _rebuild_tensor_v2(storage(key '0', numel), offset, size, stride, False, OrderedDict())}`
fn tensor_pickle(numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'X', 1, 0, 0, 0, b'w'];
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.extend_from_slice(
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK",
    );
    p.push(numel);
    p.extend_from_slice(b"tQK");
    p.push(offset);
    p.push(b'(');
    for s in size {
        p.extend_from_slice(&[b'K', *s]);
    }
    p.push(b't');
    p.push(b'(');
    for s in stride {
        p.extend_from_slice(&[b'K', *s]);
    }
    p.push(b't');
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRs.");
    p
}

#[test]
fn a_hand_made_archive_reads_so_the_hostile_variants_below_are_meaningful() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.pth");
    std::fs::write(&file, archive(&tensor_pickle(4, 0, &[2, 2], &[2, 1]), &[("0", &[0u8; 16])])).unwrap();
    let checkpoint = Checkpoint::open(&file).unwrap();
    assert_eq!(checkpoint.entries()[0].shape, vec![2, 2]);
}

#[test]
fn hostile_archives_are_refused() {
    let storage: &[(&str, &[u8])] = &[("0", &[0u8; 16])];
    let message =
        refuse(&archive(&tensor_pickle(4, 0, &[3, 3], &[3, 1]), storage), "sizes × strides past the storage");
    assert!(message.contains("reaches past its storage"), "{message}");
    refuse(&archive(&tensor_pickle(4, 3, &[2], &[1]), storage), "offset past the storage");
    // Views whose elements overlap: 200 elements over 4 (stride 0), a 2×2 over 3.
    for (size, stride) in [(&[200u8][..], &[0u8][..]), (&[2, 2], &[1, 1])] {
        let message = refuse(&archive(&tensor_pickle(4, 0, size, stride), storage), "an overlapping view");
        assert!(message.contains("reaches elements twice"), "{message}");
    }
    let message =
        refuse(&archive(&tensor_pickle(200, 0, &[2], &[1]), storage), "storage smaller than declared");
    assert!(message.contains("storage 0"), "{message}");
    let message = refuse(&archive(&tensor_pickle(4, 0, &[2], &[1]), &[]), "missing storage");
    assert!(message.contains("missing"), "{message}");
    let message = refuse(&archive(&[0x80, 2, 0xff, b'.'], &[]), "unknown opcode");
    assert!(message.contains("opcode 0xff"), "{message}");
    refuse(&archive(b"\x80\x02cos\nsystem\n(X\x02\x00\x00\x00lstR.", &[]), "os.system");
    refuse(&archive(b"\x80\x02cbuiltins\neval\n.", &[]), "builtins.eval");
    refuse(&archive(b"\x80\x02csubprocess\nPopen\n.", &[]), "subprocess");
    refuse(&archive(&[0x80, 2, b'X', 0xff, 0xff, 0xff, 0x7f, b'a'], &[]), "a string longer than the file");
    refuse(&archive(&[0x80, 2, b'h', 9, b'.'], &[]), "a memo that was never stored");
    refuse(&archive(&[0x80, 2, b't', b'.'], &[]), "TUPLE without a MARK");
    // A million-deep nesting: refused or read, quickly and without a stack overflow.
    let mut deep = vec![0x80, 2];
    deep.resize(2 + 1_000_000, b']');
    deep.resize(deep.len() + 999_999, b'a');
    deep.push(b'.');
    refuse(&archive(&deep, &[]), "a million lists on the stack");
    // A million-deep chain through the memo, with a shallow stack.
    let mut chain = vec![0x80, 2, b']', b'q', 0];
    for i in 0..1_000_000u32 {
        let (prev, next) = ((i % 2) as u8, ((i + 1) % 2) as u8);
        chain.extend_from_slice(&[b'h', prev, b']', b'q', next, b'a', b'0']);
    }
    chain.extend_from_slice(&[b'h', 0, b'.']);
    let started = std::time::Instant::now();
    refuse(&archive(&chain, &[]), "a million-deep nesting");
    assert!(started.elapsed().as_secs() < 10, "took {:?}", started.elapsed());
}

/// Two members of one name: PyTorch and transplant could read different ones.
#[test]
fn archives_with_a_member_twice_are_refused() {
    use std::io::Write;
    let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let good = tensor_pickle(4, 0, &[4], &[1]);
    for twice in ["archive/data.pkl", "archive/data/0"] {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(&good).unwrap();
        zip.start_file("archive/data/0", options).unwrap();
        zip.write_all(&[0u8; 16]).unwrap();
        zip.start_file(twice, options).unwrap();
        zip.write_all(if twice.ends_with("pkl") { &good[..] } else { &[1u8; 16][..] }).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        let message = refuse(&bytes, &format!("{twice} twice"));
        assert!(message.contains("two members named") && message.contains(twice), "{message}");
    }
}

#[test]
fn truncated_torch_save_files_are_refused() {
    let valid = std::fs::read(path("training.pth")).unwrap();
    for cut in [0.05, 0.3, 0.6, 0.95, 0.999] {
        let n = (valid.len() as f64 * cut) as usize;
        refuse(&valid[..n], &format!("cut at {n}"));
    }
}

#[test]
fn a_storage_of_absurd_size_is_refused_without_allocating() {
    // numel 2^40 floats declared; the file holds 16 bytes.
    let mut p = tensor_pickle(4, 0, &[2], &[1]);
    let at = p.windows(5).position(|w| w == b"cpuK\x04").unwrap() + 3;
    p.splice(at..at + 2, [0x8a, 6, 0, 0, 0, 0, 0, 1]);
    let message = refuse(&archive(&p, &[("0", &[0u8; 16])]), "absurd storage");
    assert!(message.contains("storage 0"), "{message}");
    assert!(Path::new("/").exists());
}
