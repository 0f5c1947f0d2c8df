//! The plan: every pair (with the rule or matcher that made it and the cast it
//! needs), everything left over on both sides, and every finding — all known
//! before a single tensor is written. [`Plan::check`] applies a [`Policy`].
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Kind;

use crate::chunks;
use crate::dotted::module_and_leaf;
use crate::dtype;
use crate::error::{Error, Result};
use crate::matching::{self, DtypeClass, How, Item, Matcher, ModuleMatch, Sequence, Unsure};
use crate::rules::{Outcome, Rules};
use crate::store::{Entry, EntryOrder, Name, Role, Source};

/// How names are mapped: explicit rules first, then an automatic matcher.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    /// Rename and skip rules, tried in order.
    pub rules: Rules,
    /// The matcher for what the rules leave.
    pub matcher: Matcher,
    /// The source's registration order, taken from another model with the same
    /// names (`--order-from`), for a source that keeps none.
    pub source_order: Option<NameOrder>,
}

/// The registration order of a model's names, lent to a source with the same
/// names that lost its own (a safetensors file, say).
#[derive(Debug, Clone)]
pub struct NameOrder {
    /// Where the order comes from, for messages.
    pub origin: String,
    /// The names in registration order.
    pub names: Vec<Name>,
}

impl NameOrder {
    /// The order of `store`'s entries, which must be its registration order.
    pub fn of(store: &dyn Source) -> Result<Self> {
        if store.entry_order() != EntryOrder::Registration {
            return Err(Error::OrderFrom {
                origin: store.origin().to_string(),
                problem: format!("{} keeps no registration order of its own to lend", store.kind()),
            });
        }
        Ok(Self {
            origin: store.origin().to_string(),
            names: store.entries().iter().map(|e| e.name.clone()).collect(),
        })
    }

    /// The indices of `entries` in this order; every name must be in it.
    fn sequence(&self, entries: &[Entry]) -> Result<Vec<usize>> {
        let rank: HashMap<&str, usize> =
            self.names.iter().enumerate().map(|(r, n)| (n.as_str(), r)).collect();
        let missing: Vec<&str> =
            entries.iter().filter(|e| !rank.contains_key(e.name.as_str())).map(|e| e.name.as_str()).collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(8).copied().collect();
            let more = if missing.len() > shown.len() {
                format!(" and {} more", missing.len() - shown.len())
            } else {
                String::new()
            };
            return Err(Error::OrderFrom {
                origin: self.origin.clone(),
                problem: format!(
                    "has no tensor named {}{more}: it must list every source name",
                    shown.join(", ")
                ),
            });
        }
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| rank[entries[i].name.as_str()]);
        Ok(order)
    }
}

impl Mapping {
    /// A mapping from command-line parts, rules tried in this order: every
    /// `skips` pattern, every `maps` rule (`PATTERN=>REPLACEMENT`), then the
    /// rules file — so a `--skip` always removes what it names.
    pub fn from_parts(
        rules_file: Option<&std::path::Path>,
        maps: &[String],
        skips: &[String],
        matcher: Matcher,
    ) -> Result<Self> {
        let mut rules = Rules::new();
        for pattern in skips {
            rules.add_skip(pattern)?;
        }
        for spec in maps {
            rules.add_map(spec)?;
        }
        if let Some(path) = rules_file {
            let file = Rules::from_file(path)?;
            for rule in file.rules() {
                rules.push(&rule.pattern, rule.action.clone(), rule.source.clone())?;
            }
        }
        Ok(Self { rules, matcher, source_order: None })
    }
}

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
    #[serde(serialize_with = "kind_name")]
    pub from: Kind,
    /// Target dtype.
    #[serde(serialize_with = "kind_name")]
    pub to: Kind,
    /// Why the cast loses information, when it does.
    pub lossy: Option<String>,
}

fn kind_name<S: serde::Serializer>(kind: &Kind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(dtype::name(*kind))
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
}

