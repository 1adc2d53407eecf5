"""Helpers shared by the benchmark scripts: machine description and PyTorch timing."""
from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import date

import onnxruntime
import torch

THREADS = 2
SEED = 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{date.today()} | {cpu}, {os.cpu_count()} cores | Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__} | {THREADS} threads")


def setup() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    print(f"machine: {machine()}\n", flush=True)


def time_ms(fn, *, warmup: int = 3, runs: int = 15) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
