//! Executing a checked plan: under a no-grad guard, every pair copied in place
//! (the target's tensors keep their storage, dtype and device; values are
//! converted on the way), then every pair verified.
//!
//! Speed: the shim checks and describes every pair once (one parallel pass over
//! the tensors' metadata), then copies in batches, one call per batch, and
//! verifies, both from that description, so the per-tensor cost stays small on
//! models with tens of thousands of tensors: same-dtype contiguous CPU pairs are
//! moved and compared as bytes (in parallel when small), the rest go through
//! libtorch's `copy_`, non-blocking with pinned staging where CUDA takes part
//! and one synchronize at the end.
//!
//! Long because the copy in place and the standalone [`verify`] share their
//! preparation (checks, views, computed values) here; streaming into an
//! archive and computing values sit in their own files.
mod archive;
mod computed;

pub(crate) use computed::computed;

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tch::Tensor;

use crate::dtype::{self, Dtype};
use crate::error::{Error, Result};
use crate::ffi;
use crate::plan::{Plan, Policy};
use crate::store::{Source, Target};
use crate::transform::{Op, Transform};

/// Told how a copy advances. The library draws nothing itself: the command
/// line turns this into a progress bar.
pub trait Progress {
    /// The copy starts, with `bytes` to write in all.
    fn start(&self, bytes: u64);
    /// `bytes` more were written.
    fn advance(&self, bytes: u64);
    /// The copy ended (done, or failed).
    fn finish(&self);
}

/// How to copy.
#[derive(Clone, Copy)]
pub struct CopyOptions<'a> {
    /// Compare every pair after copying (on by default; one more pass over the bytes).
    pub verify: bool,
    /// Told of the copy's progress, a batch (up to 64 MB) at a time.
    pub progress: Option<&'a dyn Progress>,
}

impl Default for CopyOptions<'_> {
    fn default() -> Self {
        Self { verify: true, progress: None }
    }
}

impl std::fmt::Debug for CopyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("verify", &self.verify)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What a copy did.
#[derive(Debug, Clone, Serialize)]
pub struct Copied {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes written into the target.
    pub bytes: u64,
    /// Pairs whose dtype was converted.
    pub casts: usize,
    /// Seconds spent copying. For [`copy_to_file`], everything from the first
    /// byte read until the file is in place (the archive's rewrite, or the copy
    /// and the save; written, flushed to disk and renamed), less verification.
    pub copy_seconds: f64,
    /// Whether every pair was verified after the copy.
    pub verified: bool,
    /// Seconds spent verifying.
    pub verify_seconds: f64,
    /// The size of the file written, where the copy wrote one
    /// ([`copy_to_file`]): for a TorchScript archive, the whole rewrite (code,
    /// constants and records nothing wrote included).
    pub file_bytes: Option<u64>,
}

/// Bytes per call into the shim: large enough to amortise the call, small
/// enough for a progress bar to move.
const BATCH_BYTES: u64 = 64 << 20;

/// Checks `plan` under `policy`, then copies every pair from `source` into
/// `target` and (with `options.verify`) verifies each: bit for bit equal to the
/// source converted to the target's dtype. Nothing is written if the check
/// fails or if the stores are not the ones the plan was made for; and every
/// live tensor is checked for shape again before the first byte is written (the
/// plan's check refused every mismatch its entries showed; this catches a
/// tensor resized since).
pub fn copy(plan: &Plan, source: &dyn Source, target: &mut dyn Target, policy: &Policy) -> Result<Copied> {
    copy_with(plan, source, target, policy, CopyOptions::default())
}

