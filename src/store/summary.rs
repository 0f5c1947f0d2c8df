//! What `transplant inspect` shows: a store's entries and totals, for people and programs.
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::Source;
use crate::dotted::{escaped, shown};
use crate::dtype;
use crate::entry::{device_name, Entry, Role};

/// Count and bytes of the entries of one role and dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Total {
    /// Parameter or buffer.
    pub role: Role,
    /// PyTorch's name of the element type.
    pub dtype: &'static str,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of elements.
    pub elements: u64,
    /// Bytes of data.
    pub bytes: u64,
}

/// An entry of a checkpoint that is not part of the state dict read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Other {
    /// Its key (`args`, `epoch`).
    pub key: String,
    /// What it holds (`argparse.Namespace (not read)`, `12`).
    pub value: String,
}

/// A store described: every entry, totals per role and dtype, and the grand total.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Where the tensors come from.
    pub origin: String,
    /// What kind of store or file it is.
    pub kind: String,
    /// For a checkpoint dict, the key its state dict was found under.
    pub key: Option<String>,
    /// Every entry, in registration order.
    pub entries: Vec<Entry>,
    /// Per role and dtype, parameters first.
    pub totals: Vec<Total>,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of data, each tied group's counted once.
    pub bytes: u64,
    /// Tied entries (one tensor under several names, see
    /// [`Source::ties`](crate::Source::ties)): their names, in entry order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ties: Vec<Vec<String>>,
    /// What the file holds besides the tensors read (the other entries of a
    /// checkpoint dict, a pickled module's class), each described.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<Other>,
}

impl Summary {
    /// Describes `store`.
    pub fn of(store: &dyn Source) -> Self {
        let entries = store.entries().to_vec();
        let ties = store.ties();
        // Every member of a tie but the first adds no bytes.
        let mut repeated = vec![false; entries.len()];
        for group in &ties {
            for &i in &group[1..] {
                repeated[i] = true;
            }
        }
        let mut totals: BTreeMap<(Role, &'static str), Total> = BTreeMap::new();
        for (entry, &repeated) in entries.iter().zip(&repeated) {
            let bytes = if repeated { 0 } else { entry.bytes() };
            let name = dtype::name(entry.dtype);
            let total = totals.entry((entry.role, name)).or_insert(Total {
                role: entry.role,
                dtype: name,
                tensors: 0,
                elements: 0,
                bytes: 0,
            });
            total.tensors += 1;
            total.elements += entry.numel();
            total.bytes += bytes;
        }
        Self {
            origin: store.origin().to_string(),
            kind: store.kind().to_string(),
            key: store.key().map(str::to_string),
            tensors: entries.len(),
            bytes: entries.iter().zip(&repeated).filter(|(_, &r)| !r).map(|(e, _)| e.bytes()).sum(),
            ties: ties.iter().map(|g| g.iter().map(|&i| entries[i].name.to_string()).collect()).collect(),
            totals: totals.into_values().collect(),
            entries,
            others: store.others().into_iter().map(|(key, value)| Other { key, value }).collect(),
        }
    }
}

/// `1.5 MB`-style sizes (decimal units, as `ls -h --si` and PyTorch docs use).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => {
                writeln!(f, "{} ({}, state dict under key {key:?})", escaped(&self.origin), self.kind)?
            }
            None => writeln!(f, "{} ({})", escaped(&self.origin), self.kind)?,
        }
        let name_width = self
            .entries
            .iter()
            .map(|e| shown(&e.name).chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 2 * crate::dotted::SHOWN_CHARS);
        writeln!(
            f,
            "  {:<name_width$}  {:<9}  {:<8}  {:<18}  {:<6}  {:>9}",
            "name", "role", "dtype", "shape", "device", "bytes"
        )?;
        for entry in &self.entries {
            writeln!(
                f,
                "  {:<name_width$}  {:<9}  {:<8}  {:<18}  {:<6}  {:>9}",
                shown(&entry.name),
                entry.role.to_string(),
                dtype::name(entry.dtype),
                shape_text(&entry.shape),
                device_name(entry.device),
                human_bytes(entry.bytes())
            )?;
        }
        writeln!(f, "totals:")?;
        for total in &self.totals {
            writeln!(
                f,
                "  {:<9}  {:<8}  {:>6} tensors  {:>12} elements  {:>9}",
                total.role.to_string(),
                total.dtype,
                total.tensors,
                total.elements,
                human_bytes(total.bytes)
            )?;
        }
        write!(f, "  {} tensors, {}", self.tensors, human_bytes(self.bytes))?;
        if !self.ties.is_empty() {
            write!(f, " (tied tensors counted once)\ntied (one tensor under several names):")?;
            for group in &self.ties {
                let names: Vec<String> = group.iter().map(|n| shown(n).into_owned()).collect();
                write!(f, "\n  {}", names.join(" = "))?;
            }
        }
        if !self.others.is_empty() {
            write!(f, "\nalso in the file, not read as tensors:")?;
            let width = self
                .others
                .iter()
                .map(|o| shown(&o.key).chars().count())
                .max()
                .unwrap_or(0)
                .min(2 * crate::dotted::SHOWN_CHARS);
            for o in &self.others {
                write!(f, "\n  {:<width$}  {}", shown(&o.key), escaped(&o.value))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(71_000_000), "71.0 MB");
        assert_eq!(human_bytes(1_070_000_000), "1.1 GB");
    }
}
