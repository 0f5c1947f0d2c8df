//! The language-model rule files that ship in `rules/`, each run end to end
//! against transformers 5 on tiny models built from configs with random
//! weights (no hub download): converted by `transplant convert`, the result
//! equals what transformers itself makes or writes, bit for bit, and the
//! logits of the converted model are the original's.
use crate::common;

use std::path::{Path, PathBuf};

use common::python;
use transplant::{Checkpoint, Source};

fn rules(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules").join(name).display().to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `transplant convert SRC -o OUT --rules RULES --strict EXTRA...`, which must succeed.
fn convert(src: &Path, out: &Path, rules_file: &str, extra: &[&str]) {
    let args = [&["convert", p(src), "-o", p(out), "--rules", rules_file, "--strict"][..], extra].concat();
    let run = common::transplant(args);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

/// Every tensor of `a` and `b`, by name: the same names, bit-equal tensors.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (a, b) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let names = |s: &Checkpoint| {
        let mut n: Vec<String> = s.entries().iter().map(|e| e.name.to_string()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&a), names(&b));
    for (i, e) in a.entries().iter().enumerate() {
        let j = b.entries().iter().position(|f| f.name == e.name).unwrap();
        let (x, y) = (a.tensor(i).unwrap(), b.tensor(j).unwrap());
        assert!(common::bit_equal(x, y), "{} differs", e.name);
    }
}

const LLAMA: &str = r#"
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).eval()
hf = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(hf, f"{out}/hf.safetensors")
ids = torch.randint(0, 96, (2, 11))
with torch.no_grad():
    logits = model(ids).logits
save_file({"ids": ids, "logits": logits}, f"{out}/expected.safetensors")

# transformers' convert_llama_weights_to_hf: Meta -> HF is this permutation.
def permute(w, n_heads, dim1, dim2):
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)
def unpermute(w, n_heads, dim1, dim2):
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)
names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
         "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
         "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"]}
kv_dim = 2 * 16
for l in range(2):
    for h, m in names.items():
        w = hf[f"model.layers.{l}.{h}.weight"]
        if h == "self_attn.q_proj":
            w = unpermute(w, 4, 64, 64)
            assert torch.equal(permute(w, 4, 64, 64), hf[f"model.layers.{l}.{h}.weight"])
        if h == "self_attn.k_proj":
            w = unpermute(w, 2, kv_dim, 64)
            assert torch.equal(permute(w, 2, kv_dim, 64), hf[f"model.layers.{l}.{h}.weight"])
        meta[f"layers.{l}.{m}.weight"] = w.contiguous()
torch.save(meta, f"{out}/consolidated.00.pth")
"#;

const LLAMA_LOGITS: &str = r#"
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).eval()
model.load_state_dict(load_file(f"{out}/converted_hf.safetensors"), strict=True)
expected = load_file(f"{out}/expected.safetensors")
with torch.no_grad():
    logits = model(expected["ids"]).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
"#;

/// Llama with grouped-query attention (4 heads, 2 key-value heads): Meta's
/// layout into Hugging Face's (the rotary permutation of wq and wk sized by
/// `--set`) gives transformers' weights bit for bit and the same logits; and
/// Hugging Face's back into Meta's gives the Meta checkpoint.
#[test]
fn llama_meta_and_hugging_face_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    python(LLAMA, &[dir.path()]);
    let sets = ["--set", "dim=64", "--set", "heads=4", "--set", "kv_heads=2"];
    let hf = dir.path().join("converted_hf.safetensors");
    convert(&dir.path().join("consolidated.00.pth"), &hf, &rules("llama/meta_to_hf.rules"), &sets);
    assert_same_tensors(&hf, &dir.path().join("hf.safetensors"));
    python(LLAMA_LOGITS, &[dir.path()]);
    let meta = dir.path().join("converted_meta.pth");
    convert(&dir.path().join("hf.safetensors"), &meta, &rules("llama/hf_to_meta.rules"), &sets);
    assert_same_tensors(&meta, &dir.path().join("consolidated.00.pth"));
    // The default sizes are Llama 3 8B's: on this model the plan refuses, by rule.
    let refused = dir.path().join("refused.safetensors");
    let run = common::transplant([
        "convert",
        p(&dir.path().join("hf.safetensors")),
        "-o",
        p(&refused),
        "--rules",
        &rules("llama/hf_to_meta.rules"),
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let needle = r"q_proj\.weight => layers.$1.attention.wq.weight | reshape(32, 2, 64, 4096)";
    assert!(run.stderr.contains(needle) && run.stderr.contains("[64, 64] has 4096"), "{}", run.stderr);
    assert!(!refused.exists());
}

const MIXTRAL: &str = r#"
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM
out = sys.argv[1]
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=11,
                    num_experts_per_tok=2, max_position_embeddings=64)
