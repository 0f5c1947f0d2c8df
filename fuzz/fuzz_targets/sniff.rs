//! Content sniffing, then opening whatever it found, on arbitrary files.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("model.bin");
    std::fs::write(&path, data).expect("write");
    if transplant::sniff(&path).is_ok() {
        let _ = transplant::open(&path);
    }
});
