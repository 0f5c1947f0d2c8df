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
