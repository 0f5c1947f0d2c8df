//! `.safetensors` files, read through a private memory map (pages are read when a
//! tensor is used, not before; writes into a tensor never reach the file), and
//! Hugging Face sharded checkpoints (`*.safetensors.index.json`).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path};
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use tch::Tensor;

use crate::dtype;
use crate::error::{Error, Result};
use crate::ffi;

const FORMAT: &str = "safetensors";

/// Named tensors in file order, and the `__metadata__` map.
pub type Contents = (Vec<(String, Tensor)>, BTreeMap<String, String>);

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { path: path.into(), format: FORMAT, message: message.into() }
}

/// The dtypes of the `safetensors` package's PyTorch binding (its `_TYPES`),
/// by their header codes: exactly what `safetensors.torch` reads and writes.
const CODES: [(Dtype, dtype::Dtype); 18] = [
    (Dtype::BOOL, dtype::Dtype::Bool),
    (Dtype::U8, dtype::Dtype::UInt8),
    (Dtype::I8, dtype::Dtype::Int8),
    (Dtype::I16, dtype::Dtype::Int16),
    (Dtype::U16, dtype::Dtype::UInt16),
    (Dtype::I32, dtype::Dtype::Int32),
    (Dtype::U32, dtype::Dtype::UInt32),
    (Dtype::I64, dtype::Dtype::Int64),
    (Dtype::U64, dtype::Dtype::UInt64),
    (Dtype::F16, dtype::Dtype::Float16),
    (Dtype::BF16, dtype::Dtype::BFloat16),
    (Dtype::F32, dtype::Dtype::Float32),
    (Dtype::F64, dtype::Dtype::Float64),
    (Dtype::C64, dtype::Dtype::Complex64),
    (Dtype::F8_E5M2, dtype::Dtype::Float8E5M2),
    (Dtype::F8_E4M3, dtype::Dtype::Float8E4M3Fn),
    (Dtype::F8_E5M2FNUZ, dtype::Dtype::Float8E5M2Fnuz),
    (Dtype::F8_E4M3FNUZ, dtype::Dtype::Float8E4M3Fnuz),
];

fn kind_of(code: Dtype) -> Option<dtype::Dtype> {
    CODES.iter().find(|(c, _)| *c == code).map(|(_, d)| *d)
}

fn dtype_of(dtype: dtype::Dtype) -> Option<Dtype> {
    CODES.iter().find(|(_, d)| *d == dtype).map(|(c, _)| *c)
}

/// Reads a `.safetensors` file: header checked by the `safetensors` crate (offsets
/// inside the file, no overlaps), data mapped privately, tensors in file order.
pub fn read(path: &Path) -> Result<Contents> {
    let file = crate::files::open_regular(path)?;
    let len = file.metadata().map_err(|source| Error::Io { path: path.into(), source })?.len();
    if len == 0 {
        return Err(Error::EmptyFile { path: path.into() });
    }
    // SAFETY: a private (copy-on-write) map: our writes never reach the file. Another
    // process truncating the file while it is mapped would fault on access; that is
    // the usual contract of memory-mapped model loading (safetensors, PyTorch mmap=True).
    let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
        .map_err(|source| Error::Io { path: path.into(), source })?;
    // Count the entries before the header is parsed into one object each: every
    // tensor has exactly one `data_offsets` (an upper bound if a name holds it too).
    let header = map.get(8..).and_then(|rest| {
        let len = usize::try_from(u64::from_le_bytes(map.get(..8)?.try_into().ok()?)).ok()?;
        rest.get(..len)
    });
    if let Some(header) = header {
        let marker = b"data_offsets";
        let count = header.windows(marker.len()).filter(|w| w == marker).count();
        super::check_entries(path, "safetensors", count)?;
    }
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| format_error(path, e.to_string()))?;
    let data_start = 8 + header_len;
    let infos: Vec<(String, TensorInfo)> = metadata
        .offset_keys()
        .into_iter()
        .filter_map(|name| metadata.info(&name).cloned().map(|info| (name, info)))
        .collect();
    let user_metadata: BTreeMap<String, String> =
        metadata.metadata().clone().unwrap_or_default().into_iter().collect();

    let data_len = map.len() - data_start;
    let data_ptr = map[data_start..].as_mut_ptr();
    let owner = Arc::new(map);
    // SAFETY: `data_ptr .. + data_len` lies inside the map, which `owner` keeps alive
    // for as long as libtorch holds the storage; nothing else writes to the map.
    let bytes =
        unsafe { ffi::tensor_over_bytes(owner, data_ptr, data_len) }.map_err(|m| format_error(path, m))?;

    let mut tensors = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let kind = kind_of(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: path.into(),
            tensor: name.clone(),
            dtype: format!("{:?} (PyTorch's safetensors reads no such code)", info.dtype),
        })?;
        let shape = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| format_error(path, format!("tensor {name}: a dimension does not fit in i64")))?;
        let tensor = typed_view(&bytes, info.data_offsets, kind, &shape)
            .map_err(|e| format_error(path, format!("tensor {name}: {e}")))?;
        tensors.push((name, tensor));
    }
    Ok((tensors, user_metadata))
}

