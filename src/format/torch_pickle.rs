//! `torch.save` checkpoints (the zip format, PyTorch ≥ 1.6), read without
//! Python and without running anything, and written so that
//! `torch.load(weights_only=True)` reads them back.
//!
//! The archive's `*/data.pkl` is a pickle program ([`super::pickle`]); tensors
//! are persistent references to storages stored uncompressed in `*/data/KEY`.
//! The file is mapped privately and each storage becomes a tensor over its bytes
//! (no copy); tensors are views into their storage with the pickled offset,
//! sizes and strides, so tied weights stay tied and non-contiguous tensors stay
//! correct. Every offset, size and stride is checked against the storage.
//!
//! Long because the reader and the writer of one format sit together, so that
//! what one writes the other reads: the record layout, the pickle opcodes, the
//! storage keys and how views share them.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::sync::Arc;

use tch::{Kind, Tensor};

use super::pickle::{Machine, Object, Value};
use crate::dtype;
use crate::error::{Error, Result};
use crate::ffi;

const FORMAT: &str = "torch.save";
/// Keys under which training checkpoints usually keep the model's state dict.
const USUAL_KEYS: [&str; 7] =
    ["state_dict", "model", "model_state_dict", "model_ema", "module", "net", "ema"];
/// How many dict levels below the root the state dict is looked for.
const SEARCH_DEPTH: usize = 4;
/// Most dimensions a tensor may declare.
const MAX_DIMS: usize = 64;

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { path: path.into(), format: FORMAT, message: message.into() }
}

/// What [`read`] found: the state dict's tensors, which key held them, the
/// `_metadata` PyTorch keeps versions in (as JSON), and how many non-tensor
/// values were skipped.
#[derive(Debug)]
pub struct Loaded {
    /// Named tensors in the state dict's order.
    pub tensors: Vec<(String, Tensor)>,
    /// The checkpoint key (`a.b` for nested) the state dict was found under, if
    /// it was not the root.
    pub key: Option<String>,
    /// `_metadata` of the state dict, as JSON, when present.
    pub metadata_json: Option<String>,
    /// Non-tensor values left out of the state dict.
    pub skipped: usize,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        "ComplexFloatStorage" => Kind::ComplexFloat,
        "ComplexDoubleStorage" => Kind::ComplexDouble,
        _ => return None,
    })
}

fn storage_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "FloatStorage",
        Kind::Double => "DoubleStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Int64 => "LongStorage",
        Kind::Int => "IntStorage",
        Kind::Int16 => "ShortStorage",
        Kind::Int8 => "CharStorage",
        Kind::Uint8 => "ByteStorage",
        Kind::Bool => "BoolStorage",
        Kind::ComplexFloat => "ComplexFloatStorage",
        Kind::ComplexDouble => "ComplexDoubleStorage",
        _ => return None,
    })
}

/// The archive, mapped, and what is needed to find storages in it.
struct Archive<'a> {
    path: &'a Path,
    map: &'a [u8],
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
    bytes: Tensor,
    storages: HashMap<String, Tensor>,
}

impl Archive<'_> {
    /// The storage `key` as a 1-D tensor of `kind` with `numel` elements.
    fn storage(&mut self, key: &str, kind: Kind, numel: i64) -> Result<Tensor> {
        if let Some(t) = self.storages.get(key) {
            if t.kind() == kind {
                return Ok(t.shallow_clone());
            }
        }
        let path = self.path;
        let name = format!("{}data/{key}", self.prefix);
        let entry =
            self.zip.by_name(&name).map_err(|_| bad(path, format!("storage {key} is missing ({name})")))?;
        let size = entry.size();
        let expected = (numel as u64)
            .checked_mul(dtype::size(kind) as u64)
            .ok_or_else(|| bad(path, "storage size overflows"))?;
        if numel < 0 || size < expected {
            return Err(bad(
                path,
                format!("storage {key} holds {size} bytes, {numel} {} need {expected}", dtype::name(kind)),
            ));
        }
        let start = local_data_start(self.map, entry.header_start())
            .ok_or_else(|| bad(path, format!("storage {key}: bad local header")))? as i64;
        let stored = entry.compression() == zip::CompressionMethod::Stored;
        let raw = if stored && start.checked_add(size as i64).is_some_and(|end| end <= self.bytes.size()[0]) {
            self.bytes.f_narrow(0, start, size as i64).map_err(|e| bad(path, e.to_string()))?
        } else {
            // A compressed entry (someone re-zipped the file): inflate it, within bounds.
            super::check_expansion(path, FORMAT, &format!("storage {key}"), entry.compressed_size(), size)?;
            let mut data = Vec::new();
            entry.take(size).read_to_end(&mut data).map_err(|e| bad(path, format!("storage {key}: {e}")))?;
            Tensor::from_slice(&data)
        };
        let raw = raw.f_narrow(0, 0, expected as i64).map_err(|e| bad(path, e.to_string()))?;
        let aligned = start as usize % dtype::size(kind) == 0 || !stored;
        let raw = if aligned { raw } else { raw.f_detach_copy().map_err(|e| bad(path, e.to_string()))? };
        let typed = raw.f_view_dtype(kind).map_err(|e| bad(path, format!("storage {key}: {e}")))?;
        self.storages.insert(key.to_string(), typed.shallow_clone());
        Ok(typed)
    }
}

