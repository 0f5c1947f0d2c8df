//! The transfer layout: which sender tensors travel, in which buckets, at
//! which offsets — packed by the lead receiver, checked by every party
//! before it follows one.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::DIGEST;
use crate::dtype;
use crate::entry::Entry;
use crate::error::{Error, Result};

/// Bucket offsets are multiples of this: every dtype's view is aligned.
const ALIGN: u64 = 64;

/// One bucket of the layout: `bytes` in all, the tensors at their offsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Bucket {
    pub(super) bytes: u64,
    /// `[entry index, offset, bytes]`.
    pub(super) tensors: Vec<(usize, u64, u64)>,
}

impl Bucket {
    /// The one tensor that fills the bucket, where it holds one.
    pub(super) fn whole(&self) -> Option<usize> {
        match self.tensors.as_slice() {
            &[(index, 0, bytes)] if bytes == self.bytes && bytes > 0 => Some(index),
            _ => None,
        }
    }
}

/// `<s>/layout`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Layout {
    /// The digest's name ([`DIGEST`]).
    #[serde(default)]
    pub(super) digest: String,
    #[serde(default)]
    pub(super) buckets: Vec<Bucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

impl Layout {
    /// `Ok` when the layout is one this side can follow for `entries`: its
    /// digest the one computed here, every tensor an entry's whole bytes at an
    /// offset its dtype aligns, inside its bucket. (Each side reads the layout
    /// from the store: a broken or foreign one is refused, not followed.)
    pub(super) fn ensure_valid(&self, entries: &[Entry]) -> Result<()> {
        let refuse = |what: String| Err(Error::Sync { message: format!("the layout {what}") });
        if self.digest != DIGEST {
            return refuse(format!("names digest {:?}; this side computes {DIGEST}", self.digest));
        }
        for (b, bucket) in self.buckets.iter().enumerate() {
            // A bucket is as long as its tensors reach: no buffer is sized by a
            // number alone.
            let reach = bucket.tensors.iter().map(|&(_, offset, bytes)| offset.saturating_add(bytes)).max();
            if reach != Some(bucket.bytes) {
                return refuse(format!(
                    "gives bucket {} {} bytes for tensors reaching {reach:?}",
                    b + 1,
                    bucket.bytes
                ));
            }
            for &(index, offset, bytes) in &bucket.tensors {
                let Some(entry) = entries.get(index) else {
                    return refuse(format!("names entry {index}; the sender announced {}", entries.len()));
                };
                let aligned = offset % dtype::size(entry.dtype) as u64 == 0;
                let inside = offset.checked_add(bytes).is_some_and(|end| end <= bucket.bytes);
                if bytes != entry.bytes() || !aligned || !inside {
                    return refuse(format!(
                        "puts {} ({} bytes) at {offset}..+{bytes} of bucket {} ({} bytes)",
                        entry.name,
                        entry.bytes(),
                        b + 1,
                        bucket.bytes
                    ));
                }
            }
        }
        Ok(())
    }

