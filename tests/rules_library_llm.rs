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
