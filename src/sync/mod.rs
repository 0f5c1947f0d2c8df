//! Live weight sync over torch.distributed: a trainer's weights into models
//! served by other processes (other machines), never torn.
//!
//! The transport is c10d, as PyTorch users run it: a `TCPStore` to meet and a
//! Gloo process group to move the bytes (`crate::c10d`). One [`Sender`] (rank
//! 0: a PyTorch training loop through `python/transplant_sync.py`, or Rust)
//! and one or more [`Receiver`]s (ranks 1..=N, each serving a
//! [`ModelSlot`](crate::ModelSlot)) meet under a channel name.
//!
//! A **session** begins when a sender connects:
//!
//! 1. the sender takes the next session number and announces its entries
//!    (names, roles, dtypes, shapes, which entries are one tensor);
//! 2. every receiver plans those entries against its served model with its
//!    own rules, matcher and transforms — the plan a `copy` would make, which
//!    must be complete and pass the policy — and answers with the source
//!    tensors it needs, or with why it refuses;
//! 3. receiver 1 (the lead) joins the answers into the transfer layout: the
//!    needed tensors in the sender's order, packed at 64-byte offsets into
//!    buckets of at most the sender's bucket size (a larger tensor gets a
//!    bucket of its own). A bucket that holds one whole tensor travels
//!    straight from the sender's tensor and, where the plan copies it
//!    unchanged, straight into the receiver's standby tensor: no staging copy
//!    on either side.
//!    A refusal anywhere becomes the layout's error instead: every party
//!    fails with it, and nothing is sent or written;
//! 4. all join a Gloo group of N + 1 ranks.
//!
//! Each **sync** then announces itself through the store and broadcasts the
//! buckets in order, then their digests (one CRC-32 per bucket, zlib's,
//! little-endian: why a CRC, `digest` in this file says) as one last small tensor. A receiver copies
//! each bucket into a standby copy of its model through the plan (casts,
//! transforms, verification, as `copy` does) and computes its digest as it
//! arrives; the standby goes live only when every bucket arrived, was copied
//! and its digest matched the sender's. A sender that dies mid-sync, a
//! timeout or a digest mismatch leaves the served weights as they were: the
//! receiver reports it (to its caller, and to the sender through the store),
//! keeps serving, and takes the next sync — of the same session after a
//! digest mismatch, of the sender's next session after a lost peer.
//!
//! The keys, under `transplant/<channel>/` (all values JSON):
//! `session` (a counter), `<s>/entries`, `<s>/joined/<rank>`,
//! `<s>/need/<rank>`, `<s>/layout`, `<s>/gloo/…` (the group's own),
//! `<s>/sync/<k>` (`weights`, `raw` with a byte count — a bare broadcast for
//! benchmarks — or `end`), `<s>/ack/<k>/<rank>`.
mod buckets;
mod receiver;
mod sender;

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::dtype;
use crate::entry::{inferred_role, Entry, EntryOrder, Name, Role};
use crate::error::{Error, Result};
use crate::store::{Source, StoreKind};

pub use receiver::{Received, Receiver};
pub use sender::{Sender, Sent};

/// The version of the protocol above; both sides refuse another.
const PROTOCOL: u32 = 1;
/// Bucket offsets are multiples of this: every dtype's view is aligned.
const ALIGN: u64 = 64;
/// The largest tensor an announcement may describe (256 TiB): beyond it the
/// shape is an error, not a model.
const MAX_TENSOR_BYTES: u64 = 1 << 48;
/// Bytes of one bucket's digest.
const DIGEST_BYTES: usize = 4;
/// The digest's name in the layout (both sides refuse another).
const DIGEST: &str = "crc32";

/// Where the parties of a sync meet: the `TCPStore`'s address, and a channel
/// name that keeps several syncs on one store apart.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The store's host (and the address this process's Gloo sockets bind to,
    /// unless [`SyncOptions::hostname`] says otherwise).
    pub host: String,
    /// The store's port (0 with `serve_store`: any free port, see
    /// [`Receiver::store_port`]).
    pub port: u16,
    /// Whether this process serves the store (one party does: usually the
    /// long-lived one, a receiver, so that trainers may come and go).
    pub serve_store: bool,
    /// Keeps independent syncs on one store apart.
    pub channel: String,
}