    /// The needed entries in the sender's order, packed into buckets of at most
    /// `bucket_bytes` (a larger tensor alone); tied entries share their bytes.
    pub(super) fn pack(entries: &[Entry], ties: &[Vec<usize>], needed: &[usize], bucket_bytes: u64) -> Self {
        let mut first_of: HashMap<usize, usize> = HashMap::new();
        for group in ties {
            if let Some(&first) = group.iter().min() {
                for &member in group {
                    first_of.insert(member, first);
                }
            }
        }
        let mut needed: Vec<usize> = needed.to_vec();
        needed.sort_unstable();
        needed.dedup();
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut open = Bucket { bytes: 0, tensors: Vec::new() };
        let mut placed: HashMap<usize, (usize, u64)> = HashMap::new();
        let mut later: Vec<(usize, usize)> = Vec::new();
        let close = |open: &mut Bucket, buckets: &mut Vec<Bucket>| {
            if !open.tensors.is_empty() {
                buckets.push(std::mem::replace(open, Bucket { bytes: 0, tensors: Vec::new() }));
            }
        };
        for &index in &needed {
            let first = first_of.get(&index).copied().unwrap_or(index);
            if first != index && (needed.binary_search(&first).is_ok() || placed.contains_key(&first)) {
                later.push((index, first));
                continue;
            }
            let nbytes = entries[index].bytes();
            let offset = open.bytes.div_ceil(ALIGN) * ALIGN;
            if !open.tensors.is_empty() && offset + nbytes > bucket_bytes {
                close(&mut open, &mut buckets);
            }
            let offset = open.bytes.div_ceil(ALIGN) * ALIGN;
            placed.insert(index, (buckets.len(), offset));
            if first != index {
                placed.insert(first, (buckets.len(), offset));
            }
            open.tensors.push((index, offset, nbytes));
            open.bytes = offset + nbytes;
        }
        close(&mut open, &mut buckets);
        // A tied entry is read from its group's bytes, wherever they went.
        for (index, first) in later {
            if let Some(&(b, offset)) = placed.get(&first) {
                buckets[b].tensors.push((index, offset, entries[index].bytes()));
            }
        }
        Self { digest: DIGEST.into(), buckets, error: None }
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::entry::{Name, Role};

    fn entry(name: &str, bytes: i64) -> Entry {
        Entry {
            name: Name::from(name),
            role: Role::Parameter,
            role_inferred: false,
            shape: vec![bytes],
            dtype: crate::dtype::Dtype::UInt8,
            device: Device::Cpu,
        }
    }

    #[test]
    fn layouts_keep_the_sender_order_align_offsets_and_bound_buckets() {
        let entries: Vec<Entry> =
            [10, 100, 30, 500, 7].iter().enumerate().map(|(i, &b)| entry(&format!("t{i}"), b)).collect();
        let layout = Layout::pack(&entries, &[], &[4, 0, 1, 2, 3], 200);
        let placed: Vec<Vec<(usize, u64, u64)>> = layout.buckets.iter().map(|b| b.tensors.clone()).collect();
        assert_eq!(
            placed,
            vec![vec![(0, 0, 10), (1, 64, 100)], vec![(2, 0, 30)], vec![(3, 0, 500)], vec![(4, 0, 7)]]
        );
        assert_eq!(layout.buckets[0].bytes, 164);
        assert_eq!(layout.buckets[2].bytes, 500, "a tensor over the bound gets a bucket of its own");
        assert_eq!(layout.buckets[2].whole(), Some(3));
        assert_eq!(layout.buckets[0].whole(), None);
    }

    #[test]
    fn layouts_that_do_not_fit_the_entries_are_refused() {
        let entries: Vec<Entry> =
            [10, 100].iter().enumerate().map(|(i, &b)| entry(&format!("t{i}"), b)).collect();
        let good = Layout::pack(&entries, &[], &[0, 1], 1 << 20);
        good.ensure_valid(&entries).unwrap();
        let broken = |edit: &dyn Fn(&mut Layout)| {
            let mut layout = good.clone();
            edit(&mut layout);
            layout.ensure_valid(&entries).unwrap_err().to_string()
        };
        assert!(broken(&|l| l.digest = "sha256".into()).contains("digest"));
        assert!(broken(&|l| l.buckets[0].tensors[1].0 = 7).contains("names entry 7"));
        assert!(broken(&|l| l.buckets[0].tensors[1].1 = 100).contains("reaching"), "past the bucket's end");
        assert!(broken(&|l| l.buckets[0].tensors[0].2 = 9).contains("t0"), "not the entry's bytes");
        assert!(broken(&|l| l.buckets[0].tensors[1].1 = u64::MAX).contains("reaching"), "overflow");
        let floats = vec![Entry { dtype: crate::dtype::Dtype::Float32, shape: vec![4], ..entry("f", 16) }];
        let mut misaligned = Layout::pack(&floats, &[], &[0], 1 << 20);
        misaligned.buckets[0].bytes += 2;
        misaligned.buckets[0].tensors[0].1 = 2;
        assert!(
            broken(&|l| l.buckets[0].bytes = 1 << 40).contains("gives bucket 1"),
            "a buffer sized by a number"
        );
        assert!(broken(&|l| l.buckets[0].tensors.clear()).contains("gives bucket 1"), "an empty bucket");
        assert!(misaligned.ensure_valid(&floats).unwrap_err().to_string().contains("at 2"));
    }

    #[test]
    fn tied_entries_are_sent_once_and_read_from_the_same_bytes() {
        let entries: Vec<Entry> = (0..3).map(|i| entry(&format!("t{i}"), 16)).collect();
        let layout = Layout::pack(&entries, &[vec![0, 2]], &[0, 1, 2], 1 << 20);
        assert_eq!(layout.buckets.len(), 1);
        assert_eq!(layout.buckets[0].tensors, vec![(0, 0, 16), (1, 64, 16), (2, 0, 16)]);
        assert_eq!(layout.buckets[0].bytes, 80);
        assert_eq!(layout.buckets[0].whole(), None);
        let only_second = Layout::pack(&entries, &[vec![0, 2]], &[2], 1 << 20);
        assert_eq!(
            only_second.buckets[0].tensors,
            vec![(2, 0, 16)],
            "a tie member needed alone is sent itself"
        );
    }
}