/// Copies `plan` from `source` into `target` and writes the result to `out`
/// in the target's own kind (whole or not at all), as [`copy_with`] followed
/// by [`Target::save`] would — except that a TorchScript archive
/// ([`ScriptArchive`](crate::ScriptArchive)) is not copied into at all: the
/// archive is rewritten into `out` one storage record at a time, each made
/// from the sources as the writer reaches it, checked and verified as
/// [`copy_with`] does, so that memory stays bounded by the largest record and
/// `target` is left as it was. Other targets are written in place, then saved.
pub fn copy_to_file(
    plan: &Plan,
    source: &dyn Source,
    target: &mut dyn Target,
    out: &Path,
    policy: &Policy,
    options: CopyOptions,
) -> Result<Copied> {
    let start = Instant::now();
    let mut copied = if let Some(archive) = target.as_script_archive() {
        let mut copied = None;
        crate::files::write_atomically(out, |temp| {
            copied = Some(archive::stream(plan, source, archive, temp, policy, options)?);
            Ok(())
        })?;
        copied.ok_or_else(|| rejected(plan, "the archive was not written".into()))?
    } else {
        let copied = copy_with(plan, source, target, policy, options)?;
        target.save(out)?;
        copied
    };
    // The time until OUT is in place, not only the part spent in the copy
    // engine: a rewrite's records are written (and the whole file flushed)
    // after the engine hands them over.
    copied.copy_seconds = (start.elapsed().as_secs_f64() - copied.verify_seconds).max(copied.copy_seconds);
    copied.file_bytes = Some(crate::files::size_written(out)?);
    Ok(copied)
}

/// [`copy`] with options.
pub fn copy_with(
    plan: &Plan,
    source: &dyn Source,
    target: &mut dyn Target,
    policy: &Policy,
    options: CopyOptions,
) -> Result<Copied> {
    let sources = prepared_sources(plan, source, &*target, policy)?;
    let target_origin = target.origin().to_string();
    let all_targets = target.tensors_mut();
    let in_range: Vec<&Tensor> = plan
        .pairs
        .iter()
        .map(|p| {
            all_targets.get(p.target).ok_or_else(|| {
                rejected(
                    plan,
                    format!("{target_origin} has no tensor for {} (or it is named twice)", p.target_name),
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut regions = transformed(plan, &in_range, |t| &t.target_ops, |t, x| t.target_view(x))
        .map_err(|(k, e)| transform_failed(plan, k, "target", e))?;
    drop(in_range);
    // One `&mut` per pair: a plan gives every target one source, or regions of
    // it (which it checked tile the target) to several.
    let mut slots: Vec<Option<&mut Tensor>> = all_targets.iter_mut().map(Some).collect();
    for (pair, region) in plan.pairs.iter().zip(&regions) {
        if region.is_some() {
            slots[pair.target] = None;
        }
    }
    let mut targets = Vec::with_capacity(plan.pairs.len());
    for (pair, region) in plan.pairs.iter().zip(regions.iter_mut()) {
        let slot = match region {
            Some(view) => Some(view),
            None => slots.get_mut(pair.target).and_then(Option::take),
        };
        targets.push(slot.ok_or_else(|| {
            rejected(
                plan,
                format!("{target_origin} has no tensor for {} (or it is named twice)", pair.target_name),
            )
        })?);
    }
    let all: Vec<usize> = (0..plan.pairs.len()).collect();
    let sources = sources.all();
    let _no_grad = tch::no_grad_guard();
    let ran = run_pairs(plan, &all, targets, &sources, options, true)?;
    Ok(Copied {
        tensors: plan.pairs.len(),
        bytes: ran.bytes,
        casts: plan.pairs.iter().filter(|p| p.cast.is_some()).count(),
        copy_seconds: ran.copy_seconds,
        verified: options.verify,
        verify_seconds: ran.verify_seconds,
        file_bytes: None,
    })
}

/// The plan refused, for `problem` (nothing was written).
pub(crate) fn rejected(plan: &Plan, problem: String) -> Error {
    Error::PlanRejected { from: plan.source.clone(), target: plan.target.clone(), problems: vec![problem] }
}

fn transform_failed(plan: &Plan, k: usize, side: &str, e: tch::TchError) -> Error {
    Error::CopyFailed {
        store: plan.target.clone(),
        tensor: Some(plan.pairs[k].target_name.to_string()),
        message: format!("the transform's view of the {side} failed: {e} (nothing was written)"),
    }
}

/// Each pair's source as the copy reads it: the source's tensor, or its
/// transform's view of it.
struct Prepared<'a> {
    raw: Vec<&'a Tensor>,
    views: Vec<Option<Tensor>>,
}

impl Prepared<'_> {
    /// The tensor pair `k` reads.
    fn get(&self, k: usize) -> &Tensor {
        self.views[k].as_ref().unwrap_or(self.raw[k])
    }

    /// Every pair's, in pair order.
    fn all(&self) -> Vec<&Tensor> {
        (0..self.raw.len()).map(|k| self.get(k)).collect()
    }
}

/// Everything checked before a byte is written — `plan` under `policy`, the
/// stores being the plan's, no value lost by a cast — and each pair's source
/// as the copy reads it (through its transform's view).
fn prepared_sources<'a>(
    plan: &Plan,
    source: &'a dyn Source,
    target: &dyn Source,
    policy: &Policy,
) -> Result<Prepared<'a>> {
    plan.check(policy)?;
    plan.ensure_fits(source, target)?;
    let raw = source_tensors(plan, source, |name| {
        rejected(plan, format!("{} has no tensor for {name}", source.origin()))
    })?;
    // A transform's source is a view of it (or a reshaped copy, where no view
    // can express the ops).
    let mut views = transformed(plan, &raw, |t| &t.source_ops, |t, x| t.source_view(x))
        .map_err(|(k, e)| transform_failed(plan, k, "source", e))?;
    for k in 0..plan.pairs.len() {
        if let Some(values) = computed(plan, k, views[k].as_ref().unwrap_or(raw[k]), source)? {
            views[k] = Some(values);
        }
    }
    let sources = Prepared { raw, views };
    if !policy.allow_lossy_casts {
        let lost: Vec<String> = plan
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(k, pair)| {
                let tensor = sources.get(k);
                let cast = pair.cast.as_ref()?;
                let why = value_loss(tensor, cast.from, cast.to)?;
                Some(format!(
                    "lossy cast: {} -> {}: {why} (allow it with --allow-lossy, Policy::allow_lossy_casts in the library)",
                    pair.source_name, pair.target_name
                ))
            })
            .collect();
        if !lost.is_empty() {
            return Err(Error::PlanRejected {
                from: plan.source.clone(),
                target: plan.target.clone(),
                problems: lost,
            });
        }
    }
    Ok(sources)
}

