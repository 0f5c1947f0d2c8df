//! [`Receiver`]: takes syncs into a [`ModelSlot`], each whole or not at all.
//!
//! Long because one receiver's state machine is one concept: finding and
//! claiming sessions (and surviving a peer's garbage on the way), the
//! handshake, and taking each sync or bare broadcast; the buckets themselves
//! are in `buckets.rs`, the layout in `layout.rs`.
use std::time::{Duration, Instant};

/// How often a receiver in a session looks for a newer sender.
const NEWER_SESSION_POLL: Duration = Duration::from_millis(250);
/// How long reading a key that was just seen may wait (a peer may delete it
/// in between).
const POLL_GET: Duration = Duration::from_secs(1);

/// Why a look at the store returned no sync.
enum Polled {
    /// The store could not be reached.
    Lost(Error),
    /// A session or a sync was refused (the served weights are unchanged).
    Refused(Error),
}

use serde::Serialize;
use tch::Tensor;

use super::{
    buckets, buffer, channel_store, channel_store_within, json, parse, Ack, Announce, Announced,
    Announcement, Endpoint, Layout, Need, SyncOptions, DIGEST, POLL, PROTOCOL,
};
use crate::c10d::{Group, Store};
use crate::copy::rejected;
use crate::entry::{Entry, EntryOrder};
use crate::error::{Error, Result};
use crate::plan::{Mapping, Plan, Policy};
use crate::script_module::ScriptModule;
use crate::slot::{ModelSlot, Swap};
use crate::store::{Source, StoreKind};

/// What one sync did on a receiver.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// The sender's session.
    pub session: i64,
    /// The sync's number within it (from 1).
    pub sync: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Buckets received.
    pub buckets: usize,
    /// Seconds from the sync's first bucket to its weights going live.
    pub seconds: f64,
    /// The swap that made the weights live (`None` for a bare broadcast a
    /// sender ran to measure the network, which changes nothing).
    pub swap: Option<Swap>,
}

/// One replica's side of a sync (see the [module docs](super)): rank `rank`
/// of `receivers`, planning each sender's entries against its served model
/// with its own mapping and policy.
pub struct Receiver {
    /// The store's server, where this process serves it (kept for its
    /// lifetime; `store` is a client of it, connected again when a peer's
    /// input made the server drop that client's connection).
    server: Option<Store>,
    store: Store,
    endpoint: Endpoint,
    rank: usize,
    receivers: usize,
    mapping: Mapping,
    policy: Policy,
    options: SyncOptions,
    session: Option<Session>,
    /// The newest session this receiver considered (joined, or refused).
    last_session: i64,
    /// A newer session this receiver claimed whose sender has not announced
    /// its entries yet, and since when (the joined session is served
    /// meanwhile; the claim lapses after the timeout).
    pending: Option<(i64, Instant)>,
    /// When the store was last asked for a newer session.
    looked: Option<Instant>,
    /// The store has been unreachable since this failure was reported (one
    /// error an outage, not one a poll).
    outage: bool,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("endpoint", &self.endpoint)
            .field("rank", &self.rank)
            .field("receivers", &self.receivers)
            .field("session", &self.session.as_ref().map(|s| s.id))
            .finish()
    }
}

/// A sender's session, joined.
pub(super) struct Session {
    pub(super) id: i64,
    pub(super) store: Store,
    pub(super) group: Group,
    pub(super) announced: Announced,
    pub(super) layout: Layout,
    /// Per bucket, the pairs of the plan it feeds.
    pub(super) parts: Vec<Plan>,
    /// The two buffers buckets arrive in, each as large as the largest bucket.
    pub(super) buffers: [Tensor; 2],
    pub(super) next: u64,
    /// The group failed (a peer gone, a timeout): the session is over.
    pub(super) broken: bool,
}

/// The served model's entries, with read-only handles on its tensors (for ties).
struct Live {
    origin: String,
    entries: Vec<Entry>,
    tensors: Vec<Tensor>,
}

impl Live {
    fn of(module: &ScriptModule) -> Result<Self> {
        let named = module.named_tensors()?;
        let entries = crate::store::live_entries(module, &named)?;
        Ok(Self {
            origin: module.origin().to_string(),
            entries,
            tensors: named.into_iter().map(|n| n.tensor).collect(),
        })
    }
}

// SAFETY: as for `ModuleStore`: shared access only reads (entries, and
// handles on tensors that nothing here writes).
unsafe impl Sync for Live {}

