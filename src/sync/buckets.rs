//! A sync's buckets into a standby model: each received straight into the
//! standby's tensor where it can be, else into a buffer and copied through
//! the plan, its digest computed as it arrives and checked against the
//! sender's at the end.
use std::collections::HashMap;

use tch::Tensor;

use super::receiver::Session;
use super::{as_bytes, bytes_of, digest, view_in, BucketSource, Layout, DIGEST_BYTES};
use crate::copy::{copy_with, rejected, Copied, CopyOptions};
use crate::error::{Error, Result};
use crate::plan::{Plan, Policy};
use crate::store::Target;

/// Per bucket, `plan` with only the pairs whose sender tensor it carries.
pub(super) fn parts_of(plan: &Plan, layout: &Layout) -> Result<Vec<Plan>> {
    let mut bucket_of = HashMap::new();
    for (b, bucket) in layout.buckets.iter().enumerate() {
        for &(index, _, _) in &bucket.tensors {
            bucket_of.insert(index, b);
        }
    }
    let mut parts: Vec<Plan> =
        layout.buckets.iter().map(|_| Plan { pairs: Vec::new(), ..plan.clone() }).collect();
    for pair in &plan.pairs {
        let b = bucket_of.get(&pair.source).ok_or_else(|| {
            rejected(
                plan,
                format!("the layout does not carry {}, which {} needs", pair.source_name, pair.target_name),
            )
        })?;
        parts[*b].pairs.push(pair.clone());
    }
    Ok(parts)
}

fn sum(total: &mut Copied, part: Copied) {
    total.tensors += part.tensors;
    total.bytes += part.bytes;
    total.casts += part.casts;
    total.copy_seconds += part.copy_seconds;
    total.verified &= part.verified;
    total.verify_seconds += part.verify_seconds;
}

/// Where bucket `b` is received: straight into the standby's tensor (its
/// bytes, returned) where the bucket is one whole tensor that the plan copies
/// unchanged into one whole contiguous CPU target; `None`: into a buffer.
fn direct_target(session: &Session, b: usize, standby: &mut dyn Target) -> Option<Tensor> {
    let index = session.layout.buckets[b].whole()?;
    let part = &session.parts[b];
    let [pair] = part.pairs.as_slice() else { return None };
    if pair.source != index || pair.cast.is_some() || pair.transform.is_some() {
        return None;
    }
    let entry = &session.announced.entries[index];
    let target = standby.tensors_mut().get(pair.target)?;
    if crate::dtype::Dtype::of(target).ok() != Some(entry.dtype) || target.size() != entry.shape {
        return None;
    }
    as_bytes(target)
}

/// Receives every bucket of a sync, then the sender's digests, and copies
/// each bucket into `standby` as it arrives (the next one arriving
/// meanwhile). A bad bucket does not stop the reception — the group must stay
/// in step — but nothing after it is copied, and the sync fails; a failed
/// group fails it at once.
pub(super) fn receive_buckets(
    session: &mut Session,
    standby: &mut dyn Target,
    policy: &Policy,
) -> Result<Copied> {
    let sync = session.next - 1;
    let n = session.layout.buckets.len();
    let lost = |b: usize, message: String| Error::Sync {
        message: format!(
            "sync {sync}, bucket {} of {n}: {message} (the served weights are unchanged)",
            b + 1
        ),
    };
    // Each bucket's destination: the standby's own tensor, or a buffer.
    let destinations: Vec<Option<Tensor>> = (0..n).map(|b| direct_target(session, b, standby)).collect();
    let start = |session: &mut Session, b: usize, destinations: &[Option<Tensor>]| {
        let target = match &destinations[b] {
            Some(bytes) => bytes.shallow_clone(),
            None => session.buffers[b % 2].narrow(0, 0, session.layout.buckets[b].bytes as i64),
        };
        // A broadcast that cannot even start leaves the group out of step: the
        // session is over.
        let work = session.group.broadcast(&target, 0);
        session.broken |= work.is_err();
        work
    };
    let mut total = Copied {
        tensors: 0,
        bytes: 0,
        casts: 0,
        copy_seconds: 0.0,
        verified: true,
        verify_seconds: 0.0,
        file_bytes: None,
    };
    let mut failure: Option<Error> = None;
    let mut digests: Vec<[u8; DIGEST_BYTES]> = Vec::with_capacity(n);
    // The bucket's tensors by entry index (a source lends them that way), one
    // vector for the whole sync.
    let mut slots: Vec<Option<Tensor>> = Vec::new();
    slots.resize_with(session.announced.entries.len(), || None);
    let mut pending = if n > 0 { Some(start(session, 0, &destinations)?) } else { None };
    for b in 0..n {
        let Some(work) = pending.take() else { break };
        if let Err(message) = work.wait() {
            session.broken = true;
            return Err(lost(b, message));
        }
        if b + 1 < n {
            pending = Some(start(session, b + 1, &destinations)?);
        }
        let bucket = &session.layout.buckets[b];
        if let Some(bytes) = &destinations[b] {
            // SAFETY: a contiguous CPU uint8 view of exactly the bucket's bytes,
            // which no operation writes any more.
            digests.push(digest(unsafe { bytes_of(bytes, bucket.bytes) }));
            total.tensors += 1;
            total.bytes += bucket.bytes;
            continue;
        }
        let buffer = &session.buffers[b % 2];
        // SAFETY: the buffer is a contiguous CPU uint8 tensor of at least
        // `bucket.bytes`; no operation writes it until bucket b + 2 starts.
        digests.push(digest(unsafe { bytes_of(buffer, bucket.bytes) }));
        if failure.is_some() {
            continue;
        }
        let mut made = Ok(());
        for &(index, offset, _) in &bucket.tensors {
            match view_in(buffer, &session.announced.entries[index], offset) {
                Ok(view) => slots[index] = Some(view),
                Err(e) => made = Err(e),
            }
        }
        let source = BucketSource { announced: &session.announced, tensors: std::mem::take(&mut slots) };
        let copied = made
            .and_then(|()| copy_with(&session.parts[b], &source, standby, policy, CopyOptions::default()));
        slots = source.tensors;
        for &(index, _, _) in &bucket.tensors {
            slots[index] = None;
        }
        match copied {
            Ok(part) => sum(&mut total, part),
            Err(e) => failure = Some(e),
        }
    }
    // The sender's digests come last, one per bucket.
    let sent = Tensor::zeros([(n * DIGEST_BYTES) as i64], (tch::Kind::Uint8, tch::Device::Cpu));
    if n > 0 {
        let work = session.group.broadcast(&sent, 0);
        session.broken |= work.is_err();
        if let Err(message) = work?.wait() {
            session.broken = true;
            return Err(lost(n - 1, format!("the digests did not arrive: {message}")));
        }
    }
    // SAFETY: `sent` is a contiguous CPU uint8 tensor of n * DIGEST_BYTES bytes.
    let sent = unsafe { bytes_of(&sent, (n * DIGEST_BYTES) as u64) };
    for (b, (mine, theirs)) in digests.iter().zip(sent.chunks(DIGEST_BYTES)).enumerate() {
        if mine.as_slice() != theirs {
            return Err(lost(
                b,
                "its digest does not match the sender's: the bytes were changed on the way".into(),
            ));
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    Ok(total)
}
