//! Text from files reaches the terminal escaped: a tensor name cannot forge a
//! line of the report or send escape sequences; JSON keeps names exact; and
//! `inspect`'s name column is padded whatever the names.
mod common;

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