impl Pair {
    /// `rule … then exact`, `suffix`, `order`: what made this pair.
    pub fn provenance(&self) -> String {
        match &self.rule {
            Some(rule) if self.how == How::Exact => format!("rule `{rule}`"),
            Some(rule) => format!("rule `{rule}` + {}", self.how),
            None => self.how.to_string(),
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
}

/// How serious a finding is under a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing, never a failure.
    Note,
    /// Reported; an error under `strict`.
    Warning,
    /// The plan cannot be executed.
    Error,
}

/// Something the plan found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Shapes differ: never broadcast.
    ShapeMismatch {
        /// Source name.
        source: String,
        /// Target name.
        target: String,
        /// Source shape.
        source_shape: Vec<i64>,
        /// Target shape.
        target_shape: Vec<i64>,
        /// What paired them.
        provenance: String,
    },
    /// Several sources end on one target name.
    Collision {
        /// The target name.
        target: String,
        /// Each source and the rule that renamed it.
        sources: Vec<(String, String)>,
    },
    /// A cast that loses information.
    LossyCast {
        /// Source name.
        source: String,
        /// Target name.
        target: String,
        /// Why.
        reason: String,
    },
    /// A rule that matched no source name.
    UnusedRule {
        /// The rule as written.
        rule: String,
        /// Where it was written.
        at: String,
    },
    /// A name with several equally good candidates.
    Ambiguous {
        /// Side of the name.
        side: Side,
        /// The name.
        name: String,
        /// Its candidates on the other side.
        candidates: Vec<String>,
        /// The matcher step.
        how: How,
        /// Whether a pair was still made (by position); if not, all stay left over.
        paired: bool,
    },
    /// Some tensors of a target BatchNorm get values and others do not.
    PartialBatchNorm {
        /// The module (`features.0.bn`).
        module: String,
        /// Tensors of it that get values.
        copied: Vec<String>,
        /// Tensors of it that keep their own values.
        missing: Vec<String>,
    },
    /// A `num_batches_tracked` with no counterpart on the other side (tch's
    /// `nn::batch_norm` and old checkpoints have none): harmless, it only counts
    /// training batches.
    NumBatchesTracked {
        /// The side that has it.
        side: Side,
        /// Its name.
        name: String,
    },
    /// A parameter copied onto a buffer, or the reverse.
    RoleMismatch {
        /// Source name.
        source: String,
        /// Target name.
        target: String,
        /// Source role.
        source_role: Role,
        /// Target role.
        target_role: Role,
    },
    /// An entry that nothing paired.
    Leftover {
        /// Its side.
        side: Side,
        /// Its name.
        name: String,
    },
    /// A module the order matcher left unpaired although the other side has
    /// compatible ones: it could not tell which.
    AmbiguousModule {
        /// Side of the module.
        side: Side,
        /// The module path.
        module: String,
        /// Compatible modules of the other side (the first few).
        candidates: Vec<String>,
        /// How many more candidates there are.
        more: usize,
        /// Why it was not decided.
        why: Unsure,
    },
    /// A side keeps no registration order: the order matcher put its modules in
    /// natural order (indices as numbers).
    OrderReconstructed {
        /// The side.
        side: Side,
        /// Its store.
        store: String,
    },
    /// The two module sequences differ too much to be aligned.
    Unaligned {
        /// Modules of the source.
        source_modules: usize,
        /// Modules of the target.
        target_modules: usize,
    },
    /// A source and a target tensor left over hold as many elements (in equal
    /// or other shapes), and nothing else left over does: a rule — with a
    /// `reshape` where the shapes differ — may be what is missing.
    CouldPair {
        /// Source name.
        source: String,
        /// Target name.
        target: String,
        /// Source shape.
        source_shape: Vec<i64>,
        /// Target shape.
        target_shape: Vec<i64>,
        /// A rule that would pair them, as written in a rules file, where the
        /// shapes are equal (the rule language has no reshape yet).
        rule: Option<String>,
    },
}

impl Finding {
    /// How serious this finding is under `policy`.
    pub fn severity(&self, policy: &Policy) -> Severity {
        let escalate = |s| if policy.strict { Severity::Error } else { s };
        match self {
            Finding::ShapeMismatch { .. } | Finding::Collision { .. } => Severity::Error,
            Finding::LossyCast { .. } if !policy.allow_lossy_casts => Severity::Error,
            Finding::LossyCast { .. } => escalate(Severity::Warning),
            Finding::NumBatchesTracked { .. }
            | Finding::OrderReconstructed { .. }
            | Finding::CouldPair { .. } => Severity::Note,
            Finding::AmbiguousModule { .. } | Finding::Unaligned { .. } => escalate(Severity::Warning),
            Finding::UnusedRule { .. }
            | Finding::Ambiguous { .. }
            | Finding::PartialBatchNorm { .. }
            | Finding::RoleMismatch { .. }
            | Finding::Leftover { .. } => escalate(Severity::Warning),
        }
    }
}

/// A module path as shown: the root module has no name.
fn shown(module: &str) -> &str {
    if module.is_empty() {
        "(root)"
    } else {
        module
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::ShapeMismatch { source, target, source_shape, target_shape, provenance } => write!(
                f,
                "shape mismatch: {source} {source_shape:?} -> {target} {target_shape:?} (paired by {provenance}); \
                 shapes must be equal, nothing is broadcast"
            ),
            Finding::Collision { target, sources } => {
                let list: Vec<String> = sources.iter().map(|(s, r)| format!("{s} (by {r})")).collect();
                write!(f, "collision: {} all map to {target}", list.join(", "))
            }
            Finding::LossyCast { source, target, reason } => {
                write!(f, "lossy cast: {source} -> {target}: {reason} (allow lossy casts to proceed)")
            }
            Finding::UnusedRule { rule, at } => write!(f, "unused rule at {at}: `{rule}` matched no source name"),
            Finding::Ambiguous { side, name, candidates, how, paired } => write!(
                f,
                "ambiguous ({how}): {side} {name} could pair with {}{}",
                candidates.join(", "),
                if *paired { "; paired by position, confirm or add a rule" } else { "; left unpaired, add a rule" }
            ),
            Finding::PartialBatchNorm { module, copied, missing } => write!(
                f,
                "BatchNorm {module} copied in part: {} get values, {} keep the target's (eval outputs will differ)",
                copied.join(", "),
                missing.join(", ")
            ),
            Finding::NumBatchesTracked { side, name } => write!(
                f,
                "{side} {name} has no counterpart (harmless: it only counts training batches; \
                 tch's batch_norm and old checkpoints have none)"
            ),
            Finding::RoleMismatch { source, target, source_role, target_role } => {
                write!(f, "role differs: {source_role} {source} -> {target_role} {target}")
            }
            Finding::Leftover { side, name } => write!(f, "{side} {name} is not paired"),
            Finding::AmbiguousModule { side, module, candidates, more, why } => {
                let more = if *more > 0 { format!(" and {more} more") } else { String::new() };
                let why = match why {
                    Unsure::Tie => "equally good alignments disagree",
                    Unsure::PlaceUnknown => {
                        "its store keeps no registration order, and its signature occurs among siblings whose order is lost"
                    }
                };
                write!(
                    f,
                    "ambiguous (order): {side} module {} could be {}{more} ({why}); left unpaired, add a rule",
                    shown(module),
                    candidates.iter().map(|c| shown(c)).collect::<Vec<_>>().join(", ")
                )
            }
            Finding::OrderReconstructed { side, store } => write!(
                f,
                "{side} {store} keeps no registration order: modules were put in natural order \
                 (indices as numbers); pairs marked `order, reconstructed` rest on it alone \
                 (--order-from MODEL lends the real order)"
            ),
            Finding::Unaligned { source_modules, target_modules } => write!(
                f,
                "the order matcher gave up: {source_modules} source and {target_modules} target modules \
                 differ too much to align; add rules"
            ),
            Finding::CouldPair { source, target, source_shape, target_shape, rule } => match rule {
                Some(rule) => write!(
                    f,
                    "left over: {source} and {target} are both {source_shape:?}; the rule `{rule}` would pair them"
                ),
                None => write!(
                    f,
                    "left over: {source} {source_shape:?} and {target} {target_shape:?} hold as many \
                     elements: they differ by a reshape"
                ),
            },
        }
    }
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

