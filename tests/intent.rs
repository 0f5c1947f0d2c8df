//! Saying what is meant (issue #28): target tensors kept on purpose (`keep`),
//! tied sources, refusals that name the next step, folders as models.
use crate::common;

use std::path::{Path, PathBuf};

use common::{inspected, python, transplant, Run};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn run(args: &[&str]) -> Run {
    transplant(args)
}

/// The models of these tests, made by PyTorch into `dir`:
/// - `tv.pth`: a small torchvision-like classifier's state dict, 100 classes;
/// - `ft10.pt`: the same network scripted with a new 10-class head;
/// - `masked.pth` / `masked.pt`: a module with a buffer computed at
///   construction and not persistent (timm's Swin `attn_mask`): the state dict
///   lacks it, the scripted module holds it;
/// - `lm.bin` (torch.save of a tied GPT-style LM: `lm_head.weight` is
///   `transformer.wte.weight`), `lm.safetensors` (as `save_pretrained` writes
///   it: the tied `lm_head.weight` left out), `lm.pt` (scripted, tied).
fn models(dir: &Path) {
    // torch.jit.script reads the classes' source: the script runs from a file.
    script(
        dir,
        r#"
import sys, torch, safetensors.torch as st
d = sys.argv[1]
torch.manual_seed(0)
class Net(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.layer1 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.BatchNorm2d(16))
        self.fc = torch.nn.Linear(16, classes)
    def forward(self, x):
        x = self.layer1(self.bn1(self.conv1(x)))
        return self.fc(x.mean((2, 3)))
tv = Net(100)
for m in tv.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(); m.running_var.uniform_(1, 2); m.num_batches_tracked.fill_(7)
torch.save(tv.state_dict(), f"{d}/tv.pth")
torch.jit.save(torch.jit.script(Net(10)), f"{d}/ft10.pt")

class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("attn_mask", torch.triu(torch.full((4, 4), -100.0), 1), persistent=False)
    def forward(self, x):
        return self.proj(x) + self.attn_mask
torch.save(Masked().state_dict(), f"{d}/masked.pth")
torch.jit.save(torch.jit.script(Masked()), f"{d}/masked.pt")

class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(50, 8)
        self.transformer.h = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 50, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
    def forward(self, x):
        return self.lm_head(self.transformer.h(self.transformer.wte(x)))
lm = LM()
sd = lm.state_dict()
torch.save(sd, f"{d}/lm.bin")
st.save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, f"{d}/lm.safetensors", metadata={"format": "pt"})
torch.jit.save(torch.jit.script(LM()), f"{d}/lm.pt")
"#,
    );
}

