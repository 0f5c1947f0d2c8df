//! TorchScript files read as archives, running none of their code: on every
//! TorchScript fixture (scripted, traced, timm's, nested, tied), the names,
//! roles, shapes, dtypes, order and values equal what libtorch's loader gives.
mod common;

use std::path::{Path, PathBuf};

use common::{bit_equal, fixtures};
use transplant::{ModuleStore, Source};

fn script_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            script_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "pt")
            && transplant::sniff(&path).ok() == Some(transplant::Format::TorchScript)
        {
            out.push(path);
        }
    }
}

#[test]
fn every_torchscript_fixture_reads_as_libtorch_loads_it() {
    let mut files = Vec::new();
    script_files(&fixtures(), &mut files);
    assert!(files.len() >= 20, "{} TorchScript fixtures", files.len());
    for file in files {
        let shim = ModuleStore::open(&file).unwrap();
        let archive = transplant::fuzzing::read_script_archive(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let want: Vec<(String, transplant::Role, Vec<i64>, tch::Kind)> =
            shim.entries().iter().map(|e| (e.name.to_string(), e.role, e.shape.clone(), e.dtype)).collect();
        let got: Vec<(String, transplant::Role, Vec<i64>, tch::Kind)> =
            archive.iter().map(|(n, r, t)| (n.clone(), *r, t.size(), t.kind())).collect();
        assert_eq!(got, want, "{}", file.display());
        for (i, (name, _, t)) in archive.iter().enumerate() {
            assert!(bit_equal(t, shim.tensor(i).unwrap()), "{}: {name}", file.display());
        }
    }
}
