//! TorchScript files that run code when loaded, and archives whose records
//! lie: `inspect`, `plan`, `diff`, `copy` and `convert` read them as archives
//! and run none of their code; a record shorter than its tensors, as target or
//! as source, `.pt` or `.ot`, is a clean error, never a crash or heap bytes in
//! OUT; a zip naming one member twice is refused.
//!
//! The fixtures (`hostile/`, by `make_fixtures.py`) create `hostile/NAME.marker`
//! when their code runs; each test first shows, through libtorch's loader, that
//! it does.
use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{file_hash, fixture, transplant};
use transplant::{ModuleStore, Source};

fn marker(name: &str) -> PathBuf {
    fixture(&format!("hostile/{name}.marker"))
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Loading `name` through libtorch runs its code: the marker appears.
fn runs_code_when_loaded(name: &str) -> ModuleStore {
    let _ = std::fs::remove_file(marker(name));
    let loaded = ModuleStore::open(fixture(&format!("hostile/{name}.pt"))).unwrap();
    assert!(
        marker(name).exists(),
        "{name}.pt ran no code when libtorch loaded it: the fixture proves nothing"
    );
    std::fs::remove_file(marker(name)).unwrap();
    loaded
}

/// Every command but `verify` on a file whose code writes a file when run:
/// each succeeds, and the file is never written.
#[test]
fn files_whose_code_writes_a_file_are_read_without_running_it() {
    for name in ["trapped", "edited"] {
        let live = runs_code_when_loaded(name);
        let pt = fixture(&format!("hostile/{name}.pt"));
        let before = file_hash(&pt);
        let source = fixture("hostile/source.safetensors");
        let dir = tempfile::tempdir().unwrap();
        let (out_pt, out_st) = (dir.path().join("out.pt"), dir.path().join("out.safetensors"));
        let converted = dir.path().join("converted.safetensors");
        let halved = dir.path().join("halved.pt");
        let runs: Vec<Vec<&str>> = vec![
            vec!["inspect", s(&pt)],
            vec!["inspect", "--json", s(&pt)],
            vec!["plan", s(&source), s(&pt)],
            vec!["diff", s(&pt), s(&source)],
            vec!["copy", s(&source), s(&pt), "-o", s(&out_pt), "--strict"],
            vec!["copy", s(&pt), s(&source), "-o", s(&out_st), "--strict"],
            vec!["convert", s(&pt), "-o", s(&converted)],
            vec!["copy", s(&source), s(&pt), "-o", s(&halved), "--dtype", "f16", "--allow-lossy"],
        ];
        for args in runs {
            let run = transplant(&args);
            assert!(
                run.code == 0 || (args[0] == "diff" && run.code == 3),
                "{args:?}: {}\n{}",
                run.stdout,
                run.stderr
            );
            assert!(!marker(name).exists(), "{name}.pt ran its code under `transplant {}`", args.join(" "));
        }
        assert_eq!(file_hash(&pt), before, "{name}.pt changed");
        // What was read is what libtorch's loader gives, and the rewritten
        // archive holds the source's values (read back as an archive too).
        let archive = transplant::open(&pt).unwrap();
        let names: Vec<String> = archive.entries().iter().map(|e| e.name.to_string()).collect();
        assert_eq!(names, live.entries().iter().map(|e| e.name.to_string()).collect::<Vec<_>>());
        let written = transplant::open(&out_pt).unwrap();
        let want = transplant::open(&source).unwrap();
        for (i, entry) in written.entries().iter().enumerate() {
            let j = want.entries().iter().position(|e| e.name == entry.name).unwrap();
            assert!(common::bit_equal(written.tensor(i).unwrap(), want.tensor(j).unwrap()), "{}", entry.name);
        }
        assert!(!marker(name).exists());
    }
}

/// A submodule that keeps its state through its own `__setstate__` holds
/// tensors only its code can name: refused by name, never skipped silently,
/// and nothing run.
#[test]
fn a_module_restoring_its_own_state_is_refused_not_skipped() {
    let live = runs_code_when_loaded("self_restoring");
    assert!(live.entries().iter().any(|e| e.name == "inner.weight"), "{:?}", live.entries());
    let pt = fixture("hostile/self_restoring.pt");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pt");
    for args in [vec!["inspect", s(&pt)], vec!["copy", s(&pt), s(&pt), "-o", s(&out)]] {
        let run = transplant(&args);
        assert_eq!(run.code, 1, "{args:?}: {}\n{}", run.stdout, run.stderr);
        assert!(
            run.stderr.contains("module inner") && run.stderr.contains("__setstate__"),
            "{args:?}: {}",
            run.stderr
        );
        assert!(!marker("self_restoring").exists(), "its code ran under {args:?}");
    }
    assert!(!out.exists());
}

fn write_zip(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in members {
        zip.start_file(name.as_str(), options).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
}

/// `path` with its largest storage record cut to 4 bytes (the zip stays
/// valid); the record's name.
fn with_short_record(path: &Path, out: &Path) -> String {
    let mut all = common::zip_members(path);
    let record = all
        .iter_mut()
        .filter(|(n, _)| n.contains("/data/"))
        .max_by_key(|(_, d)| d.len())
        .expect("a storage record");
    record.1.truncate(4);
    let name = record.0.clone();
    write_zip(out, &all);
    name
}

#[test]
fn records_shorter_than_their_tensors_are_clean_errors_as_targets_and_sources() {
    let dir = tempfile::tempdir().unwrap();
    let good_pt = fixture("bn_net_b.pt");
    let good_ot = dir.path().join("good.ot");
    let run = transplant(["convert", s(&good_pt), "-o", s(&good_ot)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let source = fixture("bn_net_a.pt");
    for (kind, good) in [("pt", &good_pt), ("ot", &good_ot)] {
        let short = dir.path().join(format!("short.{kind}"));
        let record = with_short_record(good, &short);
        let before = file_hash(&short);
        let out = dir.path().join(format!("out.{kind}"));
        let from_short = dir.path().join("from_short.pt");
        for args in [
            vec!["inspect", s(&short)],
            vec!["copy", s(&source), s(&short), "-o", s(&out)],
            vec!["copy", s(&short), s(&good_pt), "-o", s(&from_short)],
        ] {
            let run = transplant(&args);
            assert_eq!(run.code, 1, "{args:?}: {}\n{}", run.stdout, run.stderr);
            assert!(
                run.stderr.contains(s(&short)) && run.stderr.contains(&record),
                "{args:?}: the error names neither the file nor the record:\n{}",
                run.stderr
            );
        }
        assert!(!out.exists() && !from_short.exists(), "an output was written");
        assert_eq!(file_hash(&short), before);
    }
}

#[test]
fn an_archive_naming_a_member_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = common::zip_members(&fixture("bn_net_b.pt"));
    let record = all.iter().find(|(n, _)| n.ends_with("/data/0")).unwrap().clone();
    all.push((record.0, vec![0; record.1.len()]));
    let twice = dir.path().join("twice.pt");
    write_zip(&twice, &all);
    let out = dir.path().join("out.pt");
    for args in
        [vec!["inspect", s(&twice)], vec!["copy", s(&fixture("bn_net_a.pt")), s(&twice), "-o", s(&out)]]
    {
        let run = transplant(&args);
        assert_eq!(run.code, 1, "{args:?}: {}\n{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("twice"), "{args:?}: {}", run.stderr);
    }
    assert!(!out.exists());
}
