//! `copy` killed with SIGKILL at random moments while writing a large OUT over
//! an existing one: OUT is afterwards either the old file or the complete new
//! one, never a partial file; the next successful run leaves no temporary file.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use transplant::{Checkpoint, Format, Source, Target};

/// 288 MB of float32 under three names, all `fill`.
fn write_model(path: &Path, fill: f64) {
    let opts = (Kind::Float, Device::Cpu);
    let tensors = vec![
        ("big.weight".to_string(), Tensor::full([64, 1 << 20], fill, opts)),
        ("mid.weight".to_string(), Tensor::full([8, 1 << 20], fill, opts)),
        ("bn.running_var".to_string(), Tensor::full([64], fill, opts)),
    ];
    Checkpoint::from_tensors("crash", Format::Safetensors, tensors, BTreeMap::new())
        .unwrap()
        .save(path)
        .unwrap();
}

fn copy(src: &Path, dst: &Path, out: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_transplant"));
    command.args(["copy".as_ref(), src.as_os_str(), dst.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    command
}

fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("transplant-tmp"))
        .collect()
}

#[test]
fn a_killed_copy_leaves_the_old_file_or_the_whole_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (old_src, new_src, dst) = (
        dir.path().join("old.safetensors"),
        dir.path().join("new.safetensors"),
        dir.path().join("dst.safetensors"),
    );
    write_model(&old_src, 1.0);
    write_model(&new_src, 2.0);
    write_model(&dst, 0.0);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("model.safetensors");
    let reference = dir.path().join("reference.safetensors");

    assert!(copy(&old_src, &dst, &out).status().unwrap().success());
    let started = Instant::now();
    assert!(copy(&new_src, &dst, &reference).status().unwrap().success());
    let full_run = started.elapsed();
    // Compared byte for byte (hashing 288 MB in a debug build would be slow).
    let (old_bytes, new_bytes) = (std::fs::read(&out).unwrap(), std::fs::read(&reference).unwrap());
    assert_ne!(old_bytes, new_bytes);
    assert!(std::fs::metadata(&out).unwrap().len() >= 200 << 20, "OUT must be at least 200 MB");

    let mut outcomes = (0, 0);
    for k in 0..8u32 {
        // Spread the kills from just started to just after a full run's length.
        let delay = full_run.mul_f64((k as f64 + 0.5) / 6.5) + Duration::from_millis((k * 37 % 23) as u64);
        let mut child = copy(&new_src, &dst, &out).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let now = std::fs::read(&out).unwrap();
        if now == old_bytes {
            outcomes.0 += 1;
        } else if now == new_bytes {
            outcomes.1 += 1;
            let complete = Checkpoint::open(&out).unwrap();
            let i = complete.entries().iter().position(|e| e.name == "big.weight").unwrap();
            assert_eq!(complete.tensor(i).unwrap().double_value(&[63, (1 << 20) - 1]), 2.0);
            assert!(copy(&old_src, &dst, &out).status().unwrap().success(), "restoring the old OUT");
        } else {
            panic!("after a kill {delay:?} into the copy, OUT is neither the old nor the new file");
        }
    }
    eprintln!(
        "8 kills: OUT old {} times, new {} times (a full run takes {full_run:?})",
        outcomes.0, outcomes.1
    );
    // Whatever the kills left behind, the next successful run cleans up.
    assert!(copy(&new_src, &dst, &out).status().unwrap().success());
    assert!(std::fs::read(&out).unwrap() == new_bytes);
    assert_eq!(temporaries(&out_dir), Vec::<String>::new(), "temporary files left behind");
}

/// Four float32 tensors of `mb` MB each, all `fill`, as one safetensors file.
fn write_parts(path: &Path, fill: f64, mb: i64) {
    let tensors = (0..4)
        .map(|k| (format!("layer{k}.weight"), Tensor::full([mb, 1 << 18], fill, (Kind::Float, Device::Cpu))))
        .collect();
    Checkpoint::from_tensors("crash", Format::Safetensors, tensors, BTreeMap::new())
        .unwrap()
        .save(path)
        .unwrap();
}