/// What [`run_pairs`] did.
struct Ran {
    bytes: u64,
    copy_seconds: f64,
    verify_seconds: f64,
}

/// Copies the pairs `ks` of `plan` (`targets[i]` receives `sources[i]`, the
/// pair `ks[i]`) in batches, then verifies them (with `options.verify`):
/// every pair checked and described before anything is written. `announce`:
/// this run is the whole copy, so it starts and finishes the progress.
fn run_pairs(
    plan: &Plan,
    ks: &[usize],
    targets: Vec<&mut Tensor>,
    sources: &[&Tensor],
    options: CopyOptions,
    announce: bool,
) -> Result<Ran> {
    let copy_failed = |(index, message): ffi::PairError| match index {
        Some(i) => Error::CopyFailed {
            store: plan.target.clone(),
            tensor: Some(plan.pairs[ks[i]].target_name.to_string()),
            message,
        },
        None => Error::CopyFailed { store: plan.target.clone(), tensor: None, message },
    };
    let start = Instant::now();
    // Every pair is checked (shapes) and described before any batch is written.
    let kinds: Vec<Option<tch::Kind>> = targets.iter().map(|t| t.f_kind().ok()).collect();
    let mut pairs = ffi::Pairs::to_write(targets, sources).map_err(copy_failed)?;
    // Two pairs that fill one tied target with converted values: equal when
    // their sources are, bit for bit, once converted as the copy converts them.
    let converted_equal = |a: usize, b: usize| {
        let bytes = |i: usize| {
            let kind = kinds[i].ok_or(tch::TchError::Kind("a dtype tch has no kind for".into()))?;
            sources[i]
                .f_to_kind(kind)
                .and_then(|t| t.f_to_device(tch::Device::Cpu))
                .and_then(|t| t.f_contiguous())
                .and_then(|t| t.f_reshape([-1]))
                .and_then(|t| t.f_view_dtype(tch::Kind::Uint8))
        };
        kinds[a].is_some()
            && kinds[a] == kinds[b]
            && matches!((bytes(a), bytes(b)), (Ok(x), Ok(y)) if x.size() == y.size() && x.equal(&y))
    };
    if let Some((a, b)) = pairs.first_conflict(&converted_equal) {
        let (a, b) = (&plan.pairs[ks[a]], &plan.pairs[ks[b]]);
        return Err(rejected(
            plan,
            format!(
                "{} and {} share memory (tied weights?) but would receive different values from {} and {}: \
                 skip one with a rule",
                a.target_name, b.target_name, a.source_name, b.source_name
            ),
        ));
    }
    let mut batches: Vec<usize> = vec![0];
    let (mut bytes, mut batch_bytes) = (0u64, 0u64);
    for i in 0..ks.len() {
        bytes += pairs.bytes(i);
        batch_bytes += pairs.bytes(i);
        if batch_bytes >= BATCH_BYTES {
            batches.push(i + 1);
            batch_bytes = 0;
        }
    }
    if batches.last() != Some(&ks.len()) {
        batches.push(ks.len());
    }
    let progress = options.progress;
    if let (Some(progress), true) = (progress, announce) {
        progress.start(bytes);
    }
    for window in batches.windows(2) {
        let (from, to) = (window[0], window[1]);
        let written = pairs.copy(from..to).map_err(copy_failed);
        if let Some(progress) = progress {
            match written {
                Ok(()) => progress.advance((from..to).map(|i| pairs.bytes(i)).sum()),
                Err(_) => progress.finish(),
            }
        }
        written?;
    }
    if let (Some(progress), true) = (progress, announce) {
        progress.finish();
    }
    let copy_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    if options.verify {
        let mismatch = pairs.first_mismatch().map_err(|message| Error::CopyFailed {
            store: plan.target.clone(),
            tensor: None,
            message,
        })?;
        if let Some(i) = mismatch {
            return Err(verification_failed(plan, ks[i]));
        }
    }
    Ok(Ran { bytes, copy_seconds, verify_seconds: start.elapsed().as_secs_f64() })
}

