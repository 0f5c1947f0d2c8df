//! `transplant copy`.
use crate::common;

use transplant::{Checkpoint, Source, Target};

use std::path::Path;

use common::{file_hash, fixture, read_back, store_records, transplant};

fn copy(args: &[&str]) -> common::Run {
    let mut all = vec!["copy"];
    all.extend_from_slice(args);
    transplant(all)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn a_torch_save_state_dict_into_a_renamed_module_gives_identical_outputs_and_loads_in_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (fixture("demo/state_dict.pth"), fixture("demo/renamed_module.pt"));
    let before = (file_hash(&src), file_hash(&dst));
    let out = dir.path().join("restored.pt");
    // The modules align by structure; the root buffer is called `temperature`
    // in one and `scale` in the other, and only a rule pairs different leaves.
    let run = copy(&[s(&src), s(&dst), "-o", s(&out), "--match", "order", "--map", "temperature=>scale"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("verdict: complete") && run.stdout.contains("TorchScript module"),
        "{}",
        run.stdout
    );
    assert_eq!((file_hash(&src), file_hash(&dst)), before, "inputs changed");

    let verify = transplant([
        "verify",
        s(&fixture("demo/reference.pt")),
        s(&out),
        "--input",
        "4,3,8,8",
        "--atol",
        "0",
    ]);
    assert_eq!(verify.code, 0, "{}", verify.stdout);
    assert!(verify.stdout.contains("same outputs"));

    // torch.jit.load reads it, with the state dict's weights *and* buffers.
    let loaded = read_back(&out).0;
    let state = Checkpoint::open(&src).unwrap();
    let want: Vec<_> = store_records(&state).into_iter().map(|r| (r.dtype, r.shape, r.sha256)).collect();
    let got: Vec<_> = loaded.into_iter().map(|r| (r.dtype, r.shape, r.sha256)).collect();
    assert_eq!(got, want);
}

#[test]
fn out_keeps_the_destination_kind_unless_its_extension_asks_for_a_format() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("bn_net_a.pt");
    let pth = fixture("torch_save/training.pth");
    // .pth destination stays a torch.save file.
    let out = dir.path().join("out.pth");
    let run = copy(&[s(&src), s(&pth), "-o", s(&out), "--key", "state_dict"]);
    assert_eq!(run.code, 1, "--key applies to the source, which is a module");
    let run = copy(&[s(&src), s(&fixture("torch_save/dataparallel.pth")), "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(read_back(&out).0.len(), 20);
    assert!(read_back(&out).0.iter().all(|r| r.name.starts_with("module.")), "DataParallel names kept");
    // A module destination written as safetensors because OUT asks for it.
    let st = dir.path().join("out.safetensors");
    let run = copy(&[s(&src), s(&fixture("bn_net_b.pt")), "-o", s(&st), "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["output"]["kind"], "safetensors");
    assert_eq!(Checkpoint::open(&st).unwrap().entries().len(), 20);
}

#[test]
fn a_failed_check_writes_nothing_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pt");
    let run = copy(&[
        s(&fixture("mlp_bn.pt")),
        s(&fixture("mlp.pt")),
        "-o",
        s(&out),
        "--map",
        r"1\.weight=>2.bias",
    ]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("shape mismatch") && run.stderr.contains("nothing was written"),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file left");
}

#[test]
fn an_incomplete_copy_is_refused_unless_allowed_then_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pt");
    let (src, dst) = (fixture("mlp_bn.pt"), fixture("mlp.pt"));
    let args = [s(&src), s(&dst), "-o", s(&out), "--match", "order"];
    let run = copy(&args);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("--allow-partial"), "{}", run.stderr);
    assert!(!out.exists());
    let mut allowed = args.to_vec();
    allowed.push("--allow-partial");
    let run = copy(&allowed);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(out.exists());
}

#[test]
fn out_may_not_be_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.pt"), dir.path().join("b.pt"));
    std::fs::copy(fixture("bn_net_a.pt"), &src).unwrap();
    std::fs::copy(fixture("bn_net_b.pt"), &dst).unwrap();
    let before = (file_hash(&src), file_hash(&dst));
    for out in [&src, &dst] {
        let run = copy(&[s(&src), s(&dst), "-o", s(out)]);
        assert_eq!(run.code, 1);
        assert!(run.stderr.contains("is the input"), "{}", run.stderr);
    }
    let sneaky = dir.path().join(".").join("b.pt");
    assert_eq!(copy(&[s(&src), s(&dst), "-o", s(&sneaky)]).code, 1);
    assert_eq!((file_hash(&src), file_hash(&dst)), before);
}

#[test]
fn dtype_casts_the_result_and_json_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("half.pt");
    let run = copy(&[
        s(&fixture("bn_net_a.pt")),
        s(&fixture("bn_net_b.pt")),
        "-o",
        s(&out),
        "--dtype",
        "bf16",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json = run.json();
    assert_eq!(
        json["copy"]["casts"], 17,
        "the 17 floating tensors cast, num_batches_tracked kept: {}",
        json["copy"]
    );
    let records = read_back(&out).0;
    assert!(records.iter().filter(|r| r.name.ends_with("num_batches_tracked")).all(|r| r.dtype == "int64"));
    assert!(records.iter().filter(|r| r.name.ends_with("weight")).all(|r| r.dtype == "bfloat16"));
}

#[test]
fn an_unavailable_device_is_named_clearly() {
    if tch::Cuda::is_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pt");
    let run =
        copy(&[s(&fixture("bn_net_a.pt")), s(&fixture("bn_net_b.pt")), "-o", s(&out), "--device", "cuda:0"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("cuda:0") && run.stderr.contains("CUDA is not available"), "{}", run.stderr);
    assert!(!out.exists());
}

#[test]
fn a_saved_plan_replays_and_refuses_other_models() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let (src, dst) = (fixture("demo/state_dict.pth"), fixture("demo/renamed_module.pt"));
    let run = transplant([
        "plan",
        s(&src),
        s(&dst),
        "--match",
        "order",
        "--map",
        "temperature=>scale",
        "--save-plan",
        s(&plan),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = dir.path().join("out.pt");
    let run = copy(&[s(&src), s(&dst), "-o", s(&out), "--plan", s(&plan)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Replayed pairs keep what made them, and the plan the matcher it was made with.
    assert!(
        run.stdout.contains("(plan file: order)") && run.stdout.contains("(matcher: order)"),
        "{}",
        run.stdout
    );
    let other = dir.path().join("other.pt");
    let run = copy(&[s(&src), s(&fixture("bn_net_b.pt")), "-o", s(&other), "--plan", s(&plan)]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("make the plan again"), "{}", run.stderr);
    assert!(!other.exists());
}

#[test]
fn a_tied_torchscript_target_is_refused_when_its_two_sources_differ_and_copied_when_they_agree() {
    let dir = tempfile::tempdir().unwrap();
    let dst = fixture("tied_lm.pt");
    let before = file_hash(&dst);
    // The module really shares one tensor between its two names.
    let module = transplant::ModuleStore::open(&dst).unwrap();
    let pointers: Vec<usize> = (0..2).map(|i| module.tensor(i).unwrap().data_ptr() as usize).collect();
    assert_eq!(module.entries().len(), 2);
    assert_eq!(pointers[0], pointers[1], "embed.weight and head.weight are not tied in the fixture");

    let out = dir.path().join("out.pt");
    let run = copy(&[s(&fixture("tied_untied.safetensors")), s(&dst), "-o", s(&out)]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("embed.weight and head.weight share memory")
            && run.stderr.contains("nothing was written"),
        "{}",
        run.stderr
    );
    assert!(!out.exists(), "an output was written");
    assert_eq!(file_hash(&dst), before, "the target file changed");

    let run = copy(&[s(&fixture("tied_equal.safetensors")), s(&dst), "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let written = transplant::ModuleStore::open(&out).unwrap();
    let source = Checkpoint::open(fixture("tied_equal.safetensors")).unwrap();
    for i in 0..2 {
        assert!(common::bit_equal(written.tensor(i).unwrap(), source.tensor(i).unwrap()));
    }
}

/// `safetensors.torch.save_model` keeps one name of a tie: a tied target is
/// complete when one of its names is filled, under `--strict`, for the CLI's
/// archive path and for a live module through the library; `inspect` shows
/// the tie and counts its bytes once.
#[test]
fn a_tied_target_is_complete_when_the_source_keeps_one_name_of_the_tie() {
    use transplant::{copy as copy_plan, Mapping, Plan, Policy};
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (fixture("tied_one.safetensors"), fixture("tied_lm.pt"));
    let source = Checkpoint::open(&src).unwrap();
    assert_eq!(source.entries().len(), 1, "save_model kept both names: {:?}", source.entries());
    let kept = source.entries()[0].name.to_string();

    let inspect = transplant(["inspect", "--json", s(&dst)]);
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    let json = inspect.json();
    assert_eq!(json["ties"], serde_json::json!([["embed.weight", "head.weight"]]), "{json}");
    assert_eq!(json["bytes"], 160, "a tie's bytes are counted once: {json}");
    let text = transplant(["inspect", s(&dst)]);
    assert!(text.stdout.contains("embed.weight = head.weight"), "{}", text.stdout);

    let out = dir.path().join("out.pt");
    let run = copy(&[s(&src), s(&dst), "-o", s(&out), "--strict"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("is tied to"), "{}", run.stdout);
    let mut written = transplant::ModuleStore::open(&out).unwrap();
    for i in 0..2 {
        assert!(common::bit_equal(written.tensor(i).unwrap(), source.tensor(0).unwrap()), "{i}");
    }
    written.module_mut().set_training(false).unwrap();
    let input = common::expected_tensor("tied_one_expected.safetensors", "input");
    let got = written.module().forward(&[input]).unwrap().remove(0);
    assert!(got.equal(&common::expected_tensor("tied_one_expected.safetensors", "output")));

    // A live module through the library: the same plan, complete under strict.
    let mut live = transplant::ModuleStore::open(&dst).unwrap();
    let plan = Plan::build(&source, &live, &Mapping::default()).unwrap();
    assert!(plan.target_leftovers.is_empty(), "{:?}", plan.target_leftovers);
    let other = if kept == "embed.weight" { "head.weight" } else { "embed.weight" };
    assert!(
        plan.findings.iter().any(
            |f| matches!(f, transplant::Finding::Tied { target, with } if target == other && *with == kept)
        ),
        "{:?}",
        plan.findings
    );
    copy_plan(&plan, &source, &mut live, &Policy { strict: true, ..Policy::default() }).unwrap();
    assert!(common::bit_equal(live.tensor(1).unwrap(), source.tensor(0).unwrap()));

    // An untied target of the same names is still incomplete.
    let untied = transplant::open(fixture("tied_untied.safetensors")).unwrap();
    let plan = Plan::build(&source, untied.as_ref(), &Mapping::default()).unwrap();
    assert_eq!(plan.target_leftovers.len(), 1);
    assert!(plan.check(&Policy { strict: true, ..Policy::default() }).is_err());
}

/// 288 MB of float32 in two tensors, all `fill`: long enough for a progress bar.
fn write_long_model(path: &Path, fill: f64) {
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let tensors = vec![
        ("big.weight".to_string(), tch::Tensor::full([64, 1 << 20], fill, opts)),
        ("mid.weight".to_string(), tch::Tensor::full([8, 1 << 20], fill, opts)),
    ];
    let model =
        Checkpoint::from_tensors("long", transplant::Format::Safetensors, tensors, Default::default());
    model.unwrap().save(path).unwrap();
}

#[test]
fn a_long_copy_shows_progress_on_a_terminal_and_none_when_stderr_is_not_one() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.safetensors"), dir.path().join("dst.safetensors"));
    write_long_model(&src, 1.0);
    write_long_model(&dst, 0.0);
    let bin = env!("CARGO_BIN_EXE_transplant");

    // Not a terminal: no bar.
    let out = dir.path().join("piped.safetensors");
    let run = copy(&[s(&src), s(&dst), "-o", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.contains("copying"), "{}", run.stderr);

    // On a terminal (script(1) gives the command one): the bar is drawn.
    let out = dir.path().join("terminal.safetensors");
    let command = format!("{bin} copy {} {} -o {} >/dev/null", s(&src), s(&dst), s(&out));
    let run = std::process::Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    let shown = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{shown}");
    assert!(shown.contains("copying"), "no progress bar on a terminal: {shown:?}");
}

/// OUT that exists and is not a regular file is refused, nothing written: a device node (as root, `/dev/null` would be replaced), a
/// FIFO (opening it would block), a symbolic link (neither followed nor replaced).
#[test]
fn an_out_that_is_a_device_a_fifo_or_a_symlink_is_refused() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (fixture("bn_net_a.pt"), fixture("bn_net_b.pt"));
    let fifo = dir.path().join("out.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let pointed = dir.path().join("real.pt");
    std::fs::write(&pointed, b"keep me").unwrap();
    let link = dir.path().join("link.pt");
    std::os::unix::fs::symlink(&pointed, &link).unwrap();
    for (out, why) in [
        (Path::new("/dev/null"), "not a regular file"),
        (fifo.as_path(), "not a regular file"),
        (link.as_path(), "symbolic link"),
    ] {
        let run = copy(&[s(&src), s(&dst), "-o", s(out)]);
        assert_eq!(run.code, 1, "{}: {}", out.display(), run.stdout);
        assert!(run.stderr.contains(why), "{}: {}", out.display(), run.stderr);
    }
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device(), "/dev/null replaced");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&pointed).unwrap(), b"keep me");
}

#[test]
fn a_lossy_cast_is_refused_naming_the_flag_and_allow_lossy_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.safetensors"), dir.path().join("dst.safetensors"));
    let ckpt = |kind: tch::Kind| {
        let t = tch::Tensor::full([3], 2.5, (kind, tch::Device::Cpu));
        Checkpoint::from_tensors(
            "t",
            transplant::Format::Safetensors,
            vec![("w".into(), t)],
            Default::default(),
        )
        .unwrap()
    };
    ckpt(tch::Kind::Float).save(&src).unwrap();
    ckpt(tch::Kind::Int64).save(&dst).unwrap();
    let out = dir.path().join("out.safetensors");
    let run = copy(&[s(&src), s(&dst), "-o", s(&out)]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stderr.contains("lossy cast") && run.stderr.contains("--allow-lossy"), "{}", run.stderr);
    assert!(!out.exists());
    let run = copy(&[s(&src), s(&dst), "-o", s(&out), "--allow-lossy"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let written = Checkpoint::open(&out).unwrap();
    assert_eq!(written.tensor(0).unwrap().int64_value(&[0]), 2, "float 2.5 truncated into int64");
}

/// OUT may not be any file an input reads: a shard of SRC's index, a file of
/// SRC's checkpoint folder, a shard a sharded OUT would write over, the same
/// file under another name (a hard link), or the folder itself. Each is refused
/// before anything is written, naming both, and the source still loads.
#[test]
fn out_may_not_be_any_file_an_input_reads() {
    let dir = tempfile::tempdir().unwrap();
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    for entry in std::fs::read_dir(fixture("sharded")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), sharded.join(entry.file_name())).unwrap();
    }
    let index = sharded.join("model.safetensors.index.json");
    // A second index naming the same shards.
    let alias = sharded.join("alias.safetensors.index.json");
    std::fs::copy(&index, &alias).unwrap();
    let shard = |k: u32| sharded.join(format!("model-0000{k}-of-00003.safetensors"));
    let dcp = dir.path().join("dcp/");
    assert_eq!(transplant(["convert", s(&fixture("bn_net_a.pt")), "-o", s(&dcp)]).code, 0);
    let single = dir.path().join("single.safetensors");
    std::fs::copy(fixture("named_net.safetensors"), &single).unwrap();
    let link = dir.path().join("link.safetensors");
    std::fs::hard_link(&single, &link).unwrap();
    let dst = fixture("bn_net_b.pt");

    let mut watched: Vec<std::path::PathBuf> = (1..=3).map(shard).collect();
    watched.extend([index.clone(), alias.clone(), dcp.join("__0_0.distcp"), dcp.join(".metadata"), single]);
    let before: Vec<String> = watched.iter().map(|p| file_hash(p)).collect();
    let dcp_data = dcp.join("__0_0.distcp");
    let (one, two, three) = (shard(1), shard(2), shard(3));
    let cases: Vec<(Vec<&str>, &Path, &Path)> = vec![
        (vec!["convert", s(&index), "-o", s(&two)], &two, &index),
        (vec!["copy", s(&index), s(&dst), "-o", s(&one)], &one, &index),
        (vec!["copy", s(&dcp), s(&dst), "-o", s(&dcp_data)], &dcp_data, &dcp),
        (vec!["convert", s(&dcp), "-o", s(&dcp)], &dcp, &dcp),
        (vec!["convert", s(&alias), "-o", s(&index)], &index, &alias),
        (vec!["convert", s(&three), "-o", s(&index), "--max-shard-size", "1kB"], &index, &three),
        (vec!["convert", s(&link), "-o", s(&watched[7])], &watched[7], &link),
    ];
    for (args, out, input) in &cases {
        let run = transplant(args);
        assert_eq!(run.code, 1, "{args:?}: {}{}", run.stdout, run.stderr);
        let (out, input) = (s(out).trim_end_matches('/'), s(input).trim_end_matches('/'));
        assert!(run.stderr.contains(out) && run.stderr.contains(input), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("inputs are never modified"), "{args:?}: {}", run.stderr);
    }
    let after: Vec<String> = watched.iter().map(|p| file_hash(p)).collect();
    assert_eq!(before, after, "an input changed");
    for model in [&index, &alias, &dcp] {
        let run = transplant(["inspect", s(model)]);
        assert_eq!(run.code, 0, "{}: {}", model.display(), run.stderr);
    }
}

/// A tied target filled from two source tensors of equal values through a
/// cast (the model's own converted file, copied with `--dtype` or into
/// another dtype): the values are compared once converted, not assumed to
/// differ; sources that do differ are still refused.
#[test]
fn a_tied_target_takes_equal_sources_through_a_cast() {
    let dir = tempfile::tempdir().unwrap();
    let tied = fixture("tied_lm.pt");
    let f32_file = dir.path().join("f32.safetensors");
    let bf16_file = dir.path().join("bf16.safetensors");
    assert_eq!(common::transplant(["convert", s(&tied), "-o", s(&f32_file)]).code, 0);
    assert_eq!(common::transplant(["convert", s(&tied), "-o", s(&bf16_file), "--dtype", "bf16"]).code, 0);
    for (source, dtype) in [(&f32_file, Some("bf16")), (&bf16_file, None)] {
        let out = dir.path().join(format!("out-{}.pt", dtype.unwrap_or("f32")));
        let mut args = vec![s(source), s(&tied), "-o", s(&out)];
        args.extend(dtype.map(|d| ["--dtype", d]).into_iter().flatten());
        let run = copy(&args);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let read = common::inspected(&out);
        let digest = |name: &str| read.iter().find(|r| r.name == name).map(|r| r.sha256.clone()).unwrap();
        assert_eq!(digest("embed.weight"), digest("head.weight"));
    }
    let out = dir.path().join("untied.pt");
    let run = copy(&[s(&fixture("tied_untied.safetensors")), s(&tied), "-o", s(&out), "--dtype", "bf16"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("share memory") && !out.exists(), "{}", run.stderr);
}
