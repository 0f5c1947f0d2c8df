//! The rule language (DESIGN.md, "The rule language").
//!
//! Long because every form of a rule (rename, split, cat, stack, unstack,
//! skip) is one [`Action`], and its checks when added, its text and what it
//! does to a name sit together here; the parsing of each form is in
//! `chain.rs`, constants in `constants.rs`, the index in `first.rs`.
//!
//! ```text
//! # comment
//! backbone\.(.*)            => encoder.$1
//! (.*)\.layer_scale         => $1.gamma | reshape(-1)
//! (.*)\.qkv\.weight         => $1.q.weight, $1.k.weight, $1.v.weight | split(0)
//! (.*)\.q\.w + (.*)\.k\.w   => $1.kv.w | cat(0)
//! skip   head\..*
//! keep   head\..*
//! let heads = 32
//! (.*)\.wq\.weight        => $1.q_proj.weight | reshape(heads, 2, 4096 / heads / 2, 4096)
//! ```
//!
//! A pattern matches the **whole** source name; the replacement is the whole
//! target name (`$1`, `${name}`). Rules are tried in order and the first that
//! matches decides; a name no rule matches keeps its name. A rename may carry
//! transforms (`| OP`, see [`crate::transform`]); `split` makes several targets
//! of one source, `cat` one target of several sources (one per pattern, those
//! whose captures are equal forming a group). Every rule is compiled
//! when parsed (a bad pattern is an error naming where the rule came from), and
//! the first rule that matches a name is found through an index of the
//! patterns' literal text (`first.rs`), each regex compiled only when a name
//! could match it, so that mapping many names over many rules stays about
//! linear in both. `keep PATTERN` names **target** tensors that stay as they
//! are ([`Keep`]); it renames nothing and is kept apart from the other rules.
//! `let NAME = EXPR` defines an integer constant that op arguments use
//! (`constants.rs`), its value replaceable from outside ([`Constants`]).
use serde::Serialize;
use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::transform::Op;

mod chain;
mod constants;
mod first;
mod keep;

pub(crate) use chain::unstacked_names;
use chain::{parse_rename, stack_index};
pub use constants::Constants;
pub use keep::Keep;

/// Where a rule was written: a file and line, or a command-line flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RuleSource {
    /// Line `line` (1-based) of a rules file.
    File {
        /// The rules file.
        file: String,
        /// The line, from 1.
        line: usize,
    },
    /// A `--map` / `--skip` / `--keep` flag (the n-th, from 1).
    Flag {
        /// `--map`, `--skip` or `--keep`.
        flag: &'static str,
        /// Which one, from 1.
        index: usize,
    },
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleSource::File { file, line } => write!(f, "{file}:{line}"),
            RuleSource::Flag { flag, index } => write!(f, "{flag} #{index}"),
        }
    }
}

