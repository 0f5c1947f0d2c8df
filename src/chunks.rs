//! Work on long lists split across the machine's cores, results kept in order.
use std::any::Any;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

/// Runs `work` over `0..len` split into contiguous ranges of at least
/// `min_per_thread` items, on libtorch's intra-op threads (a single range on
/// the calling thread when the list is short or libtorch runs one thread), and
/// returns the results in range order. A panic in any range is resumed on the
/// caller.
///
/// libtorch's threads rather than new ones: right after a copy they are still
/// awake, spinning for more work, and a thread of our own would have to share
/// a core with one of them.
pub(crate) fn map<T: Send>(
    len: usize,
    min_per_thread: usize,
    work: impl Fn(Range<usize>) -> T + Sync,
) -> Vec<T> {
    let min_per_thread = min_per_thread.max(1);
    if len < 2 * min_per_thread {
        return vec![work(0..len)];
    }
    let done: Mutex<Vec<(usize, T)>> = Mutex::new(Vec::new());
    let panicked: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
    crate::ffi::parallel_for(len, min_per_thread, &|range: Range<usize>| {
        let start = range.start;
        match std::panic::catch_unwind(AssertUnwindSafe(|| work(range))) {
            Ok(value) => done.lock().unwrap_or_else(|e| e.into_inner()).push((start, value)),
            Err(panic) => *panicked.lock().unwrap_or_else(|e| e.into_inner()) = Some(panic),
        }
    });
    if let Some(panic) = panicked.into_inner().unwrap_or_else(|e| e.into_inner()) {
        std::panic::resume_unwind(panic);
    }
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_unstable_by_key(|(start, _)| *start);
    done.into_iter().map(|(_, value)| value).collect()
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
    #[should_panic(expected = "a deliberate panic in one range (this test)")]
    fn a_panic_in_a_range_reaches_the_caller() {
        map(1000, 1, |range| assert!(!range.contains(&999), "a deliberate panic in one range (this test)"));
    }
}
