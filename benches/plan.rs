//! Planning speed: rules + auto matcher on 10k, 30k and 100k entries with 50
//! rules, and the order matcher on two 30k-entry models a few layers apart.
//! Run by `scripts/bench.sh`; prints times and the 100k/10k ratio (10 = linear).
use std::time::Instant;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use transplant::{Entry, EntryOrder, Mapping, Matcher, Plan, Role, Rules, Source, StoreKind};

/// Entries without data: planning only reads names, roles, shapes and dtypes.
struct Listing {
    entries: Vec<Entry>,
    /// Whether the entries are in registration order (else: sorted, like safetensors).
    order: EntryOrder,
}

impl Source for Listing {
    fn origin(&self) -> &str {
        "synthetic"
    }
    fn kind(&self) -> StoreKind {
        StoreKind::VarStore
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entry_order(&self) -> EntryOrder {
        self.order
    }
    fn tensor(&self, _: usize) -> Option<&Tensor> {
        None
    }
}

fn entry(name: String, role: Role, shape: &[i64]) -> Entry {
    Entry {
        name: name.into(),
        role,
        role_inferred: false,
        shape: shape.to_vec(),
        dtype: Kind::Float.into(),
        device: Device::Cpu,
    }
}

/// `blocks` × [Linear(64, 64), BatchNorm1d(64)], 7 entries each; a BatchNorm is
/// left out of the blocks listed in `without_bn`.
fn model(prefix: &str, fc: &str, bn: &str, blocks: usize, without_bn: &[usize]) -> Listing {
    let mut entries = Vec::with_capacity(blocks * 7);
    for b in 0..blocks {
        entries.push(entry(format!("{prefix}.{b}.{fc}.weight"), Role::Parameter, &[64, 64]));
        entries.push(entry(format!("{prefix}.{b}.{fc}.bias"), Role::Parameter, &[64]));
        if without_bn.contains(&b) {
            continue;
        }
        for leaf in ["weight", "bias"] {
            entries.push(entry(format!("{prefix}.{b}.{bn}.{leaf}"), Role::Parameter, &[64]));
        }
        for leaf in ["running_mean", "running_var"] {
            entries.push(entry(format!("{prefix}.{b}.{bn}.{leaf}"), Role::Buffer, &[64]));
        }
        entries.push(entry(format!("{prefix}.{b}.{bn}.num_batches_tracked"), Role::Buffer, &[]));
    }
    Listing { entries, order: EntryOrder::Registration }
}

fn best_of_3(mut f: impl FnMut() -> Plan) -> (f64, Plan) {
    let mut best = f64::MAX;
    let mut plan = None;
    for _ in 0..3 {
        let start = Instant::now();
        let p = f();
        best = best.min(start.elapsed().as_secs_f64());
        plan = Some(p);
    }
    (best, plan.expect("ran"))
}

fn main() -> Result<()> {
    let mut rules = String::from("backbone\\.(.*) => encoder.$1\n");
    for k in 0..49 {
        rules.push_str(&format!("head{k}\\.(\\w+)\\.(weight|bias) => classifier{k}.$1.$2\n"));
    }
    let mapping =
        Mapping { rules: Rules::parse(&rules, "bench")?, matcher: Matcher::Auto, source_order: None };
    println!("  auto matcher + 50 rules       entries    seconds   pairs");
    let mut times = Vec::new();
    for n in [10_000usize, 30_000, 100_000] {
        let blocks = n / 7;
        let source = model("backbone.blocks", "fc", "bn", blocks, &[]);
        let target = model("encoder.blocks", "fc", "bn", blocks, &[]);
        let (seconds, plan) = best_of_3(|| Plan::build(&source, &target, &mapping).expect("plan"));
        println!("  {:<28} {:>8} {:>10.4} {:>7}", "", source.entries.len(), seconds, plan.pairs.len());
        times.push(seconds);
    }
    println!("  100k / 10k time ratio: {:.1} (10.0 = linear)", times[2] / times[0]);

    let blocks = 30_000 / 7;
    let source = model("net.blocks", "fc", "bn", blocks, &[]);
    let target = model("model.layers", "linear", "norm", blocks, &[100, 2000, 3500]);
    let order = Mapping { matcher: Matcher::Order, ..Mapping::default() };
    let (seconds, plan) = best_of_3(|| Plan::build(&source, &target, &order).expect("plan"));
    println!(
        "  order matcher, {} vs {} entries (3 BatchNorms removed): {:.4} s, {} pairs",
        source.entries.len(),
        target.entries.len(),
        seconds,
        plan.pairs.len()
    );
    // The same source as a safetensors file lists it: sorted names, no
    // registration order; the matcher reconstructs one.
    let mut sorted = model("net.blocks", "fc", "bn", blocks, &[]);
    sorted.entries.sort_by(|a, b| a.name.cmp(&b.name));
    sorted.order = EntryOrder::Unknown;
    let (reconstructed, plan) = best_of_3(|| Plan::build(&sorted, &target, &order).expect("plan"));
    println!(
        "  order matcher, the source sorted (order reconstructed): {:.4} s, {} pairs; {:.2}x the registration-order plan",
        reconstructed,
        plan.pairs.len(),
        reconstructed / seconds
    );
    Ok(())
}
