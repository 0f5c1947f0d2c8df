//! Transforms in the rule language: each op, split and cat, planned (shapes
//! checked before anything is written), copied as views, verified; and every
//! way a transform can be wrong, refused with nothing written.
use crate::common;

use std::collections::BTreeMap;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};
use transplant::{
    copy, verify, Checkpoint, Finding, Format, Mapping, Matcher, Plan, Policy, Rules, Source, VarStoreView,
};

fn checkpoint(tensors: Vec<(&str, Tensor)>) -> Checkpoint {
    let tensors = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
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

/// Plans and copies; the plan must be complete and clean.
fn transfer(source: &Checkpoint, target: &mut dyn transplant::Target, rules: &str) -> Plan {
    let plan = Plan::build(source, &*target, &mapping(rules)).unwrap();
    assert!(plan.findings.is_empty() && plan.is_complete(), "{:#?}", plan.findings);
    copy(&plan, source, target, &Policy { strict: true, allow_lossy_casts: false }).unwrap();
    verify(&plan, source, &*target).unwrap();
    plan
}

/// The one error finding of a plan, as text, after checking nothing is written.
fn refused(source: &Checkpoint, target: &mut Checkpoint, rules: &str) -> String {
    let before: Vec<Tensor> = (0..target.entries().len()).map(|i| target.tensor(i).unwrap().copy()).collect();
    let plan = Plan::build(source, &*target, &mapping(rules)).unwrap();
    let err = copy(&plan, source, target, &Policy::default()).unwrap_err().to_string();
    for (i, b) in before.iter().enumerate() {
        assert!(target.tensor(i).unwrap().equal(b), "target {i} was written: {err}");
    }
    assert!(!plan.is_complete());
    let errors: Vec<String> = plan
        .problems(&Policy::default())
        .into_iter()
        .filter(|(s, _)| *s == transplant::Severity::Error)
        .map(|(_, f)| f.to_string())
        .collect();
    assert!(!errors.is_empty(), "{err}");
    errors.join("\n")
}

#[test]
fn one_to_one_ops_write_the_transformed_source() {
    let ls = random(&[8, 1, 1]);
    let conv1d = random(&[3, 5]);
    let lin = random(&[16, 8]);
    let cube = random(&[2, 3, 4]);
    let long = random(&[10, 4]);
    let source = checkpoint(vec![
        ("blocks.0.layer_scale", ls.shallow_clone()),
        ("h.0.attn.c_attn.weight", conv1d.shallow_clone()),
        ("classifier.0.weight", lin.shallow_clone()),
        ("cube", cube.shallow_clone()),
        ("long", long.shallow_clone()),
    ]);
    let mut target = checkpoint(vec![
        ("stages.0.gamma", zeros(&[8])),
        ("h.0.attn.proj.weight", zeros(&[5, 3])),
        ("pre_logits.fc1.weight", zeros(&[16, 2, 2, 2])),
        ("cube", zeros(&[4, 2, 3])),
        ("short", zeros(&[2, 4])),
    ]);
    let rules = "blocks\\.(\\d+)\\.layer_scale => stages.$1.gamma | reshape(-1)\n\
                 (.*)\\.c_attn\\.weight => $1.proj.weight | transpose(0, 1)\n\
                 classifier\\.0\\.weight => pre_logits.fc1.weight | reshape(16, 2, 2, -1)\n\
                 cube => cube | permute(2, 0, 1)\n\
                 long => short | narrow(0, -3, 2)\n";
    let plan = transfer(&source, &mut target, rules);
    assert_eq!(plan.pairs.len(), 5);
    assert!(tensor_of(&target, "stages.0.gamma").equal(&ls.reshape([-1])));
    assert!(tensor_of(&target, "h.0.attn.proj.weight").equal(&conv1d.transpose(0, 1)));
    assert!(tensor_of(&target, "pre_logits.fc1.weight").equal(&lin.reshape([16, 2, 2, 2])));
    assert!(tensor_of(&target, "cube").equal(&cube.permute([2, 0, 1])));
    assert!(tensor_of(&target, "short").equal(&long.narrow(0, 7, 2)));
    // Every pair carries its transform, with both shapes.
    let t = plan.pairs.iter().find(|p| p.target_name == "stages.0.gamma").unwrap().transform.clone().unwrap();
    assert_eq!((t.source_shape, t.target_shape), (vec![8, 1, 1], vec![8]));
}

/// Verification compares what was written with the transformed source: one
/// changed element in a transposed, a split or a concatenated target is found.
#[test]
fn verification_finds_a_changed_element_behind_every_transform() {
    let (w, kv, a, b) = (random(&[64, 80]), random(&[80, 64]), random(&[64, 30]), random(&[64, 50]));
    let source = checkpoint(vec![("w", w), ("kv", kv), ("a", a), ("b", b)]);
    let mut target = checkpoint(vec![
        ("wt", zeros(&[80, 64])),
        ("k", zeros(&[80, 16])),
        ("v", zeros(&[80, 48])),
        ("ab", zeros(&[64, 80])),
    ]);
    let rules = "w => wt | transpose(0, 1)\nkv => k, v | split(1, 16, 48)\na + b => ab | cat(1)\n";
    let plan = transfer(&source, &mut target, rules);
    for (name, at) in [("wt", [7, 9]), ("k", [3, 15]), ("v", [79, 0]), ("ab", [10, 45])] {
        let t = tensor_of(&target, name).shallow_clone();
        let old = t.double_value(&at);
        let _ = t.get(at[0]).get(at[1]).fill_(old + 1.0);
        let err = verify(&plan, &source, &target).unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
        let _ = t.get(at[0]).get(at[1]).fill_(old);
        verify(&plan, &source, &target).unwrap();
    }
}

#[test]
fn a_fused_qkv_splits_into_three_and_joins_back() {
    let (dim, layers) = (4, 3);
    let mut fused = Vec::new();
    let mut separate = Vec::new();
    for l in 0..layers {
        fused.push((format!("blocks.{l}.attn.qkv.weight"), random(&[3 * dim, dim])));
        fused.push((format!("blocks.{l}.attn.qkv.bias"), random(&[3 * dim])));
        for p in ["q", "k", "v"] {
            separate.push((format!("layers.{l}.{p}_proj.weight"), zeros(&[dim, dim])));
            separate.push((format!("layers.{l}.{p}_proj.bias"), zeros(&[dim])));
        }
    }
    let source = checkpoint(fused.iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect());
    let mut target = checkpoint(separate.iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect());
    let split = "blocks\\.(\\d+)\\.attn\\.qkv\\.(weight|bias) => layers.$1.q_proj.$2, layers.$1.k_proj.$2, layers.$1.v_proj.$2 | split(0)\n";
    let plan = transfer(&source, &mut target, split);
    assert_eq!(plan.pairs.len(), 6 * layers as usize);
    for l in 0..layers {
        for leaf in ["weight", "bias"] {
            let qkv = tensor_of(&source, &format!("blocks.{l}.attn.qkv.{leaf}"));
            for (k, p) in ["q", "k", "v"].iter().enumerate() {
                let part = tensor_of(&target, &format!("layers.{l}.{p}_proj.{leaf}"));
                assert!(part.equal(&qkv.narrow(0, k as i64 * dim, dim)), "{l} {p} {leaf}");
            }
        }
    }
    // And back: three sources of each layer (equal captures) into one target.
    let mut back = checkpoint(fused.iter().map(|(n, t)| (n.as_str(), t.zeros_like())).collect());
    let cat = "layers\\.(\\d+)\\.q_proj\\.(weight|bias) + layers\\.(\\d+)\\.k_proj\\.(weight|bias) + layers\\.(\\d+)\\.v_proj\\.(weight|bias) => blocks.$1.attn.qkv.$2 | cat(0)\n";
    let plan = transfer(&target, &mut back, cat);
    assert_eq!(plan.pairs.len(), 6 * layers as usize);
    for (name, t) in &fused {
        assert!(tensor_of(&back, name).equal(t), "{name}");
    }
    let region = plan.pairs[1].transform.as_ref().unwrap().target_text();
    assert!(region.starts_with("[narrow(0, "), "{region}");
}

#[test]
fn uneven_splits_and_cats_along_inner_dimensions_with_ops_after() {
    let kv = random(&[6, 4]);
    let a = random(&[2, 3]);
    let b = random(&[2, 5]);
    let source =
        checkpoint(vec![("kv", kv.shallow_clone()), ("x.a", a.shallow_clone()), ("x.b", b.shallow_clone())]);
    // cat along dimension 1 (regions not contiguous), then transposed and reshaped.
    let mut target = checkpoint(vec![("k", zeros(&[4, 2])), ("v", zeros(&[4, 4])), ("y", zeros(&[4, 2, 2]))]);
    let rules = "kv => k, v | transpose(0, 1) | split(1, 2, 4)\n\
                 x\\.a + x\\.b => y | cat(1) | transpose(0, 1) | reshape(4, 2, 2)\n";
    transfer(&source, &mut target, rules);
    let kvt = kv.transpose(0, 1);
    assert!(tensor_of(&target, "k").equal(&kvt.narrow(1, 0, 2)));
    assert!(tensor_of(&target, "v").equal(&kvt.narrow(1, 2, 4)));
    let expected = Tensor::cat(&[&a, &b], 1).transpose(0, 1).reshape([4, 2, 2]);
    assert!(tensor_of(&target, "y").equal(&expected));
}

#[test]
fn transforms_write_into_varstores() {
    let vs = VarStore::new(Device::Cpu);
    let _linear = nn::linear(vs.root() / "fc", 4, 6, Default::default());
    let mut target = VarStoreView::new(&vs).unwrap();
    let w = random(&[4, 6]);
    let (b1, b2) = (random(&[2]), random(&[4]));
    let source = checkpoint(vec![
        ("c.w", w.shallow_clone()),
        ("c.b1", b1.shallow_clone()),
        ("c.b2", b2.shallow_clone()),
    ]);
    let rules = "c\\.w => fc.weight | transpose(0, 1)\nc\\.b1 + c\\.b2 => fc.bias | cat(0)\n";
    transfer(&source, &mut target, rules);
    let vars = vs.variables();
    assert!(vars["fc.weight"].equal(&w.transpose(0, 1)));
    assert!(vars["fc.bias"].equal(&Tensor::cat(&[&b1, &b2], 0)));
}

#[test]
fn every_bad_transform_is_an_error_naming_rule_tensors_and_shapes() {
    let source = checkpoint(vec![
        ("ls", random(&[8, 1, 1])),
        ("qkv", random(&[10, 4])),
        ("q", random(&[4, 4])),
        ("k", random(&[3, 4])),
        ("k2", random(&[4, 5])),
    ]);
    let target = || {
        checkpoint(vec![
            ("gamma", zeros(&[8])),
            ("a", zeros(&[5, 4])),
            ("b", zeros(&[5, 4])),
            ("c", zeros(&[5, 4])),
            ("qk", zeros(&[8, 4])),
        ])
    };
    let cases = [
        (
            "ls => gamma | reshape(3, -1)\n",
            vec!["ls => gamma | reshape(3, -1)", "ls [8, 1, 1]", "8 elements"],
        ),
        ("ls => gamma | reshape(7)\n", vec!["needs 7 elements", "[8, 1, 1]"]),
        ("ls => gamma | narrow(0, 4, 8)\n", vec!["narrow(0, 4, 8) is out of range", "has 8 indices"]),
        ("ls => gamma | transpose(0, 3)\n", vec!["dimension 3 is out of range for shape [8, 1, 1]"]),
        ("ls => gamma\n", vec!["shape mismatch", "[8, 1, 1]"]),
        ("ls => gamma | reshape(2, 4)\n", vec!["it makes [2, 4] of ls [8, 1, 1], and gamma receives [8]"]),
        ("qkv => a, b, c | split(0)\n", vec!["qkv [10, 4]", "does not split into 3 equal parts"]),
        ("qkv => a, b | split(0, 5, 4)\n", vec!["add up to 9, dimension 0 of [10, 4] has 10"]),
        ("qkv => a, nope | split(0)\n", vec!["the target has no tensor nope"]),
        (
            "q + k2 => qk | cat(0)\n",
            vec!["cannot concatenate [4, 4], [4, 5] along dimension 0", "q [4, 4]", "k2 [4, 5]"],
        ),
        ("q + k => qk | cat(0)\n", vec!["the result is [7, 4], qk is [8, 4]"]),
        ("q + k => qk | cat(0) | reshape(4, 7)\n", vec!["the result is [4, 7], qk is [8, 4]"]),
    ];
    for (rules, needles) in cases {
        let message = refused(&source, &mut target(), rules);
        for needle in needles {
            assert!(message.contains(needle), "{rules}: {needle:?} not in {message}");
        }
    }
}

#[test]
fn a_group_missing_a_member_names_what_it_found_and_what_is_missing() {
    let source = checkpoint(vec![
        ("l.0.q", random(&[2])),
        ("l.0.k", random(&[2])),
        ("l.1.q", random(&[2])),
        ("l.1.k", random(&[2])),
        ("l.1.v", random(&[2])),
    ]);
    let mut target = checkpoint(vec![("m.0.qkv", zeros(&[6])), ("m.1.qkv", zeros(&[6]))]);
    let rules = "l\\.(\\d+)\\.q + l\\.(\\d+)\\.k + l\\.(\\d+)\\.v => m.$1.qkv | cat(0)\n";
    let message = refused(&source, &mut target, rules);
    assert!(
        message.contains("the group for m.0.qkv has l.0.q (for l\\.(\\d+)\\.q), l.0.k (for l\\.(\\d+)\\.k) but no source for l\\.(\\d+)\\.v"),
        "{message}"
    );
    // The complete group is planned all the same; only the incomplete one is an error.
    let plan = Plan::build(&source, &target, &mapping(rules)).unwrap();
    assert_eq!(plan.pairs.len(), 3);
    assert!(plan.pairs.iter().all(|p| p.target_name == "m.1.qkv"));
}

#[test]
fn transformed_names_collide_like_plain_renames() {
    let source = checkpoint(vec![("a", random(&[2])), ("b", random(&[2])), ("c", random(&[4]))]);
    let mut target = checkpoint(vec![("ab", zeros(&[4]))]);
    let rules = "a + b => ab | cat(0)\nc => ab\n";
    let message = refused(&source, &mut target, rules);
    assert!(message.contains("collision") && message.contains("all map to ab"), "{message}");
    for name in ["a (by rule", "b (by rule", "c (by rule"] {
        assert!(message.contains(name), "{name}: {message}");
    }
    // A rule with transforms that matches nothing is unused, as a plain one.
    let source = checkpoint(vec![("x", random(&[4]))]);
    let target = checkpoint(vec![("x", zeros(&[4]))]);
    let plan = Plan::build(&source, &target, &mapping("nothing => y | reshape(-1)\nn1 + n2 => z | cat(0)\n"))
        .unwrap();
    let unused = plan.findings.iter().filter(|f| matches!(f, Finding::UnusedRule { .. })).count();
    assert_eq!(unused, 2, "{:?}", plan.findings);
}

#[test]
fn plans_with_transforms_replay_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let (q, k, ls) = (random(&[2, 3]), random(&[2, 3]), random(&[3, 1]));
    let source =
        checkpoint(vec![("q", q.shallow_clone()), ("k", k.shallow_clone()), ("ls", ls.shallow_clone())]);
    let mut target = checkpoint(vec![("qk", zeros(&[4, 3])), ("g", zeros(&[3]))]);
    let plan =
        Plan::build(&source, &target, &mapping("q + k => qk | cat(0)\nls => g | reshape(-1)\n")).unwrap();
    let path = dir.path().join("plan.json");
    plan.save(&path, &source, &target).unwrap();
    let replayed = Plan::replay(&path, &source, &target).unwrap();
    assert!(replayed.findings.is_empty() && replayed.is_complete(), "{:?}", replayed.findings);
    copy(&replayed, &source, &mut target, &Policy::default()).unwrap();
    assert!(tensor_of(&target, "qk").equal(&Tensor::cat(&[&q, &k], 0)));
    assert!(tensor_of(&target, "g").equal(&ls.reshape([-1])));
    // A plan file edited so that two members overlap is refused.
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("\"start\": 2", "\"start\": 1", 1);
    assert_ne!(text, edited);
    std::fs::write(&path, edited).unwrap();
    let replayed = Plan::replay(&path, &source, &target).unwrap();
    let message = replayed.check(&Policy::default()).unwrap_err().to_string();
    assert!(message.contains("qk receives 2 pair(s) whose regions do not tile it exactly"), "{message}");
}

