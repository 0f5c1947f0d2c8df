//! [`Checkpoint`]: named tensors read from, or to be written to, a state-dict file.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tch::Tensor;

use super::{Source, StoreKind, Target};
use crate::entry::{Entry, EntryOrder};
use crate::error::{Error, Result};
use crate::format::{self, npz, safetensors, tch_archive, torch_pickle, Format};

/// Named tensors of a state-dict file (safetensors, sharded safetensors, `.ot`,
/// `.npz`), held in memory or mapped. The tensors are writable: writes change the
/// checkpoint in memory, never the file it was read from, until [`Target::save`].
///
/// Files do not record whether a tensor was a parameter or a buffer; the role is
/// inferred (`inferred_role`).
#[derive(Debug)]
pub struct Checkpoint {
    origin: String,
    format: Format,
    entries: Vec<Entry>,
    tensors: Vec<Tensor>,
    metadata: BTreeMap<String, String>,
    key: Option<String>,
    others: Vec<(String, String)>,
}

// SAFETY: the one field that is not `Sync` is `tensors: Vec<Tensor>` (tch's
// `Tensor` is a raw handle, `Send` only). Through `&Checkpoint` the types allow
// reading alone: entries, metadata, and `&Tensor` (`Source::tensor`), whose
// `&self` methods read metadata and data or clone the handle (an atomic
// reference count). Every write this crate makes goes through
// `Target::tensors_mut(&mut self)` or `&mut self` methods, which the borrow
// checker keeps exclusive. What remains is tch's own rule for any tensor handle
// (a caller may `shallow_clone` it and write through the clone): a race there is
// on element values, as with any `Tensor` sent to another thread, never on the
// handle or the storage's layout.
unsafe impl Sync for Checkpoint {}

