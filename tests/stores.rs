//! Stores: VarStores, TorchScript modules and checkpoint files seen through one
//! trait; names, roles, shapes, dtypes and bytes equal to what PyTorch reports;
//! what we write, PyTorch / numpy / safetensors read back equal.
use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{expected_records, fixture, read_back, record, sorted, store_records};
use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};
use transplant::{Checkpoint, Format, ModuleStore, Role, Source, StoreKind, Summary, Target, VarStoreView};

fn error_of<T: std::fmt::Debug>(result: transplant::Result<T>) -> String {
    result.expect_err("should fail").to_string()
}

#[test]
fn safetensors_reads_every_dtype_with_its_metadata() {
    let checkpoint = Checkpoint::open(fixture("dtypes.safetensors")).unwrap();
    assert_eq!(checkpoint.kind(), StoreKind::Checkpoint(Format::Safetensors));
    let (want, metadata) = expected_records("dtypes.safetensors");
    assert_eq!(sorted(store_records(&checkpoint)), sorted(want));
    assert_eq!(checkpoint.metadata(), &metadata);
}

#[test]
fn safetensors_tensors_are_writable_without_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.safetensors");
    std::fs::copy(fixture("dtypes.safetensors"), &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let index = checkpoint.entries().iter().position(|e| e.name == "float32").unwrap();
    let mut handle = checkpoint.tensor(index).unwrap().shallow_clone();
    let _ = handle.fill_(7.0);
    assert_eq!(
        checkpoint.tensor(index).unwrap().double_value(&[1, 1]),
        7.0,
        "the store's own tensor changed"
    );
    drop(checkpoint);
    drop(handle);
    assert_eq!(std::fs::read(&path).unwrap(), before, "the file changed");
}

#[test]
fn mapped_tensors_outlive_their_store() {
    let checkpoint = Checkpoint::open(fixture("dtypes.safetensors")).unwrap();
    let index = checkpoint.entries().iter().position(|e| e.name == "float64").unwrap();
    let want = record("float64", checkpoint.tensor(index).unwrap());
    let kept = checkpoint.tensor(index).unwrap().shallow_clone();
    drop(checkpoint);
    assert_eq!(record("float64", &kept), want);
}

#[test]
fn npz_reads_every_numpy_dtype_in_archive_order() {
    for file in ["dtypes.npz", "dtypes_compressed.npz"] {
        let checkpoint = Checkpoint::open(fixture(file)).unwrap();
        assert_eq!(checkpoint.kind(), StoreKind::Checkpoint(Format::Npz));
        assert_eq!(store_records(&checkpoint), expected_records(file).0, "{file}");
    }
}

#[test]
fn sharded_checkpoint_reads_as_one_store() {
    let file = "sharded/model.safetensors.index.json";
    let checkpoint = Checkpoint::open(fixture(file)).unwrap();
    assert_eq!(checkpoint.kind(), StoreKind::Checkpoint(Format::SafetensorsIndex));
    let (want, metadata) = expected_records(file);
    assert_eq!(want.len(), 20);
    assert_eq!(sorted(store_records(&checkpoint)), sorted(want));
    assert_eq!(checkpoint.metadata(), &metadata);
    // Files do not record roles: BatchNorm statistics and integer tensors are inferred buffers.
    let role = |name: &str| checkpoint.entries().iter().find(|e| e.name == name).unwrap().role;
    assert_eq!(role("features.0.bn.running_var"), Role::Buffer);
    assert_eq!(role("features.0.bn.num_batches_tracked"), Role::Buffer);
    assert_eq!(role("features.0.bn.weight"), Role::Parameter);
}

/// A copy of the sharded fixture in a temporary folder, to break.
fn sharded_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("sharded")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let index = dir.path().join("model.safetensors.index.json");
    (dir, index)
}

#[test]
fn missing_shard_is_an_error_naming_index_and_shard() {
    let (dir, index) = sharded_copy();
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let message = error_of(Checkpoint::open(&index));
    assert!(message.contains("model.safetensors.index.json"), "{message}");
    assert!(message.contains("model-00002-of-00003.safetensors") && message.contains("missing"), "{message}");
}

