//! Automatic matchers: which source entry goes to which target entry once the
//! rules have renamed and skipped (DESIGN.md, "Matchers").
//!
//! - `exact`: names equal;
//! - `auto`: exact, then the wrapper prefixes `module.` (DataParallel/DDP) and
//!   `_orig_mod.` (`torch.compile`) stripped on either side, then a unique
//!   dot-bounded suffix; more than one candidate is reported, never guessed;
//! - `order`: the two sequences aligned by (role, shape) — see [`align`].
use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use crate::store::Role;

/// Which automatic matcher pairs what the rules did not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Matcher {
    /// Names must be equal after the rules.
    Exact,
    /// Exact, then wrapper prefixes, then a unique dot-bounded suffix.
    #[default]
    Auto,
    /// Structural: registration order aligned by (role, shape).
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
#[serde(rename_all = "lowercase")]
pub enum How {
    /// Equal names.
    Exact,
    /// Equal once `module.` / `_orig_mod.` prefixes are stripped.
    Prefix,
    /// One name is a dot-bounded suffix of the other, and the only candidate.
    Suffix,
    /// Aligned by registration order, role and shape.
    Order,
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
            How::Plan => "plan file",
        })
    }
}

/// One side's entry as a matcher sees it.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// Name (after the rules, on the source side).
    pub name: &'a str,
    /// Parameter or buffer.
    pub role: Role,
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

