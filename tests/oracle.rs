//! PyTorch as the oracle (`scripts/oracle.py`): for the fixtures, files PyTorch
//! writes for the occasion, files crafted at the pickle level and mutations of
//! all of them, what `transplant inspect --json --digest` reads must be what
//! PyTorch reads (names, dtypes, shapes, SHA-256 of the bytes), or transplant
//! must refuse the file. `TRANSPLANT_ORACLE_MUTANTS` (default 2) sets how many
//! mutations of each archive; `scripts/fuzz.sh` runs a larger corpus.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn oracle(transplant: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join(".venv/bin/python"))
        .args(["-W", "ignore"])
        .arg(root.join("scripts/oracle.py"))
        .arg("--transplant")
        .arg(transplant)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("the venv's python runs (scripts/setup.sh)");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn transplant_reads_what_pytorch_reads_or_refuses() {
    let out = tempfile::tempdir().unwrap();
    let mutants = std::env::var("TRANSPLANT_ORACLE_MUTANTS").unwrap_or_else(|_| "2".into());
    let fixtures = common::fixtures();
    let (ok, text) = oracle(
        Path::new(env!("CARGO_BIN_EXE_transplant")),
        out.path(),
        &["--fixtures", fixtures.to_str().unwrap(), "--max-size", "4000000", "--mutants", &mutants],
    );
    println!("{text}");
    assert!(ok, "transplant and PyTorch disagree:\n{text}");
    assert!(text.contains(" agree,"), "no counts printed:\n{text}");
}

/// The oracle itself fails when what it is told differs from PyTorch: a
/// transplant that reports one digest wrong is caught.
#[test]
fn the_oracle_catches_a_wrong_digest() {
    let out = tempfile::tempdir().unwrap();
    let liar = out.path().join("lying-transplant");
    std::fs::write(
        &liar,
        format!(
            "#!/bin/sh\n\"{}\" \"$@\" | sed '0,/\"sha256\": \"[0-9a-f]/s//\"sha256\": \"x/'\n",
            env!("CARGO_BIN_EXE_transplant")
        ),
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&liar).unwrap().permissions(), 0o755);
    let mut permissions = std::fs::metadata(&liar).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&liar, permissions).unwrap();
    let (ok, text) = oracle(&liar, &out.path().join("corpus"), &["--mutants", "0"]);
    assert!(!ok, "the oracle passed a transplant that lies:\n{text}");
    assert!(text.contains("DISAGREE") && text.contains("sha256"), "{text}");
}
