//! Shared by the integration tests: where the fixtures are, and small helpers.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::PathBuf;

use tch::{Kind, Tensor};

/// The folder `scripts/make_fixtures.py` wrote (`TRANSPLANT_FIXTURES` overrides).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("TRANSPLANT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fixtures"));
    assert!(
        dir.join("COMPLETE").exists(),
        "no fixtures in {}: run `.venv/bin/python scripts/make_fixtures.py` (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A fixture file by name.
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The tensors of a safetensors file written by the fixture script.
pub fn expected(name: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixture(name)).expect("readable expected-output file")
}

/// One tensor of a safetensors file written by the fixture script.
pub fn expected_tensor(file: &str, name: &str) -> Tensor {
    expected(file)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{file} has no tensor {name}"))
        .1
}

/// PyTorch's name of a dtype (`str(torch.float32)` without `torch.`).
pub fn torch_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Int16 => "int16",
        Kind::Int8 => "int8",
        Kind::Uint8 => "uint8",
        Kind::Bool => "bool",
        other => panic!("no PyTorch name in the fixtures for {other:?}"),
    }
}

/// True when both tensors have the same shape, dtype and bytes.
pub fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

/// One tensor as the fixture script and `scripts/read_back.py` describe it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub sha256: String,
}

/// sha256 of a tensor's bytes, contiguous, little-endian (what the Python side hashes).
pub fn sha256_hex(tensor: &Tensor) -> String {
    use sha2::{Digest, Sha256};
    let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
    let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; len];
    if len > 0 {
        tensor.copy_data_u8(&mut bytes, tensor.numel());
    }
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn record(name: &str, tensor: &Tensor) -> Record {
    Record {
        name: name.to_string(),
        dtype: torch_dtype_name(tensor.kind()).to_string(),
        shape: tensor.size(),
        sha256: sha256_hex(tensor),
    }
}

/// Every tensor of a store, described.
pub fn store_records(store: &dyn transplant::Source) -> Vec<Record> {
    store
        .entries()
        .iter()
        .enumerate()
        .map(|(i, e)| record(&e.name, store.tensor(i).expect("tensor of entry")))
        .collect()
}

/// Tensors and metadata of one file's entry in an expected-values JSON document.
pub fn parse_records(value: &serde_json::Value) -> (Vec<Record>, std::collections::BTreeMap<String, String>) {
    let tensors = value["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| Record {
            name: t["name"].as_str().unwrap().to_string(),
            dtype: t["dtype"].as_str().unwrap().to_string(),
            shape: t["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect(),
            sha256: t["sha256"].as_str().unwrap().to_string(),
        })
        .collect();
    let metadata = value["metadata"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    (tensors, metadata)
}

/// What the fixture script wrote into `file`: tensors in writer's order, metadata.
pub fn expected_records(file: &str) -> (Vec<Record>, std::collections::BTreeMap<String, String>) {
    let text = std::fs::read_to_string(fixture("formats.expected.json")).expect("formats.expected.json");
    let all: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    parse_records(&all[file])
}

/// What PyTorch / numpy / safetensors read from `path` (through scripts/read_back.py).
pub fn read_back(path: &std::path::Path) -> (Vec<Record>, std::collections::BTreeMap<String, String>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/read_back.py"))
        .arg(path)
        .output()
        .expect("the venv's python runs (scripts/setup.sh)");
    assert!(
        output.status.success(),
        "read_back.py {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_records(&serde_json::from_slice(&output.stdout).expect("read_back.py prints JSON"))
}

/// [`read_back`] of several files with one Python process: each file's records.
pub fn read_back_all(
    paths: &[std::path::PathBuf],
) -> std::collections::HashMap<std::path::PathBuf, (Vec<Record>, std::collections::BTreeMap<String, String>)>
{
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/read_back.py"))
        .args(paths)
        .output()
        .expect("the venv's python runs (scripts/setup.sh)");
    assert!(output.status.success(), "read_back.py: {}", String::from_utf8_lossy(&output.stderr));
    let all: serde_json::Value = serde_json::from_slice(&output.stdout).expect("read_back.py prints JSON");
    if paths.len() == 1 {
        return [(paths[0].clone(), parse_records(&all))].into_iter().collect();
    }
    paths.iter().map(|p| (p.clone(), parse_records(&all[p.to_str().expect("UTF-8 path")]))).collect()
}

/// Sorted copy, for formats whose order is not the writer's.
pub fn sorted(mut records: Vec<Record>) -> Vec<Record> {
    records.sort();
    records
}

/// One run of the `transplant` binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout parsed as the one JSON document `--json` promises.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", self.stdout))
    }
}

/// Runs the built `transplant` binary with `args`.
pub fn transplant<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_transplant"))
        .args(args)
        .output()
        .expect("the transplant binary runs");
    Run {
        code: output.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// sha256 of a file's bytes.
pub fn file_hash(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The members of a zip archive, in order: name and bytes.
pub fn zip_members(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
            (f.name().to_string(), bytes)
        })
        .collect()
}

/// Runs `script` with the venv's python (`sys.argv[1:]` = `args`), asserting it succeeds.
pub fn python(script: &str, args: &[&std::path::Path]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("the venv's python runs (scripts/setup.sh)");
    assert!(output.status.success(), "python: {}", String::from_utf8_lossy(&output.stderr));
}

/// What `transplant inspect --json --digest` says of `path`: each entry as a [`Record`].
pub fn inspected(path: &std::path::Path) -> Vec<Record> {
    let run = transplant(["inspect".as_ref(), path.as_os_str(), "--json".as_ref(), "--digest".as_ref()]);
    assert_eq!(run.code, 0, "inspect {}: {}", path.display(), run.stderr);
    let json = run.json();
    json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| Record {
            name: e["name"].as_str().unwrap().to_string(),
            dtype: e["dtype"].as_str().unwrap().to_string(),
            shape: e["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect(),
            sha256: e["sha256"].as_str().expect("sha256 with --digest").to_string(),
        })
        .collect()
}

/// `transplant ARGS` run under `scripts/peak_rss.py`: its run (stdout is not
/// kept) and its peak resident set size in bytes, measured from a small
/// parent so that the figure is the command's own.
pub fn transplant_measured(args: &[&str]) -> (Run, u64) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/peak_rss.py"))
        .arg(env!("CARGO_BIN_EXE_transplant"))
        .args(args)
        .output()
        .expect("the venv's python runs");
    let rss = String::from_utf8_lossy(&output.stdout).trim().parse().expect("peak_rss.py prints a number");
    let run = Run {
        code: output.status.code().expect("exited, not killed by a signal"),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    (run, rss)
}
