//! What a TorchScript archive's `code/` says of its classes: a module class's
//! parameters, buffers, submodule types and declared attributes, whether a
//! file defines a class at all, and which globals libtorch's unpickler knows.
//! Text only: reading the files is `script_archive`'s.

/// A class's parameters and buffers, as its definition in `code/` lists them.
#[derive(Debug, Clone, Default)]
pub(super) struct Members {
    pub(super) parameters: Vec<String>,
    pub(super) buffers: Vec<String>,
    /// The types of attributes typed as `__torch__` classes (submodules among them).
    pub(super) children: Vec<String>,
    /// Every attribute the class declares (`name : Type`): libtorch refuses an
    /// object whose state sets any other.
    pub(super) attributes: Vec<String>,
}

/// The quoted names of a `__parameters__ = ["a", "b", ]` line.
fn names_in(line: &str) -> Vec<String> {
    let inside =
        line.split_once('[').and_then(|(_, rest)| rest.rsplit_once(']')).map_or("", |(inner, _)| inner);
    inside.split(',').map(|n| n.trim().trim_matches('"').to_string()).filter(|n| !n.is_empty()).collect()
}

/// The members of class `name` in a `code/` file's text, if it defines it as a module.
pub(super) fn members_of(text: &str, name: &str) -> Option<Members> {
    let header = format!("class {name}(Module):");
    let start = text.lines().position(|l| l.trim_end() == header)?;
    let mut members = Members::default();
    for line in text.lines().skip(start + 1).take_while(|l| l.starts_with(' ') || l.is_empty()) {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("__parameters__ =") {
            members.parameters = names_in(rest);
        } else if let Some(rest) = line.strip_prefix("__buffers__ =") {
            members.buffers = names_in(rest);
        } else if let Some(rest) = line.strip_prefix("__annotations__[\"") {
            // `__annotations__["0"] = __torch__.…`: an attribute whose name is no identifier.
            if let Some((attr, ty)) = rest.split_once("\"] = ") {
                members.attributes.push(attr.to_string());
                if ty.starts_with("__torch__.") {
                    members.children.push(ty.to_string());
                }
            }
        } else if let Some((attr, ty)) = line.split_once(" : ") {
            // A `Final[…]` attribute is a constant of the class, not state.
            if !attr.contains(' ') && !ty.starts_with("Final[") {
                members.attributes.push(attr.to_string());
                if ty.starts_with("__torch__.") {
                    members.children.push(ty.to_string());
                }
            }
        }
    }
    Some(members)
}

/// Whether a `code/` file's text defines a class `name` of any kind
/// (`class Name(Module):`, `class Name:`).
pub(super) fn defines_class(text: &str, name: &str) -> bool {
    let header = format!("class {name}");
    text.lines().any(|l| l.strip_prefix(&header).is_some_and(|rest| rest.starts_with(['(', ':'])))
}

/// Whether libtorch's unpickler resolves the global `module.name` (a
/// `__torch__` class is checked against `code/` where it is used).
pub(super) fn libtorch_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "builtins" | "__builtin__" => name == "set",
        "torch._utils" => {
            matches!(name, "_rebuild_tensor_v2" | "_rebuild_qtensor" | "_rebuild_sparse_tensor")
        }
        "torch.jit._pickle" => name.starts_with("build_") || name == "restore_type_tag",
        "torch" => name.ends_with("Storage") || name == "device",
        m => m == "__torch__" || m.starts_with("__torch__."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_definitions_give_parameters_and_buffers() {
        let text = "class BatchNorm2d(Module):\n  __parameters__ = [\"weight\", \"bias\", ]\n  __buffers__ = [\"running_mean\", ]\n  weight : Tensor\nclass Other(Module):\n  __parameters__ = [\"x\", ]\n";
        let m = members_of(text, "BatchNorm2d").unwrap();
        assert_eq!(m.parameters, ["weight", "bias"]);
        assert_eq!(m.buffers, ["running_mean"]);
        assert_eq!(members_of(text, "Other").unwrap().parameters, ["x"]);
        assert!(members_of(text, "Missing").is_none());
        assert!(names_in(" []").is_empty());
    }
}
