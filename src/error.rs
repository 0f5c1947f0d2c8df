//! The one error type of the library. Every variant names what it concerns:
//! the file, the tensor, the rule.
use std::path::PathBuf;

/// What went wrong, with the file, tensor or rule concerned.
#[derive(Debug, thiserror::Error)]
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
    /// A libtorch operation on a named tensor failed.
    #[error("tensor {tensor}: {source}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// tch's error.
        source: tch::TchError,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