/// What a rule does to the names it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Rename to this replacement (`$1`, `${name}` expanded); the rule's ops
    /// apply to the source.
    Rename(String),
    /// `=> A, B | split(D[, S1, S2])`: one source into several targets, parts
    /// along `dim` (equal, or of the given sizes), after the rule's ops.
    Split {
        /// The targets, in order.
        targets: Vec<String>,
        /// The dimension split.
        dim: i64,
        /// The parts' sizes; `None`: equal parts.
        sizes: Option<Vec<i64>>,
    },
    /// `A + B => T | cat(D)`: one source per pattern, concatenated along `dim`
    /// in the order written; the rule's ops apply to the concatenation.
    Cat {
        /// The target.
        target: String,
        /// The dimension concatenated.
        dim: i64,
    },
    /// `A[ + B]... => T | stack(D)[ | cat(C)]`: every source a pattern
    /// matches over the range of its one capture `T` does not use (its
    /// `index`, a number from 0), stacked in that number's order along a new
    /// dimension `dim`; several patterns' stacks concatenated along `cat` of
    /// the stacked shape. The rule's ops apply to the result.
    Stack {
        /// The target.
        target: String,
        /// The new dimension.
        dim: i64,
        /// The dimension several patterns' stacks are concatenated along.
        cat: Option<i64>,
        /// The capture group holding the index (from 1).
        index: usize,
    },
    /// `A => T[, T]... [| split(C[, S]...)] | unstack(D)`: one source, after the
    /// rule's ops (and parted along `C` into the targets listed), unstacked
    /// along `dim` into one target per index; each target holds one `*`, where
    /// the index goes.
    Unstack {
        /// The targets, each with one `*`.
        targets: Vec<String>,
        /// The dimension unstacked.
        dim: i64,
        /// The split before the unstack: dimension and sizes (`None`: equal).
        split: Option<(i64, Option<Vec<i64>>)>,
    },
    /// `W + S => T | dequantize(B, DTYPE)`: the FP8 weight `W` times its
    /// float32 block scales `S` (one per `block`×`block` block), computed as
    /// `dtype`; sources whose captures are equal form one pair, as a `cat`'s.
    Dequantize {
        /// The target.
        target: String,
        /// The block size.
        block: i64,
        /// The result's dtype (bfloat16 or float32).
        dtype: crate::dtype::Dtype,
    },
    /// `W => T | quantize(B, DTYPE)`: `W` quantized into the FP8 `dtype` in
    /// blocks of `block`, written to `T` and its scales to `T` +
    /// `_scale_inv` (as FP8 checkpoints name them).
    Quantize {
        /// The target (the weight).
        target: String,
        /// The block size.
        block: i64,
        /// The FP8 dtype.
        dtype: crate::dtype::Dtype,
    },
    /// Leave the name out of the transfer.
    Skip,
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The pattern as written; for a `cat`, the patterns joined by ` + `.
    pub pattern: String,
    /// What it does.
    pub action: Action,
    /// Transforms: of the source (a rename), before the split, or after the
    /// concatenation.
    pub ops: Vec<Op>,
    /// Where it was written.
    pub source: RuleSource,
    /// Each pattern (a `cat` has several).
    members: Vec<first::Pattern>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: String = self.ops.iter().map(|op| format!(" | {op}")).collect();
        match &self.action {
            Action::Rename(replacement) => write!(f, "{} => {replacement}{ops}", self.pattern),
            Action::Split { targets, dim, sizes } => {
                let sizes: String = sizes.iter().flatten().map(|s| format!(", {s}")).collect();
                write!(f, "{} => {}{ops} | split({dim}{sizes})", self.pattern, targets.join(", "))
            }
            Action::Cat { target, dim } => write!(f, "{} => {target} | cat({dim}){ops}", self.pattern),
            Action::Stack { target, dim, cat, .. } => {
                let cat = cat.map(|c| format!(" | cat({c})")).unwrap_or_default();
                write!(f, "{} => {target} | stack({dim}){cat}{ops}", self.pattern)
            }
            Action::Unstack { targets, dim, split } => {
                let split = split
                    .as_ref()
                    .map(|(d, sizes)| {
                        let sizes: String = sizes.iter().flatten().map(|s| format!(", {s}")).collect();
                        format!(" | split({d}{sizes})")
                    })
                    .unwrap_or_default();
                write!(f, "{} => {}{ops}{split} | unstack({dim})", self.pattern, targets.join(", "))
            }
            Action::Dequantize { target, block, dtype } => {
                write!(f, "{} => {target} | dequantize({block}, {dtype})", self.pattern)
            }
            Action::Quantize { target, block, dtype } => {
                write!(f, "{} => {target} | quantize({block}, {dtype})", self.pattern)
            }
            Action::Skip => write!(f, "skip {}", self.pattern),
        }
    }
}

impl Rule {
    /// The patterns: one, or a `cat`'s members in order.
    pub fn patterns(&self) -> Vec<&str> {
        self.members.iter().map(first::Pattern::text).collect()
    }

    /// Whether one of the rule's patterns matches the whole of `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.members.iter().any(|m| m.regex().is_some_and(|r| r.is_match(name)))
    }
}

/// What the rules did to one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No rule matched: the name stays.
    Kept,
    /// Rule `rule` renamed it.
    Renamed {
        /// The new name.
        to: String,
        /// Index of the rule in [`Rules::rules`].
        rule: usize,
    },
    /// Rule `rule` splits it into these targets, in order.
    Split {
        /// The new names.
        to: Vec<String>,
        /// Index of the rule in [`Rules::rules`].
        rule: usize,
    },
    /// It is member `member` of rule `rule`'s concatenation into `to`; the
    /// sources of one rule with equal `key`s (their captures) form one group.
    Member {
        /// The target's name.
        to: String,
        /// Index of the rule in [`Rules::rules`].
        rule: usize,
        /// Which pattern it matched, from 0.
        member: usize,
        /// The pattern's captures, in order (for a `stack`, all but the index).
        key: Vec<String>,
        /// For a `stack`: the index's text (a number from 0, when well formed).
        index: Option<String>,
    },
    /// Rule `rule` unstacks it: each target is a prefix and a suffix around
    /// where an index goes ([`unstacked_names`] makes the names).
    Unstack {
        /// The targets' text before and after the index.
        parts: Vec<(String, String)>,
        /// Index of the rule in [`Rules::rules`].
        rule: usize,
    },
    /// Rule `rule` skips it.
    Skipped {
        /// Index of the rule in [`Rules::rules`].
        rule: usize,
    },
}

