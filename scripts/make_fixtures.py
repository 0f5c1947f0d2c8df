#!/usr/bin/env python3
"""Writes the test fixtures of transplant, made by real PyTorch, deterministically.

Usage: .venv/bin/python scripts/make_fixtures.py [OUT_DIR]   (default: target/fixtures)

Every model is run in train mode for a few batches first, so BatchNorm running
statistics and num_batches_tracked are not their defaults: a copy that leaves
buffers behind is visible in eval-mode outputs.

Files (for each model NAME):
  NAME_a.pt, NAME_b.pt     scripted modules, same architecture, different weights
  NAME_a_traced.pt         the same weights as NAME_a.pt, traced instead of scripted
  NAME.entries.json        state_dict() of NAME_a as PyTorch lists it: name, role, shape, dtype
  NAME.expected.safetensors  input, eval-mode output of a (output_a) and of b (output_b)
and not_a_module.pt (a torch.save state dict, which is not a TorchScript module).

State-dict formats (formats.expected.json lists, per file, every tensor as the
writer wrote it: name, dtype, shape and the sha256 of its little-endian bytes):
  dtypes.safetensors       every dtype safetensors and libtorch share, a scalar, an
                           empty tensor, and a __metadata__ map
  dtypes.npz, dtypes_compressed.npz   the same through numpy (no bfloat16 in numpy),
                           plus a Fortran-ordered array
  sharded/model.safetensors.index.json   bn_net_a's state dict in three shards

Mapping cases (each *.expected.safetensors holds an input and the source model's
eval output on it; sources matched by order are modules, whose order is the
registration order, unlike safetensors files, which sort their tensors):
  mlp_bn.pt -> mlp.pt                Sequential(Linear, BN, ReLU, Linear) into
                                     Sequential(Linear, ReLU, Linear)
  wrapped_module.safetensors, wrapped_orig_mod.safetensors
                                     bn_net_a's state dict under `module.` (DataParallel)
                                     and `_orig_mod.` (torch.compile)
  backbone.safetensors -> encoder.pt names `backbone.*` into a module that calls it `encoder`
  resnet18.pt -> renamed_resnet18.pt
                                     torchvision's resnet18 into the same network written
                                     with different attribute names everywhere

torch.save checkpoints (torch_save/; torch_save.expected.json lists, per file, the
key of the state dict and its tensors as PyTorch loads them):
  resnet18.pth, mobilenet_v2.pth  torchvision state dicts (BatchNorm, _metadata)
  training.pth                    {'epoch', 'state_dict', 'optimizer', 'best_acc', 'arch'}
  two_models.pth                  {'model': ..., 'model_ema': ...} (needs a key)
  nested.pth                      {'checkpoint': {'model': {'state_dict': ...}}}
  dataparallel.pth                keys under `module.`
  dtypes.pth                      float16, bfloat16, int8, bool, ... tensors
  views.pth                       a transposed tensor, a strided slice, and two names
                                  (and a view) sharing one storage
  parameter.pth                   an nn.Parameter saved directly
  legacy.pth                      the pre-1.6 format (_use_new_zipfile_serialization=False)
  legacy_views.pth                views.pth's tensors in the pre-1.6 format
  malicious.pth                   a pickle that would call os.system if unpickled
  research.pth                    a training dict as research code writes it: argparse.Namespace,
                                  numpy scalars and arrays, optimizer state, state_dict and
                                  state_dict_ema (the key picks one)
  pickled_module.pth              torch.save(model) of a nested network with a non-persistent buffer
  pickled_dataparallel.pth        torch.save(nn.DataParallel(model))
  int_keys.pth                    {0: tensor, 1: tensor, 7: tensor}
  numpy_arrays.pth                numpy arrays (C and Fortran order) as the weights
  object_array.pth                a numpy object array (refused)
  inert_payload.pth               a state dict next to an object whose class, if called
                                  (as unpickling in Python does), creates torch_save/TOUCHED
  sharded_bin/pytorch_model.bin.index.json   a state dict in two torch.save shards

Examples (examples/):
  nested_a.pt, nested_b.pt   Sequentials inside a ModuleList inside a ModuleDict, with
                             BatchNorm four levels down (blocks.encoder.1.norm.running_var)
  nested.expected.safetensors  input and nested_a's eval output
  small_mlp.pt               Sequential(Linear(8, 16), BatchNorm1d(16), ReLU, Linear(16, 4)),
                             the network examples/varstore_to_script.rs builds with tch

Rule library cases (rules/, tests/rules_library.rs; needs timm): for FAMILY in
convnext, vgg, efficientnet, mobilenet_v3_small, vit:
  FAMILY_torchvision.safetensors  a torchvision model's state dict: random weights,
                                  BatchNorm statistics from a few training batches
  FAMILY_timm.pt                  timm's model of the same family (other weights), traced
  FAMILY.expected.safetensors     input and the torchvision model's eval output
(small widths where the family allows it; the names are the full models' names).

Transform cases (transforms/, tests/transforms_models.rs), each scripted, with
FILE.expected.safetensors (input, the model's output):
  fused_attn.pt, split_attn.pt    one attention block with a fused qkv projection,
                                  and the same block with separate q, k, v
  conv1d_mlp.pt, linear_mlp.pt    a GPT-2 style MLP (Conv1D, weight [in, out]) and the
                                  same MLP with nn.Linear (weight [out, in])

Distributed Checkpoints (dcp/, tests/dcp.rs), saved by torch.distributed.checkpoint
from two ranks (a gloo process group on CPU, torch.multiprocessing):
  two_ranks/        {"model": bn_net_a's state dict, "step": 5}: tensors whose first
                    dimension is even sharded on it across the ranks (DTensor Shard(0)),
                    the others replicated or plain; and {"optim": ...} tensors beside
  hf/               the same state dict saved by torch.distributed.checkpoint's
                    HuggingFaceStorageWriter (sharded safetensors and an index)
  dcp.expected.json the model's tensors as PyTorch holds them (full, unsharded)

The demo (demo/, used by scripts/demo.sh):
  state_dict.pth     torch.save(model.state_dict()) of a trained BnNet
  renamed_module.pt  the same network scripted with every attribute named differently
  reference.pt       the trained BnNet itself, scripted: what the copy must reproduce
COMPLETE is written last.
"""
import json
import os
import sys
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


