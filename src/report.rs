//! The report: what a transfer did (or would do), as a value — for people
//! (`Display`: a compact table, long lists truncated, "did you mean" for
//! leftovers that nearly match) and for programs (serde JSON).
use std::fmt;

use serde::Serialize;

use crate::copy::Copied;
use crate::dotted::{escaped, shown};
use crate::matching::{How, ModuleMatch};
use crate::plan::{Cast, Finding, Orders, Plan, Policy, Severity, Side};
use crate::store::summary::human_bytes;
use crate::transform::{shape_text, Transform};

/// One pair as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ReportPair {
    /// Source name.
    pub source: String,
    /// Target name.
    pub target: String,
    /// What made the pair.
    pub provenance: String,
    /// The matcher step that paired the (renamed) names.
    pub how: How,
    /// The dtype conversion, if any.
    pub cast: Option<Cast>,
    /// The transform (ops on the source, the target region, both tensors'
    /// shapes), if a rule gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

/// One leftover as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ReportLeftover {
    /// Source or target.
    pub side: Side,
    /// Its name.
    pub name: String,
    /// Why it is expected, when it is.
    pub explained: Option<String>,
    /// The unpaired name on the other side it most likely is: of the same leaf
    /// and shape where there is one, else the nearest in spelling.
    pub did_you_mean: Option<String>,
    /// For a source a rule renamed: the name it made, and the rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renamed: Option<String>,
}

/// One target tensor kept as it is on purpose, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ReportKept {
    /// Its name.
    pub name: String,
    /// The `keep` rule that keeps it, as written.
    pub rule: String,
    /// Where the rule was written.
    pub at: String,
}

/// One finding with its severity under the policy used.
#[derive(Debug, Clone, Serialize)]
pub struct ReportProblem {
    /// Note, warning or error.
    pub severity: Severity,
    /// The finding, described.
    pub message: String,
    /// The finding as data.
    pub finding: Finding,
}

/// What a transfer did or would do.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where the values come from.
    pub source: String,
    /// Where they go.
    pub target: String,
    /// The matcher used.
    pub matcher: String,
    /// Whether every entry on both sides takes part (or is explained).
    pub complete: bool,
    /// Whether the plan passes its check under the policy.
    pub ok: bool,
    /// How each side was ordered, when the order matcher ran.
    pub order: Option<Orders>,
    /// Whether a side's order was reconstructed from its names (it keeps none).
    pub order_reconstructed: bool,
    /// The modules the order matcher aligned, each with the tensors paired in it.
    pub modules: Vec<ModuleMatch>,
    /// Every pair.
    pub pairs: Vec<ReportPair>,
    /// Leftovers, source side then target side.
    pub leftovers: Vec<ReportLeftover>,
    /// Target tensors kept as they are on purpose (`keep`): not left over.
    pub kept: Vec<ReportKept>,
    /// Findings, most serious first — except a `num_batches_tracked` with no
    /// counterpart, a note that its leftover entry already explains.
    pub problems: Vec<ReportProblem>,
    /// What the copy did, when one ran.
    pub copy: Option<Copied>,
}

/// Lines of each list shown before "… and N more".
const SHOWN: usize = 12;
/// Suggestions are only looked for among lists this long (the search is quadratic).
const MAX_SUGGEST: usize = 2_000;

fn suggestion(name: &str, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (strsim::normalized_levenshtein(name, c), *c))
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

