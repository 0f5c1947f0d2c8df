//! Aligning two token sequences: the most equal tokens paired in order (a
//! longest common subsequence), ties broken by a gain per pair, and — the part
//! that keeps the order matcher honest — which of the chosen pairs *every* best
//! alignment makes. A pair that some equally good alignment does not make was
//! chosen by position alone; the order matcher leaves it unpaired.
//!
//! Fast when the sequences mostly agree: Myers' diff (O((n+m)·D)) gives the
//! length L of the longest alignment, and every alignment that long stays within
//! the diagonals `-(m-L) ..= n-L`; the tie-break and the certainty are then
//! solved exactly in that band only.

/// Edits beyond which the band is not narrowed by Myers' diff.
const MAX_EDITS: usize = 4096;
/// Cells of one table the aligner is willing to fill (two tables of `u64`).
const MAX_CELLS: usize = 8_000_000;
/// The value of one pair; gains from names only break ties between alignments
/// with as many pairs.
const PAIR: u64 = 1 << 24;

/// What [`align`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Alignment {
    /// Pairs `(i, j)` that every best alignment makes, in order.
    pub certain: Vec<(usize, usize)>,
    /// Each `i` that some best alignment pairs but not every one the same way,
    /// with every `j` a best alignment pairs it with.
    pub uncertain: Vec<(usize, Vec<usize>)>,
    /// The sequences differ too much to be aligned within the memory allowed.
    pub gave_up: bool,
    /// How many pairs a best alignment makes (a longest common subsequence's
    /// length).
    pub length: usize,
}

/// Aligns `a` with `b` (equal tokens pair); `gain(i, j)` (small: below 2^24)
/// breaks ties between alignments with as many pairs.
pub fn align(a: &[u32], b: &[u32], gain: impl Fn(usize, usize) -> u64) -> Alignment {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let band = match myers_length(a, b, MAX_EDITS) {
        Some(l) => (-(m - l as isize), n - l as isize),
        None => (-m, n),
    };
    let width = (band.1 - band.0 + 1) as usize;
    if (a.len() + 1).saturating_mul(width) > MAX_CELLS {
        return Alignment { gave_up: true, ..Alignment::default() };
    }
    Band::new(a, b, band, &gain).solve()
}

/// Length of a longest common subsequence by Myers' greedy diff, or `None` when
/// more than `max_edits` insertions and deletions are needed.
fn myers_length(a: &[u32], b: &[u32], max_edits: usize) -> Option<usize> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = ((n + m) as usize).min(max_edits) as isize;
    let offset = max + 1;
    let mut v = vec![0isize; (2 * max + 3) as usize];
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
                // d edits = deletions + insertions = (n - L) + (m - L).
                return Some(((n + m - d) / 2) as usize);
            }
            k += 2;
        }
    }
    None
}

/// The two dynamic-programming tables over the band of diagonals `lo ..= hi`
/// (`k = i - j`): `after(i, j)` is the best value of aligning `a[i..]` with
/// `b[j..]`, `before(i, j)` that of `a[..i]` with `b[..j]`. Cells outside the
/// band count 0: that underestimates only paths that leave the band, and no best
/// alignment does.
struct Band<'a, G> {
    a: &'a [u32],
    b: &'a [u32],
    lo: isize,
    hi: isize,
    width: usize,
    gain: &'a G,
    after: Vec<u64>,
    before: Vec<u64>,
}

impl<'a, G: Fn(usize, usize) -> u64> Band<'a, G> {
    fn new(a: &'a [u32], b: &'a [u32], (lo, hi): (isize, isize), gain: &'a G) -> Self {
        let width = (hi - lo + 1) as usize;
        let cells = (a.len() + 1) * width;
        Band { a, b, lo, hi, width, gain, after: vec![0; cells], before: vec![0; cells] }
    }

    fn cell(&self, i: isize, j: isize) -> Option<usize> {
        let k = i - j;
        let inside = k >= self.lo
            && k <= self.hi
            && i >= 0
            && j >= 0
            && i <= self.a.len() as isize
            && j <= self.b.len() as isize;
        inside.then(|| i as usize * self.width + (k - self.lo) as usize)
    }

