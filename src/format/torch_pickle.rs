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

use tch::{Kind, Tensor};

use super::pickle::{Machine, Object, Value};
use crate::dtype::{self, Dtype};
use crate::error::{Error, Result};

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
    /// The checkpoint dict's other entries, each described (`args`:
    /// `argparse.Namespace (not read)`, `epoch`: `12`), in the file's order.
    pub others: Vec<(String, String)>,
}

/// The dtype of a storage class: `torch.save`'s typed storages
/// (`FloatStorage`), TorchScript's (`<c10 name>Storage`: `UInt16Storage`,
/// `Float8_e4m3fnStorage`), and `UntypedStorage` (bytes, typed by the
/// `_rebuild_tensor_v3` that uses it). Quantized storages are not read.
pub(super) fn storage_kind(name: &str) -> Option<Dtype> {
    if name == "UntypedStorage" {
        return Some(Dtype::UInt8);
    }
    let stem = name.strip_suffix("Storage")?;
    let dtype = Dtype::ALL.iter().copied().find(|d| d.c10_name() == stem)?;
    let quantized =
        matches!(dtype, Dtype::QInt8 | Dtype::QUInt8 | Dtype::QInt32 | Dtype::QUInt4x2 | Dtype::QUInt2x4);
    (!quantized).then_some(dtype)
}

/// TorchScript's storage class of `dtype` (`FloatStorage`, `UInt16Storage`).
pub(super) fn storage_name(dtype: Dtype) -> Option<String> {
    storage_kind(&format!("{}Storage", dtype.c10_name()))?;
    Some(format!("{}Storage", dtype.c10_name()))
}

/// Whether `torch.save` writes `dtype` as `_rebuild_tensor_v3` over an
/// `UntypedStorage` (`torch.storage._new_dtypes()`): the dtypes that have no
/// legacy typed storage class.
pub(super) fn saved_untyped(dtype: Dtype) -> bool {
    !matches!(
        dtype,
        Dtype::Float64
            | Dtype::Float32
            | Dtype::Float16
            | Dtype::Int64
            | Dtype::Int32
            | Dtype::Int16
            | Dtype::Int8
            | Dtype::UInt8
            | Dtype::Bool
            | Dtype::BFloat16
            | Dtype::Complex128
            | Dtype::Complex64
    )
}

/// The archive, mapped, and what is needed to find storages in it.
pub(super) struct Archive<'a> {
    pub(super) path: &'a Path,
    pub(super) map: &'a [u8],
    pub(super) records: Records<'a>,
    pub(super) bytes: Tensor,
    pub(super) storages: HashMap<String, Tensor>,
    /// The file's pages behind the records read so far are handed back as
    /// the reader goes (reading a record's header maps the pages around it).
    pub(super) releaser: super::PageReleaser,
    /// Up to where in the file they were.
    pub(super) released: usize,
    /// The type and element count of the first reference to each storage key,
    /// in pickle order: the storage's size (and, for `torch.load`, its dtype).
    pub(super) first: HashMap<String, (Dtype, i64)>,
    /// Which loader's reading to follow where the two differ.
    pub(super) loader: Loader,
    /// The arena indices of the tensors rebuilt so far.
    rebuilt: std::collections::HashSet<usize>,
    /// Whether every storage read is kept in `storages` as a tensor (a
    /// TorchScript archive's rewrite needs them); otherwise the common record
    /// (stored, aligned) makes no tensor of its own: each view is made
    /// straight over the file's bytes.
    pub(super) keep_storages: bool,
}

/// A storage as [`Archive::storage`] finds it.
enum Stored {
    /// Elements of the asked type in the archive's `bytes`, from this index
    /// (the record holds the elements asked for: checked).
    At(i64),
    /// A tensor of its own (a compressed, unaligned or legacy-view record).
    Tensor(Tensor),
}

/// A tensor as its pickle describes it, checked against its storage's size
/// and type, before any libtorch object is made: the reader describes every
/// tensor while the pickle's arena is alive, drops the arena, then makes them.
pub(super) struct View {
    key: Box<str>,
    kind: Dtype,
    /// Elements of `kind` the storage holds.
    numel: i64,
    /// An old legacy view of a root storage: (start, length) in elements.
    root: Option<(i64, i64)>,
    size: Box<[i64]>,
    stride: Box<[i64]>,
    offset: i64,
}

/// The two readers of PyTorch's archives, which read a storage that several
/// references type differently in two ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Loader {
    /// Python's `torch.load`: a storage takes the type of its first reference,
    /// and a later `_rebuild_tensor_v2` view of it has that type whatever its
    /// own reference names; its record must hold exactly the bytes that first
    /// reference says.
    Python,
    /// libtorch's unpickler (`torch.jit.load`): every reference to a storage
    /// must name one type (its writer names one, and its reader is not
    /// defined otherwise); the record must hold at least the bytes of the
    /// first reference.
    Libtorch,
}

/// Where the storages' bytes are.
pub(super) enum Records<'a> {
    /// The zip format: `PREFIX/data/KEY` members.
    Zip { zip: zip::ZipArchive<Cursor<&'a [u8]>>, prefix: String },
    /// The legacy format: after the pickles, each storage as an 8-byte element
    /// count and its bytes, in the order of the key list; (offset of the bytes,
    /// their length) by key.
    Legacy(HashMap<String, (u64, u64)>),
}

impl<'a> Archive<'a> {
    pub(super) fn new(path: &'a Path, map: &'a [u8], records: Records<'a>, bytes: Tensor) -> Self {
        Self {
            path,
            map,
            records,
            bytes,
            storages: HashMap::new(),
            releaser: Default::default(),
            released: 0,
            first: HashMap::new(),
            loader: Loader::Python,
            rebuilt: Default::default(),
            keep_storages: false,
        }
    }

    /// Rebuilds, and drops, every tensor of the pickle not read yet: PyTorch's
    /// loaders rebuild every tensor a file holds — one under a key set twice,
    /// an optimizer's state, an attribute that is no parameter — and a file
    /// with one they cannot rebuild does not load, so it is refused here too.
    pub(super) fn check_unread_tensors(&mut self, machine: &Machine) -> Result<()> {
        // The storages only these tensors view are not among those read.
        let read: std::collections::HashSet<String> = self.storages.keys().cloned().collect();
        let checked = self.rebuild_unread(machine);
        self.storages.retain(|key, _| read.contains(key));
        checked
    }

