//! The members of PyTorch's zip archives as libtorch's reader takes them: one
//! member per name, and the folder every record is read from.
use std::path::Path;

use crate::error::{Error, Result};

/// Refuses a zip archive that holds two members of one name: readers differ on
/// which one they take (the first, the last), so one file would mean two things.
pub(crate) fn check_unique_members<R: std::io::Read + std::io::Seek>(
    path: &Path,
    format: &'static str,
    archive: &mut zip::ZipArchive<R>,
) -> Result<()> {
    // The archive indexes members by name, one per name: fewer names than
    // members means a name is held twice.
    if archive.file_names().count() == archive.len() {
        return Ok(());
    }
    let mut seen = std::collections::HashSet::with_capacity(archive.len());
    let mut twice = String::new();
    for index in 0..archive.len() {
        if let Ok(member) = archive.by_index_raw(index) {
            if !seen.insert(member.name().to_string()) {
                twice = member.name().to_string();
                break;
            }
        }
    }
    Err(Error::Format {
        path: path.into(),
        format,
        message: format!(
            "holds two members named {twice:?}: refused (readers would disagree on which is meant)"
        ),
    })
}

/// The folder of a PyTorch zip archive as libtorch's reader finds it (`archive/`,
/// `model/`, with its slash): the folder of the archive's first member. Every record
/// is looked up under it; members in other folders are not part of the archive. An
/// archive whose first member lies in no folder is refused, as libtorch refuses it,
/// and so is one without the `version` record libtorch requires.
pub(crate) fn archive_folder<R: std::io::Read + std::io::Seek>(
    path: &Path,
    format: &'static str,
    archive: &mut zip::ZipArchive<R>,
) -> Result<String> {
    let bad = |message: String| Error::Format { path: path.into(), format, message };
    let first = match archive.by_index_raw(0) {
        Ok(member) => member.name().to_string(),
        Err(e) => return Err(bad(format!("no first member: {e}"))),
    };
    let Some((folder, _)) = first.split_once('/') else {
        return Err(bad(format!(
            "its first member {first:?} lies in no folder: PyTorch reads an archive from the folder of \
             its first member, and refuses this one"
        )));
    };
    let folder = format!("{folder}/");
    // libtorch's reader (2.13) refuses an archive any of whose members lies
    // outside that folder.
    for index in 0..archive.len() {
        if let Ok(member) = archive.by_index_raw(index) {
            if !member.name().starts_with(folder.as_str()) {
                return Err(bad(format!(
                    "member {:?} lies outside the archive's folder {folder} (its first member's): PyTorch \
                     refuses such an archive",
                    member.name()
                )));
            }
        }
    }
    let has = |name: &str| archive.file_names().any(|n| n.strip_prefix(folder.as_str()) == Some(name));
    if !has("version") && !has(".data/version") {
        return Err(bad(format!(
            "no {folder}version record: PyTorch refuses an archive without one (its records are read \
             from {folder}, the folder of the first member)"
        )));
    }
    Ok(folder)
}