    fn value(table: &[u64], cell: Option<usize>) -> u64 {
        cell.map_or(0, |c| table[c])
    }

    fn equal(&self, i: isize, j: isize) -> bool {
        self.a[i as usize] == self.b[j as usize]
    }

    fn pair_gain(&self, i: isize, j: isize) -> u64 {
        PAIR + (self.gain)(i as usize, j as usize).min(PAIR - 1)
    }

    fn fill(&mut self) {
        let (n, m) = (self.a.len() as isize, self.b.len() as isize);
        for i in (0..n).rev() {
            for k in self.lo..=self.hi {
                let j = i - k;
                if j < 0 || j >= m {
                    continue;
                }
                let mut v = Self::value(&self.after, self.cell(i + 1, j))
                    .max(Self::value(&self.after, self.cell(i, j + 1)));
                if self.equal(i, j) {
                    v = v.max(Self::value(&self.after, self.cell(i + 1, j + 1)) + self.pair_gain(i, j));
                }
                self.after[i as usize * self.width + (k - self.lo) as usize] = v;
            }
        }
        for i in 1..=n {
            // Increasing j within a row: `before(i, j - 1)` is needed first.
            for k in (self.lo..=self.hi).rev() {
                let j = i - k;
                if j < 1 || j > m {
                    continue;
                }
                let mut v = Self::value(&self.before, self.cell(i - 1, j))
                    .max(Self::value(&self.before, self.cell(i, j - 1)));
                if self.equal(i - 1, j - 1) {
                    v = v.max(
                        Self::value(&self.before, self.cell(i - 1, j - 1)) + self.pair_gain(i - 1, j - 1),
                    );
                }
                self.before[i as usize * self.width + (k - self.lo) as usize] = v;
            }
        }
    }

    /// One best alignment: from the start, pair where pairing keeps the best
    /// value, else skip in `a`, else in `b`.
    fn trace(&self) -> Vec<(usize, usize)> {
        let (n, m) = (self.a.len() as isize, self.b.len() as isize);
        let (mut i, mut j) = (0isize, 0isize);
        let mut chosen = Vec::new();
        while i < n && j < m {
            let here = Self::value(&self.after, self.cell(i, j));
            if here == 0 {
                break;
            }
            if self.equal(i, j)
                && here == Self::value(&self.after, self.cell(i + 1, j + 1)) + self.pair_gain(i, j)
            {
                chosen.push((i as usize, j as usize));
                i += 1;
                j += 1;
            } else if here == Self::value(&self.after, self.cell(i + 1, j)) {
                i += 1;
            } else {
                j += 1;
            }
        }
        chosen
    }

    /// Every pair that some best alignment makes.
    fn optimal_pairs(&self) -> Vec<(usize, usize)> {
        let best = Self::value(&self.after, self.cell(0, 0));
        let (n, m) = (self.a.len() as isize, self.b.len() as isize);
        let mut out = Vec::new();
        for i in 0..n {
            for k in self.lo..=self.hi {
                let j = i - k;
                if j < 0 || j >= m || !self.equal(i, j) {
                    continue;
                }
                let through = Self::value(&self.before, self.cell(i, j))
                    + self.pair_gain(i, j)
                    + Self::value(&self.after, self.cell(i + 1, j + 1));
                if through == best {
                    out.push((i as usize, j as usize));
                }
            }
        }
        out
    }

