//! The layering the README's architecture section describes: `src/lib.rs`
//! declares the modules from the bottom up, and each module uses only itself
//! and those declared before it. (Doc links are text, not dependencies.)
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::NAME` in code (comments left out).
fn crate_uses(text: &str) -> Vec<String> {
    let mut uses = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let name: String =
                rest[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                uses.push(name);
            }
            rest = &rest[at + 7..];
        }
    }
    uses
}

#[test]
fn every_module_uses_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')))
        .map(str::to_string)
        .collect();
    assert!(order.len() > 10, "modules declared in lib.rs: {order:?}");
    let rank: HashMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut wrong = Vec::new();
    for module in &order {
        let mut files = Vec::new();
        let single = src.join(format!("{module}.rs"));
        if single.exists() {
            files.push(single);
        } else {
            rust_files(&src.join(module), &mut files);
        }
        assert!(!files.is_empty(), "no source for module {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for used in crate_uses(&text) {
                match rank.get(used.as_str()) {
                    Some(&r) if r > rank[module.as_str()] => wrong
                        .push(format!("{} uses crate::{used}, which sits above {module}", file.display())),
                    _ => {}
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// No source file over ~500 lines unless its opening comment says why.
#[test]
fn long_files_say_why() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let mut unexplained = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if text.lines().count() > 500 && !text.lines().take(20).any(|l| l.contains("Long because")) {
            unexplained.push(file.display().to_string());
        }
    }
    assert!(unexplained.is_empty(), "long files without a reason: {unexplained:?}");
}
