//! Converting a checkpoint with no target model: the names the rules make are
//! the result's names.
//!
//! [`Outline::of`] works out, from the source's entries and the rules alone,
//! every tensor the result will hold (name, dtype, shape, in the source's
//! order); the plan is then an ordinary [`Plan`] from the source into that
//! outline, so collisions, unused rules, bad transforms and lossy casts are
//! found and reported exactly as for a copy, before anything is written.
//! [`convert`] then writes the result one tensor at a time: each is made from
//! its sources (a view where no transform or cast needs more, else one new
//! tensor), written, and the source pages it read are handed back to the
//! kernel, so that memory holds about one tensor, not the model.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::copy::{value_loss, Progress};
use crate::dtype;
use crate::entry::{Entry, EntryOrder, Format};
use crate::error::{Error, Result};
use crate::format::{self, npz, safetensors, tch_archive, torch_pickle, Outgoing};
use crate::matching::Matcher;
use crate::plan::{Mapping, Plan, Policy};
use crate::rules::{Action, Outcome};
use crate::store::{Source, StoreKind};
use crate::transform::{normalize, shape_after, Transform};

/// The tensors a conversion will write: entries only, no values. A [`Source`]
/// so that a [`Plan`] can be made into it.
#[derive(Debug, Clone)]
pub struct Outline {
    origin: String,
    entries: Vec<Entry>,
    order: EntryOrder,
}

impl Source for Outline {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Checkpoint(Format::Safetensors)
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entry_order(&self) -> EntryOrder {
        self.order
    }
    /// An outline has no values.
    fn tensor(&self, _: usize) -> Option<&Tensor> {
        None
    }
}

/// The dtype a source tensor of `kind` is written as: `dtype` for floating
/// tensors when asked, else its own (integer buffers stay integers).
fn written_kind(kind: Kind, dtype: Option<Kind>) -> Kind {
    match dtype {
        Some(to) if dtype::is_floating(kind) => to,
        _ => kind,
    }
}

/// A `cat` group as the outline sees it: where its first member is, the
/// target's name, each member's shape once found, the entry it will make.
struct Group {
    first: usize,
    to: String,
    shapes: Vec<Option<Vec<i64>>>,
    entry: Entry,
}

/// The sizes of a split's parts, if they fit the shape the rule's ops make.
fn split_shapes(shape: &[i64], dim: i64, sizes: Option<&Vec<i64>>, parts: usize) -> Option<Vec<Vec<i64>>> {
    let d = normalize(dim, shape.len(), shape).ok()?;
    let sizes = match sizes {
        Some(sizes) => sizes.clone(),
        None if parts > 0 && shape[d] % parts as i64 == 0 => vec![shape[d] / parts as i64; parts],
        None => return None,
    };
    (sizes.iter().sum::<i64>() == shape[d]).then(|| {
        sizes
            .iter()
            .map(|&s| {
                let mut part = shape.to_vec();
                part[d] = s;
                part
            })
            .collect()
    })
}

