#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod chunks;
pub mod copy;
pub mod diff;
mod dotted;
pub mod dtype;
mod error;
mod ffi;
pub mod format;
pub mod matching;
pub mod outputs;
pub mod plan;
pub mod report;
pub mod rules;
mod script_module;
pub mod slot;
pub mod store;

pub use error::{Error, Result};
pub use format::Format;
pub use matching::Matcher;
pub use plan::{Mapping, Plan, Policy};
pub use report::Report;
pub use rules::Rules;
pub use script_module::{NamedTensor, ScriptModule};
pub use slot::ModelSlot;
pub use store::{
    Checkpoint, Entry, ModuleStore, Name, Role, Source, StoreKind, Summary, Target, VarStoreView,
};
