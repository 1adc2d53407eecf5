"""ONNX Runtime: sessions, outputs, latency and accuracy of exported models.

Every session fixclf opens has intra-op thread spinning off (``session.intra_op.allow_spinning``
= "0"): spinning threads of one session steal the cores of the next on a small machine, which
skewed before/after latency ratios 2-3x. Latency: :data:`WARMUP` untimed runs, then ``runs``
timed runs of one batch, median and 90th percentile; the batch size, thread count and spinning
setting are part of the result, so a report says how it was measured. Models compared with each
other (before / after, dense / structured) are timed together by :func:`paired_latency`, in
alternating rounds, so that a slow spell of a shared machine slows all of them alike.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["WARMUP", "RUNS", "ROUNDS", "Latency", "as_model_input", "as_feed", "session", "run", "latency", "paired_latency",
           "accuracy"]

WARMUP = 10
RUNS = 50
ROUNDS = 10
"""Models timed together alternate in this many rounds of ``runs / ROUNDS`` runs each."""


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


def as_model_input(x: torch.Tensor) -> torch.Tensor:
    """Rows as every exported model takes them: float32, or integers as they are (the dtype the data
    fed the model: token ids; :meth:`compressor.data.DataSource.as_model_input`)."""
    return x.float() if x.is_floating_point() or x.dtype == torch.bool else x


def as_feed(x: torch.Tensor) -> np.ndarray:
    """Rows as an ONNX Runtime feed (:func:`as_model_input`)."""
    return as_model_input(x).numpy()


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
    return sess.run(None, {sess.get_inputs()[0].name: as_feed(x)})[0]


def latency(model: str | Path | bytes, sample: torch.Tensor, *, threads: int = 2, runs: int = RUNS) -> Latency:
    """Median / p90 latency of one batch ``sample`` (M, ...) in a fresh session."""
    return paired_latency([model], sample, threads=threads, runs=runs)[0]


def paired_latency(models: Sequence[str | Path | bytes], sample: torch.Tensor, *, threads: int = 2,
                   runs: int = RUNS) -> list[Latency]:
    """Latency of each model on the same batch, timed in :data:`ROUNDS` alternating rounds.

    Each round runs every model in turn: one untimed run (its caches warm again after the others),
    then ``runs / ROUNDS`` timed runs. A slow spell of a shared machine (seconds long) thus lands on
    every model alike and their ratio holds; within a round each model runs alone and warm, as it
    would in an application. Spinning is off, so no session's idle threads take the others' cores.
    """
    sessions = [session(model, threads) for model in models]
    feeds = [{s.get_inputs()[0].name: as_feed(sample)} for s in sessions]
    for sess, feed in zip(sessions, feeds):
        for _ in range(WARMUP):
            sess.run(None, feed)
    rounds = max(1, min(ROUNDS, runs))
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        for sess, feed, timed in zip(sessions, feeds, times):
            sess.run(None, feed)
            for _ in range(runs // rounds + (r < runs % rounds)):
                start = time.perf_counter()
                sess.run(None, feed)
                timed.append((time.perf_counter() - start) * 1e3)
    del sessions
    return [Latency(float(np.median(t)), float(np.percentile(t, 90)), int(sample.shape[0]), threads, runs) for t in times]


def accuracy(model: str | Path | bytes, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of an exported classifier over labelled batches ``(x, y)``."""
    sess = session(model)
    correct = rows = 0
    for x, y in batches:
        correct += int((torch.from_numpy(run(sess, x)).argmax(-1) == y).sum())
        rows += y.shape[0]
    return correct / max(1, rows)
