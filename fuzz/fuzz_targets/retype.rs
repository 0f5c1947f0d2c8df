//! Rewriting the storage types of a TorchScript `data.pkl` (`copy --dtype`
//! into a `.pt`) on arbitrary bytes: an error or a pickle, never a panic.
#![no_main]
use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let retype = HashMap::from([("0".to_string(), tch::Kind::Half), ("1".to_string(), tch::Kind::BFloat16)]);
    let _ = transplant::fuzzing::retype_storages(data, &retype);
    let _ = transplant::fuzzing::retype_storages(data, &HashMap::new());
});
