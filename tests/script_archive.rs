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
        // Files that run code when loaded: tests/hostile_archives.rs.
        if path.is_dir() && path.file_name().is_some_and(|n| n == "hostile") {
            continue;
        }
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

/// A copy into a TorchScript file read as an archive rewrites the archive:
/// the result loads in libtorch and computes what the libtorch path's result
/// computes; every member but the storage records is byte-identical.
#[test]
fn a_copy_into_an_archive_rewrites_it_and_the_result_loads_and_computes_alike() {
    use transplant::{copy, Mapping, Plan, Policy, ScriptArchive, Target};
    let dir = tempfile::tempdir().unwrap();
    let source = transplant::open(common::fixture("bn_net_a.pt")).unwrap();
    let mut archive = ScriptArchive::open(common::fixture("bn_net_b.pt")).unwrap();
    let plan = Plan::build(source.as_ref(), &archive, &Mapping::default()).unwrap();
    copy(&plan, source.as_ref(), &mut archive, &Policy::default()).unwrap();
    let out = dir.path().join("rewritten.pt");
    archive.save(&out).unwrap();
    // The original file is untouched.
    let original = ModuleStore::open(common::fixture("bn_net_b.pt")).unwrap();
    let mut rewritten = ModuleStore::open(&out).unwrap();
    rewritten.module_mut().set_training(false).unwrap();
    let input = common::expected_tensor("bn_net.expected.safetensors", "input");
    let got = rewritten.module().forward(&[input]).unwrap().remove(0);
    assert!(got.equal(&common::expected_tensor("bn_net.expected.safetensors", "output_a")));
    assert!(!bit_equal(original.tensor(1).unwrap(), rewritten.tensor(1).unwrap()));
    // Members other than data records are byte-identical, in the same order.
    let members = |p: &Path| {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(p).unwrap()).unwrap();
        (0..zip.len())
            .map(|i| {
                let mut f = zip.by_index(i).unwrap();
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
                (f.name().to_string(), bytes)
            })
            .collect::<Vec<_>>()
    };
    let (before, after) = (members(&common::fixture("bn_net_b.pt")), members(&out));
    assert_eq!(
        before.iter().map(|m| &m.0).collect::<Vec<_>>(),
        after.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        if !name.contains("/data/") {
            assert_eq!(a, b, "{name}");
        }
    }
}