class ConvBn(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BnNet(nn.Module):
    """Nested Sequentials (three levels: features.1.0.conv), BatchNorm1d/2d, and a
    registered buffer of its own that is not a BatchNorm statistic."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvBn(3, 8),
            nn.Sequential(ConvBn(8, 16), nn.MaxPool2d(2)),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10), nn.BatchNorm1d(10))
        self.register_buffer("temperature", torch.tensor([1.0]))

    def forward(self, x):
        return self.head(self.features(x)) / self.temperature


def trained(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = BnNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(5):
        x = torch.randn(16, 3, 8, 8)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.temperature.fill_(1.0 + seed / 10.0)
    return model.eval()


def entries(model: nn.Module) -> list:
    parameters = {name for name, _ in model.named_parameters()}
    return [
        {
            "name": name,
            "role": "parameter" if name in parameters else "buffer",
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
        }
        for name, tensor in model.state_dict().items()
    ]


def write_bn_net(out: str) -> None:
    a, b = trained(1), trained(2)
    torch.manual_seed(100)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        output_a, output_b = a(x), b(x)
    torch.jit.save(torch.jit.script(a), os.path.join(out, "bn_net_a.pt"))
    torch.jit.save(torch.jit.script(b), os.path.join(out, "bn_net_b.pt"))
    torch.jit.save(torch.jit.trace(a, x), os.path.join(out, "bn_net_a_traced.pt"))
    with open(os.path.join(out, "bn_net.entries.json"), "w") as f:
        json.dump(entries(a), f, indent=1)
    save_file(
        {"input": x, "output_a": output_a, "output_b": output_b},
        os.path.join(out, "bn_net.expected.safetensors"),
    )
    torch.save(a.state_dict(), os.path.join(out, "not_a_module.pt"))


def tensor_record(name: str, tensor: torch.Tensor) -> dict:
    # The same description scripts/read_back.py gives of what it reads.
    from read_back import record

    return record(name, tensor)


def all_dtypes() -> dict:
    g = torch.Generator().manual_seed(7)
    floats = torch.randn(3, 5, generator=g) * 100
    return {
        "float64": floats.double(),
        "float32": floats.float(),
        "float16": floats.half(),
        "bfloat16": floats.bfloat16(),
        "int64": torch.randint(-(2**40), 2**40, (4, 2), generator=g),
        "int32": torch.randint(-(2**30), 2**30, (7,), generator=g, dtype=torch.int32),
        "int16": torch.randint(-(2**14), 2**14, (2, 2, 2), generator=g, dtype=torch.int16),
        "int8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "layer.0.weight": floats[:2].clone(),
    }


def write_formats(out: str) -> None:
    from safetensors.torch import save_file

    expected = {}
    tensors = all_dtypes()
    metadata = {"format": "pt", "producer": "make_fixtures.py"}
    save_file(tensors, os.path.join(out, "dtypes.safetensors"), metadata=metadata)
    expected["dtypes.safetensors"] = {
        "metadata": metadata,
        "tensors": [tensor_record(n, t) for n, t in tensors.items()],
    }

    arrays = {n: t.numpy() for n, t in tensors.items() if t.dtype != torch.bfloat16}
    arrays["fortran"] = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.savez(os.path.join(out, "dtypes.npz"), **arrays)
    np.savez_compressed(os.path.join(out, "dtypes_compressed.npz"), **arrays)
    records = [tensor_record(n, torch.from_numpy(a.copy(order="C"))) for n, a in arrays.items()]
    expected["dtypes.npz"] = {"metadata": {}, "tensors": records}
    expected["dtypes_compressed.npz"] = {"metadata": {}, "tensors": records}

    state = {n: t.contiguous() for n, t in trained(1).state_dict().items()}
    names = list(state)
    shards = [names[0::3], names[1::3], names[2::3]]
    folder = os.path.join(out, "sharded")
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in shard}, os.path.join(folder, file))
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    expected["sharded/model.safetensors.index.json"] = {
        "metadata": {"total_size": str(total)},
        "tensors": [tensor_record(n, t) for n, t in state.items()],
    }

    with open(os.path.join(out, "formats.expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def warm_up(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """A few training-mode forward passes so BatchNorm statistics are not defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape))
    return model.eval()


