//! The steps a command-line transfer is made of, from library calls: open the
//! source and the target (placed on a device, converted to a dtype), refuse an
//! output that would overwrite an input, and write the output in the target's
//! kind or the state-dict format its extension names.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use transplant::{Checkpoint, Error, Format, ModuleStore, Result, ScriptModule, StoreKind, Target};

/// Parses `cpu`, `cuda`, `cuda:N` and checks that the device exists here.
/// What to do about an incomplete transfer, from what is left open and what
/// was already asked (no `--match order` suggested to who passed it).
pub fn next_steps(plan: &transplant::Plan, matcher: transplant::Matcher) -> String {
    let open = |list: &[transplant::Leftover]| -> Vec<String> {
        let mut modules: Vec<String> = list
            .iter()
            .filter(|l| l.explained.is_none())
            .map(|l| transplant::Keep::module_pattern(&l.name))
            .collect();
        modules.dedup();
        modules
    };
    let (sources, targets) = (open(&plan.source_leftovers), open(&plan.target_leftovers));
    let flags = |flag: &str, patterns: &[String]| -> String {
        if patterns.len() > 3 {
            return format!("{flag} PATTERN");
        }
        patterns.iter().map(|p| format!("{flag} '{p}'")).collect::<Vec<_>>().join(" ")
    };
    let mut steps = Vec::new();
    if !sources.is_empty() || targets.is_empty() {
        steps.push("add rules (--map, --rules)".to_string());
    }
    if matcher != transplant::Matcher::Order && !sources.is_empty() && !targets.is_empty() {
        steps.push("try --match order".to_string());
    }
    if !sources.is_empty() {
        steps.push(format!("leave source tensors out on purpose with {}", flags("--skip", &sources)));
    }
    if !targets.is_empty() {
        steps.push(format!("keep target tensors as they are on purpose with {}", flags("--keep", &targets)));
    }
    steps.push("pass --allow-partial to write it anyway".to_string());
    let last = steps.pop().unwrap_or_default();
    if steps.is_empty() {
        last
    } else {
        format!("{}, or {last}", steps.join(", "))
    }
}

pub fn device(text: &str) -> Result<Device> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => Device::Cuda(index),
            None => {
                return Err(Error::Device {
                    device: text.into(),
                    reason: "expected cpu, cuda or cuda:N".into(),
                })
            }
        },
    };
    if let Device::Cuda(index) = device {
        if !tch::Cuda::is_available() {
            return Err(Error::Device {
                device: text.into(),
                reason: "CUDA is not available on this machine (no GPU, or libtorch without CUDA)".into(),
            });
        }
        let count = tch::Cuda::device_count() as usize;
        if index >= count {
            return Err(Error::Device {
                device: text.into(),
                reason: format!("this machine has {count} CUDA device(s)"),
            });
        }
    }
    Ok(device)
}

/// The model file `path` stands for ([`transplant::model_file`]); where
/// `path` is a folder, one line on stderr names the file chosen.
pub fn model_file(path: &Path) -> Result<PathBuf> {
    let file = transplant::model_file(path)?;
    if file != path {
        eprintln!(
            "{}: a model folder; reading {} (as from_pretrained chooses)",
            path.display(),
            file.display()
        );
    }
    Ok(file)
}

/// Opens the model to copy from (`key`: see [`store::open_with_key`]).
pub fn open_source(path: &Path, key: Option<&str>) -> Result<Box<dyn Target>> {
    transplant::open_with_key(model_file(path)?, key)
}

/// Opens the model to copy into, its tensors on `device` and, with `dtype`,
/// its floating tensors converted to that dtype.
pub fn open_target(path: &Path, device: Device, dtype: Option<Kind>) -> Result<Box<dyn Target>> {
    let file = model_file(path)?;
    let path = file.as_path();
    match transplant::sniff(path)? {
        // On the CPU a module is read and rewritten as an archive (converted
        // to `dtype` there too), running none of its code; a device needs libtorch.
        Format::TorchScript if device == Device::Cpu => {
            let archive = transplant::ScriptArchive::open(path)?;
            Ok(Box::new(match dtype {
                Some(dtype) => archive.converted(dtype)?,
                None => archive,
            }))
        }
        Format::TorchScript => {
            let mut module = ScriptModule::load_on(path, device)?;
            if dtype.is_some() {
                module.to(device, dtype)?;
            }
            Ok(Box::new(ModuleStore::new(module)?))
        }
        _ => {
            let checkpoint = Checkpoint::open(path)?;
            if device == Device::Cpu && dtype.is_none() {
                Ok(Box::new(checkpoint))
            } else {
                Ok(Box::new(checkpoint.converted(device, dtype)?))
            }
        }
    }
}

