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
    let name = "cuda_backend::a_driver_gets_the_backend_loaded_before_main_unless_told_not_to";
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

/// The `libtorch_cpu` file this process mapped, as /proc/self/maps names it.
fn mapped_libtorch() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps.lines().find(|l| l.ends_with("/libtorch_cpu.so")).expect("libtorch_cpu.so is mapped");
    std::path::PathBuf::from(&line[line.find('/').unwrap()..])
}

/// The version the libtorch folder holding `library` says it is: a PyTorch
/// wheel's `torch/version.py` (`__version__ = '2.13.0+cu130'`), or a libtorch
/// download's `build-version`; the public part, without the local `+…` label.
fn version_beside(library: &std::path::Path) -> String {
    let root = library.parent().unwrap().parent().unwrap();
    let text = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|py| {
            py.lines()
                .find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches('\'').to_string()))
        })
        .or_else(|| std::fs::read_to_string(root.join("build-version")).ok())
        .expect("version.py or build-version beside libtorch's lib/");
    text.trim().split('+').next().unwrap().to_string()
}

/// `transplant::libtorch()` names the libtorch this process runs on: the file
/// the loader mapped, and the version that library itself reports.
#[test]
fn the_libtorch_a_process_runs_on_is_named_by_file_and_version() {
    let libtorch = transplant::libtorch();
    let mapped = mapped_libtorch();
    let library = libtorch.library.as_deref().expect("the library's file is known");
    assert_eq!(std::fs::canonicalize(library).unwrap(), std::fs::canonicalize(&mapped).unwrap());
    assert_eq!(libtorch.version.as_deref(), Some(version_beside(&mapped).as_str()));
}

/// `transplant --version` says which libtorch the command runs on: its
/// version and folder, and whether its CUDA backend was loaded.
#[test]
fn version_names_the_libtorch_the_command_runs_on() {
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_transplant")).arg("--version").output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let mapped = mapped_libtorch();
    let folder = mapped.parent().unwrap();
    let expected = format!(
        "transplant {} (libtorch {} at {}; CUDA backend {})",
        env!("CARGO_PKG_VERSION"),
        version_beside(&mapped),
        std::fs::canonicalize(folder).unwrap().display(),
        transplant::cuda_backend()
    );
    assert_eq!(lines[0], expected);
}