    fn rebuild_unread(&mut self, machine: &Machine) -> Result<()> {
        for (i, object) in machine.objects.iter().enumerate() {
            let Object::Reduce { callable: Value::Global(module, name), .. } = object else { continue };
            if &**module != "torch._utils"
                || !name.starts_with("_rebuild_tensor")
                || self.rebuilt.contains(&i)
            {
                continue;
            }
            let _checked = tensor(machine, self, &Value::Ref(i), 0).map_err(|e| match e {
                Error::Format { path, format, message } => Error::Format {
                    path,
                    format,
                    message: format!("a tensor the file holds besides those read: {message}"),
                },
                other => other,
            })?;
        }
        Ok(())
    }

    /// Checks every storage reference of the pickle `machine` ran as `loader`
    /// checks them while unpickling, whether or not its tensor is read here:
    /// a known type, a device location, a record that exists under the
    /// archive's folder with the size the key's first reference says.
    pub(super) fn check_references(&mut self, machine: &Machine, loader: Loader) -> Result<()> {
        let path = self.path;
        self.loader = loader;
        for pid in &machine.persistent {
            let fields = tuple_items(machine, pid).unwrap_or(&[]);
            let (
                Some(Value::Str(tag)),
                Some(Value::Global(_, class)),
                Some(key),
                Some(Value::Str(location)),
                Some(Value::Int(numel)),
            ) = (fields.first(), fields.get(1), fields.get(2), fields.get(3), fields.get(4))
            else {
                return Err(bad(path, "a storage reference is not ('storage', type, key, location, numel)"));
            };
            let key = key_text(key).ok_or_else(|| bad(path, "a storage key is not a string"))?;
            if &**tag != "storage" {
                return Err(bad(path, format!("persistent reference of kind {tag:?}")));
            }
            let kind =
                storage_kind(class).ok_or_else(|| bad(path, format!("unknown storage type {class}")))?;
            if loader == Loader::Python && self.is_legacy() && &**class == "UntypedStorage" {
                return Err(bad(
                    path,
                    format!("storage {key}: an untyped storage in the legacy format, which torch.load cannot read"),
                ));
            }
            if !is_device(location) {
                return Err(bad(path, format!("storage {key}: location {location:?} is not a device")));
            }
            if *numel < 0 {
                return Err(bad(path, format!("storage {key}: {numel} elements")));
            }
            if let Some(&(first, _)) = self.first.get(key) {
                if loader == Loader::Libtorch && first != kind {
                    // libtorch writes one type for every view of a storage (and
                    // cannot load what it wrote of views of two dtypes): a file
                    // that types one storage twice has no reading to follow.
                    return Err(bad(
                        path,
                        format!(
                            "storage {key} is typed both {} and {}: libtorch writes no such archive, and \
                             what it would read from it is not defined",
                            dtype::name(first),
                            dtype::name(kind)
                        ),
                    ));
                }
                continue;
            }
            self.first.insert(key.to_string(), (kind, *numel));
        }
        let Records::Zip { zip, prefix } = &mut self.records else { return Ok(()) };
        let mut records: HashMap<String, u64> = HashMap::new();
        let data = format!("{prefix}data/");
        for i in 0..zip.len() {
            if let Ok(member) = zip.by_index_raw(i) {
                if let Some(key) = member.name().strip_prefix(data.as_str()) {
                    records.insert(key.to_string(), member.size());
                }
            }
        }
        for (key, &(kind, numel)) in &self.first {
            let wanted = (numel as u64)
                .checked_mul(dtype::size(kind) as u64)
                .ok_or_else(|| bad(path, format!("storage {key}: its size overflows")))?;
            let Some(&size) = records.get(key) else {
                return Err(bad(path, format!("storage {key} is missing ({data}{key})")));
            };
            let fits = match loader {
                Loader::Python => size == wanted,
                Loader::Libtorch => size >= wanted,
            };
            if !fits {
                return Err(bad(
                    path,
                    format!(
                        "storage {key} ({data}{key}) holds {size} bytes; its first reference says {numel} {} \
                         ({wanted} bytes)",
                        dtype::name(kind)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn is_legacy(&self) -> bool {
        matches!(self.records, Records::Legacy(_))
    }

    /// The pages of the file before `at` (less a margin) are no longer needed.
    fn passed(&mut self, at: usize) {
        const LAG: usize = 1 << 20;
        if at > self.released + 8 * LAG && at <= self.map.len() {
            let base = self.map.as_ptr() as usize;
            let whole = base..base + self.map.len();
            self.releaser.release_bytes(base + self.released..base + at - LAG, whole);
            self.releaser.flush();
            self.released = at - LAG;
        }
    }

    /// The storage `key` as a 1-D tensor of `kind` with `numel` elements.
    fn storage_tensor(&mut self, key: &str, kind: Dtype, numel: i64) -> Result<Tensor> {
        match self.storage(key, kind, numel)? {
            Stored::At(at) => crate::ffi::strided_view(&self.bytes, kind, &[numel], &[1], at)
                .map_err(|e| bad(self.path, format!("storage {key}: {e}"))),
            Stored::Tensor(t) => Ok(t),
        }
    }

    /// The tensor `view` describes, over its storage.
    pub(super) fn make(&mut self, view: &View) -> Result<Tensor> {
        let path = self.path;
        let (key, kind) = (&*view.key, view.kind);
        let (base, at) = match view.root {
            Some((start, len)) => {
                let root = self.storage_tensor(key, kind, start.saturating_add(len))?;
                let storage = root.f_narrow(0, start, len).map_err(|e| bad(path, e.to_string()))?;
                let at = storage.storage_offset();
                (Some(storage), at)
            }
            None => match self.storage(key, kind, view.numel)? {
                Stored::At(at) => (None, at),
                Stored::Tensor(storage) => {
                    let at = storage.storage_offset();
                    (Some(storage), at)
                }
            },
        };
        // as_strided counts its offset from the start of the underlying buffer
        // (the whole mapped file), not from the storage view.
        let base = base.as_ref().unwrap_or(&self.bytes);
        crate::ffi::strided_view(base, kind, &view.size, &view.stride, at + view.offset)
            .map_err(|e| bad(path, e))
    }

    /// The storage `key` as `numel` elements of `kind`.
    fn storage(&mut self, key: &str, kind: Dtype, numel: i64) -> Result<Stored> {
        if let Some(t) = self.storages.get(key) {
            if Dtype::of(t).ok() == Some(kind) {
                return Ok(Stored::Tensor(t.shallow_clone()));
            }
        }
        let path = self.path;
        let (zip, prefix) = match &mut self.records {
            Records::Zip { zip, prefix } => (zip, prefix.as_str()),
            Records::Legacy(records) => {
                let &(start, len) =
                    records.get(key).ok_or_else(|| bad(path, format!("storage {key} is missing")))?;
                let stored = legacy_storage(path, &self.bytes, key, kind, numel, start, len)?;
                return match stored {
                    Stored::At(at) if self.keep_storages => {
                        let t = crate::ffi::strided_view(
                            &self.bytes,
                            kind,
                            &[len as i64 / kind.size() as i64],
                            &[1],
                            at,
                        )
                        .map_err(|e| bad(path, format!("storage {key}: {e}")))?;
                        self.storages.insert(key.to_string(), t.shallow_clone());
                        Ok(Stored::Tensor(t))
                    }
                    Stored::Tensor(t) => {
                        self.storages.insert(key.to_string(), t.shallow_clone());
                        Ok(Stored::Tensor(t))
                    }
                    at => Ok(at),
                };
            }
        };
        let name = format!("{prefix}data/{key}");
        let entry =
            zip.by_name(&name).map_err(|_| bad(path, format!("storage {key} is missing ({name})")))?;
        let size = entry.size();
        let expected = (numel as u64)
            .checked_mul(dtype::size(kind) as u64)
            .ok_or_else(|| bad(path, "storage size overflows"))?;
        if numel < 0 || size < expected {
            return Err(bad(
                path,
                format!(
                    "storage {key} ({name}) holds {size} bytes, {numel} {} need {expected}",
                    dtype::name(kind)
                ),
            ));
        }
        let start = local_data_start(self.map, entry.header_start())
            .ok_or_else(|| bad(path, format!("storage {key}: bad local header")))? as i64;
        let stored = entry.compression() == zip::CompressionMethod::Stored;
        let element = dtype::size(kind) as i64;
        let in_file = start.checked_add(size as i64).is_some_and(|end| end <= self.bytes.size()[0]);
        // `bytes` may itself be a slice of a larger buffer (a file holding
        // several archives): views count from the buffer's start.
        let at = self.bytes.storage_offset() + start;
        if stored && in_file && at % element == 0 {
            // The common case: the record's elements lie in the file's bytes.
            drop(entry);
            self.passed(start as usize);
            if !self.keep_storages {
                return Ok(Stored::At(at / element));
            }
            let typed = crate::ffi::strided_view(&self.bytes, kind, &[numel], &[1], at / element)
                .map_err(|e| bad(path, format!("storage {key}: {e}")))?;
            self.storages.insert(key.to_string(), typed.shallow_clone());
            return Ok(Stored::Tensor(typed));
        }
        let raw = if stored && in_file {
            self.bytes.f_narrow(0, start, size as i64).map_err(|e| bad(path, e.to_string()))?
        } else {
            // A compressed entry (someone re-zipped the file): inflate it, within bounds.
            super::check_expansion(path, FORMAT, &format!("storage {key}"), entry.compressed_size(), size)?;
            let mut data = Vec::new();
            entry.take(size).read_to_end(&mut data).map_err(|e| bad(path, format!("storage {key}: {e}")))?;
            Tensor::from_slice(&data)
        };
        let raw = raw.f_narrow(0, 0, expected as i64).map_err(|e| bad(path, e.to_string()))?;
        // Aligned in the buffer the view reads (a blob may start anywhere in its file).
        let aligned = raw.storage_offset() as usize % dtype::size(kind) == 0 || !stored;
        let raw = if aligned { raw } else { raw.f_detach_copy().map_err(|e| bad(path, e.to_string()))? };
        let typed =
            crate::ffi::view_bytes_as(&raw, kind).map_err(|e| bad(path, format!("storage {key}: {e}")))?;
        self.storages.insert(key.to_string(), typed.shallow_clone());
        Ok(Stored::Tensor(typed))
    }
}

/// A storage of the legacy format: `len` bytes at `start` in the mapped file,
/// seen as elements of `kind` (checked to hold the `numel` the tensors need).
fn legacy_storage(
    path: &Path,
    bytes: &Tensor,
    key: &str,
    kind: Dtype,
    numel: i64,
    start: u64,
    len: u64,
) -> Result<Stored> {
    let size = kind.size() as u64;
    let count = len / size;
    if numel < 0 || count < numel as u64 {
        return Err(bad(path, format!("storage {key} holds {count} elements, its tensors need {numel}")));
    }
    let len = count * size;
    let end = start.checked_add(len).ok_or_else(|| bad(path, "storage size overflows"))?;
    if end > bytes.size()[0] as u64 {
        return Err(bad(path, format!("storage {key} runs past the end of the file")));
    }
    let at = bytes.storage_offset() as u64 + start;
    if at % size == 0 {
        return Ok(Stored::At((at / size) as i64));
    }
    let raw = bytes.f_narrow(0, start as i64, len as i64).map_err(|e| bad(path, e.to_string()))?;
    let raw = raw.f_detach_copy().map_err(|e| bad(path, e.to_string()))?;
    crate::ffi::view_bytes_as(&raw, kind)
        .map(Stored::Tensor)
        .map_err(|e| bad(path, format!("storage {key}: {e}")))
}

/// Whether `location` names a device as `torch.device` parses one (`cpu`,
/// `cuda:1`): PyTorch's loaders refuse a storage whose location does not.
fn is_device(location: &str) -> bool {
    const TYPES: [&str; 14] = [
        "cpu",
        "cuda",
        "mps",
        "xpu",
        "meta",
        "hpu",
        "mtia",
        "xla",
        "ipu",
        "lazy",
        "vulkan",
        "ve",
        "fpga",
        "privateuseone",
    ];
    let (kind, index) = match location.split_once(':') {
        Some((kind, index)) => (kind, Some(index)),
        None => (location, None),
    };
    TYPES.contains(&kind)
        && index.is_none_or(|i| !i.is_empty() && i.len() <= 9 && i.bytes().all(|b| b.is_ascii_digit()))
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

pub(super) fn is_tensor(machine: &Machine, v: &Value) -> bool {
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
pub(super) fn tensor(machine: &Machine, archive: &mut Archive, v: &Value, depth: usize) -> Result<Tensor> {
    let view = describe_tensor(machine, archive, v, depth)?;
    archive.make(&view)
}

/// The tensor `v` describes, checked as [`tensor`] checks it, not made yet.
pub(super) fn describe_tensor(
    machine: &Machine,
    archive: &mut Archive,
    v: &Value,
    depth: usize,
) -> Result<View> {
    let path = archive.path;
    let (callable, args) = reduced_by(machine, v).ok_or_else(|| bad(path, "expected a tensor"))?;
    let args = tuple_items(machine, args)
        .ok_or_else(|| bad(path, format!("{callable}: arguments are not a tuple")))?;
    if depth > 4 {
        return Err(bad(path, "tensor rebuilt from a tensor rebuilt from … too deep"));
    }
    if let Value::Ref(i) = v {
        archive.rebuilt.insert(*i);
    }
    match callable {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" | "Parameter" => {
            let data = args.first().ok_or_else(|| bad(path, "parameter without data"))?;
            let view = describe_tensor(machine, archive, data, depth + 1)?;
            if matches!(args.get(1), Some(Value::Bool(true))) {
                requires_grad_allowed(path, view.kind)?;
            }
            Ok(view)
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
fn rebuild(machine: &Machine, archive: &mut Archive, callable: &str, args: &[Value]) -> Result<View> {
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
    let own = storage_kind(class).ok_or_else(|| bad(path, format!("unknown storage type {class}")))?;
    // The storage is as its key's first reference made it; which type this
    // view has depends on the loader (see `Loader`).
    let key_text = key.to_string();
    let (first_kind, first_numel) = archive.first.get(&key_text).copied().unwrap_or((own, *numel));
    let mut kind = match archive.loader {
        Loader::Python => first_kind,
        Loader::Libtorch => own,
    };
    if callable == "_rebuild_tensor_v3" {
        // (storage, offset, size, stride, requires_grad, hooks, dtype, …) over
        // untyped bytes: offset, sizes and strides count elements of `dtype`.
        let name = match args.get(6) {
            Some(Value::Global(module, name)) if &**module == "torch" => name,
            Some(other) => {
                let what = describe(machine, other);
                return Err(bad(
                    path,
                    format!("_rebuild_tensor_v3 of dtype {what}, which is no torch dtype"),
                ));
            }
            None => return Err(bad(path, "_rebuild_tensor_v3 without a dtype")),
        };
        // `torch.<name>` as the unpickler finds it: a dtype's name or one of
        // torch's aliases (`torch.half`), never transplant's short forms.
        let alias = matches!(
            &**name,
            "half" | "float" | "double" | "long" | "int" | "short" | "cfloat" | "cdouble" | "chalf"
        );
        let typed = dtype::parse(name)
            .filter(|d| alias || d.name() == &**name)
            .filter(|d| storage_kind(&format!("{}Storage", d.c10_name())).is_some())
            .ok_or_else(|| bad(path, format!("unknown or unsupported dtype torch.{name}")))?;
        if own != Dtype::UInt8 {
            return Err(bad(
                path,
                format!("_rebuild_tensor_v3 of torch.{name} over a typed storage {class}"),
            ));
        }
        kind = typed;
    }
    let storage_bytes = first_numel
        .checked_mul(dtype::size(first_kind) as i64)
        .ok_or_else(|| bad(path, format!("storage {key}: its size overflows")))?;
    // Whole elements of this view's type that the storage holds.
    let numel = storage_bytes / dtype::size(kind) as i64;
    if matches!(args.get(4), Some(Value::Bool(true))) {
        requires_grad_allowed(path, kind)?;
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
    // Legacy files of old PyTorch could save views of storages: (view key,
    // offset, size) in the sixth field, the tensor's storage being a slice of
    // the root storage.
    let view = match fields.get(5).and_then(|v| tuple_items(machine, v)) {
        Some([Value::Str(_), Value::Int(offset), Value::Int(size)]) => Some((*offset, *size)),
        _ => None,
    };
    Ok(View {
        key: key_text.into(),
        kind,
        numel,
        root: view,
        size: size.into(),
        stride: stride.into(),
        offset,
    })
}

/// PyTorch rebuilds a tensor that requires gradients only of a floating or
/// complex dtype, and fails the whole load otherwise.
fn requires_grad_allowed(path: &Path, dtype: Dtype) -> Result<()> {
    if dtype::is_floating(dtype) || dtype::is_complex(dtype) {
        return Ok(());
    }
    Err(bad(path, format!("a tensor of {} requires gradients, which PyTorch cannot rebuild", dtype.name())))
}

/// A state-dict key as a tensor name: a string as it is, an integer as its
/// text (`torch.save({0: t})`); other keys have no name.
fn key_name(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What kind of key a value is, for messages.
fn kind_of_key(k: &Value) -> &'static str {
    match k {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Float(_) => "float",
        Value::Bytes(_) => "bytes",
        Value::BigInt => "large integer",
        Value::Ref(_) => "tuple or object",
        _ => "value",
    }
}

/// The object `v` refers to, if it is one.
fn object<'m>(machine: &'m Machine, v: &Value) -> Option<&'m Object> {
    match v {
        Value::Ref(i) => machine.objects.get(*i),
        _ => None,
    }
}

/// `module.name` of the class or function a value was reduced from.
fn class_of(machine: &Machine, v: &Value) -> Option<String> {
    match object(machine, v)? {
        Object::Reduce { callable: Value::Global(m, n) | Value::Inert(m, n), .. } => Some(format!("{m}.{n}")),
        _ => None,
    }
}

/// The state `BUILD` gave a reduced object, when it is a dict: its items.
fn state_items<'m>(machine: &'m Machine, v: &Value) -> Option<&'m [(Value, Value)]> {
    match object(machine, v)? {
        Object::Reduce { state: Some(state), .. } => dict_items(machine, state).map(|(items, _)| items),
        _ => None,
    }
}

fn field<'m>(items: &'m [(Value, Value)], name: &str) -> Option<&'m Value> {
    items.iter().find(|(k, _)| key_text(k) == Some(name)).map(|(_, v)| v)
}

/// Whether `v` is a pickled `nn.Module` (its state holds `_parameters` and `_modules`).
fn is_module(machine: &Machine, v: &Value) -> bool {
    state_items(machine, v)
        .is_some_and(|items| field(items, "_parameters").is_some() && field(items, "_modules").is_some())
}

/// The names of a `set` (or `set([...])`) of strings.
fn string_set(machine: &Machine, v: &Value) -> Vec<String> {
    let items =
        match object(machine, v) {
            Some(Object::Set(items) | Object::List(items) | Object::Tuple(items)) => items.clone(),
            Some(Object::Reduce { args, .. }) => tuple_items(machine, args)
                .and_then(|a| a.first())
                .map_or_else(Vec::new, |inner| match object(machine, inner) {
                    Some(Object::List(items) | Object::Tuple(items) | Object::Set(items)) => items.clone(),
                    _ => Vec::new(),
                }),
            _ => Vec::new(),
        };
    items.iter().filter_map(|k| key_text(k).map(str::to_string)).collect()
}

/// The state dict of a pickled module, as `state_dict()` makes it: each
/// module's parameters, then its persistent buffers, then its children's, by
/// registration order; `None` entries (a missing bias) left out.
fn module_state(
    machine: &Machine,
    v: &Value,
    prefix: &str,
    out: &mut Vec<(String, Value)>,
    depth: usize,
) -> std::result::Result<(), String> {
    if depth > 256 {
        return Err("modules nested more than 256 deep".into());
    }
    let items = state_items(machine, v).ok_or_else(|| format!("{prefix}: not a module"))?;
    let dict = |name: &str| {
        field(items, name).and_then(|d| dict_items(machine, d)).map_or(&[][..], |(items, _)| items)
    };
    let transient =
        field(items, "_non_persistent_buffers_set").map_or_else(Vec::new, |s| string_set(machine, s));
    for (k, value) in dict("_parameters") {
        if let (Some(name), false) = (key_text(k), matches!(value, Value::None)) {
            out.push((format!("{prefix}{name}"), value.clone()));
        }
    }
    for (k, value) in dict("_buffers") {
        if let (Some(name), false) = (key_text(k), matches!(value, Value::None)) {
            if !transient.iter().any(|t| t == name) {
                out.push((format!("{prefix}{name}"), value.clone()));
            }
        }
    }
    for (k, child) in dict("_modules") {
        if let (Some(name), false) = (key_text(k), matches!(child, Value::None)) {
            module_state(machine, child, &format!("{prefix}{name}."), out, depth + 1)?;
        }
    }
    Ok(())
}

/// Bytes a pickle holds as `bytes`, or (protocol 2) as `_codecs.encode(text, 'latin1')`.
fn bytes_value(machine: &Machine, v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Bytes(b) => Some(b.to_vec()),
        _ => match object(machine, v)? {
            Object::Reduce { callable: Value::Global(m, n), args, .. }
                if &**m == "_codecs" && &**n == "encode" =>
            {
                match tuple_items(machine, args)? {
                    [Value::Str(text), ..] => text.chars().map(|c| u8::try_from(c as u32).ok()).collect(),
                    _ => None,
                }
            }
            _ => None,
        },
    }
}

/// A numpy dtype (`numpy.dtype('f8', False, True)` with its `BUILD` state):
/// its type code (`f8`) and byte order (`<`, `>`, `|`).
fn numpy_dtype(machine: &Machine, v: &Value) -> Option<(String, char)> {
    let Object::Reduce { callable: Value::Global(_, n), args, state } = object(machine, v)? else {
        return None;
    };
    if &**n != "dtype" {
        return None;
    }
    let code = match tuple_items(machine, args)?.first()? {
        Value::Str(s) => s.to_string(),
        _ => return None,
    };
    let order = state
        .as_ref()
        .and_then(|s| tuple_items(machine, s))
        .and_then(|items| items.get(1).cloned())
        .and_then(|o| match o {
            Value::Str(s) => s.chars().next(),
            _ => None,
        })
        .unwrap_or('|');
    Some((code, order))
}

/// The tch dtype of a numpy type code, if tensors have it.
fn numpy_kind(code: &str) -> Option<Kind> {
    Some(match code {
        "f2" => Kind::Half,
        "f4" => Kind::Float,
        "f8" => Kind::Double,
        "i1" => Kind::Int8,
        "i2" => Kind::Int16,
        "i4" => Kind::Int,
        "i8" => Kind::Int64,
        "u1" => Kind::Uint8,
        "b1" => Kind::Bool,
        "c8" => Kind::ComplexFloat,
        "c16" => Kind::ComplexDouble,
        _ => return None,
    })
}

/// A numpy scalar (`numpy.core.multiarray.scalar(dtype, bytes)`) as text.
fn numpy_scalar(machine: &Machine, v: &Value) -> Option<String> {
    let Object::Reduce { callable: Value::Global(_, n), args, .. } = object(machine, v)? else { return None };
    if &**n != "scalar" {
        return None;
    }
    let items = tuple_items(machine, args)?;
    let (code, order) = numpy_dtype(machine, items.first()?)?;
    let raw = bytes_value(machine, items.get(1)?)?;
    if order == '>' {
        return Some(format!("numpy {code} (big-endian)"));
    }
    let text = match (code.as_str(), raw.len()) {
        ("f8", 8) => f64::from_le_bytes(raw.try_into().ok()?).to_string(),
        ("f4", 4) => f32::from_le_bytes(raw.try_into().ok()?).to_string(),
        ("i8", 8) => i64::from_le_bytes(raw.try_into().ok()?).to_string(),
        ("i4", 4) => i32::from_le_bytes(raw.try_into().ok()?).to_string(),
        ("u8", 8) => u64::from_le_bytes(raw.try_into().ok()?).to_string(),
        ("b1", 1) => (raw[0] != 0).to_string(),
        _ => format!("numpy {code}"),
    };
    Some(text)
}

/// Whether `v` is a pickled numpy array (`_reconstruct` with its state).
fn is_array(machine: &Machine, v: &Value) -> bool {
    matches!(
        object(machine, v),
        Some(Object::Reduce { callable: Value::Global(m, n), state: Some(_), .. })
            if m.starts_with("numpy") && &**n == "_reconstruct"
    )
}

/// A pickled numpy array as a tensor (C or Fortran order; object arrays and
/// big-endian data refused).
fn array(machine: &Machine, v: &Value) -> std::result::Result<Tensor, String> {
    let Some(Object::Reduce { state: Some(state), .. }) = object(machine, v) else {
        return Err("not an array".into());
    };
    // (version, shape, dtype, is_fortran, data)
    let items = tuple_items(machine, state).ok_or("array state is not a tuple")?;
    let shape = items.get(1).and_then(|s| ints(machine, s)).ok_or("array shape is not integers")?;
    let (code, order) = items.get(2).and_then(|d| numpy_dtype(machine, d)).ok_or("array dtype unreadable")?;
    if code.starts_with('O') {
        return Err(
            "a numpy object array (dtype O) holds Python objects, which are never built: refused".into()
        );
    }
    let kind = numpy_kind(&code).ok_or_else(|| format!("numpy dtype {code} has no tensor dtype"))?;
    if order == '>' && dtype::size(kind) > 1 {
        return Err(format!("a big-endian numpy array ({code}) is not supported"));
    }
    let fortran = matches!(items.get(3), Some(Value::Bool(true)));
    let data = items.get(4).and_then(|d| bytes_value(machine, d)).ok_or("array data is not bytes")?;
    let numel = shape
        .iter()
        .try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) })
        .ok_or("bad array shape")?;
    let need = (numel as u64).checked_mul(dtype::size(kind) as u64).ok_or("array too large")?;
    if data.len() as u64 != need {
        return Err(format!(
            "array of shape {shape:?} {code} needs {need} bytes, the pickle has {}",
            data.len()
        ));
    }
    let flat = Tensor::from_slice(&data).f_view_dtype(kind).map_err(|e| e.to_string())?;
    let t = if fortran {
        let reversed: Vec<i64> = shape.iter().rev().copied().collect();
        let dims: Vec<i64> = (0..shape.len() as i64).rev().collect();
        flat.f_reshape(reversed.as_slice())
            .and_then(|t| t.f_permute(dims.as_slice()))
            .and_then(|t| t.f_contiguous())
    } else {
        flat.f_reshape(shape.as_slice())
    };
    t.map_err(|e| e.to_string())
}

/// One line saying what a checkpoint entry that is not the state dict holds.
fn describe(machine: &Machine, v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::BigInt => "a large integer".into(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) if s.chars().count() > 60 => format!("{:?}…", s.chars().take(60).collect::<String>()),
        Value::Str(s) => format!("{s:?}"),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Global(m, n) | Value::Inert(m, n) => format!("{m}.{n}"),
        Value::Persistent(_) => "a storage".into(),
        Value::Ref(_) => {
            if is_tensor(machine, v) {
                return "a tensor".into();
            }
            if let Some(text) = numpy_scalar(machine, v) {
                return text;
            }
            if is_array(machine, v) {
                return "a numpy array".into();
            }
            if is_module(machine, v) {
                return format!("{} (a pickled module)", class_of(machine, v).unwrap_or_default());
            }
            match object(machine, v) {
                Some(Object::Dict(items, _)) => {
                    let tensors = items.iter().filter(|(_, x)| is_tensor(machine, x)).count();
                    format!("a dict of {} entries ({tensors} tensors)", items.len())
                }
                Some(Object::List(items)) => format!("a list of {}", items.len()),
                Some(Object::Tuple(items)) => format!("a tuple of {}", items.len()),
                Some(Object::Set(items)) => format!("a set of {}", items.len()),
                Some(Object::Reduce { .. }) => {
                    format!("{} (not read)", class_of(machine, v).unwrap_or_default())
                }
                None => "?".into(),
            }
        }
    }
}