/// Where an entry's data starts: after its local header (30 bytes), name and
/// extra field, whose lengths the local header gives.
fn local_data_start(map: &[u8], header: u64) -> Option<u64> {
    let at = usize::try_from(header).ok()?;
    let local = map.get(at..at.checked_add(30)?)?;
    if local[..4] != [0x50, 0x4b, 0x03, 0x04] {
        return None;
    }
    let name = u16::from_le_bytes([local[26], local[27]]) as u64;
    let extra = u16::from_le_bytes([local[28], local[29]]) as u64;
    header.checked_add(30 + name + extra)
}

fn ints(machine: &Machine, v: &Value) -> Option<Vec<i64>> {
    ints_at(machine, v, 0)
}

fn ints_at(machine: &Machine, v: &Value, depth: usize) -> Option<Vec<i64>> {
    if depth > 2 {
        return None;
    }
    match v {
        Value::Ref(i) => match machine.objects.get(*i)? {
            Object::Tuple(items) | Object::List(items) => items
                .iter()
                .map(|x| match x {
                    Value::Int(n) => Some(*n),
                    _ => None,
                })
                .collect(),
            // torch.Size((2, 3)) pickles as a reduce of torch.Size over a tuple.
            Object::Reduce { callable: Value::Global(_, n), args, .. } if &**n == "Size" => {
                let inner = match args {
                    Value::Ref(j) => match machine.objects.get(*j)? {
                        Object::Tuple(t) => t.first()?.clone(),
                        _ => return None,
                    },
                    _ => return None,
                };
                ints_at(machine, &inner, depth + 1)
            }
            _ => None,
        },
        _ => None,
    }
}

fn tuple_items<'m>(machine: &'m Machine, v: &Value) -> Option<&'m [Value]> {
    match v {
        Value::Ref(i) => match machine.objects.get(*i)? {
            Object::Tuple(items) | Object::List(items) => Some(items),
            _ => None,
        },
        _ => None,
    }
}

/// The name of the allow-listed callable a value was reduced from, if it was.
fn reduced_by<'m>(machine: &'m Machine, v: &Value) -> Option<(&'m str, &'m Value)> {
    match v {
        Value::Ref(i) => match machine.objects.get(*i)? {
            Object::Reduce { callable: Value::Global(_, name), args, .. } => Some((name, args)),
            _ => None,
        },
        _ => None,
    }
}

fn is_tensor(machine: &Machine, v: &Value) -> bool {
    matches!(
        reduced_by(machine, v),
        Some((
            "_rebuild_tensor"
                | "_rebuild_tensor_v2"
                | "_rebuild_tensor_v3"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
                | "_rebuild_from_type_v2"
                | "Parameter",
            _
        ))
    )
}

/// Rebuilds the tensor `v` describes, as a view into its storage.
fn tensor(machine: &Machine, archive: &mut Archive, v: &Value, depth: usize) -> Result<Tensor> {
    let path = archive.path;
    let (callable, args) = reduced_by(machine, v).ok_or_else(|| bad(path, "expected a tensor"))?;
    let args = tuple_items(machine, args)
        .ok_or_else(|| bad(path, format!("{callable}: arguments are not a tuple")))?;
    if depth > 4 {
        return Err(bad(path, "tensor rebuilt from a tensor rebuilt from … too deep"));
    }
    match callable {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" | "Parameter" => {
            let data = args.first().ok_or_else(|| bad(path, "parameter without data"))?;
            tensor(machine, archive, data, depth + 1)
        }
        "_rebuild_from_type_v2" => {
            // (func, type, args, state): func(*args), then a subclass we ignore.
            let (func, inner) = (args.first(), args.get(2));
            let (Some(Value::Global(_, name)), Some(inner)) = (func, inner) else {
                return Err(bad(path, "_rebuild_from_type_v2 without a function"));
            };
            let inner_args = inner.clone();
            let items = tuple_items(machine, &inner_args)
                .ok_or_else(|| bad(path, "_rebuild_from_type_v2 arguments"))?;
            rebuild(machine, archive, name, items)
        }
        name => rebuild(machine, archive, name, args),
    }
}

