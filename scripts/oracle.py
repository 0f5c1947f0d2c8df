#!/usr/bin/env python3
"""PyTorch as the oracle: what transplant reads from a file against what PyTorch reads.

For every file of a corpus — the fixtures, files written by PyTorch for the occasion
(every dtype it saves, views, ties, nested and shared modules), files crafted at the
pickle level (several dtypes over one record, duplicate keys, v3 rebuilds, offsets),
and mutations of all of them (zip folders, member order, compression, duplicate and
missing members, storage classes swapped, integers and names changed, bytes flipped)
— this records what PyTorch reads (names, dtypes, shapes, SHA-256 of the bytes) and
what `transplant inspect --json --digest` reads, and compares them.

Every disagreement is a failure unless transplant refused the file (exit 1, one
message): where PyTorch reads a file, transplant reads the same or refuses; where
PyTorch fails, transplant refuses.

    oracle.py --transplant BIN --out DIR [--fixtures DIR] [--max-size BYTES] [--seed N]
              [--mutants N] [--jobs N] [--report FILE]

Prints the counts and one line per disagreement; exits 1 when there is any.
"""
import argparse
import collections
import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import zipfile

import torch

# ---------------------------------------------------------------------------
# What PyTorch reads


def digest(t):
    t = t.detach().cpu()
    if t.element_size() == 1:
        # The bytes as they lie: a copy of a bool tensor makes every byte 0 or 1.
        t = t.view(torch.uint8)
    t = t.contiguous()
    try:
        flat = t.reshape(-1).view(torch.uint8)
    except RuntimeError:
        # `contiguous()` keeps any stride of a dimension of size 1, which a
        # byte view refuses: a fresh tensor has the standard strides.
        flat = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def describe(t):
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": digest(t)}


def sniff(path):
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return "torchscript" if any(n.endswith("/constants.pkl") or n.endswith("/code/") or "/code/" in n for n in names) else "zip"
    if path.endswith(".safetensors"):
        return "safetensors"
    return "legacy"


def flatten(obj, key, path):
    """The state dict transplant says it read (`key`: the checkpoint key it chose)."""
    if isinstance(obj, torch.Tensor) and not key:
        # One tensor saved alone: transplant names it after the file.
        return {os.path.splitext(os.path.basename(path))[0]: obj}
    if key:
        for part in key.split("."):
            if isinstance(obj, dict) and part in obj:
                obj = obj[part]
            elif isinstance(obj, dict) and part.isdigit() and int(part) in obj:
                obj = obj[int(part)]
            else:
                return None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        return None
    out = collections.OrderedDict()
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
        elif type(v).__module__ == "numpy" and type(v).__name__ == "ndarray":
            out[str(k)] = torch.from_numpy(v)
    return out


def torch_reads(path, key):
    """(None, {name: description}) or (error text, None)."""
    kind = sniff(path)
    try:
        if kind == "torchscript":
            module = torch.jit.load(path, map_location="cpu")
            tensors = collections.OrderedDict(module.state_dict(keep_vars=True).items())
        elif kind == "safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            # Only the safe loader: the fixtures hold pickles made to run a
            # command when fully unpickled, and the oracle runs nothing.
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tensors = flatten(obj, key, path)
            if tensors is None:
                return "no state dict under the key transplant chose", None
        return None, {name: describe(t) for name, t in tensors.items()}
    except Exception as e:  # noqa: BLE001 - any failure of PyTorch's is an answer
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None


