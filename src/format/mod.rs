//! On-disk formats: one file each, and [`sniff`], which tells them apart by content.
pub mod dcp;
pub mod npz;
pub mod pickle;
pub mod retype;
pub mod safetensors;
pub mod script_archive;
mod script_classes;
pub mod tch_archive;
pub mod torch_pickle;
mod zip_members;
mod pages;

pub(crate) use pages::PageReleaser;

pub(crate) use zip_members::{archive_folder, check_unique_members};

use std::fs::File;
use std::io::Read;
use std::path::Path;

pub use crate::entry::Format;
use crate::error::{Error, Result};

/// How far a compressed zip entry may expand: deflate itself cannot exceed
/// 1032:1, and model data never compresses anywhere near that; past this an
/// entry is refused as corrupt or a zip bomb before anything is inflated.
pub const MAX_EXPANSION: u64 = 256;
/// Entries inflating to less than this are never refused for their ratio.
const SMALL_ENTRY: u64 = 64 << 20;

/// Refuses a compressed entry that would inflate `compressed` bytes into
/// more than `MAX_EXPANSION` times as many (small entries excepted).
pub(crate) fn check_expansion(
    path: &Path,
    format: &'static str,
    what: &str,
    compressed: u64,
    inflated: u64,
) -> Result<()> {
    if inflated > SMALL_ENTRY.max(compressed.saturating_mul(MAX_EXPANSION)) {
        return Err(Error::Format {
            path: path.into(),
            format,
            message: format!(
                "{what} would inflate {compressed} compressed bytes into {inflated}, more than {MAX_EXPANSION}x: \
                 refused as corrupt or a zip bomb (save it uncompressed)"
            ),
        });
    }
    Ok(())
}

/// A file mapped privately (copy-on-write: writes into tensors over it never
/// reach the file), and a 1-D `uint8` tensor over all its bytes that keeps the
/// map alive as long as any tensor shares it. Another process truncating the
/// file while it is mapped would fault on access: the usual contract of
/// memory-mapped model loading (safetensors, PyTorch `mmap=True`).
pub(crate) struct MappedFile {
    pub map: std::sync::Arc<memmap2::MmapMut>,
    pub bytes: tch::Tensor,
}

/// Maps the regular file at `path` (see [`MappedFile`]); `format` names it in errors.
pub(crate) fn map_file(path: &Path, format: &'static str) -> Result<MappedFile> {
    let file = crate::files::open_regular(path)?;
    // SAFETY: a private map, as described on `MappedFile`.
    let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
        .map_err(|source| Error::Io { path: path.into(), source })?;
    let (ptr, len) = (map.as_mut_ptr(), map.len());
    let map = std::sync::Arc::new(map);
    // SAFETY: `ptr .. ptr + len` is the whole map, kept alive by the `Arc` the tensor owns.
    let bytes = unsafe { crate::ffi::tensor_over_bytes(std::sync::Arc::clone(&map), ptr, len) }
        .map_err(|message| Error::Format { path: path.into(), format, message })?;
    Ok(MappedFile { map, bytes })
}

/// A tensor a streaming writer will write: its name, dtype and shape, known
/// before its values are made (a file's header comes first).
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub name: String,
    /// Its element type.
    pub kind: crate::dtype::Dtype,
    pub shape: Vec<i64>,
}

impl Outgoing {
    /// Bytes its values take.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<i64>().max(0) as usize * crate::dtype::size(self.kind)
    }
}

/// Makes tensor `i` of the outgoing list; a writer calls it once for each, in
/// order, and writes the result before asking for the next (so that only one
/// tensor's values need be in memory).
pub(crate) type Produce<'a> = &'a mut dyn FnMut(usize) -> Result<tch::Tensor>;