    fn solve(mut self) -> Alignment {
        self.fill();
        let chosen = self.trace();
        let optimal = self.optimal_pairs();
        // A chosen pair is made by every best alignment unless another pair of
        // some best alignment conflicts with it (shares a side or crosses it):
        // an alignment without the pair must hold such a pair, or adding the
        // pair would make it better. The chosen pairs a pair conflicts with are
        // a run of the chain: those not wholly before it nor wholly after it.
        let mut conflicts = vec![0i64; chosen.len() + 1];
        for &(x, y) in &optimal {
            if chosen.binary_search(&(x, y)).is_ok() {
                continue;
            }
            let start = chosen.partition_point(|&(i, j)| i < x && j < y);
            let end = chosen.partition_point(|&(i, j)| !(i > x && j > y));
            if start < end {
                conflicts[start] += 1;
                conflicts[end] -= 1;
            }
        }
        let mut certain = Vec::with_capacity(chosen.len());
        let mut running = 0;
        for (p, &pair) in chosen.iter().enumerate() {
            running += conflicts[p];
            if running == 0 {
                certain.push(pair);
            }
        }
        let mut uncertain: Vec<(usize, Vec<usize>)> = Vec::new();
        for &(i, j) in &optimal {
            if certain.binary_search(&(i, j)).is_ok() {
                continue;
            }
            match uncertain.last_mut() {
                Some((last, candidates)) if *last == i => candidates.push(j),
                _ => uncertain.push((i, vec![j])),
            }
        }
        for (_, candidates) in &mut uncertain {
            candidates.sort_unstable();
        }
        Alignment { certain, uncertain, gave_up: false, length: chosen.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lcs_len(a: &[u32], b: &[u32]) -> usize {
        let mut dp = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                dp[i][j] = if a[i] == b[j] { dp[i + 1][j + 1] + 1 } else { dp[i + 1][j].max(dp[i][j + 1]) };
            }
        }
        dp[0][0]
    }

    /// Every longest alignment, by brute force (small inputs only).
    fn all_longest(a: &[u32], b: &[u32]) -> Vec<Vec<(usize, usize)>> {
        fn walk(
            a: &[u32],
            b: &[u32],
            i: usize,
            j: usize,
            path: &mut Vec<(usize, usize)>,
            out: &mut Vec<Vec<(usize, usize)>>,
        ) {
            out.push(path.clone());
            for x in i..a.len() {
                for y in j..b.len() {
                    if a[x] == b[y] {
                        path.push((x, y));
                        walk(a, b, x + 1, y + 1, path, out);
                        path.pop();
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(a, b, 0, 0, &mut Vec::new(), &mut out);
        let longest = out.iter().map(Vec::len).max().unwrap_or(0);
        out.retain(|p| p.len() == longest);
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn one_of_two_equal_tokens_is_uncertain() {
        let got = align(&[1, 1], &[1], |_, _| 0);
        assert!(got.certain.is_empty());
        assert_eq!(got.uncertain, vec![(0, vec![0]), (1, vec![0])]);
    }

    #[test]
    fn gains_decide_ties() {
        let got = align(&[1, 1], &[1], |i, _| i as u64);
        assert_eq!(got.certain, vec![(1, 0)]);
        assert!(got.uncertain.is_empty());
    }

    #[test]
    fn an_inserted_distinct_token_keeps_everything_certain() {
        let got = align(&[1, 2, 3, 4], &[1, 2, 9, 3, 4], |_, _| 0);
        assert_eq!(got.certain, vec![(0, 0), (1, 1), (2, 3), (3, 4)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Certain pairs are exactly those every longest alignment makes; the
        /// uncertain ones are the others that some longest alignment makes.
        #[test]
        fn certain_means_in_every_longest_alignment(
            a in prop::collection::vec(0u32..3, 0..7),
            b in prop::collection::vec(0u32..3, 0..7),
        ) {
            let got = align(&a, &b, |_, _| 0);
            let all = all_longest(&a, &b);
            let mut in_every: Vec<(usize, usize)> = all[0].iter().copied().filter(|p| all.iter().all(|x| x.contains(p))).collect();
            in_every.sort();
            prop_assert_eq!(&got.certain, &in_every);
            let mut in_some: Vec<(usize, usize)> = all.iter().flatten().copied().filter(|p| !in_every.contains(p)).collect();
            in_some.sort();
            in_some.dedup();
            let mut uncertain: Vec<(usize, usize)> = got.uncertain.iter().flat_map(|(i, js)| js.iter().map(move |&j| (*i, j))).collect();
            uncertain.sort();
            prop_assert_eq!(uncertain, in_some);
        }

        #[test]
        fn myers_length_is_the_longest_common_subsequence(
            a in prop::collection::vec(0u32..4, 0..40),
            b in prop::collection::vec(0u32..4, 0..40),
        ) {
            prop_assert_eq!(myers_length(&a, &b, usize::MAX), Some(lcs_len(&a, &b)));
        }
    }
}