impl Endpoint {
    /// The store at `host:port`, served elsewhere, channel `default`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self { host: host.into(), port, serve_store: false, channel: "default".into() }
    }
}

/// How a sync runs.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// How long any step may wait for a peer (meeting, a bucket, an answer)
    /// before it fails.
    pub timeout: Duration,
    /// The largest bucket the sender packs (a larger tensor gets its own).
    pub bucket_bytes: u64,
    /// The address Gloo's sockets bind to (`None`: the endpoint's host).
    pub hostname: Option<String>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(60), bucket_bytes: 64 << 20, hostname: None }
    }
}

/// One entry as the sender announces it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireEntry {
    name: String,
    /// `parameter` or `buffer`; absent where the sender does not know (a bare
    /// state dict): guessed from the name and dtype, as for checkpoint files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    dtype: String,
    shape: Vec<i64>,
}

/// `<s>/entries`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Announcement {
    protocol: u32,
    origin: String,
    receivers: usize,
    bucket_bytes: u64,
    entries: Vec<WireEntry>,
    /// Groups of entries that are one tensor (sent once).
    #[serde(default)]
    ties: Vec<Vec<usize>>,
}

/// `<s>/need/<rank>`: the source entries a receiver's plan reads, or why it refuses.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Need {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One bucket of the layout: `bytes` in all, the tensors at their offsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Bucket {
    bytes: u64,
    /// `[entry index, offset, bytes]`.
    tensors: Vec<(usize, u64, u64)>,
}

impl Bucket {
    /// The one tensor that fills the bucket, where it holds one.
    fn whole(&self) -> Option<usize> {
        match self.tensors.as_slice() {
            &[(index, 0, bytes)] if bytes == self.bytes && bytes > 0 => Some(index),
            _ => None,
        }
    }
}

/// `<s>/layout`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Layout {
    /// The digest's name ([`DIGEST`]).
    #[serde(default)]
    digest: String,
    #[serde(default)]
    buckets: Vec<Bucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Layout {
    /// `Ok` when the layout is one this side can follow for `entries`: its
    /// digest the one computed here, every tensor an entry's whole bytes at an
    /// offset its dtype aligns, inside its bucket. (Each side reads the layout
    /// from the store: a broken or foreign one is refused, not followed.)
    fn ensure_valid(&self, entries: &[Entry]) -> Result<()> {
        let refuse = |what: String| Err(Error::Sync { message: format!("the layout {what}") });
        if self.digest != DIGEST {
            return refuse(format!("names digest {:?}; this side computes {DIGEST}", self.digest));
        }
        for (b, bucket) in self.buckets.iter().enumerate() {
            // A bucket is as long as its tensors reach: no buffer is sized by a
            // number alone.
            let reach = bucket.tensors.iter().map(|&(_, offset, bytes)| offset.saturating_add(bytes)).max();
            if reach != Some(bucket.bytes) {
                return refuse(format!(
                    "gives bucket {} {} bytes for tensors reaching {reach:?}",
                    b + 1,
                    bucket.bytes
                ));
            }
            for &(index, offset, bytes) in &bucket.tensors {
                let Some(entry) = entries.get(index) else {
                    return refuse(format!("names entry {index}; the sender announced {}", entries.len()));
                };
                let aligned = offset % dtype::size(entry.dtype) as u64 == 0;
                let inside = offset.checked_add(bytes).is_some_and(|end| end <= bucket.bytes);
                if bytes != entry.bytes() || !aligned || !inside {
                    return refuse(format!(
                        "puts {} ({} bytes) at {offset}..+{bytes} of bucket {} ({} bytes)",
                        entry.name,
                        entry.bytes(),
                        b + 1,
                        bucket.bytes
                    ));
                }
            }
        }
        Ok(())
    }

    /// The needed entries in the sender's order, packed into buckets of at most
    /// `bucket_bytes` (a larger tensor alone); tied entries share their bytes.
    fn pack(entries: &[Entry], ties: &[Vec<usize>], needed: &[usize], bucket_bytes: u64) -> Self {
        let mut first_of: HashMap<usize, usize> = HashMap::new();
        for group in ties {
            if let Some(&first) = group.iter().min() {
                for &member in group {
                    first_of.insert(member, first);
                }
            }
        }
        let mut needed: Vec<usize> = needed.to_vec();
        needed.sort_unstable();
        needed.dedup();
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut open = Bucket { bytes: 0, tensors: Vec::new() };
        let mut placed: HashMap<usize, (usize, u64)> = HashMap::new();
        let mut later: Vec<(usize, usize)> = Vec::new();
        let close = |open: &mut Bucket, buckets: &mut Vec<Bucket>| {
            if !open.tensors.is_empty() {
                buckets.push(std::mem::replace(open, Bucket { bytes: 0, tensors: Vec::new() }));
            }
        };
        for &index in &needed {
            let first = first_of.get(&index).copied().unwrap_or(index);
            if first != index && (needed.binary_search(&first).is_ok() || placed.contains_key(&first)) {
                later.push((index, first));
                continue;
            }
            let nbytes = entries[index].bytes();
            let offset = open.bytes.div_ceil(ALIGN) * ALIGN;
            if !open.tensors.is_empty() && offset + nbytes > bucket_bytes {
                close(&mut open, &mut buckets);
            }
            let offset = open.bytes.div_ceil(ALIGN) * ALIGN;
            placed.insert(index, (buckets.len(), offset));
            if first != index {
                placed.insert(first, (buckets.len(), offset));
            }
            open.tensors.push((index, offset, nbytes));
            open.bytes = offset + nbytes;
        }
        close(&mut open, &mut buckets);
        // A tied entry is read from its group's bytes, wherever they went.
        for (index, first) in later {
            if let Some(&(b, offset)) = placed.get(&first) {
                buckets[b].tensors.push((index, offset, entries[index].bytes()));
            }
        }
        Self { digest: DIGEST.into(), buckets, error: None }
    }
}