/// The bytes `start..end` of `bytes` seen as a tensor of `kind` and `shape`;
/// copied into fresh memory when the offset is not aligned for `kind`.
fn typed_view(
    bytes: &Tensor,
    (start, end): (usize, usize),
    kind: dtype::Dtype,
    shape: &[i64],
) -> Result<Tensor, tch::TchError> {
    let len = (end - start) as i64;
    let slice = bytes.f_narrow(0, start as i64, len)?;
    let slice = if start % kind.size() == 0 { slice } else { slice.f_detach_copy()? };
    ffi::view_bytes_as(&slice, kind).map_err(tch::TchError::Kind)?.f_reshape(shape)
}

/// safetensors' name of a dtype, as its header writes it.
fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// Writes `tensors` and `metadata` as a `.safetensors` file at `path` (directly:
/// callers wanting atomicity go through [`crate::files::write_atomically`]).
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    write_stream(path, &super::outgoing(tensors), metadata, &mut |i| Ok(tensors[i].1.shallow_clone()))
}

/// Writes a `.safetensors` file of the `outgoing` tensors, in that order, each
/// made by `produce` when its turn comes: the header first (dtypes, shapes and
/// offsets are known), then one tensor's bytes at a time.
pub(crate) fn write_stream(
    path: &Path,
    outgoing: &[super::Outgoing],
    metadata: &BTreeMap<String, String>,
    produce: super::Produce,
) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io { path: path.into(), source };
    let dtypes = super::check_types(path, FORMAT, outgoing, dtype_of)?;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let map = metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(map));
    }
    let mut offset = 0usize;
    for (o, dtype) in outgoing.iter().zip(&dtypes) {
        let end = offset + o.bytes();
        header.insert(
            o.name.clone(),
            serde_json::json!({ "dtype": dtype_name(*dtype), "shape": o.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(header))
        .map_err(|e| format_error(path, e.to_string()))?;
    // The data starts 8-aligned, as safetensors writes it.
    text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(text.as_bytes()).map_err(io)?;
    for i in 0..outgoing.len() {
        let tensor = super::produce_checked(path, FORMAT, outgoing, i, produce)?;
        out.write_all(super::bytes_of(&tensor)).map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Reads a sharded checkpoint through its index (`*.safetensors.index.json`,
/// or `pytorch_model.bin.index.json` with `torch.save` shards): every shard
/// the `weight_map` names, as one list of tensors in the model's order. A
/// shard that is missing, a tensor the index names but its shard lacks, and a
/// tensor a shard holds that the index does not name are errors naming both
/// files.
///
/// The model's order is the `weight_map`'s, as the index lists it: writers that
/// go through a state dict (huggingface_hub's `save_torch_state_dict`,
/// transplant's `convert`) list it in the state dict's order, whichever shard
/// each tensor went to. `save_pretrained` writes the index with sorted keys,
/// which records no order: for such an index the shards are read in the order
/// of their names (`-00001-of-00003` first), each in its own order (a
/// `torch.save` shard keeps the state dict's).
pub fn read_sharded(index: &Path) -> Result<Contents> {
    let text = crate::files::read_bounded(index, super::MAX_INDEX_BYTES, "sharded index")?;
    let bad_index =
        |message: String| Error::Format { path: index.into(), format: "safetensors index", message };
    let root: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad_index(e.to_string()))?;
    let weight_map = root
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad_index("no `weight_map` object".into()))?;
    let mut metadata = BTreeMap::new();
    if let Some(serde_json::Value::Object(entries)) = root.get("metadata") {
        for (key, value) in entries {
            let value = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            metadata.insert(key.clone(), value);
        }
    }
    super::check_entries(index, "sharded index", weight_map.len())?;
    let folder = index.parent().unwrap_or(Path::new("."));
    let mut shard_of: HashMap<&str, &str> = HashMap::new();
    let mut shards: Vec<&str> = Vec::new();
    for (tensor, shard) in weight_map {
        let shard = shard.as_str().ok_or_else(|| bad_index(format!("shard of {tensor} is not a string")))?;
        let inside = Path::new(shard).components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(bad_index(format!(
                "shard {shard:?} of {tensor} is not a file name inside the index's folder"
            )));
        }
        if !shards.contains(&shard) {
            shards.push(shard);
        }
        shard_of.insert(tensor.as_str(), shard);
    }
    let sorted = weight_map.keys().zip(weight_map.keys().skip(1)).all(|(a, b)| a <= b);
    if sorted {
        shards.sort_unstable();
    }
    let mut tensors = Vec::with_capacity(weight_map.len());
    for shard in shards {
        let shard_path = folder.join(shard);
        if !shard_path.exists() {
            return Err(Error::Shard {
                index: index.into(),
                shard: shard_path,
                message: "the shard file is missing".into(),
            });
        }
        // Each shard's kind from its content: safetensors, or torch.save
        // (`pytorch_model-00001-of-00002.bin`, as transformers writes them).
        let shard_tensors = match super::sniff(&shard_path)? {
            super::Format::Safetensors => read(&shard_path)?.0,
            super::Format::TorchSave | super::Format::TorchSaveLegacy => {
                super::torch_pickle::read(&shard_path, None)?.tensors
            }
            other => {
                return Err(Error::Shard {
                    index: index.into(),
                    shard: shard_path,
                    message: format!("is a {other}; shards are safetensors or torch.save files"),
                })
            }
        };
        let mut found: HashSet<String> = HashSet::new();
        for (name, tensor) in shard_tensors {
            if shard_of.get(name.as_str()) != Some(&shard) {
                return Err(Error::Shard {
                    index: index.into(),
                    shard: shard_path,
                    message: format!("holds tensor {name}, which the index does not place in it"),
                });
            }
            found.insert(name.clone());
            tensors.push((name, tensor));
        }
        if let Some(missing) =
            shard_of.iter().find(|(t, s)| **s == shard && !found.contains(**t)).map(|(t, _)| *t)
        {
            return Err(Error::Shard {
                index: index.into(),
                shard: shard_path,
                message: format!("lacks tensor {missing}, which the index places in it"),
            });
        }
    }
    if !sorted {
        // Every name is the index's (checked above): its place there is the order.
        let place: HashMap<&str, usize> =
            weight_map.keys().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        tensors.sort_by_key(|(name, _)| place.get(name.as_str()).copied().unwrap_or(usize::MAX));
    }
    Ok((tensors, metadata))
}