#[test]
fn leftovers_of_equal_element_counts_get_a_reshape_rule_that_works() {
    let source = checkpoint(vec![("features.1.0.layer_scale", random(&[96, 1, 1]))]);
    let mut target = checkpoint(vec![("stages.0.blocks.0.gamma", zeros(&[96]))]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let rule = plan
        .findings
        .iter()
        .find_map(|f| match f {
            Finding::CouldPair { rule, .. } => rule.clone(),
            _ => None,
        })
        .expect("a suggestion");
    assert_eq!(rule, "features\\.1\\.0\\.layer_scale => stages.0.blocks.0.gamma | reshape(-1)");
    let message = plan.findings.iter().find(|f| matches!(f, Finding::CouldPair { .. })).unwrap().to_string();
    assert!(message.contains("have the same number of elements"), "{message}");
    transfer(&source, &mut target, &format!("{rule}\n"));
    // Where a reshape would scramble rows (a transposed matrix), no rule is offered.
    let source = checkpoint(vec![("fc.weight", random(&[3, 5]))]);
    let target = checkpoint(vec![("head.weight", zeros(&[5, 3]))]);
    let plan = Plan::build(&source, &target, &Mapping::default()).unwrap();
    let hint =
        plan.findings.iter().find(|f| matches!(f, Finding::CouldPair { rule: None, .. })).expect("a hint");
    assert!(hint.to_string().contains("`| transpose(..)`"), "{hint}");
}

/// The command line: `plan` shows each transform with both shapes, the JSON
/// has them, `copy --map` takes every form and writes the file.
#[test]
fn the_cli_plans_shows_and_copies_transforms() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, out) = (
        dir.path().join("src.safetensors"),
        dir.path().join("dst.safetensors"),
        dir.path().join("out.safetensors"),
    );
    let qkv = random(&[6, 2]);
    let source = checkpoint(vec![("attn.qkv.weight", qkv.shallow_clone()), ("ls", random(&[4, 1, 1]))]);
    source.save_as(&src, Format::Safetensors).unwrap();
    let target = checkpoint(vec![
        ("q", zeros(&[2, 2])),
        ("k", zeros(&[2, 2])),
        ("v", zeros(&[2, 2])),
        ("gamma", zeros(&[4])),
    ]);
    target.save_as(&dst, Format::Safetensors).unwrap();
    let maps = ["--map", "attn\\.qkv\\.weight => q, k, v | split(0)", "--map", "ls=>gamma|reshape(-1)"];
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let run = common::transplant([&["plan", s, d][..], &maps].concat());
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("k     <- attn.qkv.weight | narrow(0, 2, 2)"), "{}", run.stdout);
    assert!(
        run.stdout.contains("gamma <- ls | reshape(-1)") && run.stdout.contains("[4, 1, 1] -> [4]"),
        "{}",
        run.stdout
    );
    let run = common::transplant([&["plan", s, d, "--json"][..], &maps].concat());
    let json = run.json();
    let pair = json["pairs"].as_array().unwrap().iter().find(|p| p["target"] == "gamma").unwrap().clone();
    assert_eq!(pair["transform"]["source_ops"], serde_json::json!([{"op": "reshape", "shape": [-1]}]));
    assert_eq!(pair["transform"]["source_shape"], serde_json::json!([4, 1, 1]));
    assert_eq!(pair["transform"]["target_shape"], serde_json::json!([4]));
    let run =
        common::transplant([&["copy", s, d, "-o", out.to_str().unwrap(), "--strict"][..], &maps].concat());
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let written = Checkpoint::open(&out).unwrap();
    assert!(tensor_of(&written, "v").equal(&qkv.narrow(0, 4, 2)));
    // A bad transform: exit 1, the rule and shapes named, no OUT.
    let bad = dir.path().join("bad.safetensors");
    let run =
        common::transplant(["copy", s, d, "-o", bad.to_str().unwrap(), "--map", "ls=>gamma|reshape(3,-1)"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("ls => gamma | reshape(3, -1)") && all.contains("ls [4, 1, 1]"), "{all}");
    assert!(!bad.exists());
}

