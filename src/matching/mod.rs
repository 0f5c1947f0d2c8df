//! Automatic matchers: which source entry goes to which target entry once the
//! rules have renamed and skipped (DESIGN.md, "Matchers").
//!
//! - `exact`: names equal;
//! - `auto`: exact, then the wrapper prefixes `module.` (DataParallel/DDP) and
//!   `_orig_mod.` (`torch.compile`) stripped on either side, then a unique
//!   dot-bounded suffix; more than one candidate is reported, never guessed;
//! - `order`: modules aligned by their signatures, tensors paired inside aligned
//!   modules by leaf name — see [`order`].
//!
//! **The leaf invariant**: no matcher pairs two names whose leaves (last
//! dot-separated parts: `weight`, `bias`, `running_mean`) differ; only rules do.
//! Prefix stripping and dot-bounded suffixes keep the leaf; the order matcher
//! pairs by leaf inside modules.
mod align;
mod order;
mod tree;

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::dotted::NameLookup;
use crate::dtype::DtypeClass;
use crate::entry::Role;

/// Which automatic matcher pairs what the rules did not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Matcher {
    /// Names must be equal after the rules.
    Exact,
    /// Exact, then wrapper prefixes, then a unique dot-bounded suffix.
    #[default]
    Auto,
    /// Structural: modules aligned in registration order by signature, tensors
    /// paired inside them by leaf name.
    Order,
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Matcher::Exact => "exact",
            Matcher::Auto => "auto",
            Matcher::Order => "order",
        })
    }
}

/// How a matcher paired two entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum How {
    /// Equal names.
    Exact,
    /// Equal once `module.` / `_orig_mod.` prefixes are stripped.
    Prefix,
    /// One name is a dot-bounded suffix of the other, and the only candidate.
    Suffix,
    /// In a module aligned by registration order and signature.
    Order,
    /// In a module aligned on an order reconstructed from the names (the store
    /// keeps none), with nothing in the names supporting it.
    ReconstructedOrder,
    /// Read from a saved plan file.
    Plan,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            How::Exact => "exact",
            How::Prefix => "prefix",
            How::Suffix => "suffix",
            How::Order => "order",
            How::ReconstructedOrder => "order, reconstructed",
            How::Plan => "plan file",
        })
    }
}

/// How a side lists its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sequence {
    /// In the model's registration order (`state_dict()` order).
    #[default]
    Registration,
    /// In no known order: the order matcher reconstructs one from the names.
    Natural,
}

/// One side's entry as a matcher sees it.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// Name (after the rules, on the source side).
    pub name: &'a str,
    /// The store's own name (before the rules): what the natural order is made of.
    pub original: &'a str,
    /// Parameter or buffer.
    pub role: Role,
    /// Integer, floating, ...
    pub class: DtypeClass,
    /// Shape.
    pub shape: &'a [i64],
}

/// Two entries a matcher could not choose between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ambiguity {
    /// Index (into the slice given) of the entry that has several candidates.
    pub item: usize,
    /// Whether `item` is a source entry (else a target entry).
    pub from_source: bool,
    /// Indices of the candidates on the other side.
    pub candidates: Vec<usize>,
    /// Which matcher found them.
    pub how: How,
    /// Whether a pair was still made (by earliest position); else none was.
    pub paired: bool,
}

/// Why the order matcher left a module unpaired although the other side has
/// compatible ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unsure {
    /// Equally good alignments pair it differently.
    Tie,
    /// Its side has no registration order, and its signature occurs among
    /// siblings whose order is lost.
    PlaceUnknown,
}

/// A module the order matcher could not place, with its candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleAmbiguity {
    /// Whether `module` is on the source side.
    pub from_source: bool,
    /// The module path.
    pub module: String,
    /// Compatible modules of the other side it could be (the first few).
    pub candidates: Vec<String>,
    /// How many more candidates there are.
    pub more: usize,
    /// Why it was left unpaired.
    pub why: Unsure,
}

/// Two modules the order matcher aligned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleMatch {
    /// The source module's path (its own names, before the rules).
    pub source: String,
    /// The target module's path.
    pub target: String,
    /// [`How::Order`], or [`How::ReconstructedOrder`].
    pub how: How,
    /// Tensors paired inside it.
    pub tensors: usize,
}

/// What a matcher found: pairs `(source, target, how)` by index, and ambiguities.
#[derive(Debug, Default)]
pub struct Matches {
    /// Pairs by index into the source and target slices.
    pub pairs: Vec<(usize, usize, How)>,
    /// Entries with several equally good candidates.
    pub ambiguities: Vec<Ambiguity>,
    /// Modules the order matcher aligned.
    pub modules: Vec<ModuleMatch>,
    /// Modules the order matcher left unpaired for want of certainty.
    pub module_ambiguities: Vec<ModuleAmbiguity>,
    /// `(source modules, target modules)` when they differ too much to align.
    pub unaligned: Option<(usize, usize)>,
}

const WRAPPER_PREFIXES: [&str; 2] = ["module.", "_orig_mod."];

fn strip_wrappers(mut name: &str) -> &str {
    while let Some(rest) = WRAPPER_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) {
        name = rest;
    }
    name
}

