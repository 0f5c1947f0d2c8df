//! The shared vocabulary of every stage: a tensor's [`Name`], its [`Role`], the
//! [`Entry`] that describes it, and whether a store lists entries in
//! [`EntryOrder::Registration`], and the [`Format`] a model file is in.
//! Everything above imports these; this imports nothing above it.
use std::fmt;
use std::path::Path;

use serde::Serialize;
use tch::{Device, Tensor};

use crate::dtype::{self, Dtype};

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

/// The name exactly (`to_string` gives it back as stored), honouring width and
/// alignment (`{:<20}`). Text for a terminal escapes it (`escaped`).
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
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

/// One named tensor of a store, described (the tensor itself is [`Source::tensor`](crate::Source::tensor)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Dotted name, as PyTorch's `state_dict()` gives it.
    pub name: Name,
    /// Parameter or buffer.
    pub role: Role,
    /// Whether `role` was guessed from the name and dtype because the store does
    /// not record roles (checkpoint files); see `inferred_role`: BatchNorm statistics and
    /// non-floating tensors are buffers.
    pub role_inferred: bool,
    /// Sizes of each dimension.
    pub shape: Vec<i64>,
    /// Element type (PyTorch's name in JSON).
    pub dtype: Dtype,
    /// Where the tensor lives.
    #[serde(serialize_with = "serialize_device")]
    pub device: Device,
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
    /// Describes `tensor` under `name`. An undefined tensor, or one of a dtype
    /// libtorch names and this crate does not, is an error.
    pub fn of(name: impl Into<Name>, role: Role, tensor: &Tensor) -> Result<Self, tch::TchError> {
        Ok(Self {
            name: name.into(),
            role,
            role_inferred: false,
            shape: tensor.size(),
            dtype: Dtype::of(tensor)?,
            device: tensor.device(),
        })
    }

    /// Describes `tensor` under `name`, its role guessed from the name and dtype
    /// (BatchNorm statistics and non-floating tensors are buffers).
    pub fn inferred(name: impl Into<Name>, tensor: &Tensor) -> Result<Self, tch::TchError> {
        let name = name.into();
        let role = inferred_role(&name, Dtype::of(tensor)?);
        Ok(Self { role_inferred: true, ..Self::of(name, role, tensor)? })
    }

    /// [`Entry::of`] for a live tensor (a loaded module's, a `VarStore`'s):
    /// one whose dtype tch has no `Kind` for is refused by name, since tch
    /// could not write into it.
    pub fn of_live(name: impl Into<Name>, role: Role, tensor: &Tensor) -> Result<Self, tch::TchError> {
        let entry = Self::of(name, role, tensor)?;
        entry.dtype.require_kind("a live tensor")?;
        Ok(entry)
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

/// The role a file that does not record roles most likely gave `name`: BatchNorm
/// statistics and non-floating tensors are buffers, everything else parameters.
pub fn inferred_role(name: &str, dtype: Dtype) -> Role {
    let leaf = crate::dotted::leaf(name);
    let floating = dtype::is_floating(dtype) || dtype::is_complex(dtype);
    if matches!(leaf, "running_mean" | "running_var" | "num_batches_tracked") || !floating {
        Role::Buffer
    } else {
        Role::Parameter
    }
}

/// A kind of model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A TorchScript module (`torch.jit.save`).
    TorchScript,
    /// A `torch.save` zip archive (PyTorch ≥ 1.6).
    TorchSave,
    /// A `torch.save` file in the legacy, pre-1.6 (non-zip) format.
    TorchSaveLegacy,
    /// A `.safetensors` file.
    Safetensors,
    /// A Hugging Face `*.safetensors.index.json` naming the shards of one checkpoint.
    SafetensorsIndex,
    /// What tch's `VarStore::save` / `Tensor::save_multi` writes (`.ot`).
    TchArchive,
    /// A numpy `.npz` archive of `.npy` arrays.
    Npz,
    /// A PyTorch Distributed Checkpoint folder (`.metadata` and `.distcp` files).
    DistributedCheckpoint,
}

impl Format {
    /// The formats a file's extension asks for when writing, if any.
    pub fn for_extension(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let format = if name.ends_with(".safetensors") {
            Format::Safetensors
        } else if name.ends_with(".ot") {
            Format::TchArchive
        } else if name.ends_with(".npz") {
            Format::Npz
        } else if name.ends_with(".pth") || name.ends_with(".bin") || name.ends_with(".ckpt") {
            Format::TorchSave
        } else if name.ends_with(".pt") {
            // `.pt` is used for modules and state dicts alike; the caller decides.
            return None;
        } else if name.ends_with(".index.json") {
            Format::SafetensorsIndex
        } else {
            return None;
        };
        Some(format)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::TorchScript => "TorchScript module",
            Format::TorchSave => "torch.save checkpoint",
            Format::TorchSaveLegacy => "legacy torch.save checkpoint",
            Format::Safetensors => "safetensors",
            Format::SafetensorsIndex => "sharded safetensors index",
            Format::TchArchive => "tch archive (.ot)",
            Format::Npz => "npz",
            Format::DistributedCheckpoint => "distributed checkpoint",
        })
    }
}
