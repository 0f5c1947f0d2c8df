//! A live adapter swap's time (`scripts/bench.sh`): a scripted MLP served by a
//! `ModelSlot` takes a LoRA adapter merged into its standby copy, then goes
//! back to its base, N times each; against the baseline of a plain swap of
//! the same base weights (`swap_from`, a copy with verification) in the same
//! run. Prints JSON. Usage: adapter_swap MODULE.pt BASE.pth ADAPTER_DIR [N]
use std::time::Instant;

use transplant::{Adapter, Mapping, ModelSlot, Policy, ScriptModule};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [module, base, adapter, rest @ ..] = &args[..] else {
        return Err("usage: adapter_swap MODULE.pt BASE.pth ADAPTER_DIR [N]".into());
    };
    let rounds: usize = rest.first().map_or(Ok(10), |n| n.parse())?;
    let slot = ModelSlot::new(ScriptModule::load(module)?)?;
    let base = transplant::open(base)?;
    let adapter = Adapter::open(adapter.as_ref())?;
    let input = tch::Tensor::randn([16, 1024], (tch::Kind::Float, tch::Device::Cpu));
    let time = |f: &dyn Fn() -> transplant::Result<transplant::Swap>| -> Result<f64, transplant::Error> {
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            let start = Instant::now();
            f()?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    // Warm both standby copies first.
    slot.swap_adapter(base.as_ref(), Some(&adapter))?;
    slot.swap_adapter(base.as_ref(), None)?;
    let to_adapter = time(&|| {
        let swap = slot.swap_adapter(base.as_ref(), Some(&adapter));
        slot.swap_adapter(base.as_ref(), None)?;
        swap
    })?;
    let to_base = time(&|| slot.swap_adapter(base.as_ref(), None))?;
    let plain = time(&|| slot.swap_from(base.as_ref(), &Mapping::default(), &Policy::default()))?;
    let forward = {
        let start = Instant::now();
        for _ in 0..rounds {
            slot.forward(&[input.shallow_clone()])?;
        }
        start.elapsed().as_secs_f64() / rounds as f64
    };
    println!(
        "{}",
        serde_json::json!({
            "adapter_and_back_seconds": to_adapter,
            "to_base_seconds": to_base,
            "plain_swap_seconds": plain,
            "forward_seconds": forward,
        })
    );
    Ok(())
}
