//! The rule language over a capture's whole range and with constants:
//! `stack` gathers every expert of a layer in index order (gate and up fused by
//! `cat`), `unstack` parts them again; `let` constants size op arguments and
//! `--set` replaces them. Each planned with every shape known before anything
//! is written, copied into checkpoints, VarStores and converted files, and
//! every way it can be wrong refused with nothing written.
use crate::common;

use std::collections::BTreeMap;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use transplant::{
    copy, plan_conversion, verify, Checkpoint, ConvertOptions, Format, Mapping, Matcher, Plan, Policy, Rules,
    Source, VarStoreView,
};

const STRICT: Policy = Policy { strict: true, allow_lossy_casts: false };

fn checkpoint(tensors: Vec<(String, Tensor)>) -> Checkpoint {
    Checkpoint::from_tensors("memory", Format::Safetensors, tensors, BTreeMap::new()).unwrap()
}

fn random(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn zeros(shape: &[i64]) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, Device::Cpu))
}

fn tensor_of<'a>(store: &'a dyn Source, name: &str) -> &'a Tensor {
    let index = store.entries().iter().position(|e| e.name == name).unwrap_or_else(|| panic!("no {name}"));
    store.tensor(index).unwrap()
}

fn mapping(rules: &str) -> Mapping {
    Mapping { rules: Rules::parse(rules, "rules.txt").unwrap(), matcher: Matcher::Exact, source_order: None }
}

/// Mixtral's per-expert layout (`w1` gate, `w3` up, `w2` down) and
/// transformers 5's stacked one (`gate_up_proj` `[E, 2I, H]`, `down_proj`
/// `[E, H, I]`).
const STACK: &str = "\
layers\\.(\\d+)\\.experts\\.(\\d+)\\.w1\\.weight + layers\\.(\\d+)\\.experts\\.(\\d+)\\.w3\\.weight => layers.$1.experts.gate_up_proj | stack(0) | cat(1)
layers\\.(\\d+)\\.experts\\.(\\d+)\\.w2\\.weight => layers.$1.experts.down_proj | stack(0)
";
const UNSTACK: &str = "\
layers\\.(\\d+)\\.experts\\.gate_up_proj => layers.$1.experts.*.w1.weight, layers.$1.experts.*.w3.weight | split(1) | unstack(0)
layers\\.(\\d+)\\.experts\\.down_proj => layers.$1.experts.*.w2.weight | unstack(0)
";

/// Per-expert tensors of `layers` layers of `experts` experts, listed in a
/// scrambled order (10 before 2, as text sorts).
fn per_expert(layers: usize, experts: usize, (i, h): (i64, i64)) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for l in 0..layers {
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by_key(|e| e.to_string());
        order.reverse();
        for e in order {
            for (w, shape) in [("w1", [i, h]), ("w3", [i, h]), ("w2", [h, i])] {
                out.push((format!("layers.{l}.experts.{e}.{w}.weight"), random(&shape)));
            }
        }
    }
    out
}

fn by_name(tensors: &[(String, Tensor)], name: &str) -> Tensor {
    tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

/// What torch's own `stack` and `cat` make of the per-expert tensors.
fn stacked_by_torch(tensors: &[(String, Tensor)], layer: usize, experts: usize) -> (Tensor, Tensor) {
    let get = |e: usize, w: &str| by_name(tensors, &format!("layers.{layer}.experts.{e}.{w}.weight"));
    let gate = Tensor::stack(&(0..experts).map(|e| get(e, "w1")).collect::<Vec<_>>(), 0);
    let up = Tensor::stack(&(0..experts).map(|e| get(e, "w3")).collect::<Vec<_>>(), 0);
    let down = Tensor::stack(&(0..experts).map(|e| get(e, "w2")).collect::<Vec<_>>(), 0);
    (Tensor::cat(&[gate, up], 1), down)
}

fn plan_and_copy(source: &dyn Source, target: &mut dyn transplant::Target, rules: &str) -> Plan {
    let plan = Plan::build(source, &*target, &mapping(rules)).unwrap();
    plan.check(&STRICT).unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.is_complete(), "{:#?}", plan.findings);
    copy(&plan, source, target, &STRICT).unwrap();
    verify(&plan, source, &*target).unwrap();
    plan
}