/// The largest rules file read.
const MAX_RULES_BYTES: u64 = 16 << 20;

/// An ordered list of compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Every pattern indexed by its literal text, to find the first that
    /// matches a name.
    index: first::Index,
    /// Each pattern of the index: its rule and member.
    patterns: Vec<(usize, usize)>,
    /// The `keep` rules, over target names.
    keeps: Vec<Keep>,
    flags: [usize; 3],
    /// The constants defined by `let`, in order, with the values set from
    /// outside in place: what op arguments see.
    constants: constants::Scope,
}

/// The regex crate's error in one line (its syntax errors draw a caret diagram).
fn one_line(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => one_line_text(text),
        other => other.to_string(),
    }
}

/// A syntax error's text in one line: its last line, which says what is wrong.
fn one_line_text(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(text)
        .trim()
        .trim_start_matches("error: ")
        .to_string()
}

/// The capture-group references (`$1`, `$name`, `${name}`) in a replacement.
fn group_references(replacement: &str) -> Vec<String> {
    let mut refs = Vec::new();
    let bytes = replacement.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'$') => i += 2,
            Some(b'{') => {
                let end = replacement[i + 2..].find('}').map(|e| i + 2 + e);
                match end {
                    Some(end) => {
                        refs.push(replacement[i + 2..end].to_string());
                        i = end + 1;
                    }
                    None => {
                        refs.push(replacement[i + 1..].to_string());
                        i = bytes.len();
                    }
                }
            }
            _ => {
                let len = replacement[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(replacement.len() - i - 1);
                refs.push(replacement[i + 1..i + 1 + len].to_string());
                i += 1 + len.max(1);
            }
        }
    }
    refs
}

