#!/usr/bin/env python3
"""Reads a model file with PyTorch / numpy / safetensors themselves and prints, as
JSON, every tensor: name, dtype, shape, sha256 of its little-endian bytes.

The tests use it to check that what transplant writes, the reference readers read
back equal. Usage: .venv/bin/python scripts/read_back.py FILE
       .venv/bin/python scripts/read_back.py FILE FILE...   (one JSON object, by file)

Sharded safetensors (*.safetensors.index.json) are read shard by shard as the index
says, each tensor from the shard the index names; total_size is checked.
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


def read(path):
    metadata = {}
    if path.endswith(".safetensors.index.json"):
        import os
        from safetensors import safe_open

        with open(path) as f:
            index = json.load(f)
        tensors, total = [], 0
        for name, shard in index["weight_map"].items():
            with safe_open(os.path.join(os.path.dirname(path), shard), framework="pt") as f:
                tensor = f.get_tensor(name)
            total += tensor.numel() * tensor.element_size()
            tensors.append((name, tensor))
        metadata = {k: str(v) for k, v in index.get("metadata", {}).items()}
        assert int(metadata.get("total_size", total)) == total, f"total_size {metadata.get('total_size')} != {total}"
    elif path.endswith(".safetensors"):
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
    return {"metadata": metadata, "tensors": [record(n, t) for n, t in tensors]}


def main(paths):
    if len(paths) == 1:
        print(json.dumps(read(paths[0])))
    else:
        print(json.dumps({path: read(path) for path in paths}))


if __name__ == "__main__":
    main(sys.argv[1:])
