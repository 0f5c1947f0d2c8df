//! A libtorch inference service in miniature, as a crate that depends on
//! tch-transplant writes it: open a checkpoint, plan and copy it into a
//! TorchScript model whose names differ, serve that model through a
//! `ModelSlot`, answer one request, and swap new weights in while it serves.
//!
//! Usage: `transplant-embed STATE_DICT MODULE REFERENCE` — a `torch.save` state
//! dict, a TorchScript module of the same network with other names, and the
//! module the state dict came from. Exits non-zero unless the served model
//! answers exactly as the reference does.
use std::process::ExitCode;

use tch::{Device, Kind, Tensor};
use transplant::{
    copy, open, Mapping, Matcher, ModelSlot, ModuleStore, Plan, Policy, Report, Rules, ScriptModule,
};

fn run(args: &[String]) -> transplant::Result<bool> {
    let [state_dict, module, reference] = args else {
        eprintln!("usage: transplant-embed STATE_DICT MODULE REFERENCE");
        return Ok(false);
    };
    // Plan and copy: structure for the modules, a rule for the one renamed leaf.
    let source = open(state_dict)?;
    let mut target = ModuleStore::open(module)?;
    let rules = Rules::parse("temperature => scale", "service")?;
    let mapping = Mapping { rules, matcher: Matcher::Order, ..Mapping::default() };
    let policy = Policy { strict: true, ..Policy::default() };
    let plan = Plan::build(source.as_ref(), &target, &mapping)?;
    let copied = copy(&plan, source.as_ref(), &mut target, &policy)?;
    eprintln!("{}", Report::new(&plan, &policy, Some(copied)));

    // Serve it, and answer one request.
    let slot = ModelSlot::new(target.into_module())?;
    let reference = {
        let mut module = ScriptModule::load(reference)?;
        module.set_training(false)?;
        module
    };
    let input = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu));
    let served = slot.forward(&[input.shallow_clone()])?.remove(0);
    let expected = reference.forward(&[input.shallow_clone()])?.remove(0);
    let same = served.equal(&expected);
    println!("served a request: {:?} output, identical to the reference: {same}", served.size());

    // New weights arrive while serving: checked, copied into a standby, swapped.
    let swap = slot.swap_from(source.as_ref(), &mapping, &policy)?;
    println!("swapped weights in {:.1} ms (generation {})", swap.seconds * 1e3, swap.generation);
    let again = slot.forward(&[input])?.remove(0);
    Ok(same && again.equal(&expected))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
