//! PyTorch Distributed Checkpoints (`torch.distributed.checkpoint`, what FSDP
//! and tensor-parallel training save): a folder with `.metadata` — a pickle of
//! `Metadata` dataclasses, read by the same machine as every pickle here, its
//! classes inert — and `.distcp` files whose byte ranges hold each chunk as a
//! `torch.save` stream.
//!
//! Each tensor is put together from its chunks: every chunk must lie inside the
//! tensor, the chunks must not overlap and must cover it exactly (else an error
//! naming the tensor); a tensor saved whole stays a view into its file. Every
//! storage reference is checked: the file a plain name inside the folder, the
//! range inside the file. Names are the flattened keys DCP writes
//! (`model.layer1.0.conv1.weight`); `--key model` (or the one top-level key
//! holding tensors, found from the planner data) selects a model's state dict,
//! and its prefix is taken off. Non-tensor items (`step`) are described.
//!
//! [`write`] writes one: a `.metadata` and one `__0_0.distcp`, each tensor one
//! chunk, which `torch.distributed.checkpoint.load` reads and reshards.
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tch::Tensor;

use super::pickle::{Machine, Object, Value};
use super::torch_pickle;
use crate::dtype;
use crate::error::{Error, Result};

const FORMAT: &str = "distributed checkpoint";
/// The largest `.metadata` read.
const MAX_METADATA_BYTES: u64 = 512 << 20;
/// Most chunks (and storage entries) a checkpoint may list, all tensors
/// together: each costs about 5 KB of parsed metadata (18 pickle objects).
const MAX_CHUNKS: usize = 131_072;
/// Most pickle objects the metadata may create: enough for [`MAX_CHUNKS`]
/// chunks, so that a metadata listing more is refused before it is all parsed.
const MAX_METADATA_OBJECTS: usize = 24 * MAX_CHUNKS;

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { path: path.into(), format: FORMAT, message: message.into() }
}

/// Whether `path` is a Distributed Checkpoint folder (it holds `.metadata`).
pub fn is_checkpoint(path: &Path) -> bool {
    path.is_dir() && path.join(".metadata").is_file()
}

/// What [`read`] found.
#[derive(Debug)]
pub struct Contents {
    /// Named tensors, in the saved order.
    pub tensors: Vec<(String, Tensor)>,
    /// The top-level key whose tensors were read (its prefix taken off).
    pub key: Option<String>,
    /// Everything else, described (`step`: `5`; `optim`: `12 tensors (not read)`).
    pub others: Vec<(String, String)>,
}

fn object<'m>(machine: &'m Machine, v: &Value) -> Option<&'m Object> {
    match v {
        Value::Ref(i) => machine.objects.get(*i),
        _ => None,
    }
}

/// The fields of a dataclass instance (`NEWOBJ` + `BUILD` with a dict).
fn fields<'m>(machine: &'m Machine, v: &Value) -> Option<&'m [(Value, Value)]> {
    match object(machine, v)? {
        Object::Reduce { state: Some(state), .. } => match object(machine, state)? {
            Object::Dict(items, _) => Some(items),
            _ => None,
        },
        Object::Dict(items, _) => Some(items),
        _ => None,
    }
}

fn get<'m>(items: &'m [(Value, Value)], name: &str) -> Option<&'m Value> {
    items.iter().find(|(k, _)| matches!(k, Value::Str(s) if &**s == name)).map(|(_, v)| v)
}

fn class_name<'m>(machine: &'m Machine, v: &Value) -> Option<&'m str> {
    match object(machine, v)? {
        Object::Reduce { callable: Value::Inert(_, n) | Value::Global(_, n), .. } => Some(n),
        _ => None,
    }
}

fn items_of<'m>(machine: &'m Machine, v: &Value) -> Option<&'m [Value]> {
    match object(machine, v)? {
        Object::List(items) | Object::Tuple(items) => Some(items),
        _ => None,
    }
}

