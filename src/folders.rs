//! Folders written whole: a Distributed Checkpoint is built in a temporary
//! folder beside its path and switched in with one atomic step, exchanging it
//! with the old folder (`renameat2(RENAME_EXCHANGE)`), or renamed where there
//! is none.
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{remove_stale, sync, temporary_name};

/// Whether `path` is a folder holding only a Distributed Checkpoint's files:
/// `.metadata` and `*.distcp`, regular files. No other folder is replaced.
pub(crate) fn is_checkpoint_folder(path: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(path) else { return false };
    entries.into_iter().all(|entry| {
        entry.is_ok_and(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            e.file_type().is_ok_and(|t| t.is_file()) && (name == ".metadata" || name.ends_with(".distcp"))
        })
    })
}

/// Writes a folder (a Distributed Checkpoint) as one: into a temporary folder
/// next to `path`, switched into place only when `write` succeeded; an error
/// removes it. An existing `path` (a checkpoint folder: `.metadata` and
/// `*.distcp` files only) is exchanged with the new folder in one atomic step
/// (`renameat2(RENAME_EXCHANGE)`), then removed: a killed writer or a second
/// writer leaves the old folder or the new one, never a mix. A temporary folder
/// left by a killed writer is removed by the next write to `path`.
pub(crate) fn write_folder_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let trimmed: PathBuf = path.components().collect();
    let replaces =
        match std::fs::symlink_metadata(&trimmed) {
            Ok(meta) if meta.is_dir() && is_checkpoint_folder(&trimmed) => true,
            Ok(meta) if meta.is_dir() => {
                return Err(Error::Output {
                    path: path.into(),
                    reason: "is a folder that holds more than a Distributed Checkpoint's files (.metadata, \
                         *.distcp); only such a folder is replaced; nothing was written"
                        .into(),
                })
            }
            Ok(_) => return Err(Error::Output {
                path: path.into(),
                reason:
                    "exists and is not a folder (a Distributed Checkpoint is a folder); nothing was written"
                        .into(),
            }),
            Err(_) => false,
        };
    let (folder, temp) = temporary_name(&trimmed)?;
    let name = trimmed.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    remove_stale(&folder, &|n| n == name, &|_| false);
    std::fs::create_dir(&temp).map_err(|source| Error::Io { path: path.into(), source })?;
    let result = write(&temp).map_err(|error| error.with_path(&temp, &trimmed)).and_then(|()| {
        for entry in std::fs::read_dir(&temp).map_err(|source| Error::Io { path: temp.clone(), source })? {
            let entry = entry.map_err(|source| Error::Io { path: temp.clone(), source })?;
            sync(&entry.path(), path)?;
        }
        if let Ok(dir) = File::open(&temp) {
            let _ = dir.sync_all();
        }
        switch_folder(&temp, &trimmed, replaces)
    });
    // After an exchange the temporary name holds the old folder.
    let _ = std::fs::remove_dir_all(&temp);
    if let Ok(dir) = File::open(&folder) {
        let _ = dir.sync_all();
    }
    result
}

/// Puts the folder `temp` at `path` in one step: exchanged with the folder
/// there (`replaces`), or renamed where there is none (never over one that
/// appeared meanwhile: a checkpoint folder that did is exchanged instead).
fn switch_folder(temp: &Path, path: &Path, replaces: bool) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let io = |source| Error::Io { path: path.into(), source };
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| io(e.into()));
    let (from, to) = (c(temp)?, c(path)?);
    let rename = |flags: libc::c_uint| {
        // SAFETY: two NUL-terminated paths that outlive the call; renameat2
        // reads them and keeps no pointer.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if !replaces {
        match rename(libc::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            // A filesystem without renameat2's flags, and nothing there: rename.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && std::fs::symlink_metadata(path).is_err() => {
                return std::fs::rename(temp, path).map_err(io);
            }
            Err(e) => return Err(io(e)),
        }
        if !is_checkpoint_folder(path) {
            return Err(Error::Output {
                path: path.into(),
                reason: "appeared while the checkpoint was written, and holds more than a checkpoint's \
                         files; nothing was replaced"
                    .into(),
            });
        }
    }
    rename(libc::RENAME_EXCHANGE).map_err(|e| match e.raw_os_error() {
        Some(libc::EINVAL) => Error::Output {
            path: path.into(),
            reason: "exists, and this filesystem cannot exchange two folders in one step \
                     (renameat2 RENAME_EXCHANGE): remove it first or write elsewhere; nothing was replaced"
                .into(),
        },
        _ => io(e),
    })
}