/// sha256 over every entry's name, role, dtype and shape: what a saved plan
/// must find unchanged to be replayed.
pub fn entries_digest(entries: &[Entry]) -> String {
    let mut bytes = Vec::with_capacity(entries.len() * 64);
    for e in entries {
        bytes.extend_from_slice(e.name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(match e.role {
            Role::Parameter => b"parameter".as_slice(),
            Role::Buffer => b"buffer".as_slice(),
        });
        bytes.push(0);
        bytes.extend_from_slice(dtype::name(e.dtype).as_bytes());
        for d in &e.shape {
            bytes.extend_from_slice(&d.to_le_bytes());
        }
        bytes.push(b'\n');
    }
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn is_floating(kind: Kind) -> bool {
    matches!(kind, Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16)
}

fn is_complex(kind: Kind) -> bool {
    matches!(kind, Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble)
}

fn class_of(kind: Kind) -> DtypeClass {
    match kind {
        Kind::Bool => DtypeClass::Bool,
        k if is_complex(k) => DtypeClass::Complex,
        k if is_floating(k) => DtypeClass::Floating,
        _ => DtypeClass::Integer,
    }
}

/// The largest finite magnitude, or integer bounds, of a dtype.
fn range_of(kind: Kind) -> Option<(f64, f64)> {
    Some(match kind {
        Kind::Half => (-65504.0, 65504.0),
        Kind::BFloat16 | Kind::Float => (-f32::MAX as f64, f32::MAX as f64),
        Kind::Uint8 => (0.0, 255.0),
        Kind::Int8 => (-128.0, 127.0),
        Kind::Int16 => (i16::MIN as f64, i16::MAX as f64),
        Kind::Int => (i32::MIN as f64, i32::MAX as f64),
        Kind::Bool => (0.0, 1.0),
        _ => return None,
    })
}

/// Whether converting `tensor` (of `from`) to `to` loses information, and why.
fn lossy_reason(tensor: &tch::Tensor, from: Kind, to: Kind) -> Option<String> {
    if from == to {
        return None;
    }
    let (from_name, to_name) = (dtype::name(from), dtype::name(to));
    if is_complex(from) && !is_complex(to) {
        return Some(format!("{from_name} to {to_name} drops the imaginary part"));
    }
    if (is_floating(from) || is_complex(from)) && !(is_floating(to) || is_complex(to)) {
        return Some(format!("{from_name} to {to_name} truncates fractions"));
    }
    let (lo, hi) = range_of(to)?;
    if tensor.numel() == 0 {
        return None;
    }
    let values = tensor.f_to_kind(Kind::Double).ok()?;
    let (min, max) =
        (values.f_min().ok()?.f_double_value(&[]).ok()?, values.f_max().ok()?.f_double_value(&[]).ok()?);
    if min < lo || max > hi {
        return Some(format!("values {min}..{max} do not fit {to_name} ({lo}..{hi})"));
    }
    if to == Kind::Bool {
        let binary = values.f_eq(0.0).ok()?.f_logical_or(&values.f_eq(1.0).ok()?).ok()?.f_all().ok()?;
        if binary.f_int64_value(&[]).ok().is_none_or(|v| v == 0) {
            return Some(format!("{from_name} values other than 0 and 1 cannot become bool"));
        }
    }
    None
}

/// Pairs per core above which pairing and checking pairs is split across cores.
const PAIRS_PER_THREAD: usize = 8192;

/// What is wrong with one pair, if anything: shapes, a lossy cast, roles.
fn pair_findings(p: &Pair, s: &Entry, t: &Entry, out: &mut Vec<Finding>) {
    if s.shape != t.shape {
        out.push(Finding::ShapeMismatch {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_shape: s.shape.clone(),
            target_shape: t.shape.clone(),
            provenance: p.provenance(),
        });
    }
    if let Some(Cast { lossy: Some(reason), .. }) = &p.cast {
        out.push(Finding::LossyCast {
            source: s.name.to_string(),
            target: t.name.to_string(),
            reason: reason.clone(),
        });
    }
    if s.role != t.role && !s.role_inferred && !t.role_inferred {
        out.push(Finding::RoleMismatch {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_role: s.role,
            target_role: t.role,
        });
    }
}

/// Hints most worth giving per plan.
const MAX_PAIR_HINTS: usize = 64;

/// Left over on both sides with as many elements (`temperature [1]` and
/// `scale [1]`; `[96, 1, 1]` and `[96]`): said, with the rule that would pair
/// them, where the pairing is unique — by element count alone, or by element
/// count and leaf name.
fn pair_hints(
    sources: &[Entry],
    targets: &[Entry],
    source_leftovers: &[Leftover],
    target_leftovers: &[Leftover],
    findings: &mut Vec<Finding>,
) {
    /// How many open leftovers a key has on each side, and the first of each.
    #[derive(Default)]
    struct Count {
        sources: usize,
        source: usize,
        targets: usize,
        target: usize,
    }
    let mut by_numel: HashMap<u64, Count> = HashMap::new();
    let mut by_numel_and_leaf: HashMap<(u64, &str), Count> = HashMap::new();
    for (list, entries, is_source) in [(source_leftovers, sources, true), (target_leftovers, targets, false)]
    {
        for l in list.iter().filter(|l| l.explained.is_none()) {
            let e = &entries[l.index];
            let numel = e.numel();
            if numel == 0 {
                continue;
            }
            for count in [
                by_numel.entry(numel).or_default(),
                by_numel_and_leaf.entry((numel, crate::dotted::leaf(&e.name))).or_default(),
            ] {
                if is_source {
                    count.sources += 1;
                    count.source = l.index;
                } else {
                    count.targets += 1;
                    count.target = l.index;
                }
            }
        }
    }
    let one_each = |c: &Count| (c.sources == 1 && c.targets == 1).then_some((c.source, c.target));
    let mut hints: Vec<(usize, usize)> = by_numel.values().filter_map(one_each).collect();
    hints.extend(
        by_numel_and_leaf
            .iter()
            .filter(|((numel, _), _)| one_each(&by_numel[numel]).is_none())
            .filter_map(|(_, c)| one_each(c)),
    );
    hints.sort_unstable();
    for (i, j) in hints.into_iter().take(MAX_PAIR_HINTS) {
        let (s, t) = (&sources[i], &targets[j]);
        let rule = (s.shape == t.shape)
            .then(|| format!("{} => {}", regex::escape(&s.name), t.name.replace('$', "$$")));
        findings.push(Finding::CouldPair {
            source: s.name.to_string(),
            target: t.name.to_string(),
            source_shape: s.shape.clone(),
            target_shape: t.shape.clone(),
            rule,
        });
    }
}

/// Accumulates a plan while it is being built.
struct Builder<'a> {
    source: &'a dyn Source,
    target: &'a dyn Source,
    /// Each rule as written, rendered once.
    rule_texts: Vec<Arc<str>>,
    pairs: Vec<Pair>,
    findings: Vec<Finding>,
    source_explained: HashMap<usize, String>,
    modules: Vec<ModuleMatch>,
    order: Option<Orders>,
}

impl<'a> Builder<'a> {
    fn new(source: &'a dyn Source, target: &'a dyn Source, rule_texts: Vec<Arc<str>>) -> Self {
        Builder {
            source,
            target,
            rule_texts,
            pairs: Vec::with_capacity(source.entries().len().min(target.entries().len())),
            findings: Vec::new(),
            source_explained: HashMap::new(),
            modules: Vec::new(),
            order: None,
        }
    }

    fn pair(&mut self, i: usize, j: usize, rule: Option<usize>, how: How) {
        let pair = self.make_pair(i, j, rule, how);
        self.pairs.push(pair);
    }

    fn make_pair(&self, i: usize, j: usize, rule: Option<usize>, how: How) -> Pair {
        let (s, t) = (&self.source.entries()[i], &self.target.entries()[j]);
        let cast = (s.dtype != t.dtype).then(|| {
            let lossy = self.source.tensor(i).and_then(|tensor| lossy_reason(tensor, s.dtype, t.dtype));
            Cast { from: s.dtype, to: t.dtype, lossy }
        });
        Pair {
            source: i,
            target: j,
            source_name: s.name.clone(),
            target_name: t.name.clone(),
            rule: rule.map(|r| Arc::clone(&self.rule_texts[r])),
            how,
            cast,
        }
    }
}

impl Plan {
    /// Maps `source` onto `target`: rules, then the matcher; then every finding.
    /// Reads tensor values only to decide whether a narrowing cast fits.
    pub fn build(source: &dyn Source, target: &dyn Source, mapping: &Mapping) -> Result<Self> {
        let lent = match &mapping.source_order {
            Some(order) if mapping.matcher == Matcher::Order => Some(order.sequence(source.entries())?),
            _ => None,
        };
        Ok(Self::finish(Self::pair_up(source, target, mapping, lent.as_deref()), mapping.matcher))
    }

    /// Rules, then the matcher: every pair, and the findings about how they were
    /// made. `lent`: the source's indices in an order lent by `--order-from`.
    fn pair_up<'a>(
        source: &'a dyn Source,
        target: &'a dyn Source,
        mapping: &Mapping,
        lent: Option<&[usize]>,
    ) -> Builder<'a> {
        let (sources, targets) = (source.entries(), target.entries());
        // Two models of one architecture list the same names in the same order.
        // With no rules, the exact and auto matchers pair those by index and find
        // nothing else to say, so that is done directly. (The order matcher aligns
        // by shape, not name, so it always takes the long way.)
        if mapping.rules.rules().is_empty()
            && mapping.matcher != Matcher::Order
            && sources.len() == targets.len()
        {
            let mut b = Builder::new(source, target, Vec::new());
            let parts = chunks::map(sources.len(), PAIRS_PER_THREAD, |range| {
                range
                    .map(|i| {
                        (sources[i].name == targets[i].name).then(|| b.make_pair(i, i, None, How::Exact))
                    })
                    .collect::<Option<Vec<Pair>>>()
            });
            if let Some(parts) = parts.into_iter().collect::<Option<Vec<_>>>() {
                b.pairs.extend(parts.into_iter().flatten());
                return b;
            }
        }
        Self::pair_by_rules_and_matcher(source, target, mapping, lent)
    }

    /// [`Plan::pair_up`] the long way: rules, collisions, then the matcher.
    fn pair_by_rules_and_matcher<'a>(
        source: &'a dyn Source,
        target: &'a dyn Source,
        mapping: &Mapping,
        lent: Option<&[usize]>,
    ) -> Builder<'a> {
        let (sources, targets) = (source.entries(), target.entries());
        let rules = &mapping.rules;
        let rule_texts = rules.rules().iter().map(|r| Arc::from(r.to_string())).collect();
        let mut b = Builder::new(source, target, rule_texts);

        // 1. Rules: rename, skip, count what fired, find collisions.
        let mut names: Vec<Cow<str>> = Vec::with_capacity(sources.len());
        let mut rule_of: Vec<Option<usize>> = vec![None; sources.len()];
        let mut fired = vec![false; rules.rules().len()];
        let mut taken_source = vec![false; sources.len()];
        for (i, (entry, outcome)) in sources.iter().zip(rules.apply_all(sources)).enumerate() {
            match outcome {
                Outcome::Kept => names.push(Cow::Borrowed(&entry.name)),
                Outcome::Renamed { to, rule } => {
                    fired[rule] = true;
                    rule_of[i] = Some(rule);
                    names.push(Cow::Owned(to));
                }
                Outcome::Skipped { rule } => {
                    fired[rule] = true;
                    taken_source[i] = true;
                    b.source_explained.insert(i, format!("skipped by rule `{}`", rules.rules()[rule]));
                    names.push(Cow::Borrowed(&entry.name));
                }
            }
        }
        // Collisions: one new name reached by several sources, a rule among them
        // (store names are unique, so without renames there are none).
        let renamed = rule_of.iter().any(Option::is_some);
        let mut first_with_name: HashMap<&str, usize> =
            HashMap::with_capacity(if renamed { sources.len() } else { 0 });
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: HashMap<usize, usize> = HashMap::new();
        for i in (0..sources.len()).filter(|&i| renamed && !taken_source[i]) {
            let first = *first_with_name.entry(&names[i]).or_insert(i);
            if first != i {
                let group = *group_of.entry(first).or_insert_with(|| {
                    groups.push(vec![first]);
                    groups.len() - 1
                });
                groups[group].push(i);
            }
        }
        for group in groups.into_iter().filter(|g| g.iter().any(|&i| rule_of[i].is_some())) {
            let name = names[group[0]].to_string();
            let sources_named = group
                .iter()
                .map(|&i| {
                    let how = rule_of[i]
                        .map_or("its own name".to_string(), |r| format!("rule `{}`", rules.rules()[r]));
                    (sources[i].name.to_string(), how)
                })
                .collect();
            for &i in &group {
                taken_source[i] = true;
                b.source_explained.insert(i, format!("collides on {name}"));
            }
            b.findings.push(Finding::Collision { target: name, sources: sources_named });
        }
        for (rule, used) in rules.rules().iter().zip(&fired) {
            if !used {
                b.findings.push(Finding::UnusedRule { rule: rule.to_string(), at: rule.source.to_string() });
            }
        }

        // 2. Names a rule produced that exist in the target pair first, whatever the matcher.
        // Renaming usually keeps the order: a name found at its own index needs
        // no lookup (target names are unique), and the index of every target
        // name is only built for the first one that is not.
        let mut taken_target = vec![false; targets.len()];
        let mut target_index: Option<HashMap<&str, usize>> = None;
        for i in 0..sources.len() {
            if taken_source[i] || rule_of[i].is_none() {
                continue;
            }
            let j = if targets.get(i).is_some_and(|t| t.name.as_str() == &*names[i]) {
                Some(i)
            } else {
                target_index
                    .get_or_insert_with(|| {
                        targets.iter().enumerate().map(|(j, t)| (t.name.as_str(), j)).collect()
                    })
                    .get(&*names[i])
                    .copied()
            };
            if let Some(j) = j {
                if !taken_target[j] {
                    taken_source[i] = true;
                    taken_target[j] = true;
                    b.pair(i, j, rule_of[i], How::Exact);
                }
            }
        }

        // 3. The matcher, for the rest. Roles only constrain it when both stores
        // record them (a checkpoint file's roles are guesses).
        let roles_known = !sources.iter().chain(targets).any(|e| e.role_inferred);
        let role = |e: &Entry| if roles_known { e.role } else { Role::Parameter };
        // The source as the matcher sees it: in its own order, or in one lent.
        let sequence: Vec<usize> = lent.map_or_else(|| (0..sources.len()).collect(), <[usize]>::to_vec);
        fn item<'x>(e: &'x Entry, name: &'x str, role: Role) -> Item<'x> {
            Item { name, original: &e.name, role, class: class_of(e.dtype), shape: &e.shape }
        }
        let source_items: Vec<Item> =
            sequence.iter().map(|&i| item(&sources[i], &names[i], role(&sources[i]))).collect();
        let taken_in_sequence: Vec<bool> = sequence.iter().map(|&i| taken_source[i]).collect();
        let target_items: Vec<Item> = targets.iter().map(|e| item(e, &e.name, role(e))).collect();
        let own = |store: &dyn Source| match store.entry_order() {
            EntryOrder::Registration => (Sequence::Registration, OrderUsed::Registration),
            EntryOrder::Unknown => (Sequence::Natural, OrderUsed::Reconstructed),
        };
        let (source_sequence, source_order) = match (&mapping.source_order, lent) {
            (Some(order), Some(_)) => {
                (Sequence::Registration, OrderUsed::From { model: order.origin.clone() })
            }
            _ => own(source),
        };
        let (target_sequence, target_order) = own(target);
        if mapping.matcher == Matcher::Order {
            for (side, used, store) in
                [(Side::Source, &source_order, source), (Side::Target, &target_order, target)]
            {
                if *used == OrderUsed::Reconstructed {
                    b.findings.push(Finding::OrderReconstructed { side, store: store.origin().to_string() });
                }
            }
            b.order = Some(Orders { source: source_order, target: target_order });
        }
        let matches = matching::run(
            mapping.matcher,
            &source_items,
            &target_items,
            &taken_in_sequence,
            &taken_target,
            (source_sequence, target_sequence),
        );
        for &(k, j, how) in &matches.pairs {
            let i = sequence[k];
            taken_source[i] = true;
            taken_target[j] = true;
            b.pair(i, j, rule_of[i], how);
        }
        for a in &matches.ambiguities {
            let (name, candidates) = if a.from_source {
                (
                    sources[sequence[a.item]].name.clone(),
                    a.candidates.iter().map(|&j| targets[j].name.to_string()).collect(),
                )
            } else {
                (
                    targets[a.item].name.clone(),
                    a.candidates.iter().map(|&k| sources[sequence[k]].name.to_string()).collect(),
                )
            };
            let side = if a.from_source { Side::Source } else { Side::Target };
            b.findings.push(Finding::Ambiguous {
                side,
                name: name.to_string(),
                candidates,
                how: a.how,
                paired: a.paired,
            });
        }
        for a in matches.module_ambiguities {
            b.findings.push(Finding::AmbiguousModule {
                side: if a.from_source { Side::Source } else { Side::Target },
                module: a.module,
                candidates: a.candidates,
                more: a.more,
                why: a.why,
            });
        }
        if let Some((source_modules, target_modules)) = matches.unaligned {
            b.findings.push(Finding::Unaligned { source_modules, target_modules });
        }
        b.modules = matches.modules;
        b.pairs.sort_by_key(|p| p.target);
        b
    }

    /// Everything that follows from the pairs: shape, cast and role findings,
    /// leftovers, BatchNorm groups.
    fn finish(mut b: Builder, matcher: Matcher) -> Self {
        let (sources, targets) = (b.source.entries(), b.target.entries());
        let per_pair = chunks::map(b.pairs.len(), PAIRS_PER_THREAD, |range| {
            let mut findings = Vec::new();
            for p in &b.pairs[range] {
                pair_findings(p, &sources[p.source], &targets[p.target], &mut findings);
            }
            findings
        });
        b.findings.extend(per_pair.into_iter().flatten());
        let mut paired_source = vec![false; sources.len()];
        let mut paired_target = vec![false; targets.len()];
        for p in &b.pairs {
            paired_source[p.source] = true;
            paired_target[p.target] = true;
        }
        let is_nbt = |name: &str| module_and_leaf(name).1 == "num_batches_tracked";
        // A num_batches_tracked left over is explained only when the other side
        // has none left over either: otherwise the two should probably pair.
        let open_nbt = |entries: &[Entry], paired: &[bool]| {
            entries.iter().zip(paired).any(|(e, &p)| !p && is_nbt(&e.name))
        };
        let (source_nbt_open, target_nbt_open) =
            (open_nbt(sources, &paired_source), open_nbt(targets, &paired_target));
        let mut source_leftovers = Vec::new();
        for (i, e) in sources.iter().enumerate().filter(|(i, _)| !paired_source[*i]) {
            let mut explained = b.source_explained.get(&i).cloned();
            if explained.is_none() && is_nbt(&e.name) && !target_nbt_open {
                explained = Some("num_batches_tracked with no counterpart".into());
                b.findings.push(Finding::NumBatchesTracked { side: Side::Source, name: e.name.to_string() });
            } else if explained.is_none() {
                b.findings.push(Finding::Leftover { side: Side::Source, name: e.name.to_string() });
            }
            source_leftovers.push(Leftover { side: Side::Source, index: i, name: e.name.clone(), explained });
        }
        let mut target_leftovers = Vec::new();
        for (j, e) in targets.iter().enumerate().filter(|(j, _)| !paired_target[*j]) {
            let explained = if is_nbt(&e.name) && !source_nbt_open {
                b.findings.push(Finding::NumBatchesTracked { side: Side::Target, name: e.name.to_string() });
                Some("num_batches_tracked with no counterpart: keeps its value".into())
            } else {
                b.findings.push(Finding::Leftover { side: Side::Target, name: e.name.to_string() });
                None
            };
            target_leftovers.push(Leftover { side: Side::Target, index: j, name: e.name.clone(), explained });
        }
        // BatchNorm groups of the target (modules with running statistics):
        // weight, bias and statistics go together. Only a module with a target
        // entry left over can be copied in part, so only those are counted.
        #[derive(Default)]
        struct Group {
            mean: bool,
            var: bool,
            copied: usize,
            missing: usize,
        }
        let mut groups: HashMap<&str, Group> = target_leftovers
            .iter()
            .filter(|l| !is_nbt(&l.name))
            .map(|l| (module_and_leaf(&targets[l.index].name).0, Group::default()))
            .collect();
        if !groups.is_empty() {
            for (j, e) in targets.iter().enumerate() {
                let (module, leaf) = module_and_leaf(&e.name);
                let Some(group) = groups.get_mut(module) else { continue };
                group.mean |= leaf == "running_mean";
                group.var |= leaf == "running_var";
                if leaf != "num_batches_tracked" {
                    if paired_target[j] {
                        group.copied += 1;
                    } else {
                        group.missing += 1;
                    }
                }
            }
        }
        let mut partial: Vec<&str> = groups
            .iter()
            .filter(|(_, g)| g.mean && g.var && g.copied > 0 && g.missing > 0)
            .map(|(m, _)| *m)
            .collect();
        partial.sort_unstable();
        for module in partial {
            let members = targets
                .iter()
                .enumerate()
                .filter(|(_, e)| module_and_leaf(&e.name).0 == module && !is_nbt(&e.name));
            let (copied, missing): (Vec<_>, Vec<_>) = members.partition(|(j, _)| paired_target[*j]);
            let leaf = |(_, e): &(usize, &Entry)| module_and_leaf(&e.name).1.to_string();
            b.findings.push(Finding::PartialBatchNorm {
                module: module.to_string(),
                copied: copied.iter().map(leaf).collect(),
                missing: missing.iter().map(leaf).collect(),
            });
        }
        pair_hints(sources, targets, &source_leftovers, &target_leftovers, &mut b.findings);
        Plan {
            source: b.source.origin().to_string(),
            target: b.target.origin().to_string(),
            matcher,
            pairs: b.pairs,
            modules: b.modules,
            order: b.order,
            source_leftovers,
            target_leftovers,
            findings: b.findings,
        }
    }

    /// Whether `source` and `target` list, at every paired index, the entries
    /// this plan paired (name, dtype and shape as planned).
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

    /// Whether every target entry receives a value and every source entry goes
    /// somewhere, apart from what is explained (skipped by a rule, a
    /// `num_batches_tracked` with no counterpart).
    pub fn is_complete(&self) -> bool {
        self.open_leftovers() == 0
            && !self
                .findings
                .iter()
                .any(|f| matches!(f, Finding::Collision { .. } | Finding::ShapeMismatch { .. }))
    }
}

