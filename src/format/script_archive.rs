//! TorchScript files read as the zip archives they are, with no libtorch load
//! and none of the file's code run (#15's reader).
//!
//! A TorchScript archive holds `data.pkl` — the module object graph: each
//! module an object of a `__torch__.…` class whose state is its attributes in
//! slot order — `code/` with each class's definition, and `data/N` storage
//! records. The object graph is read by the same inert pickle machine as
//! `torch.save` files; which attributes are parameters and which buffers comes
//! from the class definitions' `__parameters__` and `__buffers__` lines; the
//! entries come out in the order libtorch's `named_parameters`/`named_buffers`
//! and `named_children` give them (each module's parameters, then its buffers,
//! then its children, in slot order). Tensors are views into the mapped file,
//! every extent checked against its record, as for `torch.save`.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::Tensor;

use super::pickle::{Machine, Object, Value};
use super::script_classes::{defines_class, libtorch_global, members_of, Members};
use super::torch_pickle::{self, Archive, Records};
use crate::entry::Role;
use crate::error::{Error, Result};

const FORMAT: &str = "TorchScript archive";
/// The largest class definition file read.
const MAX_CODE_BYTES: u64 = 64 << 20;
/// Deepest module nesting followed.
const MAX_DEPTH: usize = 256;

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { path: path.into(), format: FORMAT, message: message.into() }
}

/// One entry of a TorchScript module: its dotted name, role and tensor.
pub type ScriptEntry = (String, Role, Tensor);

/// What [`read_archive`] found: the entries, and every storage record the
/// tensors view (its member name in the zip, and the typed storage tensor
/// they share), so that a rewrite can write each record from its storage.
pub struct Contents {
    /// Name, role and tensor of each parameter and buffer, in libtorch's order.
    pub entries: Vec<ScriptEntry>,
    /// `(member name, storage)` of every record a tensor views, by name.
    pub records: Vec<(String, Tensor)>,
    /// For each entry, the record its tensor views (`None`: it holds no bytes).
    pub record_of: Vec<Option<usize>>,
}

/// Reads the parameters and buffers of the TorchScript module in `path`,
/// running none of its code.
pub fn read(path: &Path) -> Result<Vec<ScriptEntry>> {
    read_archive(path).map(|c| c.entries)
}

/// [`read`], with the storage records the tensors view.
pub fn read_archive(path: &Path) -> Result<Contents> {
    let super::MappedFile { map, bytes } = super::map_file(path, FORMAT)?;
    let view: &[u8] = &map;
    let mut machine = Machine::default();
    let (root, records) = torch_pickle::zip_program(path, view, &mut machine)?;
    let mut archive = Archive::new(path, view, records, bytes);
    // A rewrite writes each record from its storage: every one read is kept.
    archive.keep_storages = true;
    archive.check_references(&machine, torch_pickle::Loader::Libtorch)?;
    // libtorch's unpickler knows a fixed set of globals, and takes any other
    // name for a TorchScript class, which must then be defined in `code/`.
    let mut named: Vec<&(String, String)> = machine.globals.iter().collect();
    named.sort();
    for (module, name) in named {
        if !libtorch_global(module, name) {
            return Err(bad(path, format!("data.pkl names {module}.{name}, which libtorch cannot load")));
        }
    }
    let mut classes: HashMap<String, Option<Members>> = HashMap::new();
    // A submodule held by several attributes is listed under each of its
    // names, as libtorch's `named_parameters` and `state_dict()` list it (its
    // tensors tied); names are counted before any is made, so that a small file
    // whose modules share children at every level cannot ask for millions.
    let names = count_names(&machine, &root, &mut archive, &mut classes, &mut HashMap::new(), 0)?;
    if names > super::MAX_ENTRIES as u64 {
        return Err(bad(
            path,
            format!(
                "its modules share submodules so that it names {names} tensors (each shared module is \
                 listed under every path to it), more than the {} a file may list",
                super::MAX_ENTRIES
            ),
        ));
    }
    let mut out = Vec::new();
    walk(&machine, &root, "", &mut archive, &mut classes, &mut out, 0)?;
    archive.check_unread_tensors(&machine)?;
    let prefix = match &archive.records {
        Records::Zip { prefix, .. } => prefix.clone(),
        Records::Legacy(_) => String::new(),
    };
    let mut records: Vec<(String, Tensor)> =
        archive.storages.iter().map(|(key, t)| (format!("{prefix}data/{key}"), t.shallow_clone())).collect();
    records.sort_by(|a, b| a.0.cmp(&b.0));
    // Each tensor lies within its storage's bytes (checked as it was made).
    let mut starts: Vec<(usize, usize, usize)> = records
        .iter()
        .enumerate()
        .map(|(r, (_, t))| {
            let start = t.data_ptr() as usize;
            (start, start + t.numel() * crate::dtype::Dtype::of(t).map_or(1, crate::dtype::Dtype::size), r)
        })
        .collect();
    starts.sort_unstable();
    let record_of = out
        .iter()
        .map(|(_, _, t)| {
            if t.numel() == 0 {
                return None;
            }
            let at = t.data_ptr() as usize;
            let i = starts.partition_point(|&(start, _, _)| start <= at).checked_sub(1)?;
            let (_, end, r) = starts[i];
            (at < end).then_some(r)
        })
        .collect();
    Ok(Contents { entries: out, records, record_of })
}

