//! [`ModelSlot`]: a TorchScript model that serves requests from many threads
//! while new weights arrive.
//!
//! Weights are never written into the model that serves. A swap copies them
//! into a standby copy of the module, checks and verifies them there, and only
//! then makes the standby live by replacing one pointer. A request takes the
//! live model once and runs entirely on it, so every response is computed by
//! the old weights or by the new ones, never a mix; requests never wait for a
//! copy (they only clone a pointer under a lock held for that instant); and a
//! checkpoint that fails its check or verification never goes live.
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;
use tch::Tensor;

use crate::copy::{copy, Copied};
use crate::error::{Error, Result};
use crate::plan::{Mapping, Plan, Policy};
use crate::script_module::ScriptModule;
use crate::store::{self, ModuleStore, Source};

/// What a successful swap did.
#[derive(Debug, Clone, Serialize)]
pub struct Swap {
    /// Where the new weights came from.
    pub source: String,
    /// The copy into the standby module.
    pub copied: Copied,
    /// Whether the standby was a retired model reused (else a fresh deep copy).
    pub reused_standby: bool,
    /// Seconds from the start of the swap to the new weights going live.
    pub seconds: f64,
    /// How many swaps this slot has made, this one included.
    pub generation: u64,
}

/// A model that serves while its weights are replaced (see the module docs).
pub struct ModelSlot {
    live: RwLock<Arc<ScriptModule>>,
    /// The model the last swap replaced, reused as the next standby once no
    /// request holds it any more.
    retired: Mutex<Option<Arc<ScriptModule>>>,
    /// One swap at a time.
    swapping: Mutex<()>,
    generation: AtomicU64,
}

impl std::fmt::Debug for ModelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSlot").field("generation", &self.generation()).finish()
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Poisoned { what: "model slot" }
}

impl ModelSlot {
    /// Serves `module`, switched to eval mode.
    pub fn new(mut module: ScriptModule) -> Result<Self> {
        module.set_training(false)?;
        Ok(Self {
            live: RwLock::new(Arc::new(module)),
            retired: Mutex::new(None),
            swapping: Mutex::new(()),
            generation: AtomicU64::new(0),
        })
    }

    /// The live model. Hold it for the whole request: it stays valid (and its
    /// weights unchanged) even if a swap happens meanwhile.
    pub fn current(&self) -> Result<Arc<ScriptModule>> {
        Ok(Arc::clone(&*self.live.read().map_err(poisoned)?))
    }

    /// Runs `forward` on the live model.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.current()?.forward(inputs)
    }

    /// How many swaps have gone live.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Opens `path` (any supported model file) and swaps its weights in.
    pub fn swap_from_file(&self, path: &Path, mapping: &Mapping, policy: &Policy) -> Result<Swap> {
        let source = store::open(path)?;
        self.swap_from(source.as_ref(), mapping, policy)
    }

    /// Copies `source`'s tensors into a standby copy of the model, checks and
    /// verifies them, then makes the standby live. The plan must be complete
    /// (every tensor of the model gets a value); on any error the live model is
    /// untouched.
    pub fn swap_from(&self, source: &dyn Source, mapping: &Mapping, policy: &Policy) -> Result<Swap> {
        self.swap_with(source.origin(), |standby| {
            let plan = Plan::build(source, &*standby, mapping)?;
            plan.ensure_complete("a swap")?;
            copy(&plan, source, standby, policy)
        })
    }

    /// The swap itself: `write` fills a standby copy of the model (a retired
    /// model reused, else a deep copy of the live one) and says what it copied;
    /// only when it returns `Ok` does the standby go live. `source` names where
    /// the weights came from.
    pub(crate) fn swap_with(
        &self,
        source: &str,
        write: impl FnOnce(&mut ModuleStore) -> Result<Copied>,
    ) -> Result<Swap> {
        let _one_at_a_time = self.swapping.lock().map_err(poisoned)?;
        let start = Instant::now();
        let retired = self.retired.lock().map_err(poisoned)?.take();
        let (standby, reused_standby) = match retired.map(Arc::try_unwrap) {
            Some(Ok(module)) => (module, true),
            // Still serving an earlier request (or none yet): a fresh copy.
            Some(Err(_)) | None => (self.current()?.deep_copy()?, false),
        };
        let mut standby = ModuleStore::new(standby)?;
        let copied = match write(&mut standby) {
            Ok(copied) => copied,
            Err(error) => {
                // Every later swap overwrites every tensor, so the standby can wait for it.
                *self.retired.lock().map_err(poisoned)? = Some(Arc::new(standby.into_module()));
                return Err(error);
            }
        };
        let fresh = Arc::new(standby.into_module());
        let old = std::mem::replace(&mut *self.live.write().map_err(poisoned)?, fresh);
        *self.retired.lock().map_err(poisoned)? = Some(old);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        Ok(Swap {
            source: source.to_string(),
            copied,
            reused_standby,
            seconds: start.elapsed().as_secs_f64(),
            generation,
        })
    }
}