impl Outline {
    /// What `mapping`'s rules make of `source`'s entries: one tensor per kept or
    /// renamed name (shaped by its ops), per part of a split, per group of a
    /// `cat`; skipped names make none. Where a transform cannot apply, the
    /// source's own shape stands in: the plan then reports the problem. Two
    /// sources making one name make one entry: the plan reports the collision.
    /// `dtype` converts floating tensors.
    pub fn of(source: &dyn Source, mapping: &Mapping, origin: &str, dtype: Option<Kind>) -> Self {
        let rules = &mapping.rules;
        // (position, entry), the position being the first source's index and the
        // part's place, so the result keeps the source's order.
        let mut made: Vec<((usize, usize), Entry)> = Vec::new();
        let mut groups: HashMap<(usize, Vec<String>), Group> = HashMap::new();
        for (i, e) in source.entries().iter().enumerate() {
            let entry = |name: &str, shape: Vec<i64>| Entry {
                name: name.into(),
                shape,
                dtype: written_kind(e.dtype, dtype),
                device: tch::Device::Cpu,
                ..e.clone()
            };
            match rules.apply(&e.name) {
                Outcome::Skipped { .. } => {}
                Outcome::Kept => made.push(((i, 0), entry(&e.name, e.shape.clone()))),
                Outcome::Renamed { to, rule } => {
                    let shape =
                        shape_after(&rules.rules()[rule].ops, &e.shape).unwrap_or_else(|_| e.shape.clone());
                    made.push(((i, 0), entry(&to, shape)));
                }
                Outcome::Split { to, rule } => {
                    let r = &rules.rules()[rule];
                    let Action::Split { dim, sizes, .. } = &r.action else { continue };
                    let shapes = shape_after(&r.ops, &e.shape)
                        .ok()
                        .and_then(|shape| split_shapes(&shape, *dim, sizes.as_ref(), to.len()));
                    for (k, name) in to.iter().enumerate() {
                        let shape = shapes.as_ref().map_or_else(|| e.shape.clone(), |s| s[k].clone());
                        made.push(((i, k), entry(name, shape)));
                    }
                }
                Outcome::Member { to, rule, member, key } => {
                    let members = rules.rules()[rule].patterns().len();
                    let group = groups.entry((rule, key)).or_insert_with(|| Group {
                        first: i,
                        to,
                        shapes: vec![None; members],
                        entry: entry("", e.shape.clone()),
                    });
                    group.shapes[member].get_or_insert_with(|| e.shape.clone());
                }
            }
        }
        for ((rule, _), Group { first, to, shapes, entry: mut e }) in groups {
            let r = &rules.rules()[rule];
            let Action::Cat { dim, .. } = &r.action else { continue };
            if let Some(shapes) = shapes.into_iter().collect::<Option<Vec<_>>>() {
                let joined = normalize(*dim, shapes[0].len(), &shapes[0]).ok().map(|d| {
                    let mut shape = shapes[0].clone();
                    shape[d] = shapes.iter().map(|s| s.get(d).copied().unwrap_or(0)).sum();
                    shape
                });
                if let Some(shape) = joined.and_then(|s| shape_after(&r.ops, &s).ok()) {
                    e.shape = shape;
                }
            }
            e.name = to.as_str().into();
            made.push(((first, 0), e));
        }
        made.sort_by_key(|(at, _)| *at);
        let mut seen = std::collections::HashSet::new();
        let entries = made.into_iter().map(|(_, e)| e).filter(|e| seen.insert(e.name.clone())).collect();
        Self { origin: origin.to_string(), entries, order: source.entry_order() }
    }
}

/// Plans converting `source` by `mapping`'s rules into `out`: the outline of
/// the result, and the plan from the source into it (names must be equal after
/// the rules: no matcher guesses where there is no target).
pub fn plan_conversion(
    source: &dyn Source,
    mapping: &Mapping,
    out: &Path,
    dtype: Option<Kind>,
) -> Result<(Plan, Outline)> {
    let outline = Outline::of(source, mapping, &out.display().to_string(), dtype);
    let exact = Mapping { rules: mapping.rules.clone(), matcher: Matcher::Exact, source_order: None };
    let plan = Plan::build(source, &outline, &exact)?;
    Ok((plan, outline))
}

/// What to write, and how.
#[derive(Clone, Copy, Default)]
pub struct ConvertOptions<'a> {
    /// The format; `None`: from the output's extension (`.safetensors`,
    /// `.safetensors.index.json` for shards, `.pth`/`.bin`/`.pt`, `.npz`, `.ot`).
    pub format: Option<Format>,
    /// For sharded safetensors: the most bytes of tensors per shard (one tensor
    /// larger than this gets a shard of its own). Default 5 GB.
    pub max_shard_bytes: Option<u64>,
    /// Told of the conversion's progress, a tensor at a time.
    pub progress: Option<&'a dyn Progress>,
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("format", &self.format)
            .field("max_shard_bytes", &self.max_shard_bytes)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// The default shard size of sharded safetensors.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// One file a conversion wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenFile {
    /// The file.
    pub path: PathBuf,
    /// Tensors in it.
    pub tensors: usize,
    /// Bytes of tensor data in it.
    pub bytes: u64,
}

/// What a conversion wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Converted {
    /// The format written.
    pub format: String,
    /// Every file, shards first and the index last for sharded safetensors.
    pub files: Vec<WrittenFile>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Tensors whose dtype was converted.
    pub casts: usize,
    /// Tensors made through a transform.
    pub transformed: usize,
    /// Names that shared memory in the source (tied weights), each written as
    /// its own tensor: none of the formats written shares storage between names.
    pub untied: Vec<Vec<String>>,
    /// Seconds spent.
    pub seconds: f64,
}