#[test]
fn the_parser_refuses_what_it_cannot_mean() {
    let error = |text: &str| Rules::parse(text, "rules.txt").unwrap_err().to_string();
    let cases = [
        ("a => b | frob(1)", "unknown op `frob`"),
        ("a => b | reshape(-1, -1)", "only one dimension can be -1"),
        ("a => b | reshape()", "needs at least one argument"),
        ("a => b | transpose(0)", "transpose takes 2 argument(s)"),
        ("a => b | narrow(0, 1, -2)", "cannot be negative"),
        ("a => b | reshape(x)", "`x` is not a defined constant"),
        ("a => b | split(0)", "list them"),
        ("a => b, c", "several targets need `| split(D)`"),
        ("a => b, c | split(0, 1)", "split gives 1 sizes for 2 targets"),
        ("a => b, c | split(0) | reshape(-1)", "split ends a chain"),
        ("a + b => c", "several patterns need `| cat(D)`"),
        ("a => c | cat(0)", "cat joins several sources"),
        ("a + b => c | reshape(-1) | cat(0)", "cat starts a chain"),
        ("a + b => c | cat(0) | narrow(0, 0, 1)", "narrow after cat"),
        ("a + b => c, d | cat(0) | split(0)", "either splits"),
        ("a + => c | cat(0)", "`+` needs a pattern on each side"),
        ("(a) + b => c$1 | cat(0)", "does not capture"),
        ("a + (b) => c | cat(0)", "as many groups each"),
        ("a b => c", "contains a space"),
    ];
    for (text, needle) in cases {
        let message = error(text);
        assert!(message.contains("rules.txt:1") && message.contains(needle), "{text}: {message}");
    }
    let mut rules = Rules::new();
    let message = rules.add_map("a => b | split(0)").unwrap_err().to_string();
    assert!(message.contains("--map #1"), "{message}");
    rules.add_map("(.*)\\.qkv => $1.q, $1.k, $1.v | split(0)").unwrap();
    assert_eq!(rules.rules()[0].to_string(), "(.*)\\.qkv => $1.q, $1.k, $1.v | split(0)");
}

