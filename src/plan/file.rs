//! Plans saved as JSON ([`PlanFile`]) and replayed: pairs by name with their
//! provenance, and digests of both models' entry lists, so that a plan is only
//! replayed on the models it was made for.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::build::Builder;
use super::{Plan, Side};
use crate::dtype;
use crate::entry::{Entry, Role};
use crate::error::{Error, Result};
use crate::matching::{How, Matcher};
use crate::store::Source;
use crate::transform::Transform;

/// sha256 over every entry's name, role, dtype and shape: what a saved plan
/// must find unchanged to be replayed.
pub(crate) fn entries_digest(entries: &[Entry]) -> String {
    let mut bytes = Vec::with_capacity(entries.len() * 64);
    for e in entries {
        bytes.extend_from_slice(e.name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(match e.role {
            Role::Parameter => b"parameter".as_slice(),
            Role::Buffer => b"buffer".as_slice(),
        });
        bytes.push(0);
        bytes.extend_from_slice(dtype::name(e.dtype).as_bytes());
        for d in &e.shape {
            bytes.extend_from_slice(&d.to_le_bytes());
        }
        bytes.push(b'\n');
    }
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A plan as saved to JSON: pairs by name with their provenance, leftovers,
/// and digests of both models' entry lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    /// Format version of this file.
    pub version: u32,
    /// The source the plan was made for.
    pub source: String,
    /// The target the plan was made for.
    pub target: String,
    /// [`PlanFile::digest`] of the source.
    pub source_digest: String,
    /// [`PlanFile::digest`] of the target.
    pub target_digest: String,
    /// Pairs: source name, target name, provenance.
    pub pairs: Vec<PlannedPair>,
    /// Source names left over.
    pub source_leftovers: Vec<String>,
    /// Target names left over.
    pub target_leftovers: Vec<String>,
    /// The matcher the plan was made with (absent in files written before it
    /// was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Matcher>,
}

/// One pair of a saved plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedPair {
    /// Source name.
    pub source: String,
    /// Target name.
    pub target: String,
    /// What made the pair when the plan was built.
    pub provenance: String,
    /// The pair's transform (a view of the source, a region of the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

const PLAN_FILE_VERSION: u32 = 1;
/// The largest plan file read (a plan of 100,000 pairs is about 20 MB).
const MAX_PLAN_BYTES: u64 = 512 << 20;

impl PlanFile {
    /// The digest a plan file records for a store with these entries (sha256
    /// over every entry's name, role, dtype and shape).
    pub fn digest(entries: &[Entry]) -> String {
        entries_digest(entries)
    }
}

impl Plan {
    /// The plan in its saved form, with the digests of `source` and `target`,
    /// which must be the stores it was made for. (The digests are only worked
    /// out here: most plans are never saved.)
    pub fn to_file(&self, source: &dyn Source, target: &dyn Source) -> Result<PlanFile> {
        self.ensure_fits(source, target)?;
        Ok(PlanFile {
            version: PLAN_FILE_VERSION,
            source: self.source.clone(),
            target: self.target.clone(),
            source_digest: entries_digest(source.entries()),
            target_digest: entries_digest(target.entries()),
            pairs: self
                .pairs
                .iter()
                .map(|p| PlannedPair {
                    source: p.source_name.to_string(),
                    target: p.target_name.to_string(),
                    provenance: p.provenance(),
                    transform: p.transform.clone(),
                })
                .collect(),
            source_leftovers: self.source_leftovers.iter().map(|l| l.name.to_string()).collect(),
            target_leftovers: self.target_leftovers.iter().map(|l| l.name.to_string()).collect(),
            matcher: Some(self.matcher),
        })
    }

    /// Writes the plan for `source` and `target` (the stores it was made for)
    /// as JSON, whole or not at all.
    pub fn save(&self, path: &std::path::Path, source: &dyn Source, target: &dyn Source) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.to_file(source, target)?).map_err(|e| Error::Format {
            path: path.into(),
            format: "plan",
            message: e.to_string(),
        })?;
        crate::files::write_atomically(path, |temp| {
            std::fs::write(temp, &json).map_err(|source| Error::Io { path: temp.into(), source })
        })
    }

    /// Rebuilds a saved plan for `source` and `target`, which must list exactly
    /// the entries (names, roles, dtypes, shapes) they listed when it was made.
    pub fn replay(path: &std::path::Path, source: &dyn Source, target: &dyn Source) -> Result<Self> {
        let bad = |message: String| Error::Format { path: path.into(), format: "plan", message };
        let text = crate::files::read_bounded(path, MAX_PLAN_BYTES, "plan file")?;
        let file: PlanFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != PLAN_FILE_VERSION {
            return Err(bad(format!(
                "version {} (this transplant reads version {PLAN_FILE_VERSION})",
                file.version
            )));
        }
        for (side, store, digest) in
            [(Side::Source, source, &file.source_digest), (Side::Target, target, &file.target_digest)]
        {
            if &entries_digest(store.entries()) != digest {
                return Err(Error::PlanOutdated {
                    plan: path.into(),
                    side: side.to_string(),
                    store: store.origin().into(),
                });
            }
        }
        let index = |store: &dyn Source| -> HashMap<String, usize> {
            store.entries().iter().enumerate().map(|(i, e)| (e.name.to_string(), i)).collect()
        };
        let (source_index, target_index) = (index(source), index(target));
        let mut b = Builder::new(source, target, Vec::new());
        let mut used_target = vec![false; target.entries().len()];
        for p in &file.pairs {
            let i = *source_index
                .get(&p.source)
                .ok_or_else(|| bad(format!("source has no tensor {}", p.source)))?;
            let j = *target_index
                .get(&p.target)
                .ok_or_else(|| bad(format!("target has no tensor {}", p.target)))?;
            // Several pairs fill one target only region by region (a cat's
            // members); the plan checks that the regions tile it.
            let region = p.transform.as_ref().is_some_and(|t| !t.target_ops.is_empty());
            if std::mem::replace(&mut used_target[j], true) && !region {
                return Err(bad(format!("target tensor {} is named by two pairs", p.target)));
            }
            b.pair_with(i, j, None, How::Plan, p.transform.clone());
            if let Some(pair) = b.pairs.last_mut() {
                pair.recorded = Some(p.provenance.as_str().into());
            }
        }
        b.pairs.sort_by_key(|p| p.target);
        Ok(Self::finish(b, file.matcher.unwrap_or(Matcher::Exact)))
    }
}
