//! `convert` holds about one tensor in memory, not the model: the peak RSS of
//! a conversion of a 384 MB checkpoint stays within a small margin of the
//! peak RSS of `inspect` on the same file (which maps it and reads its header).
//! Each peak is measured by `scripts/peak_rss.py` around the command (a small
//! parent, so that the figure is the command's own).
use crate::common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use transplant::{Checkpoint, Format};

/// The peak RSS of `transplant ARGS`, in bytes; the command must succeed.
fn peak_rss(args: &[&str]) -> u64 {
    let (run, rss) = common::transplant_measured(args);
    assert_eq!(run.code, 0, "transplant {args:?}: {}", run.stderr);
    rss
}

#[test]
fn a_conversion_holds_about_one_tensor_not_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.safetensors");
    let (count, elements) = (24, 4 << 20); // 24 tensors of 16 MB
    {
        let tensors = (0..count)
            .map(|i| {
                (format!("layers.{i}.weight"), Tensor::full([elements], i as f64, (Kind::Float, Device::Cpu)))
            })
            .collect();
        Checkpoint::from_tensors("big", Format::Safetensors, tensors, BTreeMap::new())
            .unwrap()
            .save_as(&big, Format::Safetensors)
            .unwrap();
    }
    let size = std::fs::metadata(&big).unwrap().len();
    let baseline = peak_rss(&["inspect", big.to_str().unwrap()]);
    for (out, extra) in [("out.pth", None), ("out.safetensors", Some("bf16"))] {
        let out = dir.path().join(out);
        let mut args = vec!["convert", big.to_str().unwrap(), "-o", out.to_str().unwrap()];
        if let Some(dtype) = extra {
            args.extend(["--dtype", dtype]);
        }
        let peak = peak_rss(&args);
        let added = peak.saturating_sub(baseline);
        eprintln!(
            "{}: file {} MB, inspect peak {} MB, convert peak {} MB",
            out.display(),
            size >> 20,
            baseline >> 20,
            peak >> 20
        );
        assert!(
            added < size / 4,
            "convert to {} added {} MB over inspect's peak for a {} MB file",
            out.display(),
            added >> 20,
            size >> 20
        );
    }
}

/// A copy into a TorchScript file streams the archive: its peak RSS stays
/// within a small margin of `inspect`'s on the target, not the model's size
/// (the target's records are never copied into memory, the source's pages are
/// handed back once written).
#[test]
fn a_copy_into_a_torchscript_file_holds_about_one_record_not_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (target, source) = (dir.path().join("big.pt"), dir.path().join("big.safetensors"));
    // 24 buffers of 16 MB, scripted by PyTorch.
    let script = "import sys, torch\n\
        class Big(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        \
        for i in range(24):\n            self.register_buffer(f'b{i}', torch.zeros(4 << 20))\n    \
        def forward(self, x: torch.Tensor) -> torch.Tensor:\n        return x\n\
        torch.jit.save(torch.jit.script(Big()), sys.argv[1])\n";
    // TorchScript reads the class's source: it goes in a file.
    let file = dir.path().join("make_big.py");
    std::fs::write(&file, script).unwrap();
    let made = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(&file)
        .arg(&target)
        .status()
        .expect("the venv's python runs (scripts/setup.sh)");
    assert!(made.success());
    let tensors = (0..24)
        .map(|i| (format!("b{i}"), Tensor::full([4 << 20], i as f64, (Kind::Float, Device::Cpu))))
        .collect();
    Checkpoint::from_tensors("big", Format::Safetensors, tensors, BTreeMap::new())
        .unwrap()
        .save_as(&source, Format::Safetensors)
        .unwrap();
    let size = std::fs::metadata(&target).unwrap().len();
    let baseline = peak_rss(&["inspect", target.to_str().unwrap()]);
    let out = dir.path().join("out.pt");
    let peak =
        peak_rss(&["copy", source.to_str().unwrap(), target.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let added = peak.saturating_sub(baseline);
    eprintln!("file {} MB, inspect peak {} MB, copy peak {} MB", size >> 20, baseline >> 20, peak >> 20);
    assert!(
        added < size / 4,
        "the copy added {} MB over inspect's peak for a {} MB target",
        added >> 20,
        size >> 20
    );
    let written = transplant::open(&out).unwrap();
    assert!(written.tensor(23).unwrap().equal(&Tensor::full([4 << 20], 23.0, (Kind::Float, Device::Cpu))));
}

/// Reading a `torch.save` file is bounded per tensor: the peak RSS of
/// `inspect` on a file of 200,000 one-element tensors (saved by PyTorch, zip
/// and legacy), less that on a file of ten, divided by the count. It was
/// 3.3 KB (the pickle's arena of 40-byte values and 128-byte objects, a
/// hashed memo, a libtorch tensor per storage besides each view); it is about
/// 2 KB now. The goal is hundreds of bytes: what remains is the arena itself
/// (six objects and eight memo entries per tensor) and the zip crate's index
/// of the archive's members (about 240 bytes each).
#[test]
fn inspect_of_a_torch_save_file_is_bounded_per_tensor() {
    const MANY: usize = 200_000;
    const PER_TENSOR: u64 = 2_400;
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = "import sys, torch\n\
        out, n = sys.argv[1], int(sys.argv[2])\n\
        sd = {f'blocks.{i}.w': torch.full((1,), float(i)) for i in range(n)}\n\
        torch.save(sd, f'{out}/many.pth')\n\
        torch.save(sd, f'{out}/many_legacy.pth', _use_new_zipfile_serialization=False)\n\
        few = {f'blocks.{i}.w': torch.full((1,), float(i)) for i in range(10)}\n\
        torch.save(few, f'{out}/few.pth')\n\
        torch.save(few, f'{out}/few_legacy.pth', _use_new_zipfile_serialization=False)\n";
    let made = std::process::Command::new(root.join(".venv/bin/python"))
        .args(["-c", script, dir.path().to_str().unwrap(), &MANY.to_string()])
        .status()
        .expect("the venv's python runs (scripts/setup.sh)");
    assert!(made.success());
    for (many, few) in [("many.pth", "few.pth"), ("many_legacy.pth", "few_legacy.pth")] {
        let (many, few) = (dir.path().join(many), dir.path().join(few));
        let baseline = peak_rss(&["inspect", few.to_str().unwrap()]);
        let peak = peak_rss(&["inspect", many.to_str().unwrap()]);
        let per_tensor = peak.saturating_sub(baseline) / MANY as u64;
        eprintln!(
            "{}: inspect peak {} MB, {} MB for ten tensors: {per_tensor} bytes per tensor",
            many.display(),
            peak >> 20,
            baseline >> 20
        );
        assert!(
            per_tensor <= PER_TENSOR,
            "inspect of {} took {per_tensor} bytes per tensor (more than {PER_TENSOR})",
            many.display()
        );
    }
}