/// What a matcher found: pairs `(source, target, how)` by index, and ambiguities.
#[derive(Debug, Default)]
pub struct Matches {
    /// Pairs by index into the source and target slices.
    pub pairs: Vec<(usize, usize, How)>,
    /// Entries with several equally good candidates.
    pub ambiguities: Vec<Ambiguity>,
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
/// explicit rules), which matchers leave alone.
pub fn run(
    matcher: Matcher,
    sources: &[Item],
    targets: &[Item],
    taken_source: &[bool],
    taken_target: &[bool],
) -> Matches {
    let mut free_source = taken_source.to_vec();
    let mut free_target = taken_target.to_vec();
    let mut out = Matches::default();
    match matcher {
        Matcher::Exact => exact(sources, targets, &mut free_source, &mut free_target, &mut out),
        Matcher::Auto => {
            exact(sources, targets, &mut free_source, &mut free_target, &mut out);
            by_key(
                sources,
                targets,
                &mut free_source,
                &mut free_target,
                &mut out,
                How::Prefix,
                strip_wrappers,
            );
            suffix(sources, targets, &mut free_source, &mut free_target, &mut out);
        }
        Matcher::Order => {
            let s: Vec<usize> = (0..sources.len()).filter(|&i| !free_source[i]).collect();
            let t: Vec<usize> = (0..targets.len()).filter(|&j| !free_target[j]).collect();
            let s_items: Vec<Item> = s.iter().map(|&i| sources[i]).collect();
            let t_items: Vec<Item> = t.iter().map(|&j| targets[j]).collect();
            let aligned = align(&s_items, &t_items);
            out.pairs.extend(aligned.pairs.into_iter().map(|(i, j, how)| (s[i], t[j], how)));
            out.ambiguities.extend(aligned.ambiguities.into_iter().map(|mut a| {
                let (mine, other) = if a.from_source { (&s, &t) } else { (&t, &s) };
                a.item = mine[a.item];
                a.candidates = a.candidates.iter().map(|&c| other[c]).collect();
                a
            }));
        }
    }
    out
}

fn exact(sources: &[Item], targets: &[Item], fs: &mut [bool], ft: &mut [bool], out: &mut Matches) {
    // Models of one architecture list the same names in the same order: pair
    // those without hashing. (Names are unique within a store, and renamed
    // duplicates were set aside as collisions, so an equal name at the same
    // index is the one exact match.)
    for (i, (s, t)) in sources.iter().zip(targets).enumerate() {
        if !fs[i] && !ft[i] && s.name == t.name {
            fs[i] = true;
            ft[i] = true;
            out.pairs.push((i, i, How::Exact));
        }
    }
    by_key(sources, targets, fs, ft, out, How::Exact, |n| n);
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

/// The similarity of two names with an equal leaf or an equal module path.
const NAME_EVIDENCE: u64 = 4;

/// How alike two names are: same module path, same leaf name, and module-path
/// segments equal at the same depth (`blocks.7.fc` and `layers.7.linear` share
/// the block number).
fn similarity(a: &str, b: &str) -> u64 {
    let (module_a, leaf_a) = a.rsplit_once('.').unwrap_or(("", a));
    let (module_b, leaf_b) = b.rsplit_once('.').unwrap_or(("", b));
    let same_depth = module_a.split('.').zip(module_b.split('.')).filter(|(x, y)| x == y).count() as u64;
    8 * u64::from(module_a == module_b) + 4 * u64::from(leaf_a == leaf_b) + same_depth.min(3)
}

/// Edits beyond which the order matcher stops diffing and solves one table.
const MAX_EDITS: usize = 4096;
/// Cells of a table the order matcher is willing to fill.
const MAX_CELLS: usize = 64_000_000;

/// Aligns two entry sequences by (role, shape) so that the most entries pair in
/// order (a longest common subsequence), ties broken by name similarity, then by
/// earliest position.
///
/// Fast when the sequences mostly agree: Myers' diff (O((n+m)·D)) gives the
/// length L of the longest alignment, and every alignment that long stays within
/// the diagonals `-(m-L) ..= n-L` of the table; the similarity tie-break is then
/// solved exactly in that band only, O((n+m)·D) cells. A pair chosen by position
/// over an equally similar alternative, with nothing in the names supporting it,
/// is reported as an ambiguity (and made).
pub fn align<'a>(sources: &[Item<'a>], targets: &[Item<'a>]) -> Matches {
    let mut ids: HashMap<(Role, &'a [i64]), u32> = HashMap::new();
    let mut token = |item: &Item<'a>| {
        let next = ids.len() as u32;
        *ids.entry((item.role, item.shape)).or_insert(next)
    };
    let a: Vec<u32> = sources.iter().map(&mut token).collect();
    let b: Vec<u32> = targets.iter().map(&mut token).collect();
    let (n, m) = (a.len() as isize, b.len() as isize);

    let mut out = Matches::default();
    let diagonal = myers(&a, &b, MAX_EDITS);
    let band = match &diagonal {
        Some(pairs) => (-(m - pairs.len() as isize), n - pairs.len() as isize),
        None => (-m, n),
    };
    let cells = (a.len() + 1).saturating_mul((band.1 - band.0 + 1) as usize);
    if cells <= MAX_CELLS {
        solve_band(sources, targets, &a, &b, band, &mut out);
    } else if let Some(pairs) = diagonal {
        out.pairs.extend(pairs.into_iter().map(|(i, j)| (i, j, How::Order)));
    }
    out
}

/// Myers' greedy diff: the matched positions of one longest common subsequence,
/// or `None` when more than `max_edits` insertions and deletions are needed.
fn myers(a: &[u32], b: &[u32], max_edits: usize) -> Option<Vec<(usize, usize)>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = ((n + m) as usize).min(max_edits) as isize;
    let offset = max + 1;
    let mut v = vec![0isize; (2 * max + 3) as usize];
    let mut trace: Vec<Vec<isize>> = Vec::new();
    let mut found = None;
    for d in 0..=max {
        let mut k = -d;
        while k <= d {
            let idx = (k + offset) as usize;
            let mut x =
                if k == -d || (k != d && v[idx - 1] < v[idx + 1]) { v[idx + 1] } else { v[idx - 1] + 1 };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[idx] = x;
            if x >= n && y >= m {
                found = Some(d);
                break;
            }
            k += 2;
        }
        trace.push(v[(offset - d) as usize..=(offset + d) as usize].to_vec());
        if found.is_some() {
            break;
        }
    }
    let d_final = found?;
    // Walk back from the end: each round's edit, preceded by its diagonal run.
    let mut pairs = Vec::new();
    let (mut x, mut y) = (n, m);
    for d in (1..=d_final).rev() {
        let prev = &trace[(d - 1) as usize];
        let at = |k: isize| prev[(k + d - 1) as usize];
        let k = x - y;
        let down = k == -d || (k != d && at(k - 1) < at(k + 1));
        let prev_k = if down { k + 1 } else { k - 1 };
        let prev_x = at(prev_k);
        let prev_y = prev_x - prev_k;
        let (mid_x, mid_y) = if down { (prev_x, prev_y + 1) } else { (prev_x + 1, prev_y) };
        while x > mid_x && y > mid_y {
            x -= 1;
            y -= 1;
            pairs.push((x as usize, y as usize));
        }
        x = prev_x;
        y = prev_y;
    }
    while x > 0 && y > 0 {
        x -= 1;
        y -= 1;
        pairs.push((x as usize, y as usize));
    }
    pairs.reverse();
    Some(pairs)
}

