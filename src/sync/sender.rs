//! [`Sender`]: the trainer's side of a sync, from any source (files, live
//! modules, VarStores). `python/transplant_sync.py` is the same protocol for
//! a PyTorch training loop.
use std::time::Instant;

use serde::Serialize;
use tch::Tensor;

use super::{
    as_bytes, buffer, bytes_of, channel_store, digest, digests_tensor, json, parse, view_in, Ack, Announce,
    Announced, Announcement, Endpoint, Layout, SyncOptions, PROTOCOL,
};
use crate::c10d::{Group, Store, Work};
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::store::Source;

/// What one sync did on the sender.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// The session.
    pub session: i64,
    /// The sync's number within it (from 1).
    pub sync: u64,
    /// Bytes of the buckets sent (the digests add 4 bytes a bucket).
    pub bytes: u64,
    /// Buckets sent.
    pub buckets: usize,
    /// Seconds from the announcement to every receiver's answer.
    pub seconds: f64,
}

/// The sending side of a sync (see the [module docs](super)): rank 0 of a
/// session with `receivers` receivers.
///
/// A sync that fails ends its session; the next [`sync`](Self::sync) (or
/// [`reconnect`](Self::reconnect)) starts a new one on the same store, so a
/// sender is never thrown away for a failure. Dropping or closing one returns
/// at once, whatever is left in flight, and releases the store's port where
/// it serves the store.
pub struct Sender {
    /// The session's keys (`transplant/<channel>/<session>/`).
    store: Store,
    /// `None` once a failed session let its group go.
    group: Option<Group>,
    session: i64,
    receivers: usize,
    entries: Vec<Entry>,
    layout: Layout,
    buffers: [Tensor; 2],
    next: u64,
    options: SyncOptions,
    ended: bool,
    corrupt: Option<usize>,
    /// Why the session ended half way through a sync, if it did.
    failed: Option<String>,
    fail_after: Option<usize>,
    endpoint: Endpoint,
    /// The channel's keys (and the store's server, where this process serves it).
    channel: Store,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").field("session", &self.session).field("receivers", &self.receivers).finish()
    }
}

/// What one session of a sender holds.
struct Opened {
    store: Store,
    group: Group,
    session: i64,
    layout: Layout,
    buffers: [Tensor; 2],
}

impl Sender {
    /// Starts a session at `endpoint`: announces `source`'s entries, waits
    /// for the `receivers` to plan them (an error says which refused, and why:
    /// nothing is sent), then joins the group.
    pub fn connect(
        endpoint: &Endpoint,
        receivers: usize,
        source: &dyn Source,
        options: SyncOptions,
    ) -> Result<Self> {
        if receivers == 0 {
            return Err(Error::Sync { message: "a sync needs at least one receiver".into() });
        }
        let mut channel = channel_store(endpoint, endpoint.serve_store, &options)?;
        let opened = Self::open(&mut channel, endpoint, receivers, source, &options)?;
        Ok(Self {
            store: opened.store,
            group: Some(opened.group),
            session: opened.session,
            receivers,
            entries: source.entries().to_vec(),
            layout: opened.layout,
            buffers: opened.buffers,
            next: 1,
            options,
            ended: false,
            corrupt: None,
            failed: None,
            fail_after: None,
            endpoint: endpoint.clone(),
            channel,
        })
    }

    /// Starts a new session with `source`'s entries (the last one's group is
    /// let go: its receivers leave it and join this one).
    pub fn reconnect(&mut self, source: &dyn Source) -> Result<()> {
        self.release_group();
        // Until the new session is open, this one stays failed.
        self.failed.get_or_insert_with(|| "a new session was asked for".into());
        if !self.endpoint.serve_store {
            // A store served elsewhere may have gone and come back (a receiver restarted).
            self.channel = channel_store(&self.endpoint, false, &self.options)?;
        }
        let opened = Self::open(&mut self.channel, &self.endpoint, self.receivers, source, &self.options)?;
        self.store = opened.store;
        self.group = Some(opened.group);
        self.session = opened.session;
        self.entries = source.entries().to_vec();
        self.layout = opened.layout;
        self.buffers = opened.buffers;
        self.next = 1;
        self.ended = false;
        self.failed = None;
        Ok(())
    }

