"""Figures of a compression: parameters, ONNX bytes, accuracy, latency; as one JSON-able dict.

``latency_ms`` is measured in ONNX Runtime on the CPU: :data:`WARMUP` untimed runs, then
:data:`RUNS` timed runs of one batch; median and 90th percentile, with batch size and intra-op
threads stated in the report. Original and compressed models are exported and timed the same way
in the same process, so their ratio is meaningful even on a noisy machine.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import ort_session
from .finetune import evaluate

__all__ = ["WARMUP", "RUNS", "measure_latency", "onnx_accuracy", "summarise_layers", "ratio", "find_latest_report"]

WARMUP = 10
RUNS = 50


def measure_latency(onnx_path: str | Path, sample: torch.Tensor, *, threads: int = 2, runs: int = RUNS) -> dict:
    """ORT CPU latency of one batch ``sample``: {"median", "p90", "batch", "threads", "runs"} in ms."""
    session = ort_session(str(onnx_path), threads)
    feed = {session.get_inputs()[0].name: sample.float().numpy()}
    for _ in range(WARMUP):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median": float(np.median(times)),
        "p90": float(np.percentile(times, 90)),
        "batch": int(sample.shape[0]),
        "threads": threads,
        "runs": runs,
    }


class _OnnxClassifier(nn.Module):
    """An exported model behind the nn.Module interface, so that :func:`evaluate` can score it."""

    def __init__(self, onnx_path: str | Path) -> None:
        super().__init__()
        self.session = ort_session(str(onnx_path))
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.float().numpy()})[0])


def onnx_accuracy(onnx_path: str | Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of an exported model in ONNX Runtime (used for the int8 file)."""
    return evaluate(_OnnxClassifier(onnx_path), x, y, batch_size=256)


def summarise_layers(plan: list[dict]) -> dict:
    """Totals over the replaced layers: {"before", "after", "ratio"}."""
    replaced = [p for p in plan if p["kind"] is not None]
    before = sum(p["params_before"] for p in replaced)
    after = sum(p["params_after"] for p in replaced)
    return {"before": before, "after": after, "ratio": ratio(before, after)}


def ratio(before: float, after: float) -> float | None:
    return round(before / after, 2) if after else None


def find_latest_report(directory: str | Path = ".") -> Path | None:
    """The most recently written compressed checkpoint (``*.fixclf.pt``) in ``directory``."""
    candidates = sorted(Path(directory).glob("*.fixclf.pt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)
