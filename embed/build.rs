//! What a binary that links libtorch through tch-transplant needs at link time:
//! an rpath to libtorch's `lib/` (tch's own build script only reaches tch's
//! binaries). tch-transplant reports where it found libtorch as the `links`
//! metadata `DEP_TRANSPLANT_SHIM_LIBTORCH_LIB`. CUDA needs nothing here:
//! tch-transplant loads `libtorch_cuda` before `main` where a CUDA driver is.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TRANSPLANT_SHIM_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TRANSPLANT_SHIM_LIBTORCH_LIB") else {
        panic!("tch-transplant did not say where libtorch is (DEP_TRANSPLANT_SHIM_LIBTORCH_LIB unset)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
