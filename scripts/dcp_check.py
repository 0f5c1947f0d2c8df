#!/usr/bin/env python3
"""Checks Distributed Checkpoints with PyTorch's own reader, and makes broken ones.

Usage: .venv/bin/python scripts/dcp_check.py load DIR MODULE.pt [PREFIX]
           torch.distributed.checkpoint.load in one process into MODULE.pt's state
           dict (under PREFIX, e.g. model); exits 1 unless every tensor is equal
       .venv/bin/python scripts/dcp_check.py load2 DIR MODULE.pt [PREFIX]
           the same by two ranks (gloo on CPU), tensors sharded on dim 0 (Shard(0))
       .venv/bin/python scripts/dcp_check.py corrupt DIR OUT CASE
           a copy of DIR with its metadata broken: overlap, missing, outside,
           past_end, escape, transforms; huge (two chunks claiming 3 GB each
           over a few bytes), overflow (a size past an i64), shared_bytes (two
           tensors' storage at one offset)
       .venv/bin/python scripts/dcp_check.py many DIR OUT N
           a copy of DIR whose first tensor is claimed as N one-element chunks,
           each with four bytes of its own in a new file (of zeros, not
           torch.save streams)
"""
import os
import pickle
import shutil
import socket
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def expected(module, prefix):
    state = dict(torch.jit.load(module).state_dict())
    return {prefix: state} if prefix else state


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def compare(got, want):
    for k, v in want.items():
        if isinstance(v, dict):
            compare(got[k], v)
        else:
            g = got[k]
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            # Bit for bit, for every dtype (torch.equal has no float8 kernel).
            same = g.dtype == v.dtype and g.shape == v.shape
            if not (same and torch.equal(bits(g), bits(v))):
                sys.exit(f"{k} differs")


def load(folder, module, prefix):
    import torch.distributed.checkpoint as dcp

    want = expected(module, prefix)
    got = {k: ({n: torch.zeros_like(t) for n, t in v.items()} if isinstance(v, dict) else torch.zeros_like(v)) for k, v in want.items()}
    dcp.load(got, checkpoint_id=folder)
    compare(got, want)
    print("equal")


def rank(r, world, folder, module, prefix, port):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=r, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    flat = dict(torch.jit.load(module).state_dict())
    shell = {}
    for k, v in flat.items():
        z = torch.zeros_like(v)
        if v.dim() >= 1 and v.shape[0] % world == 0:
            shell[k] = distribute_tensor(z, mesh, [Shard(0)])
        elif v.dim() >= 1:
            shell[k] = distribute_tensor(z, mesh, [Replicate()])
        else:
            shell[k] = z
    got = {prefix: shell} if prefix else shell
    dcp.load(got, checkpoint_id=folder)
    compare(got, {prefix: flat} if prefix else flat)
    dist.destroy_process_group()


def load2(folder, module, prefix):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank, args=(2, folder, module, prefix, port), nprocs=2)
    print("equal")


def corrupt(folder, out, case):
    shutil.copytree(folder, out)
    with open(os.path.join(out, ".metadata"), "rb") as f:
        meta = pickle.load(f)
    name = next(k for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks") and len(v.size) >= 1 and v.size[0] > 1)
    tsm = meta.state_dict_metadata[name]
    chunk = tsm.chunks[0]
    index = next(i for i in meta.storage_data if i.fqn == name)
    info = meta.storage_data[index]
    if case == "overlap":
        tsm.chunks.append(chunk)
    elif case == "missing":
        tsm.chunks[0] = type(chunk)(offsets=chunk.offsets, sizes=torch.Size([chunk.sizes[0] - 1] + list(chunk.sizes[1:])))
    elif case == "outside":
        tsm.chunks[0] = type(chunk)(offsets=chunk.offsets, sizes=torch.Size([chunk.sizes[0] + 1] + list(chunk.sizes[1:])))
    elif case == "past_end":
        info.offset += 1 << 30
    elif case == "escape":
        info.relative_path = "../" + info.relative_path
    elif case == "transforms":
        info.transform_descriptors = ["zstd"]
    elif case == "huge":
        n = 3 << 30  # elements of one byte each: 3 GB a chunk
        tsm.size = torch.Size([2 * n])
        tsm.properties.dtype = torch.uint8
        half = type(chunk)(offsets=torch.Size([0]), sizes=torch.Size([n]))
        other = type(chunk)(offsets=torch.Size([n]), sizes=torch.Size([n]))
        tsm.chunks = [half, other]
        for key in [i for i in meta.storage_data if i.fqn == name]:
            del meta.storage_data[key]
        meta.storage_data[type(index)(fqn=name, offset=torch.Size([0]))] = type(info)(relative_path="huge.distcp", offset=0, length=8)
        meta.storage_data[type(index)(fqn=name, offset=torch.Size([n]))] = type(info)(relative_path="huge.distcp", offset=8, length=8)
        with open(os.path.join(out, "huge.distcp"), "wb") as f:
            f.write(bytes(16))
    elif case == "shared_bytes":
        other = next(i for i in meta.storage_data if i.fqn != name)
        meta.storage_data[other].offset = info.offset
    elif case == "overflow":
        tsm.size = torch.Size([1 << 62, 1 << 62] + list(tsm.size[1:]))
    else:
        sys.exit(f"unknown case {case}")
    with open(os.path.join(out, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    print(name)


def many(folder, out, n):
    n = int(n)
    shutil.copytree(folder, out)
    with open(os.path.join(out, ".metadata"), "rb") as f:
        meta = pickle.load(f)
    name = next(k for k, v in meta.state_dict_metadata.items() if hasattr(v, "chunks"))
    tsm = meta.state_dict_metadata[name]
    index = next(i for i in meta.storage_data if i.fqn == name)
    info = meta.storage_data[index]
    del meta.storage_data[index]
    tsm.size = torch.Size([n])
    tsm.properties.dtype = torch.float32
    chunk = type(tsm.chunks[0])
    tsm.chunks = [chunk(offsets=torch.Size([i]), sizes=torch.Size([1])) for i in range(n)]
    for i in range(n):
        meta.storage_data[type(index)(fqn=name, offset=torch.Size([i]))] = type(info)(relative_path="many.distcp", offset=4 * i, length=4)
    with open(os.path.join(out, "many.distcp"), "wb") as f:
        f.write(bytes(4 * n))
    with open(os.path.join(out, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    print(name)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "corrupt":
        corrupt(*args)
    elif mode == "many":
        many(*args)
    else:
        folder, module = args[0], args[1]
        prefix = args[2] if len(args) > 2 else None
        (load if mode == "load" else load2)(folder, module, prefix)
