#!/usr/bin/env python3
"""TorchScript files end to end: the models, PyTorch's side, and timing of any
command in a fresh process (wall seconds and the process's own peak RSS).

Usage: .venv/bin/python scripts/bench_archive.py make DIR
           DIR/{deep,wide}.pt (scripted modules, as benches/copy.rs builds the
           models) and DIR/{deep,wide}.safetensors (other values, same names)
       .venv/bin/python scripts/bench_archive.py time COMMAND [ARG]...
           runs COMMAND, prints JSON: seconds, peak_rss_bytes
       .venv/bin/python scripts/bench_archive.py torch_copy SRC PT OUT
           PyTorch's end-to-end copy, timed as above: jit.load(PT),
           load_state_dict(load_file(SRC)), jit.save(OUT)
       .venv/bin/python scripts/bench_archive.py jit_load PT
           torch.jit.load(PT), timed as above
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import measure  # noqa: E402  (one child process timed, its peak RSS)

TORCH_COPY = """
import sys, torch
from safetensors.torch import load_file
module = torch.jit.load(sys.argv[2])
module.load_state_dict(load_file(sys.argv[1]))
torch.jit.save(module, sys.argv[3])
"""

JIT_LOAD = """
import sys, torch
torch.jit.load(sys.argv[1])
"""

SIZES = {"deep": (4000, 64), "wide": (16, 4096)}


def make(folder):
    import torch
    import torch.nn as nn
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for name, (blocks, width) in SIZES.items():
        pt, st = os.path.join(folder, f"{name}.pt"), os.path.join(folder, f"{name}.safetensors")
        if os.path.exists(pt) and os.path.exists(st):
            continue

        def model():
            layers = []
            for _ in range(blocks):
                layers += [nn.Linear(width, width), nn.BatchNorm1d(width)]
            return nn.Sequential(*layers).eval()

        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(model()), pt + ".partial")
        torch.manual_seed(1)
        save_file({k: v.contiguous() for k, v in model().state_dict().items()}, st)
        os.replace(pt + ".partial", pt)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "make":
        make(args[0])
        return
    if mode == "time":
        result = measure(args)
    elif mode == "torch_copy":
        result = measure([sys.executable, "-c", TORCH_COPY, *args])
    elif mode == "jit_load":
        result = measure([sys.executable, "-c", JIT_LOAD, *args])
    else:
        sys.exit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
