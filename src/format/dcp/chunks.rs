//! The geometry of a Distributed Checkpoint tensor's chunks: elements of a
//! shape, counted with checked arithmetic, and the first pair of chunks that
//! overlap, found by sorting and a bitmap of the tensor rather than by
//! comparing every pair.

/// The elements a shape holds; `None` past an `i64` (or a negative size). A
/// shape with a zero holds none whatever its other sizes, as in PyTorch.
pub(super) fn elements(shape: &[i64]) -> Option<i64> {
    if shape.contains(&0) {
        return shape.iter().all(|&d| d >= 0).then_some(0);
    }
    shape.iter().try_fold(1i64, |n, &d| if d < 0 { None } else { n.checked_mul(d) })
}

/// Two chunks of a tensor of `shape` (`numel` elements) that overlap, if any,
/// by their places in `boxes`; each chunk lies inside the tensor and its
/// bytes have been checked (so their elements together are no more than the
/// files hold). Sorted by offsets, equal neighbours overlap; chunks whose
/// elements add up to the tensor's or more are marked in a bitmap of the
/// tensor (one bit an element, an eighth of the bytes the chunks hold), a
/// contiguous run at a time. Fewer elements than the tensor's: they cannot
/// cover it, which the caller says.
pub(super) fn overlap(shape: &[i64], numel: i64, boxes: &[(Vec<i64>, Vec<i64>)]) -> Option<(usize, usize)> {
    let mut order: Vec<usize> = (0..boxes.len()).filter(|&i| !boxes[i].1.contains(&0)).collect();
    order.sort_unstable_by(|&a, &b| boxes[a].0.cmp(&boxes[b].0));
    if let Some(w) = order.windows(2).find(|w| boxes[w[0]].0 == boxes[w[1]].0) {
        return Some((w[0], w[1]));
    }
    let volume = order.iter().try_fold(0i64, |n, &i| n.checked_add(elements(&boxes[i].1)?));
    if volume.is_some_and(|v| v < numel) {
        return None;
    }
    let b = mark(shape, numel, boxes, &order)?;
    let meets = |a: usize| {
        let (x, y) = (&boxes[a], &boxes[b]);
        (0..shape.len()).all(|d| x.0[d] < y.0[d] + y.1[d] && y.0[d] < x.0[d] + x.1[d])
    };
    order.iter().copied().find(|&a| a != b && meets(a)).map(|a| (a, b))
}

/// Marks each chunk of `order` in a bitmap of the tensor; the first chunk
/// that meets an element marked already.
fn mark(shape: &[i64], numel: i64, boxes: &[(Vec<i64>, Vec<i64>)], order: &[usize]) -> Option<usize> {
    let rank = shape.len();
    let mut bits = vec![0u64; (numel as u64).div_ceil(64) as usize];
    if rank == 0 {
        return order.iter().copied().find(|_| !set_run(&mut bits, 0, 1));
    }
    // Row-major strides of the tensor (no overflow: they divide `numel`).
    let mut strides = vec![1i64; rank];
    for d in (0..rank - 1).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    for &i in order {
        let (offsets, sizes) = &boxes[i];
        // Dimensions after `k` the chunk spans whole: with `k` they form one
        // contiguous run; dimensions before `k` are walked.
        let mut k = rank - 1;
        while k > 0 && offsets[k] == 0 && sizes[k] == shape[k] {
            k -= 1;
        }
        let run = (sizes[k] * strides[k]) as u64;
        let mut index = vec![0i64; k];
        'runs: loop {
            let start: i64 =
                (0..k).map(|d| (offsets[d] + index[d]) * strides[d]).sum::<i64>() + offsets[k] * strides[k];
            if !set_run(&mut bits, start as u64, run) {
                return Some(i);
            }
            for d in (0..k).rev() {
                index[d] += 1;
                if index[d] < sizes[d] {
                    continue 'runs;
                }
                index[d] = 0;
            }
            break;
        }
    }
    None
}

/// Sets bits `start .. start + len`; false if one was set already.
fn set_run(bits: &mut [u64], start: u64, len: u64) -> bool {
    let end = start + len;
    let mut at = start;
    while at < end {
        let (word, bit) = ((at / 64) as usize, at % 64);
        let n = (64 - bit).min(end - at);
        let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
        if bits[word] & mask != 0 {
            return false;
        }
        bits[word] |= mask;
        at += n;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(list: &[(&[i64], &[i64])]) -> Vec<(Vec<i64>, Vec<i64>)> {
        list.iter().map(|(o, s)| (o.to_vec(), s.to_vec())).collect()
    }

    #[test]
    fn overlaps_are_found_whatever_the_split() {
        let shape = [4, 6];
        let grid = boxes(&[(&[0, 0], &[2, 3]), (&[0, 3], &[2, 3]), (&[2, 0], &[2, 6])]);
        assert_eq!(overlap(&shape, 24, &grid), None);
        let crossed = boxes(&[(&[0, 0], &[2, 6]), (&[1, 2], &[3, 4]), (&[2, 0], &[2, 2])]);
        assert_eq!(overlap(&shape, 24, &crossed), Some((0, 1)));
        let same = boxes(&[(&[0, 0], &[4, 6]), (&[0, 0], &[4, 6])]);
        assert_eq!(overlap(&shape, 24, &same), Some((0, 1)));
        let empty = boxes(&[(&[0, 0], &[4, 6]), (&[2, 2], &[0, 3])]);
        assert_eq!(overlap(&shape, 24, &empty), None);
        assert_eq!(elements(&[i64::MAX, i64::MAX, 0]), Some(0));
        assert_eq!(elements(&[1 << 62, 4]), None);
    }
}
