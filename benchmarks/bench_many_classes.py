"""Many classes: a fixed head over 100-1,000 classes fed by structured hidden layers.

Models (``--models``), trained here on noisy class prototypes (x = prototype[y] + noise * N(0, 1),
32 inputs; 4,000 held-out rows), generated from a fixed seed, nothing downloaded:

* ``mlp``: 32-768-3072-257-C (three hidden Linears, then the C-class head); compressed with the
  default options and with ``--exclude fc3`` (the layer that feeds the head kept dense);
* ``vit``: the 32 inputs as 4 tokens of 8, a 64-wide pre-norm transformer block (qkv, proj, fc1,
  fc2), LayerNorm, mean over tokens, the head: fed by the residual stream, no single feeder;
* ``conv``: the 32 inputs as a 4 x 8 image, two conv-BatchNorm-ReLU layers, pooled to 64 features,
  the head: fed through convolutions, no feeder (a ResNet-18 on ImageNet has this shape: 1,000
  classes on 512 features).

``vit`` and ``conv`` are compressed with the default options and with ``--head keep``. ``--hidden``
picks the hidden kind of every run. Default budget; held-out accuracy before and after, and what
the plan kept dense.

Run: python benchmarks/bench_many_classes.py [--models mlp vit conv] [--classes 300 1000]
[--noise 0.6 0.3] [--rows-per-class 40] [--hidden acdc|fastfood]
(``--noise`` pairs with ``--classes``; about 2-3 minutes per class count on 2 cores for ``mlp``, 1 for the others.)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import setup
from compressor import CompressOptions, PlanOptions, SourceOptions, compress
from compressor.errors import FixclfError

HELD_OUT = 4000
TEACHER_STEPS = 1500


class PrototypeMLP(nn.Module):
    """32 -> 768 -> 3072 -> 257 -> classes, ReLU between."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 768), nn.Linear(768, 3072), nn.Linear(3072, 257)
        self.head = nn.Linear(257, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


class PrototypeViT(nn.Module):
    """(batch, 32) -> 4 tokens of 8 -> embed to 64, position, one pre-norm block, norm, mean, head."""

    def __init__(self, classes: int = 1000, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.pos = nn.Linear(8, dim), nn.Parameter(torch.randn(4, dim) * 0.02)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(-1, 4, 8)) + self.pos
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x).mean(1))


class PrototypeConv(nn.Module):
    """(batch, 32) -> a 1 x 4 x 8 image -> conv-BN-ReLU (32), conv-BN-ReLU (16), pooled to 2 x 2 (64 features), head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.reshape(-1, 1, 4, 8)))


MODELS = {"mlp": (PrototypeMLP, ("--exclude fc3", {"exclude": ["fc3"]})),
          "vit": (PrototypeViT, ("--head keep", {"head": "keep"})),
          "conv": (PrototypeConv, ("--head keep", {"head": "keep"}))}
"""name -> (model class, (label, PlanOptions fields) of the run besides the default)."""


def prototype_data(classes: int, rows: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    prototypes = generator.normal(size=(classes, 32)).astype(np.float32)
    y = generator.integers(0, classes, rows)
    x = prototypes[y] + noise * generator.normal(size=(rows, 32)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def train_original(arch: type[nn.Module], classes: int, rows_per_class: int, noise: float,
                   directory: Path) -> tuple[Path, Path]:
    """The original model (Adam, batch 64) and its data file; returns (weights, data)."""
    torch.manual_seed(0)
    model = arch(classes)
    x, y = prototype_data(classes, classes * rows_per_class + HELD_OUT, noise)
    train_x, train_y = torch.from_numpy(x[:-HELD_OUT]), torch.from_numpy(y[:-HELD_OUT])
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(TEACHER_STEPS):
        rows = torch.randint(0, len(train_x), (64,))
        loss = F.cross_entropy(model(train_x[rows]), train_y[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    weights, data = directory / f"{arch.__name__}{classes}.pt", directory / f"c{classes}.npz"
    torch.save(model.state_dict(), weights)
    np.savez(data, x=x[:-HELD_OUT], y=y[:-HELD_OUT], x_val=x[-HELD_OUT:], y_val=y[-HELD_OUT:])
    return weights, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp"])
    parser.add_argument("--classes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.6, 0.3])
    parser.add_argument("--rows-per-class", type=int, default=40)
    parser.add_argument("--hidden", choices=("acdc", "fastfood"), default="acdc")
    args = parser.parse_args()
    if len(args.noise) != len(args.classes):
        parser.error("give one --noise per --classes")
    setup()
    print("| model | classes | noise | options | held-out: original → compressed | replaced layers' numbers | kept dense |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (classes, noise) in ((m, pair) for m in args.models for pair in zip(args.classes, args.noise)):
            arch, (label, other) = MODELS[name]
            weights, data = train_original(arch, classes, args.rows_per_class, noise, Path(tmp))
            for options, plan in ((f"--hidden {args.hidden}", {}), (f"--hidden {args.hidden} {label}", other)):
                try:
                    report = compress(CompressOptions(
                        SourceOptions(weights, arch=arch, arch_kwargs={"classes": classes}, data=data),
                        PlanOptions(hidden=args.hidden, **plan), output=Path(tmp) / "run.fixclf.pt", force=True))
                except FixclfError as refused:
                    print(f"| {name} | {classes} | {noise} | {options} | refused: {refused} | | |", flush=True)
                    continue
                acc, params = report.accuracy, report.params.replaced
                kept = ", ".join(layer.name for layer in report.layers if not layer.kind) or "none"
                print(f"| {name} | {classes} | {noise} | {options} | {100 * acc.before:.2f}% → {100 * acc.after:.2f}% "
                      f"({100 * (acc.after - acc.before):+.2f} pp) | {params.before:,} → {params.after:,} | {kept} |",
                      flush=True)


if __name__ == "__main__":
    main()