/// The examples the README's rule language gives, parsed from the README
/// itself, do what it says on a model with those names.
#[test]
fn the_readme_examples_do_what_they_say() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("(.*)\\.layer_scale").expect("the README's transform examples");
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let (ls, conv1d, fc, qkv, q, k, v) = (
        random(&[8, 1, 1]),
        random(&[4, 6]),
        random(&[2, 25088]),
        random(&[6, 2]),
        random(&[2, 2]),
        random(&[2, 2]),
        random(&[2, 2]),
    );
    let source = checkpoint(vec![
        ("s.layer_scale", ls.shallow_clone()),
        ("h.c_attn.weight", conv1d.shallow_clone()),
        ("classifier.0.weight", fc.shallow_clone()),
        ("a.qkv.weight", qkv.shallow_clone()),
        ("b.q.weight", q.shallow_clone()),
        ("b.k.weight", k.shallow_clone()),
        ("b.v.weight", v.shallow_clone()),
    ]);
    let mut target = checkpoint(vec![
        ("s.gamma", zeros(&[8])),
        ("h.attn.weight", zeros(&[6, 4])),
        ("pre_logits.fc1.weight", zeros(&[2, 512, 7, 7])),
        ("a.q.weight", zeros(&[2, 2])),
        ("a.k.weight", zeros(&[2, 2])),
        ("a.v.weight", zeros(&[2, 2])),
        ("b.qkv.weight", zeros(&[6, 2])),
    ]);
    transfer(&source, &mut target, block);
    assert!(tensor_of(&target, "s.gamma").equal(&ls.reshape([-1])));
    assert!(tensor_of(&target, "h.attn.weight").equal(&conv1d.transpose(0, 1)));
    assert!(tensor_of(&target, "pre_logits.fc1.weight").equal(&fc.reshape([2, 512, 7, 7])));
    assert!(tensor_of(&target, "a.v.weight").equal(&qkv.narrow(0, 4, 2)));
    assert!(tensor_of(&target, "b.qkv.weight").equal(&Tensor::cat(&[&q, &k, &v], 0)));
}