#[test]
fn stack_gathers_every_expert_in_index_order_and_fuses_gate_and_up() {
    let (layers, experts, (i, h)) = (2, 12, (6, 4));
    let tensors = per_expert(layers, experts, (i, h));
    let source = checkpoint(tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    let mut target = checkpoint(
        (0..layers)
            .flat_map(|l| {
                [
                    (format!("layers.{l}.experts.gate_up_proj"), zeros(&[experts as i64, 2 * i, h])),
                    (format!("layers.{l}.experts.down_proj"), zeros(&[experts as i64, h, i])),
                ]
            })
            .collect(),
    );
    let plan = plan_and_copy(&source, &mut target, STACK);
    assert_eq!(plan.pairs.len(), tensors.len());
    for l in 0..layers {
        let (gate_up, down) = stacked_by_torch(&tensors, l, experts);
        assert!(tensor_of(&target, &format!("layers.{l}.experts.gate_up_proj")).equal(&gate_up));
        assert!(tensor_of(&target, &format!("layers.{l}.experts.down_proj")).equal(&down));
    }
    // The plan says where each expert goes: its slice of the stacked target.
    let pair = plan.pairs.iter().find(|p| p.source_name == "layers.1.experts.10.w3.weight").unwrap();
    let t = pair.transform.as_ref().unwrap();
    assert_eq!(t.target_text(), "[narrow(1, 6, 6) | narrow(0, 10, 1)]");
    assert_eq!(t.source_text(), " | reshape(1, 6, 4)");
    assert_eq!((t.source_shape.clone(), t.target_shape.clone()), (vec![6, 4], vec![12, 12, 4]));
}

#[test]
fn unstack_parts_a_stacked_tensor_into_one_target_per_index() {
    let (experts, (i, h)) = (3, (4, 2));
    let gate_up = random(&[experts, 2 * i, h]);
    let down = random(&[experts, h, i]);
    let source = checkpoint(vec![
        ("layers.0.experts.gate_up_proj".into(), gate_up.shallow_clone()),
        ("layers.0.experts.down_proj".into(), down.shallow_clone()),
    ]);
    let names = per_expert(1, experts as usize, (i, h));
    let mut target = checkpoint(names.iter().map(|(n, t)| (n.clone(), zeros(&t.size()))).collect());
    plan_and_copy(&source, &mut target, UNSTACK);
    for e in 0..experts {
        let w = |w: &str| tensor_of(&target, &format!("layers.0.experts.{e}.{w}.weight")).shallow_clone();
        assert!(w("w1").equal(&gate_up.get(e).narrow(0, 0, i)));
        assert!(w("w3").equal(&gate_up.get(e).narrow(0, i, i)));
        assert!(w("w2").equal(&down.get(e)));
    }
}

#[test]
fn stacks_write_into_varstores() {
    let vs = VarStore::new(Device::Cpu);
    let _experts = vs.root().sub("layers").sub("0").sub("experts").zeros("down_proj", &[3, 2, 5]);
    let mut target = VarStoreView::new(&vs).unwrap();
    let tensors: Vec<(String, Tensor)> =
        (0..3).map(|e| (format!("layers.0.experts.{e}.w2.weight"), random(&[2, 5]))).collect();
    let source = checkpoint(tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    plan_and_copy(
        &source,
        &mut target,
        "layers\\.(\\d+)\\.experts\\.(\\d+)\\.w2\\.weight => layers.$1.experts.down_proj | stack(0)\n",
    );
    let want = Tensor::stack(&tensors.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>(), 0);
    assert!(vs.variables()["layers.0.experts.down_proj"].equal(&want));
}

/// Converting per-expert into stacked and back gives every tensor back, bit
/// for bit, through files written one tensor at a time.
#[test]
fn convert_stacks_and_unstacks_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = per_expert(2, 11, (4, 3));
    let source = checkpoint(tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    let stacked_path = dir.path().join("stacked.safetensors");
    let (plan, outline) = plan_conversion(&source, &mapping(STACK), &stacked_path, None).unwrap();
    assert!(plan.is_complete(), "{:#?}", plan.findings);
    let shapes: Vec<(String, Vec<i64>)> =
        outline.entries().iter().map(|e| (e.name.to_string(), e.shape.clone())).collect();
    assert_eq!(
        shapes,
        vec![
            ("layers.0.experts.gate_up_proj".to_string(), vec![11, 8, 3]),
            ("layers.0.experts.down_proj".to_string(), vec![11, 3, 4]),
            ("layers.1.experts.gate_up_proj".to_string(), vec![11, 8, 3]),
            ("layers.1.experts.down_proj".to_string(), vec![11, 3, 4]),
        ]
    );
    transplant::convert(&plan, &source, &outline, &stacked_path, &STRICT, ConvertOptions::default()).unwrap();
    let stacked = Checkpoint::open(&stacked_path).unwrap();
    let (gate_up, down) = stacked_by_torch(&tensors, 1, 11);
    assert!(tensor_of(&stacked, "layers.1.experts.gate_up_proj").equal(&gate_up));
    assert!(tensor_of(&stacked, "layers.1.experts.down_proj").equal(&down));
    let back_path = dir.path().join("back.pth");
    let (plan, outline) = plan_conversion(&stacked, &mapping(UNSTACK), &back_path, None).unwrap();
    assert!(plan.is_complete(), "{:#?}", plan.findings);
    assert_eq!(outline.entries().len(), tensors.len());
    assert_eq!(outline.entries()[0].name, "layers.0.experts.0.w1.weight");
    assert_eq!(outline.entries()[1].name, "layers.0.experts.0.w3.weight");
    transplant::convert(&plan, &stacked, &outline, &back_path, &STRICT, ConvertOptions::default()).unwrap();
    let back = Checkpoint::open(&back_path).unwrap();
    for (name, t) in &tensors {
        assert!(tensor_of(&back, name).equal(t), "{name}");
    }
}

/// The refused plan's error findings, after checking nothing was written.
fn refused(source: &Checkpoint, target: &mut Checkpoint, rules: &str) -> String {
    let before: Vec<Tensor> = (0..target.entries().len()).map(|i| target.tensor(i).unwrap().copy()).collect();
    let plan = Plan::build(source, &*target, &mapping(rules)).unwrap();
    let err = copy(&plan, source, target, &Policy::default()).unwrap_err().to_string();
    for (i, b) in before.iter().enumerate() {
        assert!(target.tensor(i).unwrap().equal(b), "target {i} was written: {err}");
    }
    assert!(!plan.is_complete());
    err
}

#[test]
fn a_missing_expert_a_gap_or_a_bad_index_is_named_and_nothing_is_written() {
    let experts = |skip: &[&str]| -> Checkpoint {
        let all = per_expert(1, 4, (2, 2));
        checkpoint(all.into_iter().filter(|(n, _)| !skip.iter().any(|s| n.contains(s))).collect())
    };
    let target = || {
        checkpoint(vec![
            ("layers.0.experts.gate_up_proj".into(), zeros(&[4, 4, 2])),
            ("layers.0.experts.down_proj".into(), zeros(&[4, 2, 2])),
        ])
    };
    // Expert 2 has no w3: named by index and pattern.
    let err = refused(&experts(&["experts.2.w3"]), &mut target(), STACK);
    assert!(err.contains("index 2 of layers\\.(\\d+)\\.experts\\.(\\d+)\\.w3\\.weight"), "{err}");
    assert!(err.contains("gate_up_proj | stack(0) | cat(1)"), "{err}");
    // Expert 1 missing altogether: a gap.
    let err = refused(&experts(&["experts.1."]), &mut target(), STACK);
    assert!(err.contains("index 1 (a gap: the indices found run to 3)"), "{err}");
    // The last expert missing: the stack is one short of its target.
    let err = refused(&experts(&["experts.3."]), &mut target(), STACK);
    assert!(err.contains("the result is [3, 4, 2], layers.0.experts.gate_up_proj is [4, 4, 2]"), "{err}");
    // An index that is not a number from 0 as names write it.
    let mut odd = per_expert(1, 2, (2, 2));
    odd.push(("layers.0.experts.01.w2.weight".into(), random(&[2, 2])));
    let err = refused(&checkpoint(odd), &mut target(), STACK);
    assert!(err.contains("layers.0.experts.01.w2.weight is not a number from 0"), "{err}");
    // Experts of different shapes cannot be stacked.
    let mut uneven = per_expert(1, 4, (2, 2));
    uneven[0].1 = random(&[3, 2]);
    let err = refused(&checkpoint(uneven), &mut target(), STACK);
    assert!(err.contains("cannot stack"), "{err}");
    // An unstack whose split does not fit.
    let source = checkpoint(vec![("layers.0.experts.gate_up_proj".into(), random(&[2, 5, 2]))]);
    let mut into =
        checkpoint(per_expert(1, 2, (2, 2)).into_iter().map(|(n, _)| (n, zeros(&[2, 2]))).collect());
    let err = refused(&source, &mut into, UNSTACK);
    assert!(err.contains("does not split into 2 equal parts"), "{err}");
}

#[test]
fn the_parser_refuses_ranges_it_cannot_mean() {
    let error = |text: &str| Rules::parse(text, "rules.txt").unwrap_err().to_string();
    let cases = [
        ("e\\.(\\d+)\\.w => w | stack(0) | stack(1)", "stack starts a chain"),
        ("e\\.(\\d+)\\.w => w | reshape(-1) | stack(0)", "stack starts a chain"),
        ("e\\.w => w | stack(0)", "has 0 such captures"),
        ("(\\w+)\\.(\\d+)\\.w => w | stack(0)", "has 2 such captures"),
        ("(\\d+)\\.a + (\\d+)\\.b => w | stack(0)", "stack(D) | cat(C)"),
        ("(\\d+)\\.a => w | stack(0) | cat(1)", "joins several patterns"),
        ("(\\d+)\\.a => w, v | stack(0)", "stack makes one target"),
        ("w => e.*.w | unstack(0) | reshape(-1)", "unstack ends a chain"),
        ("w => e.w | unstack(0)", "needs one `*`"),
        ("w => e.*.*.w | unstack(0)", "needs one `*`"),
        ("w => a.*, b.* | unstack(0)", "split(C) | unstack(D)"),
        ("w + v => a.* | cat(0) | unstack(0)", "one pattern"),
        ("(\\d+)\\.w => a | stack(0) | narrow(0, 0, 1)", "narrow after"),
    ];
    for (text, needle) in cases {
        let message = error(text);
        assert!(message.contains("rules.txt:1") && message.contains(needle), "{text}: {message}");
    }
}

/// One rules file for every size: `let` constants in op arguments, replaced
/// by `--set` on the command line; a `--set` naming no constant, or making
/// a division inexact, is an error naming it, and nothing is written.
#[test]
fn constants_and_set_size_one_rules_file_for_every_model() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("heads.rules");
    std::fs::write(&rules, "let dim = 16\nlet heads = 4\nwq => q | reshape(heads, dim / heads, dim)\n")
        .unwrap();
    let convert_with = |w: &Tensor, out: &str, extra: &[&str]| {
        let src = dir.path().join(format!("{out}.src.safetensors"));
        checkpoint(vec![("wq".into(), w.shallow_clone())]).save_as(&src, Format::Safetensors).unwrap();
        let out = dir.path().join(out);
        let args = [
            &[
                "convert",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--rules",
                rules.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        (common::transplant(args), out)
    };
    let w = random(&[16, 16]);
    let (run, out) = convert_with(&w, "default.safetensors", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(tensor_of(&Checkpoint::open(&out).unwrap(), "q").equal(&w.reshape([4, 4, 16])));
    let w = random(&[32, 32]);
    let (run, out) = convert_with(&w, "set.safetensors", &["--set", "heads=8", "--set", "dim=32"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(tensor_of(&Checkpoint::open(&out).unwrap(), "q").equal(&w.reshape([8, 4, 32])));
    let (run, out) = convert_with(&w, "typo.safetensors", &["--set", "haeds=8"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("--set haeds") && run.stderr.contains("defines no constant `haeds`"),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
    let (run, out) = convert_with(&w, "inexact.safetensors", &["--set", "heads=3"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("heads.rules:3") && run.stderr.contains("16 / 3"), "{}", run.stderr);
    assert!(!out.exists());
    let (run, _) = convert_with(&w, "bad.safetensors", &["--set", "heads"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("NAME=VALUE"), "{}", run.stderr);
    // `plan` (and every command taking a mapping) reads `--set` too.
    let (src, dst) = (dir.path().join("plan.src.safetensors"), dir.path().join("plan.dst.safetensors"));
    checkpoint(vec![("wq".into(), random(&[32, 32]))]).save_as(&src, Format::Safetensors).unwrap();
    checkpoint(vec![("q".into(), zeros(&[2, 16, 32]))]).save_as(&dst, Format::Safetensors).unwrap();
    let plan = |sets: &[&str]| {
        let args = [
            &[
                "plan",
                src.to_str().unwrap(),
                dst.to_str().unwrap(),
                "--rules",
                rules.to_str().unwrap(),
                "--json",
            ][..],
            sets,
        ]
        .concat();
        common::transplant(args)
    };
    let run = plan(&["--set", "heads=2", "--set", "dim=32"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("reshape(2, 16, 32)") || run.stdout.contains("[2,16,32]"), "{}", run.stdout);
    let run = plan(&["--set", "heads=4", "--set", "dim=32"]);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(format!("{}{}", run.stdout, run.stderr).contains("reshape(4, 8, 32)"), "{}", run.stdout);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Stacking any number of members along any dimension is torch's
        /// `stack`, and unstacking the result gives every member back.
        #[test]
        fn stack_then_unstack_is_the_identity(count in 1usize..13, shape in prop::collection::vec(1i64..4, 1..4), dim in 0usize..4) {
            let dim = (dim % (shape.len() + 1)) as i64;
            let members: Vec<(String, Tensor)> = (0..count).map(|e| (format!("m.{e}.w"), random(&shape))).collect();
            let source = checkpoint(members.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
            let want = Tensor::stack(&members.iter().map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>(), dim);
            let mut stacked = checkpoint(vec![("all".into(), zeros(&want.size()))]);
            plan_and_copy(&source, &mut stacked, &format!("m\\.(\\d+)\\.w => all | stack({dim})\n"));
            prop_assert!(tensor_of(&stacked, "all").equal(&want));
            let mut back = checkpoint(members.iter().map(|(n, _)| (n.clone(), zeros(&shape))).collect());
            plan_and_copy(&stacked, &mut back, &format!("all => m.*.w | unstack({dim})\n"));
            for (name, t) in &members {
                prop_assert!(tensor_of(&back, name).equal(t));
            }
        }
    }
}

/// A TorchScript module holding transformers 5's stacked experts (traced by
/// PyTorch): the per-expert checkpoint is stacked into it live
/// ([`transplant::ModuleStore`]) and through `transplant copy`, which streams
/// the archive's rewrite; the module's forward then computes with the stack.
#[test]
fn stacks_write_into_torchscript_modules_live_and_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("experts.pt");
    common::python(
        r#"
import sys, torch
class Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(5, 6, 2))
        self.down_proj = torch.nn.Parameter(torch.zeros(5, 2, 3))
    def forward(self, x):
        return torch.matmul(self.gate_up_proj, x)
class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()
    def forward(self, x):
        return self.experts(x)
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer()])
    def forward(self, x):
        out = x
        for layer in self.layers:
            out = layer(x)
        return out
torch.jit.save(torch.jit.trace(Model(), torch.zeros(2)), sys.argv[1])
"#,
        &[&module],
    );
    let tensors = per_expert(1, 5, (3, 2));
    let source = checkpoint(tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    let src = dir.path().join("experts.safetensors");
    source.save_as(&src, Format::Safetensors).unwrap();
    let (gate_up, down) = stacked_by_torch(&tensors, 0, 5);
    let x = random(&[2]);
    let want = gate_up.matmul(&x);
    // Live.
    let mut live = transplant::ModuleStore::open(&module).unwrap();
    plan_and_copy(&source, &mut live, STACK);
    assert!(tensor_of(&live, "layers.0.experts.down_proj").equal(&down));
    let got = live.module().forward(&[x.shallow_clone()]).unwrap().remove(0);
    assert!(got.allclose(&want, 1e-6, 1e-6, false));
    // Streamed into a rewritten archive by the CLI.
    let rules = dir.path().join("stack.rules");
    std::fs::write(&rules, STACK).unwrap();
    let out = dir.path().join("out.pt");
    let run = common::transplant([
        "copy",
        src.to_str().unwrap(),
        module.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
        "--strict",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let written = transplant::ModuleStore::open(&out).unwrap();
    assert!(tensor_of(&written, "layers.0.experts.gate_up_proj").equal(&gate_up));
    assert!(tensor_of(&written, "layers.0.experts.down_proj").equal(&down));
}

/// A plan with stacks saved by `plan --save-plan` and replayed by
/// `copy --plan` writes the same stacked tensors (the replay checks the
/// regions tile each target again).
#[test]
fn a_saved_plan_of_stacks_replays() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = per_expert(1, 3, (2, 2));
    let (src, dst) = (dir.path().join("src.safetensors"), dir.path().join("dst.safetensors"));
    checkpoint(tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect())
        .save_as(&src, Format::Safetensors)
        .unwrap();
    checkpoint(vec![
        ("layers.0.experts.gate_up_proj".into(), zeros(&[3, 4, 2])),
        ("layers.0.experts.down_proj".into(), zeros(&[3, 2, 2])),
    ])
    .save_as(&dst, Format::Safetensors)
    .unwrap();
    let rules = dir.path().join("stack.rules");
    std::fs::write(&rules, STACK).unwrap();
    let (plan, out) = (dir.path().join("plan.json"), dir.path().join("out.safetensors"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let run = common::transplant([
        "plan".to_string(),
        s(&src),
        s(&dst),
        "--rules".into(),
        s(&rules),
        "--save-plan".into(),
        s(&plan),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let run = common::transplant([
        "copy".to_string(),
        s(&src),
        s(&dst),
        "-o".into(),
        s(&out),
        "--plan".into(),
        s(&plan),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let written = Checkpoint::open(&out).unwrap();
    let (gate_up, down) = stacked_by_torch(&tensors, 0, 3);
    assert!(tensor_of(&written, "layers.0.experts.gate_up_proj").equal(&gate_up));
    assert!(tensor_of(&written, "layers.0.experts.down_proj").equal(&down));
}
