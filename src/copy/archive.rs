//! A copy into a TorchScript file, streamed: the archive is rewritten member
//! by member, and each storage record that receives values is made as the
//! writer reaches it — in a scratch buffer the size of the largest record,
//! filled from the sources through the same engine as every copy (checks,
//! casts, transforms, verification), written, and the sources' pages handed
//! back — so that memory does not grow with the model and the target file is
//! never copied into memory. Records nothing writes are copied through as
//! they are, like the code and every other member.
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use tch::{Kind, Tensor};

use super::{prepared_sources, run_pairs, transform_failed, Copied, CopyOptions};
use crate::dtype;
use crate::error::{Error, Result};
use crate::format::{script_archive, PageReleaser};
use crate::plan::{Plan, Policy};
use crate::store::{ScriptArchive, Source};

/// Whether the entries `entries` (tensors viewing one storage of `numel`
/// elements, at `base`) cover every element of it: then nothing of the old
/// record survives and it need not be read.
fn covers(tensors: &[&Tensor], base: usize, element: usize, numel: usize) -> bool {
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !t.is_contiguous() {
            return false;
        }
        let start = (t.data_ptr() as usize - base) / element;
        spans.push((start, start + t.numel()));
    }
    spans.sort_unstable();
    let mut reached = 0;
    for (start, end) in spans {
        if start > reached {
            return false;
        }
        reached = reached.max(end);
    }
    reached >= numel
}

/// The source to write as record `storage` as it lies, where one pair fills
/// the whole record with a contiguous CPU tensor of its dtype and shape, no
/// transform, no cast.
fn whole_record(
    plan: &Plan,
    ks: &[usize],
    archive: &ScriptArchive,
    storage: &Tensor,
    sources: &[&Tensor],
) -> Option<Tensor> {
    let [k] = ks else { return None };
    let pair = &plan.pairs[*k];
    let (target, source) = (archive.tensor(pair.target)?, sources[*k]);
    let plain = pair.cast.is_none() && pair.transform.is_none();
    let same = crate::dtype::Dtype::of(source).ok() == crate::dtype::Dtype::of(storage).ok()
        && source.device() == tch::Device::Cpu
        && source.is_contiguous()
        && target.is_contiguous()
        && target.data_ptr() == storage.data_ptr()
        && target.numel() == storage.numel()
        && source.size() == target.size();
    (plain && same).then(|| source.shallow_clone())
}

