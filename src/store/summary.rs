//! What `transplant inspect` shows: a store's entries and totals, for people and programs.
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tch::Tensor;

use super::Source;
use crate::dotted::{escaped, shown};
use crate::dtype;
use crate::entry::{device_name, Entry, Role};
use crate::error::{Error, Result};

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

/// One entry as `inspect` lists it: the entry and, when asked for, the digest
/// of its bytes.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// The entry.
    #[serde(flatten)]
    pub entry: Entry,
    /// SHA-256 of the tensor's bytes (C-contiguous, little-endian), when the summary was
    /// made [`with_digests`](Summary::with_digests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
    pub entries: Vec<Listed>,
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
            entries: entries.into_iter().map(|entry| Listed { entry, sha256: None }).collect(),
            others: store.others().into_iter().map(|(key, value)| Other { key, value }).collect(),
        }
    }

    /// [`Summary::of`], each entry with the SHA-256 (`sha256`) of its tensor's bytes
    /// (tied names each their own).
    pub fn with_digests(store: &dyn Source) -> Result<Self> {
        let mut summary = Self::of(store);
        for (i, listed) in summary.entries.iter_mut().enumerate() {
            let tensor = store.tensor(i).ok_or_else(|| Error::Tensor {
                store: store.origin().to_string(),
                tensor: listed.entry.name.to_string(),
                source: tch::TchError::Kind("the store lends no tensor for this entry".into()),
            })?;
            let digest = sha256(tensor).map_err(|source| Error::Tensor {
                store: store.origin().to_string(),
                tensor: listed.entry.name.to_string(),
                source,
            })?;
            listed.sha256 = Some(digest);
        }
        Ok(summary)
    }
}

/// Elements hashed per step: a large tensor is never copied whole.
const DIGEST_CHUNK_BYTES: i64 = 1 << 24;

/// SHA-256, in lowercase hex, of `tensor`'s bytes in C-contiguous row-major
/// order, little-endian: what PyTorch's
/// `hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes())` gives
/// (a 0-dim tensor's one element; no bytes for no elements). A tensor that
/// carries a dtype tch has no kind for (see [`Dtype`](crate::Dtype)) holds the
/// same bytes, so its digest is the true dtype's.
pub fn sha256(tensor: &Tensor) -> std::result::Result<String, tch::TchError> {
    let element = crate::dtype::Dtype::of(tensor)?.size() as i64;
    let flat = tensor.f_to_device(tch::Device::Cpu)?.f_contiguous()?.f_reshape([-1])?;
    // Its bytes, as `uint8` (tch copies out only the dtypes it names).
    let numel = flat.numel() as i64 * element;
    let flat = crate::ffi::strided_view(
        &flat,
        crate::dtype::Dtype::UInt8,
        &[numel],
        &[1],
        flat.storage_offset() * element,
    )
    .map_err(tch::TchError::Kind)?;
    let step = DIGEST_CHUNK_BYTES;
    let mut hasher = Sha256::new();
    let mut buffer = Vec::new();
    let mut start = 0;
    while start < numel {
        let len = step.min(numel - start);
        buffer.resize(len as usize, 0);
        flat.f_narrow(0, start, len)?.f_copy_data_u8(&mut buffer, len as usize)?;
        hasher.update(&buffer);
        start += len;
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
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
            .map(|e| shown(&e.entry.name).chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 2 * crate::dotted::SHOWN_CHARS);
        let digests = self.entries.iter().any(|e| e.sha256.is_some());
        // float4_e2m1fn_x2 is 16 characters wide; most files need 8.
        let dw = self.entries.iter().map(|e| e.entry.dtype.name().len()).max().unwrap_or(8).max(8);
        write!(
            f,
            "  {:<name_width$}  {:<9}  {:<dw$}  {:<18}  {:<6}  {:>9}",
            "name", "role", "dtype", "shape", "device", "bytes"
        )?;
        writeln!(f, "{}", if digests { "  sha256" } else { "" })?;
        for Listed { entry, sha256 } in &self.entries {
            write!(
                f,
                "  {:<name_width$}  {:<9}  {:<dw$}  {:<18}  {:<6}  {:>9}",
                shown(&entry.name),
                entry.role.to_string(),
                dtype::name(entry.dtype),
                shape_text(&entry.shape),
                device_name(entry.device),
                human_bytes(entry.bytes())
            )?;
            match sha256 {
                Some(digest) => writeln!(f, "  {digest}")?,
                None => writeln!(f)?,
            }
        }
        writeln!(f, "totals:")?;
        for total in &self.totals {
            writeln!(
                f,
                "  {:<9}  {:<dw$}  {:>6} tensors  {:>12} elements  {:>9}",
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
