//! `transplant convert`: every readable kind into every writable kind, read
//! back by PyTorch, safetensors and numpy themselves, bit for bit; rules
//! (renames, skips, transforms) with no target; dtypes; metadata; shards
//! written as a set; bad input refused with nothing written.
use crate::common;

use std::path::{Path, PathBuf};

use common::{fixture, read_back_all, sorted, transplant, Record};

fn convert(args: &[&str]) -> common::Run {
    transplant([&["convert"][..], args].concat())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The readable kinds, from fixtures PyTorch and numpy wrote (and one `.ot`
/// written by transplant and read back by PyTorch).
fn sources(dir: &Path) -> Vec<PathBuf> {
    let ot = dir.join("bn_net.ot");
    let run = convert(&[path(&fixture("bn_net_a.pt")), "-o", path(&ot)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    vec![
        fixture("bn_net_a.pt"),
        fixture("torch_save/dataparallel.pth"),
        fixture("sharded/model.safetensors.index.json"),
        fixture("dtypes.safetensors"),
        fixture("dtypes.npz"),
        ot,
    ]
}

const OUTPUTS: [&str; 5] = ["out.safetensors", "out.safetensors.index.json", "out.pth", "out.npz", "out.ot"];

#[test]
fn every_readable_kind_into_every_writable_kind_reads_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let sources = sources(dir.path());
    let mut written: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (k, source) in sources.iter().enumerate() {
        for out in OUTPUTS {
            let folder = dir.path().join(format!("{k}"));
            std::fs::create_dir_all(&folder).unwrap();
            let out = folder.join(out);
            let mut args = vec![path(source), "-o", path(&out)];
            if out.to_str().unwrap().ends_with(".index.json") {
                args.extend(["--max-shard-size", "2kB"]);
            }
            let run = convert(&args);
            let bf16 = source.ends_with("dtypes.safetensors");
            if bf16 && out.extension().is_some_and(|e| e == "npz") {
                // numpy has no bfloat16: refused by name, nothing written.
                assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
                assert!(run.stderr.contains("npz has no bfloat16"), "{}", run.stderr);
                assert!(!out.exists());
                continue;
            }
            assert_eq!(
                run.code,
                0,
                "{} -> {}: {}{}",
                source.display(),
                out.display(),
                run.stdout,
                run.stderr
            );
            written.push((source.clone(), out));
        }
    }
    let mut all: Vec<PathBuf> = sources.clone();
    all.extend(written.iter().map(|(_, o)| o.clone()));
    let read = read_back_all(&all);
    for (source, out) in &written {
        let want: Vec<Record> = sorted(read[source].0.clone());
        let got: Vec<Record> = sorted(read[out].0.clone());
        assert_eq!(got, want, "{} -> {}", source.display(), out.display());
    }
    // The sharded outputs are several shards and an index.
    let shards = std::fs::read_dir(dir.path().join("0")).unwrap().filter_map(|e| e.ok()).filter(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with("out-") && name.ends_with(".safetensors")
    });
    assert!(shards.count() > 1);
}

#[test]
fn rules_rename_skip_and_transform_with_no_target() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("renamed.safetensors");
    let run = convert(&[
        path(&fixture("bn_net_a.pt")),
        "-o",
        path(&out),
        "--map",
        r"features\.(\d+)\.(.*) => encoder.$1.$2",
        "--map",
        r"head\.1\.weight => head.1.weight_t | transpose(0, 1)",
        "--skip",
        r".*num_batches_tracked",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let json = run.json();
    let summary = &json["summary"];
    assert!(summary["renamed"].as_u64().unwrap() > 0);
    assert_eq!(summary["transformed"], 1);
    assert!(summary["skipped"].as_u64().unwrap() > 0);
    let source = read_back_all(&[fixture("bn_net_a.pt")]).remove(&fixture("bn_net_a.pt")).unwrap().0;
    let (got, metadata) = read_back_all(std::slice::from_ref(&out)).remove(&out).unwrap();
    let names: Vec<&str> = got.iter().map(|r| r.name.as_str()).collect();
    for r in &source {
        if r.name.ends_with("num_batches_tracked") {
            assert!(!names.iter().any(|n| n.ends_with("num_batches_tracked")), "skipped");
        } else if let Some(rest) = r.name.strip_prefix("features.") {
            let renamed = got.iter().find(|g| g.name == format!("encoder.{rest}")).unwrap();
            assert_eq!(renamed.sha256, r.sha256, "{}", r.name);
        }
    }
    let head = source.iter().find(|r| r.name == "head.1.weight").unwrap();
    let t = got.iter().find(|g| g.name == "head.1.weight_t").unwrap();
    assert_eq!(t.shape, vec![head.shape[1], head.shape[0]]);
    assert_eq!(metadata.get("format").map(String::as_str), Some("pt"));
    assert!(metadata["transplant.rules"].contains("transpose(0, 1)"), "{metadata:?}");
    assert_eq!(metadata["transplant.source_format"], "TorchScript module");
}

#[test]
fn dtype_converts_floating_tensors_and_keeps_integers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("half.pth");
    let run = convert(&[path(&fixture("bn_net_a.pt")), "-o", path(&out), "--dtype", "f16"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (got, _) = read_back_all(std::slice::from_ref(&out)).remove(&out).unwrap();
    for r in &got {
        let want = if r.name.ends_with("num_batches_tracked") { "int64" } else { "float16" };
        assert_eq!(r.dtype, want, "{}", r.name);
    }
    // Values out of float16's range are a lossy cast: refused unless allowed.
    let big = dir.path().join("big.safetensors");
    transplant::Checkpoint::from_tensors(
        "big",
        transplant::Format::Safetensors,
        vec![("x".into(), tch::Tensor::from_slice(&[1e6f32, 2.0]))],
        Default::default(),
    )
    .unwrap()
    .save_as(&big, transplant::Format::Safetensors)
    .unwrap();
    let refused = dir.path().join("refused.safetensors");
    let run = convert(&[path(&big), "-o", path(&refused), "--dtype", "f16"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("lossy cast") && run.stderr.contains("--allow-lossy"), "{}", run.stderr);
    assert!(!refused.exists());
    let run = convert(&[path(&big), "-o", path(&refused), "--dtype", "f16", "--allow-lossy"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

#[test]
fn collisions_unused_rules_and_bad_outputs_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("bn_net_a.pt");
    let out = dir.path().join("out.safetensors");
    // Two names onto one: an error naming both and the rule.
    let run = convert(&[path(&src), "-o", path(&out), "--map", r"features\.0\.bn\.(weight|bias) => same"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("collision") && run.stderr.contains("features.0.bn.weight"),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
    // An unused rule: reported; an error under --strict.
    let run = convert(&[path(&src), "-o", path(&out), "--map", "nothing=>x", "--strict"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("unused rule"), "{}", run.stderr);
    assert!(!out.exists());
    // A bad transform: the rule and the shapes named.
    let run = convert(&[path(&src), "-o", path(&out), "--map", r"head\.1\.weight => h | reshape(7, -1)"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("reshape(7, -1)") && run.stderr.contains("head.1.weight ["),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
    // An output whose format cannot be told, a shard size without an index, the input itself.
    for (out, extra, needle) in
        [("out.weird", None, "cannot tell the format"), ("out.safetensors", Some("1MB"), "name the index")]
    {
        let out = dir.path().join(out);
        let mut args = vec![path(&src), "-o", path(&out)];
        if let Some(size) = extra {
            args.extend(["--max-shard-size", size]);
        }
        let run = convert(&args);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(run.stderr.contains(needle), "{}", run.stderr);
        assert!(!out.exists());
    }
    let run = convert(&[path(&src), "-o", path(&src)]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("is the input"), "{}", run.stderr);
    let run = convert(&[path(&src), "-o", path(&out), "--max-shard-size", "5 parsecs"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[test]
fn a_sharded_output_appears_as_a_whole_set_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    // How many shards 1kB makes of bn_net.
    let trial = dir.path().join("trial");
    std::fs::create_dir(&trial).unwrap();
    let run = convert(&[
        path(&fixture("bn_net_a.pt")),
        "-o",
        path(&trial.join("model.safetensors.index.json")),
        "--max-shard-size",
        "1kB",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let n = std::fs::read_dir(&trial).unwrap().count() - 1;
    assert!(n > 2);
    // The last shard's name is taken by a folder: the set fails after the other
    // shards were written, and nothing of it appears.
    let set = dir.path().join("set");
    std::fs::create_dir(&set).unwrap();
    let blocked = format!("model-{n:05}-of-{n:05}.safetensors");
    std::fs::create_dir(set.join(&blocked)).unwrap();
    let index = set.join("model.safetensors.index.json");
    let run = convert(&[path(&fixture("bn_net_a.pt")), "-o", path(&index), "--max-shard-size", "1kB"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains(&blocked), "{}", run.stderr);
    let left: Vec<String> = std::fs::read_dir(&set)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| *n != blocked)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // Converting a sharded checkpoint onto its own shards is refused.
    let src = fixture("sharded/model.safetensors.index.json");
    let same = dir.path().join("again").join("model.safetensors.index.json");
    std::fs::create_dir_all(same.parent().unwrap()).unwrap();
    let run = convert(&[path(&src), "-o", path(&fixture("sharded/model.safetensors.index.json"))]);
    assert_eq!(run.code, 1);
    let run = convert(&[path(&src), "-o", path(&same)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn size_units() {
    // Through the command line: 2kB of shards of bn_net makes more shards than 2MB.
    let dir = tempfile::tempdir().unwrap();
    let count = |size: &str| {
        let folder = dir.path().join(size);
        std::fs::create_dir_all(&folder).unwrap();
        let index = folder.join("m.safetensors.index.json");
        let run = convert(&[path(&fixture("bn_net_a.pt")), "-o", path(&index), "--max-shard-size", size]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        std::fs::read_dir(&folder).unwrap().count() - 1
    };
    assert!(count("2kB") > count("2MiB"));
    assert_eq!(count("2MiB"), 1);
}

/// Tied weights keep one storage in a torch.save result and are reported as
/// written twice where the format cannot share.
#[test]
fn ties_are_kept_where_the_format_can_share_and_reported_where_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("torch_save/views.pth");
    let pth = dir.path().join("tied.pth");
    let run = convert(&[path(&src), "-o", path(&pth), "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["converted"]["tied"], serde_json::json!([["tied_a", "tied_b"]]));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let check = std::process::Command::new(root.join(".venv/bin/python"))
        .args([
            "-c",
            "import sys, torch; d = torch.load(sys.argv[1], weights_only=True); \
             a, b = d['tied_a'], d['tied_b']; \
             assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr(), 'not tied'; \
             assert torch.equal(a, b)",
            path(&pth),
        ])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let safetensors = dir.path().join("untied.safetensors");
    let run = convert(&[path(&src), "-o", path(&safetensors)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("tied_a, tied_b share memory in the source (tied); this format cannot share"),
        "{}",
        run.stdout
    );
}

/// A tensor name that as an `.npz` member would leave the archive when
/// extracted, or that readers split differently, is refused by name; nothing
/// is written. A name with a plain `/` inside stays writable.
#[test]
fn npz_member_names_that_leave_the_archive_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npz");
    let src = fixture("named_net.safetensors");
    for (to, shown) in
        [("../../evil", "../../evil"), ("/abs", "/abs"), ("a\\\\b", "a\\\\b"), ("a//b", "a//b")]
    {
        let run = convert(&[path(&src), "-o", path(&out), "--map", &format!("head\\.bias=>{to}")]);
        assert_eq!(run.code, 1, "{to}: {}", run.stderr);
        assert!(run.stderr.contains(&format!("tensor {shown} as npz")), "{to}: {}", run.stderr);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{to}: something was written");
    }
    let run = convert(&[path(&src), "-o", path(&out), "--map", "head\\.bias=>head/bias"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}
