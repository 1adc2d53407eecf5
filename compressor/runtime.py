"""ONNX Runtime: sessions, outputs, latency and accuracy of exported models.

Every session fixclf opens has intra-op thread spinning off (``session.intra_op.allow_spinning``
= "0"): spinning threads of one session steal the cores of the next on a small machine, which
skewed before/after latency ratios 2-3x. Latency: :data:`WARMUP` untimed runs, then ``runs``
timed runs of one batch, median and 90th percentile; the batch size, thread count and spinning
setting are part of the result, so a report says how it was measured.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

__all__ = ["WARMUP", "RUNS", "Latency", "session", "run", "latency", "accuracy"]

WARMUP = 10
RUNS = 50


@dataclass
class Latency:
    """One batch's latency in ONNX Runtime on the CPU, in milliseconds."""

    median: float
    p90: float
    batch: int
    threads: int
    runs: int
    spinning: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def session(model: str | Path | bytes, threads: int = 2):
    """A CPU InferenceSession on a file or serialised model, ``threads`` intra-op threads, no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor) -> np.ndarray:
    """The first output of ``sess`` on ``x`` (float32)."""
    return sess.run(None, {sess.get_inputs()[0].name: x.float().numpy()})[0]


def latency(model: str | Path | bytes, sample: torch.Tensor, *, threads: int = 2, runs: int = RUNS) -> Latency:
    """Median / p90 latency of one batch ``sample`` (M, ...) in a fresh session (one session at a time)."""
    sess = session(model, threads)
    feed = {sess.get_inputs()[0].name: sample.float().numpy()}
    for _ in range(WARMUP):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    del sess
    return Latency(float(np.median(times)), float(np.percentile(times, 90)), int(sample.shape[0]), threads, runs)


def accuracy(model: str | Path | bytes, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of an exported classifier over labelled batches ``(x, y)``."""
    sess = session(model)
    correct = rows = 0
    for x, y in batches:
        correct += int((torch.from_numpy(run(sess, x)).argmax(-1) == y).sum())
        rows += y.shape[0]
    return correct / max(1, rows)
