//! What a plan holds back on purpose: target tensors a `keep` rule names, and
//! tied names the source does not hold (so that a `skip` of one is not unused).
use super::build::Builder;
use super::Finding;
use crate::rules::Rules;

impl<'a> Builder<'a> {
    /// Names tied to another tensor that the source does not hold, each with
    /// the name it is tied to: those the source's metadata records as dropped
    /// for a tie (`safetensors.torch.save_model` writes `dropped: kept`), and
    /// the target's tied names the source lacks.
    pub(super) fn tied_names_not_in_source(&self) -> Vec<(String, String)> {
        let held: std::collections::HashSet<&str> =
            self.source.entries().iter().map(|e| e.name.as_str()).collect();
        let mut out: Vec<(String, String)> = self
            .source
            .metadata()
            .into_iter()
            .filter(|(dropped, kept)| !held.contains(dropped.as_str()) && held.contains(kept.as_str()))
            .collect();
        let targets = self.target.entries();
        for group in self.target.ties() {
            for &j in &group {
                let name = targets[j].name.as_str();
                if !held.contains(name) {
                    let with = group.iter().find(|&&k| k != j).map_or("", |&k| targets[k].name.as_str());
                    out.push((name.to_string(), with.to_string()));
                }
            }
        }
        out
    }

    /// Step 4: targets a `keep` rule names receive nothing. A pair into one
    /// (made by a rule or the matcher) is taken out and reported as an error
    /// naming both the keep and what would have filled it; a keep that names
    /// no target is an unused rule.
    pub(super) fn hold_kept(&mut self, rules: &Rules) {
        let keeps = rules.keeps();
        if keeps.is_empty() {
            return;
        }
        self.keep_texts = keeps.iter().map(|k| (k.to_string(), k.source.to_string())).collect();
        let mut fired = vec![false; keeps.len()];
        self.kept_by = self
            .target
            .entries()
            .iter()
            .map(|t| {
                let k = keeps.iter().position(|k| k.matches(&t.name));
                if let Some(k) = k {
                    fired[k] = true;
                }
                k
            })
            .collect();
        let (kept_by, mut filled) = (&self.kept_by, Vec::new());
        self.pairs.retain(|p| match kept_by[p.target] {
            Some(k) => {
                filled.push((k, p.source_name.to_string(), p.target_name.to_string(), p.provenance()));
                false
            }
            None => true,
        });
        for (k, source, target, by) in filled {
            let keep = &keeps[k];
            // The next step: leave the source out, with the keep's own pattern
            // where it names the source too (the usual case: a new head).
            let skip = if keep.matches(&source) { keep.pattern.clone() } else { regex::escape(&source) };
            self.findings.push(Finding::KeptFilled {
                target,
                keep: keep.to_string(),
                at: keep.source.to_string(),
                source,
                by,
                skip,
            });
        }
        for (keep, used) in keeps.iter().zip(fired) {
            if !used {
                self.findings
                    .push(Finding::UnusedRule { rule: keep.to_string(), at: keep.source.to_string() });
            }
        }
    }
}