/// Writes the archive at `source` to `out` with every record in `records`
/// written from its storage (as the tensors left it) and every other member —
/// code, debug information, constants, version — copied through byte for byte,
/// in the archive's order. Records are stored uncompressed, 64-byte aligned,
/// as PyTorch writes them.
pub fn rewrite(
    source: &Path,
    out: &Path,
    records: &[(String, Tensor)],
    replaced: &[(String, Vec<u8>)],
) -> Result<()> {
    let by_name: HashMap<&str, &Tensor> = records.iter().map(|(n, t)| (n.as_str(), t)).collect();
    rewrite_with(source, out, &mut |name| {
        if let Some((_, bytes)) = replaced.iter().find(|(n, _)| n == name) {
            return Ok(Some(Tensor::from_slice(bytes)));
        }
        Ok(by_name.get(name).map(|t| t.shallow_clone()))
    })
}

/// The largest `data.pkl` read to be rewritten.
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// `records` (as [`read_archive`] gives them) retyped: `data.pkl` of the
/// archive at `path` naming the storage types `retype` gives by record name
/// (`…/data/KEY`); its member name and new bytes.
pub fn retyped_pickle(
    path: &Path,
    records: &[(String, Tensor)],
    retype: &HashMap<String, tch::Kind>,
) -> Result<(String, Vec<u8>)> {
    let Some((first, _)) = records.first() else { return Err(bad(path, "no storage records to retype")) };
    let prefix = first.rsplit_once("data/").map_or("", |(p, _)| p);
    let name = format!("{prefix}data.pkl");
    let file = crate::files::open_regular(path)?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(path, e.to_string()))?;
    super::check_unique_members(path, FORMAT, &mut zip)?;
    let entry = zip.by_name(&name).map_err(|e| bad(path, format!("{name}: {e}")))?;
    super::check_expansion(path, FORMAT, &name, entry.compressed_size(), entry.size())?;
    let mut program = Vec::new();
    entry.take(MAX_PICKLE_BYTES).read_to_end(&mut program).map_err(|e| bad(path, format!("{name}: {e}")))?;
    let by_key: HashMap<String, tch::Kind> = retype
        .iter()
        .map(|(record, kind)| (record.rsplit('/').next().unwrap_or(record).to_string(), *kind))
        .collect();
    let program = super::retype::retype_storages(&program, &by_key)
        .map_err(|e| bad(path, format!("{name}: cannot change its storage types: {e}")))?;
    Ok((name, program))
}

/// [`rewrite`], each member's new content asked of `produce` as the writer
/// reaches it (`None`: copied through unchanged), so that records can be made
/// one at a time.
pub fn rewrite_with(
    source: &Path,
    out: &Path,
    produce: &mut dyn FnMut(&str) -> Result<Option<Tensor>>,
) -> Result<()> {
    use std::io::Write;
    let io_in = |e: std::io::Error| Error::Io { path: source.into(), source: e };
    let io = |e: std::io::Error| Error::Io { path: out.into(), source: e };
    let zerr = |e: zip::result::ZipError| bad(out, e.to_string());
    let file = crate::files::open_regular(source)?;
    // Read through a map: the zip reader's many small reads and seeks cost
    // nothing there.
    // SAFETY: a private read-only map; bytes changed under it by another
    // process are at worst copied as they are (every record is re-read).
    let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.map_err(io_in)?;
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(&map[..])).map_err(|e| bad(source, e.to_string()))?;
    super::check_unique_members(source, FORMAT, &mut zip)?;
    let target = std::fs::File::create(out).map_err(io)?;
    let mut writer = zip::ZipWriter::new(crate::files::PatchingWriter::new(target));
    // The pages of the members read are handed back as the writer goes: a
    // rewrite's memory does not grow with the archive.
    let mut releaser = super::PageReleaser::default();
    let base = map.as_ptr() as usize;
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| bad(source, e.to_string()))?;
        let name = entry.name().to_string();
        let (from, to) = (entry.header_start(), entry.data_start().saturating_add(entry.compressed_size()));
        if to <= map.len() as u64 && from < to {
            releaser.release_bytes(base + from as usize..base + to as usize, base..base + map.len());
        }
        match produce(&name)? {
            Some(storage) => {
                drop(entry);
                let bytes = storage.f_contiguous().map_err(|e| bad(out, e.to_string()))?;
                let data = super::bytes_of(&bytes);
                let options = zip::write::FileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored)
                    .large_file(data.len() >= u32::MAX as usize);
                writer.start_file_aligned(name, options, 64).map_err(zerr)?;
                writer.write_all(data).map_err(io)?;
            }
            None => writer.raw_copy_file(entry).map_err(|e| match e {
                zip::result::ZipError::Io(e) => io_in(e),
                other => zerr(other),
            })?,
        }
    }
    writer.finish().map_err(zerr)?.flush().map_err(io)
}

