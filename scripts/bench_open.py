#!/usr/bin/env python3
"""Python's side of the 'open' benchmark: makes the ~1 GB safetensors file if
missing, then times safetensors' own readers on it and prints JSON.

Usage: .venv/bin/python scripts/bench_open.py FILE make|load_file|safe_open|make_pth|torch_load
"""
import json
import os
import sys
import time

import torch


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes():
    return status("VmRSS")


def wide_model():
    torch.manual_seed(0)
    # 16 x [Linear(4096, 4096) + BatchNorm1d(4096)]: 112 tensors, about 1.07 GB.
    tensors = {}
    for i in range(16):
        tensors[f"layers.{i}.linear.weight"] = torch.randn(4096, 4096)
        tensors[f"layers.{i}.linear.bias"] = torch.randn(4096)
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensors[f"layers.{i}.bn.{name}"] = torch.randn(4096)
        tensors[f"layers.{i}.bn.num_batches_tracked"] = torch.tensor(7)
    return tensors


def main(path, what):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if what == "make":
        if not os.path.exists(path):
            save_file(wide_model(), path)
        return
    if what == "make_pth":
        if not os.path.exists(path):
            torch.save(wide_model(), path)
        return
    before = rss_bytes()
    start = time.perf_counter()
    if what == "load_file":
        tensors = load_file(path)
        count = len(tensors)
    elif what == "torch_load":
        tensors = torch.load(path, mmap=True, weights_only=True)
        count = len(tensors)
    else:
        with safe_open(path, framework="pt") as f:
            count = len(list(f.keys()))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_added_bytes": rss_bytes() - before, "peak_rss_bytes": status("VmHWM"), "tensors": count}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
