#!/usr/bin/env python3
"""PyTorch's side of the copy benchmark: load_state_dict and torch._foreach_copy_
between two models built as benches/copy.rs builds them; prints JSON.

Usage: .venv/bin/python scripts/bench_copy.py deep|wide
"""
import json
import sys
import time

import torch
import torch.nn as nn


def model(blocks, width):
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width)]
    return nn.Sequential(*layers)


def best(runs, f):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main(which):
    blocks, width, runs = {"deep": (4000, 64, 1), "wide": (16, 4096, 3)}[which]
    torch.manual_seed(0)
    source, target = model(blocks, width), model(blocks, width)
    state = source.state_dict()
    load = best(runs, lambda: target.load_state_dict(state))
    dst = list(target.state_dict().values())
    src = list(state.values())
    with torch.no_grad():
        foreach = best(3, lambda: torch._foreach_copy_(dst, src))
    print(json.dumps({"model": which, "load_state_dict": load, "foreach_copy": foreach}))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main(sys.argv[1])
