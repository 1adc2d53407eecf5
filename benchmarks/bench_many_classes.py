"""Many classes: a fixed head over 100-1,000 classes fed by structured hidden layers.

The model is an MLP 32-768-3072-257-C (three hidden Linears, then the C-class head), trained here
on noisy class prototypes (x = prototype[y] + noise * N(0, 1), 32 inputs; 4,000 held-out rows),
generated from a fixed seed, nothing downloaded. Each original is then compressed with the
default options (every Linear replaced, Hadamard head) and with ``--exclude fc3`` (the layer that
feeds the head kept dense), default budget; held-out accuracy before and after.

Run: python benchmarks/bench_many_classes.py [--classes 300 1000] [--rows-per-class 40] [--noise 0.3 0.6]
(``--noise`` pairs with ``--classes``; about 2-3 minutes per class count on 2 cores.)
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


def prototype_data(classes: int, rows: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    prototypes = generator.normal(size=(classes, 32)).astype(np.float32)
    y = generator.integers(0, classes, rows)
    x = prototypes[y] + noise * generator.normal(size=(rows, 32)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def train_original(classes: int, rows_per_class: int, noise: float, directory: Path) -> tuple[Path, Path]:
    """The original model (Adam, batch 64) and its data file; returns (weights, data)."""
    torch.manual_seed(0)
    model = PrototypeMLP(classes)
    x, y = prototype_data(classes, classes * rows_per_class + HELD_OUT, noise)
    train_x, train_y = torch.from_numpy(x[:-HELD_OUT]), torch.from_numpy(y[:-HELD_OUT])
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(TEACHER_STEPS):
        rows = torch.randint(0, len(train_x), (64,))
        loss = F.cross_entropy(model(train_x[rows]), train_y[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    weights, data = directory / f"c{classes}.pt", directory / f"c{classes}.npz"
    torch.save(model.state_dict(), weights)
    np.savez(data, x=x[:-HELD_OUT], y=y[:-HELD_OUT], x_val=x[-HELD_OUT:], y_val=y[-HELD_OUT:])
    return weights, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.6, 0.3])
    parser.add_argument("--rows-per-class", type=int, default=40)
    args = parser.parse_args()
    if len(args.noise) != len(args.classes):
        parser.error("give one --noise per --classes")
    setup()
    print("| classes | noise | options | held-out: original → compressed | replaced layers' numbers |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for classes, noise in zip(args.classes, args.noise):
            weights, data = train_original(classes, args.rows_per_class, noise, Path(tmp))
            for label, exclude in (("default", []), ("--exclude fc3", ["fc3"])):
                report = compress(CompressOptions(
                    SourceOptions(weights, arch=PrototypeMLP, arch_kwargs={"classes": classes}, data=data),
                    PlanOptions(exclude=exclude), output=Path(tmp) / "run.fixclf.pt", force=True))
                acc, params = report.accuracy, report.params.replaced
                print(f"| {classes} | {noise} | {label} | {100 * acc.before:.2f}% → {100 * acc.after:.2f}% "
                      f"({100 * (acc.after - acc.before):+.2f} pp) | {params.before:,} → {params.after:,} |", flush=True)


if __name__ == "__main__":
    main()
