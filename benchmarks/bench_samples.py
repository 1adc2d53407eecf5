"""The bundled samples through the default `fixclf compress` (library call, same defaults as the CLI).

Run: python benchmarks/bench_samples.py
Prints per sample and hidden-layer kind: parameters (replaced layers), ONNX bytes, held-out
accuracy before/after, ORT latency (batch 128, 2 threads) before/after, and wall time.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import setup
from compressor import CompressOptions, PlanOptions, SourceOptions, compress

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    setup()
    print("| sample | --hidden | params (replaced) | ONNX bytes | accuracy before → after | ORT ms before → after (batch 128) | wall s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for sample in ("mlp", "cnn"):
            for hidden in ("acdc", "fastfood"):
                start = time.perf_counter()
                r = compress(CompressOptions(SourceOptions(ROOT / "sample_models" / f"{sample}.pt"), PlanOptions(hidden=hidden),
                                             output=Path(tmp) / f"{sample}-{hidden}.fixclf.pt"))
                wall = time.perf_counter() - start
                p, o, a, lat = r.params.replaced, r.onnx, r.accuracy, r.latency
                print(f"| {sample} | {hidden} | {p.before:,} → {p.after:,} ({p.ratio}x) | "
                      f"{o.bytes_before:,} → {o.bytes_after:,} ({o.ratio}x) | "
                      f"{100 * a.before:.2f}% → {100 * a.after:.2f}% ({100 * (a.after - a.before):+.2f} pp) | "
                      f"{lat.before.median:.3f} → {lat.after.median:.3f} ({lat.speedup}x) | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
