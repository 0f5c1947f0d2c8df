"""An independent PyTorch reference for `transplant merge` (tests/merge.rs).

    merge_reference.py make DIR           models to merge, from fixed seeds
    merge_reference.py check DIR CASES    each case's OUT against the formulas

`make` writes two families of models, each a base and three fine-tunes:
a ResNet-style net with BatchNorm (running statistics moved by training
batches, so `num_batches_tracked` differs between models) and a small
transformer encoder (embedding, attention, LayerNorm, head). Fine-tunes change
some tensors and leave others equal to the base (SLERP's near-parallel
fallback), some biases stay zero, and they are saved in several formats and
dtypes (float16, bfloat16) and one under other names (`backbone.` prefix).

`check` reads CASES (a JSON list: method, models, base, weights, density,
lambda, t, seed, dtype, rename, out), computes every method from its published
formula in float32 with torch, and compares each output tensor with what
transplant wrote: floating tensors within 1e-5 relative (float16/bfloat16
outputs within their rounding), integer tensors equal to the reference
input's. DARE's masks are recomputed from the documented generator
(SplitMix64 keyed by FNV-1a of "{seed}/{model}/{tensor}"), in numpy.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file, save_file


# ---------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.layer1(x).mean((2, 3)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50)
        self.register_buffer("position_ids", torch.arange(16))


def finetune(model, seed, batches, changed):
    """The model with seeded changes to the tensors whose names contain any
    of `changed`, and `batches` training batches through its BatchNorms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(c in name for c in changed):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    if batches and isinstance(model, ResNetish):
        model.train()
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randn(4, 3, 8, 8, generator=g))
    return model


def make(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = ResNetish()
    finetune(base, 1, 1, [])
    save = lambda sd, name: torch.save(sd, out / name)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    save(sd, "r_base.pth")
    for i, (changed, batches) in enumerate([(["conv", "fc"], 2), (["bn", "fc.weight"], 3), (["layer1.0", "stem"], 0)]):
        torch.manual_seed(0)
        m = ResNetish()
        m.load_state_dict(sd)
        finetune(m, 10 + i, batches, changed)
        msd = m.state_dict()
        if i == 0:
            torch.save(msd, out / "r_ft1.pth")
        elif i == 1:
            save_file({k: v.contiguous() for k, v in msd.items()}, out / "r_ft2.safetensors")
        else:
            # Another dtype, under other names.
            torch.save({"backbone." + k: (v.half() if v.is_floating_point() else v) for k, v in msd.items()},
                       out / "r_ft3_renamed.pth")
    # One tensor of another shape.
    bad = dict(sd)
    bad["fc.weight"] = bad["fc.weight"][:5].clone()
    torch.save(bad, out / "r_badshape.pth")

    torch.manual_seed(1)
    t = Tiny()
    tsd = {k: v.clone() for k, v in t.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tsd.items()}, out / "t_base.safetensors")
    for i, changed in enumerate([["layers.0", "head"], ["self_attn", "embed"], ["linear1", "norm.weight"]]):
        m = Tiny()
        m.load_state_dict(tsd)
        finetune(m, 20 + i, 0, changed)
        msd = {k: v.contiguous() for k, v in m.state_dict().items()}
        if i == 1:
            msd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in msd.items()}
        save_file(msd, out / f"t_ft{i + 1}.safetensors")
    (out / "strip.rules").write_text("backbone\\.(.*) => $1\n")


# ---------------------------------------------------------------- formulas
def load(path, rename):
    path = str(path)
    if path.endswith(".npz"):
        with np.load(path) as z:
            sd = {k: torch.from_numpy(z[k]) for k in z.files}
    else:
        sd = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    if rename:
        sd = {k[len(rename):] if k.startswith(rename) else k: v for k, v in sd.items()}
    return sd


GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def fnv1a(text):
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def keep_mask(key, n, density):
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(1, n + 1, dtype=np.uint64) * GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return torch.from_numpy((u < density).astype(np.float32))


def trim(d, density):
    if density >= 1.0 or d.numel() == 0:
        return d
    n = d.numel()
    k = min(max(1, math.ceil(density * n)), n)
    threshold = d.abs().flatten().kthvalue(n - k + 1).values
    return d * (d.abs() >= threshold)


def ties_mean(base, deltas, weights, lam):
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    stacked = torch.stack(deltas) * w
    sign = torch.sign(stacked.sum(0))
    agree = torch.sign(stacked) == sign
    total = (stacked * agree).sum(0)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + lam * total / divisor


def slerp(a, b, t):
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm().item(), b64.norm().item()
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    dot = (a64 * b64).sum().item() / (na * nb)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return a * (math.sin((1 - t) * theta) / s) + b * (math.sin(t * theta) / s)


def merged(case, name, xs):
    """xs: float32 values, the base first where the case has one."""
    method = case["method"]
    has_base = case.get("base") is not None
    models = xs[1:] if has_base else xs
    w = case.get("weights") or [1.0] * len(models)
    lam = case.get("lambda", 1.0)
    density = case.get("density", 1.0)
    if method == "linear":
        return sum(wi * x for wi, x in zip(w, models)) / sum(w)
    if method == "slerp":
        return slerp(xs[0], xs[1], case.get("t", 0.5))
    base = xs[0]
    deltas = [x - base for x in models]
    if method in ("dare-linear", "dare-ties") and density < 1.0:
        seed = case.get("seed", 0)
        deltas = [
            d * keep_mask(fnv1a(f"{seed}/{m}/{name}"), d.numel(), density).view(d.shape) / density
            for m, d in enumerate(deltas)
        ]
    if method in ("task-arithmetic", "dare-linear"):
        return base + lam * sum(wi * d for wi, d in zip(w, deltas))
    if method == "ties":
        deltas = [trim(d, density) for d in deltas]
    return ties_mean(base, deltas, w, lam)


DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "f64": torch.float64}


def check(folder, cases_file):
    folder = Path(folder)
    cases = json.loads(Path(cases_file).read_text())
    failures = []
    for case in cases:
        paths = ([case["base"]] if case.get("base") else []) + case["models"]
        renames = case.get("rename", {})
        inputs = [load(folder / p, renames.get(p)) for p in paths]
        out = load(case["out"], None)
        ref = inputs[0]
        if list(out) != list(ref):
            failures.append(f"{case['out']}: names {list(out)[:4]}... are not the reference's")
            continue
        for name, r in ref.items():
            got = out[name]
            if not r.is_floating_point():
                if got.dtype != r.dtype or not torch.equal(got, r):
                    failures.append(f"{case['out']}: {name}: integer tensor is not the reference's")
                continue
            want_dtype = DTYPES[case["dtype"]] if case.get("dtype") else r.dtype
            if got.dtype != want_dtype:
                failures.append(f"{case['out']}: {name}: dtype {got.dtype}, expected {want_dtype}")
                continue
            compute = torch.float64 if want_dtype == torch.float64 else torch.float32
            want = merged(case, name, [x[name].to(compute) for x in inputs]).to(want_dtype)
            g, e = got.double(), want.double()
            if want_dtype in (torch.float16, torch.bfloat16):
                eps = torch.finfo(want_dtype).eps
                ok = (g - e).abs() <= eps * e.abs() + 1e-6
            else:
                ok = (g - e).abs() <= 1e-5 * e.abs() + 1e-6
            if not bool(ok.all()):
                worst = (g - e).abs().max().item()
                failures.append(f"{case['out']}: {name}: max |diff| {worst:.3e} ({case['method']})")
    if failures:
        print("\n".join(failures[:40]), file=sys.stderr)
        sys.exit(1)
    print(f"{len(cases)} merges match the reference")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