/// `<s>/sync/<k>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
enum Announce {
    Weights,
    Raw { bytes: u64 },
    End,
}

/// `<s>/ack/<k>/<rank>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    seconds: f64,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Sync { message: format!("{what} is not what this protocol says: {e}") })
}

/// The digest of a bucket's bytes: CRC-32 (zlib's polynomial, as Python's
/// `zlib.crc32`), little-endian.
///
/// Why not a cryptographic hash: the digest guards against faults — bytes
/// changed on the way or in memory, a torn or misaligned bucket — for which
/// CRC-32 catches every burst of up to 32 bits and all but one in four
/// billion others, at memory speed on both sides (SHA-256 ran at 1.7 GB/s
/// here, slower than loopback Gloo, and made a sync 4x a bare broadcast).
/// It is no defence against a malicious peer; nor would a hash be, since
/// whoever can reach the store can send weights.
fn digest(bytes: &[u8]) -> [u8; 4] {
    crc32fast::hash(bytes).to_le_bytes()
}

/// The digests of a sync's buckets, as the sender broadcasts them.
fn digests_tensor(digests: &[[u8; DIGEST_BYTES]]) -> Tensor {
    let bytes: Vec<u8> = digests.iter().flatten().copied().collect();
    Tensor::from_slice(&bytes)
}

/// A contiguous CPU tensor's bytes seen as a 1-D `uint8` tensor (no copy), or
/// `None` where the tensor is not one (on a GPU, strided, empty).
fn as_bytes(tensor: &Tensor) -> Option<Tensor> {
    if tensor.device() != Device::Cpu || !tensor.is_contiguous() || tensor.numel() == 0 {
        return None;
    }
    tensor.f_view([-1]).and_then(|flat| flat.f_view_dtype(tch::Kind::Uint8)).ok()
}

/// The bytes of a contiguous CPU `uint8` tensor, `len` of them.
///
/// # Safety
/// `tensor` must be a contiguous CPU tensor of at least `len` bytes, not
/// written while the slice lives.
unsafe fn bytes_of(tensor: &Tensor, len: u64) -> &[u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u8, len as usize) }
}

/// A contiguous `uint8` CPU buffer of `bytes`, zeroed.
fn buffer(bytes: u64) -> Tensor {
    Tensor::zeros([bytes as i64], (tch::Kind::Uint8, Device::Cpu))
}

