#!/usr/bin/env python3
"""The order matcher's sweep: torchvision -> timm, thirteen families, with
`--match order` alone (no rules), from a `.pth` state dict (registration order
kept) and from safetensors (none kept).

For each family it builds torchvision's model and timm's model of the same
architecture (random weights, BatchNorm statistics from training batches),
saves torchvision's state dict both ways and timm's model as TorchScript, then
runs `transplant plan SRC timm.pt --match order --json` for each source.

What is true is decided by the models, not by transplant: a family's true pairs
are those of the first of these mappings whose copy makes timm's model compute
torchvision's outputs (within 1e-4) — equal names (`--match exact`), the shipped
rules (`rules/torchvision_to_timm/`), the order matcher on the `.pth`. A source's
plan is *exact* when it is complete and its copy computes torchvision's outputs;
a pair is *wrong* when the true pairs pair its source otherwise (a family with no
true mapping found has its pairs counted as unjudged). A plan that is not exact
also shows what it tells the user to pass (`--order-from`, rules).

    .venv/bin/python scripts/order_sweep.py --transplant target/debug/transplant \\
        --out DIR [--families resnet18,efficientnet_b0] [--json FILE]

Prints one line per family and source, and the totals.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def families():
    import timm
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.vgg import VGG, make_layers
    from torchvision.models.vision_transformer import VisionTransformer

    def tv_vgg():
        model = VGG(make_layers([8, "M", 16, "M", 32, "M", 64, "M", 512, "M"], batch_norm=True), num_classes=10)
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 4096), nn.ReLU(True),
            nn.Dropout(), nn.Linear(4096, 10),
        )
        return model

    tv, tm = torchvision.models, timm.create_model
    small = (2, 3, 64, 64)
    return {
        # name: (torchvision model, timm model, input shape, shipped rules or None)
        "resnet18": (lambda: tv.resnet18(num_classes=10), lambda: tm("resnet18", num_classes=10), small, None),
        "resnet50": (lambda: tv.resnet50(num_classes=10), lambda: tm("resnet50", num_classes=10), small, None),
        "resnext50_32x4d": (
            lambda: tv.resnext50_32x4d(num_classes=10), lambda: tm("resnext50_32x4d", num_classes=10), small, None),
        "densenet121": (lambda: tv.densenet121(num_classes=10), lambda: tm("densenet121", num_classes=10), small, None),
        "efficientnet_b0": (
            lambda: tv.efficientnet_b0(num_classes=10), lambda: tm("efficientnet_b0", num_classes=10), small,
            "efficientnet"),
        "mobilenet_v2": (
            lambda: tv.mobilenet_v2(num_classes=10), lambda: tm("mobilenetv2_100", num_classes=10), small, None),
        "mobilenet_v3_small": (
            lambda: tv.mobilenet_v3_small(num_classes=10),
            lambda: tm("mobilenetv3_small_100", num_classes=10, bn_eps=1e-3), small, "mobilenet_v3_small"),
        "mobilenet_v3_large": (
            lambda: tv.mobilenet_v3_large(num_classes=10),
            lambda: tm("mobilenetv3_large_100", num_classes=10, bn_eps=1e-3), small, None),
        "mnasnet1_0": (lambda: tv.mnasnet1_0(num_classes=10), lambda: tm("mnasnet_100", num_classes=10), small, None),
        "regnet_y_400mf": (
            lambda: tv.regnet_y_400mf(num_classes=10), lambda: tm("regnety_004", num_classes=10), small, None),
        "convnext": (
            lambda: ConvNeXt(
                [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                num_classes=10,
            ),
            lambda: timm.models.convnext.ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 32, 64), num_classes=10),
            (2, 3, 32, 32), "convnext"),
        "vgg11_bn": (
            tv_vgg,
            lambda: timm.models.vgg.VGG(
                [8, "M", 16, "M", 32, "M", 64, "M", 512, "M"], num_classes=10, mlp_ratio=64 / 4096,
                norm_layer=nn.BatchNorm2d),
            small, None),
        "vit": (
            lambda: VisionTransformer(
                image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
            lambda: timm.models.vision_transformer.VisionTransformer(
                img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10),
            (2, 3, 32, 32), "vit"),
    }


def warm_up(model, shape, seed):
    """Random weights moved off their initial values, and BatchNorm statistics
    from a few training batches: every tensor is its own."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model.train()
        for _ in range(2):
            model(torch.randn(*shape, generator=g))
    return model.eval()


def build(name, make_tv, make_timm, shape, folder):
    """The three models in `folder`, and torchvision's model's input and output
    (kept in `expected.pt`: a folder built before is used as it is)."""
    from safetensors.torch import save_file

    expected = os.path.join(folder, "expected.pt")
    if os.path.exists(expected):
        saved = torch.load(expected)
        return saved["x"], saved["want"]
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    tv = warm_up(make_tv(), (4,) + shape[1:], seed)
    state = tv.state_dict()
    torch.save(state, os.path.join(folder, "tv.pth"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "tv.safetensors"))
    torch.manual_seed(seed + 1)
    timm_model = make_timm().eval()
    with torch.no_grad():
        traced = torch.jit.trace(timm_model, torch.randn(*shape), check_trace=False)
    torch.jit.save(traced, os.path.join(folder, "timm.pt"))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        want = tv(x)
    torch.save({"x": x, "want": want}, expected)
    return x, want


