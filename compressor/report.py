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

from .export import ort_session

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


def onnx_accuracy(onnx_path: str | Path, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of an exported model in ONNX Runtime (used for the int8 file)."""
    session = ort_session(str(onnx_path))
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = session.run(None, {name: x[start : start + batch_size].float().numpy()})[0]
        correct += int((logits.argmax(-1) == y[start : start + batch_size].numpy()).sum())
    return correct / max(1, x.shape[0])


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
