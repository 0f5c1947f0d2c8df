//! A fused qkv projection into separate q, k and v, and back: transforms in
//! the rule language.
//!
//! What it teaches:
//! - one source into several targets with `| split(D)`: an attention block
//!   whose `qkv` Linear is `[3 * dim, dim]` (timm, GPT-2) into one with separate
//!   `q_proj`, `k_proj`, `v_proj` (Llama); each part is a view of the source;
//! - several sources into one target with `A + B + C => T | cat(D)`: the way
//!   back, each source written into its slice of the target;
//! - the plan shows every transform with both shapes before anything is
//!   written, and the model then computes exactly what the original block did.
//!
//! Run: `cargo run --example fused_qkv [FIXTURES_DIR]`.
mod support;

use anyhow::{ensure, Result};
use transplant::{copy, Mapping, Matcher, ModuleStore, Plan, Policy, Report, Rules};

/// Copies `from` into `into` with `rules`, then checks that `into` computes
/// what `from` computed on the fixture's input.
fn transfer(fixtures: &std::path::Path, from: &str, into: &str, rules: &str) -> Result<()> {
    let source = ModuleStore::open(fixtures.join(format!("transforms/{from}.pt")))?;
    let mut target = ModuleStore::open(fixtures.join(format!("transforms/{into}.pt")))?;
    let mapping =
        Mapping { rules: Rules::parse(rules, "example")?, matcher: Matcher::Exact, source_order: None };
    let policy = Policy { strict: true, ..Policy::default() };
    let plan = Plan::build(&source, &target, &mapping)?;
    println!("{}\n", Report::new(&plan, &policy, None));
    copy(&plan, &source, &mut target, &policy)?;
    let expected = fixtures.join(format!("transforms/{from}.expected.safetensors"));
    let out = target.module().forward(&[support::expected(&expected, "input")?])?.remove(0);
    let diff = support::max_abs_diff(&out, &support::expected(&expected, "output")?)?;
    println!("{into} now computes what {from} did: max |diff| = {diff:.2e}\n");
    ensure!(diff < 1e-5, "outputs differ by {diff}");
    Ok(())
}

fn main() -> Result<()> {
    let fixtures = support::fixtures()?;
    println!("1. fused qkv -> q, k, v (split)\n");
    transfer(
        &fixtures,
        "fused_attn",
        "split_attn",
        r"qkv\.(weight|bias) => q_proj.$1, k_proj.$1, v_proj.$1 | split(0)
          proj\.(weight|bias) => o_proj.$1",
    )?;
    println!("2. q, k, v -> fused qkv (cat)\n");
    transfer(
        &fixtures,
        "split_attn",
        "fused_attn",
        r"q_proj\.(weight|bias) + k_proj\.(weight|bias) + v_proj\.(weight|bias) => qkv.$1 | cat(0)
          o_proj\.(weight|bias) => proj.$1",
    )
}