/// Exact alignment of `a` with `b` within the diagonals `klo ..= khi` (k = i - j):
/// most pairs, then most name similarity, then earliest positions. Appends the
/// pairs, and the ambiguities position alone decided, to `out`.
fn solve_band(
    sources: &[Item],
    targets: &[Item],
    a: &[u32],
    b: &[u32],
    (klo, khi): (isize, isize),
    out: &mut Matches,
) {
    const PAIR: u64 = 1 << 24;
    let (n, m) = (a.len() as isize, b.len() as isize);
    let width = (khi - klo + 1) as usize;
    // best(i, j): value of aligning a[i..] with b[j..]; 0 outside the band or the table.
    let mut best = vec![0u64; (a.len() + 1) * width];
    let cell = |i: isize, j: isize| -> Option<usize> {
        let k = i - j;
        (k >= klo && k <= khi && j >= 0 && j <= m && i <= n).then(|| i as usize * width + (k - klo) as usize)
    };
    let gain = |i: isize, j: isize| PAIR + similarity(sources[i as usize].name, targets[j as usize].name);
    let value = |best: &[u64], i: isize, j: isize| cell(i, j).map_or(0, |c| best[c]);
    for i in (0..n).rev() {
        for k in klo..=khi {
            let j = i - k;
            if j < 0 || j >= m {
                continue;
            }
            let mut v = value(&best, i + 1, j).max(value(&best, i, j + 1));
            if a[i as usize] == b[j as usize] {
                v = v.max(value(&best, i + 1, j + 1) + gain(i, j));
            }
            best[i as usize * width + (k - klo) as usize] = v;
        }
    }
    let (mut i, mut j) = (0isize, 0isize);
    let mut chosen: Vec<(usize, usize)> = Vec::new();
    while i < n && j < m {
        let Some(here) = cell(i, j).map(|c| best[c]) else { break };
        if here == 0 {
            break;
        }
        if a[i as usize] == b[j as usize] && here == value(&best, i + 1, j + 1) + gain(i, j) {
            chosen.push((i as usize, j as usize));
            i += 1;
            j += 1;
        } else if here == value(&best, i + 1, j) {
            i += 1;
        } else {
            j += 1;
        }
    }
    // A pair that nothing in its names supports (neither leaf nor module path
    // equal), with an equally similar alternative between its neighbours, was
    // chosen by position alone: reported, so a person can confirm it.
    let (rows, cols) = (a.len(), b.len());
    for (p, &(i, j)) in chosen.iter().enumerate() {
        let sim = similarity(sources[i].name, targets[j].name);
        if sim >= NAME_EVIDENCE {
            continue;
        }
        let (lo_i, lo_j) = if p == 0 { (0, 0) } else { (chosen[p - 1].0 + 1, chosen[p - 1].1 + 1) };
        let (hi_i, hi_j) = chosen.get(p + 1).copied().unwrap_or((rows, cols));
        let rival_sources: Vec<usize> = (lo_i..hi_i)
            .filter(|&x| x != i && a[x] == b[j] && similarity(sources[x].name, targets[j].name) == sim)
            .collect();
        if !rival_sources.is_empty() {
            let mut candidates = vec![i];
            candidates.extend(rival_sources);
            out.ambiguities.push(Ambiguity {
                item: j,
                from_source: false,
                candidates,
                how: How::Order,
                paired: true,
            });
        }
        let rival_targets: Vec<usize> = (lo_j..hi_j)
            .filter(|&y| y != j && a[i] == b[y] && similarity(sources[i].name, targets[y].name) == sim)
            .collect();
        if !rival_targets.is_empty() {
            let mut candidates = vec![j];
            candidates.extend(rival_targets);
            out.ambiguities.push(Ambiguity {
                item: i,
                from_source: true,
                candidates,
                how: How::Order,
                paired: true,
            });
        }
    }
    out.pairs.extend(chosen.into_iter().map(|(i, j)| (i, j, How::Order)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn item<'a>(name: &'a str, role: Role, shape: &'a [i64]) -> Item<'a> {
        Item { name, role, shape }
    }

    fn names<'a>(m: &Matches, s: &[Item<'a>], t: &[Item<'a>]) -> Vec<(&'a str, &'a str)> {
        let mut pairs: Vec<_> = m.pairs.iter().map(|&(i, j, _)| (s[i].name, t[j].name)).collect();
        pairs.sort();
        pairs
    }

    const P: Role = Role::Parameter;
    const B: Role = Role::Buffer;

    #[test]
    fn batchnorm_in_source_only_is_skipped_and_bias_pairs_with_bias() {
        // Sequential(Linear, BN, ReLU, Linear) -> Sequential(Linear, ReLU, Linear)
        let s = [
            item("0.weight", P, &[64, 32]),
            item("0.bias", P, &[64]),
            item("1.weight", P, &[64]),
            item("1.bias", P, &[64]),
            item("1.running_mean", B, &[64]),
            item("1.running_var", B, &[64]),
            item("1.num_batches_tracked", B, &[]),
            item("3.weight", P, &[10, 64]),
            item("3.bias", P, &[10]),
        ];
        let t = [
            item("0.weight", P, &[64, 32]),
            item("0.bias", P, &[64]),
            item("2.weight", P, &[10, 64]),
            item("2.bias", P, &[10]),
        ];
        let m = align(&s, &t);
        assert_eq!(
            names(&m, &s, &t),
            vec![
                ("0.bias", "0.bias"),
                ("0.weight", "0.weight"),
                ("3.bias", "2.bias"),
                ("3.weight", "2.weight")
            ]
        );
        assert!(m.ambiguities.is_empty(), "{:?}", m.ambiguities);
    }

    #[test]
    fn batchnorm_inserted_in_the_middle_of_a_long_model() {
        // 200 identical blocks, a BatchNorm only in the source's block 120.
        let mut s_names = Vec::new();
        let mut t_names = Vec::new();
        for b in 0..200 {
            for leaf in ["weight", "bias"] {
                s_names.push((format!("blocks.{b}.fc.{leaf}"), P));
                t_names.push((format!("layers.{b}.linear.{leaf}"), P));
            }
            if b == 120 {
                for (leaf, role) in [("weight", P), ("bias", P), ("running_mean", B), ("running_var", B)] {
                    s_names.push((format!("blocks.{b}.bn.{leaf}"), role));
                }
            }
        }
        let shape: &[i64] = &[64];
        let s: Vec<Item> = s_names.iter().map(|(n, r)| item(n, *r, shape)).collect();
        let t: Vec<Item> = t_names.iter().map(|(n, r)| item(n, *r, shape)).collect();
        let m = align(&s, &t);
        assert_eq!(m.pairs.len(), 400);
        assert!(m.ambiguities.is_empty(), "{:?}", m.ambiguities);
        for &(i, j, _) in &m.pairs {
            let (sb, tb) = (s[i].name.split('.').nth(1), t[j].name.split('.').nth(1));
            assert_eq!(sb, tb, "{} paired with {}", s[i].name, t[j].name);
            assert!(!s[i].name.contains(".bn."), "{} paired", s[i].name);
            assert_eq!(s[i].name.rsplit('.').next(), t[j].name.rsplit('.').next());
        }
    }

    #[test]
    fn unbreakable_ties_are_reported() {
        // Two same-shaped buffers in the source, one in the target, names unrelated.
        let s = [item("a.x", B, &[4]), item("b.y", B, &[4])];
        let t = [item("c.z", B, &[4])];
        let m = align(&s, &t);
        assert_eq!(m.pairs.len(), 1);
        assert_eq!(m.ambiguities.len(), 1);
        assert_eq!(m.ambiguities[0].candidates.len(), 2);
    }

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
        let m = run(Matcher::Auto, &s, &t, &none, &[false; 4]);
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
        let m = run(Matcher::Auto, &s, &t, &[false], &[false]);
        assert!(m.pairs.is_empty());
    }

    fn lcs_len(a: &[u32], b: &[u32]) -> usize {
        let mut dp = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                dp[i][j] = if a[i] == b[j] { dp[i + 1][j + 1] + 1 } else { dp[i + 1][j].max(dp[i][j + 1]) };
            }
        }
        dp[0][0]
    }

    proptest! {
        #[test]
        fn myers_finds_a_longest_common_subsequence(a in prop::collection::vec(0u32..4, 0..40), b in prop::collection::vec(0u32..4, 0..40)) {
            let pairs = myers(&a, &b, usize::MAX).unwrap();
            prop_assert_eq!(pairs.len(), lcs_len(&a, &b));
            for w in pairs.windows(2) {
                prop_assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1, "not monotonic: {:?}", pairs);
            }
            for &(i, j) in &pairs {
                prop_assert_eq!(a[i], b[j]);
            }
        }

        #[test]
        fn alignment_is_longest_monotonic_and_shape_equal(
            a in prop::collection::vec(0i64..3, 0..60),
            b in prop::collection::vec(0i64..3, 0..60),
        ) {
            let shapes: Vec<[i64; 1]> = (0..3).map(|d| [d]).collect();
            let s_names: Vec<String> = (0..a.len()).map(|i| format!("s.{i}")).collect();
            let t_names: Vec<String> = (0..b.len()).map(|i| format!("t.{i}")).collect();
            let s: Vec<Item> = a.iter().enumerate().map(|(i, &d)| item(&s_names[i], P, &shapes[d as usize])).collect();
            let t: Vec<Item> = b.iter().enumerate().map(|(i, &d)| item(&t_names[i], P, &shapes[d as usize])).collect();
            let m = align(&s, &t);
            let ua: Vec<u32> = a.iter().map(|&d| d as u32).collect();
            let ub: Vec<u32> = b.iter().map(|&d| d as u32).collect();
            prop_assert_eq!(m.pairs.len(), lcs_len(&ua, &ub));
            let mut pairs = m.pairs.clone();
            pairs.sort_by_key(|&(i, j, _)| (i, j));
            for w in pairs.windows(2) {
                prop_assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1, "not monotonic or paired twice");
            }
            for &(i, j, _) in &pairs {
                prop_assert_eq!(s[i].shape, t[j].shape);
            }
        }
    }
}