def transplant_reads(binary, path):
    """(exit code, parsed JSON or None, stderr tail)."""
    try:
        run = subprocess.run(
            [binary, "inspect", path, "--json", "--digest"], capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "timeout", None, "timed out after 120 s"
    try:
        doc = json.loads(run.stdout)
    except ValueError:
        doc = None
    return run.returncode, doc, run.stderr.decode(errors="replace")[-400:]


def compare(torch_view, doc):
    """The first difference between what PyTorch and transplant read, or None."""
    mine = collections.OrderedDict((e["name"], e) for e in doc.get("entries", []))
    if len(mine) != len(doc.get("entries", [])):
        return "transplant lists a name twice"
    if set(mine) != set(torch_view):
        only_t = sorted(set(torch_view) - set(mine))[:3]
        only_m = sorted(set(mine) - set(torch_view))[:3]
        return f"names differ: only PyTorch {only_t}, only transplant {only_m}"
    for name, want in torch_view.items():
        got = mine[name]
        for field in ("dtype", "shape", "sha256"):
            if got.get(field) != want[field]:
                return f"{name}: {field} PyTorch {want[field]!r}, transplant {got.get(field)!r}"
    return None


# ---------------------------------------------------------------------------
# Files written by PyTorch


def every_dtype():
    """Every dtype torch.save writes, with values that use their bits."""
    g = torch.Generator().manual_seed(0)
    out = collections.OrderedDict()
    raw = lambda n: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # noqa: E731
    for dtype in [
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
        torch.uint16, torch.uint32, torch.uint64,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    ]:
        size = torch.empty((), dtype=dtype).element_size()
        if dtype == torch.bool:
            t = raw(6) % 2 == 1
        else:
            t = raw(6 * size).view(dtype)
        out[str(dtype).removeprefix("torch.")] = t.reshape(2, 3).clone()
    for extra in ("float8_e8m0fnu",):
        dtype = getattr(torch, extra, None)
        if dtype is not None:
            out[extra] = raw(6).view(dtype).reshape(3, 2).clone()
    return out


def views_and_ties():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    d = collections.OrderedDict()
    d["base"] = base
    d["row"] = base[1]
    d["cols"] = base[:, 2:5]
    d["t"] = base.t()
    d["tied"] = base
    d["scalar"] = torch.tensor(3.5)
    d["empty"] = torch.empty(0, 3)
    d["count"] = torch.tensor(7, dtype=torch.int64)
    d["half_view"] = torch.randn(8, generator=g).half()[2:6]
    return d


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Block(3)
        self.body = torch.nn.Sequential(Block(3), Block(3))
        self.head = torch.nn.Linear(3, 2)
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("fp8", torch.arange(4, dtype=torch.float32).to(torch.float8_e4m3fn))
        self.register_buffer("u16", torch.arange(5, dtype=torch.int32).to(torch.uint16))

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.mean((2, 3)))


class Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        inner = torch.nn.Linear(2, 2)
        self.a = inner
        self.b = inner

    def forward(self, x):
        return self.b(self.a(x))


def written_by_pytorch(out):
    torch.manual_seed(0)
    files = []

    def save(name, obj, **kw):
        path = os.path.join(out, name)
        torch.save(obj, path, **kw)
        files.append(path)

    save("dtypes.pth", every_dtype())
    save("dtypes_legacy.pth", every_dtype(), _use_new_zipfile_serialization=False)
    save("views.pth", views_and_ties())
    save("views_legacy.pth", views_and_ties(), _use_new_zipfile_serialization=False)
    net = Net().eval()
    save("net_state.pth", net.state_dict())
    save("net_training.pth", {"epoch": 3, "state_dict": net.state_dict(), "optimizer": {"lr": 0.1}})
    for name, module in (("net.pt", net), ("shared.pt", Shared())):
        path = os.path.join(out, name)
        torch.jit.save(torch.jit.script(module), path)
        files.append(path)
    try:
        from safetensors.torch import save_file

        from safetensors.torch import _SIZE

        # Every dtype the installed safetensors package writes.
        st = {k: v for k, v in every_dtype().items() if v.dtype in _SIZE}
        path = os.path.join(out, "dtypes.safetensors")
        save_file(st, path)
        files.append(path)
    except ImportError:
        pass
    return files


