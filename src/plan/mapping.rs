//! How source names become target names: a [`Mapping`] of rules, a matcher,
//! and optionally a registration order lent by another model ([`NameOrder`]).
use std::collections::HashMap;

use crate::entry::{Entry, EntryOrder, Name};
use crate::error::{Error, Result};
use crate::matching::Matcher;
use crate::rules::{Constants, Rules};
use crate::store::Source;

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
    pub(super) fn sequence(&self, entries: &[Entry]) -> Result<Vec<usize>> {
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
        Self::from_parts_with(rules_file, maps, skips, &Constants::new(), matcher)
    }

    /// [`Mapping::from_parts`], the rules file's constants given the values
    /// `sets` has for them (`--set NAME=VALUE`; each must name a `let` of the
    /// file). The `maps` rules see the file's constants too.
    pub fn from_parts_with(
        rules_file: Option<&std::path::Path>,
        maps: &[String],
        skips: &[String],
        sets: &Constants,
        matcher: Matcher,
    ) -> Result<Self> {
        let file = match rules_file {
            Some(path) => Some(Rules::from_file_with(path, sets)?),
            None if !sets.is_empty() => {
                let name = sets.names().next().unwrap_or_default();
                return Err(Error::Rule {
                    at: format!("--set {name}"),
                    message: "--set gives a value to a constant of the rules file (`let NAME = VALUE`): \
                              name the file with --rules"
                        .into(),
                });
            }
            None => None,
        };
        let mut rules = Rules::new();
        if let Some(file) = &file {
            rules.use_constants_of(file);
        }
        for pattern in skips {
            rules.add_skip(pattern)?;
        }
        for spec in maps {
            rules.add_map(spec)?;
        }
        if let Some(file) = &file {
            rules.extend(file)?;
        }
        Ok(Self { rules, matcher, source_order: None })
    }
}
