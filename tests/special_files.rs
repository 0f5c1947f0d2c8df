//! Inputs that are not regular files — a FIFO (opening it would wait for a
//! writer), a device that never ends (`/dev/zero`) — are refused at once, by
//! every command and for every kind of input file: models, shards, rules, plans.
use crate::common;

use std::ffi::CString;
use std::path::Path;
use std::process::Command;

use common::fixture;

fn mkfifo(path: &Path) {
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

/// Runs the binary under `timeout`: a hang shows as exit 124.
fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_transplant"))
        .args(args)
        .output()
        .expect("timeout runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn fifos_and_endless_devices_are_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.fifo");
    mkfifo(&fifo);
    // A sharded index whose one shard is a FIFO.
    let shard = dir.path().join("model-00001-of-00001.safetensors");
    mkfifo(&shard);
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#).unwrap();
    let (src, dst) = (fixture("bn_net_a.pt"), fixture("bn_net_b.pt"));
    let (src, dst, fifo, index) =
        (src.to_str().unwrap(), dst.to_str().unwrap(), fifo.to_str().unwrap(), index.to_str().unwrap());
    let out = dir.path().join("out.pt");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["inspect", fifo], "model.fifo"),
        (vec!["inspect", index], "model-00001-of-00001.safetensors"),
        (vec!["plan", src, dst, "--rules", fifo], "model.fifo"),
        (vec!["plan", src, dst, "--rules", "/dev/zero"], "/dev/zero"),
        (vec!["copy", src, dst, "-o", out, "--plan", "/dev/zero"], "/dev/zero"),
        (vec!["copy", src, fifo, "-o", out], "model.fifo"),
    ];
    for (args, names) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, 1, "{args:?} exited {code}: {stderr}");
        assert!(stderr.contains(names) && stderr.contains("not a regular file"), "{args:?}: {stderr}");
    }
    assert!(!Path::new(out).exists());
}

#[test]
fn rules_and_plan_files_have_size_bounds() {
    let dir = tempfile::tempdir().unwrap();
    // 17 MB of comment lines: over the 16 MB bound of a rules file.
    let rules = dir.path().join("rules.txt");
    std::fs::write(&rules, "# padding\n".repeat(17 << 17)).unwrap();
    let (src, dst) = (fixture("bn_net_a.pt"), fixture("bn_net_b.pt"));
    let (code, stderr) =
        run(&["plan", src.to_str().unwrap(), dst.to_str().unwrap(), "--rules", rules.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("rules.txt") && stderr.contains("the most a rules file may be"), "{stderr}");
}