# ---------------------------------------------------------------------------
# Files crafted at the pickle level: what torch.save never writes but a file can hold


class Storage:
    """A storage reference: ('storage', cls, key, 'cpu', numel)."""

    def __init__(self, cls, key, numel):
        self.cls, self.key, self.numel = cls, key, numel


class Rebuilt:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class Items:
    """An OrderedDict pickled with the items given, duplicates included."""

    def __init__(self, items):
        self.items = items

    def __reduce__(self):
        return (collections.OrderedDict, (), None, None, iter(self.items))


class CraftPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def v2(cls, key, numel, offset, size, stride):
    return Rebuilt(
        torch._utils._rebuild_tensor_v2,
        (Storage(cls, key, numel), offset, tuple(size), tuple(stride), False, collections.OrderedDict()),
    )


def v3(key, nbytes, offset, size, stride, dtype):
    return Rebuilt(
        torch._utils._rebuild_tensor_v3,
        (Storage(torch.UntypedStorage, key, nbytes), offset, tuple(size), tuple(stride), False,
         collections.OrderedDict(), dtype),
    )


def write_zip(path, members, folder="archive"):
    """`members`: (name, bytes) in order, under `folder/` (None: names as given)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name if folder is None else f"{folder}/{name}", data)


def pth_members(obj, records):
    buf = io.BytesIO()
    CraftPickler(buf, protocol=2).dump(obj)
    members = [("data.pkl", buf.getvalue()), ("byteorder", b"little")]
    members += [(f"data/{k}", v) for k, v in records.items()]
    members += [("version", b"3\n"), (".data/serialization_id", b"0")]
    return members


def crafted(out):
    files = []
    rec = {"0": bytes(range(64))}

    def craft(name, items, records=rec, folder="archive"):
        path = os.path.join(out, name)
        write_zip(path, pth_members(Items(items), records), folder)
        files.append(path)

    F, H, L, B = torch.FloatStorage, torch.HalfStorage, torch.LongStorage, torch.ByteStorage
    # Several dtypes over one record (torch.save refuses to write them; a file can hold them).
    craft("two_dtypes_disjoint.pth", [("w", v2(F, "0", 16, 0, [2], [1])), ("b", v2(H, "0", 32, 4, [4], [1]))])
    craft("two_dtypes_half_first.pth", [("b", v2(H, "0", 32, 4, [4], [1])), ("w", v2(F, "0", 16, 0, [2], [1]))])
    craft("two_dtypes_overlap.pth", [("w", v2(F, "0", 16, 0, [4], [1])), ("b", v2(L, "0", 8, 0, [2], [1]))])
    craft("v3_and_v2.pth", [("u", v3("0", 64, 2, [4], [1], torch.uint16)), ("f", v2(F, "0", 16, 1, [3], [1]))])
    craft("v3_fp8.pth", [("e4", v3("0", 64, 3, [2, 5], [5, 1], torch.float8_e4m3fn)),
                         ("e5", v3("0", 64, 0, [8], [1], torch.float8_e5m2))])
    craft("v3_u64.pth", [("u64", v3("0", 64, 1, [3], [2], torch.uint64)), ("u32", v3("0", 64, 0, [16], [1], torch.uint32))])
    # Duplicate keys: Python keeps the first position and the last value.
    craft("dup_key.pth", [("a", v2(F, "0", 16, 0, [2], [1])), ("b", v2(F, "0", 16, 2, [2], [1])),
                          ("a", v2(F, "0", 16, 4, [3], [1]))])
    # Offsets, strides, sizes at the edges.
    craft("reach_end.pth", [("x", v2(F, "0", 16, 12, [2, 2], [2, 1]))])
    craft("past_end.pth", [("x", v2(F, "0", 16, 13, [2, 2], [2, 1]))])
    craft("numel_past_record.pth", [("x", v2(F, "0", 32, 0, [20], [1]))])
    craft("byte_numel.pth", [("x", v2(B, "0", 64, 60, [4], [1]))])
    craft("zero_stride.pth", [("x", v2(F, "0", 16, 0, [3, 2], [0, 1]))])
    craft("empty_view.pth", [("x", v2(F, "0", 16, 40, [0, 5], [5, 1]))])
    # Integer tensors that require gradients: PyTorch cannot rebuild them.
    craft("int_requires_grad.pth", [("x", Rebuilt(torch._utils._rebuild_tensor_v2,
                                                  (Storage(L, "0", 8), 0, (2,), (1,), True, collections.OrderedDict())))])
    craft("int_parameter.pth", [("x", Rebuilt(torch._utils._rebuild_parameter,
                                              (v2(L, "0", 8, 0, [2], [1]), True, collections.OrderedDict())))])
    craft("float_parameter.pth", [("x", Rebuilt(torch._utils._rebuild_parameter,
                                                (v2(F, "0", 16, 0, [4], [1]), True, collections.OrderedDict())))])
    craft("other_folder.pth", [("x", v2(F, "0", 16, 0, [4], [1]))], folder="my_model")
    # Two storages, one of them named by a key torch.save never uses.
    craft("keys.pth", [("x", v2(F, "weird key", 4, 0, [4], [1])), ("y", v2(H, "0", 32, 0, [8], [1]))],
          records={"weird key": bytes(range(100, 116)), "0": bytes(range(64))})
    return files


# ---------------------------------------------------------------------------
# Mutations


def read_members(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def zipped(path, members, compress=False):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


def refolder(members, old, new):
    return [(new + n[len(old):] if n.startswith(old) else n, d) for n, d in members]


def scrambled(data):
    return bytes((b * 7 + 13) % 256 for b in data)


SAME_LENGTH_STORAGES = [
    ["HalfStorage", "LongStorage", "ByteStorage", "CharStorage", "BoolStorage"],
    ["FloatStorage", "ShortStorage"],
    ["DoubleStorage"],
    ["BFloat16Storage"],
]


def pickle_positions(data):
    """(ints, strings, globals) of the pickles in `data`, one after another (the
    legacy format holds five): (position, width) of every BININT1/2/BININT
    argument, (position, text) of every unicode string and of every GLOBAL's name."""
    ints, strings, globals_ = [], [], []
    start = 0
    while start < len(data):
        end = None
        try:
            for op, arg, pos in pickletools.genops(data[start:]):
                at = start + pos
                if op.name == "BININT1":
                    ints.append((at + 1, 1))
                elif op.name == "BININT2":
                    ints.append((at + 1, 2))
                elif op.name == "BININT":
                    ints.append((at + 1, 4))
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE") and isinstance(arg, str):
                    strings.append((at + (2 if op.name == "SHORT_BINUNICODE" else 5), arg))
                elif op.name == "GLOBAL" and isinstance(arg, str) and " " in arg:
                    module, name = arg.split(" ", 1)
                    globals_.append((at + 1 + len(module) + 1, name))
                elif op.name == "STOP":
                    end = start + pos + 1
        except Exception:  # noqa: BLE001 - past the pickles, or a pickle already broken
            pass
        if end is None:
            break
        start = end
    return ints, strings, globals_