/// Dot-bounded suffixes of a name, longest first: `a.b.c`, `b.c`, `c`.
fn suffixes(name: &str) -> impl Iterator<Item = &str> {
    std::iter::once(name).chain(name.match_indices('.').map(move |(i, _)| &name[i + 1..]))
}

/// Pairs `sources` with `targets`; `taken_*` marks entries already paired (by
/// explicit rules), which matchers leave alone; `sequences` says how each side
/// is ordered (only the order matcher reads it).
pub fn run(
    matcher: Matcher,
    sources: &[Item],
    targets: &[Item],
    taken_source: &[bool],
    taken_target: &[bool],
    sequences: (Sequence, Sequence),
) -> Matches {
    let mut taken_source = taken_source.to_vec();
    let mut taken_target = taken_target.to_vec();
    let mut out = Matches::default();
    match matcher {
        Matcher::Exact => exact(sources, targets, &mut taken_source, &mut taken_target, &mut out),
        Matcher::Auto => {
            exact(sources, targets, &mut taken_source, &mut taken_target, &mut out);
            by_key(
                sources,
                targets,
                &mut taken_source,
                &mut taken_target,
                &mut out,
                How::Prefix,
                strip_wrappers,
            );
            suffix(sources, targets, &mut taken_source, &mut taken_target, &mut out);
        }
        Matcher::Order => order::run(sources, targets, &taken_source, &taken_target, sequences, &mut out),
    }
    out
}

/// Pairs equal names. (Names are unique within a store, and renamed duplicates
/// were set aside as collisions, so a name has one exact match at most.)
fn exact(sources: &[Item], targets: &[Item], fs: &mut [bool], ft: &mut [bool], out: &mut Matches) {
    if !fs.contains(&false) || !ft.contains(&false) {
        return;
    }
    let lookup = NameLookup::new(targets.iter().map(|t| t.name));
    for (i, s) in sources.iter().enumerate() {
        if fs[i] {
            continue;
        }
        if let Some(j) = lookup.find(s.name, i).filter(|&j| !ft[j]) {
            fs[i] = true;
            ft[j] = true;
            out.pairs.push((i, j, How::Exact));
        }
    }
}