def save_expected(path: str, model: nn.Module, shape) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(123)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = model.eval()(x)
    save_file({"input": x.contiguous(), "output": y.contiguous()}, path)


class Encoder(nn.Module):
    """BnNet with its `features` called `encoder`."""

    def __init__(self):
        super().__init__()
        net = BnNet()
        self.encoder = net.features
        self.head = net.head
        self.register_buffer("temperature", torch.tensor([1.0]))

    def forward(self, x):
        return self.head(self.encoder(x)) / self.temperature


class Unit(nn.Module):
    """torchvision's BasicBlock with other names."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm_a = nn.BatchNorm2d(cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm_b = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.norm_a(self.conv_a(x)))
        y = self.norm_b(self.conv_b(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + skip)


class RenamedResNet18(nn.Module):
    """torchvision's resnet18, same layers in the same order, every name different."""

    def __init__(self):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.stem_norm = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.stages = nn.ModuleList(
            nn.Sequential(Unit(cin, cout, stride), Unit(cout, cout, 1)) for cin, cout, stride in widths
        )
        self.classifier = nn.Linear(512, 1000)

    def forward(self, x):
        x = self.pool(F.relu(self.stem_norm(self.stem_conv(x))))
        for stage in self.stages:
            x = stage(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def write_mapping_cases(out: str) -> None:
    from safetensors.torch import save_file

    def state(model):
        return {k: v.contiguous() for k, v in model.state_dict().items()}

    torch.manual_seed(11)
    mlp_bn = warm_up(nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10)), (8, 32))
    torch.jit.save(torch.jit.script(mlp_bn), os.path.join(out, "mlp_bn.pt"))
    save_expected(os.path.join(out, "mlp_bn.expected.safetensors"), mlp_bn, (4, 32))
    torch.manual_seed(12)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    torch.jit.save(torch.jit.script(mlp), os.path.join(out, "mlp.pt"))

    a = trained(1)
    save_file({f"module.{k}": v for k, v in state(a).items()}, os.path.join(out, "wrapped_module.safetensors"))
    save_file({f"_orig_mod.{k}": v for k, v in state(a).items()}, os.path.join(out, "wrapped_orig_mod.safetensors"))

    backbone = {("backbone." + k[len("features."):] if k.startswith("features.") else k): v for k, v in state(a).items()}
    save_file(backbone, os.path.join(out, "backbone.safetensors"))
    torch.manual_seed(13)
    torch.jit.save(torch.jit.script(Encoder().eval()), os.path.join(out, "encoder.pt"))

    import torchvision

    torch.manual_seed(14)
    resnet = warm_up(torchvision.models.resnet18(weights=None), (2, 3, 64, 64), steps=2)
    torch.jit.save(torch.jit.script(resnet), os.path.join(out, "resnet18.pt"))
    save_file(state(resnet), os.path.join(out, "resnet18.safetensors"))
    save_expected(os.path.join(out, "resnet18.expected.safetensors"), resnet, (2, 3, 64, 64))
    torch.manual_seed(15)
    renamed = RenamedResNet18().eval()
    assert [v.shape for v in renamed.state_dict().values()] == [v.shape for v in resnet.state_dict().values()]
    torch.jit.save(torch.jit.script(renamed), os.path.join(out, "renamed_resnet18.pt"))


