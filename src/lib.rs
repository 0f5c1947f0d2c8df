//! Moves the complete state of PyTorch models — parameters *and* buffers such as
//! BatchNorm's running statistics — from one model into another: between
//! TorchScript modules, tch `VarStore`s and checkpoint files (`torch.save`,
//! safetensors, sharded indexes, Distributed Checkpoints), on libtorch through
//! [`tch`]. Nothing is written until a whole plan has been checked; every copy is
//! verified.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use transplant::{copy, open, Mapping, Plan, Policy, Report};
//!
//! let source = open("state_dict.pth")?; // any supported file, read only
//! let mut target = open("model.pt")?; // a TorchScript module, written in memory
//! let plan = Plan::build(source.as_ref(), target.as_ref(), &Mapping::default())?;
//! let policy = Policy { strict: true, ..Policy::default() };
//! let copied = copy(&plan, source.as_ref(), target.as_mut(), &policy)?; // check, copy, verify
//! println!("{}", Report::new(&plan, &policy, Some(copied)));
//! target.save(Path::new("restored.pt"))?; // whole or not at all
//! # Ok(())
//! # }
//! ```
//!
//! Where to go next:
//! - [`open`] a model as a [`Source`] or [`Target`]; [`ModuleStore`],
//!   [`VarStoreView`] and [`Checkpoint`] are the stores behind it.
//! - [`Plan::build`] pairs names through a [`Mapping`]: [`Rules`] (the rule
//!   language: renames, reshapes, splits, stacks of experts, constants) and a
//!   [`Matcher`]; a plan is readable ([`Report`]) before anything is written.
//! - [`copy`] and [`copy_to_file`] write a plan; [`convert`] writes a file of
//!   another format with no target model; [`merge`](merge()) and [`merge_lora`]
//!   combine models; [`diff`] compares two.
//! - [`ModelSlot`] swaps weights into a served model without tearing; [`sync`]
//!   receives them live from a PyTorch trainer.
//!
//! The README (in the repository) has the command line's tour, the rule
//! language's grammar, what is supported, the architecture and the benchmarks.
#![deny(missing_docs)]

// The stages, from the bottom up (the README's architecture section): each
// module imports only those above it in this list.
mod dtype;
mod fp8;
mod dotted;
mod entry;
mod error;
mod files;
mod folders;
mod ffi;
mod c10d;
mod chunks;
mod format;
mod footprint;
mod script_module;
mod store;
mod transform;
mod rules;
mod matching;
mod plan;
mod copy;
mod convert;
mod merge;
mod diff;
mod outputs;
mod report;
mod slot;
mod adapter_swap;
pub mod sync;

pub use convert::{
    convert, plan_conversion, save_distributed, save_sharded, ConvertOptions, Converted, Outline,
    WrittenFile, DEFAULT_MAX_SHARD_BYTES,
};
pub use copy::{copy, copy_to_file, copy_with, verify, Copied, CopyOptions, Progress};
pub use diff::{diff, Diff, TensorDiff, Tolerance};
pub use dotted::escaped;
pub use dtype::Dtype;
pub use entry::{Entry, EntryOrder, Name, Role};
pub use error::{Error, Result};
pub use ffi::{cuda_backend, libtorch, Libtorch};
pub use footprint::check_output;
pub use format::{sniff, Format};
pub use matching::{How, Matcher, ModuleMatch, Unsure};
pub use merge::{
    merge, merge_lora, plan_merge, Adapter, Differing, LoraMerged, MergeInput, MergeOptions, MergePlan,
    Merged, Method,
};
pub use outputs::{compare_outputs, OutputComparison, OutputDiff, MAX_INPUT_ELEMENTS};
pub use plan::{
    Cast, Finding, Kept, Leftover, Mapping, NameOrder, OrderUsed, Orders, Pair, Plan, PlanFile, PlannedPair,
    Policy, Severity, Side,
};
pub use report::{Report, ReportKept, ReportLeftover, ReportPair, ReportProblem};
pub use rules::{Action, Constants, Keep, Rule, RuleSource, Rules};
pub use script_module::{NamedTensor, ScriptModule};
pub use slot::{ModelSlot, Swap};
pub use store::{
    model_file, open, open_with_key, Checkpoint, ModuleStore, Other, ScriptArchive, Source, StoreKind,
    Summary, Target, Total, VarStoreView,
};
pub use transform::{Compute, Op, Transform};

/// Entry points for the fuzz targets in `fuzz/`: the parsers of untrusted bytes.
/// Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::format::dcp::read as read_distributed_checkpoint;
    pub use crate::format::pickle::Machine as PickleMachine;
    pub use crate::format::retype::retype_storages;
    pub use crate::format::safetensors::read as read_safetensors;
    pub use crate::format::script_archive::read as read_script_archive;
    pub use crate::format::torch_pickle::read as read_torch_save;

    /// Parses an `.npy` header dict literal; `Err` says why it was refused.
    pub fn npy_header(text: &str) -> Result<(), String> {
        crate::format::npz::parse_header(text).map(|_| ())
    }
}

/// The README's examples, compiled as doc tests (they are not the front page).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
