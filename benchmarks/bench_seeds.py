"""Seed spread of the default compression on the samples, and the `--init fit` alternative.

Run: python benchmarks/bench_seeds.py [--seeds 0 1 2]
Prints held-out accuracy per sample, hidden-layer initialisation and seed (the same pipeline as
`fixclf compress SAMPLE --seed S [--init fit]`; export included, so each run takes 15-35 s).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import setup
from compressor import CompressOptions, FinetuneOptions, SourceOptions, compress

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    setup()
    print("| sample | --init | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        for sample in ("mlp", "cnn"):
            for init in ("thesis", "fit"):
                cells = []
                for seed in args.seeds:
                    report = compress(CompressOptions(SourceOptions(ROOT / "sample_models" / f"{sample}.pt"),
                                                      finetune=FinetuneOptions(init=init), seed=seed,
                                                      output=Path(tmp) / f"{sample}-{init}-{seed}.fixclf.pt"))
                    acc = report.accuracy
                    cells.append(f"{100 * acc.before:.2f}% → {100 * acc.after:.2f}%")
                print(f"| {sample} | {init} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