/// Creates the folders `out` needs that do not exist (its parents; for a
/// Distributed Checkpoint `DIR/`, DIR's parents), recording each in `created`,
/// outermost first, so that a failed command can remove them again.
pub fn create_folders_of(out: &Path, created: &mut Vec<PathBuf>) -> Result<()> {
    let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) else { return Ok(()) };
    let missing: Vec<&Path> =
        parent.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).collect();
    for folder in missing.into_iter().rev() {
        std::fs::create_dir(folder).map_err(|source| Error::Io { path: folder.into(), source })?;
        created.push(folder.to_path_buf());
    }
    Ok(())
}

/// Refuses an output path that is a folder (unless it names a Distributed
/// Checkpoint folder, `DIR/`) or whose write would create, replace or remove a
/// file an input reads ([`transplant::check_output`]). (The library refuses
/// special files and symbolic links where it writes.)
pub fn check_output(out: &Path, inputs: &[&Path]) -> Result<()> {
    if out.is_dir() && !out.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Error::Output { path: out.into(), reason: "is a directory".into() });
    }
    transplant::check_output(out, inputs)
}

/// What a conversion read, renamed, transformed, skipped and wrote, in numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertSummary {
    /// Tensors in the source.
    pub read: usize,
    /// Source tensors a rule renamed (transformed or not).
    pub renamed: usize,
    /// Source tensors a rule transformed (ops, split, cat).
    pub transformed: usize,
    /// Source tensors a rule skipped.
    pub skipped: usize,
    /// Tensors written.
    pub written: usize,
    /// Tensors whose dtype was converted.
    pub cast: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Names tied in the source, written as separate tensors.
    pub untied: Vec<Vec<String>>,
    /// Names tied in the source that share one storage in the result.
    pub tied: Vec<Vec<String>>,
}

impl ConvertSummary {
    pub fn new(
        plan: &transplant::Plan,
        source: &dyn transplant::Source,
        converted: &transplant::Converted,
    ) -> Self {
        use std::collections::HashSet;
        let renamed: HashSet<usize> =
            plan.pairs.iter().filter(|p| p.rule.is_some()).map(|p| p.source).collect();
        let transformed: HashSet<usize> =
            plan.pairs.iter().filter(|p| p.transform.is_some()).map(|p| p.source).collect();
        let skipped = plan
            .source_leftovers
            .iter()
            .filter(|l| l.explained.as_deref().is_some_and(|e| e.starts_with("skipped")))
            .count();
        Self {
            read: source.entries().len(),
            renamed: renamed.len(),
            transformed: transformed.len(),
            skipped,
            written: converted.tensors,
            cast: converted.casts,
            bytes: converted.bytes,
            files: converted.files.iter().map(|f| f.path.clone()).collect(),
            untied: converted.untied.clone(),
            tied: converted.tied.clone(),
        }
    }
}

impl std::fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "  read {} tensors; renamed {}, transformed {}, skipped {}; wrote {} tensors ({:.1} MB{})",
            self.read,
            self.renamed,
            self.transformed,
            self.skipped,
            self.written,
            self.bytes as f64 / 1e6,
            if self.cast > 0 { format!(", {} cast", self.cast) } else { String::new() }
        )?;
        for group in &self.untied {
            let names: Vec<String> = group.iter().map(|n| transplant::escaped(n).into_owned()).collect();
            writeln!(
                f,
                "  note: {} share memory in the source (tied); this format cannot share, so each was written as its own tensor",
                names.join(", ")
            )?;
        }
        for group in &self.tied {
            let names: Vec<String> = group.iter().map(|n| transplant::escaped(n).into_owned()).collect();
            writeln!(
                f,
                "  note: {} share memory in the source (tied), and share one storage in the result",
                names.join(", ")
            )?;
        }
        for file in &self.files {
            writeln!(f, "  wrote {}", file.display())?;
        }
        Ok(())
    }
}