/// What is announced of `tensors`, for a streaming writer given them whole.
pub(crate) fn outgoing(tensors: &[(String, tch::Tensor)]) -> Vec<Outgoing> {
    let dtype = |t| crate::dtype::Dtype::of(t).unwrap_or(crate::dtype::Dtype::UInt8);
    tensors.iter().map(|(name, t)| Outgoing { name: name.clone(), kind: dtype(t), shape: t.size() }).collect()
}

/// Every announced dtype has a name in the format (`type_of`): checked before
/// anything is written.
pub(crate) fn check_types<T>(
    path: &Path,
    format: &'static str,
    outgoing: &[Outgoing],
    type_of: impl Fn(crate::dtype::Dtype) -> Option<T>,
) -> Result<Vec<T>> {
    outgoing
        .iter()
        .map(|o| {
            type_of(o.kind).ok_or_else(|| Error::Unrepresentable {
                path: path.into(),
                tensor: o.name.clone(),
                format,
                reason: format!("{format} has no {} dtype", crate::dtype::name(o.kind)),
            })
        })
        .collect()
}

/// Tensor `i` made by `produce`, checked to be what was announced, as one
/// contiguous CPU tensor.
pub(crate) fn produce_checked(
    path: &Path,
    format: &'static str,
    outgoing: &[Outgoing],
    i: usize,
    produce: Produce,
) -> Result<tch::Tensor> {
    let o = &outgoing[i];
    let tensor = produce(i)?;
    let made = crate::dtype::Dtype::of(&tensor).ok();
    if made != Some(o.kind) || tensor.size() != o.shape {
        return Err(Error::Format {
            path: path.into(),
            format,
            message: format!(
                "tensor {} was announced as {} {:?} and made as {} {:?}",
                o.name,
                crate::dtype::name(o.kind),
                o.shape,
                made.map_or("an unknown dtype", crate::dtype::Dtype::name),
                tensor.size()
            ),
        });
    }
    tensor.f_to_device(tch::Device::Cpu).and_then(|t| t.f_contiguous()).map_err(|source| Error::Tensor {
        store: path.display().to_string(),
        tensor: o.name.clone(),
        source,
    })
}

/// The bytes of a contiguous CPU tensor, as long as it is borrowed.
pub(crate) fn bytes_of(tensor: &tch::Tensor) -> &[u8] {
    let len = tensor.numel() * crate::dtype::Dtype::of(tensor).map_or(0, crate::dtype::Dtype::size);
    if len == 0 {
        return &[];
    }
    // SAFETY: callers pass contiguous CPU tensors (`produce_checked` makes them);
    // their `len` bytes at `data_ptr` stay valid while the tensor is borrowed.
    unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u8, len) }
}

/// The most tensors one file (or sharded index) may list. The largest models
/// hold tens of thousands; a header that lists millions of empty tensors costs
/// memory per entry and is refused before they are made.
pub const MAX_ENTRIES: usize = 1 << 20;

/// Refuses more than [`MAX_ENTRIES`] entries (`count` may be an upper bound).
pub(crate) fn check_entries(path: &Path, format: &'static str, count: usize) -> Result<()> {
    if count > MAX_ENTRIES {
        return Err(Error::Format {
            path: path.into(),
            format,
            message: format!("lists {count} tensors, more than the {MAX_ENTRIES} read from one file"),
        });
    }
    Ok(())
}

/// Whether a view of `size` and `stride` reaches one element through two
/// indices (a zero stride on a dimension longer than one, or strides too small
/// for the sizes below them). Such a view holds more elements than bytes back
/// it — a `[2^28]` view of stride 0 over 4 floats reads as 1 GB — and no state
/// dict holds one, so readers refuse them.
pub(crate) fn overlapping(size: &[i64], stride: &[i64]) -> bool {
    let mut dims: Vec<(i64, i64)> =
        size.iter().zip(stride).filter(|(&n, _)| n > 1).map(|(&n, &s)| (s, n)).collect();
    dims.sort_unstable();
    let mut needed: i64 = 1;
    for (s, n) in dims {
        if s < needed {
            return true;
        }
        needed = match s.checked_mul(n) {
            Some(reach) => reach,
            None => return false,
        };
    }
    false
}

