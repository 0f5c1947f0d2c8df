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
mod outline;
mod replace;
mod shards;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::copy::{value_loss, Progress};
use crate::entry::Format;
use crate::error::{Error, Result};
use crate::format::{npz, safetensors, tch_archive, torch_pickle, Outgoing};
use crate::matching::Matcher;
use crate::plan::{Mapping, Plan, Policy};
use crate::store::{Source, StoreKind};
use crate::transform::Transform;

pub use outline::Outline;
use shards::{note_origin, write_shards};

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
    let exact = Mapping { rules: mapping.rules.without_keeps(), matcher: Matcher::Exact, source_order: None };
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
    /// Names that share memory in the source (tied weights) and, in a format
    /// that cannot share storage between names (safetensors, `.npz`, `.ot`),
    /// were each written as a tensor of their own.
    pub untied: Vec<Vec<String>>,
    /// Names that share memory in the source and share one storage in the
    /// result (`torch.save`).
    pub tied: Vec<Vec<String>>,
    /// Seconds spent.
    pub seconds: f64,
}

/// The format `out` is written in.
fn format_of(out: &Path, options: &ConvertOptions) -> Result<Format> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    if out.as_os_str().to_string_lossy().ends_with('/') && options.max_shard_bytes.is_none() {
        return Ok(Format::DistributedCheckpoint);
    }
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
                     .safetensors.index.json (sharded), .pth, .bin, .pt, .npz or .ot, or in / for a \
                     Distributed Checkpoint folder"
                .into(),
        }),
    }
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
    let into = Into { shape: &entry.shape, dtype: entry.dtype, name: &entry.name, store: &outline.origin };
    assemble(plan, pairs, source, into, Some(policy))
}

/// The tensor [`assemble`] makes: its shape, dtype and name, and where it goes
/// (for messages).
pub(crate) struct Into<'a> {
    pub(crate) shape: &'a [i64],
    pub(crate) dtype: crate::dtype::Dtype,
    pub(crate) name: &'a str,
    pub(crate) store: &'a str,
}

/// One output tensor from `source` through the plan's `pairs` into it, on the
/// CPU: the source itself (viewed through its ops, computed where an op
/// computes) where one pair fills it whole, else a new tensor each pair writes
/// its region of. With a `policy` that forbids lossy casts, a cast that would
/// lose values is refused (the one place conversions and merges make values).
pub(crate) fn assemble(
    plan: &Plan,
    pairs: &[usize],
    source: &dyn Source,
    into: Into<'_>,
    policy: Option<&Policy>,
) -> Result<Tensor> {
    let failed = |e: tch::TchError| Error::Tensor {
        store: into.store.to_string(),
        tensor: into.name.to_string(),
        source: e,
    };
    let view = |k: usize| -> Result<Tensor> {
        let pair = &plan.pairs[k];
        let tensor = source.tensor(pair.source).ok_or_else(|| Error::MissingTensor {
            store: source.origin().to_string(),
            tensor: pair.source_name.to_string(),
        })?;
        let mut view = match &pair.transform {
            Some(t) => t.source_view(tensor).map_err(failed)?,
            None => tensor.shallow_clone(),
        };
        if let Some(values) = crate::copy::computed(plan, k, &view, source)? {
            view = values;
        }
        let strict = policy.is_some_and(|p| !p.allow_lossy_casts);
        if let Some(cast) = pair.cast.as_ref().filter(|_| strict) {
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
            let v = view(*k)?;
            let v = if v.device() == tch::Device::Cpu {
                v
            } else {
                v.f_to_device(tch::Device::Cpu).map_err(failed)?
            };
            return crate::ffi::to_dtype(&v, into.dtype).map_err(failed);
        }
    }
    let out = crate::ffi::empty(into.shape, into.dtype).map_err(failed)?;
    for &k in pairs {
        let mut region = match &plan.pairs[k].transform {
            Some(t) => t.target_view(&out).map_err(failed)?,
            None => out.shallow_clone(),
        };
        region.f_copy_(&view(k)?).map_err(failed)?;
    }
    Ok(out)
}