/// Why converting `tensor` (of `from`) to `to` loses information because of
/// its values: out of `to`'s range, or not 0/1 for a bool. (Losses whatever the
/// values, such as float to integer, are the plan's findings.)
pub(crate) fn value_loss(tensor: &Tensor, from: Dtype, to: Dtype) -> Option<String> {
    if from == to || dtype::static_loss(from, to).is_some() || tensor.numel() == 0 {
        return None;
    }
    let (lo, hi) = dtype::range(to)?;
    // The extremes in the tensor's own dtype, then as f64 (no f64 copy of the
    // tensor: it doubled a conversion's peak memory for every float tensor).
    let (min, max) =
        (tensor.f_min().ok()?.f_double_value(&[]).ok()?, tensor.f_max().ok()?.f_double_value(&[]).ok()?);
    let to_name = dtype::name(to);
    if min < lo || max > hi {
        return Some(format!("values {min}..{max} do not fit {to_name} ({lo}..{hi})"));
    }
    if to == Dtype::Bool {
        let binary = tensor.f_eq(0.0).ok()?.f_logical_or(&tensor.f_eq(1.0).ok()?).ok()?.f_all().ok()?;
        if binary.f_int64_value(&[]).ok().is_none_or(|v| v == 0) {
            return Some(format!("{} values other than 0 and 1 cannot become bool", dtype::name(from)));
        }
    }
    None
}