/// Runs `text` as a Python file in `dir` with the venv's python (`sys.argv[1]`: `dir`).
fn script(dir: &Path, text: &str) {
    let file = dir.join("make_models.py");
    std::fs::write(&file, text).unwrap();
    python(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        &[&file, dir],
    );
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    models(dir.path());
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[test]
fn a_new_head_kept_on_purpose_is_one_command_with_exit_0() {
    let (_dir, d) = setup();
    let (tv, ft, out) = (d.join("tv.pth"), d.join("ft10.pt"), d.join("out.pt"));
    let args = [s(&tv), s(&ft), "-o", s(&out), "--skip", r"fc\..*", "--keep", r"fc\..*", "--strict"];
    let copy = run(&[&["copy"], &args[..]].concat());
    assert_eq!(copy.code, 0, "{}\n{}", copy.stdout, copy.stderr);
    assert!(copy.stdout.contains("kept in the target (2):"), "{}", copy.stdout);
    assert!(copy.stdout.contains(r"fc.weight (`keep fc\..*`, --keep #1)"), "{}", copy.stdout);
    assert!(copy.stdout.contains("verdict: complete"), "{}", copy.stdout);
    assert!(!copy.stdout.contains("left over in the target"), "{}", copy.stdout);
    // The head is the target's own, the backbone the source's, bit for bit.
    let (got, src, dst) = (inspected(&out), inspected(&tv), inspected(&ft));
    for record in &got {
        let from = if record.name.starts_with("fc.") { &dst } else { &src };
        let want = from.iter().find(|r| r.name == record.name).unwrap();
        assert_eq!(record, want);
    }
    // JSON lists the kept tensors, and none as left over.
    let json =
        run(&[&["plan"], &[s(&tv), s(&ft), "--skip", r"fc\..*", "--keep", r"fc\..*", "--json"][..]].concat());
    assert_eq!(json.code, 0, "{}", json.stderr);
    let json = json.json();
    let kept: Vec<&str> =
        json["kept"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(kept, ["fc.weight", "fc.bias"]);
    assert_eq!(json["kept"][0]["rule"], r"keep fc\..*");
    let leftovers = json["leftovers"].as_array().unwrap();
    assert!(leftovers.iter().all(|l| l["side"] == "source"), "{leftovers:?}");
}

#[test]
fn a_kept_target_that_the_matcher_would_fill_is_an_error_naming_both_and_the_skip() {
    let (_dir, d) = setup();
    let (tv, ft, out) = (d.join("tv.pth"), d.join("ft10.pt"), d.join("out.pt"));
    let copy = run(&["copy", s(&tv), s(&ft), "-o", s(&out), "--keep", r"fc\..*"]);
    assert_eq!(copy.code, 1, "{}\n{}", copy.stdout, copy.stderr);
    let all = format!("{}{}", copy.stdout, copy.stderr);
    assert!(
        all.contains(
            r"target fc.weight is kept by `keep fc\..*` (--keep #1), but source fc.weight would fill it"
        ) && all.contains(r"--skip 'fc\..*'"),
        "{all}"
    );
    assert!(!out.exists());
    // And from a rules file, a rename onto a kept target names the rule.
    let rules = d.join("rules.txt");
    std::fs::write(&rules, "keep fc\\.bias\nconv1\\.bias => fc.bias\n").unwrap();
    let plan = run(&["plan", s(&tv), s(&ft), "--rules", s(&rules), "--skip", r"fc\..*"]);
    assert_eq!(plan.code, 1, "{}\n{}", plan.stdout, plan.stderr);
    let all = format!("{}{}", plan.stdout, plan.stderr);
    assert!(all.contains("rules.txt:1") && all.contains(r"rule `conv1\.bias => fc.bias`"), "{all}");
}

#[test]
fn a_keep_that_names_no_target_is_an_unused_rule() {
    let (_dir, d) = setup();
    let plan = run(&[
        "plan",
        s(&d.join("tv.pth")),
        s(&d.join("ft10.pt")),
        "--skip",
        r"fc\..*",
        "--keep",
        r"head\..*",
        "--keep",
        r"fc\..*",
        "--strict",
    ]);
    assert_eq!(plan.code, 1, "{}\n{}", plan.stdout, plan.stderr);
    assert!(plan.stdout.contains(r"unused rule at --keep #1: `keep head\..*`"), "{}", plan.stdout);
}

#[test]
fn buffers_computed_at_construction_are_kept_and_strict_passes() {
    let (_dir, d) = setup();
    let (src, dst, out) = (d.join("masked.pth"), d.join("masked.pt"), d.join("out.pt"));
    let refused = run(&["copy", s(&src), s(&dst), "-o", s(&out), "--strict", "--allow-partial"]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    let copy = run(&["copy", s(&src), s(&dst), "-o", s(&out), "--strict", "--keep", r".*attn_mask"]);
    assert_eq!(copy.code, 0, "{}\n{}", copy.stdout, copy.stderr);
    let (got, want) = (inspected(&out), inspected(&dst));
    let mask = |records: &[common::Record]| records.iter().find(|r| r.name == "attn_mask").cloned().unwrap();
    assert_eq!(mask(&got), mask(&want));
}

#[test]
fn a_tied_source_name_goes_with_its_pair_and_is_not_left_over() {
    let (_dir, d) = setup();
    // lm.bin holds lm_head.weight, one storage with transformer.wte.weight;
    // the safetensors form holds only the latter.
    let plan = run(&["plan", s(&d.join("lm.bin")), s(&d.join("lm.safetensors")), "--strict"]);
    assert_eq!(plan.code, 0, "{}\n{}", plan.stdout, plan.stderr);
    assert!(
        plan.stdout
            .contains("lm_head.weight (tied to transformer.wte.weight: one tensor, paired through it)"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("note: source lm_head.weight is tied to transformer.wte.weight"),
        "{}",
        plan.stdout
    );
}

#[test]
fn one_strict_rules_file_serves_the_bin_and_the_safetensors_form_of_a_tied_model() {
    let (_dir, d) = setup();
    let rules = d.join("gpt.rules");
    std::fs::write(&rules, "skip lm_head\\.weight\n").unwrap();
    for source in ["lm.bin", "lm.safetensors"] {
        let out = d.join(format!("out-{source}.pt"));
        let copy = run(&[
            "copy",
            s(&d.join(source)),
            s(&d.join("lm.pt")),
            "-o",
            s(&out),
            "--rules",
            s(&rules),
            "--strict",
        ]);
        assert_eq!(copy.code, 0, "{source}: {}\n{}", copy.stdout, copy.stderr);
        let want = inspected(&d.join("lm.bin"));
        let got = inspected(&out);
        for name in ["transformer.wte.weight", "lm_head.weight", "transformer.h.weight"] {
            let digest = |r: &[common::Record]| r.iter().find(|r| r.name == name).map(|r| r.sha256.clone());
            assert_eq!(digest(&got), digest(&want), "{source}: {name}");
        }
        if source == "lm.safetensors" {
            assert!(
                copy.stdout
                    .contains("lm_head.weight is tied to transformer.wte.weight, which the source holds"),
                "{}",
                copy.stdout
            );
        }
    }
    // A skip that names no tie is still unused.
    std::fs::write(&rules, "skip lm_head\\.bias\n").unwrap();
    let plan =
        run(&["plan", s(&d.join("lm.safetensors")), s(&d.join("lm.pt")), "--rules", s(&rules), "--strict"]);
    assert_eq!(plan.code, 1, "{}", plan.stdout);
    assert!(plan.stdout.contains("unused rule"), "{}", plan.stdout);
}

/// Safetensors files of these tensors (name, shape) into `dir/NAME`.
fn safetensors(dir: &Path, name: &str, tensors: &str) -> PathBuf {
    let path = dir.join(name);
    python(
        &format!("import sys, torch, safetensors.torch as st\nst.save_file({{n: torch.rand(s) for n, s in {tensors}.items()}}, sys.argv[1])"),
        &[&path],
    );
    path
}

#[test]
fn refusals_name_the_next_step_and_never_what_was_already_passed() {
    let (_dir, d) = setup();
    let (tv, ft, out) = (d.join("tv.pth"), d.join("ft10.pt"), d.join("out.pt"));
    let copy = run(&["copy", s(&tv), s(&ft), "-o", s(&out)]);
    assert_eq!(copy.code, 1);
    assert!(copy.stderr.contains(r"--skip 'fc\..*' --keep 'fc\..*'"), "{}", copy.stderr);
    // --skip alone: the target's head is open; the step is --keep, not --skip.
    let copy = run(&["copy", s(&tv), s(&ft), "-o", s(&out), "--skip", r"fc\..*"]);
    assert_eq!(copy.code, 1);
    assert!(copy.stderr.contains(r"--keep 'fc\..*'") && !copy.stderr.contains("--skip '"), "{}", copy.stderr);
    // With --match order given, no "try --match order".
    let copy =
        run(&["copy", s(&d.join("masked.pth")), s(&d.join("masked.pt")), "-o", s(&out), "--match", "order"]);
    assert_eq!(copy.code, 1);
    assert!(
        copy.stderr.contains("--keep 'attn_mask'") && !copy.stderr.contains("--match order"),
        "{}",
        copy.stderr
    );
    // Same elements, merged dimensions: the reshape is the step.
    let a = safetensors(&d, "a.safetensors", "{'ls.gamma': (4, 1, 1)}");
    let b = safetensors(&d, "b.safetensors", "{'ls.gamma': (4,)}");
    let plan = run(&["plan", s(&a), s(&b)]);
    assert_eq!(plan.code, 1);
    assert!(
        plan.stdout.contains(r"--map 'ls\.gamma => ls.gamma | reshape(4)' pairs them"),
        "{}",
        plan.stdout
    );
}

#[test]
fn a_renamed_source_left_over_shows_the_name_the_rule_made() {
    let dir = tempfile::tempdir().unwrap();
    let a = safetensors(dir.path(), "a.safetensors", "{'encoder.scale': (1,), 'encoder.w': (2,)}");
    let b = safetensors(dir.path(), "b.safetensors", "{'backbone.w': (2,), 'temperature': (3,)}");
    let plan = run(&["plan", s(&a), s(&b), "--map", r"encoder\.(.*)=>backbone.$1", "--strict"]);
    assert_eq!(plan.code, 1);
    let all = format!("{}{}", plan.stdout, plan.stderr);
    assert!(
        all.contains(r"source encoder.scale is not paired: renamed to backbone.scale by rule `encoder\.(.*) => backbone.$1`"),
        "{all}"
    );
    assert!(all.contains(r"encoder.scale (renamed to backbone.scale by rule"), "{all}");
}

#[test]
fn did_you_mean_prefers_the_tensor_of_the_same_leaf_and_shape_over_spelling() {
    let dir = tempfile::tempdir().unwrap();
    // The models number their stages differently: stage 3 of one is stage 1 of the other.
    let a = safetensors(dir.path(), "a.safetensors", "{'stages.3.w': (16,)}");
    let b = safetensors(dir.path(), "b.safetensors", "{'layers.3.w': (8,), 'layers.1.w': (16,)}");
    let plan = run(&["plan", s(&a), s(&b), "--match", "exact"]);
    assert!(plan.stdout.contains("stages.3.w (did you mean layers.1.w?)"), "{}", plan.stdout);
}

#[test]
fn a_folder_laid_out_as_save_pretrained_is_a_model_and_says_which_file_was_read() {
    let (_dir, d) = setup();
    let folder = d.join("gpt");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("config.json"), "{\"model_type\": \"gpt2\"}").unwrap();
    std::fs::copy(d.join("lm.safetensors"), folder.join("model.safetensors")).unwrap();
    let inspect = run(&["inspect", s(&folder)]);
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    assert!(inspect.stdout.starts_with(&format!("{}/model.safetensors", s(&folder))), "{}", inspect.stdout);
    // One line on stderr names the file chosen (stdout stays the report).
    let chosen = format!("{}: a model folder; reading {}/model.safetensors", s(&folder), s(&folder));
    assert_eq!(inspect.stderr.matches(&chosen).count(), 1, "{}", inspect.stderr);
    assert_eq!(inspected(&folder), inspected(&d.join("lm.safetensors")));
    // As SRC and as DST.
    for (src, dst) in [(folder.clone(), d.join("lm.safetensors")), (d.join("lm.bin"), folder.clone())] {
        let plan = run(&["plan", s(&src), s(&dst), "--strict"]);
        assert_eq!(plan.code, 0, "{}\n{}", plan.stdout, plan.stderr);
        assert!(plan.stdout.contains("model.safetensors"), "{}", plan.stdout);
        assert_eq!(plan.stderr.matches(&chosen).count(), 1, "{}", plan.stderr);
    }
    // safetensors first; a .bin of the same tensors agrees, one of others does not.
    std::fs::copy(d.join("lm.bin"), folder.join("pytorch_model.bin")).unwrap();
    let inspect = run(&["inspect", s(&folder)]);
    assert_eq!(inspect.code, 1, "{}", inspect.stdout);
    assert!(
        inspect.stderr.contains("holds two models that disagree")
            && inspect.stderr.contains("model.safetensors")
            && inspect.stderr.contains("pytorch_model.bin has lm_head.weight"),
        "{}",
        inspect.stderr
    );
    std::fs::remove_file(folder.join("model.safetensors")).unwrap();
    let inspect = run(&["inspect", s(&folder)]);
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    assert!(inspect.stdout.contains("pytorch_model.bin"), "{}", inspect.stdout);
    // A folder of no model says what it looked for.
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let inspect = run(&["inspect", s(&empty)]);
    assert_eq!(inspect.code, 1);
    assert!(inspect.stderr.contains("expected one of model.safetensors"), "{}", inspect.stderr);
}

#[test]
fn missing_output_folders_are_created_and_removed_again_on_failure() {
    let (_dir, d) = setup();
    let out = d.join("new/sub/model.safetensors.index.json");
    let convert = run(&["convert", s(&d.join("tv.pth")), "-o", s(&out), "--max-shard-size", "2kB"]);
    assert_eq!(convert.code, 0, "{}\n{}", convert.stdout, convert.stderr);
    assert!(out.is_file(), "{}", convert.stdout);
    let failed = d.join("other/sub/out.safetensors");
    let convert = run(&["convert", s(&d.join("tv.pth")), "-o", s(&failed), "--map", "bad(=>x"]);
    assert_eq!(convert.code, 1, "{}", convert.stderr);
    assert!(!d.join("other").exists());
    // copy too: a module into a folder that does not exist, and a refused copy
    // (the head's shapes differ) that leaves no folder behind.
    let (tv, ft) = (d.join("tv.pth"), d.join("ft10.pt"));
    let out = d.join("copies/sub/out.pt");
    let copy = run(&["copy", s(&tv), s(&ft), "-o", s(&out), "--skip", r"fc\..*", "--keep", r"fc\..*"]);
    assert_eq!(copy.code, 0, "{}\n{}", copy.stdout, copy.stderr);
    assert!(out.is_file());
    let copy = run(&["copy", s(&tv), s(&ft), "-o", s(&d.join("refused/sub/out.pt"))]);
    assert_eq!(copy.code, 1, "{}", copy.stderr);
    assert!(!d.join("refused").exists());
}

/// #28: converting again into an existing Distributed Checkpoint folder
/// replaces it, named with its slash or without (it had failed "is a
/// directory"); a folder of anything else is still refused.
#[test]
fn an_existing_distributed_checkpoint_folder_out_is_replaced() {
    let (_dir, d) = setup();
    let folder = d.join("ckpt");
    let with_slash = format!("{}/", s(&folder));
    let first = run(&["convert", s(&d.join("masked.pth")), "-o", &with_slash]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    for out in [with_slash.as_str(), s(&folder)] {
        let again = run(&["convert", s(&d.join("tv.pth")), "-o", out]);
        assert_eq!(again.code, 0, "{out}: {}", again.stderr);
        assert_eq!(inspected(&folder), inspected(&d.join("tv.pth")), "{out}");
    }
    let plain = d.join("plain");
    std::fs::create_dir(&plain).unwrap();
    let refused = run(&["convert", s(&d.join("tv.pth")), "-o", s(&plain)]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
}

/// Told of a copy's start and end; its start is slow on purpose (a part of the
/// copy that the copy engine itself never sees).
#[derive(Default)]
struct SlowStart {
    started: std::sync::Mutex<Option<std::time::Instant>>,
    finished: std::sync::Mutex<Option<std::time::Instant>>,
}

impl transplant::Progress for SlowStart {
    fn start(&self, _bytes: u64) {
        *self.started.lock().unwrap() = Some(std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {
        *self.finished.lock().unwrap() = Some(std::time::Instant::now());
    }
}

/// #28: a copy into a TorchScript file is timed until the rewritten archive is
/// in place, not only the records the copy engine made (it had reported
/// `102.4 MB in 0.6 ms`): the time reported holds everything between the
/// copy's start and its end as an observer saw them, and the bytes of the file
/// are the file's.
#[test]
fn an_archive_rewrite_reports_its_own_time_and_the_file_it_wrote() {
    use transplant::{copy_to_file, CopyOptions, Mapping, Plan, Policy, ScriptArchive};
    let dir = tempfile::tempdir().unwrap();
    let source = transplant::open(common::fixture("bn_net_a.pt")).unwrap();
    let mut archive = ScriptArchive::open(common::fixture("bn_net_b.pt")).unwrap();
    let plan = Plan::build(source.as_ref(), &archive, &Mapping::default()).unwrap();
    let out = dir.path().join("out.pt");
    let slow = SlowStart::default();
    let options = CopyOptions { progress: Some(&slow), ..CopyOptions::default() };
    let copied =
        copy_to_file(&plan, source.as_ref(), &mut archive, &out, &Policy::default(), options).unwrap();
    let seen = slow.finished.lock().unwrap().unwrap() - slow.started.lock().unwrap().unwrap();
    assert!(
        copied.copy_seconds + copied.verify_seconds >= seen.as_secs_f64(),
        "reported {} + {} s, the copy ran {seen:?}",
        copied.copy_seconds,
        copied.verify_seconds
    );
    assert_eq!(copied.file_bytes, Some(std::fs::metadata(&out).unwrap().len()));
    // The command line reports the same: the file's bytes, and its throughput.
    let (a, b, out) =
        (common::fixture("bn_net_a.pt"), common::fixture("bn_net_b.pt"), dir.path().join("cli.pt"));
    let copy = run(&["copy", s(&a), s(&b), "-o", s(&out), "--json"]);
    assert_eq!(copy.code, 0, "{}", copy.stderr);
    assert_eq!(copy.json()["copy"]["file_bytes"], std::fs::metadata(&out).unwrap().len());
    let copy = run(&["copy", s(&a), s(&b), "-o", s(&out)]);
    assert!(copy.stdout.contains(", writing a file of "), "{}", copy.stdout);
    assert!(copy.stdout.contains("/s); verified bit for bit"), "{}", copy.stdout);
}

/// #28: a module comes back from `ModuleStore::open` and `ScriptModule::load`
/// in the mode it was saved in; a copy changes no mode; `save` (one signature,
/// `&Path`, on `ScriptModule` and through `Target`) keeps the mode it has.
#[test]
fn a_loaded_module_is_in_the_mode_it_was_saved_in() {
    use transplant::{copy, Mapping, ModuleStore, Plan, Policy, ScriptModule, Target};
    let dir = tempfile::tempdir().unwrap();
    script(
        dir.path(),
        r#"
import sys, torch
d = sys.argv[1]
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
    def forward(self, x):
        return self.bn(self.conv(x))
torch.jit.save(torch.jit.script(Net().train()), f"{d}/train.pt")
torch.jit.save(torch.jit.script(Net().eval()), f"{d}/eval.pt")
"#,
    );
    let (train, eval) = (dir.path().join("train.pt"), dir.path().join("eval.pt"));
    assert!(ScriptModule::load(&train).unwrap().is_training().unwrap());
    assert!(!ScriptModule::load(&eval).unwrap().is_training().unwrap());
    assert!(ModuleStore::open(&train).unwrap().module().is_training().unwrap());
    let mut live = ModuleStore::open(&eval).unwrap();
    assert!(!live.module().is_training().unwrap());
    let source = transplant::open(&train).unwrap();
    let plan = Plan::build(source.as_ref(), &live, &Mapping::default()).unwrap();
    copy(&plan, source.as_ref(), &mut live, &Policy::default()).unwrap();
    assert!(!live.module().is_training().unwrap(), "a copy changed the mode");
    // Saved through the trait and through the module, in the same form.
    let (through_target, through_module) = (dir.path().join("a.pt"), dir.path().join("b.pt"));
    live.save(through_target.as_ref()).unwrap();
    live.module_mut().set_training(true).unwrap();
    live.module().save(through_module.as_ref()).unwrap();
    assert!(!ScriptModule::load(&through_target).unwrap().is_training().unwrap());
    assert!(ScriptModule::load(&through_module).unwrap().is_training().unwrap());
}

/// #28: a sharded index lists its tensors in the model's order — the
/// `weight_map`'s, where the writer kept the state dict's (a large tensor in a
/// shard of its own between two of another shard, as huggingface_hub shards) —
/// and, for `save_pretrained`'s index with sorted keys, shard by shard in the
/// shards' numbered order, each `torch.save` shard in its own order.
#[test]
fn a_sharded_index_lists_the_models_order() {
    let dir = tempfile::tempdir().unwrap();
    python(
        r#"
import json, sys, torch, safetensors.torch as st
d = sys.argv[1]
t = lambda: torch.zeros(2)
st.save_file({"wte.w": t(), "ln_f.w": t()}, f"{d}/m-00001-of-00002.safetensors")
st.save_file({"h.0.w": t()}, f"{d}/m-00002-of-00002.safetensors")
weight_map = {"wte.w": "m-00001-of-00002.safetensors", "h.0.w": "m-00002-of-00002.safetensors",
              "ln_f.w": "m-00001-of-00002.safetensors"}
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{d}/m.safetensors.index.json", "w"))
# save_pretrained's .bin index: keys sorted, shards in the state dict's order.
torch.save({"wte.weight": t(), "blocks.0.w": t()}, f"{d}/pytorch_model-00001-of-00002.bin")
torch.save({"blocks.1.w": t(), "head.w": t()}, f"{d}/pytorch_model-00002-of-00002.bin")
weight_map = {"blocks.0.w": "pytorch_model-00001-of-00002.bin", "blocks.1.w": "pytorch_model-00002-of-00002.bin",
              "head.w": "pytorch_model-00002-of-00002.bin", "wte.weight": "pytorch_model-00001-of-00002.bin"}
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{d}/pytorch_model.bin.index.json", "w"), sort_keys=True)
"#,
        &[dir.path()],
    );
    let names = |file: &str| -> Vec<String> {
        inspected(&dir.path().join(file)).into_iter().map(|r| r.name).collect()
    };
    assert_eq!(names("m.safetensors.index.json"), ["wte.w", "h.0.w", "ln_f.w"]);
    assert_eq!(names("pytorch_model.bin.index.json"), ["wte.weight", "blocks.0.w", "blocks.1.w", "head.w"]);
}