/// `_rebuild_tensor*(storage, offset, size, stride, ...)`.
fn rebuild(machine: &Machine, archive: &mut Archive, callable: &str, args: &[Value]) -> Result<Tensor> {
    let path = archive.path;
    if !matches!(callable, "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") {
        return Err(bad(path, format!("{callable} does not make a dense tensor (sparse, quantized and subclass tensors are not supported)")));
    }
    let Some(Value::Persistent(pid)) = args.first() else {
        return Err(bad(path, "tensor without a storage reference"));
    };
    let offset = match args.get(1) {
        Some(Value::Int(n)) => *n,
        _ => return Err(bad(path, "tensor without a storage offset")),
    };
    let size = args
        .get(2)
        .and_then(|v| ints(machine, v))
        .ok_or_else(|| bad(path, "tensor sizes are not integers"))?;
    let stride = args
        .get(3)
        .and_then(|v| ints(machine, v))
        .ok_or_else(|| bad(path, "tensor strides are not integers"))?;
    let pid = machine.persistent.get(*pid).ok_or_else(|| bad(path, "dangling storage reference"))?;
    let fields = tuple_items(machine, pid).ok_or_else(|| bad(path, "storage reference is not a tuple"))?;
    let (
        Some(Value::Str(tag)),
        Some(Value::Global(_, class)),
        Some(Value::Str(key)),
        Some(Value::Int(numel)),
    ) = (fields.first(), fields.get(1), fields.get(2), fields.get(4))
    else {
        return Err(bad(path, "storage reference is not ('storage', type, key, location, numel)"));
    };
    if &**tag != "storage" {
        return Err(bad(path, format!("persistent reference of kind {tag:?}")));
    }
    let mut kind = storage_kind(class).ok_or_else(|| bad(path, format!("unknown storage type {class}")))?;
    let mut numel = *numel;
    if callable == "_rebuild_tensor_v3" {
        // (storage, offset, size, stride, requires_grad, hooks, dtype, …) over untyped bytes.
        if let Some(Value::Global(_, name)) = args.get(6) {
            let typed = dtype::parse(name).ok_or_else(|| bad(path, format!("unknown dtype torch.{name}")))?;
            if kind == Kind::Uint8 && typed != Kind::Uint8 {
                numel /= dtype::size(typed) as i64;
            }
            kind = typed;
        }
    }
    if size.len() != stride.len() || size.len() > MAX_DIMS {
        return Err(bad(path, format!("tensor with {} sizes and {} strides", size.len(), stride.len())));
    }
    if offset < 0 || size.iter().chain(&stride).any(|&d| d < 0) {
        return Err(bad(path, "negative offset, size or stride"));
    }
    if super::overlapping(&size, &stride) {
        return Err(bad(
            path,
            format!(
                "a tensor view of sizes {size:?}, strides {stride:?} reaches elements twice (an expanded \
                 tensor?): refused; save a contiguous copy"
            ),
        ));
    }
    // The last element the view reaches must lie inside the storage.
    let empty = size.contains(&0);
    if !empty {
        let reach = size
            .iter()
            .zip(&stride)
            .try_fold(offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
        match reach {
            Some(last) if last < numel => {}
            _ => {
                return Err(bad(
                    path,
                    format!("tensor of sizes {size:?}, strides {stride:?} at offset {offset} reaches past its storage of {numel} elements"),
                ))
            }
        }
    }
    let storage = archive.storage(key, kind, numel)?;
    // as_strided counts its offset from the start of the underlying buffer (the
    // whole mapped file), not from the storage view.
    let offset = storage.storage_offset() + offset;
    storage
        .f_as_strided(size.as_slice(), stride.as_slice(), Some(offset))
        .map_err(|e| bad(path, e.to_string()))
}

/// A dict's items and attributes.
type DictParts<'m> = (&'m [(Value, Value)], &'m [(Value, Value)]);

fn dict_items<'m>(machine: &'m Machine, v: &Value) -> Option<DictParts<'m>> {
    match v {
        Value::Ref(i) => match machine.objects.get(*i)? {
            Object::Dict(items, attrs) => Some((items, attrs)),
            _ => None,
        },
        _ => None,
    }
}