impl Rules {
    /// No rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a rules file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        Self::parse_with(text, file, &Constants::new())
    }

    /// Parses a rules file's text, its constants given the values `sets` has
    /// for them (`--set NAME=VALUE`); a set value whose name no `let` of the
    /// file defines is an error.
    pub fn parse_with(text: &str, file: &str, sets: &Constants) -> Result<Self> {
        let mut rules = Self::new();
        for (index, line) in text.lines().enumerate() {
            let source = RuleSource::File { file: file.to_string(), line: index + 1 };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            rules.push_line(line, source, sets)?;
        }
        if let Some(name) = sets.names().find(|n| !rules.constants.iter().any(|(c, _)| c == n)) {
            let defined: Vec<&str> = rules.constants.iter().map(|(c, _)| c.as_str()).collect();
            return Err(Error::Rule {
                at: format!("--set {name}"),
                message: if defined.is_empty() {
                    format!("{file} defines no constants (`let NAME = VALUE`) to set")
                } else {
                    format!("{file} defines no constant `{name}` (it defines {})", defined.join(", "))
                },
            });
        }
        Ok(rules)
    }

    /// Reads and parses a rules file.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with(path, &Constants::new())
    }

    /// Reads and parses a rules file, its constants given the values `sets`
    /// has for them (see [`Rules::parse_with`]).
    pub fn from_file_with(path: &Path, sets: &Constants) -> Result<Self> {
        let bytes = crate::files::read_bounded(path, MAX_RULES_BYTES, "rules file")?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Rule { at: path.display().to_string(), message: "not UTF-8 text".into() })?;
        Self::parse_with(&text, &path.display().to_string(), sets)
    }

    /// The constants (`let`), in order, with their values (set from outside
    /// where they were).
    pub fn constants(&self) -> impl Iterator<Item = (&str, i64)> {
        self.constants.iter().map(|(n, v)| (n.as_str(), *v))
    }

    /// Makes `other`'s constants visible to the op arguments of the rules
    /// added after this (a `--map` using a rules file's constants).
    pub fn use_constants_of(&mut self, other: &Rules) {
        for (name, value) in &other.constants {
            if !self.constants.iter().any(|(n, _)| n == name) {
                self.constants.push((name.clone(), *value));
            }
        }
    }

    fn push_line(&mut self, line: &str, source: RuleSource, sets: &Constants) -> Result<()> {
        if let Some(definition) = line.strip_prefix("let").filter(|d| d.starts_with(char::is_whitespace)) {
            let (name, value) = constants::define(definition, &self.constants, sets)
                .map_err(|message| Error::Rule { at: source.to_string(), message })?;
            self.constants.push((name, value));
            return Ok(());
        }
        if let Some((left, right)) = line.split_once("=>") {
            return self.push_rename(left, right, source);
        }
        let mut words = line.splitn(2, char::is_whitespace);
        match (words.next(), words.next()) {
            (Some("skip"), Some(pattern)) => self.push(pattern.trim(), Action::Skip, source),
            (Some("skip"), None) => {
                Err(Error::Rule { at: source.to_string(), message: "`skip` needs a pattern".into() })
            }
            (Some("keep"), pattern) => {
                self.keeps.push(Keep::new(pattern.unwrap_or_default().trim(), source)?);
                Ok(())
            }
            _ => Err(Error::Rule {
                at: source.to_string(),
                message: format!(
                    "cannot read {line:?}: expected `PATTERN => REPLACEMENT`, `skip PATTERN`, `keep PATTERN` or `let NAME = VALUE`"
                ),
            }),
        }
    }

    fn push_rename(&mut self, left: &str, right: &str, source: RuleSource) -> Result<()> {
        let (patterns, action, ops) = parse_rename(left, right, &self.constants)
            .map_err(|message| Error::Rule { at: source.to_string(), message })?;
        if patterns.is_empty() {
            return Err(Error::Rule { at: source.to_string(), message: "empty pattern".into() });
        }
        self.add(patterns, action, ops, source)
    }

    /// Adds a `--map 'PATTERN=>REPLACEMENT'` rule (any form a rules file
    /// takes: transforms, split, cat).
    pub fn add_map(&mut self, spec: &str) -> Result<()> {
        self.flags[0] += 1;
        let source = RuleSource::Flag { flag: "--map", index: self.flags[0] };
        let Some((pattern, replacement)) = spec.split_once("=>") else {
            return Err(Error::Rule {
                at: source.to_string(),
                message: format!("{spec:?} is not of the form PATTERN=>REPLACEMENT"),
            });
        };
        self.push_rename(pattern, replacement, source)
    }

    /// Adds a `--skip PATTERN` rule.
    pub fn add_skip(&mut self, pattern: &str) -> Result<()> {
        self.flags[1] += 1;
        let source = RuleSource::Flag { flag: "--skip", index: self.flags[1] };
        self.push(pattern.trim(), Action::Skip, source)
    }

    /// Adds a `--keep PATTERN` rule: target tensors matching it stay as they are.
    pub fn add_keep(&mut self, pattern: &str) -> Result<()> {
        self.flags[2] += 1;
        let source = RuleSource::Flag { flag: "--keep", index: self.flags[2] };
        self.keeps.push(Keep::new(pattern.trim(), source)?);
        Ok(())
    }

    /// The `keep` rules, in order.
    pub fn keeps(&self) -> &[Keep] {
        &self.keeps
    }

    /// These rules without their `keep` rules (for a conversion, which has no
    /// target to keep anything of).
    pub fn without_keeps(&self) -> Self {
        Self { keeps: Vec::new(), ..self.clone() }
    }

    /// Adds one rule of one pattern, with no transforms, after the others.
    pub fn push(&mut self, pattern: &str, action: Action, source: RuleSource) -> Result<()> {
        self.add(vec![pattern.to_string()], action, Vec::new(), source)
    }

    /// Adds the rules of `other` after these, keeping where each was written.
    pub fn extend(&mut self, other: &Rules) -> Result<()> {
        for rule in &other.rules {
            let patterns = rule.patterns().into_iter().map(str::to_string).collect();
            self.add(patterns, rule.action.clone(), rule.ops.clone(), rule.source.clone())?;
        }
        self.keeps.extend(other.keeps.iter().cloned());
        self.use_constants_of(other);
        Ok(())
    }

    fn add(&mut self, patterns: Vec<String>, action: Action, ops: Vec<Op>, source: RuleSource) -> Result<()> {
        let at = || source.to_string();
        let mut regexes = Vec::with_capacity(patterns.len());
        for pattern in &patterns {
            if pattern.is_empty() {
                return Err(Error::Rule { at: at(), message: "empty pattern".into() });
            }
            if pattern.contains(char::is_whitespace) {
                let first = pattern.split_whitespace().next().unwrap_or_default();
                return Err(Error::Rule {
                    at: at(),
                    message: format!(
                        "pattern {pattern:?} contains a space, which no tensor name has \
                         (`{first}` is not a keyword: rules are `PATTERN => REPLACEMENT`, `skip PATTERN` or `keep PATTERN`)"
                    ),
                });
            }
            regexes.push(first::Pattern::new(pattern).map_err(|e| Error::Rule {
                at: at(),
                message: format!("bad pattern {pattern:?}: {}", one_line_text(&e)),
            })?);
        }
        let replacements: Vec<&String> = match &action {
            Action::Rename(to) => vec![to],
            Action::Split { targets, .. } => targets.iter().collect(),
            Action::Cat { target, .. }
            | Action::Stack { target, .. }
            | Action::Dequantize { target, .. }
            | Action::Quantize { target, .. } => vec![target],
            Action::Unstack { targets, .. } => {
                if let Some(t) = targets.iter().find(|t| t.matches('*').count() != 1) {
                    return Err(Error::Rule {
                        at: at(),
                        message: format!("unstack target {t:?} needs one `*`, where the index goes"),
                    });
                }
                targets.iter().collect()
            }
            Action::Skip => {
                if !ops.is_empty() {
                    return Err(Error::Rule { at: at(), message: "a skip takes no ops".into() });
                }
                Vec::new()
            }
        };
        for replacement in replacements {
            if replacement.is_empty() {
                return Err(Error::Rule { at: at(), message: "empty replacement".into() });
            }
            for (pattern, (regex, _)) in patterns.iter().zip(&regexes) {
                for group in group_references(replacement) {
                    let known = match group.parse::<usize>() {
                        Ok(n) => n < regex.captures_len(),
                        Err(_) => regex.has_name(&group),
                    };
                    if !known {
                        return Err(Error::Rule {
                            at: at(),
                            message: format!(
                                "replacement {replacement:?} refers to ${group}, which {pattern:?} does not capture"
                            ),
                        });
                    }
                }
            }
        }
        if regexes.len() > 1 {
            let counts: Vec<usize> = regexes.iter().map(|(r, _)| r.captures_len()).collect();
            if counts.iter().any(|&c| c != counts[0]) {
                return Err(Error::Rule {
                    at: at(),
                    message: "the patterns of a cat must capture as many groups each: \
                              sources whose captures are equal form one group"
                        .into(),
                });
            }
        }
        let mut action = action;
        if let Action::Stack { target, index, .. } = &mut action {
            *index = stack_index(&patterns, &regexes, target)
                .map_err(|message| Error::Rule { at: at(), message })?;
        }
        let rule = self.rules.len();
        let mut members = Vec::with_capacity(regexes.len());
        for (member, (regex, hir)) in regexes.into_iter().enumerate() {
            self.index.add(self.patterns.len(), &hir);
            self.patterns.push((rule, member));
            members.push(regex);
        }
        self.rules.push(Rule { pattern: patterns.join(" + "), action, ops, source, members });
        Ok(())
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether there are no rules (`keep` rules aside).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What the first matching rule does to `name`.
    pub fn apply(&self, name: &str) -> Outcome {
        let pattern = |id: usize| {
            let (rule, member) = self.patterns[id];
            &self.rules[rule].members[member]
        };
        let Some((rule, member)) = self.index.first(pattern, name).map(|id| self.patterns[id]) else {
            return Outcome::Kept;
        };
        let r = &self.rules[rule];
        let Some(captures) = r.members[member].regex().and_then(|regex| regex.captures(name)) else {
            return Outcome::Kept;
        };
        let expand = |replacement: &str| {
            let mut to = String::new();
            captures.expand(replacement, &mut to);
            to
        };
        match &r.action {
            Action::Skip => Outcome::Skipped { rule },
            Action::Rename(replacement) => Outcome::Renamed { to: expand(replacement), rule },
            Action::Split { targets, .. } => {
                Outcome::Split { to: targets.iter().map(|t| expand(t)).collect(), rule }
            }
            Action::Quantize { target, .. } => {
                let to = expand(target);
                let scales = format!("{to}{}", crate::fp8::SCALE_SUFFIX);
                Outcome::Split { to: vec![to, scales], rule }
            }
            Action::Cat { target, .. } | Action::Dequantize { target, .. } => Outcome::Member {
                to: expand(target),
                rule,
                member,
                key: captures.iter().skip(1).map(|c| c.map_or("", |c| c.as_str()).to_string()).collect(),
                index: None,
            },
            Action::Stack { target, index, .. } => {
                let text = |c: Option<regex::Match>| c.map_or("", |c| c.as_str()).to_string();
                Outcome::Member {
                    to: expand(target),
                    rule,
                    member,
                    key: (1..captures.len()).filter(|k| k != index).map(|k| text(captures.get(k))).collect(),
                    index: Some(text(captures.get(*index))),
                }
            }
            Action::Unstack { targets, .. } => Outcome::Unstack {
                parts: targets
                    .iter()
                    .map(|t| {
                        let (before, after) = t.split_once('*').unwrap_or((t, ""));
                        (expand(before), expand(after))
                    })
                    .collect(),
                rule,
            },
        }
    }
}

#[cfg(test)]
mod tests;
