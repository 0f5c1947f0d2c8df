//! Transforms on models made by real PyTorch: an attention block with a fused
//! qkv projection into one with separate q, k, v and back (split and cat), and
//! GPT-2's Conv1D into nn.Linear and back (transpose); each copy complete under
//! `--strict`, and the target then computes what the source computed.
use crate::common;

use common::{expected_tensor, fixture};
use tch::Tensor;
use transplant::{copy, Mapping, Matcher, ModuleStore, Plan, Policy, Rules};

const STRICT: Policy = Policy { strict: true, allow_lossy_casts: false };

fn transfer(from: &str, into: &str, rules: &str) {
    let source = ModuleStore::open(fixture(&format!("transforms/{from}.pt"))).unwrap();
    let mut target = ModuleStore::open(fixture(&format!("transforms/{into}.pt"))).unwrap();
    let expected = format!("transforms/{from}.expected.safetensors");
    let (input, want) = (expected_tensor(&expected, "input"), expected_tensor(&expected, "output"));
    let run = |m: &ModuleStore| -> Tensor { m.module().forward(&[input.shallow_clone()]).unwrap().remove(0) };
    assert!((&run(&target) - &want).abs().max().double_value(&[]) > 1e-3, "{from} -> {into} agree before");
    let mapping =
        Mapping { rules: Rules::parse(rules, "rules").unwrap(), matcher: Matcher::Exact, source_order: None };
    let plan = Plan::build(&source, &target, &mapping).unwrap();
    plan.check(&STRICT).unwrap_or_else(|e| panic!("{from} -> {into}: {e}"));
    assert!(plan.is_complete());
    copy(&plan, &source, &mut target, &STRICT).unwrap();
    let diff = (&run(&target) - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "{from} -> {into}: outputs differ by {diff}");
}

#[test]
fn a_fused_qkv_projection_splits_into_q_k_v() {
    transfer(
        "fused_attn",
        "split_attn",
        "qkv\\.(weight|bias) => q_proj.$1, k_proj.$1, v_proj.$1 | split(0)\nproj\\.(.*) => o_proj.$1\n",
    );
}

#[test]
fn separate_q_k_v_concatenate_into_a_fused_projection() {
    transfer(
        "split_attn",
        "fused_attn",
        "q_proj\\.(weight|bias) + k_proj\\.(weight|bias) + v_proj\\.(weight|bias) => qkv.$1 | cat(0)\no_proj\\.(.*) => proj.$1\n",
    );
}

#[test]
fn gpt2_conv1d_weights_transpose_into_linear() {
    transfer(
        "conv1d_mlp",
        "linear_mlp",
        "c_fc\\.weight => fc.weight | transpose(0, 1)\nc_fc\\.bias => fc.bias\n\
         c_proj\\.weight => proj.weight | transpose(0, 1)\nc_proj\\.bias => proj.bias\n",
    );
}

#[test]
fn linear_weights_transpose_into_gpt2_conv1d() {
    transfer(
        "linear_mlp",
        "conv1d_mlp",
        "(fc|proj)\\.weight => c_$1.weight | transpose(-1, -2)\n(fc|proj)\\.bias => c_$1.bias\n",
    );
}