fn count_tensors(machine: &Machine, v: &Value) -> usize {
    dict_items(machine, v).map_or(0, |(items, _)| items.iter().filter(|(_, x)| is_tensor(machine, x)).count())
}

fn key_text(k: &Value) -> Option<&str> {
    match k {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

/// Finds the state dict: under `key` if given, else the root if it holds
/// tensors, else the one dict of tensors found below it (up to four levels, as
/// in `{'checkpoint': {'model': {'state_dict': …}}}`).
fn select(
    machine: &Machine,
    root: &Value,
    key: Option<&str>,
    path: &Path,
) -> Result<(Value, Option<String>)> {
    if let Some(key) = key {
        let mut at = root.clone();
        let mut rest = key;
        while !rest.is_empty() {
            let (items, _) = dict_items(machine, &at)
                .ok_or_else(|| bad(path, format!("key {key}: {rest:?} is not inside a dict")))?;
            // The longest key that matches, so keys holding dots work too.
            let found = items
                .iter()
                .filter_map(|(k, v)| key_text(k).map(|k| (k, v)))
                .filter(|(k, _)| rest == *k || rest.starts_with(&format!("{k}.")))
                .max_by_key(|(k, _)| k.len());
            let Some((k, v)) = found else {
                let keys: Vec<&str> = items.iter().filter_map(|(k, _)| key_text(k)).take(20).collect();
                return Err(Error::NoSuchKey {
                    path: path.into(),
                    key: key.to_string(),
                    available: keys.join(", "),
                });
            };
            rest = rest[k.len()..].trim_start_matches('.');
            at = v.clone();
        }
        if count_tensors(machine, &at) == 0 && !is_tensor(machine, &at) {
            return Err(bad(path, format!("key {key} holds no tensors")));
        }
        return Ok((at, Some(key.to_string())));
    }
    if is_tensor(machine, root) || count_tensors(machine, root) > 0 {
        return Ok((root.clone(), None));
    }
    // Dicts holding tensors, up to SEARCH_DEPTH levels down (not inside each other).
    let mut found: Vec<(String, Value)> = Vec::new();
    let mut pending = std::collections::VecDeque::from([(String::new(), root.clone(), 0)]);
    let mut seen = std::collections::HashSet::new();
    while let Some((at, value, depth)) = pending.pop_front() {
        let Some((items, _)) = dict_items(machine, &value) else { continue };
        if let Value::Ref(i) = value {
            if !seen.insert(i) {
                continue;
            }
        }
        for (k, v) in items {
            let Some(k) = key_text(k) else { continue };
            let name = if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
            if count_tensors(machine, v) > 0 {
                found.push((name, v.clone()));
            } else if depth + 1 < SEARCH_DEPTH {
                pending.push_back((name, v.clone(), depth + 1));
            }
        }
    }
    match found.len() {
        0 => Err(bad(path, "no tensors found in the checkpoint")),
        1 => {
            let (k, v) = found.remove(0);
            Ok((v, Some(k)))
        }
        _ => {
            let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
            let usual = keys.iter().filter(|k| USUAL_KEYS.contains(k)).count();
            Err(Error::AmbiguousKey {
                path: path.into(),
                candidates: keys.join(", "),
                hint: if usual > 0 {
                    "state_dict, model and model_ema are the usual ones".into()
                } else {
                    String::new()
                },
            })
        }
    }
}

fn to_json(machine: &Machine, v: &Value, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    if depth > 16 {
        return J::Null;
    }
    match v {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(n) => J::from(*n),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.to_string()),
        Value::Ref(_) => match dict_items(machine, v) {
            Some((items, _)) => J::Object(
                items
                    .iter()
                    .filter_map(|(k, x)| key_text(k).map(|k| (k.to_string(), to_json(machine, x, depth + 1))))
                    .collect(),
            ),
            None => J::Null,
        },
        _ => J::Null,
    }
}

/// Reads a `torch.save` zip archive's state dict (`key` picks it inside a checkpoint dict).
pub fn read(path: &Path, key: Option<&str>) -> Result<Loaded> {
    let file = crate::files::open_regular(path)?;
    // SAFETY: a private (copy-on-write) map, as for safetensors: writes into the
    // tensors never reach the file; the map lives as long as any tensor over it.
    let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
        .map_err(|source| Error::Io { path: path.into(), source })?;
    let (ptr, len) = (map.as_mut_ptr(), map.len());
    let map = Arc::new(map);
    // SAFETY: `ptr .. ptr + len` is the whole map, kept alive by the `Arc` the tensor owns.
    let bytes = unsafe { ffi::tensor_over_bytes(Arc::clone(&map), ptr, len) }.map_err(|m| bad(path, m))?;
    let view: &[u8] = &map;
    let mut zip = zip::ZipArchive::new(Cursor::new(view)).map_err(|e| bad(path, e.to_string()))?;
    super::check_unique_members(path, FORMAT, &mut zip)?;
    let pickle_name = zip
        .file_names()
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .min_by_key(|n| n.len())
        .map(str::to_string)
        .ok_or_else(|| bad(path, "no data.pkl in the archive"))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut order) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut text = String::new();
        let _ = (&mut order).take(16).read_to_string(&mut text);
        if text.trim() == "big" {
            return Err(bad(path, "big-endian checkpoints are not supported"));
        }
    }
    let mut program = Vec::new();
    {
        let entry = zip.by_name(&pickle_name).map_err(|e| bad(path, e.to_string()))?;
        let declared = entry.size();
        super::check_expansion(path, FORMAT, "data.pkl", entry.compressed_size(), declared)?;
        entry.take(declared).read_to_end(&mut program).map_err(|e| bad(path, format!("data.pkl: {e}")))?;
    }
    let mut machine = Machine::default();
    let root = machine.run(&program).map_err(|e| bad(path, e.to_string()))?;
    let (chosen, key) = select(&machine, &root, key, path)?;
    let mut archive = Archive { path, map: view, zip, prefix, bytes, storages: HashMap::new() };
    if is_tensor(&machine, &chosen) {
        let name = path.file_stem().map_or("tensor".into(), |s| s.to_string_lossy().into_owned());
        let t = tensor(&machine, &mut archive, &chosen, 0)?;
        return Ok(Loaded { tensors: vec![(name, t)], key, metadata_json: None, skipped: 0 });
    }
    let (items, attrs) =
        dict_items(&machine, &chosen).ok_or_else(|| bad(path, "the state dict is not a dict"))?;
    super::check_entries(path, "torch.save checkpoint", items.len())?;
    let mut tensors = Vec::with_capacity(items.len());
    let mut skipped = 0;
    for (k, v) in items {
        match (key_text(k), is_tensor(&machine, v)) {
            (Some(name), true) => {
                let t = tensor(&machine, &mut archive, v, 0).map_err(|e| match e {
                    Error::Format { path, format, message } => {
                        Error::Format { path, format, message: format!("tensor {name}: {message}") }
                    }
                    other => other,
                })?;
                tensors.push((name.to_string(), t));
            }
            _ => skipped += 1,
        }
    }
    let metadata_json = attrs
        .iter()
        .find(|(k, _)| key_text(k) == Some("_metadata"))
        .map(|(_, v)| to_json(&machine, v, 0).to_string());
    Ok(Loaded { tensors, key, metadata_json, skipped })
}

