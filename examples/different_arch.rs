//! Copying between different architectures, with a plan you read first.
//!
//! What it teaches:
//! - a source with a BatchNorm the target lacks (`Sequential(Linear, BN, ReLU,
//!   Linear)` into `Sequential(Linear, ReLU, Linear)`): names cannot pair `3.*`
//!   with `2.*`, the `order` matcher aligns the layers by shape and skips the
//!   BatchNorm, and the plan says so before anything is written;
//! - a renamed backbone (`backbone.*` in the checkpoint, `encoder.*` in the
//!   model) through one rename rule, after which the model computes exactly what
//!   the original network did.
//!
//! Run: `cargo run --example different_arch [FIXTURES_DIR]`.
mod support;

use anyhow::{ensure, Result};
use transplant::{copy, Checkpoint, Mapping, Matcher, ModuleStore, Plan, Policy, Report, Rules, Source};

fn main() -> Result<()> {
    let fixtures = support::fixtures()?;
    let policy = Policy::default();

    println!("1. A BatchNorm in the source only\n");
    let source = ModuleStore::open(fixtures.join("mlp_bn.pt"))?;
    let mut target = ModuleStore::open(fixtures.join("mlp.pt"))?;
    let by_name = Plan::build(&source, &target, &Mapping::default())?;
    println!("by name (auto): {} of {} target tensors paired", by_name.pairs.len(), target.entries().len());
    let by_order = Plan::build(&source, &target, &Mapping { matcher: Matcher::Order, ..Mapping::default() })?;
    println!("{}\n", Report::new(&by_order, &policy, None));
    ensure!(by_order.pairs.len() == 4, "the order matcher pairs both Linear layers");
    ensure!(
        by_order.pairs.iter().any(|p| p.source_name == "0.bias" && p.target_name == "0.bias"),
        "bias pairs with bias"
    );
    copy(&by_order, &source, &mut target, &policy)?;

    println!("2. A renamed backbone, through a rule\n");
    let source = Checkpoint::open(fixtures.join("backbone.safetensors"))?;
    let mut target = ModuleStore::open(fixtures.join("encoder.pt"))?;
    let mapping = Mapping {
        rules: Rules::parse(r"backbone\.(.*) => encoder.$1", "example")?,
        matcher: Matcher::Auto,
        source_order: None,
    };
    let plan = Plan::build(&source, &target, &mapping)?;
    println!("{}", Report::new(&plan, &policy, None));
    let copied = copy(&plan, &source, &mut target, &policy)?;
    println!("copied {} tensors (verified: {})", copied.tensors, copied.verified);
    let expected = fixtures.join("bn_net.expected.safetensors");
    target.module_mut().set_training(false)?;
    let out = target.module().forward(&[support::expected(&expected, "input")?])?.remove(0);
    let diff = support::max_abs_diff(&out, &support::expected(&expected, "output_a")?)?;
    println!("the encoder model now gives the original network's outputs: max |diff| = {diff:.2e}");
    ensure!(diff < 1e-5, "outputs differ by {diff}");
    Ok(())
}
