//! [`ScriptArchive`]: a TorchScript file read as the zip archive it is — none
//! of its code run, no libtorch load — and written back by rewriting the
//! archive: every member copied through unchanged except the storage records,
//! which are written from the tensors as the copy left them.
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::{Source, StoreKind, Target};
use crate::dtype;
use crate::entry::{Entry, EntryOrder};
use crate::error::{Error, Result};
use crate::format::script_archive;

/// A TorchScript module file's parameters and buffers, read without loading it.
/// Its tensors are views into a private map of the file (writes never reach
/// the file); [`Target::save`] writes a new archive with the same code.
pub struct ScriptArchive {
    origin: String,
    path: PathBuf,
    entries: Vec<Entry>,
    tensors: Vec<Tensor>,
    records: Vec<(String, Tensor)>,
    record_of: Vec<Option<usize>>,
    /// Members written with new contents (`data.pkl`, once storages are retyped).
    replaced: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ScriptArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptArchive")
            .field("origin", &self.origin)
            .field("entries", &self.entries.len())
            .finish()
    }
}

// SAFETY: as for `Checkpoint`: through `&ScriptArchive` only reads happen (entries,
// `&Tensor` handles); every write goes through `&mut self` (`tensors_mut`).
unsafe impl Sync for ScriptArchive {}

impl ScriptArchive {
    /// Reads the TorchScript module file at `path`, running none of its code.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let contents = script_archive::read_archive(path)?;
        let mut entries = Vec::with_capacity(contents.entries.len());
        let mut tensors = Vec::with_capacity(contents.entries.len());
        for (name, role, tensor) in contents.entries {
            let entry =
                Entry::of(name.clone(), role, &tensor).map_err(|source| crate::error::Error::Tensor {
                    store: path.display().to_string(),
                    tensor: name.to_string(),
                    source,
                })?;
            entries.push(entry);
            tensors.push(tensor);
        }
        Ok(Self {
            origin: path.display().to_string(),
            path: path.into(),
            entries,
            tensors,
            records: contents.records,
            record_of: contents.record_of,
            replaced: Vec::new(),
        })
    }

    /// This module with its floating parameters and buffers converted to
    /// `dtype` (integer ones, such as `num_batches_tracked`, keep theirs), as
    /// `module.to(dtype)` would: the converted storages are held in memory,
    /// and a file written from it names their new types in `data.pkl` (the
    /// rest of the archive is copied through as always). Nothing is run.
    pub fn converted(mut self, dtype: Kind) -> Result<Self> {
        if !dtype::Dtype::from(dtype).is_castable_float() {
            return Err(Error::Module {
                module: self.origin.clone(),
                operation: "conversion",
                message: format!("modules convert to floating dtypes only, not {}", dtype::name(dtype)),
            });
        }
        let failed =
            |e: String| Error::Module { module: self.origin.clone(), operation: "conversion", message: e };
        let mut retype = std::collections::HashMap::new();
        let mut viewing: Vec<Vec<usize>> = vec![Vec::new(); self.records.len()];
        for (j, r) in self.record_of.iter().enumerate() {
            if let Some(r) = r {
                viewing[*r].push(j);
            }
        }
        for (r, views) in viewing.iter().enumerate() {
            let storage = &self.records[r].1;
            let old = dtype::Dtype::of(storage).map_err(|e| failed(e.to_string()))?;
            if !old.is_castable_float() || old == dtype.into() {
                continue;
            }
            let (base, element) = (storage.data_ptr() as usize, dtype::size(old));
            let new = storage.f_to_kind(dtype).map_err(|e| failed(e.to_string()))?;
            for &j in views {
                let t = &self.tensors[j];
                let offset = ((t.data_ptr() as usize - base) / element) as i64;
                self.tensors[j] =
                    crate::ffi::strided_view(&new, dtype, &t.size(), &t.stride(), offset).map_err(failed)?;
                self.entries[j].dtype = dtype.into();
            }
            self.records[r].1 = new;
            retype.insert(self.records[r].0.clone(), dtype);
        }
        if !retype.is_empty() {
            self.replaced.push(script_archive::retyped_pickle(&self.path, &self.records, &retype)?);
        }
        Ok(self)
    }

    /// The new contents of member `name`, where it has some.
    pub(crate) fn replacement(&self, name: &str) -> Option<&[u8]> {
        self.replaced.iter().find(|(n, _)| n == name).map(|(_, bytes)| bytes.as_slice())
    }

    /// The file it was read from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `(member name, storage as read)` of every storage record, by name.
    pub(crate) fn records(&self) -> &[(String, Tensor)] {
        &self.records
    }

    /// The record entry `index`'s tensor views (`None`: it holds no bytes).
    pub(crate) fn record_of(&self, index: usize) -> Option<usize> {
        self.record_of.get(index).copied().flatten()
    }
}

impl Source for ScriptArchive {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Module
    }
    fn entry_order(&self) -> EntryOrder {
        EntryOrder::Registration
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index)
    }
}

impl Target for ScriptArchive {
    fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }
    fn as_script_archive(&self) -> Option<&ScriptArchive> {
        Some(self)
    }
    /// Writes the module to `path` as a new archive (whole or not at all): the
    /// source file's code, constants and debug information byte for byte, each
    /// storage record from the tensors.
    fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_atomically(path, |temp| {
            script_archive::rewrite(&self.path, temp, &self.records, &self.replaced)
        })
    }
}
