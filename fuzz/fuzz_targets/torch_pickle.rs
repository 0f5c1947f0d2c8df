//! The whole torch.save reader (zip, pickle, storages, tensor views) on
//! arbitrary files: an error or tensors, never a panic or an abort.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fuzz.pth");
    std::fs::write(&path, data).expect("write");
    let _ = transplant::fuzzing::read_torch_save(&path, None);
});