/// A dict's items and attributes.
type DictParts<'m> = (&'m [(Value, Value)], &'m [(Value, Value)]);

fn dict_items<'m>(machine: &'m Machine, v: &Value) -> Option<DictParts<'m>> {
    dict_items_at(machine, v, 0)
}

/// A dict's items; for an inert placeholder (`argparse.Namespace`), those of
/// the state `BUILD` gave it, so that what it holds is reachable by key.
fn dict_items_at<'m>(machine: &'m Machine, v: &Value, depth: usize) -> Option<DictParts<'m>> {
    match object(machine, v)? {
        Object::Dict(items, attrs) => Some((items, attrs)),
        Object::Reduce { callable: Value::Inert(..), state: Some(state), .. } if depth == 0 => {
            dict_items_at(machine, state, 1)
        }
        _ => None,
    }
}

fn count_tensors(machine: &Machine, v: &Value) -> usize {
    count_weights(machine, v, false)
}

/// Tensors (and with `arrays`, numpy arrays) directly in a dict; a pickled
/// module counts as holding its state.
fn count_weights(machine: &Machine, v: &Value, arrays: bool) -> usize {
    if is_module(machine, v) {
        return 1;
    }
    if is_inert_non_module(machine, v) {
        return 0;
    }
    dict_items(machine, v).map_or(0, |(items, _)| {
        items.iter().filter(|(_, x)| is_tensor(machine, x) || (arrays && is_array(machine, x))).count()
    })
}