def seq_blocks(widths):
    layers, c = [], 3
    for w in widths:
        layers.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()))
        c = w
    return layers, c


SEQ_WIDTHS = [8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16]


def seq_net() -> nn.Module:
    """A network built from Sequentials only: 12 conv-bn blocks (indices past 10,
    which sort as text before 2), a classifier."""
    layers, c = seq_blocks(SEQ_WIDTHS)
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class SeqBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


class RenamedSeqNet(nn.Module):
    """seq_net's layers in the same order, with attribute names."""

    def __init__(self):
        super().__init__()
        blocks, c = [], 3
        for w in SEQ_WIDTHS:
            blocks.append(SeqBlock(c, w))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(c, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NamedNet(nn.Module):
    """Attribute-named children registered out of alphabetical order: two alike."""

    def __init__(self):
        super().__init__()
        self.z_proj = nn.Linear(16, 16)
        self.a_proj = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.norm(self.a_proj(F.relu(self.z_proj(x)))))


class RenamedNamedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.bn(self.second(F.relu(self.first(x)))))


def write_order_cases(out: str) -> None:
    """Sources that keep no registration order (safetensors) for the order matcher."""
    from safetensors.torch import save_file

    def state(model):
        return {k: v.contiguous() for k, v in model.state_dict().items()}

    torch.manual_seed(21)
    seq = warm_up(seq_net(), (4, 3, 8, 8))
    save_file(state(seq), os.path.join(out, "seq_net.safetensors"))
    save_expected(os.path.join(out, "seq_net.expected.safetensors"), seq, (2, 3, 8, 8))
    torch.manual_seed(22)
    torch.jit.save(torch.jit.script(RenamedSeqNet().eval()), os.path.join(out, "renamed_seq_net.pt"))

    torch.manual_seed(23)
    named = warm_up(NamedNet(), (8, 16))
    save_file(state(named), os.path.join(out, "named_net.safetensors"))
    save_expected(os.path.join(out, "named_net.expected.safetensors"), named, (4, 16))
    torch.jit.save(torch.jit.script(named), os.path.join(out, "named_net.pt"))
    torch.manual_seed(24)
    torch.jit.save(torch.jit.script(RenamedNamedNet().eval()), os.path.join(out, "renamed_named_net.pt"))