/// A plan as saved to JSON: pairs by name with their provenance, leftovers,
/// and digests of both models' entry lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    /// Format version of this file.
    pub version: u32,
    /// The source the plan was made for.
    pub source: String,
    /// The target the plan was made for.
    pub target: String,
    /// [`entries_digest`] of the source.
    pub source_digest: String,
    /// [`entries_digest`] of the target.
    pub target_digest: String,
    /// Pairs: source name, target name, provenance.
    pub pairs: Vec<PlannedPair>,
    /// Source names left over.
    pub source_leftovers: Vec<String>,
    /// Target names left over.
    pub target_leftovers: Vec<String>,
}

/// One pair of a saved plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedPair {
    /// Source name.
    pub source: String,
    /// Target name.
    pub target: String,
    /// What made the pair when the plan was built.
    pub provenance: String,
}

const PLAN_FILE_VERSION: u32 = 1;

impl Plan {
    /// The plan in its saved form, with the digests of `source` and `target`,
    /// which must be the stores it was made for. (The digests are only worked
    /// out here: most plans are never saved.)
    pub fn to_file(&self, source: &dyn Source, target: &dyn Source) -> Result<PlanFile> {
        self.ensure_fits(source, target)?;
        Ok(PlanFile {
            version: PLAN_FILE_VERSION,
            source: self.source.clone(),
            target: self.target.clone(),
            source_digest: entries_digest(source.entries()),
            target_digest: entries_digest(target.entries()),
            pairs: self
                .pairs
                .iter()
                .map(|p| PlannedPair {
                    source: p.source_name.to_string(),
                    target: p.target_name.to_string(),
                    provenance: p.provenance(),
                })
                .collect(),
            source_leftovers: self.source_leftovers.iter().map(|l| l.name.to_string()).collect(),
            target_leftovers: self.target_leftovers.iter().map(|l| l.name.to_string()).collect(),
        })
    }

