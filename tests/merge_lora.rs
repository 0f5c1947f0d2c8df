//! `transplant merge-lora` against PEFT's `merge_and_unload`
//! (`scripts/lora_reference.py`): a tiny Llama (q/v and embedding LoRA, rank
//! and alpha patterns, modules_to_save; and rsLoRA on the other projections),
//! a tiny GPT-2 (Conv1D, fan_in_fan_out, LoRA biases) and a conv net (3x3 and
//! 1x1 convolutions, an adapter_model.bin) — every tensor and the logits
//! within 1e-5 relative; DoRA and an adapter for another model refused with
//! nothing written.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::transplant;

fn reference(command: &str, dir: &Path) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/lora_reference.py"))
        .arg(command)
        .arg(dir)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the venv's python runs");
    assert!(
        output.status.success(),
        "lora_reference.py {command}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn adapters_merge_as_peft_merges_them_and_bad_adapters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reference("make", d);
    for (case, base) in [
        ("llama_a", "llama_base"),
        ("llama_b", "llama_base"),
        ("gpt2", "gpt2_base"),
        ("conv", "conv_base.pth"),
    ] {
        let out = d.join(format!("{case}.out.safetensors"));
        let adapter = d.join(format!("{case}_adapter"));
        let run = transplant([
            "merge-lora".as_ref(),
            d.join(base).as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--json".as_ref(),
        ]);
        assert_eq!(run.code, 0, "{case}: {}", run.stderr);
        let json = run.json();
        assert!(!json["adapted"].as_array().unwrap().is_empty(), "{case}: {json}");
        if case == "llama_a" {
            // lm_head from modules_to_save; the embedding's base layer saved with the adapter.
            let replaced = json["replaced"].to_string();
            assert!(replaced.contains("lm_head.weight"), "{replaced}");
        }
    }
    reference("check", d);

    let refused = |base: &str, adapter: &str, says: &[&str]| {
        let out = d.join("refused.safetensors");
        let run = transplant([
            "merge-lora".as_ref(),
            d.join(base).as_os_str(),
            d.join(adapter).as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
        assert_eq!(run.code, 1, "{adapter}: {}", run.stderr);
        for s in says {
            assert!(run.stderr.contains(s), "{adapter}: expected {s:?} in {}", run.stderr);
        }
        assert!(!out.exists(), "{adapter}: wrote {}", out.display());
    };
    refused("llama_base", "llama_dora_adapter", &["llama_dora_adapter", "DoRA"]);
    refused("llama_base", "gpt2_adapter", &["lacks", "transformer.h.0.attn.c_attn.weight"]);
    refused("conv_base.pth", "llama_a_adapter", &["lacks", "model.layers.0.self_attn.q_proj.weight"]);
    refused("llama_base", "no_such_adapter", &["no_such_adapter"]);
    // LoRA on bare parameters is another kind of adapter: refused by name.
    let other = d.join("llama_params_adapter");
    std::fs::create_dir(&other).unwrap();
    let config = std::fs::read_to_string(d.join("llama_b_adapter/adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["target_parameters"] = serde_json::json!(["mlp.experts.gate_up_proj"]);
    std::fs::write(other.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::copy(
        d.join("llama_b_adapter/adapter_model.safetensors"),
        other.join("adapter_model.safetensors"),
    )
    .unwrap();
    refused("llama_base", "llama_params_adapter", &["target_parameters"]);
}
