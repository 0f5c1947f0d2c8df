//! Which pattern matches a name first, among many: each pattern's syntax is
//! checked when parsed (by `regex-syntax`, which is cheap), its regex compiled
//! only when a name could match it. Patterns that start with literal text
//! (`layer\.3\.`, most of a rules file) are indexed by it in a trie, so that a
//! name is tried only against the patterns whose text it starts with; the
//! others are tried through multi-pattern regexes of [`GROUP`] patterns each,
//! built on first use. Mapping `n` names over `r` rules costs about `n + r`
//! work and memory, not `n · r`.
use std::sync::OnceLock;

use regex::Regex;
use regex_automata::meta;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{Hir, HirKind};

/// Patterns without literal text in front, per multi-pattern regex.
const GROUP: usize = 256;
/// Without literal text in front, up to this many are tried one by one.
const ONE_BY_ONE: usize = 16;
/// Patterns longer than this, or with counted repetition, are compiled when
/// parsed, so that one too large for the regex engine is refused then.
const PLAIN_LEN: usize = 256;

/// One pattern: as written, what it captures, its regex once needed.
#[derive(Debug, Clone)]
pub(super) struct Pattern {
    text: String,
    /// Capture groups, with group 0 (the whole match).
    captures: usize,
    /// The named groups.
    names: Vec<String>,
    regex: OnceLock<Option<Regex>>,
}

/// `^(?:pattern)$`: a pattern matches the whole name.
pub(super) fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

fn capture_names(hir: &Hir, names: &mut Vec<String>) {
    match hir.kind() {
        HirKind::Capture(c) => {
            names.extend(c.name.as_deref().map(str::to_string));
            capture_names(&c.sub, names);
        }
        HirKind::Repetition(r) => capture_names(&r.sub, names),
        HirKind::Concat(subs) | HirKind::Alternation(subs) => {
            subs.iter().for_each(|s| capture_names(s, names));
        }
        _ => {}
    }
}

impl Pattern {
    /// Checks `text`'s syntax (and, for a long or counted pattern, that it
    /// compiles); the regex crate's message on failure.
    pub(super) fn new(text: &str) -> Result<(Self, Hir), String> {
        let hir = regex_syntax::Parser::new().parse(&anchored(text)).map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        capture_names(&hir, &mut names);
        let pattern = Pattern {
            text: text.to_string(),
            captures: hir.properties().explicit_captures_len() + 1,
            names,
            regex: OnceLock::new(),
        };
        if text.len() > PLAIN_LEN || text.contains('{') {
            let regex = Regex::new(&anchored(text)).map_err(|e| super::one_line(&e))?;
            let _ = pattern.regex.set(Some(regex));
        }
        Ok((pattern, hir))
    }

    /// The pattern as written.
    pub(super) fn text(&self) -> &str {
        &self.text
    }

    /// Capture groups, with group 0.
    pub(super) fn captures_len(&self) -> usize {
        self.captures
    }

    /// Whether `name` is a named group.
    pub(super) fn has_name(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Its regex, compiled on first use. (Its syntax was checked when parsed
    /// and a long or counted pattern compiled then, so this does not fail; if
    /// it did, the pattern would match nothing.)
    pub(super) fn regex(&self) -> Option<&Regex> {
        self.regex.get_or_init(|| Regex::new(&anchored(&self.text)).ok()).as_ref()
    }
}

/// A trie node: the patterns whose literal text ends here, and its children.
#[derive(Debug, Clone, Default)]
struct Node {
    ids: Vec<u32>,
    children: Vec<(u8, u32)>,
}

/// The index of every pattern of a list, for finding the first that matches.
#[derive(Debug, Clone, Default)]
pub(super) struct Index {
    trie: Vec<Node>,
    /// Patterns with no literal text in front, in order.
    rest: Vec<u32>,
    /// `rest` in groups of [`GROUP`], each one regex, built on first use.
    groups: Vec<OnceLock<Option<meta::Regex>>>,
}

impl Index {
    /// Adds pattern number `id` (ids are added in increasing order).
    pub(super) fn add(&mut self, id: usize, hir: &Hir) {
        let id = id as u32;
        let prefixes = Extractor::new().kind(ExtractKind::Prefix).extract(hir);
        match prefixes.literals() {
            Some(literals) if !literals.is_empty() && literals.iter().all(|l| !l.as_bytes().is_empty()) => {
                for literal in literals {
                    let node = self.node(literal.as_bytes());
                    if self.trie[node].ids.last() != Some(&id) {
                        self.trie[node].ids.push(id);
                    }
                }
            }
            _ => {
                if self.rest.len() % GROUP == 0 {
                    self.groups.push(OnceLock::new());
                }
                self.rest.push(id);
                // A group that grew is built again.
                if let Some(last) = self.groups.last_mut() {
                    *last = OnceLock::new();
                }
            }
        }
    }

    fn node(&mut self, bytes: &[u8]) -> usize {
        if self.trie.is_empty() {
            self.trie.push(Node::default());
        }
        let mut at = 0;
        for &b in bytes {
            at = match self.trie[at].children.binary_search_by_key(&b, |c| c.0) {
                Ok(k) => self.trie[at].children[k].1 as usize,
                Err(k) => {
                    let next = self.trie.len();
                    self.trie.push(Node::default());
                    self.trie[at].children.insert(k, (b, next as u32));
                    next
                }
            };
        }
        at
    }

    /// The first pattern (by id; `pattern` gives each) that matches `name`.
    pub(super) fn first<'p>(&self, pattern: impl Fn(usize) -> &'p Pattern, name: &str) -> Option<usize> {
        let is_match = |id: u32| pattern(id as usize).regex().is_some_and(|r| r.is_match(name));
        // Patterns whose literal text the name starts with.
        let mut candidates = Vec::new();
        let mut at = 0;
        if !self.trie.is_empty() {
            candidates.extend(&self.trie[0].ids);
            for &b in name.as_bytes() {
                match self.trie[at].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(k) => at = self.trie[at].children[k].1 as usize,
                    Err(_) => break,
                }
                candidates.extend(&self.trie[at].ids);
            }
        }
        candidates.sort_unstable();
        let best = candidates.into_iter().find(|&id| is_match(id)).unwrap_or(u32::MAX);
        // The others, those before `best` only: one by one if few, else a
        // group of them at a time (a group's match is its first pattern that
        // matches).
        let before = self.rest.partition_point(|&id| id < best);
        if before <= ONE_BY_ONE {
            if let Some(id) = self.rest[..before].iter().copied().find(|&id| is_match(id)) {
                return Some(id as usize);
            }
        } else {
            for (g, group) in self.rest.chunks(GROUP).enumerate().take(before.div_ceil(GROUP)) {
                let regex = self.groups[g].get_or_init(|| {
                    let texts: Vec<String> =
                        group.iter().map(|&id| anchored(pattern(id as usize).text())).collect();
                    meta::Regex::new_many(&texts).ok()
                });
                let found = match regex {
                    Some(regex) => regex.find(name).map(|m| group[m.pattern().as_usize()]),
                    None => group.iter().copied().find(|&id| is_match(id)),
                };
                if let Some(id) = found {
                    return Some(id.min(best) as usize);
                }
            }
        }
        (best != u32::MAX).then_some(best as usize)
    }
}
