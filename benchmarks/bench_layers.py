"""Layer speed and size: dense nn.Linear vs ACDC (depth 1) vs Adaptive Fastfood, and the dense
N -> 1000 head vs HadamardHead, batch 128 on 2 threads and batch 1 on 1 thread (how ONNX Runtime
Mobile runs), N in {512, 1024, 4096, 9216}.

Run: python benchmarks/bench_layers.py [--sizes 1024 4096 9216] [--sweep 4096]
Prints a markdown table: PyTorch forward, PyTorch forward+backward, ONNX Runtime forward (median
ms; batch 128 / 2 threads and batch 1 / 1 thread; the layers of a row group timed together in
alternating rounds, thread spinning off: ``compressor.runtime.paired_latency``), ONNX bytes, and
each figure's ratio to the dense layer of the same row group, same run; then, for N = --sweep,
ORT latency against the batch size (1 to 128).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from common import setup, time_ms
from compressor.export import export_onnx
from compressor.layers import ACDCStack, AdaptiveFastfood, HadamardHead
from compressor.runtime import paired_latency

BATCH = 128
CLASSES = 1000


def measure_torch(module: nn.Module, n: int) -> dict:
    x = torch.randn(BATCH, n)
    x_grad = x.clone().requires_grad_()
    module.eval()
    with torch.no_grad():
        forward = time_ms(lambda: module(x))

    def step():
        module.zero_grad(set_to_none=True)
        module(x_grad).sum().backward()

    return {"fwd": forward, "fwdbwd": time_ms(step)}


def measure_group(group: dict[str, nn.Module], n: int, workdir: Path) -> dict[str, dict]:
    """PyTorch timings of each module, then ONNX Runtime latency of all of them timed together."""
    x = torch.randn(BATCH, n)
    results, files = {}, []
    for i, (name, module) in enumerate(group.items()):
        results[name] = measure_torch(module, n)
        path = workdir / f"layer{i}.onnx"
        results[name]["bytes"] = export_onnx(module, x, path).files["onnx"].bytes
        files.append(path)
    for key, sample, threads, runs in (("ort", x, 2, 50), ("ort1", x[:1], 1, 500)):
        for name, timing in zip(group, paired_latency(files, sample, threads=threads, runs=runs)):
            results[name][key] = timing.median
    for path in files:
        path.unlink()
    return results


def rows_for(n: int, workdir: Path) -> list[tuple[str, dict, dict]]:
    hidden = {
        f"dense Linear({n}, {n})": nn.Linear(n, n),
        "ACDC (depth 1)": ACDCStack(n, n, 1),
        "Adaptive Fastfood": AdaptiveFastfood(n, n),
    }
    heads = {f"dense head Linear({n}, {CLASSES})": nn.Linear(n, CLASSES), "HadamardHead": HadamardHead(n, CLASSES)}
    out = []
    for group in (hidden, heads):
        results = measure_group(group, n, workdir)
        base = next(iter(results.values()))
        out += [(name, r, base) for name, r in results.items()]
    return out


def batch_sweep(n: int, batches: list[int], workdir: Path) -> None:
    """ORT latency of the dense layer, ACDC and Fastfood at N = n against the batch size (1 thread up
    to batch 8, the way a phone batches a few requests; 2 threads above), each batch timed together."""
    group = {"dense": nn.Linear(n, n), "ACDC (depth 1)": ACDCStack(n, n, 1), "Adaptive Fastfood": AdaptiveFastfood(n, n)}
    files = []
    for i, module in enumerate(group.values()):
        files.append(workdir / f"sweep{i}.onnx")
        export_onnx(module, torch.randn(8, n), files[-1])
    print(f"\nN = {n}: ORT ms (dense / this) against the batch size\n")
    print(f"| batch | threads | {' | '.join(group)} |")
    print(f"|---|---|{'---|' * len(group)}")
    for batch in batches:
        threads = 1 if batch <= 8 else 2
        times = [t.median for t in paired_latency(files, torch.randn(batch, n), threads=threads, runs=100)]
        cells = [f"{t:.3f} ({times[0] / t:.1f}x)" for t in times]
        print(f"| {batch} | {threads} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 4096, 9216])
    parser.add_argument("--sweep", type=int, default=4096, help="N of the batch-size table (0: none)")
    args = parser.parse_args()
    setup()
    print(f"batch {BATCH}; times are medians in ms; (x) = dense time / this time, or dense bytes / these bytes\n")
    print("| N | layer | PyTorch fwd | PyTorch fwd+bwd | ORT fwd | ORT batch 1, 1 thread | ONNX bytes |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for name, r, base in rows_for(n, Path(tmp)):
                cells = [f"{r[k]:.3f} ({base[k] / r[k]:.1f}x)" for k in ("fwd", "fwdbwd", "ort", "ort1")]
                print(f"| {n} | {name} | {' | '.join(cells)} | {r['bytes']:,} ({base['bytes'] / r['bytes']:.0f}x) |", flush=True)
        if args.sweep:
            batch_sweep(args.sweep, [1, 2, 4, 8, 16, 32, 64, 128], Path(tmp))


if __name__ == "__main__":
    main()