/// Numbers that overflow (`narrow(0, i64::MAX, i64::MAX)`, reshape sizes whose
/// product passes an i64) are refused at plan time naming the rule, never
/// handed to libtorch (whose error would come with a C++ backtrace).
#[test]
fn overflowing_numbers_are_refused_at_plan_time_naming_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("huge.rules");
    let max = i64::MAX;
    std::fs::write(
        &rules,
        format!(
            "temperature => temperature | narrow(0, {max}, {max})\n\
             features\\.0\\.bn\\.weight => features.0.bn.weight | reshape({max}, {max}, 0)\n"
        ),
    )
    .unwrap();
    let (a, b) = (common::fixture("bn_net_a.pt"), common::fixture("bn_net_b.pt"));
    let out = dir.path().join("out.pt");
    for command in ["plan", "copy"] {
        let mut args =
            vec![command, a.to_str().unwrap(), b.to_str().unwrap(), "--rules", rules.to_str().unwrap()];
        if command == "copy" {
            args.extend(["-o", out.to_str().unwrap()]);
        }
        let run = common::transplant(&args);
        assert_eq!(run.code, 1, "{command}: {}", run.stdout);
        let all = format!("{}{}", run.stdout, run.stderr);
        assert!(all.contains("rule `temperature =>"), "{all}");
        assert!(all.contains("is out of range") && all.contains("multiply past what an i64 holds"), "{all}");
        assert!(!all.contains("frame #") && !all.contains("panicked"), "{all}");
    }
    assert!(!out.exists());
}