/// The view of `entry` at `offset` bytes into `buffer`.
fn view_in(buffer: &Tensor, entry: &Entry, offset: u64) -> Result<Tensor> {
    let size = dtype::size(entry.dtype) as u64;
    let mut strides = vec![1i64; entry.shape.len()];
    for d in (0..entry.shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * entry.shape[d + 1].max(1);
    }
    crate::ffi::strided_view(buffer, entry.dtype, &entry.shape, &strides, (offset / size) as i64)
        .map_err(|message| Error::Sync { message: format!("{} in the bucket: {message}", entry.name) })
}

/// The sender's entries, as announced: a source with no tensors yet (a
/// receiver plans against it; each bucket then lends the tensors it holds).
struct Announced {
    origin: String,
    entries: Vec<Entry>,
    ties: Vec<Vec<usize>>,
}

impl Announced {
    fn from_wire(announcement: &Announcement, origin: String) -> Result<Self> {
        let mut entries = Vec::with_capacity(announcement.entries.len());
        for wire in &announcement.entries {
            let refuse =
                |what: String| Error::Sync { message: format!("the sender's entry {}: {what}", wire.name) };
            let kind = dtype::parse(&wire.dtype)
                .ok_or_else(|| refuse(format!("dtype {} is not supported", wire.dtype)))?;
            let bytes = wire.shape.iter().try_fold(dtype::size(kind) as u64, |acc, &d| {
                u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            });
            if bytes.is_none_or(|b| b > MAX_TENSOR_BYTES) {
                return Err(refuse(format!("shape {:?} is not one a tensor can have", wire.shape)));
            }
            let (role, role_inferred) = match wire.role.as_deref() {
                Some("parameter") => (Role::Parameter, false),
                Some("buffer") => (Role::Buffer, false),
                Some(other) => return Err(refuse(format!("role {other}"))),
                None => (inferred_role(&wire.name, kind), true),
            };
            entries.push(Entry {
                name: Name::from(wire.name.as_str()),
                role,
                role_inferred,
                shape: wire.shape.clone(),
                dtype: kind,
                device: Device::Cpu,
            });
        }
        let n = entries.len();
        if announcement.ties.iter().flatten().any(|&i| i >= n) {
            return Err(Error::Sync { message: "the sender's ties name entries it does not have".into() });
        }
        Ok(Self { origin, entries, ties: announcement.ties.clone() })
    }

    fn to_wire(entries: &[Entry]) -> Vec<WireEntry> {
        entries
            .iter()
            .map(|e| WireEntry {
                name: e.name.to_string(),
                role: (!e.role_inferred).then(|| e.role.to_string()),
                dtype: dtype::name(e.dtype).to_string(),
                shape: e.shape.clone(),
            })
            .collect()
    }
}

impl Source for Announced {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Remote
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entry_order(&self) -> EntryOrder {
        EntryOrder::Registration
    }
    fn tensor(&self, _index: usize) -> Option<&Tensor> {
        None
    }
    fn ties(&self) -> Vec<Vec<usize>> {
        self.ties.clone()
    }
}

/// One bucket's tensors, lent as a source for the copy of the pairs it feeds.
struct BucketSource<'a> {
    announced: &'a Announced,
    tensors: Vec<Option<Tensor>>,
}

// SAFETY: as for `Checkpoint`: shared access only reads; the views are made
// before the bucket is lent and never written through it.
unsafe impl Sync for BucketSource<'_> {}

impl Source for BucketSource<'_> {
    fn origin(&self) -> &str {
        &self.announced.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Remote
    }
    fn entries(&self) -> &[Entry] {
        &self.announced.entries
    }
    fn entry_order(&self) -> EntryOrder {
        EntryOrder::Registration
    }
    fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index).and_then(Option::as_ref)
    }
    fn ties(&self) -> Vec<Vec<usize>> {
        self.announced.ties.clone()
    }
}

/// The endpoint's store, seen under the channel's prefix
/// (`transplant/<channel>/`); served from this process when `serve`.
fn channel_store(endpoint: &Endpoint, serve: bool, timeout: Duration) -> Result<crate::c10d::Store> {
    let prefix = format!("transplant/{}/", endpoint.channel);
    crate::c10d::Store::connect(&endpoint.host, endpoint.port, serve, timeout, &prefix)
}