/// Each pair's `tensors[k]` seen through its transform's ops (`None` where it
/// has none); the error gives the pair's index.
fn transformed(
    plan: &Plan,
    tensors: &[&Tensor],
    ops: impl Fn(&Transform) -> &Vec<Op>,
    view: impl Fn(&Transform, &Tensor) -> std::result::Result<Tensor, tch::TchError>,
) -> std::result::Result<Vec<Option<Tensor>>, (usize, tch::TchError)> {
    plan.pairs
        .iter()
        .zip(tensors)
        .enumerate()
        .map(|(k, (pair, tensor))| match &pair.transform {
            Some(t) if !ops(t).is_empty() => view(t, tensor).map(Some).map_err(|e| (k, e)),
            _ => Ok(None),
        })
        .collect()
}

/// The source tensor of every pair of `plan`, in pair order.
fn source_tensors<'a>(
    plan: &Plan,
    source: &'a dyn Source,
    missing: impl Fn(&str) -> Error,
) -> Result<Vec<&'a Tensor>> {
    plan.pairs
        .iter()
        .map(|pair| source.tensor(pair.source).ok_or_else(|| missing(&pair.source_name)))
        .collect()
}

fn verification_failed(plan: &Plan, i: usize) -> Error {
    let pair = &plan.pairs[i];
    Error::Verification { source_name: pair.source_name.to_string(), target: pair.target_name.to_string() }
}

fn compare(plan: &Plan, pairs: &ffi::Pairs) -> Result<()> {
    let mismatch = pairs.first_mismatch().map_err(|message| Error::CopyFailed {
        store: plan.target.clone(),
        tensor: None,
        message,
    })?;
    match mismatch {
        Some(i) => Err(verification_failed(plan, i)),
        None => Ok(()),
    }
}

/// Checks that every pair of `plan` holds in `target` what it holds in `source`
/// (bit for bit, after converting to the target's dtype and device); the error
/// names the first pair that does not.
pub fn verify(plan: &Plan, source: &dyn Source, target: &dyn Source) -> Result<()> {
    let missing = |store: &dyn Source, name: &str| Error::MissingTensor {
        store: store.origin().to_string(),
        tensor: name.to_string(),
    };
    let mut raw_sources = Vec::with_capacity(plan.pairs.len());
    let mut raw_targets = Vec::with_capacity(plan.pairs.len());
    for pair in &plan.pairs {
        raw_sources.push(source.tensor(pair.source).ok_or_else(|| missing(source, &pair.source_name))?);
        raw_targets.push(target.tensor(pair.target).ok_or_else(|| missing(target, &pair.target_name))?);
    }
    // What was written is compared with the transformed source.
    let view_failed = |(k, e): (usize, tch::TchError)| Error::CopyFailed {
        store: plan.target.clone(),
        tensor: Some(plan.pairs[k].target_name.to_string()),
        message: format!("the transform's view failed: {e}"),
    };
    let source_views =
        transformed(plan, &raw_sources, |t| &t.source_ops, |t, x| t.source_view(x)).map_err(view_failed)?;
    let target_views =
        transformed(plan, &raw_targets, |t| &t.target_ops, |t, x| t.target_view(x)).map_err(view_failed)?;
    let mut source_views = source_views;
    for k in 0..plan.pairs.len() {
        if let Some(values) = computed(plan, k, source_views[k].as_ref().unwrap_or(raw_sources[k]), source)? {
            source_views[k] = Some(values);
        }
    }
    let sources: Vec<&Tensor> =
        raw_sources.iter().zip(&source_views).map(|(&t, v)| v.as_ref().unwrap_or(t)).collect();
    let targets: Vec<&Tensor> =
        raw_targets.iter().zip(&target_views).map(|(&t, v)| v.as_ref().unwrap_or(t)).collect();
    // Tensors of other shapes cannot hold the same values.
    let pairs = ffi::Pairs::to_read(&targets, &sources).map_err(|(index, message)| match index {
        Some(i) => verification_failed(plan, i),
        None => Error::CopyFailed { store: plan.target.clone(), tensor: None, message },
    })?;
    compare(plan, &pairs)
}
