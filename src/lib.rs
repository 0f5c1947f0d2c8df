//! `transplant` moves the complete state of PyTorch models — parameters **and**
//! buffers — between models, files and devices, on libtorch through `tch`.
#![deny(missing_docs)]

mod error;
mod ffi;
mod script_module;
pub mod store;

pub use error::{Error, Result};
pub use script_module::{NamedTensor, ScriptModule};
pub use store::Role;