model = MixtralForCausalLM(cfg).eval()
# save_pretrained writes the per-expert layout of Hub checkpoints.
model.save_pretrained(f"{out}/per_expert")
# What transformers 5 itself makes of it on load: its own conversion stacks the experts.
loaded = MixtralForCausalLM.from_pretrained(f"{out}/per_expert").eval()
save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, f"{out}/loaded.safetensors")
ids = torch.randint(0, 64, (2, 9))
with torch.no_grad():
    logits = loaded(ids).logits
save_file({"ids": ids, "logits": logits}, f"{out}/expected.safetensors")
"#;

const MIXTRAL_LOGITS: &str = r#"
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from safetensors.torch import load_file
from transformers import MixtralConfig, MixtralForCausalLM
out = sys.argv[1]
cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=11,
                    num_experts_per_tok=2, max_position_embeddings=64)
model = MixtralForCausalLM(cfg).eval()
model.load_state_dict(load_file(f"{out}/stacked.safetensors"), strict=True)
expected = load_file(f"{out}/expected.safetensors")
with torch.no_grad():
    logits = model(expected["ids"]).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
"#;

/// Mixtral with 11 experts (10 sorts before 2 as text): the per-expert
/// checkpoint stacked gives what transformers 5 loads from it, bit for bit,
/// and its logits; the stacked state dict unstacked gives what
/// `save_pretrained` wrote.
#[test]
fn mixtral_per_expert_and_stacked_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    python(MIXTRAL, &[dir.path()]);
    let stacked = dir.path().join("stacked.safetensors");
    let per_expert = dir.path().join("per_expert/model.safetensors");
    convert(&per_expert, &stacked, &rules("mixtral/per_expert_to_stacked.rules"), &[]);
    assert_same_tensors(&stacked, &dir.path().join("loaded.safetensors"));
    python(MIXTRAL_LOGITS, &[dir.path()]);
    let back = dir.path().join("back.safetensors");
    convert(
        &dir.path().join("loaded.safetensors"),
        &back,
        &rules("mixtral/stacked_to_per_expert.rules"),
        &[],
    );
    assert_same_tensors(&back, &per_expert);
}

const DEEPSEEK_FP8: &str = r#"
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
out, B = sys.argv[1], 32
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
sd = {k: v.contiguous() for k, v in model.state_dict().items()}

def grid(w):
    return (w.shape[0] + B - 1) // B, (w.shape[1] + B - 1) // B

def quantize(w):  # DeepSeek's block quantization: scale_inv = amax / 448
    r, c = grid(w)
    x = torch.zeros(r * B, c * B)
    x[: w.shape[0], : w.shape[1]] = w.float()
    blocks = x.reshape(r, B, c, B)
    s = blocks.abs().amax(dim=(1, 3)) / 448.0
    s = torch.where(s != 0, s, torch.ones_like(s))
    q = (blocks / s.reshape(r, 1, c, 1)).clamp(-448.0, 448.0).reshape(r * B, c * B)
    return q[: w.shape[0], : w.shape[1]].to(torch.float8_e4m3fn).contiguous(), s

def dequantize(q, s):  # DeepSeek's weight_dequant: q.float() * s per block, then bf16
    full = s.repeat_interleave(B, 0)[: q.shape[0]].repeat_interleave(B, 1)[:, : q.shape[1]]
    return (q.float() * full).to(torch.bfloat16)

fp8, deq = {}, {}
for k, v in sd.items():
    if k.endswith("_proj.weight"):
        q, s = quantize(v)
        fp8[k], fp8[k + "_scale_inv"] = q, s
        deq[k] = dequantize(q, s)
    else:
        fp8[k] = deq[k] = v