#[test]
fn tensor_named_in_index_but_absent_from_its_shard_is_an_error_naming_both() {
    let (_dir, index) = sharded_copy();
    let mut root: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    root["weight_map"]["ghost.weight"] = "model-00003-of-00003.safetensors".into();
    std::fs::write(&index, root.to_string()).unwrap();
    let message = error_of(Checkpoint::open(&index));
    assert!(message.contains("model.safetensors.index.json"), "{message}");
    assert!(message.contains("model-00003-of-00003.safetensors"), "{message}");
    assert!(message.contains("ghost.weight"), "{message}");
}

#[test]
fn shard_outside_the_index_folder_is_refused() {
    let (_dir, index) = sharded_copy();
    let mut root: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    root["weight_map"]["head.1.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(&index, root.to_string()).unwrap();
    let message = error_of(Checkpoint::open(&index));
    assert!(message.contains("../elsewhere.safetensors"), "{message}");
}

#[test]
fn written_safetensors_read_back_equal_in_python_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = Checkpoint::open(fixture("dtypes.safetensors")).unwrap();
    let out = dir.path().join("out.safetensors");
    checkpoint.save(&out).unwrap();
    let (want, metadata) = expected_records("dtypes.safetensors");
    let (got, got_metadata) = read_back(&out);
    assert_eq!(sorted(got), sorted(want));
    assert_eq!(got_metadata, metadata);
}

#[test]
fn written_npz_reads_back_equal_in_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = Checkpoint::open(fixture("dtypes.npz")).unwrap();
    let out = dir.path().join("out.npz");
    checkpoint.save(&out).unwrap();
    assert_eq!(read_back(&out).0, expected_records("dtypes.npz").0);
    // And we read our own output the same way.
    assert_eq!(store_records(&Checkpoint::open(&out).unwrap()), expected_records("dtypes.npz").0);
}

#[test]
fn npz_cannot_hold_bfloat16_and_says_which_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = Checkpoint::open(fixture("dtypes.safetensors")).unwrap();
    let out = dir.path().join("out.npz");
    let message = error_of(checkpoint.save(&out));
    assert!(message.contains("bfloat16") && message.contains(&out.display().to_string()), "{message}");
    assert!(!out.exists(), "a failed write left {}", out.display());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary files left behind");
}

#[test]
fn sharded_checkpoint_saves_as_one_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = Checkpoint::open(fixture("sharded/model.safetensors.index.json")).unwrap();
    let out = dir.path().join("merged.safetensors");
    checkpoint.save(&out).unwrap();
    let (want, _) = expected_records("sharded/model.safetensors.index.json");
    assert_eq!(sorted(read_back(&out).0), sorted(want));
}

/// A small tch model with BatchNorm: conv → bn2d → linear.
fn tch_model(vs: &nn::VarStore) -> impl ModuleT {
    let root = vs.root();
    nn::seq_t()
        .add(nn::conv2d(&root / "conv", 3, 4, 3, Default::default()))
        .add(nn::batch_norm2d(&root / "bn", 4, Default::default()))
        .add_fn(|x| x.flatten(1, -1))
        .add(nn::linear(&root / "fc", 4 * 6 * 6, 2, Default::default()))
}

fn roles(view: &VarStoreView) -> BTreeMap<String, Role> {
    view.entries().iter().map(|e| (e.name.to_string(), e.role)).collect()
}

