"""The README's claims that are not benchmarks: its library example runs as stated, the op list it
gives for mobile runtimes covers every op fixclf's layers export to, and every public name the
library declares exists."""
from __future__ import annotations

import importlib
import re

import onnx
import torch
from torch import nn

from compressor.export import export_onnx
from compressor.layers import ACDCStack, AdaptiveFastfood, HadamardHead, OrthogonalHead
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_library_example_runs_with_the_stated_parameter_count():
    code = re.search(r"```python\n(.*?)```", _section("The layers on their own"), re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    model = scope["model"]
    assert scope["logits"].shape == (32, 10)
    stated_trained, stated_dense = (int(n.replace(",", "")) for n in re.search(r"([\d,]+) trained numbers, dense ([\d,]+)", code).groups())
    assert sum(p.numel() for p in model.parameters()) == stated_trained
    assert 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10 == stated_dense
    x = torch.randn(4, 784)
    first = model[0].layers[0]
    padded = torch.nn.functional.pad(x, (0, first.size - 784))
    assert torch.allclose(scope["dense"](padded), first(padded), atol=1e-4)


def test_mobile_op_list_covers_the_exported_layers(tmp_path):
    stated = set(re.search(r"fixclf's layers use: ([^)]*)\)", " ".join(_section("ONNX export").split())).group(1).replace(" ", "").split(","))
    model = nn.Sequential(ACDCStack(100, 64, 2), nn.ReLU(), AdaptiveFastfood(64, 200), nn.ReLU(), HadamardHead(200, 300))
    used = set()
    # a wide ACDC stack too: its DCT blocks are computed from patterns in the file, not folded by the exporter
    for i, module in enumerate([model, OrthogonalHead(64, 10), ACDCStack(2048, 1000, 2)]):
        export_onnx(module, torch.randn(4, model[0].in_features if i == 0 else module.in_features), tmp_path / f"{i}.onnx")
        used |= {node.op_type for node in onnx.load(tmp_path / f"{i}.onnx").graph.node}
    assert used <= stated, used - stated


def test_every_name_in_a_modules_all_exists():
    """``from compressor.<module> import *`` works for every module (a renamed function left behind in
    ``__all__`` breaks it)."""
    modules = ["compressor", *(f"compressor.{p.stem}" for p in (ROOT / "compressor").glob("*.py") if p.stem != "__init__"),
               "compressor.layers", *(f"compressor.layers.{p.stem}" for p in (ROOT / "compressor" / "layers").glob("*.py")
                                      if p.stem != "__init__")]
    missing = [(name, symbol) for name in modules for symbol in getattr(importlib.import_module(name), "__all__", [])
               if not hasattr(importlib.import_module(name), symbol)]
    assert missing == []
