//! The rules parser and rule application on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(rules) = transplant::Rules::parse(&text, "fuzz") {
        for name in ["a.b.c", "backbone.layer1.0.conv1.weight", "", "module.x", "layers.0.experts.10.w1.weight"] {
            let _ = rules.apply(name);
        }
    }
});