    /// The handshake of a new session on `channel`.
    fn open(
        channel: &mut Store,
        endpoint: &Endpoint,
        receivers: usize,
        source: &dyn Source,
        options: &SyncOptions,
    ) -> Result<Opened> {
        let session = channel.add("session", 1)?;
        let mut store = channel.prefixed(&format!("{session}/"))?;
        let announcement = Announcement {
            protocol: PROTOCOL,
            origin: source.origin().to_string(),
            receivers,
            bucket_bytes: options.bucket_bytes,
            entries: Announced::to_wire(source.entries()),
            ties: source.ties(),
        };
        store.set("entries", &json(&announcement))?;
        let layout: Layout = match store.get("layout", options.timeout) {
            Ok(bytes) => parse("the layout", &bytes)?,
            Err(e) => {
                return Err(Error::Sync {
                    message: format!(
                        "no receiver answered on channel {} within {:?} (is receiver 1 running?): {e}",
                        endpoint.channel, options.timeout
                    ),
                })
            }
        };
        if let Some(error) = layout.error {
            return Err(Error::Sync { message: format!("the receivers refused the transfer: {error}") });
        }
        layout.ensure_valid(source.entries())?;
        let hostname = options.hostname.clone().unwrap_or_else(|| endpoint.host.clone());
        let group = Group::gloo(&store.prefixed("gloo/")?, 0, receivers + 1, options.timeout, &hostname)?;
        let largest = layout.buckets.iter().map(|b| b.bytes).max().unwrap_or(0);
        Ok(Opened { store, group, session, layout, buffers: [buffer(largest)?, buffer(largest)?] })
    }

    /// Lets the session's group go on a thread of its own: its destructor
    /// waits for operations in flight (up to the timeout), and closing its
    /// connections is what tells receivers the session is over.
    fn release_group(&mut self) {
        if let Some(group) = self.group.take() {
            // Without a thread to be had, the closure (and the group) drops here.
            let _ =
                std::thread::Builder::new().name("transplant-sync-drop".into()).spawn(move || drop(group));
        }
    }

    /// The session's number.
    pub fn session(&self) -> i64 {
        self.session
    }

    /// Sends `source`'s current values (the entries announced at connect:
    /// same names, dtypes and shapes, all checked before anything is sent)
    /// to every receiver, and waits for each
    /// to take them: an error names the receivers that refused, and why.
    /// After a failed sync, starts a new session first.
    pub fn sync(&mut self, source: &dyn Source) -> Result<Sent> {
        if self.failed.is_some() {
            self.reconnect(source)?;
        }
        self.same_entries(source)?;
        let start = Instant::now();
        let sizes = self.layout.buckets.iter().map(|b| b.bytes).collect();
        let sync = self.next;
        let sent =
            self.announce(&Announce::Weights { buckets: sizes }).and_then(|_| self.transfer(sync, source));
        self.answered(sync, sent)?;
        let bytes = self.layout.buckets.iter().map(|b| b.bytes).sum();
        let buckets = self.layout.buckets.len();
        Ok(Sent { session: self.session, sync, bytes, buckets, seconds: start.elapsed().as_secs_f64() })
    }

    /// Every receiver's answer to `sync`, once `sent` (what sending it did)
    /// succeeded. A failure ends the session: receivers wait for the rest of
    /// the sync until the group's connections close (its group is let go) or
    /// their timeout, and anything else sent on this group could reach one as
    /// a bucket of another size, which Gloo answers by aborting that process.
    fn answered(&mut self, sync: u64, sent: Result<()>) -> Result<()> {
        let answered = sent.and_then(|()| self.answers(sync));
        if let Err(error) = &answered {
            self.failed = Some(format!("sync {sync}: {error}"));
            self.release_group();
        }
        answered
    }

