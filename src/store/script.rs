//! [`ModuleStore`]: a TorchScript module seen as a store.
use std::path::Path;

use tch::{Device, Tensor};

use super::{Source, StoreKind, Target};
use crate::entry::{Entry, EntryOrder};
use crate::error::Result;
use crate::script_module::ScriptModule;

/// A TorchScript module's parameters and buffers, in `state_dict()` order, with
/// handles on the module's own tensors. Saving writes the module: its code and
/// its current tensors.
#[derive(Debug)]
pub struct ModuleStore {
    module: ScriptModule,
    entries: Vec<Entry>,
    tensors: Vec<Tensor>,
}

// SAFETY: as for `Checkpoint` (shared access reads; writes take `&mut self`
// through `Target`); the module itself is `Sync` (see `ScriptModule`).
unsafe impl Sync for ModuleStore {}

impl ModuleStore {
    /// Loads a module saved by `torch.jit.save`, on the CPU, in the mode
    /// (train or eval) it was saved in: see [`ScriptModule::load`]. Copying
    /// into it changes no mode; [`module_mut`](Self::module_mut) switches it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(ScriptModule::load(path)?)
    }

    /// Loads a module saved by `torch.jit.save`, with its tensors on `device`.
    pub fn open_on(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        Self::new(ScriptModule::load_on(path, device)?)
    }

    /// Lists the parameters and buffers of `module`.
    pub fn new(module: ScriptModule) -> Result<Self> {
        let named = module.named_tensors()?;
        let entries = live_entries(&module, &named)?;
        let tensors = named.into_iter().map(|n| n.tensor).collect();
        Ok(Self { module, entries, tensors })
    }

    /// The module itself (to run `forward`, say).
    pub fn module(&self) -> &ScriptModule {
        &self.module
    }

    /// The module itself, mutably (to switch train/eval mode).
    pub fn module_mut(&mut self) -> &mut ScriptModule {
        &mut self.module
    }

    /// Gives the module back.
    pub fn into_module(self) -> ScriptModule {
        self.module
    }
}

impl Source for ModuleStore {
    fn origin(&self) -> &str {
        self.module.origin()
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Module
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entry_order(&self) -> EntryOrder {
        EntryOrder::Registration
    }
    fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index)
    }
}

impl Target for ModuleStore {
    fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }
    /// Saves the module (a module stays a module, whatever the extension).
    fn save(&self, path: &Path) -> Result<()> {
        self.module.save(path)
    }
}

/// The entries of a live module's named tensors, one that tch cannot describe
/// (a dtype it has no `Kind` for) refused by name.
pub(crate) fn live_entries(
    module: &ScriptModule,
    named: &[crate::script_module::NamedTensor],
) -> Result<Vec<Entry>> {
    named
        .iter()
        .map(|n| {
            Entry::of_live(n.name.clone(), n.role, &n.tensor).map_err(|source| crate::error::Error::Tensor {
                store: module.origin().to_string(),
                tensor: n.name.to_string(),
                source,
            })
        })
        .collect()
}