/// Whether `v` is a placeholder whose state is not a module's (it is looked into
/// by key, not taken as a state dict).
fn is_inert_non_module(machine: &Machine, v: &Value) -> bool {
    matches!(object(machine, v), Some(Object::Reduce { callable: Value::Inert(..), .. }))
        && !is_module(machine, v)
}

fn key_text(k: &Value) -> Option<&str> {
    match k {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

/// Dicts holding weights below `root` (up to SEARCH_DEPTH levels down, not
/// inside each other), by their dotted keys under `at`; numpy arrays count
/// with `arrays`.
fn holders(machine: &Machine, root: &Value, at: &str, arrays: bool, int_keys: bool) -> Vec<(String, Value)> {
    let mut found: Vec<(String, Value)> = Vec::new();
    let mut pending = std::collections::VecDeque::from([(at.to_string(), root.clone(), 0)]);
    let mut seen = std::collections::HashSet::new();
    while let Some((at, value, depth)) = pending.pop_front() {
        let Some((items, _)) = dict_items(machine, &value) else { continue };
        if let Value::Ref(i) = value {
            if !seen.insert(i) {
                continue;
            }
        }
        for (k, v) in items {
            // Integer keys (an optimizer's per-parameter state) are looked into
            // only when asked: they are not where a model's weights live.
            let Some(k) = (if int_keys { key_name(k) } else { key_text(k).map(str::to_string) }) else {
                continue;
            };
            let name = if at.is_empty() { k } else { format!("{at}.{k}") };
            if count_weights(machine, v, arrays) > 0 {
                found.push((name, v.clone()));
            } else if depth + 1 < SEARCH_DEPTH {
                pending.push_back((name, v.clone(), depth + 1));
            }
        }
    }
    found
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
                .filter_map(|(k, v)| key_name(k).map(|k| (k, v)))
                .filter(|(k, _)| rest == k || rest.starts_with(&format!("{k}.")))
                .max_by_key(|(k, _)| k.len());
            let Some((k, v)) = found else {
                let keys: Vec<String> = items.iter().filter_map(|(k, _)| key_name(k)).take(20).collect();
                return Err(Error::NoSuchKey {
                    path: path.into(),
                    key: key.to_string(),
                    available: keys.join(", "),
                });
            };
            rest = rest[k.len()..].trim_start_matches('.');
            at = v.clone();
        }
        if count_weights(machine, &at, true) == 0 && !is_tensor(machine, &at) && !is_array(machine, &at) {
            let below = holders(machine, &at, key, true, true);
            if below.is_empty() {
                return Err(bad(path, format!("key {key} holds no tensors")));
            }
            let names: Vec<&str> = below.iter().take(5).map(|(k, _)| k.as_str()).collect();
            return Err(bad(
                path,
                format!(
                    "key {key} holds no tensors of its own, only dicts that do: {}{} (name one with --key)",
                    names.join(", "),
                    if below.len() > 5 { ", …" } else { "" }
                ),
            ));
        }
        return Ok((at, Some(key.to_string())));
    }
    if is_tensor(machine, root) || count_tensors(machine, root) > 0 {
        return Ok((root.clone(), None));
    }
    let mut found = holders(machine, root, "", false, false);
    if found.is_empty() {
        // No torch tensor anywhere: numpy arrays may be the weights.
        if count_weights(machine, root, true) > 0 {
            return Ok((root.clone(), None));
        }
        found = holders(machine, root, "", true, false);
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
    let mapped = super::map_file(path, FORMAT)?;
    read_from(path, &mapped.bytes, &mapped.map, key)
}

/// [`read`] of a `torch.save` stream held in `view`, whose bytes `bytes` (a
/// 1-D `uint8` tensor) also holds: a file, or one blob inside a larger one (a
/// Distributed Checkpoint's `.distcp` file). Tensors are views into `bytes`.
pub(crate) fn read_from(path: &Path, bytes: &Tensor, view: &[u8], key: Option<&str>) -> Result<Loaded> {
    let bytes = bytes.shallow_clone();
    let mut machine = Machine::default();
    let (root, records) = if view.starts_with(&super::LEGACY_TORCH_MAGIC) {
        legacy_program(path, view, &mut machine)?
    } else {
        zip_program(path, view, &mut machine)?
    };
    let (chosen, key) = select(&machine, &root, key, path)?;
    let mut archive = Archive::new(path, view, records, bytes);
    archive.check_references(&machine, Loader::Python)?;
    let others = others_of(&machine, &root, &chosen, key.as_deref());
    let (weights, attrs, skipped) = weights_of(&machine, &chosen, path)?;
    super::check_entries(path, "torch.save checkpoint", weights.len())?;
    let named = |name: &str, e: Error| match e {
        Error::Format { path, format, message } => {
            Error::Format { path, format, message: format!("tensor {name}: {message}") }
        }
        other => other,
    };
    // Every tensor described while the pickle's arena is alive, then the
    // arena dropped before any is made: memory holds one or the other.
    let mut described = Vec::with_capacity(weights.len());
    for (name, v) in weights {
        let d = if is_array(&machine, &v) {
            Err(array(&machine, &v).map_err(|m| bad(path, format!("tensor {name}: {m}")))?)
        } else {
            Ok(describe_tensor(&machine, &mut archive, &v, 0).map_err(|e| named(&name, e))?)
        };
        described.push((name, d));
    }
    archive.check_unread_tensors(&machine)?;
    let metadata_json = attrs
        .iter()
        .find(|(k, _)| key_text(k) == Some("_metadata"))
        .map(|(_, v)| to_json(&machine, v, 0).to_string());
    drop(machine);
    let mut tensors = Vec::with_capacity(described.len());
    for (name, d) in described {
        let t = match d {
            Ok(view) => archive.make(&view).map_err(|e| named(&name, e))?,
            Err(array) => array,
        };
        tensors.push((name, t));
    }
    Ok(Loaded { tensors, key, metadata_json, skipped, others })
}

/// What the `torch.save` stream in `view` holds, in one line, when it is not a
/// tensor (a Distributed Checkpoint's `step`, say).
pub(crate) fn describe_stream(path: &Path, view: &[u8]) -> Result<String> {
    let mut machine = Machine::default();
    let (root, _) = zip_program(path, view, &mut machine)?;
    Ok(describe(&machine, &root))
}

/// Runs the zip format's `data.pkl`: its value, and where the storages are.
pub(super) fn zip_program<'a>(
    path: &Path,
    view: &'a [u8],
    machine: &mut Machine,
) -> Result<(Value, Records<'a>)> {
    let mut zip = zip::ZipArchive::new(Cursor::new(view)).map_err(|e| bad(path, e.to_string()))?;
    super::check_unique_members(path, FORMAT, &mut zip)?;
    // libtorch reads every record from the folder of the first member.
    let prefix = super::archive_folder(path, FORMAT, &mut zip)?;
    let pickle_name = format!("{prefix}data.pkl");
    if !zip.file_names().any(|n| n == pickle_name) {
        return Err(bad(
            path,
            format!("no {pickle_name} (the archive's folder is {prefix}, its first member's)"),
        ));
    }
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
    let root = machine.run(&program).map_err(|e| bad(path, e.to_string()))?;
    Ok((root, Records::Zip { zip, prefix }))
}

