"""The harder bundled samples (sample_models/make_hard_samples.py, ~77% originals): default compression
per seed, accuracy against fine-tune epochs, and the baseline a user would pick instead, a narrower
dense network with about as many stored numbers in its FC layers, distilled with the same recipe.

Run: python benchmarks/bench_hard.py [--samples hard_mlp hard_cnn] [--seeds 0 1 2] [--parts compress curve narrow]
Every figure is held-out accuracy (`x_val`), which selects nothing here.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from common import setup
from compressor import CompressOptions, FinetuneOptions, PlanOptions, SourceOptions, compress
from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.finetune import distill, evaluate
from compressor.layers import count_stored
from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters
from compressor.zoo import mlp, small_cnn

ROOT = Path(__file__).resolve().parents[1]


def part_compress(samples: list[str], seeds: list[int], tmp: str) -> None:
    print("| sample | --hidden | replaced layers' numbers | " + " | ".join(f"seed {s}" for s in seeds) + " | wall s |")
    print("|---|---|---|" + "---|" * len(seeds) + "---|")
    for sample in samples:
        for hidden in ("acdc", "fastfood"):
            cells, start = [], time.perf_counter()
            for seed in seeds:
                r = compress(CompressOptions(SourceOptions(ROOT / "sample_models" / f"{sample}.pt"), PlanOptions(hidden=hidden),
                                             seed=seed, output=Path(tmp) / f"{sample}-{hidden}-{seed}.fixclf.pt"))
                a, p = r.accuracy, r.params.replaced
                cells.append(f"{100 * a.before:.2f} → {100 * a.after:.2f} ({100 * (a.after - a.before):+.2f})")
            wall = (time.perf_counter() - start) / len(seeds)
            print(f"| {sample} | {hidden} | {p.before:,} → {p.after:,} ({p.ratio}x) | " + " | ".join(cells)
                  + f" | {wall:.0f} |", flush=True)


def part_curve(samples: list[str]) -> None:
    budgets = (1, 2, 5, 10, 20, 40)
    print("| sample | " + " | ".join(f"{e} epochs" for e in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for sample in samples:
        loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
        data = load_data(str(loaded.data))
        cells = []
        for epochs in budgets:
            plan = make_plan(loaded.model)
            student = apply_plan(copy.deepcopy(loaded.model), plan)
            initialise_from_dense(loaded.model, student, plan, data.head("train", 1024)[0])
            distill(student, loaded.model, data, FinetuneOptions(epochs=epochs), replaced_parameters(student, plan))
            cells.append(f"{100 * evaluate(student, data):.2f}")
        print(f"| {sample} | " + " | ".join(cells) + " |", flush=True)


def _narrow(sample: str, teacher: torch.nn.Module) -> tuple[torch.nn.Module, list]:
    """A narrower dense student; the CNN keeps the original's convolutions (as fixclf does)."""
    if sample == "hard_mlp":
        student = mlp(24, [64, 64, 64], 10)
        return student, list(student.parameters())
    student = small_cnn(32, 10, 10)
    student.features.load_state_dict(teacher.features.state_dict())
    return student, list(student.classifier.parameters())


def part_narrow(samples: list[str], seeds: list[int]) -> None:
    print("| sample | student | stored numbers in the FC layers | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|---|---|" + "---|" * len(seeds))
    for sample in samples:
        loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
        data = load_data(str(loaded.data))
        cells = []
        for seed in seeds:
            torch.manual_seed(seed)
            student, new = _narrow(sample, loaded.model)
            distill(student, loaded.model, data, FinetuneOptions(), new, seed=seed)
            cells.append(f"{100 * evaluate(student, data):.2f}")
        fc = sum(count_stored(m) for m in student.modules() if isinstance(m, torch.nn.Linear))
        print(f"| {sample} | narrow dense | {fc:,} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", nargs="+", default=["hard_mlp", "hard_cnn"])
    parser.add_argument("--parts", nargs="+", default=["compress", "narrow", "curve"])
    args = parser.parse_args()
    setup()
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            if part == "compress":
                part_compress(args.samples, args.seeds, tmp)
            elif part == "curve":
                part_curve(args.samples)
            elif part == "narrow":
                part_narrow(args.samples, args.seeds)
            print(flush=True)


if __name__ == "__main__":
    main()
