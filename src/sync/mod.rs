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
//! `<s>/sync/<k>` (`weights` with each bucket's byte count, `raw` with a byte
//! count — a bare broadcast for benchmarks, at most a sync's bytes — or
//! `end`), `<s>/ack/<k>/<rank>`. The lead deletes `<s>/entries` and
//! `<s>/need/…` once the layout is set.
//!
//! **Peers are not trusted.** Whatever a process that reaches the store writes
//! there — a counter that is no number, an announcement of any size, a session
//! that never announces, a sync of other bucket sizes than agreed — is refused
//! with an error, never a panic or an abort, and leaves the receiver serving,
//! in its last session. Sizes are checked before anything is allocated or
//! received: a sync announces its buckets' sizes, and a receiver refuses sizes
//! other than the layout's before Gloo receives a byte (Gloo aborts a process
//! that receives a longer message than it posted; a peer in the group that
//! announces one size and sends another can still do that, which only an
//! authenticated store keeps out).
mod buckets;
mod layout;
mod receiver;
mod sender;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::dtype;
use crate::entry::{inferred_role, Entry, EntryOrder, Name, Role};
use crate::error::{Error, Result};
use crate::store::{Source, StoreKind};

use layout::Layout;
pub use receiver::{Received, Receiver};
pub use sender::{Sender, Sent};

/// The version of the protocol above; both sides refuse another.
const PROTOCOL: u32 = 2;
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
    /// Whether c10d's own C++ diagnostics (a line, often with a stack trace,
    /// for every timed-out wait or lost connection) go to stderr. Off by
    /// default: the errors that matter come back as `Err`. c10's log level is
    /// one for the process, set when a sender or receiver connects.
    pub transport_log: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            bucket_bytes: 64 << 20,
            hostname: None,
            transport_log: false,
        }
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

/// `<s>/sync/<k>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
enum Announce {
    /// The bytes of each bucket about to be sent (the layout's, or the sync is
    /// refused before a byte is received).
    Weights {
        buckets: Vec<u64>,
    },
    Raw {
        bytes: u64,
    },
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

/// A contiguous `uint8` CPU buffer of `bytes`, zeroed; an error where it
/// cannot be had.
fn buffer(bytes: u64) -> Result<Tensor> {
    let refuse = |why: String| Error::Sync { message: format!("a buffer of {bytes} bytes: {why}") };
    let len = i64::try_from(bytes).map_err(|_| refuse("too large".into()))?;
    Tensor::f_zeros([len], (tch::Kind::Uint8, Device::Cpu)).map_err(|e| refuse(e.to_string()))
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
fn channel_store(endpoint: &Endpoint, serve: bool, options: &SyncOptions) -> Result<crate::c10d::Store> {
    channel_store_within(endpoint, serve, options, options.timeout)
}

/// [`channel_store`], waiting up to `timeout` for the server.
fn channel_store_within(
    endpoint: &Endpoint,
    serve: bool,
    options: &SyncOptions,
    timeout: Duration,
) -> Result<crate::c10d::Store> {
    crate::c10d::show_diagnostics(options.transport_log);
    let prefix = format!("transplant/{}/", endpoint.channel);
    crate::c10d::Store::connect(&endpoint.host, endpoint.port, serve, timeout, &prefix)
}

/// How often a receiver waiting for a sync looks at the store (for the sync,
/// and for a newer session).
const POLL: Duration = Duration::from_millis(2);
