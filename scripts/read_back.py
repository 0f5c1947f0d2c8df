#!/usr/bin/env python3
"""Reads a model file with PyTorch / numpy / safetensors themselves and prints, as
JSON, every tensor: name, dtype, shape, sha256 of its little-endian bytes.

The tests use it to check that what transplant writes, the reference readers read
back equal. Usage: .venv/bin/python scripts/read_back.py FILE
"""
import hashlib
import json
import sys
import zipfile

import numpy as np
import torch


def record(name, tensor):
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {
        "name": name,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def main(path):
    metadata = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = [(k, f.get_tensor(k)) for k in f.keys()]
    elif path.endswith(".npz"):
        with np.load(path) as archive:
            tensors = [(k, torch.from_numpy(archive[k].copy(order="C"))) for k in archive.files]
    elif path.endswith(".ot"):
        module = torch.jit.load(path)
        named = list(module.named_parameters()) + list(module.named_buffers())
        tensors = [(k.replace("|", "."), v) for k, v in named]
    elif zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        module = torch.jit.load(path)
        tensors = list(module.state_dict().items())
    else:
        tensors = list(torch.load(path, weights_only=True, map_location="cpu").items())
    print(json.dumps({"metadata": metadata, "tensors": [record(n, t) for n, t in tensors]}))


if __name__ == "__main__":
    main(sys.argv[1])