/// A `__torch__` object's state: the attributes (a dict, in slot order), or
/// whatever its own `__getstate__` returned, for its `__setstate__` code.
enum State<'m> {
    Attributes(&'m [(Value, Value)]),
    Custom,
}

/// A `__torch__` object: its class's module and name, and its state.
type ScriptObject<'m> = (&'m str, &'m str, State<'m>);

/// The class (`module`, `name`) of a `__torch__` object, with its state.
fn script_object<'m>(machine: &'m Machine, v: &Value) -> Option<ScriptObject<'m>> {
    let Value::Ref(i) = v else { return None };
    let Some(Object::Reduce { callable: Value::Inert(module, name), state, .. }) = machine.objects.get(*i)
    else {
        return None;
    };
    if !module.starts_with("__torch__") {
        return None;
    }
    let state = match state {
        Some(Value::Ref(s)) => match machine.objects.get(*s)? {
            Object::Dict(items, _) => State::Attributes(items),
            _ => State::Custom,
        },
        _ => State::Custom,
    };
    Some((module, name, state))
}

/// The members of a `__torch__` class, from its file in `code/` (`None`: not a module).
fn class_members(
    archive: &mut Archive,
    classes: &mut HashMap<String, Option<Members>>,
    module: &str,
    name: &str,
) -> Result<Option<Members>> {
    let key = format!("{module}.{name}");
    if let Some(found) = classes.get(&key) {
        return Ok(found.clone());
    }
    let path = archive.path;
    let Records::Zip { zip, prefix } = &mut archive.records else {
        return Err(bad(path, "not a zip archive"));
    };
    let file = format!("{prefix}code/{}.py", module.replace('.', "/"));
    let found = match zip.by_name(&file) {
        Ok(entry) => {
            super::check_expansion(path, FORMAT, &file, entry.compressed_size(), entry.size())?;
            let mut text = String::new();
            entry
                .take(MAX_CODE_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| bad(path, format!("{file}: {e}")))?;
            members_of(&text, name)
        }
        Err(_) => None,
    };
    if found.is_none() && !key.starts_with("__torch__.torch.classes.") && !defines(archive, &file, name)? {
        // libtorch compiles the class from its definition to load the object.
        return Err(bad(path, format!("class {key} has no definition in {file}: libtorch cannot load it")));
    }
    classes.insert(key, found.clone());
    Ok(found)
}

/// How many names [`walk`] gives the module `v` and everything below it: each
/// distinct module object counted once (`seen`), shared ones added once per path.
fn count_names(
    machine: &Machine,
    v: &Value,
    archive: &mut Archive,
    classes: &mut HashMap<String, Option<Members>>,
    seen: &mut HashMap<usize, u64>,
    depth: usize,
) -> Result<u64> {
    let Value::Ref(index) = v else { return Ok(0) };
    if let Some(&n) = seen.get(index) {
        return Ok(n);
    }
    if depth > MAX_DEPTH {
        return Err(bad(archive.path, format!("modules nested more than {MAX_DEPTH} deep")));
    }
    let Some((module, name, State::Attributes(items))) = script_object(machine, v) else { return Ok(0) };
    let Some(members) = class_members(archive, classes, module, name)? else { return Ok(0) };
    let mut n = 0u64;
    for (k, value) in items {
        let Value::Str(attr) = k else { continue };
        let listed = members.parameters.iter().chain(&members.buffers).any(|m| **m == **attr);
        if listed && torch_pickle::is_tensor(machine, value) {
            n += 1;
        } else if let Some((child_module, child_name, _)) = script_object(machine, value) {
            if class_members(archive, classes, child_module, child_name)?.is_some() {
                n = n.saturating_add(count_names(machine, value, archive, classes, seen, depth + 1)?);
            }
        }
    }
    seen.insert(*index, n);
    Ok(n)
}

