//! The Distributed Checkpoint reader on arbitrary `.metadata` bytes next to a
//! small valid `.distcp` file: an error or tensors, never a panic or an abort.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join(".metadata"), data).expect("write");
    std::fs::write(dir.path().join("__0_0.distcp"), [0u8; 64]).expect("write");
    let _ = transplant::fuzzing::read_distributed_checkpoint(dir.path(), None);
    let _ = transplant::fuzzing::read_distributed_checkpoint(dir.path(), Some("model"));
});
