//! libtorch's CUDA backend is mapped only where a CUDA driver is installed:
//! a run on a machine without a GPU does not pay for ~1 GB of CUDA code, and
//! where a driver is, CUDA is there from the start as if linked.

/// The shared objects this process has mapped.
fn mapped(library: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| l.ends_with(library))
}

#[test]
fn libtorch_cuda_is_mapped_exactly_where_the_shim_loaded_it() {
    let backend = transplant::cuda_backend();
    // libtorch itself is mapped: the test links it.
    assert!(mapped("libtorch_cpu.so"));
    if backend == "loaded" {
        assert!(mapped("libtorch_cuda.so"), "reported loaded but not mapped");
    } else {
        assert!(backend.starts_with("not loaded: "), "{backend}");
        assert!(!mapped("libtorch_cuda.so"), "{backend}, yet libtorch_cuda is mapped (linked after all?)");
        assert!(!tch::Cuda::is_available(), "CUDA available without its backend");
    }
    // With no driver there is nothing to load; with one, the backend is there.
    let driver = std::path::Path::new("/proc/driver/nvidia/version").exists();
    if !driver && std::env::var_os("TRANSPLANT_REQUIRE_CUDA").is_none() {
        return;
    }
    if std::env::var("TRANSPLANT_CUDA").as_deref() != Ok("0") {
        assert_eq!(backend, "loaded");
        assert!(tch::Cuda::is_available());
    }
}

/// Where a CUDA driver is installed (here a stand-in `libcuda.so.1`, built for
/// the test) the backend is loaded before `main`; `TRANSPLANT_CUDA=0` skips it.
/// The test reruns itself in a child process that finds the stand-in.
#[test]
fn a_driver_gets_the_backend_loaded_before_main_unless_told_not_to() {
    if let Ok(want) = std::env::var("TRANSPLANT_TEST_EXPECT_BACKEND") {
        let backend = transplant::cuda_backend();
        assert!(backend.starts_with(&want), "{backend}, expected {want}");
        assert_eq!(mapped("libtorch_cuda.so"), want == "loaded", "{backend}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("driver.c");
    std::fs::write(&source, "int transplant_stand_in_for_a_cuda_driver;\n").unwrap();
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.path().join("libcuda.so.1"))
        .arg(&source)
        .status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no C compiler to build a stand-in libcuda.so.1");
        return;
    }
    let name = "a_driver_gets_the_backend_loaded_before_main_unless_told_not_to";
    for (setting, want) in [(None, "loaded"), (Some("0"), "not loaded: TRANSPLANT_CUDA=0")] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args(["--exact", name, "--nocapture"]).env("LD_LIBRARY_PATH", dir.path());
        child.env("TRANSPLANT_TEST_EXPECT_BACKEND", want).env_remove("TRANSPLANT_CUDA");
        if let Some(value) = setting {
            child.env("TRANSPLANT_CUDA", value);
        }
        let out = child.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{setting:?}: {text}");
    }
}
