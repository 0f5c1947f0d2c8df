//! What a binary that links libtorch through tch-transplant needs at link time:
//! an rpath to libtorch's `lib/` (tch's own build script only reaches tch's
//! binaries), and `libtorch_cuda` kept linked where it exists so that CUDA is
//! seen. tch-transplant reports where it found libtorch as the `links`
//! metadata `DEP_TRANSPLANT_SHIM_LIBTORCH_LIB`.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TRANSPLANT_SHIM_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TRANSPLANT_SHIM_LIBTORCH_LIB") else {
        panic!("tch-transplant did not say where libtorch is (DEP_TRANSPLANT_SHIM_LIBTORCH_LIB unset)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