/// Runs the legacy format (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`):
/// five pickles — the magic number, the protocol version (1001), the system
/// information, the object, the sorted list of storage keys — then each
/// storage as an 8-byte element count and its bytes. Every record is checked
/// against the file's length and the element counts its tensors need.
fn legacy_program<'a>(path: &Path, view: &'a [u8], machine: &mut Machine) -> Result<(Value, Records<'a>)> {
    let legacy = |m: String| bad(path, format!("legacy format: {m}"));
    let mut run =
        |at: usize, what: &str| machine.run_from(view, at).map_err(|e| legacy(format!("the {what}: {e}")));
    let (_magic, at) = run(0, "magic number")?;
    let (version, at) = run(at, "protocol version")?;
    if version != Value::Int(1001) {
        return Err(legacy(format!("protocol version {version:?}, this reader knows 1001")));
    }
    let (_system, at) = run(at, "system information")?;
    let (root, at) = run(at, "object")?;
    let (keys, mut at) = run(at, "storage key list")?;
    let keys: Vec<String> = match tuple_items(machine, &keys) {
        Some(items) => items
            .iter()
            .map(|k| key_text(k).map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| legacy("a storage key is not a string".into()))?,
        None => return Err(legacy("the storage key list is not a list".into())),
    };
    super::check_entries(path, "legacy torch.save checkpoint", keys.len())?;
    // Each key's element size, from the storage types its references name.
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for pid in &machine.persistent {
        if let Some([Value::Str(_), Value::Global(_, class), Value::Str(key), ..]) = tuple_items(machine, pid)
        {
            // The first reference to a key types its storage, as torch.load reads it.
            if &**class == "UntypedStorage" {
                // torch.load's legacy reader asks the storage class for its
                // dtype, which an untyped storage has not: PyTorch fails here.
                return Err(legacy(format!(
                    "storage {key} is an UntypedStorage (a tensor of a dtype such as uint16 or float8 saved \
                     with _use_new_zipfile_serialization=False), which torch.load cannot read either: refused"
                )));
            }
            if let Some(kind) = storage_kind(class) {
                sizes.entry(key).or_insert(dtype::size(kind));
            }
        }
    }
    let mut records = HashMap::with_capacity(keys.len());
    for key in keys {
        let header =
            view.get(at..at + 8).ok_or_else(|| legacy(format!("storage {key}: the file ends early")))?;
        let count = u64::from_le_bytes(header.try_into().map_err(|_| legacy("short header".into()))?);
        at += 8;
        let size = *sizes
            .get(key.as_str())
            .ok_or_else(|| legacy(format!("storage {key} is listed but no tensor uses it")))?;
        let len =
            count.checked_mul(size as u64).filter(|&l| l <= (view.len() - at) as u64).ok_or_else(|| {
                legacy(format!("storage {key} declares {count} elements, more than the file holds"))
            })?;
        records.insert(key, (at as u64, len));
        at += len as usize;
    }
    Ok((root, Records::Legacy(records)))
}