    /// `Ok` unless a sync of this session failed.
    fn still_usable(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(Error::Sync {
                message: format!("this session ended when {why}: the next sync starts a new one"),
            }),
            None => Ok(()),
        }
    }

    /// The buckets of sync `sync`, then their digests.
    fn transfer(&mut self, sync: u64, source: &dyn Source) -> Result<()> {
        let n = self.layout.buckets.len();
        // Operations in flight: those on a buffer (by buffer), those on a
        // source tensor (sent straight from it).
        let mut on_buffer: [Option<(usize, Work)>; 2] = [None, None];
        let mut on_tensors: Vec<(usize, Work)> = Vec::new();
        let mut digests = Vec::with_capacity(n);
        for b in 0..n {
            let bucket = &self.layout.buckets[b];
            let corrupt = self.corrupt == Some(b);
            // A bucket that is one whole contiguous CPU tensor goes straight from it.
            let whole = bucket
                .whole()
                .filter(|_| !corrupt)
                .and_then(|index| source.tensor(index))
                .filter(|t| crate::dtype::Dtype::of(t).ok() == Some(self.entries[bucket.tensors[0].0].dtype))
                .and_then(as_bytes);
            let data = match whole {
                Some(bytes) => bytes,
                None => {
                    if let Some((earlier, work)) = on_buffer[b % 2].take() {
                        work.wait().map_err(|m| self.lost(sync, earlier, m))?;
                    }
                    self.pack(b, source)?
                }
            };
            if corrupt {
                self.corrupt = None;
                // SAFETY: a contiguous CPU uint8 tensor of `bucket.bytes` (our
                // buffer, not in flight), not written while the slice lives.
                digests.push(digest(unsafe { bytes_of(&data, bucket.bytes) }));
                // SAFETY: as above.
                unsafe { *(data.data_ptr() as *mut u8) ^= 0xff };
            }
            let work = group_of(&mut self.group)?.broadcast(&data, 0)?;
            if !corrupt {
                // The digest is computed while the bytes travel (it goes last).
                // SAFETY: `data` is a contiguous CPU uint8 tensor of
                // `bucket.bytes`, which the broadcast only reads.
                digests.push(digest(unsafe { bytes_of(&data, bucket.bytes) }));
            }
            if data.data_ptr() == self.buffers[b % 2].data_ptr() {
                on_buffer[b % 2] = Some((b, work));
            } else {
                on_tensors.push((b, work));
            }
            if self.fail_after.take_if(|after| *after == b).is_some() {
                return Err(Error::Sync { message: format!("a failure after bucket {} (test hook)", b + 1) });
            }
        }
        for (b, work) in on_buffer.into_iter().flatten().chain(on_tensors) {
            work.wait().map_err(|m| self.lost(sync, b, m))?;
        }
        if n > 0 {
            let sent = digests_tensor(&digests);
            group_of(&mut self.group)?.broadcast(&sent, 0)?.wait().map_err(|m| self.lost(sync, n - 1, m))?;
        }
        Ok(())
    }

    /// Copies bucket `b`'s tensors from `source` into its buffer; the
    /// buffer's first `bytes`, as a tensor.
    fn pack(&self, b: usize, source: &dyn Source) -> Result<Tensor> {
        let bucket = &self.layout.buckets[b];
        let buffer = &self.buffers[b % 2];
        for &(index, offset, _) in &bucket.tensors {
            let entry = &self.entries[index];
            let tensor = source.tensor(index).ok_or_else(|| Error::MissingTensor {
                store: source.origin().to_string(),
                tensor: entry.name.to_string(),
            })?;
            let mut view = view_in(buffer, entry, offset)?;
            view.f_copy_(tensor).map_err(|e| Error::Tensor {
                store: source.origin().to_string(),
                tensor: entry.name.to_string(),
                source: e,
            })?;
        }
        Ok(buffer.narrow(0, 0, bucket.bytes as i64))
    }

    /// Broadcasts `bytes` of zeros as one tensor, which the receivers take and
    /// drop: what a bare torch.distributed broadcast of a sync's bytes costs,
    /// to compare a sync with: at most a sync's bytes (receivers refuse
    /// more). Seconds to every receiver's answer.
    pub fn raw_broadcast(&mut self, bytes: u64) -> Result<f64> {
        self.still_usable()?;
        let per_sync: u64 = self.layout.buckets.iter().map(|b| b.bytes).sum();
        if bytes > per_sync {
            return Err(Error::Sync {
                message: format!("a bare broadcast of {bytes} bytes: at most a sync's {per_sync} bytes"),
            });
        }
        let data = buffer(bytes)?;
        let start = Instant::now();
        let sync = self.next;
        let announced = self.announce(&Announce::Raw { bytes });
        let sent = announced.and_then(|_| group_of(&mut self.group)?.broadcast(&data, 0));
        let sent = sent.and_then(|work| work.wait().map_err(|m| self.lost(sync, 0, m)));
        self.answered(sync, sent)?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// Ends the session: receivers leave it and wait for the next sender.
    /// Never fails: a store or peer that is gone has nothing to be told.
    pub fn close(self) {}

    /// Test hook: flips a byte of bucket `bucket` of the next sync after its
    /// digest was computed, as a fault on the way would.
    #[doc(hidden)]
    pub fn corrupt_next_sync(&mut self, bucket: usize) {
        self.corrupt = Some(bucket);
    }

    /// Test hook: the next sync fails after sending bucket `bucket`, as a
    /// sender failing half way would.
    #[doc(hidden)]
    pub fn fail_next_sync_after(&mut self, bucket: usize) {
        self.fail_after = Some(bucket);
    }

    /// Tells the receivers the session is over, where it is not already.
    fn end(&mut self) -> Result<()> {
        if self.ended || self.failed.is_some() {
            return Ok(());
        }
        self.ended = true;
        self.announce(&Announce::End).map(|_| ())
    }

    fn announce(&mut self, what: &Announce) -> Result<u64> {
        let sync = self.next;
        self.next += 1;
        self.store.set(&format!("sync/{sync}"), &json(what))?;
        Ok(sync)
    }

    fn lost(&self, sync: u64, b: usize, message: String) -> Error {
        Error::Sync {
            message: format!(
                "sync {sync}, bucket {} of {}: {message} (receivers keep their weights; connect again)",
                b + 1,
                self.layout.buckets.len()
            ),
        }
    }

    /// Every receiver's answer to `sync`. Its keys are deleted once all
    /// answered (every receiver has read them), so that a long session does
    /// not grow the store.
    fn answers(&mut self, sync: u64) -> Result<()> {
        let mut refused = Vec::new();
        for rank in 1..=self.receivers {
            let key = format!("ack/{sync}/{rank}");
            let ack: Ack = parse("an answer", &self.store.get(&key, self.options.timeout)?)?;
            if let Some(error) = ack.error {
                refused.push(format!("receiver {rank}: {error}"));
            }
        }
        self.store.delete(&format!("sync/{sync}"))?;
        for rank in 1..=self.receivers {
            self.store.delete(&format!("ack/{sync}/{rank}"))?;
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(Error::Sync { message: format!("sync {sync} was refused: {}", refused.join("; ")) })
        }
    }

    fn same_entries(&self, source: &dyn Source) -> Result<()> {
        let now = source.entries();
        let changed = now.len() != self.entries.len()
            || now
                .iter()
                .zip(&self.entries)
                .any(|(a, b)| a.name != b.name || a.dtype != b.dtype || a.shape != b.shape);
        if changed {
            return Err(Error::Sync {
                message: format!(
                    "{} does not have the entries announced when the session began (names, dtypes, shapes): connect again",
                    source.origin()
                ),
            });
        }
        // Every tensor the layout sends is there, with the shape announced,
        // before the sync is announced: a sync that began is never abandoned
        // half way by this side.
        for &(index, _, _) in self.layout.buckets.iter().flat_map(|b| &b.tensors) {
            let entry = &self.entries[index];
            let fits = source.tensor(index).is_some_and(|t| {
                crate::dtype::Dtype::of(t).ok() == Some(entry.dtype) && t.size() == entry.shape
            });
            if !fits {
                return Err(Error::MissingTensor {
                    store: source.origin().to_string(),
                    tensor: entry.name.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A session's group, unless a failure let it go.
fn group_of(group: &mut Option<Group>) -> Result<&mut Group> {
    group.as_mut().ok_or_else(|| Error::Sync { message: "this session's group was let go".into() })
}

impl Drop for Sender {
    fn drop(&mut self) {
        // A failed session's group was let go already; this one has nothing in flight.
        let _ = self.end();
    }
}