impl Source for Live {
    fn origin(&self) -> &str {
        &self.origin
    }
    fn kind(&self) -> StoreKind {
        StoreKind::Module
    }
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entry_order(&self) -> EntryOrder {
        EntryOrder::Registration
    }
    fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index)
    }
}

impl Receiver {
    /// Meets senders at `endpoint` as receiver `rank` (1..=`receivers`).
    /// Serves the store when the endpoint says so.
    pub fn connect(
        endpoint: &Endpoint,
        rank: usize,
        receivers: usize,
        mapping: Mapping,
        policy: Policy,
        options: SyncOptions,
    ) -> Result<Self> {
        if rank == 0 || rank > receivers {
            return Err(Error::Sync { message: format!("receiver rank {rank} is not in 1..={receivers}") });
        }
        let mut endpoint = endpoint.clone();
        let server = if endpoint.serve_store {
            let server = channel_store(&endpoint, true, &options)?;
            endpoint.port = server.port()?;
            Some(server)
        } else {
            None
        };
        let store = channel_store(&endpoint, false, &options)?;
        Ok(Self {
            server,
            store,
            endpoint,
            rank,
            receivers,
            mapping,
            policy,
            options,
            session: None,
            last_session: 0,
            pending: None,
            looked: None,
            outage: false,
        })
    }

    /// The port of the store (the one chosen where the endpoint asked for 0).
    pub fn store_port(&self) -> Result<u16> {
        match &self.server {
            Some(server) => server.port(),
            None => Ok(self.endpoint.port),
        }
    }

    /// The session joined, if any.
    pub fn session(&self) -> Option<i64> {
        self.session.as_ref().map(|s| s.id)
    }

