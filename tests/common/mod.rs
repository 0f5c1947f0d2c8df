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
