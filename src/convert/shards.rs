//! Sharded safetensors, written as one set, and the metadata a conversion
//! notes in safetensors files.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::WrittenFile;
use crate::error::{Error, Result};
use crate::format::{self, safetensors, Outgoing};
use crate::store::Source;

/// Notes, in safetensors metadata, where the result came from and which rules
/// made it; `format: pt` is kept or added (Hugging Face loaders require it).
pub(super) fn note_origin(metadata: &mut BTreeMap<String, String>, source: &dyn Source, rules: &[&str]) {
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    metadata.insert("transplant.source_format".into(), source.kind().to_string());
    let mut unique: Vec<&str> = Vec::new();
    for rule in rules {
        if !unique.contains(rule) {
            unique.push(rule);
        }
    }
    if !unique.is_empty() {
        metadata.insert("transplant.rules".into(), unique.join("\n"));
    }
}

/// Writes sharded safetensors: shards of at most `max` bytes of tensors (in
/// order; a larger tensor alone), named `STEM-0000K-of-0000N.safetensors` next
/// to the index `STEM.safetensors.index.json`, which lists every tensor's shard
/// and the total size. The set appears whole or not at all, replacing the set
/// the index named before as a whole (see [`super::replace`]).
pub(super) fn write_shards(
    index: &Path,
    outgoing: &[Outgoing],
    metadata: &BTreeMap<String, String>,
    max: u64,
    produce: format::Produce,
) -> Result<Vec<WrittenFile>> {
    let name = index.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let stem = &name[..name.len() - ".safetensors.index.json".len()];
    let mut shards: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut begin, mut bytes) = (0usize, 0u64);
    for (i, o) in outgoing.iter().enumerate() {
        let size = o.bytes() as u64;
        if i > begin && bytes + size > max {
            shards.push(begin..i);
            (begin, bytes) = (i, 0);
        }
        bytes += size;
    }
    if begin < outgoing.len() || shards.is_empty() {
        shards.push(begin..outgoing.len());
    }
    let n = shards.len();
    let folder = index.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let shard_names: Vec<String> = (1..=n).map(|k| format!("{stem}-{k:05}-of-{n:05}.safetensors")).collect();
    let mut paths: Vec<PathBuf> = shard_names.iter().map(|s| folder.join(s)).collect();
    paths.push(index.to_path_buf());
    let total: u64 = outgoing.iter().map(|o| o.bytes() as u64).sum();
    let mut weight_map = serde_json::Map::new();
    for (range, shard) in shards.iter().zip(&shard_names) {
        for o in &outgoing[range.clone()] {
            weight_map.insert(o.name.clone(), serde_json::Value::String(shard.clone()));
        }
    }
    let mut index_metadata = serde_json::Map::new();
    index_metadata.insert("total_size".into(), serde_json::json!(total));
    for (k, v) in metadata {
        index_metadata.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let index_json = serde_json::to_vec_pretty(
        &serde_json::json!({ "metadata": index_metadata, "weight_map": weight_map }),
    )
    .map_err(|e| Error::Format {
        path: index.into(),
        format: "safetensors index",
        message: e.to_string(),
    })?;
    super::replace::replace_set(&paths, |temps| {
        for (k, range) in shards.iter().enumerate() {
            let mut offset_produce = |i: usize| produce(range.start + i);
            safetensors::write_stream(&temps[k], &outgoing[range.clone()], metadata, &mut offset_produce)?;
        }
        std::fs::write(&temps[n], &index_json).map_err(|source| Error::Io { path: temps[n].clone(), source })
    })?;
    let mut files: Vec<WrittenFile> = shards
        .iter()
        .zip(&paths)
        .map(|(range, path)| WrittenFile {
            path: path.clone(),
            tensors: range.len(),
            bytes: outgoing[range.clone()].iter().map(|o| o.bytes() as u64).sum(),
        })
        .collect();
    files.push(WrittenFile { path: index.into(), tensors: 0, bytes: 0 });
    Ok(files)
}