def pickle_options(data, rng, write):
    """Mutations of the pickle bytes `data`: each calls `write(tag, new_bytes)`."""
    options = []
    ints, strings, globals_ = pickle_positions(data)
    if ints:
        def int_mutant():
            pos, width = rng.choice(ints)
            old = int.from_bytes(data[pos:pos + width], "little", signed=width == 4)
            new = rng.choice([0, 1, old + 1, old - 1, old * 2, 255, 2**15 - 1, -1, 2**31 - 1])
            fmt = {1: "<B", 2: "<H", 4: "<i"}[width]
            try:
                packed = struct.pack(fmt, new)
            except struct.error:
                packed = struct.pack(fmt, 0)
            write("int", data[:pos] + packed + data[pos + width:])

        options += [int_mutant] * 6
    storages = [(p, s) for p, s in strings + globals_ if s.endswith("Storage")]
    swappable = [(p, s) for p, s in storages if any(s in g and len(g) > 1 for g in SAME_LENGTH_STORAGES)]
    if swappable:
        def storage_mutant():
            pos, s = rng.choice(swappable)
            group = next(g for g in SAME_LENGTH_STORAGES if s in g)
            new = rng.choice([g for g in group if g != s])
            write("storage_class", data[:pos] + new.encode() + data[pos + len(s):])

        options += [storage_mutant] * 4
    names = [(p, s) for p, s in strings if s and not s.endswith("Storage") and s not in ("cpu", "storage")]
    if len(names) >= 2:
        def name_mutant():
            pos, s = rng.choice(names)
            same = [t for _, t in names if len(t) == len(s) and t != s]
            new = rng.choice(same) if same else s[:-1] + ("x" if s[-1] != "x" else "y")
            write("name", data[:pos] + new.encode() + data[pos + len(s):])

        options += [name_mutant] * 4

    def flip():
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        write("flip", bytes(b))

    options += [flip] * 3
    return options