/// Streams the copy of `plan` from `source` into a rewrite of `archive` at
/// `out` (a temporary file: the caller renames it).
pub(super) fn stream(
    plan: &Plan,
    source: &dyn Source,
    archive: &ScriptArchive,
    out: &Path,
    policy: &Policy,
    options: CopyOptions,
) -> Result<Copied> {
    let prepared = prepared_sources(plan, source, archive, policy)?;
    let sources = prepared.all();
    let records = archive.records();
    let mut by_record: Vec<Vec<usize>> = vec![Vec::new(); records.len()];
    for (k, pair) in plan.pairs.iter().enumerate() {
        if archive.tensor(pair.target).is_none() {
            return Err(super::rejected(
                plan,
                format!("{} has no tensor for {}", archive.origin(), pair.target_name),
            ));
        }
        // A pair into an empty tensor writes nothing.
        if let Some(r) = archive.record_of(pair.target) {
            by_record[r].push(k);
        }
    }
    let index: HashMap<&str, usize> = records.iter().enumerate().map(|(r, (n, _))| (n.as_str(), r)).collect();
    let total: u64 = plan
        .pairs
        .iter()
        .zip(&sources)
        .map(|(p, s)| s.numel() as u64 * dtype::size(archive.entries()[p.target].dtype) as u64)
        .sum();
    if let Some(progress) = options.progress {
        progress.start(total);
    }
    let _no_grad = tch::no_grad_guard();
    let mut scratch = Tensor::empty([0], (Kind::Uint8, tch::Device::Cpu));
    let (mut bytes, mut copy_seconds, mut verify_seconds) = (0u64, 0f64, 0f64);
    let mut written_from: Vec<usize> = Vec::new();
    let mut releaser = PageReleaser::default();
    let mut produce = |name: &str| -> Result<Option<Tensor>> {
        // The sources of the record written last are no longer needed.
        for k in written_from.drain(..) {
            releaser.release(sources[k]);
        }
        if let Some(bytes) = archive.replacement(name) {
            return Ok(Some(Tensor::from_slice(bytes)));
        }
        let Some(&r) = index.get(name) else { return Ok(None) };
        let ks = &by_record[r];
        if ks.is_empty() {
            return Ok(None);
        }
        let start = Instant::now();
        let storage = &records[r].1;
        let kind = crate::dtype::Dtype::of(storage).map_err(|source| Error::CopyFailed {
            store: plan.target.clone(),
            tensor: None,
            message: source.to_string(),
        })?;
        let numel = storage.numel();
        let element = dtype::size(kind);
        if let Some(whole) = whole_record(plan, ks, archive, storage, &sources) {
            // One source fills the record as it is: its bytes are written as
            // they lie (what is written is the source, nothing to compare).
            bytes += (numel * element) as u64;
            if let Some(progress) = options.progress {
                progress.advance((numel * element) as u64);
            }
            written_from.extend_from_slice(ks);
            copy_seconds += start.elapsed().as_secs_f64();
            return Ok(Some(whole));
        }
        let failed = |e: tch::TchError| Error::CopyFailed {
            store: plan.target.clone(),
            tensor: None,
            message: format!("record {name}: {e} (nothing was written)"),
        };
        if (scratch.numel()) < numel * element {
            scratch = Tensor::f_empty([(numel * element) as i64], (Kind::Uint8, tch::Device::Cpu))
                .map_err(failed)?;
        }
        let buffer = scratch.f_narrow(0, 0, (numel * element) as i64).map_err(failed)?;
        let mut buffer =
            crate::ffi::view_bytes_as(&buffer, kind).map_err(|e| failed(tch::TchError::Kind(e)))?;
        let base = storage.data_ptr() as usize;
        let old: Vec<&Tensor> = ks.iter().filter_map(|&k| archive.tensor(plan.pairs[k].target)).collect();
        if !covers(&old, base, element, numel) {
            buffer.f_copy_(storage).map_err(failed)?;
        }
        // Each target, seen in the buffer where it lies in the record, then
        // through its transform's region.
        let mut targets = Vec::with_capacity(ks.len());
        for (&k, t) in ks.iter().zip(&old) {
            let offset = ((t.data_ptr() as usize - base) / element) as i64;
            let view = buffer.f_as_strided(t.size(), t.stride(), Some(offset)).map_err(failed)?;
            let view = match &plan.pairs[k].transform {
                Some(transform) if !transform.target_ops.is_empty() => {
                    transform.target_view(&view).map_err(|e| transform_failed(plan, k, "target", e))?
                }
                _ => view,
            };
            targets.push(view);
        }
        let record_sources: Vec<&Tensor> = ks.iter().map(|&k| sources[k]).collect();
        copy_seconds += start.elapsed().as_secs_f64();
        let ran = run_pairs(plan, ks, targets.iter_mut().collect(), &record_sources, options, false)?;
        bytes += ran.bytes;
        copy_seconds += ran.copy_seconds;
        verify_seconds += ran.verify_seconds;
        written_from.extend_from_slice(ks);
        Ok(Some(buffer))
    };
    let result = script_archive::rewrite_with(archive.path(), out, &mut produce);
    for k in written_from {
        releaser.release(sources[k]);
    }
    releaser.flush();
    if let Some(progress) = options.progress {
        progress.finish();
    }
    result?;
    Ok(Copied {
        tensors: plan.pairs.len(),
        bytes,
        casts: plan.pairs.iter().filter(|p| p.cast.is_some()).count(),
        copy_seconds,
        verified: options.verify,
        verify_seconds,
        file_bytes: None,
    })
}
