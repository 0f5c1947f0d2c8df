//! The plan: every pair (with the rule or matcher that made it and the cast it
//! needs), everything left over on both sides, and every finding — all known
//! before a single tensor is written. [`Plan::check`] applies a [`Policy`].
//!
//! - `mapping.rs`: how names are mapped ([`Mapping`]: rules, a matcher, a lent order);
//! - `build.rs`: [`Plan::build`], in steps: rules, collisions, renamed pairs,
//!   the matcher, then what follows from the pairs;
//! - `many.rs`: splits, groups of a `cat`, and collisions among the names
//!   rules make;
//! - `stack.rs`: the groups of a `stack` (every index of a capture, in
//!   order, checked for gaps) and the parts of an `unstack`;
//! - `finish.rs`: what follows from the pairs (findings per pair, leftovers,
//!   hints, BatchNorm modules copied in part);
//! - `finding.rs`: what a plan can find, and how serious each is;
//! - `file.rs`: plans saved as JSON and replayed.
//!
//! A plan reads names, roles, dtypes and shapes; it never reads tensor values
//! or writes a file except as asked ([`Plan::save`]).
mod build;
mod file;
mod finding;
mod finish;
mod fp8;
mod kept;
mod many;
mod mapping;
mod stack;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use file::{PlanFile, PlannedPair};
pub use finding::{Finding, Severity};
pub use mapping::{Mapping, NameOrder};
pub(crate) use stack::unstack_parts;

use crate::dtype::Dtype;
use crate::entry::Name;
use crate::error::{Error, Result};
use crate::matching::{How, Matcher, ModuleMatch};
use crate::store::Source;
use crate::transform::Transform;

/// What a check tolerates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Leftovers, unused rules, ambiguities and warnings become errors.
    pub strict: bool,
    /// Casts that can lose information (float → integer, values out of the
    /// target type's range) are allowed.
    pub allow_lossy_casts: bool,
}

/// A dtype conversion a pair needs (the target keeps its dtype).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cast {
    /// Source dtype.
    pub from: Dtype,
    /// Target dtype.
    pub to: Dtype,
    /// Why the cast loses information, when it does.
    pub lossy: Option<String>,
}

/// One source tensor going into one target tensor.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// Index of the source entry.
    pub source: usize,
    /// Index of the target entry.
    pub target: usize,
    /// Source name.
    pub source_name: Name,
    /// Target name.
    pub target_name: Name,
    /// The rule that renamed the source, as written (`pattern => replacement`).
    pub rule: Option<Arc<str>>,
    /// The matcher step that paired the (renamed) names.
    pub how: How,
    /// The dtype conversion, if the dtypes differ.
    pub cast: Option<Cast>,
    /// For a pair replayed from a plan file: what made it when the plan was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded: Option<Arc<str>>,
    /// What a rule's transforms do to this pair: a view of the source, a
    /// region of the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

impl Pair {
    /// `rule … then exact`, `suffix`, `order`: what made this pair.
    pub fn provenance(&self) -> String {
        match &self.rule {
            Some(rule) if self.how == How::Exact => format!("rule `{rule}`"),
            Some(rule) => format!("rule `{rule}` + {}", self.how),
            None => match (&self.recorded, self.how) {
                (Some(recorded), How::Plan) => format!("plan file: {recorded}"),
                _ => self.how.to_string(),
            },
        }
    }
}

/// Which side of the transfer an entry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The model copied from.
    Source,
    /// The model copied into.
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// An entry that takes no part in the transfer.
#[derive(Debug, Clone, Serialize)]
pub struct Leftover {
    /// Source or target.
    pub side: Side,
    /// Index of the entry on its side.
    pub index: usize,
    /// Its name.
    pub name: Name,
    /// Why it is left over, when that is expected (skipped by a rule, a
    /// `num_batches_tracked` with no counterpart); `None` when nothing paired it.
    pub explained: Option<String>,
    /// For a source a rule renamed: the name the rule made and the rule
    /// (`backbone.scale by rule `…``), which no target has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renamed: Option<String>,
    /// The open leftover of the other side it most likely is: of the same leaf
    /// and shape (the structure agrees), nearest in name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub near: Option<Name>,
}

/// A target entry kept as it is on purpose (`keep PATTERN`, `--keep`): it
/// receives nothing and is not left over.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    /// Index of the target entry.
    pub index: usize,
    /// Its name.
    pub name: Name,
    /// The keep rule, as written.
    pub rule: String,
    /// Where the rule was written.
    pub at: String,
}