/// Pairs entries whose `key(name)` is equal and unique on both sides.
fn by_key<'a>(
    sources: &[Item<'a>],
    targets: &[Item<'a>],
    taken_source: &mut [bool],
    taken_target: &mut [bool],
    out: &mut Matches,
    how: How,
    key: impl Fn(&'a str) -> &'a str,
) {
    let free = |taken: &[bool]| taken.iter().filter(|t| !**t).count();
    if free(taken_source) == 0 || free(taken_target) == 0 {
        return;
    }
    // key -> (first index, how many): no allocation per name.
    let mut by_name: HashMap<&str, (usize, usize)> = HashMap::with_capacity(free(taken_target));
    for (j, t) in targets.iter().enumerate().filter(|(j, _)| !taken_target[*j]) {
        by_name.entry(key(t.name)).or_insert((j, 0)).1 += 1;
    }
    let mut sources_by_key: HashMap<&str, (usize, usize)> = HashMap::with_capacity(free(taken_source));
    for (i, s) in sources.iter().enumerate().filter(|(i, _)| !taken_source[*i]) {
        sources_by_key.entry(key(s.name)).or_insert((i, 0)).1 += 1;
    }
    for (i, s) in sources.iter().enumerate() {
        if taken_source[i] {
            continue;
        }
        let k = key(s.name);
        let Some(&(first_target, targets_with_key)) = by_name.get(k) else { continue };
        let (first_source, sources_with_key) = sources_by_key[k];
        if targets_with_key == 1 && sources_with_key == 1 {
            taken_source[i] = true;
            taken_target[first_target] = true;
            out.pairs.push((i, first_target, how));
        } else if first_source == i {
            // Report once per key: the first source and every target candidate.
            let candidates = (first_target..targets.len())
                .filter(|&j| !taken_target[j] && key(targets[j].name) == k)
                .collect();
            out.ambiguities.push(Ambiguity { item: i, from_source: true, candidates, how, paired: false });
        }
    }
}

/// Pairs a source and a target when one name is a dot-bounded suffix of the
/// other and each is the other's only such candidate.
fn suffix(
    sources: &[Item],
    targets: &[Item],
    taken_source: &mut [bool],
    taken_target: &mut [bool],
    out: &mut Matches,
) {
    let free_targets: Vec<usize> = (0..targets.len()).filter(|&j| !taken_target[j]).collect();
    let mut by_full: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut by_suffix: HashMap<&str, Vec<usize>> = HashMap::new();
    for &j in &free_targets {
        let name = strip_wrappers(targets[j].name);
        by_full.entry(name).or_default().push(j);
        for tail in suffixes(name).skip(1) {
            by_suffix.entry(tail).or_default().push(j);
        }
    }
    // Candidates of each free source.
    let mut candidates_of: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        if taken_source[i] {
            continue;
        }
        let name = strip_wrappers(s.name);
        let mut candidates: Vec<usize> =
            suffixes(name).skip(1).filter_map(|tail| by_full.get(tail)).flatten().copied().collect();
        if let Some(longer) = by_suffix.get(name) {
            candidates.extend(longer);
        }
        candidates.sort_unstable();
        candidates.dedup();
        if !candidates.is_empty() {
            candidates_of.push((i, candidates));
        }
    }
    // A target claimed by several sources is ambiguous for all of them.
    let mut claims: HashMap<usize, usize> = HashMap::new();
    for (_, candidates) in &candidates_of {
        for &j in candidates {
            *claims.entry(j).or_default() += 1;
        }
    }
    for (i, candidates) in candidates_of {
        if candidates.len() == 1 && claims[&candidates[0]] == 1 {
            taken_source[i] = true;
            taken_target[candidates[0]] = true;
            out.pairs.push((i, candidates[0], How::Suffix));
        } else {
            out.ambiguities.push(Ambiguity {
                item: i,
                from_source: true,
                candidates,
                how: How::Suffix,
                paired: false,
            });
        }
    }
}

#[cfg(test)]
mod order_cases;
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item<'a>(name: &'a str, role: Role, shape: &'a [i64]) -> Item<'a> {
        Item { name, original: name, role, class: DtypeClass::Floating, shape }
    }

    fn names<'a>(m: &Matches, s: &[Item<'a>], t: &[Item<'a>]) -> Vec<(&'a str, &'a str)> {
        let mut pairs: Vec<_> = m.pairs.iter().map(|&(i, j, _)| (s[i].name, t[j].name)).collect();
        pairs.sort();
        pairs
    }

    const P: Role = Role::Parameter;

    #[test]
    fn auto_strips_wrappers_then_matches_unique_suffixes() {
        let s = [
            item("module.conv.weight", P, &[1]),
            item("_orig_mod.module.fc.bias", P, &[1]),
            item("backbone.layer1.0.conv1.weight", P, &[1]),
            item("x.head.weight", P, &[1]),
            item("y.head.weight", P, &[1]),
        ];
        let t = [
            item("conv.weight", P, &[1]),
            item("fc.bias", P, &[1]),
            item("layer1.0.conv1.weight", P, &[1]),
            item("head.weight", P, &[1]),
        ];
        let none = vec![false; s.len()];
        let m = run(Matcher::Auto, &s, &t, &none, &[false; 4], Default::default());
        assert_eq!(
            names(&m, &s, &t),
            vec![
                ("_orig_mod.module.fc.bias", "fc.bias"),
                ("backbone.layer1.0.conv1.weight", "layer1.0.conv1.weight"),
                ("module.conv.weight", "conv.weight"),
            ]
        );
        assert_eq!(m.ambiguities.len(), 2, "both x.head and y.head claim head.weight: {:?}", m.ambiguities);
        assert!(m.ambiguities.iter().all(|a| !a.paired && a.how == How::Suffix));
    }

    #[test]
    fn suffix_must_be_dot_bounded() {
        let s = [item("encoder.xweight", P, &[1])];
        let t = [item("weight", P, &[1])];
        let m = run(Matcher::Auto, &s, &t, &[false], &[false], Default::default());
        assert!(m.pairs.is_empty());
    }

    const LEAVES: [&str; 5] = ["weight", "bias", "running_mean", "running_var", "in_proj_weight"];
    const PARTS: [&str; 6] = ["0", "1", "conv", "module", "_orig_mod", "bn"];

    fn random_name() -> impl Strategy<Value = String> {
        (prop::collection::vec(prop::sample::select(&PARTS[..]), 0..4), prop::sample::select(&LEAVES[..]))
            .prop_map(|(path, leaf)| path.into_iter().chain([leaf]).collect::<Vec<_>>().join("."))
    }

    proptest! {
        /// The leaf invariant: whatever the names, shapes and matcher, no pair
        /// joins two different leaves.
        #[test]
        fn no_matcher_pairs_different_leaves(
            s_names in prop::collection::hash_set(random_name(), 0..30),
            t_names in prop::collection::hash_set(random_name(), 0..30),
            natural in any::<(bool, bool)>(),
        ) {
            let (s_names, t_names): (Vec<String>, Vec<String>) = (s_names.into_iter().collect(), t_names.into_iter().collect());
            let shape: &[i64] = &[4];
            let s: Vec<Item> = s_names.iter().map(|n| item(n, P, shape)).collect();
            let t: Vec<Item> = t_names.iter().map(|n| item(n, P, shape)).collect();
            let sequence = |n: bool| if n { Sequence::Natural } else { Sequence::Registration };
            for matcher in [Matcher::Exact, Matcher::Auto, Matcher::Order] {
                let m = run(matcher, &s, &t, &vec![false; s.len()], &vec![false; t.len()], (sequence(natural.0), sequence(natural.1)));
                for &(i, j, _) in &m.pairs {
                    prop_assert_eq!(crate::dotted::leaf(s[i].name), crate::dotted::leaf(t[j].name), "{} paired with {} by {}", s[i].name, t[j].name, matcher);
                }
            }
        }
    }
}