/// Pickle opcodes, as the writer emits them.
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn op(&mut self, op: u8) {
        self.out.push(op);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, n: i64) {
        if (0..256).contains(&n) {
            self.out.extend_from_slice(&[b'K', n as u8]);
        } else if (0..65536).contains(&n) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(n as u16).to_le_bytes());
        } else if i32::try_from(n).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(n as i32).to_le_bytes());
        } else {
            self.out.extend_from_slice(&[0x8a, 8]);
            self.out.extend_from_slice(&n.to_le_bytes());
        }
    }
    fn ints(&mut self, values: &[i64]) {
        self.op(b'(');
        for &v in values {
            self.int(v);
        }
        self.op(b't');
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
    fn json(&mut self, v: &serde_json::Value) {
        use serde_json::Value as J;
        match v {
            J::Null => self.op(b'N'),
            J::Bool(b) => self.op(if *b { 0x88 } else { 0x89 }),
            J::Number(n) => match n.as_i64() {
                Some(i) => self.int(i),
                None => {
                    self.op(b'G');
                    self.out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_be_bytes());
                }
            },
            J::String(s) => self.str(s),
            J::Array(items) => {
                self.op(b']');
                self.op(b'(');
                for item in items {
                    self.json(item);
                }
                self.op(b'e');
            }
            J::Object(map) => {
                self.ordered_dict();
                self.op(b'(');
                for (k, item) in map {
                    self.str(k);
                    self.json(item);
                }
                self.op(b'u');
            }
        }
    }
}