    /// Waits up to `wait` for the next sync and takes it into `slot`:
    /// `Ok(None)` when none began in that time. Joins a sender's session on the
    /// way (a newer sender replaces an older one once it announced its
    /// entries). An error — this receiver's plan refused, a digest mismatch,
    /// the sender lost mid-sync, a peer's malformed input — leaves the served
    /// weights as they were; call again for the next sync. A store that cannot
    /// be reached is one error until it can be again, not one a call.
    pub fn receive(&mut self, slot: &ModelSlot, wait: Duration) -> Result<Option<Received>> {
        let deadline = Instant::now() + wait;
        loop {
            match self.poll(slot) {
                Ok(Some(received)) => return Ok(Some(received)),
                Ok(None) => {}
                Err(Polled::Refused(error)) => return Err(error),
                Err(Polled::Lost(lost)) => {
                    if let Some(error) = self.store_lost(lost, deadline) {
                        return Err(error);
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            std::thread::sleep(left.min(POLL));
        }
    }

    /// One look at the store: a newer session, the pending one's entries, the
    /// joined session's next sync.
    fn poll(&mut self, slot: &ModelSlot) -> std::result::Result<Option<Received>, Polled> {
        // A newer sender is looked for now and then (and at once when no
        // session is joined); the next sync of this one, at every poll.
        let look = self.session.is_none() || self.looked.is_none_or(|at| at.elapsed() >= NEWER_SESSION_POLL);
        if look {
            self.looked = Some(Instant::now());
            let newest = self.newest_session().map_err(Polled::Lost)?;
            self.outage = false;
            if newest > self.last_session {
                self.last_session = newest;
                // Taken by another process of this rank, or a counter a peer
                // broke: not this receiver's session.
                self.pending = matches!(self.claim(newest), Ok(true)).then(|| (newest, Instant::now()));
            }
        }
        if let Some((id, since)) = self.pending {
            if self.store.check(&format!("{id}/entries")).map_err(Polled::Lost)? {
                self.pending = None;
                // The session served so far ends only when the newer one is joined.
                let joined = self.join(id, slot).map_err(Polled::Refused)?;
                self.session = Some(joined);
            } else if since.elapsed() >= self.options.timeout {
                self.pending = None;
                return Err(Polled::Refused(Error::Sync {
                    message: format!(
                        "session {id} announced nothing within {:?}; waiting for the next sender",
                        self.options.timeout
                    ),
                }));
            }
        }
        let Some(session) = self.session.as_mut() else { return Ok(None) };
        let key = format!("sync/{}", session.next);
        // Polled (c10d logs a warning for every wait that times out).
        if !session.store.check(&key).map_err(Polled::Lost)? {
            return Ok(None);
        }
        let value = session.store.get(&key, self.options.timeout).map_err(Polled::Lost)?;
        session.next += 1;
        let announce = match parse::<Announce>(&key, &value) {
            Ok(announce) => announce,
            Err(error) => {
                // What comes next on the group is unknown: the session is over.
                self.session = None;
                return Err(Polled::Refused(error));
            }
        };
        match announce {
            Announce::End => {
                self.session = None;
                Ok(None)
            }
            Announce::Raw { bytes } => self.raw(bytes).map(Some).map_err(Polled::Refused),
            Announce::Weights { buckets } => self.apply(slot, &buckets).map(Some).map_err(Polled::Refused),
        }
    }

    /// The newest session on the channel (0: none yet). A counter that is no
    /// session number — a peer's garbage, a number below the last one seen,
    /// the key deleted — is put back to the last one seen, so that the next
    /// sender counts on from there (reading, not adding: c10d's server drops
    /// the connection of a client that adds to a value that is no number).
    fn newest_session(&mut self) -> Result<i64> {
        let last = self.last_session;
        let value = if self.store.check("session")? {
            let bytes = self.store.get("session", POLL_GET)?;
            std::str::from_utf8(&bytes).ok().and_then(|text| text.parse::<i64>().ok())
        } else if last == 0 {
            return Ok(0);
        } else {
            None
        };
        match value {
            Some(newest) if newest >= last => Ok(newest),
            _ => {
                self.store.set("session", last.to_string().as_bytes())?;
                Ok(last)
            }
        }
    }

    /// The store could not be reached (`lost`). Where this process serves it,
    /// connects to it again (a peer's input can make the server drop a
    /// client); where another process does (a trainer that exited took its
    /// store along), connects again, waiting until `deadline` (at least a
    /// second) for a server, and starts counting sessions afresh — a new
    /// server's first session is 1. The error, the first time of an outage.
    fn store_lost(&mut self, lost: Error, deadline: Instant) -> Option<Error> {
        self.session = None;
        self.pending = None;
        let endpoint = &self.endpoint;
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = left.clamp(Duration::from_secs(1), self.options.timeout);
        let again = channel_store_within(endpoint, false, &self.options, timeout);
        let first = !self.outage;
        match again {
            Ok(store) => {
                self.store = store;
                self.looked = None;
                self.outage = false;
                if self.server.is_some() {
                    return Some(Error::Sync { message: format!("{lost}; connected to the store again") });
                }
                self.last_session = 0;
                Some(Error::Sync {
                    message: format!("{lost}; connected to the store again, for the next sender"),
                })
            }
            Err(again) => {
                self.outage = true;
                first.then(|| Error::Sync {
                    message: format!(
                        "{lost}; the store cannot be reached again: {again} (said once until it can)"
                    ),
                })
            }
        }
    }

    /// Takes this rank's place in session `id`, unless a process already did.
    fn claim(&mut self, id: i64) -> Result<bool> {
        Ok(self.store.add(&format!("{id}/joined/{}", self.rank), 1)? == 1)
    }

    /// The lead's last step of a handshake: the layout set, the answers and
    /// the announcement (any size a sender chose) deleted — every receiver
    /// read them before it answered.
    fn set_layout(&self, store: &mut Store, layout: &Layout) -> Result<()> {
        store.set("layout", &json(layout))?;
        store.delete("entries")?;
        for rank in 1..=self.receivers {
            store.delete(&format!("need/{rank}"))?;
        }
        Ok(())
    }

    /// The handshake of session `id` (module docs, steps 2 to 4).
    fn join(&mut self, id: i64, slot: &ModelSlot) -> Result<Session> {
        let timeout = self.options.timeout;
        let mut store = self.store.prefixed(&format!("{id}/"))?;
        let entries = store.get("entries", timeout)?;
        let need_key = format!("need/{}", self.rank);
        let planned = parse::<Announcement>("the sender's entries", &entries).and_then(|announcement| {
            let origin = format!(
                "sync sender at {}:{} (channel {}, session {id}: {})",
                self.endpoint.host,
                self.endpoint.port,
                self.endpoint.channel,
                crate::dotted::escaped(&announcement.origin)
            );
            self.plan(&announcement, origin, slot).map(|(announced, plan)| (announced, plan, announcement))
        });
        drop(entries);
        let (announced, plan, announcement) = match planned {
            Ok(planned) => planned,
            Err(error) => {
                store.set(&need_key, &json(&Need { tensors: None, error: Some(error.to_string()) }))?;
                if self.rank == 1 {
                    // The lead still answers for everyone: the sender and the
                    // other receivers learn why, instead of timing out.
                    let layout = self.lay_out(&mut store, None);
                    self.set_layout(&mut store, &layout)?;
                }
                return Err(error);
            }
        };
        let mut needed: Vec<usize> = plan.pairs.iter().map(|p| p.source).collect();
        needed.sort_unstable();
        needed.dedup();
        store.set(&need_key, &json(&Need { tensors: Some(needed), error: None }))?;
        let layout: Layout = if self.rank == 1 {
            let layout = self.lay_out(&mut store, Some((&announced, announcement.bucket_bytes)));
            self.set_layout(&mut store, &layout)?;
            layout
        } else {
            parse("the layout", &store.get("layout", timeout)?)?
        };
        if let Some(error) = &layout.error {
            return Err(Error::Sync { message: format!("session {id} was refused: {error}") });
        }
        layout.ensure_valid(&announced.entries)?;
        let parts = buckets::parts_of(&plan, &layout)?;
        let largest = layout.buckets.iter().map(|b| b.bytes).max().unwrap_or(0);
        let hostname = self.options.hostname.clone().unwrap_or_else(|| self.endpoint.host.clone());
        let group =
            Group::gloo(&store.prefixed("gloo/")?, self.rank, self.receivers + 1, timeout, &hostname)?;
        Ok(Session {
            id,
            store,
            group,
            announced,
            layout,
            parts,
            buffers: [buffer(largest)?, buffer(largest)?],
            next: 1,
            broken: false,
        })
    }

    /// This receiver's plan of the sender's entries against the served model:
    /// complete, passing the policy, and writing every group of tied target
    /// tensors from one sender tensor.
    fn plan(
        &self,
        announcement: &Announcement,
        origin: String,
        slot: &ModelSlot,
    ) -> Result<(Announced, Plan)> {
        if announcement.protocol != PROTOCOL {
            return Err(Error::Sync {
                message: format!(
                    "the sender speaks protocol {}, this receiver {PROTOCOL}",
                    announcement.protocol
                ),
            });
        }
        if announcement.receivers != self.receivers {
            return Err(Error::Sync {
                message: format!(
                    "the sender expects {} receivers, this one was told {}",
                    announcement.receivers, self.receivers
                ),
            });
        }
        let announced = Announced::from_wire(announcement, origin)?;
        let live = Live::of(&*slot.current()?)?;
        let plan = Plan::build(&announced, &live, &self.mapping)?;
        plan.check(&self.policy)?;
        plan.ensure_complete("a sync")?;
        // Buckets are copied one at a time, so a target written twice through a
        // tie must be written from one sender tensor (the copy checks each bucket).
        let group_of: std::collections::HashMap<usize, usize> = announced
            .ties
            .iter()
            .flat_map(|g| g.iter().map(move |&i| (i, *g.iter().min().unwrap_or(&i))))
            .collect();
        for tied in live.ties() {
            let mut from: Vec<(usize, String)> = plan
                .pairs
                .iter()
                .filter(|p| tied.contains(&p.target))
                .map(|p| {
                    let region = p.transform.as_ref().map(|t| t.target_text()).unwrap_or_default();
                    (group_of.get(&p.source).copied().unwrap_or(p.source), region)
                })
                .collect();
            from.sort();
            from.dedup();
            if from.len() > 1 {
                let names: Vec<&str> = tied.iter().map(|&i| live.entries[i].name.as_str()).collect();
                return Err(rejected(
                    &plan,
                    format!(
                        "{} share memory (tied weights?) but would receive different sender tensors: skip one with a rule",
                        names.join(" and ")
                    ),
                ));
            }
        }
        Ok((announced, plan))
    }

    /// The lead receiver's step 3: every receiver's answer joined into a layout.
    fn lay_out(&self, store: &mut Store, announced: Option<(&Announced, u64)>) -> Layout {
        let mut needed = Vec::new();
        let mut errors = Vec::new();
        for rank in 1..=self.receivers {
            let answer = store
                .get(&format!("need/{rank}"), self.options.timeout)
                .and_then(|bytes| parse::<Need>("an answer", &bytes));
            match answer {
                Ok(Need { error: Some(error), .. }) => errors.push(format!("receiver {rank}: {error}")),
                Ok(Need { tensors: Some(tensors), .. }) => needed.extend(tensors),
                Ok(Need { .. }) => errors.push(format!("receiver {rank}: an empty answer")),
                Err(e) => errors.push(format!("receiver {rank} did not answer: {e}")),
            }
        }
        let Some((announced, bucket_bytes)) = announced.filter(|_| errors.is_empty()) else {
            return Layout { digest: DIGEST.into(), buckets: Vec::new(), error: Some(errors.join("; ")) };
        };
        if needed.iter().any(|&i| i >= announced.entries.len()) {
            return Layout {
                digest: DIGEST.into(),
                buckets: Vec::new(),
                error: Some("an answer names entries the sender does not have".into()),
            };
        }
        Layout::pack(&announced.entries, &announced.ties, &needed, bucket_bytes.max(1))
    }

    /// A sync: every bucket into a standby copy of the model, which goes live
    /// only when all arrived, checked and were copied.
    fn apply(&mut self, slot: &ModelSlot, sizes: &[u64]) -> Result<Received> {
        let start = Instant::now();
        let policy = self.policy;
        let rank = self.rank;
        let Some(session) = self.session.as_mut() else {
            return Err(Error::Sync { message: "no session".into() });
        };
        let sync = session.next - 1;
        // Gloo aborts a process that receives a longer message than it posted:
        // sizes other than agreed are refused before a byte is received, and
        // the session ends (what the sender sends next is not what this side
        // could take).
        let agreed = session.layout.buckets.iter().map(|b| b.bytes);
        if !agreed.clone().eq(sizes.iter().copied()) {
            let message = format!(
                "sync {sync} announces buckets of {} bytes; the session agreed on {} (nothing received; the served weights are unchanged)",
                shown_sizes(sizes),
                shown_sizes(&agreed.collect::<Vec<_>>())
            );
            let ack = Ack { error: Some(message.clone()), seconds: 0.0 };
            let _ = session.store.set(&format!("ack/{sync}/{rank}"), &json(&ack));
            self.session = None;
            return Err(Error::Sync { message });
        }
        let origin = session.announced.origin.clone();
        let swapped = slot.swap_with(&origin, |standby| buckets::receive_buckets(session, standby, &policy));
        let seconds = start.elapsed().as_secs_f64();
        let error = swapped.as_ref().err().map(|e| e.to_string());
        let ack = session.store.set(&format!("ack/{sync}/{rank}"), &json(&Ack { error, seconds }));
        let (id, buckets) = (session.id, session.layout.buckets.len());
        let bytes = session.layout.buckets.iter().map(|b| b.bytes).sum();
        if session.broken {
            self.session = None;
        }
        let swap = swapped?;
        ack?;
        Ok(Received { session: id, sync, bytes, buckets, seconds, swap: Some(swap) })
    }

    /// A bare broadcast of `bytes`, received and dropped (the sender measures
    /// the network with it): at most a sync's bytes, in a buffer freed after.
    fn raw(&mut self, bytes: u64) -> Result<Received> {
        let start = Instant::now();
        let rank = self.rank;
        let Some(session) = self.session.as_mut() else {
            return Err(Error::Sync { message: "no session".into() });
        };
        let sync = session.next - 1;
        let per_sync: u64 = session.layout.buckets.iter().map(|b| b.bytes).sum();
        let received = if bytes > per_sync {
            Err(Error::Sync {
                message: format!(
                    "bare broadcast {sync} announces {bytes} bytes, more than a sync's {per_sync} (nothing received)"
                ),
            })
        } else {
            buffer(bytes)
        };
        let result = received.and_then(|received| {
            session.group.broadcast(&received, 0)?.wait().map_err(|message| {
                session.broken = true;
                Error::Sync { message: format!("bare broadcast {sync}: {message}") }
            })
        });
        // A broadcast this side did not take leaves the group out of step.
        session.broken |= result.is_err();
        let seconds = start.elapsed().as_secs_f64();
        let error = result.as_ref().err().map(|e| e.to_string());
        let ack = session.store.set(&format!("ack/{sync}/{rank}"), &json(&Ack { error, seconds }));
        let id = session.id;
        if session.broken {
            self.session = None;
        }
        result?;
        ack?;
        Ok(Received { session: id, sync, bytes, buckets: 1, seconds, swap: None })
    }
}

/// Bucket sizes for a message: the first few, and how many.
fn shown_sizes(sizes: &[u64]) -> String {
    let first: Vec<String> = sizes.iter().take(4).map(u64::to_string).collect();
    let more = if sizes.len() > 4 { format!(", … ({} buckets)", sizes.len()) } else { String::new() };
    format!("[{}{more}]", first.join(", "))
}
