//! [`VarStoreView`]: a tch `nn::VarStore` seen as a store.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use tch::{nn::VarStore, Tensor};

use super::{Checkpoint, Source, StoreKind, Target};
use crate::dotted::{leaf as leaf_of, module_and_leaf, natural_cmp};
use crate::entry::{Entry, EntryOrder, Role};
use crate::error::{Error, Result};
use crate::ffi::tensor_identity;
use crate::format::Format;

/// The variables of a tch `VarStore`, with handles on the variables themselves.
///
/// - Trainable variables are parameters, the others buffers (tch's
///   `nn::batch_norm` registers `running_mean` / `running_var` as non-trainable).
///   Trainability is decided by identity with the store's trainable list, not by
///   `requires_grad`, which `VarStore::freeze` clears.
/// - tch keeps variables in a hash map, without their registration order. The
///   order here follows PyTorch's `state_dict()` as closely as tch allows: modules
///   in the order of their first trainable variable; within a module `weight`
///   first, then its other parameters in registration order, then its buffers by
///   name; modules holding only buffers come last. (tch's layers create `bias`
///   before `weight`; the PyTorch modules they mirror register `weight` first,
///   and matching by order against those is what the order matters for.) Names
///   compare numerically where a segment is a number (`layer.2` before `layer.10`).
/// - Writing into the handles changes the variables in place: their dtype and
///   device stay what the model declared (unlike `VarStore::load`, which takes
///   the file's dtype).
#[derive(Debug)]
pub struct VarStoreView {
    origin: String,
    entries: Vec<Entry>,
    tensors: Vec<Tensor>,
}

/// `a.2.b` before `a.10.b`: segments compared as numbers where both are numbers.
// SAFETY: as for `Checkpoint`: shared access reads names and `&Tensor`s; writes
// take `&mut self` through `Target`.
unsafe impl Sync for VarStoreView {}

impl VarStoreView {
    /// Lists the variables of `vs`.
    pub fn new(vs: &VarStore) -> Result<Self> {
        let variables = vs.variables_.lock().map_err(|_| Error::Poisoned { what: "VarStore variables" })?;
        let trainable: HashMap<usize, usize> = variables
            .trainable_variables
            .iter()
            .enumerate()
            .map(|(rank, var)| (tensor_identity(&var.tensor), rank))
            .collect();
        let mut named: Vec<(&String, &Tensor, Option<usize>)> = variables
            .named_variables
            .iter()
            .map(|(name, tensor)| (name, tensor, trainable.get(&tensor_identity(tensor)).copied()))
            .collect();
        let mut module_rank: HashMap<&str, usize> = HashMap::new();
        for (name, _, rank) in &named {
            if let Some(rank) = rank {
                let slot = module_rank.entry(module_and_leaf(name).0).or_insert(*rank);
                *slot = (*slot).min(*rank);
            }
        }
        named.sort_by(|(a, _, rank_a), (b, _, rank_b)| {
            let module_a = module_rank.get(module_and_leaf(a).0).copied().unwrap_or(usize::MAX);
            let module_b = module_rank.get(module_and_leaf(b).0).copied().unwrap_or(usize::MAX);
            module_a
                .cmp(&module_b)
                .then_with(|| natural_cmp(module_and_leaf(a).0, module_and_leaf(b).0))
                // Parameters (weight first, then registration order) before buffers (by name).
                .then_with(|| rank_a.is_none().cmp(&rank_b.is_none()))
                .then_with(|| (leaf_of(b) == "weight").cmp(&(leaf_of(a) == "weight")))
                .then_with(|| rank_a.cmp(rank_b))
                .then_with(|| natural_cmp(a, b))
        });
        let seen: HashSet<&str> = named.iter().map(|(n, _, _)| n.as_str()).collect();
        debug_assert_eq!(seen.len(), named.len());
        let entries = named
            .iter()
            .map(|(name, tensor, rank)| {
                let role = if rank.is_some() { Role::Parameter } else { Role::Buffer };
                Entry::of_live(name.as_str(), role, tensor).map_err(|source| crate::error::Error::Tensor {
                    store: "tch VarStore".into(),
                    tensor: name.to_string(),
                    source,
                })
            })
            .collect::<Result<_>>()?;
        let tensors = named.iter().map(|(_, tensor, _)| tensor.shallow_clone()).collect();
        Ok(Self { origin: "tch VarStore".into(), entries, tensors })
    }

    /// The same view, described as `origin` in messages.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }
}

impl Source for VarStoreView {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::VarStore
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    /// tch keeps variables in a hash map: the order here is a reconstruction.
    fn entry_order(&self) -> EntryOrder {
        EntryOrder::Unknown
    }
    fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index)
    }
}

impl Target for VarStoreView {
    fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }
    /// Writes the variables as tch's `.ot` (what `VarStore::load` reads), or in the
    /// state-dict format `path`'s extension names.
    fn save(&self, path: &Path) -> Result<()> {
        let named = self
            .entries
            .iter()
            .zip(&self.tensors)
            .map(|(e, t)| (e.name.to_string(), t.shallow_clone()))
            .collect();
        Checkpoint::from_tensors(self.origin.clone(), Format::TchArchive, named, BTreeMap::new())?.save(path)
    }
}

#[cfg(test)]
mod tests {
    use super::natural_cmp;
    use std::cmp::Ordering;

    #[test]
    fn numbers_compare_as_numbers() {
        assert_eq!(natural_cmp("layer.2.weight", "layer.10.weight"), Ordering::Less);
        assert_eq!(natural_cmp("a.b", "a"), Ordering::Greater);
        assert_eq!(natural_cmp("bn.bias", "bn.weight"), Ordering::Less);
    }
}