class Malicious:
    """Pickles as a call to os.system; loading it must never run the command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_torch_save(out: str) -> None:
    import torchvision

    folder = os.path.join(out, "torch_save")
    os.makedirs(folder, exist_ok=True)
    expected = {}

    def save(name, obj, state, key=None, **kwargs):
        torch.save(obj, os.path.join(folder, name), **kwargs)
        expected[name] = {"key": key, "tensors": [tensor_record(k, v) for k, v in state.items()]}

    torch.manual_seed(21)
    resnet = warm_up(torchvision.models.resnet18(weights=None), (2, 3, 64, 64), steps=1)
    sd = resnet.state_dict()
    save("resnet18.pth", sd, sd)
    expected["resnet18.pth"]["metadata"] = {k: dict(v) for k, v in sd._metadata.items()}
    torch.manual_seed(22)
    mobilenet = warm_up(torchvision.models.mobilenet_v2(weights=None), (2, 3, 64, 64), steps=1)
    save("mobilenet_v2.pth", mobilenet.state_dict(), mobilenet.state_dict())

    model = trained(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    model.eval()
    sd = model.state_dict()
    checkpoint = {"epoch": 3, "state_dict": sd, "optimizer": optimizer.state_dict(), "best_acc": 0.91, "arch": "bn_net"}
    save("training.pth", checkpoint, sd, key="state_dict")
    ema = trained(2).state_dict()
    save("two_models.pth", {"model": sd, "model_ema": ema, "epoch": 7}, ema, key="model_ema")
    save("nested.pth", {"checkpoint": {"model": {"state_dict": sd}}, "step": 10}, sd, key="checkpoint.model.state_dict")
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    save("dataparallel.pth", wrapped, wrapped)

    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 4, generator=g)
    dtypes = {
        "half": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "i8": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "i32": torch.randint(-1000, 1000, (3, 2), generator=g, dtype=torch.int32),
        "i64": torch.tensor([2**40, -3, 7]),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
    }
    save("dtypes.pth", dtypes, dtypes)
    shared = torch.randn(4, 4, generator=g)
    views = {
        "transposed": base.t(),
        "strided": base[1:, ::2],
        "tied_a": shared,
        "tied_b": shared,
        "tied_row": shared[2],
    }
    save("views.pth", views, views)
    parameter = nn.Parameter(torch.randn(3, 4, generator=g))
    save("parameter.pth", parameter, {"parameter": parameter.detach()})
    torch.save(sd, os.path.join(folder, "legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save({"weights": torch.ones(2), "payload": Malicious(os.path.join(folder, "PWNED"))}, os.path.join(folder, "malicious.pth"))
    torch.save(views, os.path.join(folder, "legacy_views.pth"), _use_new_zipfile_serialization=False)
    expected["legacy.pth"] = {"key": None, "tensors": [tensor_record(k, v) for k, v in sd.items()]}
    expected["legacy_views.pth"] = {"key": None, "tensors": [tensor_record(k, v) for k, v in views.items()]}
    write_research_checkpoints(folder, save, sd, ema, optimizer)
    with open(os.path.join(out, "torch_save.expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


class TouchOnLoad:
    """Pickles as a call of its own class with a path, which unpickling in
    Python would call (creating the file); a reader that keeps classes inert
    creates nothing."""

    def __init__(self, marker: str):
        open(marker, "w").close()
        self.marker = marker

    def __reduce__(self):
        return (TouchOnLoad, (self.marker,))


class WithNonPersistent(nn.Module):
    """Nested modules, a persistent and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.ModuleDict({"fc": nn.Linear(4, 2)})
        self.register_buffer("scale", torch.tensor([0.5]))
        self.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.head["fc"](self.body(x).mean((2, 3))) * self.scale


