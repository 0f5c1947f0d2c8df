//! The `.npy` header parser on arbitrary text: accepted or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = transplant::fuzzing::npy_header(&String::from_utf8_lossy(data));
});