def legacy_mutants(path, out, rng, count):
    """Up to `count` mutations of a legacy (pre-zip) torch.save file: its pickles'
    integers, storage classes, names and bits, and its storage bytes cut short."""
    with open(path, "rb") as f:
        data = f.read()
    stem = os.path.basename(path)
    made = []

    def write(tag, new):
        target = os.path.join(out, f"{stem}.{tag}.{len(made)}")
        with open(target, "wb") as f:
            f.write(new)
        made.append(target)

    # Only the first 64 KB: the pickles lie before the storages.
    options = pickle_options(data[: 64 << 10], rng, lambda tag, new: write(tag, new + data[64 << 10:]))
    options.append(lambda: write("truncated", data[: rng.randrange(len(data) // 2, len(data))]))
    for _ in range(count):
        rng.choice(options)()
    return made


def mutants(path, out, rng, count):
    """Up to `count` mutations of the zip archive at `path` (files written)."""
    try:
        members = read_members(path)
    except zipfile.BadZipFile:
        return []
    if not members:
        return []
    stem = os.path.basename(path)
    folder = members[0][0].split("/", 1)[0] + "/"
    pkl = next((i for i, (n, _) in enumerate(members) if n == folder + "data.pkl"), None)
    made = []

    def emit(tag, ms, compress=False):
        target = os.path.join(out, f"{stem}.{tag}.{len(made)}")
        zipped(target, ms, compress)
        made.append(target)

    options = []
    # Folders: a second copy of the archive under another folder, with other record bytes,
    # after or before the first; a root-level data.pkl; one member moved to another folder.
    other = refolder([(n, scrambled(d) if "/data/" in n else d) for n, d in members], folder, "zz_other/")
    options.append(lambda: emit("second_folder_after", members + other))
    options.append(lambda: emit("second_folder_before", other + members))
    if pkl is not None:
        options.append(lambda: emit("root_pkl_first", [("data.pkl", members[pkl][1])] + members))
        options.append(lambda: emit("root_pkl_last", members + [("data.pkl", members[pkl][1])]))
        options.append(lambda: emit("pkl_elsewhere", [(("zz_other/data.pkl" if i == pkl else n), d) for i, (n, d) in enumerate(members)]))
    # Order, compression, duplicates, missing and resized members.
    options.append(lambda: emit("reversed", list(reversed(members))))
    options.append(lambda: emit("shuffled", rng.sample(members, len(members))))
    options.append(lambda: emit("deflated", members, compress=True))
    records = [i for i, (n, _) in enumerate(members) if "/data/" in n and not n.endswith("/")]
    if records:
        def one_record(change):
            i = rng.choice(records)
            ms = list(members)
            res = change(i, ms)
            return ms if res is None else res

        options.append(lambda: emit("record_dropped", one_record(lambda i, ms: ms[:i] + ms[i + 1:])))
        options.append(lambda: emit("record_short", one_record(lambda i, ms: ms.__setitem__(i, (ms[i][0], ms[i][1][: len(ms[i][1]) // 2])))))
        options.append(lambda: emit("record_long", one_record(lambda i, ms: ms.__setitem__(i, (ms[i][0], ms[i][1] + bytes(17))))))
        options.append(lambda: emit("record_twice", one_record(lambda i, ms: ms + [(ms[i][0], scrambled(ms[i][1]))])))
    if pkl is not None:
        def with_pkl(new):
            ms = list(members)
            ms[pkl] = (ms[pkl][0], new)
            return ms

        options += pickle_options(members[pkl][1], rng, lambda tag, new: emit(tag, with_pkl(new)))
    for _ in range(count):
        rng.choice(options)()
    return made


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transplant", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixtures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mutants", type=int, default=4, help="mutations of each zip file")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--max-size", type=int, default=64 << 20, help="largest fixture file taken, in bytes")
    ap.add_argument("--report")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base_dir = os.path.join(args.out, "base")
    mut_dir = os.path.join(args.out, "mutants")
    os.makedirs(base_dir, exist_ok=True)
    os.makedirs(mut_dir, exist_ok=True)
    base = written_by_pytorch(base_dir) + crafted(base_dir)
    if args.fixtures:
        for root, dirs, names in os.walk(args.fixtures):
            dirs[:] = [d for d in sorted(dirs) if d not in ("hostile", "dcp")]
            for n in sorted(names):
                if n.endswith((".pt", ".pth", ".bin", ".safetensors", ".ot")) and os.path.getsize(os.path.join(root, n)) <= args.max_size:
                    base.append(os.path.join(root, n))
    corpus = list(base)
    for path in base:
        if zipfile.is_zipfile(path):
            corpus += mutants(path, mut_dir, rng, args.mutants)
        elif not path.endswith(".safetensors"):
            corpus += legacy_mutants(path, mut_dir, rng, args.mutants)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        reads = list(pool.map(lambda p: transplant_reads(args.transplant, p), corpus))

    counts = collections.Counter()
    failures = []
    rows = []
    for path, (code, doc, stderr) in zip(corpus, reads):
        key = doc.get("key") if isinstance(doc, dict) and code == 0 else None
        why, view = torch_reads(path, key)
        if why and "Weights only load failed" in why:
            # A global the safe loader does not allow (a pickled module, an
            # argparse.Namespace): only the full loader, which would run the
            # file's code, has an answer, and the oracle runs none.
            verdict = "not judged"
        elif code not in (0, 1, 3):
            verdict = "crash"
            failures.append(f"{path}: transplant exited {code}: {stderr.strip().splitlines()[-1:] if stderr.strip() else ''}")
        elif code != 0:
            verdict = "both refused" if view is None else "transplant refused"
        elif view is None:
            verdict = "pytorch refused"
            failures.append(f"{path}: PyTorch fails ({why}) but transplant reads {len(doc.get('entries', []))} tensors")
        else:
            difference = compare(view, doc)
            if difference:
                verdict = "disagree"
                failures.append(f"{path}: {difference}")
            else:
                verdict = "agree"
        counts[verdict] += 1
        rows.append({"file": path, "verdict": verdict, "pytorch": why, "transplant_exit": code})
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"counts": counts, "files": rows}, f, indent=1)
    print(
        f"oracle: {len(corpus)} files ({len(base)} written or crafted, {len(corpus) - len(base)} mutated): "
        + ", ".join(f"{counts[k]} {k}" for k in ("agree", "transplant refused", "both refused", "not judged", "pytorch refused", "disagree", "crash"))
    )
    for line in failures:
        print("DISAGREE " + line)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