/// How often a receiver waiting for a sync looks at the store (for the sync,
/// and for a newer session).
const POLL: Duration = Duration::from_millis(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, bytes: i64) -> Entry {
        Entry {
            name: Name::from(name),
            role: Role::Parameter,
            role_inferred: false,
            shape: vec![bytes],
            dtype: tch::Kind::Uint8,
            device: Device::Cpu,
        }
    }

    #[test]
    fn layouts_keep_the_sender_order_align_offsets_and_bound_buckets() {
        let entries: Vec<Entry> =
            [10, 100, 30, 500, 7].iter().enumerate().map(|(i, &b)| entry(&format!("t{i}"), b)).collect();
        let layout = Layout::pack(&entries, &[], &[4, 0, 1, 2, 3], 200);
        let placed: Vec<Vec<(usize, u64, u64)>> = layout.buckets.iter().map(|b| b.tensors.clone()).collect();
        assert_eq!(
            placed,
            vec![vec![(0, 0, 10), (1, 64, 100)], vec![(2, 0, 30)], vec![(3, 0, 500)], vec![(4, 0, 7)]]
        );
        assert_eq!(layout.buckets[0].bytes, 164);
        assert_eq!(layout.buckets[2].bytes, 500, "a tensor over the bound gets a bucket of its own");
        assert_eq!(layout.buckets[2].whole(), Some(3));
        assert_eq!(layout.buckets[0].whole(), None);
    }

    #[test]
    fn layouts_that_do_not_fit_the_entries_are_refused() {
        let entries: Vec<Entry> =
            [10, 100].iter().enumerate().map(|(i, &b)| entry(&format!("t{i}"), b)).collect();
        let good = Layout::pack(&entries, &[], &[0, 1], 1 << 20);
        good.ensure_valid(&entries).unwrap();
        let broken = |edit: &dyn Fn(&mut Layout)| {
            let mut layout = good.clone();
            edit(&mut layout);
            layout.ensure_valid(&entries).unwrap_err().to_string()
        };
        assert!(broken(&|l| l.digest = "sha256".into()).contains("digest"));
        assert!(broken(&|l| l.buckets[0].tensors[1].0 = 7).contains("names entry 7"));
        assert!(broken(&|l| l.buckets[0].tensors[1].1 = 100).contains("reaching"), "past the bucket's end");
        assert!(broken(&|l| l.buckets[0].tensors[0].2 = 9).contains("t0"), "not the entry's bytes");
        assert!(broken(&|l| l.buckets[0].tensors[1].1 = u64::MAX).contains("reaching"), "overflow");
        let floats = vec![Entry { dtype: tch::Kind::Float, shape: vec![4], ..entry("f", 16) }];
        let mut misaligned = Layout::pack(&floats, &[], &[0], 1 << 20);
        misaligned.buckets[0].bytes += 2;
        misaligned.buckets[0].tensors[0].1 = 2;
        assert!(
            broken(&|l| l.buckets[0].bytes = 1 << 40).contains("gives bucket 1"),
            "a buffer sized by a number"
        );
        assert!(broken(&|l| l.buckets[0].tensors.clear()).contains("gives bucket 1"), "an empty bucket");
        assert!(misaligned.ensure_valid(&floats).unwrap_err().to_string().contains("at 2"));
    }

    #[test]
    fn tied_entries_are_sent_once_and_read_from_the_same_bytes() {
        let entries: Vec<Entry> = (0..3).map(|i| entry(&format!("t{i}"), 16)).collect();
        let layout = Layout::pack(&entries, &[vec![0, 2]], &[0, 1, 2], 1 << 20);
        assert_eq!(layout.buckets.len(), 1);
        assert_eq!(layout.buckets[0].tensors, vec![(0, 0, 16), (1, 64, 16), (2, 0, 16)]);
        assert_eq!(layout.buckets[0].bytes, 80);
        assert_eq!(layout.buckets[0].whole(), None);
        let only_second = Layout::pack(&entries, &[vec![0, 2]], &[2], 1 << 20);
        assert_eq!(
            only_second.buckets[0].tensors,
            vec![(2, 0, 16)],
            "a tie member needed alone is sent itself"
        );
    }
}
