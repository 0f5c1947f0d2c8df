//! Stores: the things that hold a model's named tensors — a TorchScript module
//! ([`ModuleStore`]), a tch `VarStore` ([`VarStoreView`]) and checkpoint files
//! ([`Checkpoint`]) — all seen through one small trait, [`Store`].
//!
//! A store lists its [`Entry`]s in registration order and hands out live tensor
//! handles that share storage with the model: an in-place copy into a handle
//! writes into the model itself.
mod archive;
mod checkpoint;
mod folder;
mod script;
pub mod summary;
mod varstore;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use tch::Tensor;

pub use archive::ScriptArchive;
pub use checkpoint::Checkpoint;
pub use folder::model_file;
pub(crate) use script::live_entries;
pub use script::ModuleStore;
pub use summary::{Other, Summary, Total};
pub use varstore::VarStoreView;

use crate::entry::{Entry, EntryOrder};
use crate::error::Result;
use crate::format::{self, Format};

/// What kind of store a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A TorchScript module.
    Module,
    /// A tch `nn::VarStore`.
    VarStore,
    /// Named tensors read from or written to a file of this format.
    Checkpoint(Format),
    /// Tensors announced by a live-sync sender on another process
    /// ([`crate::sync`]).
    Remote,
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Module => f.write_str("TorchScript module"),
            StoreKind::VarStore => f.write_str("tch VarStore"),
            StoreKind::Checkpoint(format) => write!(f, "{format}"),
            StoreKind::Remote => f.write_str("live sync sender"),
        }
    }
}

/// A model's named tensors to read from: their entries, and read-only handles.
///
/// The mapping layer only needs this: it never knows which kind of store it has.
///
/// Sources are `Send + Sync`: one source can feed copies on several threads at
/// once. Through `&` a source only lends its entries and `&Tensor`s; this crate
/// writes tensor data only through [`Target`], that is through `&mut`.
pub trait Source: Send + Sync {
    /// Where the tensors come from (a path, or a description), for messages.
    fn origin(&self) -> &str;
    /// What kind of store this is.
    fn kind(&self) -> StoreKind;
    /// Every named tensor, in registration order where the store knows it
    /// (see [`Source::entry_order`]).
    fn entries(&self) -> &[Entry];
    /// Whether [`Source::entries`] is the model's registration order.
    fn entry_order(&self) -> EntryOrder;
    /// The tensor of `entries()[index]`, `None` when `index` is out of range. It
    /// shares storage with the model.
    fn tensor(&self, index: usize) -> Option<&Tensor>;
    /// For a checkpoint dict, the key its state dict was found under.
    fn key(&self) -> Option<&str> {
        None
    }
    /// The file's own metadata (safetensors `__metadata__`), where it has some.
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// What a checkpoint holds besides the tensors read, each described
    /// (`args`: `argparse.Namespace (not read)`, `epoch`: `12`).
    fn others(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Tied entries: groups (indices into [`Source::entries`], ascending) of
    /// entries that are one tensor — the same memory seen the same way (place,
    /// shape, strides, dtype, device), as a language model's `lm_head.weight`
    /// and `embed.weight`. Writing one writes all. Overlapping views that are
    /// not the same view are not ties.
    fn ties(&self) -> Vec<Vec<usize>> {
        tied_entries(self.entries(), |i| self.tensor(i))
    }
}

/// The groups of [`Source::ties`], from the entries and their tensors.
fn tied_entries<'t>(entries: &[Entry], tensor: impl Fn(usize) -> Option<&'t Tensor>) -> Vec<Vec<usize>> {
    use std::collections::HashMap;
    // Grouped by address, dtype and shape first (no allocation per tensor);
    // strides are compared only where those agree.
    let mut by_place: HashMap<(usize, tch::Device, crate::dtype::Dtype, &[i64]), Vec<usize>> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(t) = tensor(i) else { continue };
        if entry.numel() == 0 || !t.defined() {
            continue;
        }
        let key = (t.data_ptr() as usize, entry.device, entry.dtype, entry.shape.as_slice());
        by_place.entry(key).or_default().push(i);
    }
    let mut groups = Vec::new();
    for members in by_place.into_values().filter(|m| m.len() > 1) {
        let mut by_stride: Vec<(Vec<i64>, Vec<usize>)> = Vec::new();
        for i in members {
            let stride = tensor(i).map(Tensor::stride).unwrap_or_default();
            match by_stride.iter_mut().find(|(s, _)| *s == stride) {
                Some((_, group)) => group.push(i),
                None => by_stride.push((stride, vec![i])),
            }
        }
        groups.extend(by_stride.into_iter().map(|(_, g)| g).filter(|g| g.len() > 1));
    }
    groups.sort();
    groups
}

/// A model that receives a plan's writes: a live one (a loaded module, a
/// `VarStore`) written in place, or a checkpoint held in memory until saved.
pub trait Target: Source {
    /// The tensors, in [`Source::entries`] order, to be written in place (under
    /// a no-grad guard): each shares storage with the model, so writing into it
    /// changes the model.
    fn tensors_mut(&mut self) -> &mut [Tensor];
    /// Writes the store to `path` in its own kind (a module stays a module) or, for
    /// state-dict stores, in the format `path`'s extension names. The file appears
    /// whole or not at all.
    fn save(&self, path: &Path) -> Result<()>;
    /// This target as a TorchScript archive, where it is one: a copy into it
    /// can then be streamed into a rewritten file ([`crate::copy_to_file`]).
    fn as_script_archive(&self) -> Option<&ScriptArchive> {
        None
    }
}

/// Opens a model file of any supported kind, found from its content: a
/// TorchScript module becomes a [`ScriptArchive`] (read as the zip archive it
/// is, none of its code run; [`ModuleStore::open`] loads a live module through
/// libtorch), everything else a [`Checkpoint`]. The file is only read; writes
/// into the result stay in memory until saved.
pub fn open(path: impl AsRef<Path>) -> Result<Box<dyn Target>> {
    open_with_key(path, None)
}

/// [`open`], with `key` picking the state dict inside a `torch.save`
/// checkpoint dict (see [`Checkpoint::open_with_key`]).
///
/// A folder holding one model as `save_pretrained` lays it out stands for its
/// model file ([`model_file`]); the store's origin names that file.
pub fn open_with_key(path: impl AsRef<Path>, key: Option<&str>) -> Result<Box<dyn Target>> {
    let file = model_file(path.as_ref())?;
    let path = file.as_path();
    match format::sniff(path)? {
        // Read as an archive: none of the module's code runs (a live module,
        // loaded through libtorch, is `ModuleStore::open`).
        Format::TorchScript if key.is_none() => Ok(Box::new(ScriptArchive::open(path)?)),
        other => Ok(Box::new(Checkpoint::open_as(path, other, key)?)),
    }
}
