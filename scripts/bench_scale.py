#!/usr/bin/env python3
"""Mixture-of-experts scale: a synthetic checkpoint of about 92,000 small tensors
in sharded safetensors, a TorchScript module of the same names, and PyTorch's
side of each command `scripts/bench.sh` times on them.

The model: 48 layers, each with attention (q, k, v, o), two norms, a router and
128 experts of three projections; each projection holds a weight and what a
quantized checkpoint keeps beside it (compressed-tensors' weight_scale,
weight_zero_point, input_scale, weight_g_idx): 48 x 128 x 3 x 5 = 92,160 expert
tensors, 92,499 in all. Values are small ([16, 16] weights), so that the
per-tensor cost is what is measured, not the bytes.

Usage: .venv/bin/python scripts/bench_scale.py make DIR [LAYERS EXPERTS]
           DIR/model.safetensors.index.json with its shards (~8), and
           DIR/model.pt (scripted, other values, the same names)
       .venv/bin/python scripts/bench_scale.py time COMMAND [ARG]...
           COMMAND in a fresh process; prints JSON: seconds, peak_rss_bytes
       .venv/bin/python scripts/bench_scale.py torch MODE DIR OUT
           PyTorch's equivalent of a transplant command, timed as above:
           inspect  read every tensor of every shard (safe_open, get_tensor),
                    its dtype, shape and size
           plan     torch.jit.load(model.pt), read every shard, compare names
                    and shapes with the module's state_dict (nothing copied)
           pth      read every shard, torch.save the state dict to OUT
           dcp      read every shard, torch.distributed.checkpoint.save to OUT
       .venv/bin/python scripts/bench_scale.py cat DIR
           cat of the shards to /dev/null (warm: run once before), timed
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import measure  # noqa: E402  (one child process timed, its peak RSS)

LAYERS, EXPERTS, WIDTH, SHARDS = 48, 128, 16, 8
QUANT = ("weight_scale", "weight_zero_point", "input_scale", "weight_g_idx")

READ = """
import glob, os, sys, torch
from safetensors import safe_open
def read(folder):
    out = {}
    for shard in sorted(glob.glob(os.path.join(folder, "model-*.safetensors"))):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out
mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "plan":
    module = torch.jit.load(os.path.join(folder, "model.pt"))
sd = read(folder)
if mode == "inspect":
    total = sum(t.numel() * t.element_size() for t in sd.values())
    listed = [(k, t.dtype, tuple(t.shape)) for k, t in sd.items()]
elif mode == "plan":
    theirs = module.state_dict()
    missing = [k for k, t in sd.items() if k not in theirs or theirs[k].shape != t.shape]
    assert not missing and len(theirs) == len(sd), missing[:5]
elif mode == "pth":
    torch.save(sd, out)
elif mode == "dcp":
    import warnings
    import torch.distributed.checkpoint as dcp
    warnings.simplefilter("ignore")
    dcp.save(sd, checkpoint_id=out)
"""


def build(layers, experts):
    import torch
    import torch.nn as nn

    class Proj(nn.Module):
        def __init__(self, rows, cols):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(rows, cols, dtype=torch.bfloat16))
            self.register_buffer("weight_scale", torch.rand(rows, 1))
            self.register_buffer("weight_zero_point", torch.zeros(rows, 1, dtype=torch.int8))
            self.register_buffer("input_scale", torch.rand(1))
            self.register_buffer("weight_g_idx", torch.arange(cols, dtype=torch.int32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = Proj(WIDTH, WIDTH), Proj(WIDTH, WIDTH), Proj(WIDTH, WIDTH)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
            self.v_proj, self.o_proj = nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(WIDTH, experts, bias=False)
            self.experts = nn.ModuleList([Expert() for _ in range(experts)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = Attention(), Mlp()
            self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(64, WIDTH)
            self.layers = nn.ModuleList([Layer() for _ in range(layers)])
            self.norm = nn.LayerNorm(WIDTH, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()
            self.lm_head = nn.Linear(WIDTH, 64, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return Model().eval()


def make(folder, layers, experts):
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    index = os.path.join(folder, "model.safetensors.index.json")
    pt = os.path.join(folder, "model.pt")
    if os.path.exists(index) and os.path.exists(pt):
        return
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(build(layers, experts)), pt + ".partial")
    torch.manual_seed(1)
    sd = {k: v.contiguous() for k, v in build(layers, experts).state_dict().items()}
    names = list(sd)
    per = -(-len(names) // SHARDS)
    weight_map = {}
    for s in range(SHARDS):
        part = names[s * per:(s + 1) * per]
        shard = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file({k: sd[k] for k in part}, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(index + ".partial", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    os.replace(pt + ".partial", pt)
    os.replace(index + ".partial", index)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "make":
        layers, experts = (int(args[1]), int(args[2])) if len(args) == 3 else (LAYERS, EXPERTS)
        make(args[0], layers, experts)
        return
    if mode == "time":
        result = measure(args)
    elif mode == "torch":
        result = measure([sys.executable, "-c", READ, *args])
    elif mode == "cat":
        shards = sorted(glob.glob(os.path.join(args[0], "model-*.safetensors")))
        result = measure(["sh", "-c", 'cat "$@" > /dev/null', "cat", *shards])
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
