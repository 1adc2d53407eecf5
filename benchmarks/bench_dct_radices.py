"""Radix choices of the DCT chain at one size: ORT latency of an ACDC depth-2 stack against the dense
layer (batch 128 on 2 threads, batch 1 on 1 thread; all timed together, three rounds, medians), and
the .onnx and .ort (mobile format, constants expanded) bytes.

Run: python benchmarks/bench_dct_radices.py 4096 16,16,16 32,16,8 64,8,8
(the first radices given should be fixclf's own choice, ``compressor.transforms.dct_radices(n)``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

import compressor.transforms as transforms
from common import setup
from compressor.export import export_onnx
from compressor.layers import ACDCStack
from compressor.runtime import paired_latency


def export_with(radices: tuple[int, ...], n: int, path: Path) -> None:
    """Export an ACDC depth-2 stack whose DCT of size n uses ``radices`` (and .ort beside it)."""
    chosen = transforms.dct_radices
    transforms.dct_radices = lambda m: radices if m == n else chosen(m)
    try:
        export_onnx(ACDCStack(n, n, 2), torch.randn(8, n), path, ort_format=True)
    finally:
        transforms.dct_radices = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int)
    parser.add_argument("radices", nargs="+", help="comma-separated radices, e.g. 16,16,16")
    args = parser.parse_args()
    setup()
    choices = [tuple(int(r) for r in text.split(",")) for text in args.radices]
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / "dense.onnx"]
        export_onnx(nn.Linear(args.n, args.n), torch.randn(8, args.n), files[0])
        for radices in choices:
            files.append(Path(tmp) / f"{'x'.join(map(str, radices))}.onnx")
            export_with(radices, args.n, files[-1])
        x = torch.randn(128, args.n)
        times: dict[Path, list[list[float]]] = {f: [[], []] for f in files}
        for _ in range(3):
            for i, (sample, threads, runs) in enumerate(((x, 2, 30), (x[:1], 1, 200))):
                for f, timing in zip(files, paired_latency(files, sample, threads=threads, runs=runs)):
                    times[f][i].append(timing.median)
        dense = [statistics.median(t) for t in times[files[0]]]
        print(f"N = {args.n}, ACDC depth 2; (x) = dense time / this time\n")
        print("| radices | work per element | ORT batch 128 ms | ORT batch 1, 1 thread ms | .onnx bytes | .ort bytes |")
        print("|---|---|---|---|---|---|")
        for radices, f in zip(choices, files[1:]):
            b128, b1 = (statistics.median(t) for t in times[f])
            print(f"| {' x '.join(map(str, radices))} | {transforms.dct_work(radices)} | {b128:.3f} ({dense[0] / b128:.1f}x) | "
                  f"{b1:.4f} ({dense[1] / b1:.1f}x) | {f.stat().st_size:,} | {f.with_suffix('.ort').stat().st_size:,} |")


if __name__ == "__main__":
    main()