    /// Writes the plan for `source` and `target` (the stores it was made for)
    /// as JSON, whole or not at all.
    pub fn save(&self, path: &std::path::Path, source: &dyn Source, target: &dyn Source) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.to_file(source, target)?).map_err(|e| Error::Format {
            path: path.into(),
            format: "plan",
            message: e.to_string(),
        })?;
        crate::format::write_atomically(path, |temp| {
            std::fs::write(temp, &json).map_err(|source| Error::Io { path: temp.into(), source })
        })
    }

    /// Rebuilds a saved plan for `source` and `target`, which must list exactly
    /// the entries (names, roles, dtypes, shapes) they listed when it was made.
    pub fn replay(path: &std::path::Path, source: &dyn Source, target: &dyn Source) -> Result<Self> {
        let bad = |message: String| Error::Format { path: path.into(), format: "plan", message };
        let text = std::fs::read(path).map_err(|e| Error::Io { path: path.into(), source: e })?;
        let file: PlanFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != PLAN_FILE_VERSION {
            return Err(bad(format!(
                "version {} (this transplant reads version {PLAN_FILE_VERSION})",
                file.version
            )));
        }
        for (side, store, digest) in
            [(Side::Source, source, &file.source_digest), (Side::Target, target, &file.target_digest)]
        {
            if &entries_digest(store.entries()) != digest {
                return Err(Error::PlanOutdated {
                    plan: path.into(),
                    side: side.to_string(),
                    store: store.origin().into(),
                });
            }
        }
        let index = |store: &dyn Source| -> HashMap<String, usize> {
            store.entries().iter().enumerate().map(|(i, e)| (e.name.to_string(), i)).collect()
        };
        let (source_index, target_index) = (index(source), index(target));
        let mut b = Builder::new(source, target, Vec::new());
        let mut used_target = vec![false; target.entries().len()];
        for p in &file.pairs {
            let i = *source_index
                .get(&p.source)
                .ok_or_else(|| bad(format!("source has no tensor {}", p.source)))?;
            let j = *target_index
                .get(&p.target)
                .ok_or_else(|| bad(format!("target has no tensor {}", p.target)))?;
            if std::mem::replace(&mut used_target[j], true) {
                return Err(bad(format!("target tensor {} is named by two pairs", p.target)));
            }
            b.pair(i, j, None, How::Plan);
        }
        b.pairs.sort_by_key(|p| p.target);
        Ok(Self::finish(b, Matcher::Exact))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tch::Tensor;

    use super::*;
    use crate::store::Checkpoint;
    use crate::Format;

    fn store(tensors: Vec<(&str, Tensor)>) -> Checkpoint {
        let tensors = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        Checkpoint::from_tensors("test", Format::Safetensors, tensors, BTreeMap::new()).expect("store")
    }

    fn bn(prefix: &str, n: i64, kind: Kind) -> Vec<(String, Tensor)> {
        ["weight", "bias", "running_mean", "running_var"]
            .into_iter()
            .map(|leaf| (format!("{prefix}.{leaf}"), Tensor::ones([n], (kind, tch::Device::Cpu))))
            .chain([(format!("{prefix}.num_batches_tracked"), Tensor::from(3i64))])
            .collect()
    }

    #[test]
    fn renamed_sources_find_their_targets_at_their_own_index_or_elsewhere() {
        let t = || Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
        let source = store(vec![("a.x", t()), ("a.y", t()), ("a.z", t())]);
        // b.x at its source's index; b.y and b.z swapped.
        let target = store(vec![("b.x", t()), ("b.z", t()), ("b.y", t())]);
        let mapping = Mapping {
            rules: Rules::parse("a\\.(.*) => b.$1\n", "test").expect("rules"),
            matcher: Matcher::Exact,
            source_order: None,
        };
        let plan = Plan::build(&source, &target, &mapping).expect("plan");
        let pairs: Vec<(usize, usize, String)> =
            plan.pairs.iter().map(|p| (p.source, p.target, p.provenance())).collect();
        let rule = "rule `a\\.(.*) => b.$1`".to_string();
        assert_eq!(pairs, vec![(0, 0, rule.clone()), (2, 1, rule.clone()), (1, 2, rule)]);
        assert!(plan.is_complete());
    }

    /// The shortcut for equal name lists must say exactly what the long way says.
    #[test]
    fn equal_name_lists_are_planned_as_the_rules_and_matcher_would() {
        let base = || {
            let mut t =
                vec![("fc.weight".to_string(), Tensor::ones([4, 3], (Kind::Float, tch::Device::Cpu)))];
            t.extend(bn("bn", 4, Kind::Float));
            t
        };
        // Equal lists; then equal names with another shape, another dtype and a
        // float into an integer tensor (a lossy cast).
        let mut other = base();
        other[0].1 = Tensor::ones([5, 3], (Kind::Float, tch::Device::Cpu));
        other[1].1 = Tensor::ones([4], (Kind::Double, tch::Device::Cpu));
        other[3].1 = Tensor::from_slice(&[0.5f32, 1.0, 2.0, 3.0]);
        other[5].1 = Tensor::from(2.5f64);
        for (source_tensors, findings) in [(base(), 0), (other, 2)] {
            let source = store(source_tensors.iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect());
            let target = store(base().iter().map(|(n, t)| (n.as_str(), t.shallow_clone())).collect());
            for matcher in [Matcher::Exact, Matcher::Auto] {
                let mapping = Mapping { rules: Rules::new(), matcher, source_order: None };
                let short = Plan::finish(Plan::pair_up(&source, &target, &mapping, None), matcher);
                let long =
                    Plan::finish(Plan::pair_by_rules_and_matcher(&source, &target, &mapping, None), matcher);
                assert_eq!((short.pairs.len(), short.findings.len()), (6, findings), "{:?}", short.findings);
                assert_eq!(
                    serde_json::to_value(&short).expect("json"),
                    serde_json::to_value(&long).expect("json"),
                    "{matcher}"
                );
            }
        }
    }
}
