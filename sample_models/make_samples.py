"""Regenerate the bundled samples: digits.npz, mlp.pt, cnn.pt (run: python sample_models/make_samples.py).

Build-time only: needs scikit-learn for its bundled copy of the UCI optical digits (8 x 8 images,
1797 samples, no download). fixclf itself never imports scikit-learn: it reads digits.npz.
Deterministic: fixed seeds, single-threaded training; the printed accuracies go into the README.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from compressor.checkpoint import MODEL_FORMAT, save_checkpoint  # noqa: E402
from compressor.finetune import evaluate  # noqa: E402
from compressor.zoo import mlp, small_cnn  # noqa: E402

SEED = 0
HELD_OUT = 0.2
SAMPLES = {
    "mlp": ("compressor.zoo:mlp", {"in_features": 64, "hidden": [512, 512], "num_classes": 10}, mlp),
    "cnn": ("compressor.zoo:small_cnn", {"channels": 32, "hidden": 512, "num_classes": 10}, small_cnn),
}


def make_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    n_val = int(round(HELD_OUT * len(x)))
    val, train = order[:n_val], order[n_val:]
    return {"x": x[train], "y": y[train], "x_val": x[val], "y_val": y[val]}


def train(model: torch.nn.Module, data: dict[str, np.ndarray], epochs: int = 60) -> float:
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    generator = torch.Generator().manual_seed(SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
    model.eval()
    return evaluate(model, torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"]))


def main() -> None:
    torch.set_num_threads(1)
    data = make_digits()
    np.savez_compressed(HERE / "digits.npz", **data)
    for name, (arch, kwargs, factory) in SAMPLES.items():
        torch.manual_seed(SEED)
        model = factory(**kwargs)
        accuracy = train(model, data)
        save_checkpoint(HERE / f"{name}.pt", {
            "format": MODEL_FORMAT, "arch": arch, "kwargs": kwargs,
            "state_dict": model.state_dict(), "data": "digits.npz",
        })
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params} parameters, held-out accuracy {accuracy:.4f} ({len(data['x_val'])} samples)")


if __name__ == "__main__":
    main()
