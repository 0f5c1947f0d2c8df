//! Stores: the things that hold a model's named tensors — a TorchScript module
//! ([`ModuleStore`]), a tch `VarStore` ([`VarStoreView`]) and checkpoint files
//! ([`Checkpoint`]) — all seen through one small trait, [`Store`].
//!
//! A store lists its [`Entry`]s in registration order and hands out live tensor
//! handles that share storage with the model: an in-place copy into a handle
//! writes into the model itself.
mod checkpoint;
mod script;
pub mod summary;
mod varstore;

use std::fmt;
use std::path::Path;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

pub use checkpoint::Checkpoint;
pub use script::ModuleStore;
pub use summary::{Summary, Total};
pub use varstore::VarStoreView;

use crate::dtype;
use crate::error::Result;
use crate::format::{self, Format};

/// Whether a named tensor is a learned parameter or a buffer (running statistics,
/// counters, masks: state that `parameters()` does not list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A learned weight (`nn.Parameter`; a trainable tch variable).
    Parameter,
    /// Registered state that is not a parameter (`running_mean`, `num_batches_tracked`, ...).
    Buffer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Parameter => "parameter",
            Role::Buffer => "buffer",
        })
    }
}

/// A tensor's dotted name, shared rather than copied: entries, plan pairs and
/// reports of one model hold the same allocation (plans of models with tens of
/// thousands of tensors would otherwise spend their time copying strings).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Name(std::sync::Arc<str>);

impl Name {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Self(s.as_str().into())
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One named tensor of a store, described (the tensor itself is [`Store::tensor`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Dotted name, as PyTorch's `state_dict()` gives it.
    pub name: Name,
    /// Parameter or buffer.
    pub role: Role,
    /// Whether `role` was guessed from the name and dtype because the store does
    /// not record roles (checkpoint files); see [`inferred_role`].
    pub role_inferred: bool,
    /// Sizes of each dimension.
    pub shape: Vec<i64>,
    /// Element type.
    #[serde(serialize_with = "serialize_kind")]
    pub dtype: Kind,
    /// Where the tensor lives.
    #[serde(serialize_with = "serialize_device")]
    pub device: Device,
}

fn serialize_kind<S: serde::Serializer>(kind: &Kind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(dtype::name(*kind))
}

fn serialize_device<S: serde::Serializer>(device: &Device, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&device_name(*device))
}

/// `cpu`, `cuda:0`, ... as PyTorch writes devices.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

impl Entry {
    /// Describes `tensor` under `name`.
    pub fn of(name: impl Into<Name>, role: Role, tensor: &Tensor) -> Self {
        Self {
            name: name.into(),
            role,
            role_inferred: false,
            shape: tensor.size(),
            dtype: tensor.kind(),
            device: tensor.device(),
        }
    }

    /// Describes `tensor` under `name`, its role guessed by [`inferred_role`].
    pub fn inferred(name: impl Into<Name>, tensor: &Tensor) -> Self {
        let name = name.into();
        let role = inferred_role(&name, tensor.kind());
        Self { role_inferred: true, ..Self::of(name, role, tensor) }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product()
    }

    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        self.numel() * dtype::size(self.dtype) as u64
    }
}

/// What kind of store a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A TorchScript module.
    Module,
    /// A tch `nn::VarStore`.
    VarStore,
    /// Named tensors read from or written to a file of this format.
    Checkpoint(Format),
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Module => f.write_str("TorchScript module"),
            StoreKind::VarStore => f.write_str("tch VarStore"),
            StoreKind::Checkpoint(format) => write!(f, "{format}"),
        }
    }
}

/// Whether a store lists its entries in the order the model registered them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryOrder {
    /// `state_dict()` order: TorchScript modules, `torch.save` state dicts.
    Registration,
    /// Some other order (safetensors and sharded indexes sort their names,
    /// `.npz` keeps whatever order it was given, tch keeps variables in a hash
    /// map): the order matcher reconstructs one from the names.
    Unknown,
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
}

/// Opens a model file of any supported kind, found from its content: a
/// TorchScript module becomes a [`ModuleStore`], everything else a [`Checkpoint`].
/// The file is only read; writes into the result stay in memory until saved.
pub fn open(path: impl AsRef<Path>) -> Result<Box<dyn Target>> {
    open_with_key(path, None)
}

/// [`open`], with `key` picking the state dict inside a `torch.save`
/// checkpoint dict (see [`Checkpoint::open_with_key`]).
pub fn open_with_key(path: impl AsRef<Path>, key: Option<&str>) -> Result<Box<dyn Target>> {
    let path = path.as_ref();
    match format::sniff(path)? {
        Format::TorchScript if key.is_none() => Ok(Box::new(ModuleStore::open(path)?)),
        other => Ok(Box::new(Checkpoint::open_as(path, other, key)?)),
    }
}

/// The role a file that does not record roles most likely gave `name`: BatchNorm
/// statistics and non-floating tensors are buffers, everything else parameters.
pub fn inferred_role(name: &str, dtype: Kind) -> Role {
    let leaf = crate::dotted::leaf(name);
    let floating = matches!(
        dtype,
        Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16 | Kind::ComplexFloat | Kind::ComplexDouble
    );
    if matches!(leaf, "running_mean" | "running_var" | "num_batches_tracked") || !floating {
        Role::Buffer
    } else {
        Role::Parameter
    }
}