impl Report {
    /// The report of `plan` under `policy`, with what the copy did if it ran.
    pub fn new(plan: &Plan, policy: &Policy, copy: Option<Copied>) -> Self {
        let unexplained = |side: Side| -> Vec<&str> {
            let list = if side == Side::Source { &plan.source_leftovers } else { &plan.target_leftovers };
            list.iter().filter(|l| l.explained.is_none()).map(|l| l.name.as_str()).collect()
        };
        let (open_sources, open_targets) = (unexplained(Side::Source), unexplained(Side::Target));
        let suggest = open_sources.len() <= MAX_SUGGEST && open_targets.len() <= MAX_SUGGEST;
        let leftovers = plan
            .source_leftovers
            .iter()
            .chain(&plan.target_leftovers)
            .map(|l| {
                let others = if l.side == Side::Source { &open_targets } else { &open_sources };
                ReportLeftover {
                    side: l.side,
                    name: l.name.to_string(),
                    explained: l.explained.clone(),
                    did_you_mean: l.near.as_ref().map(|n| n.to_string()).or_else(|| {
                        (suggest && l.explained.is_none()).then(|| suggestion(&l.name, others)).flatten()
                    }),
                    renamed: l.renamed.clone(),
                }
            })
            .collect();
        Self {
            source: plan.source.clone(),
            target: plan.target.clone(),
            matcher: plan.matcher.to_string(),
            complete: plan.is_complete(),
            ok: plan.check(policy).is_ok(),
            order: plan.order.clone(),
            order_reconstructed: plan.order.as_ref().is_some_and(Orders::reconstructed),
            modules: plan.modules.clone(),
            pairs: plan
                .pairs
                .iter()
                .map(|p| ReportPair {
                    source: p.source_name.to_string(),
                    target: p.target_name.to_string(),
                    provenance: p.provenance(),
                    how: p.how,
                    cast: p.cast.clone(),
                    transform: p.transform.clone(),
                })
                .collect(),
            leftovers,
            kept: plan
                .kept
                .iter()
                .map(|k| ReportKept { name: k.name.to_string(), rule: k.rule.clone(), at: k.at.clone() })
                .collect(),
            problems: plan
                .problems(policy)
                .into_iter()
                .filter(|(_, f)| !matches!(f, Finding::NumBatchesTracked { .. }))
                .map(|(severity, f)| ReportProblem { severity, message: f.to_string(), finding: f.clone() })
                .collect(),
            copy,
        }
    }

    /// Whether every entry on both sides takes part, or is explained.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// How many problems of `severity` there are.
    pub fn count(&self, severity: Severity) -> usize {
        self.problems.iter().filter(|p| p.severity == severity).count()
    }
}

/// Characters a name takes on a terminal, once escaped.
fn shown_len(text: &str) -> usize {
    shown(text).chars().count()
}

