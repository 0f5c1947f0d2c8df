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
and not_a_module.pt (a torch.save state dict, which is not a TorchScript module),
and COMPLETE, written last.
"""
import json
import os
import sys

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


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("target", "fixtures")
    os.makedirs(out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    write_bn_net(out)
    # Written last: the tests take its presence to mean every fixture is there.
    open(os.path.join(out, "COMPLETE"), "w").close()
    print(f"fixtures written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