def transplant(binary, *args):
    run = subprocess.run([binary, *args], capture_output=True, text=True)
    return run.returncode, run.stdout, run.stderr


def plan(binary, src, dst, extra):
    code, out, err = transplant(binary, "plan", src, dst, "--json", *extra)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        return {"code": code, "pairs": {}, "complete": False, "doc": {}, "stderr": err}
    pairs = {}
    for p in doc.get("pairs", []):
        pairs[p["source"]] = p["target"]
    return {"code": code, "pairs": pairs, "complete": code == 0, "doc": doc, "stderr": err}


def computes(binary, src, dst, extra, x, want, folder):
    """Whether copying SRC into DST with `extra` makes DST compute `want`."""
    out = os.path.join(folder, "out.pt")
    code, _, err = transplant(binary, "copy", src, dst, "-o", out, *extra)
    if code != 0:
        return False
    with torch.no_grad():
        got = torch.jit.load(out).eval()(x)
    os.remove(out)
    return got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def suggested_rules(doc):
    """The rules a plan's notes say would pair what it left over."""
    rules = []
    for p in doc.get("problems", []):
        text = p.get("message", "")
        marker = "the rule `"
        if marker in text and "would pair them" in text:
            start = text.index(marker) + len(marker)
            rules.append(text[start:text.index("` would pair them", start)])
    return rules


def hints(doc):
    """What a plan that is not exact tells the user to pass."""
    said = []
    for p in doc.get("problems", []):
        text = p.get("message", "")
        for word in ("--order-from", "--rules", "--map", "--skip", "--keep"):
            if word in text and word not in said:
                said.append(word)
    if suggested_rules(doc):
        said.append("a rule it writes out")
    return said


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transplant", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    wanted = [f for f in args.families.split(",") if f]
    rows = []
    for name, (make_tv, make_timm, shape, rules) in families().items():
        if wanted and name not in wanted:
            continue
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        x, want = build(name, make_tv, make_timm, shape, folder)
        pth, st, dst = (os.path.join(folder, f) for f in ("tv.pth", "tv.safetensors", "timm.pt"))
        truth, truth_from = None, "none"
        candidates = [(["--match", "exact"], "equal names")]
        if rules:
            candidates.append((["--rules", os.path.join(ROOT, "rules/torchvision_to_timm", rules + ".rules")], "rules"))
        candidates.append((["--match", "order"], "order on .pth"))
        for extra, label in candidates:
            p = plan(args.transplant, pth, dst, extra)
            if p["complete"] and computes(args.transplant, pth, dst, extra, x, want, folder):
                truth, truth_from = p["pairs"], label
                break
            if label == "order on .pth":
                # The rules that plan suggests for what it left over (a Linear
                # as a 1x1 conv: a reshape), added to it.
                maps = suggested_rules(p["doc"])
                extra = extra + [a for m in maps for a in ("--map", m)]
                p = plan(args.transplant, pth, dst, extra)
                if maps and p["complete"] and computes(args.transplant, pth, dst, extra, x, want, folder):
                    truth, truth_from = p["pairs"], "order on .pth + its suggested rules"
        for kind, src in ((".pth", pth), ("safetensors", st)):
            p = plan(args.transplant, src, dst, ["--match", "order"])
            exact = p["complete"] and computes(args.transplant, src, dst, ["--match", "order"], x, want, folder)
            wrong = None if truth is None else sum(1 for s, t in p["pairs"].items() if truth.get(s) != t)
            row = {
                "family": name,
                "source": kind,
                "tensors": len(p["doc"].get("pairs", [])) + sum(
                    1 for l in p["doc"].get("leftovers", []) if l.get("side") == "source"),
                "pairs": len(p["pairs"]),
                "exact": bool(exact),
                "wrong": wrong,
                "truth": truth_from,
                "hints": [] if exact else hints(p["doc"]),
            }
            rows.append(row)
            judged = "unjudged" if wrong is None else f"{wrong} wrong"
            print(f"{name:20} {kind:12} {row['pairs']:4}/{row['tensors']:<4} paired  "
                  f"{'EXACT' if exact else 'not exact':9}  {judged:9} (truth: {truth_from})  "
                  f"{' '.join(row['hints'])}", flush=True)
    for kind in (".pth", "safetensors"):
        mine = [r for r in rows if r["source"] == kind]
        print(f"{kind}: {sum(r['exact'] for r in mine)} of {len(mine)} exact, "
              f"{sum(r['wrong'] or 0 for r in mine)} wrong pairs "
              f"({sum(r['wrong'] is None for r in mine)} families unjudged)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