fn more(f: &mut fmt::Formatter<'_>, total: usize) -> fmt::Result {
    if total > SHOWN {
        writeln!(f, "    … and {} more", total - SHOWN)?;
    }
    Ok(())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} -> {} (matcher: {})", escaped(&self.source), escaped(&self.target), self.matcher)?;
        let casts = self.pairs.iter().filter(|p| p.cast.is_some()).count();
        writeln!(f, "  pairs: {} ({casts} with a dtype cast)", self.pairs.len())?;
        if let Some(order) = &self.order {
            let describe = |o: &crate::plan::OrderUsed| match o {
                crate::plan::OrderUsed::Registration => "registration".to_string(),
                crate::plan::OrderUsed::Reconstructed => "reconstructed from names".to_string(),
                crate::plan::OrderUsed::From { model } => format!("from {}", escaped(model)),
            };
            writeln!(f, "  order: source {}, target {}", describe(&order.source), describe(&order.target))?;
        }
        // Pairs the order matcher made are shown a module a line.
        let by_module = |p: &&ReportPair| p.how == How::Order || p.how == How::ReconstructedOrder;
        if !self.modules.is_empty() {
            let width = self
                .modules
                .iter()
                .take(SHOWN)
                .map(|m| shown_len(&m.target))
                .max()
                .unwrap_or(0)
                .min(2 * crate::dotted::SHOWN_CHARS);
            writeln!(f, "  module pairs: {}", self.modules.len())?;
            for m in self.modules.iter().take(SHOWN) {
                let plural = if m.tensors == 1 { "" } else { "s" };
                writeln!(
                    f,
                    "    {:<width$} <- {}  ({}, {} tensor{plural})",
                    shown(&m.target),
                    shown(&m.source),
                    m.how,
                    m.tensors
                )?;
            }
            more(f, self.modules.len())?;
        }
        let listed: Vec<&ReportPair> =
            self.pairs.iter().filter(|p| self.modules.is_empty() || !by_module(p)).collect();
        // A transformed pair shows the target region and the source's ops
        // (`qkv.weight[narrow(0, 0, 64)] <- q.weight`, `gamma <- ls | reshape(-1)`)
        // and both tensors' shapes.
        let target_shown = |p: &ReportPair| {
            let region = p.transform.as_ref().map_or(String::new(), Transform::target_text);
            format!("{}{region}", shown(&p.target))
        };
        let width = listed
            .iter()
            .take(SHOWN)
            .map(|p| target_shown(p).chars().count())
            .max()
            .unwrap_or(0)
            .min(2 * crate::dotted::SHOWN_CHARS);
        for p in listed.iter().take(SHOWN) {
            let cast = p.cast.as_ref().map_or(String::new(), |c| {
                format!("  [{} -> {}]", crate::dtype::name(c.from), crate::dtype::name(c.to))
            });
            let (source, how) = (shown(&p.source), escaped(&p.provenance));
            let (ops, shapes) = p.transform.as_ref().map_or((String::new(), String::new()), |t| {
                let shapes = format!("  {} -> {}", shape_text(&t.source_shape), shape_text(&t.target_shape));
                (t.source_text(), shapes)
            });
            writeln!(f, "    {:<width$} <- {source}{ops}  ({how}){shapes}{cast}", target_shown(p))?;
        }
        more(f, listed.len())?;
        for side in [Side::Source, Side::Target] {
            let list: Vec<&ReportLeftover> = self.leftovers.iter().filter(|l| l.side == side).collect();
            if list.is_empty() {
                continue;
            }
            writeln!(f, "  left over in the {side} ({}):", list.len())?;
            for l in list.iter().take(SHOWN) {
                let renamed =
                    l.renamed.as_ref().map_or(String::new(), |r| format!(" (renamed to {})", escaped(r)));
                match (&l.explained, &l.did_you_mean) {
                    (Some(why), _) => writeln!(f, "    {} ({})", shown(&l.name), escaped(why))?,
                    (None, Some(near)) if !renamed.is_empty() => {
                        writeln!(f, "    {}{renamed} (did you mean {}?)", shown(&l.name), escaped(near))?
                    }
                    (None, None) if !renamed.is_empty() => writeln!(f, "    {}{renamed}", shown(&l.name))?,
                    (None, Some(near)) => {
                        writeln!(f, "    {} (did you mean {}?)", shown(&l.name), shown(near))?
                    }
                    (None, None) => writeln!(f, "    {}", shown(&l.name))?,
                }
            }
            more(f, list.len())?;
        }
        if !self.kept.is_empty() {
            writeln!(f, "  kept in the target ({}):", self.kept.len())?;
            for k in self.kept.iter().take(SHOWN) {
                writeln!(f, "    {} (`{}`, {})", escaped(&k.name), escaped(&k.rule), escaped(&k.at))?;
            }
            more(f, self.kept.len())?;
        }
        // Unpaired entries are listed above; the other findings follow.
        let problems: Vec<&ReportProblem> =
            self.problems.iter().filter(|p| !matches!(p.finding, Finding::Leftover { .. })).collect();
        if !problems.is_empty() {
            writeln!(f, "  problems:")?;
            for p in problems.iter().take(SHOWN) {
                let tag = match p.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                    Severity::Note => "note",
                };
                writeln!(f, "    {tag}: {}", p.message)?;
            }
            more(f, problems.len())?;
        }
        if let Some(c) = &self.copy {
            write!(f, "  copied {} tensors, {}", c.tensors, human_bytes(c.bytes))?;
            // A copy into a file is timed until the file is in place; its
            // throughput is the file's bytes over that time.
            let moved = match c.file_bytes {
                Some(file) => {
                    write!(f, ", writing a file of {}", human_bytes(file))?;
                    file
                }
                None => c.bytes,
            };
            write!(f, " in {:.1} ms", c.copy_seconds * 1e3)?;
            if c.copy_seconds > 0.0 {
                write!(f, " ({}/s)", human_bytes((moved as f64 / c.copy_seconds) as u64))?;
            }
            if c.verified {
                let how = if c.casts == 0 {
                    "bit for bit"
                } else {
                    "bit for bit (cast pairs: against the source converted to the target dtype)"
                };
                writeln!(f, "; verified {how} in {:.1} ms", c.verify_seconds * 1e3)?;
            } else {
                writeln!(f, "; not verified")?;
            }
        }
        let errors = self.count(Severity::Error);
        let verdict = match (self.ok, self.complete) {
            (false, _) => format!("refused: {errors} error(s), nothing written"),
            (true, true) => "complete: every tensor on both sides takes part".to_string(),
            (true, false) => {
                let open = self.leftovers.iter().filter(|l| l.explained.is_none()).count();
                format!("incomplete: {open} tensor(s) left over")
            }
        };
        write!(f, "  verdict: {verdict}")
    }
}