/// The whole transfer, decided and checked before anything is written.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Where the source tensors come from.
    pub source: String,
    /// Where the target tensors live.
    pub target: String,
    /// The matcher used.
    pub matcher: Matcher,
    /// Every pair, in target order.
    pub pairs: Vec<Pair>,
    /// The modules the order matcher aligned (empty for the other matchers).
    pub modules: Vec<ModuleMatch>,
    /// How each side was ordered, when the order matcher ran.
    pub order: Option<Orders>,
    /// Source entries that go nowhere.
    pub source_leftovers: Vec<Leftover>,
    /// Target entries that receive nothing.
    pub target_leftovers: Vec<Leftover>,
    /// Target entries kept as they are on purpose (`keep`): not left over.
    pub kept: Vec<Kept>,
    /// Everything found, whatever the policy.
    pub findings: Vec<Finding>,
}

/// The order a side's modules were aligned in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "order", rename_all = "snake_case")]
pub enum OrderUsed {
    /// The store's own registration order.
    Registration,
    /// Reconstructed from the names (natural order): the store keeps none.
    Reconstructed,
    /// Lent by another model (`--order-from`).
    From {
        /// That model.
        model: String,
    },
}

/// How both sides were ordered for the order matcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orders {
    /// The source's order.
    pub source: OrderUsed,
    /// The target's order.
    pub target: OrderUsed,
}

impl Orders {
    /// Whether either side's order was reconstructed from names.
    pub fn reconstructed(&self) -> bool {
        self.source == OrderUsed::Reconstructed || self.target == OrderUsed::Reconstructed
    }
}

impl Plan {
    /// Whether `source` and `target` list, at every paired index, an entry of
    /// the name this plan paired there. (Dtypes and shapes are checked again,
    /// on the live tensors, by the copy; a saved plan is replayed only on stores
    /// whose entries' digests are unchanged.)
    pub fn fits(&self, source: &dyn Source, target: &dyn Source) -> bool {
        // Names are shared: against the stores the plan was made for, `Name`'s
        // equality finds the very same allocation without reading the strings.
        let same = |store: &dyn Source, index: usize, name: &Name| {
            store.entries().get(index).is_some_and(|e| e.name == *name)
        };
        self.pairs
            .iter()
            .all(|p| same(source, p.source, &p.source_name) && same(target, p.target, &p.target_name))
    }

    /// `Ok` when [`Plan::fits`] `source` and `target`; else an error naming them.
    pub fn ensure_fits(&self, source: &dyn Source, target: &dyn Source) -> Result<()> {
        if self.fits(source, target) {
            return Ok(());
        }
        Err(Error::PlanRejected {
            from: self.source.clone(),
            target: self.target.clone(),
            problems: vec![format!(
                "{} -> {} are not the stores this plan was made for",
                source.origin(),
                target.origin()
            )],
        })
    }

    /// The findings with their severity under `policy`, most serious first.
    pub fn problems(&self, policy: &Policy) -> Vec<(Severity, &Finding)> {
        let mut out: Vec<(Severity, &Finding)> =
            self.findings.iter().map(|f| (f.severity(policy), f)).collect();
        out.sort_by_key(|(severity, _)| std::cmp::Reverse(*severity));
        out
    }

    /// `Ok` when no finding is an error under `policy`; else an error listing them.
    pub fn check(&self, policy: &Policy) -> Result<()> {
        let errors: Vec<String> = self
            .problems(policy)
            .into_iter()
            .filter(|(s, _)| *s == Severity::Error)
            .map(|(_, f)| f.to_string())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::PlanRejected {
                from: self.source.clone(),
                target: self.target.clone(),
                problems: errors,
            })
        }
    }

    /// How many entries, on both sides, are left over without an explanation.
    pub fn open_leftovers(&self) -> usize {
        self.source_leftovers.iter().chain(&self.target_leftovers).filter(|l| l.explained.is_none()).count()
    }

    /// `Ok` when the plan [is complete](Plan::is_complete); else an error saying
    /// that a `transfer` (a swap, a sync) needs it, naming the first entries
    /// left open.
    pub fn ensure_complete(&self, transfer: &str) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        let first: Vec<String> = self
            .source_leftovers
            .iter()
            .chain(&self.target_leftovers)
            .filter(|l| l.explained.is_none())
            .take(4)
            .map(|l| format!("{} {}", l.side, l.name))
            .collect();
        let open = self.open_leftovers();
        let named = if first.is_empty() { String::new() } else { format!(" (first: {})", first.join(", ")) };
        Err(Error::PlanRejected {
            from: self.source.clone(),
            target: self.target.clone(),
            problems: vec![format!(
                "{transfer} needs a complete transfer; {open} tensors have no counterpart{named}"
            )],
        })
    }

    /// Whether every target entry receives a value and every source entry goes
    /// somewhere, apart from what is explained (skipped by a rule, a
    /// `num_batches_tracked` with no counterpart).
    pub fn is_complete(&self) -> bool {
        self.open_leftovers() == 0
            && !self.findings.iter().any(|f| {
                matches!(
                    f,
                    Finding::Collision { .. }
                        | Finding::ShapeMismatch { .. }
                        | Finding::Transform { .. }
                        | Finding::IncompleteGroup { .. }
                        | Finding::KeptFilled { .. }
                )
            })
    }
}
