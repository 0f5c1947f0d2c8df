//! The files a command reads and the files its write creates, replaces or
//! removes, compared before anything is written: an output never eats an input.
//!
//! An input reads the file named and, for a sharded index, every shard its
//! `weight_map` names, and for a Distributed Checkpoint folder, the folder and
//! every file in it. An output writes the file named; for a sharded index also
//! the shards of the set it writes (`STEM-NNNNN-of-NNNNN.safetensors` beside
//! it, whichever number of shards it turns out to be), those the index there
//! now names (they are removed when replaced); for a folder
//! (`DIR/`), everything inside it. Files are the same when their paths are,
//! once symbolic links and `..` are resolved (for files not yet made, through
//! their folder), or when they are one file (device and inode, hard links).
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// One file (or folder) as compared: its resolved path and its identity.
struct Spot {
    /// As named by the user or the index (for messages).
    named: PathBuf,
    resolved: PathBuf,
    id: Option<(u64, u64)>,
}

impl Spot {
    fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Spot { named: path.to_path_buf(), resolved: resolved(path), id }
    }

    fn is(&self, other: &Spot) -> bool {
        self.resolved == other.resolved || (self.id.is_some() && self.id == other.id)
    }
}

/// The path `path` has, or will have once made: symbolic links and `..`
/// resolved through the nearest folder that exists.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    let absolute = std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut base = absolute.as_path();
    loop {
        if let Ok(real) = base.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(name) => out.push(name),
                    _ => {}
                }
            }
            return out;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                base = parent;
            }
            _ => return absolute,
        }
    }
}

/// Entries a sharded index or a checkpoint folder may list before the rest is
/// ignored here (its reader refuses more).
const MAX_LISTED: usize = 1 << 20;

/// Every file reading `input` reads.
fn read_by(input: &Path) -> Vec<Spot> {
    let mut spots = vec![Spot::of(input)];
    let name = input.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    if std::fs::symlink_metadata(input).is_ok_and(|m| m.is_dir()) || input.is_dir() {
        let mut stack = vec![(input.to_path_buf(), 0)];
        while let Some((folder, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else { continue };
            for entry in entries.flatten().take(MAX_LISTED) {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && depth < 8 {
                    stack.push((path.clone(), depth + 1));
                }
                spots.push(Spot::of(&path));
            }
        }
    } else if name.ends_with(".index.json") {
        let folder = crate::files::folder_of(input);
        let text = crate::files::read_bounded(input, crate::format::MAX_INDEX_BYTES, "sharded index");
        let root: Option<serde_json::Value> = text.ok().and_then(|t| serde_json::from_slice(&t).ok());
        let shards: HashSet<&str> = root
            .as_ref()
            .and_then(|r| r.get("weight_map")?.as_object())
            .map(|m| m.values().filter_map(|v| v.as_str()).take(MAX_LISTED).collect())
            .unwrap_or_default();
        spots.extend(shards.into_iter().map(|s| Spot::of(&folder.join(s))));
    }
    spots
}

/// Whether `file` is a shard name of the set `STEM.safetensors.index.json`
/// writes: `STEM-NNNNN-of-NNNNN.safetensors`.
fn is_shard_of(file: &str, stem: &str) -> bool {
    let Some(rest) = file.strip_prefix(stem).and_then(|r| r.strip_prefix('-')) else { return false };
    let Some(rest) = rest.strip_suffix(".safetensors") else { return false };
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    rest.split_once("-of-").is_some_and(|(k, n)| digits(k) && digits(n))
}

/// Refuses to write `out` when writing it would create, replace or remove a
/// file that one of `inputs` reads (models, rules, plans: every file each one
/// reads, see the module's docs); the error names both. Nothing is written
/// either way.
pub fn check_output(out: &Path, inputs: &[&Path]) -> Result<()> {
    let read: Vec<(&Path, Spot)> =
        inputs.iter().flat_map(|input| read_by(input).into_iter().map(move |spot| (*input, spot))).collect();
    let refuse = |written: &Path, input: &Path, spot: &Spot| {
        let reason = if spot.named == input && written == out {
            format!("is the input {}", input.display())
        } else if spot.named == input {
            format!("would replace the input {}", input.display())
        } else if written == out {
            format!("is {}, a file the input {} reads", spot.named.display(), input.display())
        } else {
            format!("would replace {}, a file the input {} reads", written.display(), input.display())
        };
        Err(Error::Output {
            path: out.into(),
            reason: format!("{reason}; inputs are never modified: write elsewhere; nothing was written"),
        })
    };
    let text = out.as_os_str().to_string_lossy();
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if text.ends_with('/') || out.is_dir() {
        // A folder written whole: everything inside it is replaced.
        let folder = Spot::of(out);
        for (input, spot) in &read {
            if spot.resolved.starts_with(&folder.resolved) || spot.is(&folder) {
                return refuse(out, input, spot);
            }
        }
        return Ok(());
    }
    let mut written = vec![Spot::of(out)];
    if let Some(stem) = name.to_ascii_lowercase().strip_suffix(".safetensors.index.json") {
        let stem = &name[..stem.len()];
        let folder = crate::files::folder_of(out);
        let resolved_folder = resolved(&folder);
        // Shards to be made, whatever their number: by name.
        for (input, spot) in &read {
            let file = spot.resolved.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if spot.resolved.parent() == Some(resolved_folder.as_path()) && is_shard_of(file, stem) {
                return refuse(&folder.join(file), input, spot);
            }
        }
        // Shards there now (by identity too), and those the index there names.
        if let Ok(entries) = std::fs::read_dir(&folder) {
            for entry in entries.flatten().take(MAX_LISTED) {
                if entry.file_name().to_str().is_some_and(|f| is_shard_of(f, stem)) {
                    written.push(Spot::of(&entry.path()));
                }
            }
        }
        if out.exists() {
            written.extend(read_by(out).into_iter().skip(1));
        }
    }
    for spot in &written {
        if let Some((input, hit)) = read.iter().find(|(_, r)| r.is(spot)) {
            return refuse(&spot.named, input, hit);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_of_a_stem() {
        assert!(is_shard_of("model-00002-of-00003.safetensors", "model"));
        assert!(is_shard_of("a-b-00001-of-00001.safetensors", "a-b"));
        assert!(!is_shard_of("model-2-of-3.safetensors", "model"));
        assert!(!is_shard_of("model-00002-of-00003.bin", "model"));
        assert!(!is_shard_of("other-00002-of-00003.safetensors", "model"));
    }

    #[test]
    fn paths_not_yet_made_resolve_through_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(resolved(&dir.path().join("a/../b")), real.join("b"));
        assert_eq!(resolved(&dir.path().join("new/x")), real.join("new/x"));
    }
}