save_file(sd, f"{out}/bf16.safetensors")
save_file(fp8, f"{out}/fp8.safetensors")
save_file(deq, f"{out}/dequantized.safetensors")
# Hostile variants: a scale of the wrong grid, a missing scale, a weight of another dtype.
k = "model.layers.0.mlp.up_proj.weight"
bad = dict(fp8); bad[k + "_scale_inv"] = torch.ones(2, 2); save_file(bad, f"{out}/bad_grid.safetensors")
bad = dict(fp8); del bad[k + "_scale_inv"]; save_file(bad, f"{out}/no_scale.safetensors")
bad = dict(fp8); bad[k] = bad[k].to(torch.bfloat16); save_file(bad, f"{out}/bf16_weight.safetensors")
# The dequantized model's logits, for the converted one to match.
model.load_state_dict(deq)
ids = torch.randint(0, 96, (2, 11))
with torch.no_grad():
    logits = model(ids).logits
save_file({"ids": ids, "logits": logits}, f"{out}/expected.safetensors")
"#;

const DEEPSEEK_LOGITS: &str = r#"
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
model.load_state_dict(load_file(f"{out}/converted.safetensors"), strict=True)
expected = load_file(f"{out}/expected.safetensors")
with torch.no_grad():
    logits = model(expected["ids"]).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
"#;

/// DeepSeek-style FP8 block scales (blocks of 32 here, so the last blocks of
/// the 112-wide MLP are partial): `fp8_to_bf16.rules` gives the Python
/// reference's dequantization bit for bit (and its logits), `bf16_to_fp8.rules`
/// gives the reference's quantization bit for bit, and a scale of the wrong
/// grid, a missing scale or a weight of another dtype is refused by name,
/// nothing written.
#[test]
fn deepseek_fp8_and_bf16_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    python(DEEPSEEK_FP8, &[dir.path()]);
    let d = dir.path();
    let converted = d.join("converted.safetensors");
    convert(
        &d.join("fp8.safetensors"),
        &converted,
        &rules("deepseek/fp8_to_bf16.rules"),
        &["--set", "block=32"],
    );
    assert_same_tensors(&converted, &d.join("dequantized.safetensors"));
    python(DEEPSEEK_LOGITS, &[dir.path()]);
    // copy: into an existing bf16 checkpoint (the reference's own layout), written in place then saved.
    let copied = d.join("copied.safetensors");
    let run = common::transplant([
        "copy",
        p(&d.join("fp8.safetensors")),
        p(&d.join("bf16.safetensors")),
        "-o",
        p(&copied),
        "--rules",
        &rules("deepseek/fp8_to_bf16.rules"),
        "--strict",
        "--set",
        "block=32",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_same_tensors(&copied, &d.join("dequantized.safetensors"));

    let quantized = d.join("quantized.safetensors");
    convert(
        &d.join("bf16.safetensors"),
        &quantized,
        &rules("deepseek/bf16_to_fp8.rules"),
        &["--set", "block=32"],
    );
    assert_same_tensors(&quantized, &d.join("fp8.safetensors"));

    for (file, says) in [
        ("bad_grid", "the scales model.layers.0.mlp.up_proj.weight_scale_inv are [2, 2], the block grid of model.layers.0.mlp.up_proj.weight [112, 64] in blocks of 32 is [4, 2]"),
        ("no_scale", "model.layers.0.mlp.up_proj.weight"),
        ("bf16_weight", "the weight model.layers.0.mlp.up_proj.weight is bfloat16, dequantize reads float8_e4m3fn or float8_e5m2"),
    ] {
        let out = d.join(format!("{file}.out.safetensors"));
        let src = d.join(format!("{file}.safetensors"));
        let run = common::transplant([
            "convert", p(&src), "-o", p(&out), "--rules", &rules("deepseek/fp8_to_bf16.rules"), "--strict", "--set", "block=32",
        ]);
        assert_ne!(run.code, 0, "{file}: {}", run.stdout);
        let text = format!("{}{}", run.stdout, run.stderr);
        assert!(text.contains(says), "{file}: {text}");
        assert!(text.contains("dequantize(block, bf16)") || text.contains("dequantize(32, bfloat16)"), "{file}: {text}");
        assert!(!out.exists(), "{file}: written");
    }
}
