"""PEFT as the reference for `transplant merge-lora` (tests/merge_lora.rs).

    lora_reference.py make DIR    tiny base models and PEFT LoRA adapters, from fixed seeds
    lora_reference.py check DIR   DIR/<case>.out.safetensors against PEFT's merge_and_unload

Cases (each a base and an adapter folder as save_pretrained writes them):
- llama_a: a tiny Llama built from a config; LoRA on q_proj, v_proj and the
  embedding (lora_embedding_A/B), a rank_pattern and an alpha_pattern,
  lm_head in modules_to_save;
- llama_b: the same base; use_rslora, LoRA on k/o/gate/up/down projections;
- gpt2: a tiny GPT-2 (Conv1D weights, fan_in_fan_out), LoRA with lora_bias;
- conv: a small conv net saved with torch.save; LoRA on a 3x3 conv, a 1x1
  conv and a Linear, the adapter as adapter_model.bin;
- llama_dora: a DoRA adapter (refused);
- conv2 and conv_base_script.pt: a second conv adapter and the conv net as
  TorchScript, with each weight set's outputs (swap_expected.safetensors).
`check` compares every tensor transplant wrote with PEFT's merged model
(within 1e-5 relative) and, for the language models, the logits of the model
loaded from transplant's file with PEFT's merged model's (1e-5 relative).
No model is downloaded: HF_HUB_OFFLINE=1, configs only, random weights.
"""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.bn(self.pw(torch.relu(self.conv(x)))).mean((2, 3)))


def conv():
    torch.manual_seed(2)
    return ConvNet().eval()


CASES = {
    "llama_a": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                            modules_to_save=["lm_head"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                            alpha_pattern={"v_proj": 3})),
    "llama_b": (llama, dict(r=8, lora_alpha=4, use_rslora=True,
                            target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "gpt2": (gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        lora_bias=True)),
    "conv": (conv, dict(r=2, lora_alpha=5, target_modules=["conv", "pw", "fc"])),
}


def adapted(case):
    make_model, kwargs = CASES[case]
    model = make_model()
    torch.manual_seed(100)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        # A trained copy of each module to save, and LoRA biases that are not zero.
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name or "lora_B" in name and name.endswith("bias"):
                p.add_(torch.randn(p.shape) * 0.1)
    return peft_model


def make(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for case, (make_model, _) in CASES.items():
        base = make_model()
        if case == "conv":
            torch.save(base.state_dict(), out / "conv_base.pth")
        elif not (out / f"{case[:5]}_base").exists():
            base.save_pretrained(out / f"{case[:5]}_base")
        peft_model = adapted(case)
        peft_model.save_pretrained(out / f"{case}_adapter", safe_serialization=(case != "conv"))
    # For live adapter swaps (tests/adapter_swap.rs): the conv net scripted, a
    # second adapter, and what each weight set computes on one input.
    torch.jit.save(torch.jit.script(conv()), out / "conv_base_script.pt")
    CASES["conv2"] = (conv, dict(r=3, lora_alpha=2, target_modules=["conv", "fc"]))
    adapted("conv2").save_pretrained(out / "conv2_adapter", safe_serialization=True)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outputs = {"input": x, "base": conv()(x)}
        for case in ("conv", "conv2"):
            outputs[case] = adapted(case).merge_and_unload().eval()(x)
    del CASES["conv2"]
    save_file({k: v.contiguous() for k, v in outputs.items()}, out / "swap_expected.safetensors")
    torch.manual_seed(100)
    dora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(out / "llama_dora_adapter")


def check(folder):
    folder = Path(folder)
    failures = []
    for case in CASES:
        got_path = folder / f"{case}.out.safetensors"
        got = load_file(got_path)
        merged = adapted(case).merge_and_unload().eval()
        want = merged.state_dict()
        for name, g in got.items():
            w = want.get(name)
            if w is None:
                failures.append(f"{case}: {name} is not in PEFT's merged model")
                continue
            if g.dtype != w.dtype or g.shape != w.shape:
                failures.append(f"{case}: {name}: {g.dtype} {tuple(g.shape)}, PEFT {w.dtype} {tuple(w.shape)}")
                continue
            if g.is_floating_point():
                ok = ((g.double() - w.double()).abs() <= 1e-5 * w.double().abs() + 1e-7).all()
            else:
                ok = torch.equal(g, w)
            if not bool(ok):
                failures.append(f"{case}: {name}: max |diff| {(g.double() - w.double()).abs().max().item():.3e}")
        if case == "conv":
            fresh = conv()
            x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
        else:
            fresh = (llama if case.startswith("llama") else gpt2)()
            x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
        missing, unexpected = fresh.load_state_dict(got, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            failures.append(f"{case}: loading transplant's output: missing {missing}, unexpected {unexpected}")
            continue
        if hasattr(fresh, "tie_weights"):
            fresh.tie_weights()
        fresh.eval()
        with torch.no_grad():
            a = fresh(x)
            b = merged(x)
        a = a.logits if hasattr(a, "logits") else a
        b = b.logits if hasattr(b, "logits") else b
        rel = ((a - b).abs().max() / b.abs().max()).item()
        if rel > 1e-5:
            failures.append(f"{case}: logits differ by {rel:.3e} relative")
        else:
            print(f"{case}: {len(got)} tensors, logits within {rel:.1e} relative")
    if failures:
        print("\n".join(failures[:40]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
