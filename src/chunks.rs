//! Work on long lists split across the machine's cores, results kept in order.
use std::ops::Range;

/// Runs `work` over `0..len` split into contiguous ranges of at least
/// `min_per_thread` items, one per core (a single range on the calling thread
/// when the list is short or the machine has one core), and returns the
/// results in range order. A panic in any range is resumed on the caller.
pub(crate) fn map<T: Send>(
    len: usize,
    min_per_thread: usize,
    work: impl Fn(Range<usize>) -> T + Sync,
) -> Vec<T> {
    let threads =
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(len / min_per_thread.max(1)).max(1);
    if threads == 1 {
        return vec![work(0..len)];
    }
    let chunk = len.div_ceil(threads);
    let work = &work;
    std::thread::scope(|scope| {
        // The last range runs here; the others on their own threads.
        let handles: Vec<_> = (chunk..len)
            .step_by(chunk)
            .map(|start| scope.spawn(move || work(start..(start + chunk).min(len))))
            .collect();
        let mut out = vec![work(0..chunk.min(len))];
        for handle in handles {
            out.push(handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_once_in_order_whatever_the_split() {
        for (len, min) in [(0, 1), (1, 1), (7, 2), (1000, 1), (1001, 10), (5, 100)] {
            let parts = map(len, min, |range| range.collect::<Vec<_>>());
            assert_eq!(parts.concat(), (0..len).collect::<Vec<_>>(), "{len} {min}");
        }
    }

    #[test]
    #[should_panic(expected = "boom")]
    fn a_panic_in_a_range_reaches_the_caller() {
        map(1000, 1, |range| assert!(!range.contains(&999), "boom"));
    }
}
