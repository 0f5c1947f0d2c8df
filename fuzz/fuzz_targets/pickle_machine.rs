//! The pickle stack machine on arbitrary bytes: an error or a value, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut machine = transplant::fuzzing::PickleMachine::default();
    let _ = machine.run(data);
});