impl Checkpoint {
    /// Opens a state-dict file, its format found from its content.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_key(path, None)
    }

    /// Opens a state-dict file; for a `torch.save` checkpoint dict, `key` picks
    /// the state dict inside it (`state_dict`, `model_ema`, nested as `a.b`);
    /// without one the unique dict of tensors is picked and [`Source::key`] says which.
    pub fn open_with_key(path: impl AsRef<Path>, key: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        Self::open_as(path, format::sniff(path)?, key)
    }

    pub(crate) fn open_as(path: &Path, format: Format, key: Option<&str>) -> Result<Self> {
        if key.is_some()
            && !matches!(format, Format::TorchSave | Format::TorchSaveLegacy | Format::DistributedCheckpoint)
        {
            return Err(Error::Unsupported {
                path: path.into(),
                format,
                hint: "--key selects inside torch.save checkpoints and Distributed Checkpoints only".into(),
            });
        }
        let (tensors, metadata) = match format {
            Format::Safetensors => safetensors::read(path)?,
            Format::SafetensorsIndex => safetensors::read_sharded(path)?,
            Format::TchArchive => (tch_archive::read(path)?, BTreeMap::new()),
            Format::Npz => (npz::read(path)?, BTreeMap::new()),
            Format::DistributedCheckpoint => {
                let contents = crate::format::dcp::read(path, key)?;
                let mut checkpoint = Self::from_tensors(
                    path.display().to_string(),
                    format,
                    contents.tensors,
                    BTreeMap::new(),
                )?;
                checkpoint.key = contents.key;
                checkpoint.others = contents.others;
                return Ok(checkpoint);
            }
            Format::TorchSave | Format::TorchSaveLegacy => {
                let loaded = torch_pickle::read(path, key)?;
                let metadata = torch_pickle::metadata_of(&loaded);
                let mut checkpoint =
                    Self::from_tensors(path.display().to_string(), format, loaded.tensors, metadata)?;
                checkpoint.key = loaded.key;
                checkpoint.others = loaded.others;
                return Ok(checkpoint);
            }
            Format::TorchScript => {
                return Err(Error::Unsupported {
                    path: path.into(),
                    format,
                    hint: "open it as a module (transplant::store::open or ModuleStore::open)".into(),
                })
            }
        };
        Self::from_tensors(path.display().to_string(), format, tensors, metadata)
    }

    /// A checkpoint of these tensors, to be saved in `format`. Two tensors of one
    /// name are an error.
    pub fn from_tensors(
        origin: impl Into<String>,
        format: Format,
        tensors: Vec<(String, Tensor)>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let origin = origin.into();
        let mut seen = HashSet::with_capacity(tensors.len());
        for (name, _) in &tensors {
            if !seen.insert(name.as_str()) {
                return Err(Error::DuplicateName { origin, tensor: name.clone() });
            }
        }
        let entries = tensors
            .iter()
            .map(|(n, t)| {
                Entry::inferred(n.clone(), t).map_err(|source| Error::Tensor {
                    store: origin.clone(),
                    tensor: n.clone(),
                    source,
                })
            })
            .collect::<Result<_>>()?;
        let tensors = tensors.into_iter().map(|(_, t)| t).collect();
        Ok(Self { origin, format, entries, tensors, metadata, key: None, others: Vec::new() })
    }

    /// The same checkpoint with its tensors on `device` and, with `dtype`, its
    /// float16, bfloat16, float32 and float64 tensors converted (integer, bool,
    /// float8 and other stored-only tensors keep their type).
    pub fn converted(&self, device: tch::Device, dtype: Option<tch::Kind>) -> Result<Self> {
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (entry, tensor) in self.entries.iter().zip(&self.tensors) {
            let cast = dtype.filter(|_| entry.dtype.is_castable_float());
            let moved = tensor
                .f_to_device(device)
                .and_then(|t| match cast {
                    Some(kind) => t.f_to_kind(kind),
                    None => Ok(t),
                })
                .and_then(|t| t.f_contiguous())
                .map_err(|source| Error::Tensor {
                    store: self.origin.clone(),
                    tensor: entry.name.to_string(),
                    source,
                })?;
            tensors.push((entry.name.to_string(), moved));
        }
        let mut out = Self::from_tensors(self.origin.clone(), self.format, tensors, self.metadata.clone())?;
        out.key = self.key.clone();
        Ok(out)
    }

    /// The format the checkpoint was read from (or is meant for).
    pub fn format(&self) -> Format {
        self.format
    }

    /// The file's own metadata (safetensors `__metadata__`, an index's `metadata`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Name and live handle of every tensor, in order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.entries.iter().zip(&self.tensors).map(|(e, t)| (e.name.to_string(), t.shallow_clone())).collect()
    }

    /// Writes the checkpoint to `path` in `format`, whole or not at all.
    pub fn save_as(&self, path: &Path, format: Format) -> Result<()> {
        let named = self.named_tensors();
        crate::files::write_atomically(path, |temp| match format {
            Format::Safetensors => safetensors::write(temp, &named, &self.metadata),
            Format::TchArchive => tch_archive::write(temp, &named),
            Format::Npz => npz::write(temp, &named),
            Format::TorchSave => torch_pickle::write(
                temp,
                &named,
                self.metadata.get(torch_pickle::METADATA_KEY).map(String::as_str),
            ),
            other => Err(Error::Unsupported {
                path: path.into(),
                format: other,
                hint: "write .safetensors, .pth, .ot or .npz".into(),
            }),
        })
    }
}

impl Source for Checkpoint {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Checkpoint(self.format)
    }
    /// A `torch.save` state dict keeps the order it was saved in; the other
    /// formats do not record a registration order.
    fn entry_order(&self) -> EntryOrder {
        match self.format {
            Format::TorchSave | Format::TorchSaveLegacy | Format::DistributedCheckpoint => {
                EntryOrder::Registration
            }
            _ => EntryOrder::Unknown,
        }
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn metadata(&self) -> BTreeMap<String, String> {
        self.metadata.clone()
    }
    fn others(&self) -> Vec<(String, String)> {
        self.others.clone()
    }
    fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index)
    }
    fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl Target for Checkpoint {
    fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }
    /// Writes in the format `path`'s extension names, else in the format read.
    fn save(&self, path: &Path) -> Result<()> {
        let format = match Format::for_extension(path) {
            Some(format) => format,
            None if self.format == Format::SafetensorsIndex => Format::Safetensors,
            None => self.format,
        };
        self.save_as(path, format)
    }
}
