#!/usr/bin/env python3
"""Writes a model file holding one [2, 3] tensor of each dtype PyTorch saves, named
`t_<dtype>` (random bytes; 0/1 for bool), and `t_uint16_view`, a transposed view of
`t_uint16` sharing its storage. tests/dtypes.rs uses it.

Usage: .venv/bin/python scripts/every_dtype.py OUT KIND [DTYPES]
  KIND: zip | legacy (torch.save), script (a TorchScript module with the tensors as
  buffers), safetensors (safetensors.torch.save_file); DTYPES: comma-separated
  names, all of NAMES by default (for safetensors, all its binding knows).
"""
import sys
import warnings

import torch

warnings.simplefilter("ignore")  # complex32 is "experimental"

# Every dtype torch.save of PyTorch 2.13 writes (quantized tensors aside).
NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
]


def tensors(names):
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in names:
        dtype = getattr(torch, name)
        size = torch.empty(0, dtype=dtype).element_size()
        if dtype == torch.bool:
            t = torch.randint(0, 2, (2, 3), generator=g).bool()
        else:
            t = torch.randint(0, 256, (2 * 3 * size,), dtype=torch.uint8, generator=g).view(dtype).reshape(2, 3)
        out["t_" + name] = t
    if "uint16" in names:
        out["t_uint16_view"] = out["t_uint16"].t()
    return out


def main(path, kind, names=""):
    if kind == "safetensors" and not names:
        # Every dtype the safetensors package's PyTorch binding reads and writes.
        from safetensors.torch import _TYPES

        names = ",".join(str(d).removeprefix("torch.") for d in _TYPES.values())
    out = tensors(names.split(",") if names else NAMES)
    if kind == "legacy":
        torch.save(out, path, _use_new_zipfile_serialization=False)
    elif kind == "zip":
        torch.save(out, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in out.items()}, path)
    elif kind == "script":

        class Buffers(torch.nn.Module):
            def __init__(self):
                super().__init__()
                for k, v in out.items():
                    self.register_buffer(k, v.contiguous())

            def forward(self, x):
                return x

        torch.jit.script(Buffers()).save(path)
    else:
        raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    main(*sys.argv[1:])
