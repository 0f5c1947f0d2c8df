//! The safetensors path: header checks, offsets, dtype views, on arbitrary bytes
//! behind a valid 8-byte header length.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fuzz.safetensors");
    let mut bytes = (data.len().min(1 << 20) as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(data);
    std::fs::write(&path, bytes).expect("write");
    let _ = transplant::fuzzing::read_safetensors(&path);
});
