#!/usr/bin/env python3
"""Timing and peak memory of merges, and of a live adapter swap's inputs.

Usage: .venv/bin/python scripts/bench_merge.py make DIR MB
           three float32 safetensors models of about MB megabytes each
           (DIR/m0..m2.safetensors: 8 x [Linear(n, n), LayerNorm(n)])
       .venv/bin/python scripts/bench_merge.py theirs OUT IN...
           PyTorch: load every input (safetensors.torch.load_file), average,
           save_file, in a child process
       .venv/bin/python scripts/bench_merge.py ours TRANSPLANT OUT IN...
           TRANSPLANT merge IN... -o OUT --method linear
       .venv/bin/python scripts/bench_merge.py make_swap DIR
           a scripted MLP (8 x Linear(1024, 1024)), its state dict, and a PEFT
           LoRA adapter (r = 16 on every Linear) for benches/adapter_swap.rs
Prints JSON: seconds (wall, whole process) and peak_rss_bytes (the process's own).
"""
import json
import math
import os
import resource
import subprocess
import sys
import time

THEIRS = """
import sys, torch
from safetensors.torch import load_file, save_file
models = [load_file(p) for p in sys.argv[2:]]
out = {k: sum(m[k] for m in models) / len(models) for k in models[0]}
save_file(out, sys.argv[1])
"""


def measure(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def make(folder, mb):
    import torch
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    n = int(math.sqrt(mb * 1e6 / 4 / 8))
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for layer in range(8):
            sd[f"layers.{layer}.weight"] = torch.randn(n, n, generator=g)
            sd[f"layers.{layer}.bias"] = torch.randn(n, generator=g)
            sd[f"norms.{layer}.weight"] = torch.randn(n, generator=g)
        save_file(sd, os.path.join(folder, f"m{i}.safetensors"))
        del sd


def make_swap(folder):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    os.makedirs(folder, exist_ok=True)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(0)
    model = Mlp().eval()
    torch.jit.save(torch.jit.script(model), os.path.join(folder, "mlp.pt"))
    torch.save(model.state_dict(), os.path.join(folder, "mlp.pth"))
    targets = [f"layers.{i}" for i in range(8)]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(os.path.join(folder, "mlp_adapter"))


def main():
    mode = sys.argv[1]
    if mode == "make":
        make(sys.argv[2], float(sys.argv[3]))
        return
    if mode == "make_swap":
        make_swap(sys.argv[2])
        return
    if mode == "theirs":
        out, inputs = sys.argv[2], sys.argv[3:]
        result = measure([sys.executable, "-c", THEIRS, out, *inputs])
    else:
        binary, out, inputs = sys.argv[2], sys.argv[3], sys.argv[4:]
        result = measure([binary, "merge", *inputs, "-o", out, "--method", "linear"])
    os.remove(out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
