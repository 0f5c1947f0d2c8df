//! [`Receiver`]: takes syncs into a [`ModelSlot`], each whole or not at all.
use std::time::{Duration, Instant};

/// How often a receiver in a session looks for a newer sender.
const NEWER_SESSION_POLL: Duration = Duration::from_millis(250);

use serde::Serialize;
use tch::Tensor;

use super::{
    buckets, buffer, channel_store, json, parse, Ack, Announce, Announced, Announcement, Endpoint, Layout,
    Need, SyncOptions, DIGEST, POLL, PROTOCOL,
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
    /// When the store was last asked for a newer session.
    looked: Option<Instant>,
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
    /// The buffer of the last bare broadcast.
    pub(super) raw: Option<Tensor>,
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
        let store = channel_store(endpoint, endpoint.serve_store, options.timeout)?;
        let mut endpoint = endpoint.clone();
        if endpoint.serve_store {
            endpoint.port = store.port()?;
        }
        Ok(Self {
            store,
            endpoint,
            rank,
            receivers,
            mapping,
            policy,
            options,
            session: None,
            last_session: 0,
            looked: None,
        })
    }

    /// The port of the store (the one chosen where the endpoint asked for 0).
    pub fn store_port(&self) -> Result<u16> {
        self.store.port()
    }

    /// The session joined, if any.
    pub fn session(&self) -> Option<i64> {
        self.session.as_ref().map(|s| s.id)
    }

    /// Waits up to `wait` for the next sync and takes it into `slot`:
    /// `Ok(None)` when none began in that time. Joins a sender's session on the
    /// way (a newer sender replaces an older one). An error — this receiver's
    /// plan refused, a digest mismatch, the sender lost mid-sync — leaves the
    /// served weights as they were; call again for the next sync.
    pub fn receive(&mut self, slot: &ModelSlot, wait: Duration) -> Result<Option<Received>> {
        let deadline = Instant::now() + wait;
        loop {
            // A newer sender is looked for now and then (and at once when no
            // session is joined); the next sync of this one, at every poll.
            let look =
                self.session.is_none() || self.looked.is_none_or(|at| at.elapsed() >= NEWER_SESSION_POLL);
            let newest = if look {
                self.looked = Some(Instant::now());
                match self.store.add("session", 0) {
                    Ok(newest) => newest,
                    Err(lost) => return Err(self.store_lost(lost, wait)),
                }
            } else {
                self.last_session
            };
            if newest > self.last_session {
                self.last_session = newest;
                self.session = None;
                if self.claim(newest)? {
                    self.session = Some(self.join(newest, slot)?);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.session.as_mut() {
                Some(session) => {
                    let key = format!("sync/{}", session.next);
                    // Polled (c10d logs a warning for every wait that times out).
                    let found = match session.store.check(&key) {
                        Ok(found) => found,
                        Err(lost) => return Err(self.store_lost(lost, wait)),
                    };
                    if found {
                        let announce: Announce =
                            parse(&key, &session.store.get(&key, self.options.timeout)?)?;
                        session.next += 1;
                        match announce {
                            Announce::End => self.session = None,
                            Announce::Raw { bytes } => return self.raw(bytes).map(Some),
                            Announce::Weights => return self.apply(slot).map(Some),
                        }
                    } else {
                        std::thread::sleep(left.min(POLL));
                    }
                }
                None => std::thread::sleep(left.min(POLL)),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// The store could not be reached (`lost`): where another process serves
    /// it (a trainer that exited took its store along), connects again,
    /// waiting up to `wait` for a server, and starts counting sessions afresh
    /// — a new server's first session is 1. The error says what happened.
    fn store_lost(&mut self, lost: Error, wait: Duration) -> Error {
        self.session = None;
        let endpoint = &self.endpoint;
        if endpoint.serve_store {
            return lost;
        }
        let timeout = wait.clamp(Duration::from_secs(1), self.options.timeout);
        match channel_store(endpoint, false, timeout) {
            Ok(store) => {
                self.store = store;
                self.last_session = 0;
                self.looked = None;
                Error::Sync { message: format!("{lost}; connected to the store again, for the next sender") }
            }
            Err(again) => {
                Error::Sync { message: format!("{lost}; the store cannot be reached again: {again}") }
            }
        }
    }

    /// Takes this rank's place in session `id`, unless a process already did.
    fn claim(&mut self, id: i64) -> Result<bool> {
        Ok(self.store.add(&format!("{id}/joined/{}", self.rank), 1)? == 1)
    }

    /// The handshake of session `id` (module docs, steps 2 to 4).
    fn join(&mut self, id: i64, slot: &ModelSlot) -> Result<Session> {
        let timeout = self.options.timeout;
        let mut store = self.store.prefixed(&format!("{id}/"))?;
        let announcement: Announcement = parse("the sender's entries", &store.get("entries", timeout)?)?;
        let origin = format!(
            "sync sender at {}:{} (channel {}, session {id}: {})",
            self.endpoint.host, self.endpoint.port, self.endpoint.channel, announcement.origin
        );
        let need_key = format!("need/{}", self.rank);
        let planned = self.plan(&announcement, origin, slot);
        let (announced, plan) = match planned {
            Ok(planned) => planned,
            Err(error) => {
                store.set(&need_key, &json(&Need { tensors: None, error: Some(error.to_string()) }))?;
                if self.rank == 1 {
                    // The lead still answers for everyone: the sender and the
                    // other receivers learn why, instead of timing out.
                    let layout = self.lay_out(&mut store, None, &announcement);
                    store.set("layout", &json(&layout))?;
                }
                return Err(error);
            }
        };
        let mut needed: Vec<usize> = plan.pairs.iter().map(|p| p.source).collect();
        needed.sort_unstable();
        needed.dedup();
        store.set(&need_key, &json(&Need { tensors: Some(needed), error: None }))?;
        let layout: Layout = if self.rank == 1 {
            let layout = self.lay_out(&mut store, Some(&announced), &announcement);
            store.set("layout", &json(&layout))?;
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
        let mut group_store = store.prefixed("gloo/")?;
        let group = Group::gloo(&mut group_store, self.rank, self.receivers + 1, timeout, &hostname)?;
        Ok(Session {
            id,
            store,
            group,
            announced,
            layout,
            parts,
            buffers: [buffer(largest), buffer(largest)],
            next: 1,
            raw: None,
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
    fn lay_out(
        &self,
        store: &mut Store,
        announced: Option<&Announced>,
        announcement: &Announcement,
    ) -> Layout {
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
        let Some(announced) = announced.filter(|_| errors.is_empty()) else {
            return Layout { digest: DIGEST.into(), buckets: Vec::new(), error: Some(errors.join("; ")) };
        };
        if needed.iter().any(|&i| i >= announced.entries.len()) {
            return Layout {
                digest: DIGEST.into(),
                buckets: Vec::new(),
                error: Some("an answer names entries the sender does not have".into()),
            };
        }
        Layout::pack(&announced.entries, &announced.ties, &needed, announcement.bucket_bytes.max(1))
    }

    /// A sync: every bucket into a standby copy of the model, which goes live
    /// only when all arrived, checked and were copied.
    fn apply(&mut self, slot: &ModelSlot) -> Result<Received> {
        let start = Instant::now();
        let policy = self.policy;
        let rank = self.rank;
        let Some(session) = self.session.as_mut() else {
            return Err(Error::Sync { message: "no session".into() });
        };
        let sync = session.next - 1;
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
    /// the network with it).
    fn raw(&mut self, bytes: u64) -> Result<Received> {
        let start = Instant::now();
        let rank = self.rank;
        let Some(session) = self.session.as_mut() else {
            return Err(Error::Sync { message: "no session".into() });
        };
        let sync = session.next - 1;
        // Kept for the next bare broadcast of the same size (benchmarks run several).
        let received = match session.raw.take() {
            Some(kept) if kept.numel() as u64 == bytes => kept,
            _ => buffer(bytes),
        };
        let result = session.group.broadcast(&received, 0)?.wait().map_err(|message| {
            session.broken = true;
            Error::Sync { message: format!("bare broadcast {sync}: {message}") }
        });
        let seconds = start.elapsed().as_secs_f64();
        session.raw = Some(received);
        let error = result.as_ref().err().map(|e| e.to_string());
        session.store.set(&format!("ack/{sync}/{rank}"), &json(&Ack { error, seconds }))?;
        let id = session.id;
        if session.broken {
            self.session = None;
        }
        result?;
        Ok(Received { session: id, sync, bytes, buckets: 1, seconds, swap: None })
    }
}
