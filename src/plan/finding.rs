//! What a plan can find ([`Finding`]), how serious each is under a policy
//! ([`Severity`]), and how each reads.
use std::fmt;

use serde::Serialize;

use super::{Policy, Side};
use crate::entry::Role;
use crate::matching::{How, Unsure};

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
    /// A cast from or to a dtype whose casts are refused whatever the policy
    /// (`uint16`, `float8_e4m3fn`: see `Dtype::is_stored_only`).
    RefusedCast {
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
    /// A target entry that nothing paired but that is one tensor with a paired
    /// one (tied weights): it gets that one's values.
    Tied {
        /// The entry nothing paired.
        target: String,
        /// The paired entry it is tied to.
        with: String,
    },
    /// A target a `keep` rule keeps as it is, which a rule or the matcher
    /// would fill: the pair is not made.
    KeptFilled {
        /// The kept target.
        target: String,
        /// The keep rule as written.
        keep: String,
        /// Where it was written.
        at: String,
        /// The source that would fill it.
        source: String,
        /// What paired them.
        by: String,
        /// A `--skip` pattern that leaves the source out.
        skip: String,
    },
    /// A source entry that nothing paired but that is one tensor with a paired
    /// one (tied weights): its values go with that one.
    SourceTied {
        /// The entry nothing paired.
        source: String,
        /// The paired entry it is tied to.
        with: String,
    },
    /// A `skip` rule that matched no source name, where the name it skips is
    /// tied to another that the source holds (a safetensors file keeps one
    /// name of a tie): not an unused rule.
    SkipOfTie {
        /// The rule as written.
        rule: String,
        /// Where it was written.
        at: String,
        /// The tied name the source does not hold.
        name: String,
        /// The name it is tied to.
        with: String,
    },
    /// An entry that nothing paired.
    Leftover {
        /// Its side.
        side: Side,
        /// Its name.
        name: String,
        /// For a source a rule renamed: the name it made, and the rule.
        #[serde(skip_serializing_if = "Option::is_none")]
        renamed: Option<String>,
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
        /// A rule that would pair them, as written in a rules file (with a
        /// `reshape` where the shapes differ).
        rule: Option<String>,
    },
    /// A transform that cannot apply to the tensors its rule matched: an op out
    /// of range, a reshape to another element count, split sizes that do not
    /// add up, concatenated shapes that disagree, a result of another shape
    /// than its target, a target the rule names that does not exist, regions of
    /// one target that do not tile it.
    Transform {
        /// The rule as written (or the plan file's provenance).
        rule: String,
        /// The tensors involved.
        tensors: Vec<String>,
        /// What does not fit, with the shapes.
        problem: String,
    },
    /// A group of a `cat` rule lacks a member: nothing of it is copied.
    IncompleteGroup {
        /// The rule as written.
        rule: String,
        /// The target the group would fill.
        target: String,
        /// The members found: pattern and source name.
        found: Vec<(String, String)>,
        /// The patterns no source matched.
        missing: Vec<String>,
    },
}

impl Finding {
    /// How serious this finding is under `policy`.
    pub fn severity(&self, policy: &Policy) -> Severity {
        let escalate = |s| if policy.strict { Severity::Error } else { s };
        match self {
            Finding::ShapeMismatch { .. }
            | Finding::Collision { .. }
            | Finding::Transform { .. }
            | Finding::RefusedCast { .. }
            | Finding::IncompleteGroup { .. }
            | Finding::KeptFilled { .. } => Severity::Error,
            Finding::LossyCast { .. } if !policy.allow_lossy_casts => Severity::Error,
            Finding::LossyCast { .. } => escalate(Severity::Warning),
            Finding::NumBatchesTracked { .. }
            | Finding::Tied { .. }
            | Finding::SourceTied { .. }
            | Finding::SkipOfTie { .. }
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

/// One line; names in it are shown escaped (see `dotted::escaped`).
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::dotted::escaped(&self.raw().to_string()))
    }
}

/// A finding's text before escaping.
struct Raw<'a>(&'a Finding);

impl Finding {
    fn raw(&self) -> Raw<'_> {
        Raw(self)
    }
}