/// Tied weights among what is written: for each written tensor (index into
/// `written`), the first earlier one it equals because both come, with no
/// transform and no cast, from one source tensor or from source entries tied
/// to each other ([`Source::ties`]), on the CPU; and the groups of names tied so.
fn ties(
    plan: &Plan,
    source: &dyn Source,
    into: &[Vec<usize>],
    written: &[usize],
) -> (Vec<Option<usize>>, Vec<Vec<String>>) {
    // Each source entry stands for its tie group by the group's first member.
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    for group in source.ties() {
        for &i in &group {
            group_of.insert(i, group[0]);
        }
    }
    let mut first: HashMap<usize, usize> = HashMap::new();
    let mut same_as = vec![None; written.len()];
    let mut groups: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, &j) in written.iter().enumerate() {
        let [k] = into[j][..] else { continue };
        let pair = &plan.pairs[k];
        let Some(entry) = source.entries().get(pair.source) else { continue };
        if pair.transform.is_some()
            || pair.cast.is_some()
            || entry.numel() == 0
            || entry.device != tch::Device::Cpu
        {
            continue;
        }
        let key = group_of.get(&pair.source).copied().unwrap_or(pair.source);
        let earliest = *first.entry(key).or_insert(i);
        if earliest != i {
            same_as[i] = Some(earliest);
            let group = groups
                .entry(earliest)
                .or_insert_with(|| vec![plan.pairs[into[written[earliest]][0]].target_name.to_string()]);
            group.push(pair.target_name.to_string());
        }
    }
    (same_as, groups.into_values().collect())
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
    let outgoing: Vec<Outgoing> = written.iter().map(|&j| announced(&entries[j])).collect();
    let (same_as, tied) = ties(plan, source, &into, &written);
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
    let releaser = std::cell::RefCell::new(crate::format::PageReleaser::default());
    let release_sources = |i: usize| {
        for &k in &into[written[i]] {
            if let Some(t) = source.tensor(plan.pairs[k].source) {
                releaser.borrow_mut().release(t);
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
        Format::DistributedCheckpoint => {
            let result = crate::format::dcp::write_stream(out, &outgoing, None, &mut released);
            if let Some(progress) = options.progress {
                progress.finish();
            }
            result?;
            vec![WrittenFile { path: out.into(), tensors: outgoing.len(), bytes: total }]
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
                Format::TorchSave => {
                    torch_pickle::write_stream(temp, &outgoing, None, &same_as, &mut released)
                }
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
        untied: if format == Format::TorchSave { Vec::new() } else { tied.clone() },
        tied: if format == Format::TorchSave { tied } else { Vec::new() },
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What a writer announces of an entry.
fn announced(e: &crate::entry::Entry) -> Outgoing {
    Outgoing { name: e.name.to_string(), kind: e.dtype, shape: e.shape.clone() }
}

/// Tensor `i` of `store`, for a writer.
fn stored(store: &dyn Source, i: usize) -> Result<Tensor> {
    store.tensor(i).map(Tensor::shallow_clone).ok_or_else(|| Error::MissingTensor {
        store: store.origin().to_string(),
        tensor: store.entries().get(i).map_or_else(String::new, |e| e.name.to_string()),
    })
}

/// Writes every tensor of `store` as sharded safetensors: shards of at most
/// `max_shard_bytes` of tensors named after `index` (`DIR/STEM.safetensors.index.json`
/// gives `DIR/STEM-0000K-of-0000N.safetensors`), and the index; the set appears
/// whole or not at all. For `copy … -o DIR/model.safetensors.index.json`.
pub fn save_sharded(store: &dyn Source, index: &Path, max_shard_bytes: u64) -> Result<Vec<WrittenFile>> {
    let name = index.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    if !name.ends_with(".safetensors.index.json") {
        return Err(Error::Output {
            path: index.into(),
            reason: "a sharded checkpoint is written through its index: name it STEM.safetensors.index.json"
                .into(),
        });
    }
    let outgoing: Vec<Outgoing> = store.entries().iter().map(announced).collect();
    let mut metadata = store.metadata();
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    let mut produce = |i: usize| stored(store, i);
    write_shards(index, &outgoing, &metadata, max_shard_bytes, &mut produce)
}

/// Writes every tensor of `store` as a Distributed Checkpoint folder `out`
/// (new, or an old checkpoint folder, replaced whole): one writer, each tensor one chunk, names under
/// `prefix.` when given (the key a checkpoint was read under); the folder
/// appears whole or not at all. `torch.distributed.checkpoint.load` reads it
/// and reshards it as its state dict asks.
pub fn save_distributed(store: &dyn Source, out: &Path, prefix: Option<&str>) -> Result<()> {
    let outgoing: Vec<Outgoing> = store.entries().iter().map(announced).collect();
    let mut produce = |i: usize| stored(store, i);
    crate::format::dcp::write_stream(out, &outgoing, prefix, &mut produce)
}
