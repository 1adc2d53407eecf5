"""What `fixclf plan` measures before any work, on transformer-shaped models: each replaced layer alone in
ONNX Runtime, dense vs structured, at the model's real shapes (batch 1 on 1 thread, batch 8 on 2).

Run: python benchmarks/bench_plan_cost.py
Models: a ViT-style block at 192 features on 197 tokens (ViT-Tiny's width) and an MLP-Mixer layer,
both from tests/architectures.py, random weights; `--objective latency` shows what it keeps dense.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import setup
from compressor import CompressOptions, ExportOptions, PlanOptions, SourceOptions, plan_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from architectures import MixerStyle, ViTStyle  # noqa: E402

MODELS = {
    "vit-192 (197 tokens)": (lambda: ViTStyle(tokens=197, patch=48, dim=192, heads=3), (197, 48)),
    "mixer-192 (196 tokens)": (lambda: MixerStyle(tokens=196, patch=48, dim=192), (196, 48)),
}


def main() -> None:
    setup()
    print("| model | objective | layer | Linear | ms batch 1: dense → structured | ms batch 8: dense → structured | kept |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, shape) in MODELS.items():
            model = build()
            torch.save(model.state_dict(), Path(tmp) / "m.pt")
            np.savez(Path(tmp) / "x.npz", x=np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32))
            for objective in ("size", "latency"):
                result = plan_checkpoint(CompressOptions(
                    SourceOptions(Path(tmp) / "m.pt", arch=lambda build=build: build(), data=str(Path(tmp) / "x.npz")),
                    PlanOptions(objective=objective), export=ExportOptions(latency_batch=8)))
                for row in result.layers:
                    c = row.cost
                    print(f"| {name} | {objective} | {row.name} | {row.in_features}->{row.out_features} | "
                          f"{c.dense_batch1_ms:.3f} → {c.structured_batch1_ms:.3f} | "
                          f"{c.dense_batch_ms:.3f} → {c.structured_batch_ms:.3f} | {'yes' if row.kind is None else ''} |",
                          flush=True)


if __name__ == "__main__":
    main()