/// Writes `tensors` as a `torch.save` zip archive of an `OrderedDict` state
/// dict, with `_metadata` from `metadata_json` when given (directly: callers
/// wanting atomicity go through [`crate::files::write_atomically`]). Each tensor gets a
/// storage of its own, contiguous.
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata_json: Option<&str>) -> Result<()> {
    write_stream(path, &super::outgoing(tensors), metadata_json, &[], &mut |i| {
        Ok(tensors[i].1.shallow_clone())
    })
}

/// Writes a `torch.save` archive of the `outgoing` tensors, in that order,
/// each made by `produce` when its storage record's turn comes: the pickle
/// first (dtypes and shapes are known), then one storage at a time.
/// `same_as[i] = Some(k)` (k < i) makes tensor `i` share tensor `k`'s storage,
/// as tied weights do in PyTorch: written once, `produce` not asked for `i`.
pub(crate) fn write_stream(
    path: &Path,
    outgoing: &[super::Outgoing],
    metadata_json: Option<&str>,
    same_as: &[Option<usize>],
    produce: super::Produce,
) -> Result<()> {
    let shared = |i: usize| same_as.get(i).copied().flatten().filter(|&k| k < i);
    let io = |source| Error::Io { path: path.into(), source };
    let classes = super::check_types(path, FORMAT, outgoing, storage_name)?;
    let mut p = Pickler { out: vec![0x80, 2] };
    p.ordered_dict();
    let mut storage_of: Vec<usize> = Vec::with_capacity(outgoing.len());
    for (chunk, chunk_classes) in outgoing.chunks(1000).zip(classes.chunks(1000)) {
        p.op(b'(');
        for (o, class) in chunk.iter().zip(chunk_classes) {
            let i = storage_of.len();
            let storage = shared(i).map_or(i, |k| storage_of[k]);
            storage_of.push(storage);
            let (name, class, size) = (&o.name, *class, o.shape.clone());
            let mut stride = vec![1i64; size.len()];
            for d in (0..size.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * size[d + 1].max(1);
            }
            p.str(name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.op(b'(');
            p.op(b'(');
            p.str("storage");
            p.global("torch", class);
            p.str(&storage.to_string());
            p.str("cpu");
            p.int(size.iter().product::<i64>());
            p.op(b't');
            p.op(b'Q');
            p.int(0);
            p.ints(&size);
            p.ints(&stride);
            p.op(0x89);
            p.ordered_dict();
            p.op(b't');
            p.op(b'R');
        }
        p.op(b'u');
    }
    if let Some(json) = metadata_json {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(json) {
            p.op(b'}');
            p.str("_metadata");
            p.json(&value);
            p.op(b's');
            p.op(b'b');
        }
    }
    p.op(b'.');

    let file = File::create(path).map_err(io)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let total: usize = outgoing.iter().map(super::Outgoing::bytes).sum();
    let options = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(total >= u32::MAX as usize);
    let zerr = |e: zip::result::ZipError| bad(path, e.to_string());
    zip.start_file_aligned("archive/data.pkl", options, 64).map_err(zerr)?;
    zip.write_all(&p.out).map_err(io)?;
    zip.start_file_aligned("archive/byteorder", options, 64).map_err(zerr)?;
    zip.write_all(b"little").map_err(io)?;
    for i in (0..outgoing.len()).filter(|&i| shared(i).is_none()) {
        let tensor = super::produce_checked(path, FORMAT, outgoing, i, produce)?;
        zip.start_file_aligned(format!("archive/data/{i}"), options, 64).map_err(zerr)?;
        zip.write_all(super::bytes_of(&tensor)).map_err(io)?;
    }
    zip.start_file_aligned("archive/version", options, 64).map_err(zerr)?;
    zip.write_all(b"3\n").map_err(io)?;
    let mut inner = zip.finish().map_err(zerr)?;
    inner.flush().map_err(io)
}

/// Metadata key under which a checkpoint keeps the `_metadata` JSON.
pub const METADATA_KEY: &str = "torch._metadata";

/// The checkpoint metadata a read gives: `_metadata` as JSON, when present.
pub fn metadata_of(loaded: &Loaded) -> BTreeMap<String, String> {
    loaded.metadata_json.iter().map(|json| (METADATA_KEY.to_string(), json.clone())).collect()
}