/// What writing `target` to `out` makes, from `out`'s name.
enum Output {
    /// A Distributed Checkpoint folder (`out` ends in `/`).
    Distributed,
    /// Sharded safetensors with shards of at most these bytes.
    Sharded(u64),
    /// The target's state dict in another format than its own.
    StateDict(Format),
    /// The target in its own kind (a module stays a module).
    Own,
}

fn output_of(target: &dyn Target, out: &Path, max_shard_bytes: Option<u64>) -> Result<Output> {
    let name = out.to_string_lossy().to_ascii_lowercase();
    if name.ends_with('/') {
        return Ok(Output::Distributed);
    }
    if name.ends_with(".safetensors.index.json") {
        return Ok(Output::Sharded(max_shard_bytes.unwrap_or(transplant::DEFAULT_MAX_SHARD_BYTES)));
    }
    if max_shard_bytes.is_some() {
        return Err(Error::Output {
            path: out.into(),
            reason: "--max-shard-size writes sharded safetensors: name the index, as DIR/model.safetensors.index.json"
                .into(),
        });
    }
    let asked = Format::for_extension(out);
    let own = match target.kind() {
        StoreKind::Checkpoint(f) => Some(f),
        _ => None,
    };
    Ok(match asked {
        Some(format @ (Format::Safetensors | Format::TorchSave | Format::TchArchive | Format::Npz))
            if asked != own =>
        {
            Output::StateDict(format)
        }
        _ => Output::Own,
    })
}

/// Whether writing `target` to `out` is a rewrite of its TorchScript archive
/// (the output keeps the target's kind), which a copy can stream.
pub fn streams_into_archive(target: &dyn Target, out: &Path, max_shard_bytes: Option<u64>) -> bool {
    target.as_script_archive().is_some() && matches!(output_of(target, out, max_shard_bytes), Ok(Output::Own))
}

/// What [`write_output`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// The file.
    pub path: PathBuf,
    /// Its kind.
    pub kind: String,
}

/// Writes `target` to `out`, whole or not at all: in the target's own kind (a
/// module stays a module, with its code and the new tensors), unless `out`'s
/// extension names another state-dict format (`.safetensors`, `.pth`/`.bin`,
/// `.ot`, `.npz`), which then gets the target's state dict.
pub fn write_output(target: &dyn Target, out: &Path, max_shard_bytes: Option<u64>) -> Result<Written> {
    match output_of(target, out, max_shard_bytes)? {
        Output::Distributed => {
            // A Distributed Checkpoint folder, under the key DST was read with.
            transplant::save_distributed(target, out, target.key())?;
            return Ok(Written { path: out.into(), kind: Format::DistributedCheckpoint.to_string() });
        }
        Output::Sharded(max) => {
            let files = transplant::save_sharded(target, out, max)?;
            return Ok(Written {
                path: out.into(),
                kind: format!("sharded safetensors, {} shard(s)", files.len() - 1),
            });
        }
        Output::StateDict(format) => {
            let named = (0..target.entries().len())
                .filter_map(|i| {
                    target.tensor(i).map(|t| (target.entries()[i].name.to_string(), t.shallow_clone()))
                })
                .collect();
            Checkpoint::from_tensors(target.origin(), format, named, BTreeMap::new())?
                .save_as(out, format)?;
            return Ok(Written { path: out.into(), kind: format.to_string() });
        }
        Output::Own => {}
    }
    target.save(out)?;
    // A sharded checkpoint is saved as one safetensors file.
    let kind = match target.kind() {
        StoreKind::Checkpoint(Format::SafetensorsIndex) => Format::Safetensors.to_string(),
        kind => kind.to_string(),
    };
    Ok(Written { path: out.into(), kind })
}
