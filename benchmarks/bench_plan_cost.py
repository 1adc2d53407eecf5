"""What `fixclf plan` measures before any work, on transformer-shaped models: each replaced layer alone in
ONNX Runtime, dense vs structured, at the model's real shapes (batch 1 on 1 thread, batch 8 on 2).

Run: python benchmarks/bench_plan_cost.py
Models: a ViT-style block at 192 features on 197 tokens (ViT-Tiny's width) and an MLP-Mixer layer,
both from tests/architectures.py, random weights; `--objective latency` shows what it keeps dense.
Then the whole model: `fixclf compress --objective size|latency --epochs 1` (distilled on the
unlabelled inputs) and the exported files' ORT latency, original against compressed, at batch 1 on
1 thread (as ONNX Runtime Mobile runs) and at batch 8 on 2 threads, from the report.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import setup
from compressor import (CompressOptions, ExportOptions, FinetuneOptions, PlanOptions, SourceOptions, compress,
                        plan_checkpoint)
from compressor.errors import PlanError

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
        print()
        whole_models(tmp)


def whole_models(tmp: str) -> None:
    print("| model | objective | stored numbers | ORT ms batch 1, 1 thread: original → compressed | "
          "ORT ms batch 8, 2 threads: original → compressed |")
    print("|---|---|---|---|---|")
    for name, (build, shape) in MODELS.items():
        torch.save(build().state_dict(), Path(tmp) / "m.pt")
        np.savez(Path(tmp) / "x.npz", x=np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32))
        for objective in ("size", "latency"):
            try:
                r = compress(CompressOptions(
                    SourceOptions(Path(tmp) / "m.pt", arch=lambda build=build: build(), data=str(Path(tmp) / "x.npz")),
                    PlanOptions(objective=objective), FinetuneOptions(epochs=1), export=ExportOptions(latency_batch=8),
                    output=Path(tmp) / f"m-{objective}.fixclf.pt", force=True))
            except PlanError as exc:  # every layer kept: the model stays the original, nothing is written
                print(f"| {name} | {objective} | refused (exit 5): {exc} | | |", flush=True)
                continue
            one, batch = r.mobile_latency, r.latency
            print(f"| {name} | {objective} | {r.params.model.before:,} → {r.params.model.after:,} | "
                  f"{one.before.median:.3f} → {one.after.median:.3f} ({one.speedup}x) | "
                  f"{batch.before.median:.3f} → {batch.after.median:.3f} ({batch.speedup}x) |", flush=True)


if __name__ == "__main__":
    main()
