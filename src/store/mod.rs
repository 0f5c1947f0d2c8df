//! Stores: the things that hold a model's named tensors.

use std::fmt;

/// Whether a named tensor is a learned parameter or a buffer (running statistics,
/// counters, masks: state that `parameters()` does not list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A learned weight (`nn.Parameter`; a trainable tch variable).
    Parameter,
    /// Registered state that is not a parameter (`running_mean`, `num_batches_tracked`, ...).
    Buffer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Parameter => "parameter",
            Role::Buffer => "buffer",
        })
    }
}