fn convert(src: &Path, out: &Path, shard: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_transplant"));
    command.args(["convert".as_ref(), src.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    if !shard.is_empty() {
        command.args(["--max-shard-size", shard]);
    }
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    command
}

/// The one value every element of every tensor of `model` holds (checked at
/// each tensor's first and last element), or a panic naming the mix.
fn uniform_value(model: &Path) -> f64 {
    let store = transplant::open(model).unwrap_or_else(|e| panic!("{} does not load: {e}", model.display()));
    let mut values = Vec::new();
    for (i, entry) in store.entries().iter().enumerate() {
        let t = store.tensor(i).unwrap().flatten(0, -1);
        values.push((entry.name.to_string(), t.double_value(&[0]), t.double_value(&[t.numel() as i64 - 1])));
    }
    let first = values[0].1;
    assert!(values.iter().all(|(_, a, b)| *a == first && *b == first), "a mixed set: {values:?}");
    first
}

/// Kills `command` at `k` moments spread over `full_run`; after each, `check`.
fn kill_at_moments(
    k: u32,
    full_run: Duration,
    mut command: impl FnMut() -> Command,
    mut check: impl FnMut(),
) {
    for i in 0..k {
        let delay = full_run.mul_f64((i as f64 + 0.5) / (k as f64 - 1.0))
            + Duration::from_millis((i * 37 % 23) as u64);
        let mut child = command().spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        check();
    }
}

#[test]
fn a_killed_sharded_convert_leaves_the_old_set_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (old_src, new_src) = (dir.path().join("old.safetensors"), dir.path().join("new.safetensors"));
    write_parts(&old_src, 1.0, 16);
    write_parts(&new_src, 2.0, 16);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let index = out_dir.join("model.safetensors.index.json");
    // 4 shards each time: the new set's shard names are the old set's.
    assert!(convert(&old_src, &index, "20MB").status().unwrap().success());
    let started = Instant::now();
    assert!(convert(&new_src, &index, "20MB").status().unwrap().success());
    let full_run = started.elapsed();
    assert_eq!(uniform_value(&index), 2.0);
    assert!(convert(&old_src, &index, "20MB").status().unwrap().success());
    let mut outcomes = (0, 0);
    kill_at_moments(
        8,
        full_run,
        || convert(&new_src, &index, "20MB"),
        || {
            if uniform_value(&index) == 1.0 {
                outcomes.0 += 1;
            } else {
                outcomes.1 += 1;
                assert!(
                    convert(&old_src, &index, "20MB").status().unwrap().success(),
                    "restoring the old set"
                );
            }
        },
    );
    eprintln!(
        "8 kills: the old set {} times, the new {} times (a run takes {full_run:?})",
        outcomes.0, outcomes.1
    );
    assert!(convert(&new_src, &index, "20MB").status().unwrap().success());
    assert_eq!(uniform_value(&index), 2.0);
    let mut left: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with("-of-00004.safetensors"))
        .collect();
    left.sort();
    assert_eq!(left, ["model.safetensors.index.json"]);
}

#[test]
fn concurrent_sharded_converts_into_one_index_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    write_parts(&a, 1.0, 1);
    write_parts(&b, 2.0, 1);
    let index = dir.path().join("out").join("model.safetensors.index.json");
    std::fs::create_dir(index.parent().unwrap()).unwrap();
    for round in 0..12 {
        let mut first = convert(&a, &index, "1MB").spawn().unwrap();
        let mut second = convert(&b, &index, "1MB").spawn().unwrap();
        assert!(first.wait().unwrap().success() && second.wait().unwrap().success(), "round {round}");
        let value = uniform_value(&index);
        assert!(value == 1.0 || value == 2.0, "round {round}: {value}");
    }
}

#[test]
fn a_killed_checkpoint_folder_write_leaves_the_old_folder_and_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let (old_src, new_src) = (dir.path().join("old.safetensors"), dir.path().join("new.safetensors"));
    write_parts(&old_src, 1.0, 16);
    write_parts(&new_src, 2.0, 16);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let folder = out_dir.join("dcp/");
    assert!(convert(&old_src, &folder, "").status().unwrap().success());
    let started = Instant::now();
    assert!(convert(&new_src, &folder, "").status().unwrap().success());
    let full_run = started.elapsed();
    assert_eq!(uniform_value(&folder), 2.0, "an existing folder is replaced");
    assert!(convert(&old_src, &folder, "").status().unwrap().success());
    let mut killed_with_temporary = 0;
    kill_at_moments(
        6,
        full_run,
        || convert(&new_src, &folder, ""),
        || {
            killed_with_temporary += usize::from(!temporaries(&out_dir).is_empty());
            if uniform_value(&folder) == 2.0 {
                assert!(convert(&old_src, &folder, "").status().unwrap().success());
            }
        },
    );
    eprintln!("6 kills, {killed_with_temporary} left a temporary folder");
    assert!(convert(&new_src, &folder, "").status().unwrap().success());
    assert_eq!(uniform_value(&folder), 2.0);
    assert_eq!(temporaries(&out_dir), Vec::<String>::new(), "temporary folders left behind");
}