pub(crate) const LEGACY_TORCH_MAGIC: [u8; 12] =
    [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8];
/// Index files larger than this are not read as JSON.
pub(crate) const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Tells which [`Format`] a file is in, from its content (magic bytes, archive
/// entries), not from its extension — except where two formats share one
/// container and only the extension tells them apart (see `tch_archive`).
pub fn sniff(path: &Path) -> Result<Format> {
    if dcp::is_checkpoint(path) {
        return Ok(Format::DistributedCheckpoint);
    }
    let mut file = crate::files::open_regular(path)?;
    let metadata = file.metadata().map_err(|source| Error::Io { path: path.into(), source })?;
    if metadata.len() == 0 {
        return Err(Error::EmptyFile { path: path.into() });
    }
    let mut head = [0u8; 16];
    let read = read_up_to(&mut file, &mut head).map_err(|source| Error::Io { path: path.into(), source })?;
    let head = &head[..read];

    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return sniff_zip(path, file);
    }
    if head.starts_with(&LEGACY_TORCH_MAGIC) {
        return Ok(Format::TorchSaveLegacy);
    }
    if let Some(header_len) = head.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
        if head.get(8) == Some(&b'{') && header_len.checked_add(8).is_some_and(|end| end <= metadata.len()) {
            return Ok(Format::Safetensors);
        }
    }
    let text_start = head.iter().position(|b| !b.is_ascii_whitespace());
    if text_start.is_some_and(|i| head[i] == b'{') && metadata.len() <= MAX_INDEX_BYTES {
        let text = crate::files::read_bounded(path, MAX_INDEX_BYTES, "sharded index")?;
        if let Ok(serde_json::Value::Object(root)) = serde_json::from_slice(&text) {
            if root.contains_key("weight_map") {
                return Ok(Format::SafetensorsIndex);
            }
        }
    }
    Err(Error::UnknownFormat { path: path.into() })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn sniff_zip(path: &Path, file: File) -> Result<Format> {
    // Through a map: reading a zip's directory is many small reads and seeks.
    // SAFETY: a private read-only map, only read here.
    let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }
        .map_err(|source| Error::Io { path: path.into(), source })?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&map[..])).map_err(|e| Error::Format {
        path: path.into(),
        format: "zip archive",
        message: e.to_string(),
    })?;
    check_unique_members(path, "zip archive", &mut archive)?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    if !names.is_empty() && names.iter().all(|n| n.ends_with(".npy")) {
        return Ok(Format::Npz);
    }
    // Only the members of the archive's folder (the first member's) are read.
    let folder = archive_folder(path, "PyTorch archive", &mut archive)?;
    let has = |name: &str| names.iter().any(|n| n.strip_prefix(folder.as_str()) == Some(name));
    if has("constants.pkl") || names.iter().any(|n| n.starts_with(&format!("{folder}code/"))) {
        let tch = tch_archive::is_tch_archive(path, &mut archive, &folder);
        return Ok(if tch { Format::TchArchive } else { Format::TorchScript });
    }
    if has("data.pkl") {
        return Ok(Format::TorchSave);
    }
    Err(Error::Format {
        path: path.into(),
        format: "zip archive",
        message: "neither a PyTorch archive (no data.pkl) nor an npz (entries not all .npy)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_views_are_told_apart_from_strided_ones() {
        assert!(overlapping(&[1 << 28], &[0]));
        assert!(overlapping(&[4, 4], &[1, 1]));
        assert!(overlapping(&[3, 4], &[2, 1]));
        assert!(!overlapping(&[3, 4], &[4, 1]));
        assert!(!overlapping(&[4, 3], &[1, 4]), "a transposed view");
        assert!(!overlapping(&[1, 5], &[0, 1]), "a zero stride on a dimension of one");
        assert!(!overlapping(&[], &[]));
    }
}
