"""CaffeNet-scale classifier head, 9216 -> 4096 -> 4096 -> 1000 (random weights): dense vs fixclf's
default replacement (ACDC depth 2 for FC6 and FC7, Hadamard head for FC8).

Run: python benchmarks/bench_caffenet_head.py
Prints parameters, ONNX bytes (stored state and transform constants apart), and ORT latency
(median / p90) at batch 1 and 128, 2 threads, and batch 1 on 1 thread, both models exported the same
way and timed together in alternating rounds (``compressor.runtime.paired_latency``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from common import setup
from compressor.export import export_onnx
from compressor.layers import ACDCStack, HadamardHead, count_stored
from compressor.runtime import paired_latency


def models() -> dict[str, nn.Module]:
    return {
        "dense": nn.Sequential(nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000)),
        "fixclf": nn.Sequential(ACDCStack(9216, 4096, 2), nn.ReLU(), ACDCStack(4096, 4096, 2, seed=1), nn.ReLU(),
                                HadamardHead(4096, 1000)),
    }


def main() -> None:
    setup()
    x = torch.randn(128, 9216)
    rows, paths = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models().items():
            paths.append(Path(tmp) / f"{name}.onnx")
            result = export_onnx(model, x[:16], paths[-1])
            rows[name] = {"params": count_stored(model), "bytes": result.files["onnx"].bytes,
                          "stored": result.stored_parameter_bytes, "constants": result.constant_bytes}
        for key, sample, threads, runs in (("b1", x[:1], 2, 100), ("mobile", x[:1], 1, 100), ("b128", x, 2, 20)):
            for row, timing in zip(rows.values(), paired_latency(paths, sample, threads=threads, runs=runs)):
                row[key] = timing
    d, f = rows["dense"], rows["fixclf"]
    print("| model | stored numbers | ONNX bytes (stored + constants) | ORT batch 1 median / p90 ms | ORT batch 1, "
          "1 thread (mobile) ms | ORT batch 128 median / p90 ms |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['bytes']:,} ({r['stored']:,} + {r['constants']:,}) | "
              f"{r['b1'].median:.3f} / {r['b1'].p90:.3f} | {r['mobile'].median:.3f} | "
              f"{r['b128'].median:.2f} / {r['b128'].p90:.2f} |")
    print(f"| ratio | {d['params'] / f['params']:.0f}x | {d['bytes'] / f['bytes']:.0f}x | "
          f"{d['b1'].median / f['b1'].median:.1f}x | {d['mobile'].median / f['mobile'].median:.1f}x | "
          f"{d['b128'].median / f['b128'].median:.1f}x |")


if __name__ == "__main__":
    main()