/// The named weights of the chosen value — a tensor, a numpy array, a pickled
/// module (its `state_dict()`), or a dict of them (string or integer keys) —
/// with the dict's attributes and how many of its values are not weights.
type Weights<'m> = (Vec<(String, Value)>, &'m [(Value, Value)], usize);

fn weights_of<'m>(machine: &'m Machine, chosen: &Value, path: &Path) -> Result<Weights<'m>> {
    let stem = || path.file_stem().map_or("tensor".into(), |s| s.to_string_lossy().into_owned());
    if is_tensor(machine, chosen) || is_array(machine, chosen) {
        return Ok((vec![(stem(), chosen.clone())], &[], 0));
    }
    if is_module(machine, chosen) {
        let mut out = Vec::new();
        module_state(machine, chosen, "", &mut out, 0)
            .map_err(|m| bad(path, format!("pickled module: {m}")))?;
        return Ok((out, &[], 0));
    }
    let (items, attrs) =
        dict_items(machine, chosen).ok_or_else(|| bad(path, "the state dict is not a dict"))?;
    let mut weights = Vec::with_capacity(items.len());
    let mut skipped = 0;
    for (k, v) in items {
        if !(is_tensor(machine, v) || is_array(machine, v)) {
            skipped += 1;
            continue;
        }
        let name = key_name(k).ok_or_else(|| {
            bad(
                path,
                format!("a tensor is stored under a key of type {}, which cannot name it", kind_of_key(k)),
            )
        })?;
        weights.push((name, v.clone()));
    }
    Ok((weights, attrs, skipped))
}