/// A `torch.Size((…))` or a tuple of integers.
fn size(machine: &Machine, v: &Value) -> Option<Vec<i64>> {
    match object(machine, v)? {
        Object::Reduce { callable: Value::Global(_, n), args, .. } if &**n == "Size" => {
            size(machine, items_of(machine, args)?.first()?)
        }
        Object::Tuple(items) | Object::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(n) if *n >= 0 => Some(*n),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// Where one chunk's bytes are.
struct Stored {
    file: String,
    offset: u64,
    length: u64,
}

/// One `.distcp` file, mapped, with a tensor over its bytes.
struct Mapped {
    path: PathBuf,
    map: Arc<memmap2::MmapMut>,
    bytes: Tensor,
}

/// Reads the Distributed Checkpoint in `folder`; `key` selects a top-level
/// key of the saved state dict (`model`).
pub fn read(folder: &Path, key: Option<&str>) -> Result<Contents> {
    let metadata_path = folder.join(".metadata");
    let program = crate::files::read_bounded(&metadata_path, MAX_METADATA_BYTES, "checkpoint metadata")?;
    let mut machine = Machine::with_max_objects(MAX_METADATA_OBJECTS);
    let root = machine.run(&program).map_err(|e| match e {
        super::pickle::PickleError::TooLarge(m) => bad(
            &metadata_path,
            format!("{m}: the metadata lists more than the {MAX_CHUNKS} chunks a checkpoint may list"),
        ),
        e => bad(&metadata_path, e.to_string()),
    })?;
    let m = &metadata_path;
    let top = fields(&machine, &root).ok_or_else(|| bad(m, "the metadata is not a Metadata object"))?;
    let tensors_meta = get(top, "state_dict_metadata")
        .and_then(|v| fields(&machine, v))
        .ok_or_else(|| bad(m, "no state_dict_metadata"))?;
    let planner: HashMap<&str, Vec<&str>> = get(top, "planner_data")
        .and_then(|v| fields(&machine, v))
        .map(|items| {
            items
                .iter()
                .filter_map(|(k, v)| {
                    Some((text(k)?, items_of(&machine, v)?.iter().filter_map(text).collect()))
                })
                .collect()
        })
        .unwrap_or_default();
    // The planner data lists the state dict in its own order (the model's
    // registration order); the tensor metadata lists them as the ranks' plans
    // merged.
    let planner_order: HashMap<&str, usize> = get(top, "planner_data")
        .and_then(|v| fields(&machine, v))
        .map(|items| items.iter().enumerate().filter_map(|(i, (k, _))| Some((text(k)?, i))).collect())
        .unwrap_or_default();
    let mut stored: HashMap<(&str, Option<Vec<i64>>), Stored> = HashMap::new();
    let storage = get(top, "storage_data").and_then(|v| fields(&machine, v)).unwrap_or(&[]);
    if storage.len() > MAX_CHUNKS {
        return Err(bad(
            m,
            format!("{} storage entries, more than the {MAX_CHUNKS} a checkpoint may list", storage.len()),
        ));
    }
    for (index, info) in storage {
        let index = fields(&machine, index).ok_or_else(|| bad(m, "a storage key is not a MetadataIndex"))?;
        let info = fields(&machine, info).ok_or_else(|| bad(m, "a storage entry is not a _StorageInfo"))?;
        let fqn = get(index, "fqn").and_then(text).ok_or_else(|| bad(m, "a MetadataIndex without fqn"))?;
        let offset = get(index, "offset").and_then(|v| size(&machine, v));
        let file = get(info, "relative_path")
            .and_then(text)
            .ok_or_else(|| bad(m, format!("{fqn}: no relative_path")))?;
        let inside = Path::new(file).components().count() == 1
            && matches!(Path::new(file).components().next(), Some(Component::Normal(_)));
        if !inside {
            return Err(bad(
                m,
                format!("{fqn}: storage file {file:?} is not a file name inside the checkpoint's folder"),
            ));
        }
        if let Some(transforms) = get(info, "transform_descriptors") {
            if items_of(&machine, transforms).is_some_and(|t| !t.is_empty()) {
                return Err(bad(
                    m,
                    format!("{fqn}: its storage has transforms (compression?) this reader cannot apply"),
                ));
            }
        }
        let (Some(offset_in_file), Some(length)) =
            (get(info, "offset").and_then(int), get(info, "length").and_then(int))
        else {
            return Err(bad(m, format!("{fqn}: a storage entry without offset and length")));
        };
        if offset_in_file < 0 || length < 0 {
            return Err(bad(m, format!("{fqn}: a negative offset or length")));
        }
        stored.insert(
            (fqn, offset),
            Stored { file: file.to_string(), offset: offset_in_file as u64, length: length as u64 },
        );
    }
    disjoint_ranges(folder, &stored)?;
    // The top-level key: asked for, or the one holding tensors under it.
    let top_of = |fqn: &str| planner.get(fqn).filter(|p| p.len() > 1).map(|p| p[0]);
    let tensor_fqns: Vec<&str> = tensors_meta
        .iter()
        .filter(|(_, v)| class_name(&machine, v) == Some("TensorStorageMetadata"))
        .filter_map(|(k, _)| text(k))
        .collect();
    let key = match key {
        Some(key) => Some(key.to_string()),
        None => {
            let mut tops: Vec<&str> = tensor_fqns.iter().filter_map(|f| top_of(f)).collect();
            tops.dedup();
            tops.sort_unstable();
            tops.dedup();
            let flat = tensor_fqns.iter().any(|f| top_of(f).is_none());
            match (tops.len(), flat) {
                (0, _) | (_, true) => None,
                (1, false) => Some(tops[0].to_string()),
                _ => {
                    return Err(Error::AmbiguousKey {
                        path: folder.into(),
                        candidates: tops.join(", "),
                        hint: "model is the usual one".into(),
                    })
                }
            }
        }
    };
    let prefix = key.as_ref().map(|k| format!("{k}."));
    let mut files: HashMap<String, Mapped> = HashMap::new();
    let mut tensors = Vec::new();
    let mut others = Vec::new();
    let mut not_read: BTreeMap<String, usize> = BTreeMap::new();
    let mut chunks_seen = 0usize;
    let mut ordered: Vec<&(Value, Value)> = tensors_meta.iter().collect();
    ordered.sort_by_key(|(k, _)| text(k).and_then(|f| planner_order.get(f)).copied().unwrap_or(usize::MAX));
    for (fqn, meta) in ordered {
        let fqn = text(fqn).ok_or_else(|| bad(m, "a state-dict key that is not a string"))?;
        match class_name(&machine, meta) {
            Some("TensorStorageMetadata") => {
                let name = match &prefix {
                    Some(p) => match fqn.strip_prefix(p.as_str()) {
                        Some(rest) => rest,
                        None => {
                            *not_read.entry(fqn.split('.').next().unwrap_or(fqn).to_string()).or_default() +=
                                1;
                            continue;
                        }
                    },
                    None => fqn,
                };
                let t = tensor(&machine, folder, m, fqn, meta, &stored, &mut files, &mut chunks_seen)?;
                tensors.push((name.to_string(), t));
            }
            Some("BytesStorageMetadata") => {
                let described = match stored.get(&(fqn, None)) {
                    Some(s) => {
                        let (path, view) = blob(folder, s, &mut files, fqn)?;
                        torch_pickle::describe_stream(&path, view_slice(&files, &s.file, &view))
                            .unwrap_or_else(|_| format!("{} bytes", s.length))
                    }
                    None => "no storage".to_string(),
                };
                others.push((fqn.to_string(), described));
            }
            other => {
                return Err(bad(
                    m,
                    format!("{fqn}: unknown storage metadata {}", other.unwrap_or("(not a class)")),
                ))
            }
        }
    }
    if let Some(key) = &key {
        if tensors.is_empty() {
            return Err(Error::NoSuchKey {
                path: folder.into(),
                key: key.clone(),
                available: not_read.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
    }
    others.extend(not_read.into_iter().map(|(k, n)| (k, format!("{n} tensors (not read)"))));
    Ok(Contents { tensors, key, others })
}

/// The byte range of one stored item: its file's path, and (start, end).
fn blob(
    folder: &Path,
    s: &Stored,
    files: &mut HashMap<String, Mapped>,
    fqn: &str,
) -> Result<(PathBuf, (usize, usize))> {
    if !files.contains_key(&s.file) {
        let path = folder.join(&s.file);
        let super::MappedFile { map, bytes } = super::map_file(&path, FORMAT)?;
        files.insert(s.file.clone(), Mapped { path, map, bytes });
    }
    let mapped = &files[&s.file];
    let end = s.offset.checked_add(s.length).filter(|&e| e <= mapped.map.len() as u64).ok_or_else(|| {
        bad(
            &mapped.path,
            format!("{fqn}: bytes {}..{}+{} lie past the end of the file", s.offset, s.offset, s.length),
        )
    })?;
    Ok((mapped.path.clone(), (s.offset as usize, end as usize)))
}

fn view_slice<'f>(files: &'f HashMap<String, Mapped>, file: &str, range: &(usize, usize)) -> &'f [u8] {
    &files[file].map[range.0..range.1]
}

/// Refuses storage entries whose byte ranges in one file overlap: each
/// chunk is read from bytes of its own, so that what a checkpoint makes is
/// never more than its files hold. Sorted by file and offset, then swept.
fn disjoint_ranges(folder: &Path, stored: &HashMap<(&str, Option<Vec<i64>>), Stored>) -> Result<()> {
    let mut ranges: Vec<(&str, u64, u64, &str)> = stored
        .iter()
        .filter(|(_, s)| s.length > 0)
        .map(|((fqn, _), s)| (s.file.as_str(), s.offset, s.offset.saturating_add(s.length), *fqn))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let [(file, a0, a1, fa), (next, b0, b1, fb)] = [pair[0], pair[1]];
        if file == next && b0 < a1 {
            return Err(bad(
                &folder.join(file),
                format!("the storage of {fa} (bytes {a0}..{a1}) and of {fb} (bytes {b0}..{b1}) overlap"),
            ));
        }
    }
    Ok(())
}

/// Puts tensor `fqn` together from its chunks.
#[allow(clippy::too_many_arguments)]
fn tensor(
    machine: &Machine,
    folder: &Path,
    m: &Path,
    fqn: &str,
    meta: &Value,
    stored: &HashMap<(&str, Option<Vec<i64>>), Stored>,
    files: &mut HashMap<String, Mapped>,
    chunks_seen: &mut usize,
) -> Result<Tensor> {
    let fields = fields(machine, meta).ok_or_else(|| bad(m, format!("{fqn}: unreadable tensor metadata")))?;
    let shape = get(fields, "size")
        .and_then(|v| size(machine, v))
        .ok_or_else(|| bad(m, format!("{fqn}: no size")))?;
    // TensorProperties pickles its state as (dtype, layout, requires_grad, memory_format, pin_memory).
    let kind = get(fields, "properties")
        .and_then(|p| match object(machine, p)? {
            Object::Reduce { state: Some(state), .. } => items_of(machine, state)?.first().cloned(),
            _ => None,
        })
        .and_then(|d| match d {
            Value::Global(_, name) => dtype::parse(&name),
            _ => None,
        })
        .ok_or_else(|| bad(m, format!("{fqn}: no dtype in its properties")))?;
    let chunks = get(fields, "chunks").and_then(|c| items_of(machine, c)).unwrap_or(&[]);
    *chunks_seen += chunks.len();
    if *chunks_seen > MAX_CHUNKS {
        return Err(bad(m, format!("more than the {MAX_CHUNKS} chunks a checkpoint may list")));
    }
    let numel = elements(&shape)
        .ok_or_else(|| bad(m, format!("{fqn}: its size {shape:?} counts more elements than an i64 holds")))?;
    let element = dtype::size(kind) as u64;
    let mut boxes: Vec<(Vec<i64>, Vec<i64>)> = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let c = self::fields(machine, chunk).ok_or_else(|| bad(m, format!("{fqn}: unreadable chunk")))?;
        let (Some(offsets), Some(sizes)) = (
            get(c, "offsets").and_then(|v| size(machine, v)),
            get(c, "sizes").and_then(|v| size(machine, v)),
        ) else {
            return Err(bad(m, format!("{fqn}: a chunk without offsets and sizes")));
        };
        let inside = offsets.len() == shape.len()
            && sizes.len() == shape.len()
            && (0..shape.len()).all(|d| offsets[d].checked_add(sizes[d]).is_some_and(|end| end <= shape[d]));
        if !inside {
            return Err(bad(
                m,
                format!("{fqn}: chunk at {offsets:?} of sizes {sizes:?} lies outside the tensor's {shape:?}"),
            ));
        }
        // Its bytes: an entry, inside its file, holding at least the chunk's
        // elements, all checked before anything is allocated.
        let s = stored
            .get(&(fqn, Some(offsets.clone())))
            .ok_or_else(|| bad(m, format!("{fqn}: the chunk at {offsets:?} has no storage entry")))?;
        let (path, (start, end)) = blob(folder, s, files, fqn)?;
        let needed = elements(&sizes).and_then(|n| (n as u64).checked_mul(element));
        if needed.is_none_or(|needed| needed > (end - start) as u64) {
            return Err(bad(
                &path,
                format!(
                    "{fqn}: the chunk at {offsets:?} of sizes {sizes:?} needs more bytes than the {} its storage holds",
                    end - start
                ),
            ));
        }
        boxes.push((offsets, sizes));
    }
    if let Some((a, b)) = overlap(&shape, numel, &boxes) {
        return Err(bad(m, format!("{fqn}: chunks at {:?} and {:?} overlap", boxes[a].0, boxes[b].0)));
    }
    // Chunks inside the tensor that do not overlap cover it if their elements add up.
    let volume = boxes.iter().try_fold(0i64, |n, (_, s)| n.checked_add(elements(s)?));
    if volume != Some(numel) {
        let volume = volume.map_or("more than an i64 counts".to_string(), |v| v.to_string());
        return Err(bad(m, format!("{fqn}: its chunks cover {volume} of its {numel} elements")));
    }
    let read_chunk =
        |files: &mut HashMap<String, Mapped>, offsets: &Vec<i64>, sizes: &[i64]| -> Result<Tensor> {
            let s = stored
                .get(&(fqn, Some(offsets.clone())))
                .ok_or_else(|| bad(m, format!("{fqn}: the chunk at {offsets:?} has no storage entry")))?;
            let (path, (start, end)) = blob(folder, s, files, fqn)?;
            let mapped = &files[&s.file];
            let bytes = mapped
                .bytes
                .f_narrow(0, start as i64, (end - start) as i64)
                .map_err(|e| bad(&path, e.to_string()))?;
            let loaded = torch_pickle::read_from(&path, &bytes, &mapped.map[start..end], None)?;
            let [(_, t)] = <[(String, Tensor); 1]>::try_from(loaded.tensors)
                .map_err(|_| bad(&path, format!("{fqn}: the chunk at {offsets:?} is not one tensor")))?;
            let chunk_dtype = dtype::Dtype::of(&t).map_err(|e| bad(&path, format!("{fqn}: {e}")))?;
            if t.size() != sizes || chunk_dtype != kind {
                return Err(bad(
                    &path,
                    format!(
                        "{fqn}: the chunk at {offsets:?} holds {} {:?}, the metadata says {} {sizes:?}",
                        chunk_dtype.name(),
                        t.size(),
                        dtype::name(kind)
                    ),
                ));
            }
            Ok(t)
        };
    // One chunk holding the whole tensor: a view into its file.
    if let [(offsets, sizes)] = boxes.as_slice() {
        return read_chunk(files, offsets, sizes);
    }
    // Zeroed bytes seen as `kind` (any dtype, also those tch has no `Kind` for).
    let numel = shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d.max(0)));
    let bytes = numel
        .and_then(|n| n.checked_mul(kind.size() as i64))
        .ok_or_else(|| bad(m, format!("{fqn}: size {shape:?} overflows")))?;
    let whole = Tensor::f_zeros([bytes], (tch::Kind::Uint8, tch::Device::Cpu))
        .map_err(|e| e.to_string())
        .and_then(|b| crate::ffi::view_bytes_as(&b, kind))
        .and_then(|t| t.f_reshape(shape.as_slice()).map_err(|e| e.to_string()))
        .map_err(|e| bad(m, e))?;
    for (offsets, sizes) in &boxes {
        let chunk = read_chunk(files, offsets, sizes)?;
        let mut region = whole.shallow_clone();
        for (d, (&o, &s)) in offsets.iter().zip(sizes).enumerate() {
            region = region.f_narrow(d as i64, o, s).map_err(|e| bad(m, e.to_string()))?;
        }
        region.f_copy_(&chunk).map_err(|e| bad(m, e.to_string()))?;
    }
    Ok(whole)
}

mod chunks;
mod write;

use chunks::{elements, overlap};

pub(crate) use write::write_stream;