/// The format `out` is written in.
fn format_of(out: &Path, options: &ConvertOptions) -> Result<Format> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    let format = options.format.or_else(|| Format::for_extension(out)).or_else(|| {
        // `.pt` holds modules and state dicts alike; a conversion writes state dicts.
        name.ends_with(".pt").then_some(Format::TorchSave)
    });
    match format {
        Some(f @ (Format::Safetensors | Format::TorchSave | Format::Npz | Format::TchArchive)) => {
            if options.max_shard_bytes.is_some() {
                return Err(Error::Output {
                    path: out.into(),
                    reason: "--max-shard-size writes sharded safetensors: name the index, \
                             as DIR/model.safetensors.index.json"
                        .into(),
                });
            }
            Ok(f)
        }
        Some(Format::SafetensorsIndex) if name.ends_with(".safetensors.index.json") => {
            Ok(Format::SafetensorsIndex)
        }
        _ => Err(Error::Output {
            path: out.into(),
            reason: "cannot tell the format to write from the name: end it in .safetensors, \
                     .safetensors.index.json (sharded), .pth, .bin, .pt, .npz or .ot"
                .into(),
        }),
    }
}

/// Hands the pages of `tensor` back to the kernel (a hint, never a loss: the
/// pages of a mapped file are read again if needed, others are kept or swapped),
/// so that a conversion's memory does not grow with the model.
fn release(tensor: &Tensor) {
    #[cfg(target_os = "linux")]
    {
        const MADV_PAGEOUT: libc::c_int = 21;
        let bytes = tensor.numel() * dtype::size(tensor.kind());
        if tensor.device() != tch::Device::Cpu || bytes < (1 << 20) || !tensor.is_contiguous() {
            return;
        }
        let page = 4096usize;
        let start = tensor.data_ptr() as usize;
        let (from, to) = (start.div_ceil(page) * page, (start + bytes) / page * page);
        if to > from {
            // SAFETY: the range lies within the tensor's own bytes; MADV_PAGEOUT
            // only asks the kernel to reclaim them and never changes their contents.
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, MADV_PAGEOUT);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tensor;
}

/// Makes the values of `outline`'s entry `j` from the plan's pairs into it:
/// the source itself (viewed through its ops) where one pair needs no cast,
/// else a new tensor each pair writes its region of.
fn make(
    plan: &Plan,
    pairs: &[usize],
    source: &dyn Source,
    outline: &Outline,
    j: usize,
    policy: &Policy,
) -> Result<Tensor> {
    let entry = &outline.entries[j];
    let failed = |e: tch::TchError| Error::Tensor {
        store: outline.origin.clone(),
        tensor: entry.name.to_string(),
        source: e,
    };
    let view = |k: usize| -> Result<Tensor> {
        let pair = &plan.pairs[k];
        let tensor = source.tensor(pair.source).ok_or_else(|| Error::MissingTensor {
            store: source.origin().to_string(),
            tensor: pair.source_name.to_string(),
        })?;
        let view = match &pair.transform {
            Some(t) => t.source_view(tensor).map_err(failed)?,
            None => tensor.shallow_clone(),
        };
        if let Some(cast) = pair.cast.as_ref().filter(|_| !policy.allow_lossy_casts) {
            if let Some(why) = value_loss(&view, cast.from, cast.to) {
                return Err(Error::PlanRejected {
                    from: plan.source.clone(),
                    target: plan.target.clone(),
                    problems: vec![format!(
                        "lossy cast: {} -> {}: {why} (allow it with --allow-lossy, Policy::allow_lossy_casts in the library)",
                        pair.source_name, pair.target_name
                    )],
                });
            }
        }
        Ok(view)
    };
    let whole =
        |k: usize| plan.pairs[k].transform.as_ref().is_none_or(|t: &Transform| t.target_ops.is_empty());
    if let [k] = pairs {
        if whole(*k) {
            return view(*k)?.f_to_kind(entry.dtype).map_err(failed);
        }
    }
    let out = Tensor::f_empty(entry.shape.as_slice(), (entry.dtype, tch::Device::Cpu)).map_err(failed)?;
    for &k in pairs {
        let mut region = match &plan.pairs[k].transform {
            Some(t) => t.target_view(&out).map_err(failed)?,
            None => out.shallow_clone(),
        };
        region.f_copy_(&view(k)?).map_err(failed)?;
    }
    Ok(out)
}

/// Groups of names that share memory in `source` among those `plan` writes
/// from whole tensors (tied weights).
fn ties(plan: &Plan, source: &dyn Source) -> Vec<Vec<String>> {
    let mut by_place: BTreeMap<(usize, usize, Vec<i64>), Vec<String>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for pair in &plan.pairs {
        let Some(t) = source.tensor(pair.source) else { continue };
        if t.numel() == 0 || t.device() != tch::Device::Cpu || !seen.insert(pair.source) {
            continue;
        }
        let key = (t.data_ptr() as usize, t.numel(), t.size());
        by_place.entry(key).or_default().push(pair.source_name.to_string());
    }
    by_place.into_values().filter(|names| names.len() > 1).collect()
}

/// Writes the result of `plan` (made by [`plan_conversion`]) to `out`, whole
/// or not at all (a sharded result appears as a whole set or not at all):
/// checked under `policy` first, then one tensor at a time, each made from the
/// source's bytes.
pub fn convert(
    plan: &Plan,
    source: &dyn Source,
    outline: &Outline,
    out: &Path,
    policy: &Policy,
    options: ConvertOptions,
) -> Result<Converted> {
    let start = Instant::now();
    plan.check(policy)?;
    plan.ensure_fits(source, outline)?;
    let format = format_of(out, &options)?;
    let entries = outline.entries();
    let mut into: Vec<Vec<usize>> = vec![Vec::new(); entries.len()];
    for (k, pair) in plan.pairs.iter().enumerate() {
        into[pair.target].push(k);
    }
    // Only what the pairs fill is written (a complete plan fills every entry).
    let written: Vec<usize> = (0..entries.len()).filter(|&j| !into[j].is_empty()).collect();
    let outgoing: Vec<Outgoing> = written
        .iter()
        .map(|&j| Outgoing {
            name: entries[j].name.to_string(),
            kind: entries[j].dtype,
            shape: entries[j].shape.clone(),
        })
        .collect();
    let total: u64 = outgoing.iter().map(|o| o.bytes() as u64).sum();
    if let Some(progress) = options.progress {
        progress.start(total);
    }
    let produce = |i: usize| -> Result<Tensor> {
        let j = written[i];
        let tensor = make(plan, &into[j], source, outline, j, policy)?;
        if let Some(progress) = options.progress {
            progress.advance(outgoing[i].bytes() as u64);
        }
        Ok(tensor)
    };
    // Once a tensor is written (the writer asks for the next one, or is done),
    // the source pages it came from are released.
    let release_sources = |i: usize| {
        for &k in &into[written[i]] {
            if let Some(t) = source.tensor(plan.pairs[k].source) {
                release(t);
            }
        }
    };
    let mut last: Option<usize> = None;
    let mut released = |i: usize| -> Result<Tensor> {
        if let Some(previous) = last.replace(i) {
            release_sources(previous);
        }
        produce(i)
    };
    let mut metadata = match source.kind() {
        StoreKind::Checkpoint(Format::Safetensors | Format::SafetensorsIndex) => source.metadata(),
        _ => BTreeMap::new(),
    };
    let files = match format {
        Format::SafetensorsIndex => {
            note_origin(
                &mut metadata,
                source,
                &plan.pairs.iter().filter_map(|p| p.rule.as_deref()).collect::<Vec<_>>(),
            );
            let max = options.max_shard_bytes.unwrap_or(DEFAULT_MAX_SHARD_BYTES);
            let result = write_shards(out, &outgoing, &metadata, max, &mut released);
            if let Some(progress) = options.progress {
                progress.finish();
            }
            result?
        }
        _ => {
            let result = crate::files::write_atomically(out, |temp| match format {
                Format::Safetensors => {
                    note_origin(
                        &mut metadata,
                        source,
                        &plan.pairs.iter().filter_map(|p| p.rule.as_deref()).collect::<Vec<_>>(),
                    );
                    safetensors::write_stream(temp, &outgoing, &metadata, &mut released)
                }
                Format::TorchSave => torch_pickle::write_stream(temp, &outgoing, None, &mut released),
                Format::Npz => npz::write_stream(temp, &outgoing, &mut released),
                // libtorch writes `.ot` files in one go: every tensor is made first.
                _ => {
                    let all = (0..outgoing.len())
                        .map(|i| Ok((outgoing[i].name.clone(), released(i)?)))
                        .collect::<Result<Vec<_>>>()?;
                    tch_archive::write(temp, &all)
                }
            });
            if let Some(progress) = options.progress {
                progress.finish();
            }
            result?;
            vec![WrittenFile { path: out.into(), tensors: outgoing.len(), bytes: total }]
        }
    };
    if let Some(i) = last {
        release_sources(i);
    }
    Ok(Converted {
        format: format.to_string(),
        files,
        tensors: outgoing.len(),
        bytes: total,
        casts: plan.pairs.iter().filter(|p| p.cast.is_some()).count(),
        transformed: plan.pairs.iter().filter(|p| p.transform.is_some()).count(),
        untied: ties(plan, source),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Notes, in safetensors metadata, where the result came from and which rules
/// made it; `format: pt` is kept or added (Hugging Face loaders require it).
fn note_origin(metadata: &mut BTreeMap<String, String>, source: &dyn Source, rules: &[&str]) {
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    metadata.insert("transplant.source_format".into(), source.kind().to_string());
    let mut unique: Vec<&str> = Vec::new();
    for rule in rules {
        if !unique.contains(rule) {
            unique.push(rule);
        }
    }
    if !unique.is_empty() {
        metadata.insert("transplant.rules".into(), unique.join("\n"));
    }
}

/// Writes sharded safetensors: shards of at most `max` bytes of tensors (in
/// order; a larger tensor alone), named `STEM-0000K-of-0000N.safetensors` next
/// to the index `STEM.safetensors.index.json`, which lists every tensor's shard
/// and the total size. The set appears whole or not at all.
fn write_shards(
    index: &Path,
    outgoing: &[Outgoing],
    metadata: &BTreeMap<String, String>,
    max: u64,
    produce: format::Produce,
) -> Result<Vec<WrittenFile>> {
    let name = index.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let stem = &name[..name.len() - ".safetensors.index.json".len()];
    let mut shards: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut begin, mut bytes) = (0usize, 0u64);
    for (i, o) in outgoing.iter().enumerate() {
        let size = o.bytes() as u64;
        if i > begin && bytes + size > max {
            shards.push(begin..i);
            (begin, bytes) = (i, 0);
        }
        bytes += size;
    }
    if begin < outgoing.len() || shards.is_empty() {
        shards.push(begin..outgoing.len());
    }
    let n = shards.len();
    let folder = index.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let shard_names: Vec<String> = (1..=n).map(|k| format!("{stem}-{k:05}-of-{n:05}.safetensors")).collect();
    let mut paths: Vec<PathBuf> = shard_names.iter().map(|s| folder.join(s)).collect();
    paths.push(index.to_path_buf());
    let total: u64 = outgoing.iter().map(|o| o.bytes() as u64).sum();
    let mut weight_map = serde_json::Map::new();
    for (range, shard) in shards.iter().zip(&shard_names) {
        for o in &outgoing[range.clone()] {
            weight_map.insert(o.name.clone(), serde_json::Value::String(shard.clone()));
        }
    }
    let mut index_metadata = serde_json::Map::new();
    index_metadata.insert("total_size".into(), serde_json::json!(total));
    for (k, v) in metadata {
        index_metadata.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let index_json = serde_json::to_vec_pretty(
        &serde_json::json!({ "metadata": index_metadata, "weight_map": weight_map }),
    )
    .map_err(|e| Error::Format {
        path: index.into(),
        format: "safetensors index",
        message: e.to_string(),
    })?;
    crate::files::write_set_atomically(&paths, |temps| {
        for (k, range) in shards.iter().enumerate() {
            let mut offset_produce = |i: usize| produce(range.start + i);
            safetensors::write_stream(&temps[k], &outgoing[range.clone()], metadata, &mut offset_produce)?;
        }
        std::fs::write(&temps[n], &index_json).map_err(|source| Error::Io { path: temps[n].clone(), source })
    })?;
    let mut files: Vec<WrittenFile> = shards
        .iter()
        .zip(&paths)
        .map(|(range, path)| WrittenFile {
            path: path.clone(),
            tensors: range.len(),
            bytes: outgoing[range.clone()].iter().map(|o| o.bytes() as u64).sum(),
        })
        .collect();
    files.push(WrittenFile { path: index.into(), tensors: 0, bytes: 0 });
    Ok(files)
}