/// What the checkpoint holds besides the state dict read: each other entry
/// of the root dict, described; and a pickled module's class.
fn others_of(machine: &Machine, root: &Value, chosen: &Value, key: Option<&str>) -> Vec<(String, String)> {
    let mut others = Vec::new();
    if is_module(machine, chosen) {
        let class = class_of(machine, chosen).unwrap_or_default();
        others.push(("(pickled module)".to_string(), format!("{class}, read as its state_dict() would be")));
    }
    let Some(key) = key else { return others };
    let Some((items, _)) = dict_items(machine, root) else { return others };
    for (k, v) in items {
        let Some(name) = key_name(k) else { continue };
        if key == name || key.starts_with(&format!("{name}.")) {
            continue;
        }
        others.push((name, describe(machine, v)));
    }
    others
}

/// Pickle opcodes, as the writer emits them.
pub(crate) struct Pickler {
    pub(crate) out: Vec<u8>,
}

impl Pickler {
    pub(crate) fn op(&mut self, op: u8) {
        self.out.push(op);
    }
    pub(crate) fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn int(&mut self, n: i64) {
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
    pub(crate) fn ints(&mut self, values: &[i64]) {
        self.op(b'(');
        for &v in values {
            self.int(v);
        }
        self.op(b't');
    }
    /// A contiguous tensor of `dtype` and `size` over storage `key`, as
    /// `torch.save` writes it: `_rebuild_tensor_v2` over a typed storage
    /// (`torch.FloatStorage`), or `_rebuild_tensor_v3` over an `UntypedStorage`
    /// of bytes with the dtype as its last argument for the dtypes that have
    /// no typed storage class ([`saved_untyped`]).
    fn tensor(&mut self, dtype: Dtype, class: &str, key: usize, size: &[i64]) {
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1].max(1);
        }
        let untyped = saved_untyped(dtype);
        let numel = size.iter().product::<i64>();
        self.global("torch._utils", if untyped { "_rebuild_tensor_v3" } else { "_rebuild_tensor_v2" });
        self.op(b'(');
        self.op(b'(');
        self.str("storage");
        if untyped {
            self.global("torch.storage", "UntypedStorage");
        } else {
            self.global("torch", class);
        }
        self.str(&key.to_string());
        self.str("cpu");
        self.int(if untyped { numel * dtype.size() as i64 } else { numel });
        self.op(b't');
        self.op(b'Q');
        self.int(0);
        self.ints(size);
        self.ints(&stride);
        self.op(0x89);
        self.ordered_dict();
        if untyped {
            self.global("torch", dtype.name());
        }
        self.op(b't');
        self.op(b'R');
    }
    pub(crate) fn ordered_dict(&mut self) {
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
            let (name, size) = (&o.name, o.shape.clone());
            p.str(name);
            p.tensor(o.kind, class, storage, &size);
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
    let mut zip = zip::ZipWriter::new(crate::files::PatchingWriter::new(file));
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

/// `torch.save(tensor)` of one tensor, as bytes: the stream a Distributed
/// Checkpoint keeps each chunk in.
pub(crate) fn tensor_stream(name: &str, tensor: &Tensor) -> Result<Vec<u8>> {
    let path = Path::new(name);
    let kind = Dtype::of(tensor).map_err(|source| Error::Tensor {
        store: name.into(),
        tensor: name.into(),
        source,
    })?;
    let o = super::Outgoing { name: name.to_string(), kind, shape: tensor.size() };
    let class = super::check_types(path, FORMAT, std::slice::from_ref(&o), storage_name)?.remove(0);
    let data = super::produce_checked(path, FORMAT, std::slice::from_ref(&o), 0, &mut |_| {
        Ok(tensor.shallow_clone())
    })?;
    let mut p = Pickler { out: vec![0x80, 2] };
    p.tensor(o.kind, &class, 0, &o.shape);
    p.op(b'.');
    let zerr = |e: zip::result::ZipError| bad(path, e.to_string());
    let io = |source| Error::Io { path: path.into(), source };
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(o.bytes() >= u32::MAX as usize);
    zip.start_file_aligned("archive/data.pkl", options, 64).map_err(zerr)?;
    zip.write_all(&p.out).map_err(io)?;
    zip.start_file_aligned("archive/byteorder", options, 64).map_err(zerr)?;
    zip.write_all(b"little").map_err(io)?;
    zip.start_file_aligned("archive/data/0", options, 64).map_err(zerr)?;
    zip.write_all(super::bytes_of(&data)).map_err(io)?;
    zip.start_file_aligned("archive/version", options, 64).map_err(zerr)?;
    zip.write_all(b"3\n").map_err(io)?;
    Ok(zip.finish().map_err(zerr)?.into_inner())
}

/// Metadata key under which a checkpoint keeps the `_metadata` JSON.
pub const METADATA_KEY: &str = "torch._metadata";

/// The checkpoint metadata a read gives: `_metadata` as JSON, when present.
pub fn metadata_of(loaded: &Loaded) -> BTreeMap<String, String> {
    loaded.metadata_json.iter().map(|json| (METADATA_KEY.to_string(), json.clone())).collect()
}