#[test]
fn varstore_batchnorm_statistics_are_buffers_before_and_after_freeze() {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = tch_model(&vs);
    let _ = model.forward_t(&Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu)), true);
    let want: BTreeMap<String, Role> = [
        ("conv.weight", Role::Parameter),
        ("conv.bias", Role::Parameter),
        ("bn.weight", Role::Parameter),
        ("bn.bias", Role::Parameter),
        ("bn.running_mean", Role::Buffer),
        ("bn.running_var", Role::Buffer),
        ("fc.weight", Role::Parameter),
        ("fc.bias", Role::Parameter),
    ]
    .into_iter()
    .map(|(n, r)| (n.to_string(), r))
    .collect();
    let view = VarStoreView::new(&vs).unwrap();
    assert_eq!(roles(&view), want);
    let names: Vec<&str> = view.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "fc.weight",
            "fc.bias"
        ],
        "state_dict order: modules in registration order, parameters then buffers"
    );
    vs.freeze();
    assert_eq!(
        roles(&VarStoreView::new(&vs).unwrap()),
        want,
        "freeze() must not turn parameters into buffers"
    );
}

#[test]
fn varstore_handles_write_into_the_variables() {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = nn::linear(vs.root() / "fc", 3, 2, Default::default());
    let view = VarStoreView::new(&vs).unwrap();
    let index = view.entries().iter().position(|e| e.name == "fc.bias").unwrap();
    let _guard = tch::no_grad_guard();
    let _ = view.tensor(index).unwrap().shallow_clone().fill_(0.5);
    let out = model.forward(&Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)));
    assert_eq!(out.double_value(&[0, 1]), 0.5);
}

#[test]
fn varstore_saves_an_ot_file_that_tch_and_pytorch_read_back_equal() {
    tch::manual_seed(1);
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = tch_model(&vs);
    let _ = model.forward_t(&Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu)), true);
    let view = VarStoreView::new(&vs).unwrap();
    let want = sorted(store_records(&view));
    let out = dir.path().join("model.ot");
    view.save(&out).unwrap();

    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_eq!(checkpoint.kind(), StoreKind::Checkpoint(Format::TchArchive));
    assert_eq!(sorted(store_records(&checkpoint)), want);
    assert_eq!(sorted(read_back(&out).0), want, "PyTorch reads the .ot (a TorchScript archive) back equal");

    let mut other = nn::VarStore::new(Device::Cpu);
    let _ = tch_model(&other);
    other.load(&out).unwrap();
    assert_eq!(sorted(store_records(&VarStoreView::new(&other).unwrap())), want, "VarStore::load reads it");
}

#[test]
fn module_store_lists_the_state_dict_and_saves_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let module = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    assert_eq!(module.kind(), StoreKind::Module);
    let listed: Vec<(String, String)> =
        module.entries().iter().map(|e| (e.name.to_string(), e.role.to_string())).collect();
    let text = std::fs::read_to_string(fixture("bn_net.entries.json")).unwrap();
    let pytorch: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let pytorch: Vec<(String, String)> = pytorch
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["role"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(listed, pytorch);

    let out = dir.path().join("module.pt");
    module.save(&out).unwrap();
    assert_eq!(read_back(&out).0, store_records(&module), "torch.jit.load reads the saved module back equal");
}

#[test]
fn open_finds_the_kind_from_content_not_extension() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("dtypes.safetensors", "weights.bin", StoreKind::Checkpoint(Format::Safetensors)),
        ("dtypes.npz", "weights.pt", StoreKind::Checkpoint(Format::Npz)),
        ("bn_net_a.pt", "model.safetensors", StoreKind::Module),
    ];
    for (source, name, kind) in cases {
        let path = dir.path().join(name);
        std::fs::copy(fixture(source), &path).unwrap();
        assert_eq!(transplant::open(&path).unwrap().kind(), kind, "{source} as {name}");
    }
    let saved = dir.path().join("state.safetensors");
    std::fs::copy(fixture("not_a_module.pt"), &saved).unwrap();
    assert_eq!(transplant::open(&saved).unwrap().kind(), StoreKind::Checkpoint(Format::TorchSave));
}

