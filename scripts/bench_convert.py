#!/usr/bin/env python3
"""Timing and peak memory of converting a torch.save checkpoint to safetensors.

Usage: .venv/bin/python scripts/bench_convert.py theirs SRC OUT
           safetensors.torch.save_file(torch.load(SRC, weights_only=True), OUT), in a
           child process
       .venv/bin/python scripts/bench_convert.py ours TRANSPLANT SRC OUT
           TRANSPLANT convert SRC -o OUT
Prints JSON: seconds (wall, whole process) and peak_rss_bytes (the process's own).
"""
import json
import os
import resource
import subprocess
import sys
import time

THEIRS = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True, map_location="cpu"), sys.argv[2])
"""


def measure(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def main():
    mode = sys.argv[1]
    if mode == "theirs":
        src, out = sys.argv[2:4]
        result = measure([sys.executable, "-c", THEIRS, src, out])
    else:
        binary, src, out = sys.argv[2:5]
        result = measure([binary, "convert", src, "-o", out])
    os.remove(out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