/// Whether the code file `file` defines a class `name` of any kind.
fn defines(archive: &mut Archive, file: &str, name: &str) -> Result<bool> {
    let path = archive.path;
    let Records::Zip { zip, .. } = &mut archive.records else { return Ok(false) };
    let Ok(entry) = zip.by_name(file) else { return Ok(false) };
    super::check_expansion(path, FORMAT, file, entry.compressed_size(), entry.size())?;
    let mut text = String::new();
    entry.take(MAX_CODE_BYTES).read_to_string(&mut text).map_err(|e| bad(path, format!("{file}: {e}")))?;
    Ok(defines_class(&text, name))
}

/// Each module's parameters, then its buffers, then its children's, in slot order.
fn walk(
    machine: &Machine,
    v: &Value,
    prefix: &str,
    archive: &mut Archive,
    classes: &mut HashMap<String, Option<Members>>,
    out: &mut Vec<ScriptEntry>,
    depth: usize,
) -> Result<()> {
    let path = archive.path;
    if depth > MAX_DEPTH {
        return Err(bad(path, format!("modules nested more than {MAX_DEPTH} deep")));
    }
    let here =
        if prefix.is_empty() { "the root".to_string() } else { prefix.trim_end_matches('.').to_string() };
    let Some((module, name, state)) = script_object(machine, v) else {
        return Err(bad(path, format!("{here}: not a TorchScript module object")));
    };
    let Some(members) = class_members(archive, classes, module, name)? else {
        return Err(bad(path, format!("no definition of module class {module}.{name} in code/")));
    };
    let State::Attributes(items) = state else {
        // Its state is whatever its own `__getstate__` returned, given back to
        // its `__setstate__` code on load: which tensor is which only that
        // code says. Nothing listed is lost where the class declares nothing.
        let mut has_submodules = false;
        for ty in &members.children {
            if let Some((m, n)) = ty.rsplit_once('.') {
                has_submodules |= class_members(archive, classes, m, n)?.is_some();
            }
        }
        if members.parameters.is_empty() && members.buffers.is_empty() && !has_submodules {
            return Ok(());
        }
        return Err(bad(
            path,
            format!(
                "module {here} ({module}.{name}) keeps its state through its own __setstate__ code: its \
                 tensors cannot be named without running that code, and only `verify` runs a model's \
                 code (the library's ModuleStore::open loads it through libtorch)"
            ),
        ));
    };
    let key_of = |k: &Value| match k {
        Value::Str(s) => Some(s.to_string()),
        _ => None,
    };
    // The state sets exactly the attributes the class declares (sets, not
    // pairwise: a Sequential may hold thousands of children).
    let declared: std::collections::HashSet<&str> = members.attributes.iter().map(String::as_str).collect();
    let set: std::collections::HashSet<&str> =
        items.iter().filter_map(|(k, _)| if let Value::Str(s) = k { Some(&**s) } else { None }).collect();
    if let Some(missing) = members.attributes.iter().find(|a| !set.contains(a.as_str())) {
        return Err(bad(
            path,
            format!(
                "module {here} ({module}.{name}) has no value for attribute {missing:?}, which its class \
                 declares: libtorch refuses to load it"
            ),
        ));
    }
    for (k, _) in items {
        match key_of(k) {
            Some(attr) if declared.contains(attr.as_str()) => {}
            other => {
                return Err(bad(
                    path,
                    format!(
                        "module {here} ({module}.{name}) sets attribute {:?}, which its class does not \
                         declare: libtorch refuses to load it",
                        other.unwrap_or_else(|| "(not a string)".into())
                    ),
                ))
            }
        }
    }
    for (role, names) in [(Role::Parameter, &members.parameters), (Role::Buffer, &members.buffers)] {
        for (k, value) in items {
            let Some(attr) = key_of(k) else { continue };
            if !names.contains(&attr) || !torch_pickle::is_tensor(machine, value) {
                continue;
            }
            let full = format!("{prefix}{attr}");
            let t = torch_pickle::tensor(machine, archive, value, 0).map_err(|e| match e {
                Error::Format { path, format, message } => {
                    Error::Format { path, format, message: format!("tensor {full}: {message}") }
                }
                other => other,
            })?;
            out.push((full, role, t));
        }
    }
    for (k, value) in items {
        let Some(attr) = key_of(k) else { continue };
        let Some((child_module, child_name, _)) = script_object(machine, value) else { continue };
        if class_members(archive, classes, child_module, child_name)?.is_some() {
            walk(machine, value, &format!("{prefix}{attr}."), archive, classes, out, depth + 1)?;
        }
    }
    Ok(())
}
