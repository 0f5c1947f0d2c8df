//! A full disk while writing OUT (a small tmpfs, mounted where the test may;
//! skipped where it may not): a clean error naming OUT, exit 1, no temporary
//! file left, and the old OUT intact — for a TorchScript archive rewrite, a
//! safetensors file, sharded safetensors, a Distributed Checkpoint folder and a
//! `.ot` file (libtorch's own writer aborted the process there).
use crate::common;

use std::path::{Path, PathBuf};

use common::{file_hash, fixture, transplant};

/// A tmpfs of `size` mounted on a fresh folder, unmounted when dropped (the
/// folder holding the mount point is kept alive, and removed, with it).
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let point = dir.path().join("disk");
        std::fs::create_dir(&point).ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&point)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(point, dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn left_over(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // The lock file sharded writers take turns on stays, empty.
        .filter(|n| {
            n != "old.pt" && n != "old.safetensors" && n != "old.ot" && !n.ends_with(".transplant-lock")
        })
        .collect()
}

#[test]
fn a_full_disk_is_a_clean_error_and_the_old_out_stays() {
    let Some(disk) = Tmpfs::mount("4m") else {
        eprintln!("cannot mount a tmpfs here: skipped");
        return;
    };
    let src = fixture("resnet18.safetensors");
    // An old OUT of each kind, filling part of the disk.
    let old_pt = disk.0.join("old.pt");
    std::fs::copy(fixture("bn_net_a.pt"), &old_pt).unwrap();
    let old_st = disk.0.join("old.safetensors");
    std::fs::copy(fixture("named_net.safetensors"), &old_st).unwrap();
    // libtorch's own `.ot` writer aborted the process on a full disk.
    let old_ot = disk.0.join("old.ot");
    let made = tempfile::tempdir().unwrap();
    let small_ot = made.path().join("small.ot");
    let run = transplant([
        "convert",
        fixture("named_net.safetensors").to_str().unwrap(),
        "-o",
        small_ot.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    std::fs::copy(&small_ot, &old_ot).unwrap();
    let (pt_hash, st_hash, ot_hash) = (file_hash(&old_pt), file_hash(&old_st), file_hash(&old_ot));
    let cases: Vec<Vec<String>> = vec![
        vec![
            "copy".into(),
            src.display().to_string(),
            fixture("resnet18.pt").display().to_string(),
            "-o".into(),
            old_pt.display().to_string(),
        ],
        vec!["convert".into(), src.display().to_string(), "-o".into(), old_st.display().to_string()],
        vec![
            "convert".into(),
            src.display().to_string(),
            "-o".into(),
            disk.0.join("model.safetensors.index.json").display().to_string(),
            "--max-shard-size".into(),
            "1MB".into(),
        ],
        vec!["convert".into(), src.display().to_string(), "-o".into(), format!("{}/dcp/", disk.0.display())],
        vec!["convert".into(), src.display().to_string(), "-o".into(), old_ot.display().to_string()],
        vec![
            "copy".into(),
            src.display().to_string(),
            fixture("resnet18.pt").display().to_string(),
            "-o".into(),
            old_ot.display().to_string(),
        ],
    ];
    for args in cases {
        let run = transplant(&args);
        assert_eq!(run.code, 1, "{args:?}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("No space left on device"), "{args:?}: {}", run.stderr);
        assert!(
            !run.stderr.contains("transplant-tmp"),
            "the error names OUT, not the temporary: {}",
            run.stderr
        );
        assert_eq!(left_over(&disk.0), Vec::<String>::new(), "{args:?}");
        assert_eq!(
            (file_hash(&old_pt), file_hash(&old_st), file_hash(&old_ot)),
            (pt_hash.clone(), st_hash.clone(), ot_hash.clone()),
            "{args:?}"
        );
    }
}
