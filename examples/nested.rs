//! Modules nested several levels deep need no recursion of your own.
//!
//! What it teaches: a model built from `Sequential`s inside a `ModuleList` inside
//! a `ModuleDict` lists its parameters and buffers under dotted paths
//! (`blocks.encoder.0.1.norm.running_var`), in `state_dict()` order; copying
//! the whole state is one plan and one copy, whatever the depth.
//!
//! Run: `cargo run --example nested [FIXTURES_DIR]`.
mod support;

use anyhow::{ensure, Result};
use transplant::{copy, Mapping, ModuleStore, Plan, Policy, Role, Source};

fn main() -> Result<()> {
    let fixtures = support::fixtures()?;
    let source = ModuleStore::open(fixtures.join("nested_a.pt"))?;
    let mut target = ModuleStore::open(fixtures.join("nested_b.pt"))?;
    let depth = |name: &str| name.matches('.').count();
    println!("{} tensors; the deepest:", source.entries().len());
    let deepest = source.entries().iter().map(|e| depth(&e.name)).max().unwrap_or(0);
    for e in source.entries().iter().filter(|e| depth(&e.name) == deepest) {
        println!("  {:<46} {:<9} {:?}", e.name, e.role.to_string(), e.shape);
    }
    ensure!(deepest >= 4, "the fixture nests modules four levels deep");
    ensure!(source
        .entries()
        .iter()
        .any(|e| e.name == "blocks.encoder.0.1.norm.running_var" && e.role == Role::Buffer));

    let plan = Plan::build(&source, &target, &Mapping::default())?;
    let copied = copy(&plan, &source, &mut target, &Policy { strict: true, ..Policy::default() })?;
    println!("copied {} tensors ({} bytes), every one verified", copied.tensors, copied.bytes);

    let expected = fixtures.join("nested.expected.safetensors");
    target.module_mut().set_training(false)?;
    let out = target.module().forward(&[support::expected(&expected, "input")?])?.remove(0);
    let diff = support::max_abs_diff(&out, &support::expected(&expected, "output")?)?;
    println!("nested_b now computes nested_a's outputs: max |diff| = {diff:.2e}");
    ensure!(diff < 1e-5, "outputs differ by {diff}");
    Ok(())
}
