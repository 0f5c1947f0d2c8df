//! The one error type of the library. Every variant names what it concerns:
//! the file, the tensor, the rule.
use std::path::PathBuf;

/// What went wrong, with the file, tensor or rule concerned.
///
/// New variants may come in minor releases: match on [`Error::kind`] or keep a
/// `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A path could not be handed to libtorch (it contains a NUL byte).
    #[error("{path}: path contains a NUL byte")]
    NulInPath {
        /// The offending path.
        path: PathBuf,
    },
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A TorchScript module could not be loaded.
    #[error("cannot load TorchScript module {path}: {message}")]
    LoadModule {
        /// The file that was read.
        path: PathBuf,
        /// libtorch's explanation.
        message: String,
    },
    /// A TorchScript module could not be saved.
    #[error("cannot save TorchScript module {module} to {path}: {message}")]
    SaveModule {
        /// Where the module came from.
        module: String,
        /// The file that was written.
        path: PathBuf,
        /// libtorch's explanation.
        message: String,
    },
    /// An operation on a loaded TorchScript module failed.
    #[error("TorchScript module {module}: {operation} failed: {message}")]
    Module {
        /// Where the module came from.
        module: String,
        /// What was attempted (`forward`, `deepcopy`, ...).
        operation: &'static str,
        /// libtorch's explanation.
        message: String,
    },
    /// A path names a folder (or something else) where a file was expected.
    #[error("{path}: is a directory (or not a regular file), expected a model file")]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// A folder given as a model holds no model file, or several that disagree.
    #[error("{path}: {message}")]
    ModelFolder {
        /// The folder.
        path: PathBuf,
        /// What it holds, and what was looked for.
        message: String,
    },
    /// A model file is empty.
    #[error("{path}: the file is empty")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// A file's content is none of the supported kinds.
    #[error(
        "{path}: unknown file kind: expected a TorchScript module, a torch.save checkpoint, \
         .safetensors, a *.safetensors.index.json, a tch .ot or an .npz"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A file of a known format is malformed.
    #[error("{path}: invalid {format} file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format it claims to be.
        format: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A file's format is recognised but cannot be used here.
    #[error("{path}: {format} is not supported here: {hint}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Its format.
        format: crate::entry::Format,
        /// What to do instead.
        hint: String,
    },
    /// A tensor's element type has no libtorch equivalent.
    #[error("{path}: tensor {tensor} has dtype {dtype}, which libtorch does not support")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The file's name of the dtype.
        dtype: String,
    },
    /// A tensor cannot be written in a format.
    #[error("{path}: cannot write tensor {tensor} as {format}: {reason}")]
    Unrepresentable {
        /// The file being written.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The format.
        format: &'static str,
        /// Why.
        reason: String,
    },
    /// A sharded checkpoint and one of its shards disagree.
    #[error("sharded checkpoint {index}: shard {shard} {message}")]
    Shard {
        /// The `*.safetensors.index.json`.
        index: PathBuf,
        /// The shard file.
        shard: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Two tensors of one store share a name.
    #[error("{origin}: two tensors are named {tensor}")]
    DuplicateName {
        /// The store.
        origin: String,
        /// The name.
        tensor: String,
    },
    /// A rename/skip rule is malformed.
    #[error("rule at {at}: {message}")]
    Rule {
        /// Where the rule was written.
        at: String,
        /// What is wrong.
        message: String,
    },
    /// A plan's check found errors; nothing was written.
    #[error("the plan from {from} to {target} has {} problem(s); nothing was written:\n  {}", problems.len(), problems.join("\n  "))]
    PlanRejected {
        /// The source store.
        from: String,
        /// The target store.
        target: String,
        /// Each problem, described.
        problems: Vec<String>,
    },
    /// A model given to lend its registration order (`--order-from`) cannot.
    #[error("--order-from {origin}: {problem}")]
    OrderFrom {
        /// The model that was to lend its order.
        origin: String,
        /// What is wrong.
        problem: String,
    },
    /// A store lacks a tensor a plan pairs: the plan was made for other models.
    #[error("{store} has no tensor {tensor}: the plan was made for other models")]
    MissingTensor {
        /// The store.
        store: String,
        /// The tensor the plan names.
        tensor: String,
    },
    /// A saved plan was made for models whose entries have changed since.
    #[error("plan {plan} was made for another {side}: the entries of {store} changed (names, roles, dtypes or shapes); make the plan again")]
    PlanOutdated {
        /// The plan file.
        plan: PathBuf,
        /// `source` or `target`.
        side: String,
        /// The store that changed.
        store: String,
    },
    /// libtorch failed while copying into a target.
    #[error("copying into {store}{} failed: {message}", tensor.as_ref().map_or(String::new(), |t| format!(", tensor {t},")))]
    CopyFailed {
        /// The target (its file, or a description).
        store: String,
        /// The target tensor, when one is known.
        tensor: Option<String>,
        /// libtorch's explanation.
        message: String,
    },
    /// After a copy, a target tensor does not hold what its source held.
    #[error("verification failed: target {target} does not equal source {source_name} after the copy")]
    Verification {
        /// The source tensor.
        source_name: String,
        /// The target tensor.
        target: String,
    },
    /// A checkpoint has no value under the key asked for.
    #[error("{path}: no key {key} in the checkpoint (keys there: {available})")]
    NoSuchKey {
        /// The checkpoint.
        path: PathBuf,
        /// The key asked for.
        key: String,
        /// Keys that exist at the level where the search stopped.
        available: String,
    },
    /// A checkpoint holds several dicts of tensors and none was chosen.
    #[error("{path}: several dicts of tensors ({candidates}); choose one with --key{}", if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    AmbiguousKey {
        /// The checkpoint.
        path: PathBuf,
        /// The keys that hold tensors.
        candidates: String,
        /// Which are the usual ones.
        hint: String,
    },
    /// A device asked for cannot be used.
    #[error("device {device}: {reason}")]
    Device {
        /// The device as given.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// An input is a device, FIFO or socket, not a regular file.
    #[error("{path}: not a regular file (a device, FIFO or socket); refused")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// A file is larger than what is read of its kind.
    #[error("{path}: larger than {limit} bytes, the most a {what} may be; refused")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What kind of file it is.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// Model inputs asked for would hold more elements than allowed.
    #[error("inputs {shapes:?} hold {} elements, more than the {limit} allowed", elements.map_or("too many".to_string(), |n| n.to_string()))]
    InputTooLarge {
        /// The shapes asked for.
        shapes: Vec<Vec<i64>>,
        /// Their elements together (`None`: more than a u64 holds).
        elements: Option<u64>,
        /// The bound.
        limit: u64,
    },
    /// An output path cannot be used.
    #[error("output {path} {reason}")]
    Output {
        /// The output path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// A live weight sync over torch.distributed failed: a peer gone, a
    /// timeout, a store or group that could not be reached or joined.
    #[error("sync: {message}")]
    Sync {
        /// What failed, and where.
        message: String,
    },
    /// A lock was poisoned by a panic in another thread.
    #[error("{what}: a lock was poisoned by a panic in another thread")]
    Poisoned {
        /// What the lock guards.
        what: &'static str,
    },
    /// A libtorch operation on a named tensor failed.
    #[error("tensor {tensor} of {store}: {source}")]
    Tensor {
        /// Where the tensor is (a file, or a description).
        store: String,
        /// The tensor's name.
        tensor: String,
        /// tch's error.
        source: tch::TchError,
    },
    /// A merge cannot be made as asked: its options, or inputs that cannot be
    /// merged (a dtype, a method's number of models).
    #[error("merge: {message}")]
    Merge {
        /// What is wrong, naming the option, input or tensor.
        message: String,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Matches the variants that name a file: `$path` binds their `path`, `$plan`
/// a saved plan's path; every other variant gives `$none`. (The one list of
/// which variants name a file.)
macro_rules! file_of {
    ($error:expr, $path:ident => $with_path:expr, $plan:ident => $with_plan:expr, $none:expr) => {
        match $error {
            Error::NulInPath { path: $path }
            | Error::Io { path: $path, .. }
            | Error::LoadModule { path: $path, .. }
            | Error::SaveModule { path: $path, .. }
            | Error::NotAFile { path: $path }
            | Error::ModelFolder { path: $path, .. }
            | Error::EmptyFile { path: $path }
            | Error::NotRegular { path: $path }
            | Error::TooLarge { path: $path, .. }
            | Error::UnknownFormat { path: $path }
            | Error::Format { path: $path, .. }
            | Error::Unsupported { path: $path, .. }
            | Error::UnsupportedDtype { path: $path, .. }
            | Error::Unrepresentable { path: $path, .. }
            | Error::Output { path: $path, .. }
            | Error::NoSuchKey { path: $path, .. }
            | Error::AmbiguousKey { path: $path, .. } => $with_path,
            Error::PlanOutdated { plan: $plan, .. } => $with_plan,
            _ => $none,
        }
    };
}

impl Error {
    /// The variant's name in snake case (`plan_rejected`), for programs: stable
    /// across releases, unlike the message.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NulInPath { .. } => "nul_in_path",
            Error::Io { .. } => "io",
            Error::LoadModule { .. } => "load_module",
            Error::SaveModule { .. } => "save_module",
            Error::Module { .. } => "module",
            Error::NotAFile { .. } => "not_a_file",
            Error::ModelFolder { .. } => "model_folder",
            Error::EmptyFile { .. } => "empty_file",
            Error::UnknownFormat { .. } => "unknown_format",
            Error::Format { .. } => "format",
            Error::Unsupported { .. } => "unsupported",
            Error::UnsupportedDtype { .. } => "unsupported_dtype",
            Error::Unrepresentable { .. } => "unrepresentable",
            Error::Shard { .. } => "shard",
            Error::DuplicateName { .. } => "duplicate_name",
            Error::Rule { .. } => "rule",
            Error::PlanRejected { .. } => "plan_rejected",
            Error::OrderFrom { .. } => "order_from",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::PlanOutdated { .. } => "plan_outdated",
            Error::CopyFailed { .. } => "copy_failed",
            Error::Verification { .. } => "verification",
            Error::NoSuchKey { .. } => "no_such_key",
            Error::AmbiguousKey { .. } => "ambiguous_key",
            Error::Device { .. } => "device",
            Error::NotRegular { .. } => "not_regular",
            Error::TooLarge { .. } => "too_large",
            Error::InputTooLarge { .. } => "input_too_large",
            Error::Output { .. } => "output",
            Error::Sync { .. } => "sync",
            Error::Poisoned { .. } => "poisoned",
            Error::Tensor { .. } => "tensor",
            Error::Merge { .. } => "merge",
        }
    }

    /// The file the error concerns, when it concerns one.
    pub fn path(&self) -> Option<&std::path::Path> {
        file_of!(self, path => Some(path.as_path()), plan => Some(plan.as_path()), None)
    }

    /// The same error, naming `to` wherever it named the file `from` (a temporary
    /// file stands for its destination in messages).
    pub(crate) fn with_path(mut self, from: &std::path::Path, to: &std::path::Path) -> Self {
        // The path itself, or a file inside it (a folder written whole).
        let rename = |path: &mut std::path::PathBuf| {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
            }
        };
        file_of!(&mut self, path => rename(path), _plan => (), ());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::Error;
    use std::path::PathBuf;

    /// The variant's name as `Debug` writes it, in snake case: what `kind` must say.
    fn debug_name(error: &Error) -> String {
        let debug = format!("{error:?}");
        let name: String = debug.chars().take_while(char::is_ascii_alphanumeric).collect();
        let mut snake = String::new();
        for (i, c) in name.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                snake.push('_');
            }
            snake.push(c.to_ascii_lowercase());
        }
        snake
    }

    #[test]
    fn kind_is_the_variant_name_in_snake_case() {
        let path = PathBuf::from("m.pt");
        let errors = [
            Error::NulInPath { path: path.clone() },
            Error::NotAFile { path: path.clone() },
            Error::UnknownFormat { path: path.clone() },
            Error::Poisoned { what: "slot" },
            Error::Io { path, source: std::io::Error::other("x") },
        ];
        let kinds: Vec<&str> = errors.iter().map(Error::kind).collect();
        assert_eq!(kinds, ["nul_in_path", "not_a_file", "unknown_format", "poisoned", "io"]);
        for error in &errors {
            assert_eq!(error.kind(), debug_name(error));
        }
    }
}
