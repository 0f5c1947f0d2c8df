//! Handing the pages of tensors already written back to the kernel, without
//! losing a byte: the one place that calls `madvise`.
//!
//! Why it is safe is the whole argument of [`PageReleaser`]: only pages that
//! `/proc/self/pagemap` shows present *and* backed by a file or shared memory
//! are dropped, and `MADV_DONTNEED` on such a page only unmaps it — touching it
//! again maps the same contents back from the file (or the shared memory). A
//! page written through a private map is an anonymous copy (its pagemap entry
//! says so) and is never dropped; anonymous memory (a tensor of our own) is
//! never dropped. So whatever a release drops, a later read sees unchanged.
use std::fs::File;

/// Hands the memory of tensors already written back to the kernel, so that
/// streaming a model (a conversion, a copy into an archive) takes memory that
/// does not grow with the model — losing nothing and evicting nothing from
/// the page cache.
///
/// Only pages that come back as they were when touched again are dropped
/// (`MADV_DONTNEED`): those `/proc/self/pagemap` shows present and backed by a
/// file or shared memory — a mapped file's pages never written (a private
/// map's written pages are anonymous copies, and stay), shared memory. Other
/// memory is left alone. Ranges are gathered and handed back a few MB at a
/// time (models have tens of thousands of small tensors).
#[derive(Default)]
pub(crate) struct PageReleaser {
    ranges: Vec<(usize, usize)>,
    pending: usize,
    /// `/proc/self/pagemap`, opened on first use (`None` after it failed).
    pagemap: Option<Option<File>>,
}

/// Bytes gathered before they are handed back.
const RELEASE_EVERY: usize = 2 << 20;
/// Ranges are widened to this alignment: the page cache maps large folios
/// (up to 2 MB) whole, so a fault maps pages well beyond the bytes read.
const RELEASE_ALIGN: usize = 2 << 20;

impl PageReleaser {
    /// `tensor`'s bytes are no longer needed (CPU tensors; others are ignored).
    pub(crate) fn release(&mut self, tensor: &tch::Tensor) {
        if tensor.device() != tch::Device::Cpu || !tensor.defined() {
            return;
        }
        let bytes = tensor.numel() * crate::dtype::Dtype::of(tensor).map_or(0, crate::dtype::Dtype::size);
        if bytes == 0 || !tensor.is_contiguous() {
            return;
        }
        let start = tensor.data_ptr() as usize;
        self.release_bytes(start..start + bytes, crate::ffi::storage_range(tensor));
    }

    /// The bytes `range` are no longer needed; the pages around them that a
    /// fault mapped too may go, within `within` (the memory they belong to:
    /// a tensor's storage, a map).
    pub(crate) fn release_bytes(&mut self, range: std::ops::Range<usize>, within: std::ops::Range<usize>) {
        let bytes = range.len();
        let start = (range.start / RELEASE_ALIGN * RELEASE_ALIGN).max(within.start.min(range.start));
        let end =
            range.end.div_ceil(RELEASE_ALIGN).saturating_mul(RELEASE_ALIGN).min(within.end.max(range.end));
        self.ranges.push((start, end));
        self.pending += bytes;
        if self.pending >= RELEASE_EVERY {
            self.flush();
        }
    }

    /// Hands back what was gathered.
    pub(crate) fn flush(&mut self) {
        #[cfg(target_os = "linux")]
        {
            const PAGE: usize = 4096;
            let mut ranges = std::mem::take(&mut self.ranges);
            self.pending = 0;
            ranges.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
            for (start, end) in ranges {
                let (start, end) = (start / PAGE * PAGE, end.div_ceil(PAGE) * PAGE);
                match merged.last_mut() {
                    Some(last) if start <= last.1 => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            let pagemap = self.pagemap.get_or_insert_with(|| File::open("/proc/self/pagemap").ok());
            let Some(pagemap) = pagemap else { return };
            for (start, end) in merged {
                release_lossless(pagemap, start, end);
            }
        }
    }
}

impl Drop for PageReleaser {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Drops the pages of `start..end` (page-aligned) that are present and
/// backed by a file or shared memory, run by run.
#[cfg(target_os = "linux")]
fn release_lossless(pagemap: &File, start: usize, end: usize) {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const PRESENT: u64 = 1 << 63;
    const FILE_OR_SHARED: u64 = 1 << 61;
    const CHUNK: usize = 4096; // pages per read of the pagemap
    let mut entries = vec![0u8; CHUNK * 8];
    let mut page = start / PAGE;
    let last = end / PAGE;
    let drop_run = |from: usize, to: usize| {
        if to > from {
            // SAFETY: every page of the run was just seen present and backed by
            // a file or shared memory: dropping it only unmaps it, and touching
            // it again maps the same contents back (madvise(2), MADV_DONTNEED).
            // The range lies within mappings of this process (the tensors').
            unsafe {
                libc::madvise((from * PAGE) as *mut libc::c_void, (to - from) * PAGE, libc::MADV_DONTNEED);
            }
        }
    };
    while page < last {
        let count = (last - page).min(CHUNK);
        let buf = &mut entries[..count * 8];
        if pagemap.read_exact_at(buf, (page * 8) as u64).is_err() {
            return;
        }
        let mut run = page;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let flags = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
            if flags & PRESENT == 0 || flags & FILE_OR_SHARED == 0 {
                drop_run(run, page + i);
                run = page + i + 1;
            }
        }
        drop_run(run, page + count);
        page += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::map_file;

    /// Resident pages of this process (`/proc/self/statm`).
    fn resident_pages() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        statm.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn released_pages_leave_memory_and_come_back_unchanged_and_written_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages.bin");
        let bytes: Vec<u8> = (0..(32usize << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mapped = map_file(&path, "test").unwrap();
        let all = mapped.bytes.shallow_clone();
        // Touch every page, then write into the last MB (a private copy of it).
        assert_eq!(all.sum(tch::Kind::Int64).int64_value(&[]), bytes.iter().map(|&b| b as i64).sum::<i64>());
        let mut tail = all.narrow(0, (31 << 20) as i64, 1 << 20);
        let _ = tail.fill_(7);
        let before = resident_pages();
        let mut releaser = PageReleaser::default();
        releaser.release(&all);
        releaser.flush();
        let dropped = before.saturating_sub(resident_pages());
        assert!(dropped * 4096 >= 24 << 20, "only {} MB left memory", (dropped * 4096) >> 20);
        // What was read comes back from the file; what was written stayed.
        let head = all.narrow(0, 0, (31 << 20) as i64);
        let want = tch::Tensor::from_slice(&bytes[..31 << 20]);
        assert!(head.equal(&want));
        assert_eq!(tail.min().int64_value(&[]), 7);
        assert_eq!(tail.max().int64_value(&[]), 7);
        // Anonymous memory is never dropped.
        let anonymous = tch::Tensor::full([8 << 20], 3, (tch::Kind::Uint8, tch::Device::Cpu));
        releaser.release(&anonymous);
        releaser.flush();
        assert_eq!(anonymous.min().int64_value(&[]), 3);
    }
}
