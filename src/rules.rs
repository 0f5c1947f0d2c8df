//! The rename/skip rule language (DESIGN.md, "The rule language").
//!
//! ```text
//! # comment
//! backbone\.(.*)            => encoder.$1
//! skip   head\..*
//! ```
//!
//! A pattern matches the **whole** source name; the replacement is the whole
//! target name (`$1`, `${name}`). Rules are tried in order and the first that
//! matches decides; a name no rule matches keeps its name. Every rule is compiled
//! when parsed (a bad pattern is an error naming where the rule came from), and
//! the first rule that matches a name is found by one regex of all patterns
//! (built on first use; tried one by one if too large), so mapping many names
//! stays cheap.
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;
use regex_automata::meta;
use serde::Serialize;

use crate::error::{Error, Result};

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
    /// A `--map` / `--skip` flag (the n-th, from 1).
    Flag {
        /// `--map` or `--skip`.
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
    /// Rename to this replacement (`$1`, `${name}` expanded).
    Rename(String),
    /// Leave the name out of the transfer.
    Skip,
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The pattern as written.
    pub pattern: String,
    /// What it does.
    pub action: Action,
    /// Where it was written.
    pub source: RuleSource,
    regex: Regex,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            Action::Rename(replacement) => write!(f, "{} => {}", self.pattern, replacement),
            Action::Skip => write!(f, "skip {}", self.pattern),
        }
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
    /// All patterns in one regex, built on first use; a match's pattern id is the
    /// first rule that matches. `None` inside if too large to build: then the
    /// rules are tried one by one.
    first: OnceLock<Option<meta::Regex>>,
    flags: [usize; 2],
}

/// The regex crate's error in one line (its syntax errors draw a caret diagram).
fn one_line(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(text)
            .trim()
            .trim_start_matches("error: ")
            .to_string(),
        other => other.to_string(),
    }
}

fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
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
        let mut rules = Self::new();
        for (index, line) in text.lines().enumerate() {
            let source = RuleSource::File { file: file.to_string(), line: index + 1 };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            rules.push_line(line, source)?;
        }
        Ok(rules)
    }

    /// Reads and parses a rules file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::files::read_bounded(path, MAX_RULES_BYTES, "rules file")?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Rule { at: path.display().to_string(), message: "not UTF-8 text".into() })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn push_line(&mut self, line: &str, source: RuleSource) -> Result<()> {
        if let Some((pattern, replacement)) = line.split_once("=>") {
            return self.push(pattern.trim(), Action::Rename(replacement.trim().to_string()), source);
        }
        let mut words = line.splitn(2, char::is_whitespace);
        match (words.next(), words.next()) {
            (Some("skip"), Some(pattern)) => self.push(pattern.trim(), Action::Skip, source),
            (Some("skip"), None) => {
                Err(Error::Rule { at: source.to_string(), message: "`skip` needs a pattern".into() })
            }
            _ => Err(Error::Rule {
                at: source.to_string(),
                message: format!("cannot read {line:?}: expected `PATTERN => REPLACEMENT` or `skip PATTERN`"),
            }),
        }
    }

    /// Adds a `--map 'PATTERN=>REPLACEMENT'` rule.
    pub fn add_map(&mut self, spec: &str) -> Result<()> {
        self.flags[0] += 1;
        let source = RuleSource::Flag { flag: "--map", index: self.flags[0] };
        let Some((pattern, replacement)) = spec.split_once("=>") else {
            return Err(Error::Rule {
                at: source.to_string(),
                message: format!("{spec:?} is not of the form PATTERN=>REPLACEMENT"),
            });
        };
        self.push(pattern.trim(), Action::Rename(replacement.trim().to_string()), source)
    }

    /// Adds a `--skip PATTERN` rule.
    pub fn add_skip(&mut self, pattern: &str) -> Result<()> {
        self.flags[1] += 1;
        let source = RuleSource::Flag { flag: "--skip", index: self.flags[1] };
        self.push(pattern.trim(), Action::Skip, source)
    }

    /// Adds one rule after the others.
    pub fn push(&mut self, pattern: &str, action: Action, source: RuleSource) -> Result<()> {
        if pattern.is_empty() {
            return Err(Error::Rule { at: source.to_string(), message: "empty pattern".into() });
        }
        if pattern.contains(char::is_whitespace) {
            let first = pattern.split_whitespace().next().unwrap_or_default();
            return Err(Error::Rule {
                at: source.to_string(),
                message: format!(
                    "pattern {pattern:?} contains a space, which no tensor name has \
                     (`{first}` is not a keyword: rules are `PATTERN => REPLACEMENT` or `skip PATTERN`)"
                ),
            });
        }
        let regex = Regex::new(&anchored(pattern)).map_err(|e| Error::Rule {
            at: source.to_string(),
            message: format!("bad pattern {pattern:?}: {}", one_line(&e)),
        })?;
        if let Action::Rename(replacement) = &action {
            if replacement.is_empty() {
                return Err(Error::Rule { at: source.to_string(), message: "empty replacement".into() });
            }
            let names: Vec<&str> = regex.capture_names().flatten().collect();
            for group in group_references(replacement) {
                let known = match group.parse::<usize>() {
                    Ok(n) => n < regex.captures_len(),
                    Err(_) => names.contains(&group.as_str()),
                };
                if !known {
                    return Err(Error::Rule {
                        at: source.to_string(),
                        message: format!("replacement {replacement:?} refers to ${group}, which {pattern:?} does not capture"),
                    });
                }
            }
        }
        self.rules.push(Rule { pattern: pattern.to_string(), action, source, regex });
        self.first = OnceLock::new();
        Ok(())
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What the first matching rule does to `name`.
    pub fn apply(&self, name: &str) -> Outcome {
        let first = self.first.get_or_init(|| {
            let patterns: Vec<String> = self.rules.iter().map(|r| anchored(&r.pattern)).collect();
            meta::Regex::new_many(&patterns).ok()
        });
        let rule = match first {
            Some(first) => first.find(name).map(|m| m.pattern().as_usize()),
            None => self.rules.iter().position(|r| r.regex.is_match(name)),
        };
        let Some(rule) = rule else { return Outcome::Kept };
        match &self.rules[rule].action {
            Action::Skip => Outcome::Skipped { rule },
            Action::Rename(replacement) => {
                let mut to = String::new();
                if let Some(captures) = self.rules[rule].regex.captures(name) {
                    captures.expand(replacement, &mut to);
                }
                Outcome::Renamed { to, rule }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Rules {
        Rules::parse(text, "rules.txt").unwrap()
    }

    fn error(text: &str) -> String {
        Rules::parse(text, "rules.txt").unwrap_err().to_string()
    }

    #[test]
    fn renames_with_groups_and_skips() {
        let r = rules(
            "# comment\n\nbackbone\\.(.*) => encoder.$1\nblocks\\.(\\d+)\\.attn\\.qkv\\.(weight|bias) => layers.$1.attention.in_proj_$2\nskip   head\\..*\n(?P<m>.*)\\.gamma => ${m}.weight\n",
        );
        assert_eq!(r.rules().len(), 4);
        assert_eq!(
            r.apply("backbone.layer1.0.conv1.weight"),
            Outcome::Renamed { to: "encoder.layer1.0.conv1.weight".into(), rule: 0 }
        );
        assert_eq!(
            r.apply("blocks.11.attn.qkv.bias"),
            Outcome::Renamed { to: "layers.11.attention.in_proj_bias".into(), rule: 1 }
        );
        assert_eq!(r.apply("head.fc.weight"), Outcome::Skipped { rule: 2 });
        assert_eq!(r.apply("norm.gamma"), Outcome::Renamed { to: "norm.weight".into(), rule: 3 });
        assert_eq!(r.apply("stem.weight"), Outcome::Kept);
    }

    #[test]
    fn patterns_match_the_whole_name() {
        let r = rules("conv => c\n");
        assert_eq!(r.apply("conv1"), Outcome::Kept);
        assert_eq!(r.apply("a.conv"), Outcome::Kept);
        assert_eq!(r.apply("conv"), Outcome::Renamed { to: "c".into(), rule: 0 });
    }

    #[test]
    fn first_matching_rule_decides() {
        let r = rules("skip a\\.x\na\\.(.*) => b.$1\n");
        assert_eq!(r.apply("a.x"), Outcome::Skipped { rule: 0 });
        assert_eq!(r.apply("a.y"), Outcome::Renamed { to: "b.y".into(), rule: 1 });
    }

    #[test]
    fn bad_rules_name_file_and_line() {
        let message = error("ok => fine\nbad( => x\n");
        assert!(message.contains("rules.txt:2") && message.contains("bad pattern"), "{message}");
        let message = error("frobnicate head.*\n");
        assert!(message.contains("rules.txt:1") && message.contains("expected"), "{message}");
        let message = error("rename features => x\n");
        assert!(
            message.contains("rules.txt:1") && message.contains("`rename` is not a keyword"),
            "{message}"
        );
        let message = error("bad( => x\n");
        assert!(!message.contains('\n') && message.contains("unclosed group"), "{message}");
        assert!(error(" => x\n").contains("empty pattern"));
        assert!(error("skip\n").contains("needs a pattern"));
        assert!(error("a => \n").contains("empty replacement"));
        let message = error("a\\.(.*) => b.$2\n");
        assert!(message.contains("$2"), "{message}");
        assert!(error("a => ${nope}\n").contains("nope"));
    }

    #[test]
    fn flags_are_named_in_errors() {
        let mut r = Rules::new();
        r.add_map("x=>y").unwrap();
        let message = r.add_map("no arrow").unwrap_err().to_string();
        assert!(message.contains("--map #2"), "{message}");
        let message = r.add_skip("(").unwrap_err().to_string();
        assert!(message.contains("--skip #1"), "{message}");
    }

    #[test]
    fn dollar_dollar_is_a_literal() {
        let r = rules("a => b$$c\n");
        assert_eq!(r.apply("a"), Outcome::Renamed { to: "b$c".into(), rule: 0 });
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn dotted_name() -> impl Strategy<Value = String> {
            prop::collection::vec("[a-z_][a-z0-9_]{0,6}|[0-9]{1,3}", 1..6).prop_map(|parts| parts.join("."))
        }

        proptest! {
            #[test]
            fn parsing_never_panics(text in "\\PC{0,200}") {
                let _ = Rules::parse(&text, "fuzz.txt");
            }

            #[test]
            fn an_escaped_name_matches_exactly_that_name(name in dotted_name(), other in dotted_name()) {
                let rules = Rules::parse(&format!("{} => renamed\n", regex::escape(&name)), "r").unwrap();
                prop_assert_eq!(rules.apply(&name), Outcome::Renamed { to: "renamed".into(), rule: 0 });
                if other != name {
                    prop_assert_eq!(rules.apply(&other), Outcome::Kept);
                }
            }

            #[test]
            fn a_prefix_rule_moves_every_name_under_it(prefix in "[a-z]{1,8}", name in dotted_name()) {
                let rules = Rules::parse(&format!("{prefix}\\.(.*) => moved.$1\n"), "r").unwrap();
                let outcome = rules.apply(&format!("{prefix}.{name}"));
                prop_assert_eq!(outcome, Outcome::Renamed { to: format!("moved.{name}"), rule: 0 });
            }

            #[test]
            fn the_first_matching_rule_decides(name in dotted_name(), n in 1usize..6) {
                let text: String = (0..n).map(|i| format!("(.*) => r{i}.$1\n")).collect();
                let rules = Rules::parse(&text, "r").unwrap();
                prop_assert_eq!(rules.apply(&name), Outcome::Renamed { to: format!("r0.{name}"), rule: 0 });
            }
        }
    }
}