impl fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Finding::ShapeMismatch { source, target, source_shape, target_shape, provenance } => {
                write!(
                    f,
                    "shape mismatch: {source} {source_shape:?} -> {target} {target_shape:?} (paired by {provenance}); \
                     shapes must be equal, nothing is broadcast"
                )?;
                let numel = |shape: &[i64]| shape.iter().product::<i64>();
                if numel(source_shape) == numel(target_shape)
                    && super::finish::merges_or_splits(source_shape, target_shape)
                {
                    let dims: Vec<String> = target_shape.iter().map(i64::to_string).collect();
                    write!(
                        f,
                        "; they hold as many elements: --map '{} => {} | reshape({})' pairs them",
                        regex::escape(source),
                        target.replace('$', "$$"),
                        dims.join(", ")
                    )
                } else {
                    write!(
                        f,
                        "; if the target's is new on purpose (a new head), leave the source out and keep the \
                         target's: --skip '{}' --keep '{}'",
                        crate::rules::Keep::module_pattern(source),
                        crate::rules::Keep::module_pattern(target)
                    )
                }
            }
            Finding::Collision { target, sources } => {
                let list: Vec<String> = sources.iter().map(|(s, r)| format!("{s} (by {r})")).collect();
                write!(f, "collision: {} all map to {target}", list.join(", "))
            }
            Finding::LossyCast { source, target, reason } => {
                write!(f, "lossy cast: {source} -> {target}: {reason} (allow it with --allow-lossy, Policy::allow_lossy_casts in the library)")
            }
            Finding::RefusedCast { source, target, reason } => write!(f, "refused cast: {source} -> {target}: {reason}"),
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
            Finding::Leftover { side, name, renamed: None } => write!(f, "{side} {name} is not paired"),
            Finding::Leftover { side, name, renamed: Some(renamed) } => {
                write!(f, "{side} {name} is not paired: renamed to {renamed}, and the target has no such name")
            }
            Finding::KeptFilled { target, keep, at, source, by, skip } => write!(
                f,
                "target {target} is kept by `{keep}` ({at}), but source {source} would fill it (paired by {by}); \
                 leave the source out with --skip '{skip}' (`skip {skip}` in a rules file), or drop the keep"
            ),
            Finding::SourceTied { source, with } => write!(
                f,
                "source {source} is tied to {with} (one tensor under two names): its values go with {with}"
            ),
            Finding::SkipOfTie { rule, at, name, with } => write!(
                f,
                "rule at {at} `{rule}` matched no source name: {name} is tied to {with}, which the source holds"
            ),
            Finding::Tied { target, with } => write!(
                f,
                "target {target} is tied to {with} (one tensor under two names): it gets {with}'s values"
            ),
            Finding::AmbiguousModule { side, module, candidates, more, why } => {
                let more = if *more > 0 { format!(" and {more} more") } else { String::new() };
                let (why, step) = match why {
                    Unsure::Tie => ("equally good alignments disagree", "add a rule"),
                    Unsure::PlaceUnknown => (
                        "its store keeps no registration order, and its signature occurs among siblings whose order is lost",
                        "pass --order-from MODEL (a model with the source's names in registration order) or add a rule",
                    ),
                };
                write!(
                    f,
                    "ambiguous (order): {side} module {} could be {}{more} ({why}); left unpaired: {step}",
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
                Some(rule) if source_shape == target_shape => write!(
                    f,
                    "left over: {source} and {target} are both {source_shape:?}; the rule `{rule}` would pair them"
                ),
                Some(rule) => write!(
                    f,
                    "left over: {source} {source_shape:?} and {target} {target_shape:?} have the same number \
                     of elements: the rule `{rule}` would pair them"
                ),
                None => write!(
                    f,
                    "left over: {source} {source_shape:?} and {target} {target_shape:?} hold as many \
                     elements in another layout: a rule with `| transpose(..)`, `| permute(..)` or \
                     `| reshape(..)` may pair them (which one, only the models' code says)"
                ),
            },
            Finding::Transform { rule, tensors, problem } => {
                write!(f, "transform of rule `{rule}` on {}: {problem}", tensors.join(", "))
            }
            Finding::IncompleteGroup { rule, target, found, missing } => {
                let found: Vec<String> = found.iter().map(|(p, s)| format!("{s} (for {p})")).collect();
                write!(
                    f,
                    "rule `{rule}`: the group for {target} has {} but no source for {}; nothing of it is copied",
                    if found.is_empty() { "nothing".to_string() } else { found.join(", ") },
                    missing.join(", ")
                )
            }
        }
    }
}
