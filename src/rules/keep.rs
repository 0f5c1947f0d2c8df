//! `keep PATTERN` (and `--keep`): target tensors that stay as they are on
//! purpose — a new head, masks a module computes at construction. A kept target
//! is never left over; a rule or matcher that would fill one is an error.
use std::fmt;

use regex::Regex;

use super::first::anchored;
use super::{one_line, RuleSource};
use crate::error::{Error, Result};

/// One compiled `keep` rule: a pattern over the **target's** names.
#[derive(Debug, Clone)]
pub struct Keep {
    /// The pattern as written.
    pub pattern: String,
    /// Where it was written.
    pub source: RuleSource,
    regex: Regex,
}

impl Keep {
    /// Compiles `pattern` (matched against the whole target name).
    pub(super) fn new(pattern: &str, source: RuleSource) -> Result<Self> {
        let at = || source.to_string();
        if pattern.is_empty() {
            return Err(Error::Rule { at: at(), message: "`keep` needs a pattern".into() });
        }
        if pattern.contains(char::is_whitespace) {
            return Err(Error::Rule {
                at: at(),
                message: format!("pattern {pattern:?} contains a space, which no tensor name has"),
            });
        }
        let regex = Regex::new(&anchored(pattern)).map_err(|e| Error::Rule {
            at: at(),
            message: format!("bad pattern {pattern:?}: {}", one_line(&e)),
        })?;
        Ok(Self { pattern: pattern.to_string(), source, regex })
    }

    /// A pattern for the whole module `name` belongs to (`fc\..*` for
    /// `fc.weight`), or for the name itself at the root: what a `--keep` or
    /// `--skip` suggested in a message names.
    pub fn module_pattern(name: &str) -> String {
        match crate::dotted::module_and_leaf(name) {
            ("", _) => regex::escape(name),
            (module, _) => format!("{}\\..*", regex::escape(module)),
        }
    }

    /// Whether this rule keeps the target tensor `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "keep {}", self.pattern)
    }
}
