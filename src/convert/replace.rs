//! Replacing a sharded safetensors set as a whole.
//!
//! The index is the commit point: a reader follows it, so the set is what it
//! names. Until the new index is renamed into place, no file the current index
//! names changes:
//!
//! 1. Writers of sets in one folder take turns: each holds an exclusive
//!    `flock` of the folder for the whole write (no lock file is left; the
//!    kernel lets go of a killed writer's lock).
//! 2. The new shards and index are written to temporaries and synced.
//! 3. Where a new shard's name is one the current index names (a set rewritten
//!    under the same names), the old shard is first hard-linked to a hidden
//!    name (`.SHARD.transplant-old-PID-N`), and the current index is replaced
//!    (atomically) by one naming the hidden links: the same old set, reachable
//!    through names nothing else writes.
//! 4. The new shards are renamed into place, then the new index (commit).
//! 5. The files the replaced index named that the new one does not are removed.
//!
//! Killed anywhere, the index names the old set or the new one, whole. What a
//! killed writer left (temporaries, hidden links no index names) is removed by
//! the next write, in the one pass over the folder it makes.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::files;

/// What the hidden links that keep an old set reachable are named.
const OLD_MARK: &str = ".transplant-old-";

/// The index at `index` as it is now: its JSON, and the shard of each tensor
/// (file names inside its folder only; an index that cannot be read names none).
fn current(index: &Path) -> Option<(serde_json::Value, BTreeMap<String, String>)> {
    let text = files::read_bounded(index, crate::format::MAX_INDEX_BYTES, "sharded index").ok()?;
    let root: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let map = root.get("weight_map")?.as_object()?;
    let shards = map
        .iter()
        .filter_map(|(tensor, shard)| Some((tensor.clone(), shard.as_str()?.to_string())))
        .filter(|(_, shard)| {
            let mut parts = Path::new(shard).components();
            matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None))
        })
        .collect();
    Some((root, shards))
}

/// Writes the set `paths` (shards, then the index last) over whatever set the
/// index names now, as the module describes: `write` fills each file's temporary.
pub(super) fn replace_set(paths: &[PathBuf], write: impl FnOnce(&[PathBuf]) -> Result<()>) -> Result<()> {
    let Some((index, shards)) = paths.split_last() else { return Ok(()) };
    let mut temps = Vec::with_capacity(paths.len());
    for path in paths {
        temps.push(files::temporary(path)?.1);
    }
    let folder = files::folder_of(index);
    let _lock = files::lock_folder(&folder, index)?;
    let old = current(index);
    let old_shards: Vec<&String> = old.iter().flat_map(|(_, map)| map.values()).collect();
    // One pass over the folder: our temporaries, and hidden links no index names.
    let ours: Vec<String> =
        paths.iter().filter_map(|p| p.file_name()?.to_str().map(str::to_string)).collect();
    files::remove_stale(&folder, &|name| ours.iter().any(|o| o == name), &|file| {
        files::left_by_dead_process(file, OLD_MARK) && !old_shards.iter().any(|s| *s == file)
    });
    files::write_temporaries(paths, &temps, write)?;
    let result = keep_old_reachable(index, &folder, shards, old.as_ref()).and_then(|named| {
        for ((temp, path), _) in temps.iter().zip(paths).zip(0..shards.len()) {
            files::commit(temp, path, &folder)?;
        }
        files::commit(&temps[shards.len()], index, &folder)?;
        Ok(named)
    });
    match result {
        Ok(replaced) => {
            // The old set's files the new index does not name.
            for shard in replaced {
                let path = folder.join(&shard);
                if !paths.contains(&path) {
                    let _ = std::fs::remove_file(path);
                }
            }
            if let Ok(dir) = std::fs::File::open(&folder) {
                let _ = dir.sync_all();
            }
            Ok(())
        }
        Err(error) => {
            for temp in &temps {
                let _ = std::fs::remove_file(temp);
            }
            Err(error)
        }
    }
}

/// Before any shard the current index names is replaced: hard-links each such
/// shard to a hidden name and points the current index at the links. Returns
/// the shard files the (possibly rewritten) current index names.
fn keep_old_reachable(
    index: &Path,
    folder: &Path,
    shards: &[PathBuf],
    old: Option<&(serde_json::Value, BTreeMap<String, String>)>,
) -> Result<Vec<String>> {
    let Some((root, map)) = old else { return Ok(Vec::new()) };
    let mut named: Vec<String> = Vec::new();
    for shard in map.values() {
        if !named.contains(shard) {
            named.push(shard.clone());
        }
    }
    let clashing: Vec<String> = named.iter().filter(|s| shards.contains(&folder.join(s))).cloned().collect();
    if clashing.is_empty() {
        return Ok(named);
    }
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    for shard in &clashing {
        let path = folder.join(shard);
        if std::fs::symlink_metadata(&path).is_err() {
            continue; // the old set is broken already: nothing to keep
        }
        let (_, link) = files::hidden_name(&path, OLD_MARK)?;
        let io = |source| Error::Io { path: path.clone(), source };
        if std::fs::hard_link(&path, &link).is_err() {
            // A filesystem without hard links: a copy, synced.
            std::fs::copy(&path, &link).map_err(io)?;
            std::fs::File::open(&link).and_then(|f| f.sync_all()).map_err(io)?;
        }
        let link_name = link.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        renamed.insert(shard.clone(), link_name);
    }
    let mut root = root.clone();
    if let Some(serde_json::Value::Object(map)) = root.get_mut("weight_map") {
        for value in map.values_mut() {
            if let Some(link) = value.as_str().and_then(|s| renamed.get(s)) {
                *value = serde_json::Value::String(link.clone());
            }
        }
    }
    let text = serde_json::to_vec_pretty(&root).map_err(|e| Error::Format {
        path: index.into(),
        format: "safetensors index",
        message: e.to_string(),
    })?;
    files::write_atomically(index, |temp| {
        std::fs::write(temp, &text).map_err(|source| Error::Io { path: temp.into(), source })
    })?;
    Ok(named.into_iter().map(|s| renamed.get(&s).cloned().unwrap_or(s)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 15,000 temporaries left by dead writers of a set's files are removed in
    /// one pass over the folder, however many shards the set has.
    #[test]
    fn stale_temporaries_cost_one_scan() {
        let dir = tempfile::tempdir().unwrap();
        let names =
            ["m-00001-of-00003.safetensors", "m-00002-of-00003.safetensors", "m-00003-of-00003.safetensors"];
        // A PID above Linux's largest (2^22) is never alive.
        for k in 0..15_000 {
            let name = names[k % 3];
            std::fs::write(
                dir.path().join(format!(".{name}.transplant-tmp-{}-{k}", 9_000_000 + k % 7)),
                b"x",
            )
            .unwrap();
        }
        std::fs::write(dir.path().join(".other.transplant-tmp-9000000-1"), b"kept: not ours").unwrap();
        let mut paths: Vec<PathBuf> = names.iter().map(|n| dir.path().join(n)).collect();
        paths.push(dir.path().join("m.safetensors.index.json"));
        let before = files::scans();
        replace_set(&paths, |temps| {
            temps.iter().try_for_each(|t| {
                std::fs::write(t, b"{}").map_err(|source| Error::Io { path: t.clone(), source })
            })
        })
        .unwrap();
        assert_eq!(files::scans() - before, 1, "one scan of the folder");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".other.transplant-tmp-9000000-1",
                "m-00001-of-00003.safetensors",
                "m-00002-of-00003.safetensors",
                "m-00003-of-00003.safetensors",
                "m.safetensors.index.json"
            ]
        );
    }
}