def write_research_checkpoints(folder, save, sd, ema, optimizer) -> None:
    """Checkpoints as people have them: Python objects, numpy, pickled modules, shards."""
    import argparse

    research = {
        "epoch": 12,
        "args": argparse.Namespace(lr=0.1, arch="bn_net", layers=[1, 2]),
        "metric": np.float64(0.93),
        "step": np.int64(1000),
        "state_dict": sd,
        "optimizer": optimizer.state_dict(),
        "state_dict_ema": ema,
        "history": np.arange(4, dtype=np.float32),
    }
    save("research.pth", research, ema, key="state_dict_ema")
    torch.manual_seed(31)
    module = warm_up(WithNonPersistent(), (2, 3, 6, 6))
    save("pickled_module.pth", module, module.state_dict())
    wrapped = nn.DataParallel(module)
    save("pickled_dataparallel.pth", wrapped, wrapped.state_dict())
    g = torch.Generator().manual_seed(9)
    int_keys = {0: torch.randn(2, generator=g), 1: torch.randn(3, generator=g), 7: torch.arange(4)}
    save("int_keys.pth", int_keys, {str(k): v for k, v in int_keys.items()})
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "ids": np.array([3, 1, 2], dtype=np.int64),
        "mask": np.array([True, False]),
    }
    save("numpy_arrays.pth", arrays, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    torch.save({"x": np.array([1, "a"], dtype=object)}, os.path.join(folder, "object_array.pth"))
    marker = os.path.join(folder, "TOUCHED")
    save("inert_payload.pth", {"weights": sd, "hook": TouchOnLoad(marker)}, sd, key="weights")
    os.remove(marker)
    shards = os.path.join(folder, "sharded_bin")
    os.makedirs(shards, exist_ok=True)
    names = list(sd.keys())
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate([names[:half], names[half:]]):
        shard = f"pytorch_model-{k + 1:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, os.path.join(shards, shard))
        weight_map.update({n: shard for n in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(shards, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


class RenamedBnNet(nn.Module):
    """BnNet's layers in BnNet's order, every attribute named differently."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0]))
        self.trunk = nn.ModuleList([ConvBn(3, 8), nn.Sequential(ConvBn(8, 16), nn.MaxPool2d(2))])
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 10)
        self.norm = nn.BatchNorm1d(10)

    def forward(self, x):
        for layer in self.trunk:
            x = layer(x)
        return self.norm(self.fc(self.flatten(x))) / self.scale


class Stage(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x):
        return F.relu(self.norm(self.linear(x)))


class NestedNet(nn.Module):
    """ModuleDict of ModuleLists of Sequentials: names like blocks.encoder.1.0.norm.weight."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict(
            {
                "encoder": nn.ModuleList([nn.Sequential(Stage(12), Stage(12)), nn.Sequential(Stage(12))]),
                "decoder": nn.ModuleList([nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6))]),
            }
        )

    def forward(self, x):
        for stage in self.blocks["encoder"]:
            x = stage(x)
        for stage in self.blocks["decoder"]:
            x = stage(x)
        return x


def write_examples(out: str) -> None:
    for name, seed in (("nested_a.pt", 41), ("nested_b.pt", 42)):
        torch.manual_seed(seed)
        model = warm_up(NestedNet(), (16, 12))
        torch.jit.save(torch.jit.script(model), os.path.join(out, name))
        if name == "nested_a.pt":
            save_expected(os.path.join(out, "nested.expected.safetensors"), model, (5, 12))
    torch.manual_seed(43)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    torch.jit.save(torch.jit.script(mlp), os.path.join(out, "small_mlp.pt"))


def write_demo(out: str) -> None:
    folder = os.path.join(out, "demo")
    os.makedirs(folder, exist_ok=True)
    model = trained(3)
    torch.save(model.state_dict(), os.path.join(folder, "state_dict.pth"))
    torch.jit.save(torch.jit.script(model), os.path.join(folder, "reference.pt"))
    torch.manual_seed(30)
    torch.jit.save(torch.jit.script(RenamedBnNet().eval()), os.path.join(folder, "renamed_module.pt"))


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight, as language models tie them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def write_tied(out: str) -> None:
    """tied_lm.pt (TorchScript, tied), and two sources for it: one whose two
    weights differ (an untied model) and one whose two weights are equal."""
    torch.manual_seed(40)
    torch.jit.save(torch.jit.script(TiedLM().eval()), os.path.join(out, "tied_lm.pt"))
    weight = torch.randn(10, 4)
    save_file({"embed.weight": weight, "head.weight": weight + 1.0}, os.path.join(out, "tied_untied.safetensors"))
    save_file({"embed.weight": weight, "head.weight": weight.clone()}, os.path.join(out, "tied_equal.safetensors"))
    # What `safetensors.torch.save_model` writes for a tied model: one name of the tie.
    from safetensors.torch import save_model

    torch.manual_seed(41)
    other = TiedLM().eval()
    save_model(other, os.path.join(out, "tied_one.safetensors"))
    ids = torch.tensor([[0, 3, 9, 4]])
    with torch.no_grad():
        save_file({"input": ids, "output": other(ids)}, os.path.join(out, "tied_one_expected.safetensors"))


@torch.jit.script
class Trap:
    """A TorchScript class whose `__setstate__` (run by `torch.jit.load`)
    creates the file named in its state: a file that runs code when loaded."""

    def __init__(self, path: str):
        self.path = path

    def __getstate__(self) -> str:
        return self.path

    def __setstate__(self, path: str) -> None:
        t = torch.from_file(path, True, 8, dtype=torch.uint8)
        t.fill_(1)
        self.path = path + str(int(t.sum()))


@torch.jit.script
class Harmless:
    """The same shape of class, with a `__setstate__` that does nothing: the
    fixture edits its code in the archive afterwards."""

    def __init__(self, path: str):
        self.path = path

    def __getstate__(self) -> str:
        return self.path

    def __setstate__(self, path: str) -> None:
        self.path = path


class Trapped(nn.Module):
    trap: Trap

    def __init__(self, marker: str):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0))
        self.trap = Trap(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class Edited(nn.Module):
    note: Harmless

    def __init__(self, marker: str):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0))
        self.note = Harmless(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class Restoring(nn.Module):
    """A module that keeps its own state through `__getstate__`/`__setstate__`
    (as quantized modules do), the latter creating the marker file."""

    def __init__(self, marker: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.training = state[2]
        t = torch.from_file(state[1], True, 8, dtype=torch.uint8)
        t.fill_(1)
        self.marker = state[1] + str(int(t.sum()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class HoldsRestoring(nn.Module):
    def __init__(self, marker: str):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.inner = Restoring(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x))


def write_hostile_archives(out: str) -> None:
    """hostile/: TorchScript files that create a file (hostile/NAME.marker,
    absolute path in the file) when `torch.jit.load` runs their code:
    trapped.pt (a class's `__setstate__`), edited.pt (a harmless one whose
    code/ was edited afterwards to do it), self_restoring.pt (a submodule
    keeping its own state); and source.safetensors, values for the first two."""
    folder = os.path.abspath(os.path.join(out, "hostile"))
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(50)
    marker = lambda name: os.path.join(folder, f"{name}.marker")
    torch.jit.save(torch.jit.script(Trapped(marker("trapped"))), os.path.join(folder, "trapped.pt"))
    torch.jit.save(torch.jit.script(HoldsRestoring(marker("self_restoring"))), os.path.join(folder, "self_restoring.pt"))
    plain = os.path.join(folder, "edited.plain.pt")
    torch.jit.save(torch.jit.script(Edited(marker("edited"))), plain)
    # Edit the class's code in the archive: the same file, but its
    # `__setstate__` now creates the marker. Its debug information goes (it
    # would not match the edited code).
    import zipfile

    harmless = "    self.path = path\n    return None\n"
    hostile = (
        "    t = torch.from_file(path, True, 8, dtype=0)\n    _0 = torch.fill_(t, 1)\n"
        "    self.path = torch.add(path, str(int(torch.sum(t))))\n    return None\n"
    )
    edited = []
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(os.path.join(folder, "edited.pt"), "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py") and b"class Harmless" in data:
                head, sep, tail = data.decode().partition("def __setstate__")
                assert sep and harmless in tail, tail
                data = (head + sep + tail.replace(harmless, hostile, 1)).encode()
                edited.append(info.filename)
            elif info.filename.endswith(".debug_pkl") and info.filename[: -len(".debug_pkl")] in edited:
                continue
            dst.writestr(info, data)
    assert edited, "no code file defines Harmless"
    os.remove(plain)
    save_file(
        {"lin.weight": torch.randn(2, 3), "lin.bias": torch.randn(2), "scale": torch.full((2,), 3.0)},
        os.path.join(folder, "source.safetensors"),
    )


class SharedStorage(nn.Module):
    """Two buffers that are views of one storage (one record in the archive)."""

    def __init__(self):
        super().__init__()
        base = torch.randn(2, 6)
        self.register_buffer("a", base[0])
        self.register_buffer("b", base[1])
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.a - self.b


class PlainAttribute(nn.Module):
    """A float tensor kept as a plain attribute (neither parameter nor buffer):
    `module.to(dtype)` leaves it as it is."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((2,), 2.0))
        self.offset = torch.arange(2.0)
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale + self.offset


def write_shared_storage(out: str) -> None:
    torch.manual_seed(60)
    torch.jit.save(torch.jit.script(SharedStorage().eval()), os.path.join(out, "shared_storage.pt"))
    torch.jit.save(torch.jit.script(PlainAttribute().eval()), os.path.join(out, "plain_attribute.pt"))


def jiggle(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Every parameter moved off its initial value, so that each one shows in outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def write_rule_library(out: str) -> None:
    """A torchvision model and timm's model of the same family, for each rules file."""
    import timm
    import torchvision
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.vision_transformer import VisionTransformer

    folder = os.path.join(out, "rules")
    os.makedirs(folder, exist_ok=True)

    def tv_vgg():
        from torchvision.models.vgg import VGG, make_layers

        model = VGG(make_layers([8, "M", 16, "M", 32, "M", 64, "M", 512, "M"]), num_classes=10)
        # timm's VGG head is 4096 wide; a narrow first layer keeps the fixture small.
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 4096), nn.ReLU(True),
            nn.Dropout(), nn.Linear(4096, 10),
        )
        return model

    families = {
        "convnext": (
            lambda: ConvNeXt(
                [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)],
                num_classes=10,
            ),
            lambda: timm.models.convnext.ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 32, 64), num_classes=10),
            (2, 3, 32, 32),
        ),
        "vgg": (
            tv_vgg,
            lambda: timm.models.vgg.VGG([8, "M", 16, "M", 32, "M", 64, "M", 512, "M"], num_classes=10, mlp_ratio=64 / 4096),
            (2, 3, 64, 64),
        ),
        "efficientnet": (
            lambda: torchvision.models.efficientnet_b0(num_classes=10),
            lambda: timm.create_model("efficientnet_b0", num_classes=10),
            (2, 3, 64, 64),
        ),
        "mobilenet_v3_small": (
            lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
            # torchvision's MobileNetV3 BatchNorm has eps 1e-3; timm's builder takes it as bn_eps.
            lambda: timm.create_model("mobilenetv3_small_100", num_classes=10, bn_eps=1e-3),
            (2, 3, 64, 64),
        ),
        "vit": (
            lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
            lambda: timm.models.vision_transformer.VisionTransformer(
                img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10
            ),
            (2, 3, 32, 32),
        ),
    }
    for seed, (name, (make_tv, make_timm, shape)) in enumerate(families.items()):
        torch.manual_seed(100 + seed)
        tv = warm_up(jiggle(make_tv(), 200 + seed), (4,) + shape[1:])
        save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, os.path.join(folder, f"{name}_torchvision.safetensors"))
        save_expected(os.path.join(folder, f"{name}.expected.safetensors"), tv, shape)
        torch.manual_seed(300 + seed)
        tm = make_timm().eval()
        with torch.no_grad():
            traced = torch.jit.trace(tm, torch.randn(*shape), check_trace=False)
        torch.jit.save(traced, os.path.join(folder, f"{name}_timm.pt"))


