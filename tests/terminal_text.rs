//! Text from files reaches the terminal escaped: a tensor name cannot forge a
//! line of the report or send escape sequences; JSON keeps names exact; and
//! `inspect`'s name column is padded whatever the names.
use crate::common;

use std::collections::BTreeMap;

use common::transplant;
use tch::{Device, Kind, Tensor};
use transplant::{Checkpoint, Format, Target};

const FORGED: &str = "a\nverdict: complete";
const COLOURED: &str = "\u{1b}[31mred";

fn write(path: &std::path::Path, names: &[&str]) {
    let tensors =
        names.iter().map(|n| (n.to_string(), Tensor::ones([2], (Kind::Float, Device::Cpu)))).collect();
    Checkpoint::from_tensors("hostile", Format::Safetensors, tensors, BTreeMap::new())
        .unwrap()
        .save(path)
        .unwrap();
}

#[test]
fn names_with_control_characters_are_escaped_in_text_and_exact_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.safetensors"), dir.path().join("dst.safetensors"));
    write(&src, &[FORGED, COLOURED]);
    write(&dst, &["other.weight", "more.weight"]);
    let run = transplant(["plan", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let verdicts = run.stdout.lines().filter(|l| l.trim_start().starts_with("verdict:")).count();
    assert_eq!(verdicts, 1, "a name forged a verdict line:\n{}", run.stdout);
    assert!(run.stdout.contains("verdict: incomplete"), "{}", run.stdout);
    assert!(
        run.stdout.contains("a\\nverdict: complete") && run.stdout.contains("\\x1b[31mred"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains('\u{1b}') && !run.stderr.contains('\u{1b}'),
        "an escape sequence got through"
    );

    let inspect = transplant(["inspect", src.to_str().unwrap()]);
    assert!(
        !inspect.stdout.contains('\u{1b}') && inspect.stdout.contains("a\\nverdict"),
        "{}",
        inspect.stdout
    );

    let json = transplant(["inspect", src.to_str().unwrap(), "--json"]).json();
    let names: Vec<&str> =
        json["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(names.contains(&FORGED) && names.contains(&COLOURED), "{names:?}");
}

#[test]
fn inspect_pads_the_name_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(&path, &["a", "a.much.longer.name.weight"]);
    let run = transplant(["inspect", path.to_str().unwrap()]);
    let columns: Vec<usize> =
        run.stdout.lines().filter(|l| l.starts_with("  a")).filter_map(|l| l.find("parameter")).collect();
    assert_eq!(columns.len(), 2, "{}", run.stdout);
    assert_eq!(columns[0], columns[1], "role column not aligned:\n{}", run.stdout);
}

/// A `torch.save` state dict of `names` (two floats each), made by PyTorch.
fn torch_save(path: &std::path::Path, names: &[String]) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let list = dir_file(path, "names.json");
    std::fs::write(&list, serde_json::to_string(names).unwrap()).unwrap();
    let status = std::process::Command::new(root.join(".venv/bin/python"))
        .args([
            "-c",
            "import json, sys, torch; torch.save({n: torch.ones(2) for n in json.load(open(sys.argv[1]))}, sys.argv[2])",
        ])
        .arg(&list)
        .arg(path)
        .status()
        .expect("the venv's python runs");
    assert!(status.success());
}

fn dir_file(path: &std::path::Path, name: &str) -> std::path::PathBuf {
    path.with_file_name(format!("{}.{name}", path.file_name().unwrap().to_str().unwrap()))
}

/// A name of 1 MB, and names with bidirectional overrides, isolates and
/// marks, go through every command: no panic, text escapes them (`\u{202e}`)
/// and cuts the long one in tables saying how long it was, JSON keeps them exact.
#[test]
fn long_and_bidi_names_pass_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("layer.{}", "w".repeat(1 << 20));
    let bidi = [
        "a\u{202e}gpj.exe".to_string(),
        "b\u{2066}x\u{2067}y\u{2068}z\u{2069}".to_string(),
        "c\u{200e}d\u{200f}".to_string(),
    ];
    let names: Vec<String> = std::iter::once(long.clone()).chain(bidi.iter().cloned()).collect();
    let (src, dst) = (dir.path().join("src.pth"), dir.path().join("dst.pth"));
    torch_save(&src, &names);
    torch_save(&dst, &names);
    let (src, dst) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let commands: Vec<Vec<String>> = vec![
        vec!["inspect".into(), src.into()],
        vec!["plan".into(), src.into(), dst.into()],
        vec!["diff".into(), src.into(), dst.into()],
        vec!["copy".into(), src.into(), dst.into(), "-o".into(), "copied.pth".into()],
        vec!["convert".into(), src.into(), "-o".into(), "converted.safetensors".into()],
    ];
    for (k, args) in commands.into_iter().enumerate() {
        for json in [false, true] {
            let mut args = args.clone();
            if let Some(o) = args.iter().position(|a| a == "-o") {
                args[o + 1] = out(&format!("{k}{json}-{}", args[o + 1]));
            }
            if json {
                args.push("--json".into());
            }
            let run = transplant(&args);
            let all = format!("{}{}", run.stdout, run.stderr);
            assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
            assert!(!all.contains("panicked"), "{args:?}: {}", run.stderr);
            if json {
                let value = run.json().to_string();
                assert!(value.contains(&long), "{args:?}: the long name exact in JSON");
                for name in &bidi {
                    assert!(value.contains(name.as_str()), "{args:?}: {name:?} exact in JSON");
                }
            } else {
                for c in ['\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{200e}', '\u{200f}']
                {
                    assert!(!all.contains(c), "{args:?}: {c:?} printed raw");
                }
                assert!(!all.contains(&long), "{args:?}: the long name printed whole");
                if args[0] != "diff" {
                    assert!(all.contains("\\u{202e}gpj.exe"), "{args:?}: {all}");
                    assert!(all.contains(&format!("…({} chars)", long.chars().count())), "{args:?}");
                }
            }
        }
    }
}