#[test]
fn summary_counts_roles_dtypes_and_bytes() {
    let module = ModuleStore::open(fixture("bn_net_a.pt")).unwrap();
    let summary = Summary::of(&module);
    assert_eq!(summary.tensors, 20);
    let buffers: usize = summary.totals.iter().filter(|t| t.role == Role::Buffer).map(|t| t.tensors).sum();
    assert_eq!(buffers, 10);
    let int64 = summary.totals.iter().find(|t| t.dtype == "int64").unwrap();
    assert_eq!((int64.role, int64.tensors, int64.bytes), (Role::Buffer, 3, 24), "three num_batches_tracked");
    let bytes: u64 = module.entries().iter().map(|e| e.bytes()).sum();
    assert_eq!(summary.bytes, bytes);
    let text = summary.to_string();
    assert!(text.contains("features.1.0.bn.running_var") && text.contains("TorchScript module"), "{text}");
    let json: serde_json::Value = serde_json::to_value(&summary).unwrap();
    assert_eq!(json["entries"][0]["name"], "temperature");
    assert_eq!(json["entries"][0]["role"], "buffer");
    assert_eq!(json["entries"][0]["dtype"], "float32");
    assert_eq!(json["entries"][0]["device"], "cpu");
    assert_eq!(json["tensors"], 20);
}

// --- bad input: every case an error naming the file, never a panic or abort ---

fn assert_refused(path: &Path, what: &str) {
    match transplant::open(path) {
        Ok(_) => panic!("{what}: {} opened", path.display()),
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{what}: {message}");
        }
    }
}

fn safetensors_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn hostile_safetensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let valid = std::fs::read(fixture("dtypes.safetensors")).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [1, 7, 8, 9, 100, valid.len() / 2, valid.len() - 1] {
        cases.push((format!("truncated at {cut}"), valid[..cut].to_vec()));
    }
    cases.push((
        "offsets past the end".into(),
        safetensors_with_header(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 8]),
    ));
    let mut too_long = 1_000_000u64.to_le_bytes().to_vec();
    too_long.extend_from_slice(b"{\"w\":{}}");
    cases.push(("header longer than the file".into(), too_long));
    cases.push((
        "unknown dtype".into(),
        safetensors_with_header(r#"{"w":{"dtype":"X9","shape":[2],"data_offsets":[0,8]}}"#, &[0u8; 8]),
    ));
    cases.push((
        "shape disagrees with offsets".into(),
        safetensors_with_header(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0u8; 8]),
    ));
    cases.push((
        "overlapping tensors".into(),
        safetensors_with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0u8; 12],
        ),
    ));
    cases.push(("header is not JSON".into(), safetensors_with_header("{not json", &[])));
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        assert_refused(&path, what);
    }
}

#[test]
fn empty_files_folders_and_unknown_content_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert_refused(&empty, "empty file");
    assert!(error_of(transplant::open(&empty).map(|_| ())).contains("empty"));
    assert_refused(dir.path(), "a directory");
    let text = dir.path().join("notes.pt");
    std::fs::write(&text, b"just some text, not a model\n").unwrap();
    assert_refused(&text, "text");
    assert!(error_of(transplant::open(&text).map(|_| ())).contains("unknown file kind"));
    let missing = dir.path().join("missing.safetensors");
    assert_refused(&missing, "missing file");
}

#[test]
fn hostile_npz_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let valid = std::fs::read(fixture("dtypes.npz")).unwrap();
    for cut in [10, valid.len() / 3, valid.len() - 30] {
        let path = dir.path().join(format!("cut{cut}.npz"));
        std::fs::write(&path, &valid[..cut]).unwrap();
        assert_refused(&path, &format!("npz truncated at {cut}"));
    }
}

#[test]
fn tch_archive_is_told_from_a_module_by_content() {
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = nn::linear(vs.root() / "fc", 3, 2, Default::default());
    let ot = dir.path().join("weights.ot");
    VarStoreView::new(&vs).unwrap().save(&ot).unwrap();
    let renamed = dir.path().join("weights.pt");
    std::fs::copy(&ot, &renamed).unwrap();
    assert_eq!(transplant::open(&renamed).unwrap().kind(), StoreKind::Checkpoint(Format::TchArchive));
    let module = dir.path().join("module.ot.pt");
    std::fs::copy(fixture("bn_net_a.pt"), &module).unwrap();
    assert_eq!(transplant::open(&module).unwrap().kind(), StoreKind::Module);
}
