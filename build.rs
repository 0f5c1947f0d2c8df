//! Compiles the shim in `csrc/` (TorchScript modules; c10d's store and Gloo
//! groups) against the libtorch that tch links, and makes every binary, test
//! and example of this package find libtorch at run time (rpath). libtorch_cuda
//! is loaded by the shim at start, only where a CUDA driver exists.
use std::env;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const SHIM_FILES: &[&str] = &[
    "csrc/shim.cpp",
    "csrc/shim.h",
    "csrc/guard.h",
    "csrc/c10d.cpp",
    "csrc/c10d.h",
    "csrc/gloo/algorithm.h",
    "csrc/gloo/common/error.h",
    "csrc/gloo/context.h",
    "csrc/gloo/rendezvous/store.h",
    "csrc/gloo/transport/device.h",
];

const HOW_TO_FIX: &str = "run `scripts/setup.sh` (it installs the PyTorch 2.13.0 wheel into .venv \
and links it as .libtorch, which .cargo/config.toml points LIBTORCH at), \
or set LIBTORCH to a libtorch 2.13.0 folder (the one holding lib/ and include/)";

fn env_var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok()
}

/// The lib dir of the libtorch that torch-sys linked (it declares `links = "tch"`).
fn libtorch_lib_dir() -> Result<PathBuf> {
    let lib = match env_var("DEP_TCH_LIBTORCH_LIB") {
        Some(lib) => PathBuf::from(lib),
        None => bail!("torch-sys did not report a libtorch lib dir: {HOW_TO_FIX}"),
    };
    if !lib.join("libtorch_cpu.so").exists() && !lib.join("libtorch_cpu.dylib").exists() {
        bail!(
            "no libtorch_cpu library in {} (LIBTORCH={}): {HOW_TO_FIX}",
            lib.display(),
            env::var("LIBTORCH").unwrap_or_else(|_| "<unset>".into())
        );
    }
    Ok(lib)
}

fn include_dirs(lib: &Path) -> Result<Vec<PathBuf>> {
    let root = lib.parent().with_context(|| format!("libtorch lib dir {} has no parent", lib.display()))?;
    let root = match env_var("LIBTORCH_INCLUDE") {
        Some(include_root) => PathBuf::from(include_root),
        None => root.to_path_buf(),
    };
    let include = root.join("include");
    if !include.join("torch/script.h").exists() {
        bail!("libtorch headers not found in {}: {HOW_TO_FIX}", include.display());
    }
    Ok(vec![include.clone(), include.join("torch/csrc/api/include")])
}

fn main() -> Result<()> {
    for file in SHIM_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let lib = libtorch_lib_dir()?;
    let includes = include_dirs(&lib)?;
    let cxx11_abi = env_var("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".into());

    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .includes(&includes)
        // gloo's declarations for c10d's ProcessGroupGloo.hpp (csrc/gloo/README.md).
        .include("csrc")
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // at::parallel_for in the shim runs on libtorch's OpenMP threads.
        .flag("-fopenmp")
        .file("csrc/shim.cpp")
        .file("csrc/c10d.cpp")
        .compile("transplant_shim");

    // Binaries, tests and examples run without LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // libtorch_cuda is not linked (the linker drops it under --as-needed, as
    // nothing references it by symbol): the shim loads it at start where a
    // CUDA driver exists (csrc/shim.cpp, `load_cuda_backend`), so a CPU run
    // does not map it.
    println!("cargo:libtorch_lib={}", lib.display());
    Ok(())
}