class FusedAttention(nn.Module):
    """Self-attention with one qkv projection, as timm's and GPT-2's blocks have it."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads))


class SplitAttention(nn.Module):
    """The same block with separate q, k and v projections, as Llama's is written."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / float(d // heads) ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, d)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out]."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(x.shape[:-1] + (self.bias.shape[0],))


class Conv1DMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(24, 8)
        self.c_proj = Conv1D(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class LinearMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 24)
        self.proj = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def write_transform_cases(out: str) -> None:
    folder = os.path.join(out, "transforms")
    os.makedirs(folder, exist_ok=True)
    for seed, (name, make) in enumerate(
        [("fused_attn", FusedAttention), ("split_attn", SplitAttention), ("conv1d_mlp", Conv1DMlp), ("linear_mlp", LinearMlp)]
    ):
        torch.manual_seed(500 + seed)
        model = jiggle(make(), 600 + seed, 0.2).eval()
        torch.jit.save(torch.jit.script(model), os.path.join(folder, f"{name}.pt"))
        save_expected(os.path.join(folder, f"{name}.expected.safetensors"), model, (2, 5, 8))


def _save_dcp_rank(rank: int, world: int, state_path: str, out: str, port: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = torch.load(state_path, weights_only=True)
    model = {}
    for k, v in full.items():
        if v.dim() >= 1 and v.shape[0] % world == 0:
            model[k] = distribute_tensor(v, mesh, [Shard(0)])
        elif v.dim() >= 1:
            model[k] = distribute_tensor(v, mesh, [Replicate()])
        else:
            model[k] = v
    optim = {f"state.{k}.exp_avg": torch.zeros_like(v) for k, v in list(full.items())[:2]}
    dcp.save({"model": model, "optim": optim, "step": 5}, checkpoint_id=out)
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dcp(out: str) -> None:
    """bn_net_a's state dict as a Distributed Checkpoint written by two ranks."""
    import torch.multiprocessing as mp

    folder = os.path.join(out, "dcp")
    os.makedirs(folder, exist_ok=True)
    state = torch.jit.load(os.path.join(out, "bn_net_a.pt")).state_dict()
    state_path = os.path.join(folder, "state.pth")
    torch.save(dict(state), state_path)
    mp.spawn(_save_dcp_rank, args=(2, state_path, os.path.join(folder, "two_ranks"), free_port()), nprocs=2)
    os.remove(state_path)
    # The safetensors layout (HuggingFaceStorageWriter), from one process.
    import torch.distributed.checkpoint as dcp

    dcp.save(dict(state), storage_writer=dcp.HuggingFaceStorageWriter(path=os.path.join(folder, "hf")))
    with open(os.path.join(folder, "dcp.expected.json"), "w") as f:
        json.dump({"tensors": [tensor_record(k, v) for k, v in state.items()]}, f, indent=1)


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "fixtures")
    os.makedirs(out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    write_bn_net(out)
    write_formats(out)
    write_mapping_cases(out)
    write_order_cases(out)
    write_torch_save(out)
    write_examples(out)
    write_demo(out)
    write_tied(out)
    write_hostile_archives(out)
    write_shared_storage(out)
    write_rule_library(out)
    write_transform_cases(out)
    write_dcp(out)
    # Written last: the tests take its presence to mean every fixture is there.
    open(os.path.join(out, "COMPLETE"), "w").close()
    print(f"fixtures written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
