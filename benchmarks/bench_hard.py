"""The harder bundled samples (sample_models/make_hard_samples.py, ~77% originals): default compression
per seed, accuracy against fine-tune epochs, and the baseline a user would pick instead, a narrower
dense network with about as many stored numbers in its FC layers, distilled with the same recipe.

Run: python benchmarks/bench_hard.py [--samples hard_mlp hard_cnn] [--seeds 0 1 2] [--parts compress maxdrop narrow curve]
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
from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters
from compare import narrow_model

ROOT = Path(__file__).resolve().parents[1]


def _label(mixup: bool | None) -> str:
    return " --no-mixup" if mixup is False else ""


def part_compress(samples: list[str], seeds: list[int], hiddens: list[str], mixup: bool | None, tmp: str) -> None:
    print("| sample | --hidden | replaced layers' numbers | " + " | ".join(f"seed {s}" for s in seeds) + " | wall s |")
    print("|---|---|---|" + "---|" * len(seeds) + "---|")
    for sample in samples:
        for hidden in hiddens:
            cells, start = [], time.perf_counter()
            for seed in seeds:
                r = compress(CompressOptions(SourceOptions(ROOT / "sample_models" / f"{sample}.pt"), PlanOptions(hidden=hidden),
                                             FinetuneOptions(mixup=mixup), seed=seed,
                                             output=Path(tmp) / f"{sample}-{hidden}-{seed}.fixclf.pt", force=True))
                a, p = r.accuracy, r.params.replaced
                cells.append(f"{100 * a.before:.2f} → {100 * a.after:.2f} ({100 * (a.after - a.before):+.2f})")
            wall = (time.perf_counter() - start) / len(seeds)
            print(f"| {sample}{_label(mixup)} | {hidden} | {p.before:,} → {p.after:,} ({p.ratio}x) | " + " | ".join(cells)
                  + f" | {wall:.0f} |", flush=True)


BUDGETS = (1, 2, 5, 10, 20, 40)


def plot_curve(curves: dict[str, list[float]], path: Path) -> None:
    """Held-out accuracy against the fine-tune budget, one line per sample (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for sample, accuracies in curves.items():
        ax.plot(BUDGETS, accuracies, marker="o", label=sample)
    ax.set_xscale("log")
    ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax.set_xlabel("fine-tune epochs (each run its own cosine schedule)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def part_curve(samples: list[str], plot: Path | None = None) -> None:
    """Held-out accuracy after 1, 2, 5, ... 40 epochs (each its own run), default recipe and --no-mixup."""
    curves: dict[str, list[float]] = {}
    print("| sample | " + " | ".join(f"{e} epochs" for e in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for sample, mixup in ((s, m) for s in samples for m in (None, False)):
        loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
        data = load_data(str(loaded.data))
        cells = []
        for epochs in BUDGETS:
            torch.manual_seed(0)
            plan = make_plan(loaded.model)
            student = apply_plan(copy.deepcopy(loaded.model), plan)
            initialise_from_dense(loaded.model, student, plan, data.head("train", 1024)[0])
            distill(student, loaded.model, data, FinetuneOptions(epochs=epochs, mixup=mixup),
                    replaced_parameters(student, plan))
            cells.append(f"{100 * evaluate(student, data):.2f}")
        label = f"{sample}{_label(mixup)}"
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        curves[label] = [float(c) for c in cells]
    if plot is not None:
        plot_curve(curves, plot)


def part_narrow(samples: list[str], seeds: list[int], mixup: bool | None) -> None:
    """compare.py's narrow dense student (same stored numbers as fixclf-acdc's replaced layers), per seed."""
    print("| sample | student | stored numbers in the replaced layers | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|---|---|" + "---|" * len(seeds))
    for sample in samples:
        loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
        data = load_data(str(loaded.data))
        plan = make_plan(loaded.model)
        cells, fc = [], 0
        for seed in seeds:
            torch.manual_seed(seed)
            student, new = narrow_model(loaded.model, plan, data.head("train", 2)[0])
            distill(student, loaded.model, data, FinetuneOptions(mixup=mixup), new, seed=seed)
            cells.append(f"{100 * evaluate(student, data):.2f}")
            fc = sum(p.numel() for p in new)
        print(f"| {sample}{_label(mixup)} | narrow dense | {fc:,} | " + " | ".join(cells) + " |", flush=True)


def part_maxdrop(samples: list[str], budget: float, mixup: bool | None, tmp: str) -> None:
    """``--max-drop``: the held-out drop, what it kept dense and the compression it reached (seed 0)."""
    print("| sample | --max-drop | held-out: original → compressed (pp) | kept dense | replaced layers' numbers | wall s |")
    print("|---|---|---|---|---|---|")
    for sample in samples:
        start = time.perf_counter()
        r = compress(CompressOptions(SourceOptions(ROOT / "sample_models" / f"{sample}.pt"), PlanOptions(max_drop=budget),
                                     FinetuneOptions(mixup=mixup), output=Path(tmp) / f"{sample}-maxdrop.fixclf.pt",
                                     force=True))
        a, p = r.accuracy, r.params.replaced
        kept = [row.name for row in r.layers if row.kind is None and "max-drop" in (row.reason or "")]
        print(f"| {sample}{_label(mixup)} | {budget:g} | {100 * a.before:.2f} → {100 * a.after:.2f} ({100 * (a.after - a.before):+.2f}) | "
              f"{', '.join(kept) or 'none'} | {p.before:,} → {p.after:,} ({p.ratio}x) | {time.perf_counter() - start:.0f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", nargs="+", default=["hard_mlp", "hard_cnn"])
    parser.add_argument("--parts", nargs="+", default=["compress", "maxdrop", "narrow", "curve"])
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--plot", type=Path, help="with the curve part: write it as PNG (needs matplotlib)")
    parser.add_argument("--hidden", nargs="+", default=["acdc", "fastfood"], help="kinds for the compress part")
    parser.add_argument("--no-mixup", dest="mixup", action="store_const", const=False, default=None,
                        help="fine-tune with --no-mixup (compress, maxdrop, narrow parts; default: the default recipe)")
    args = parser.parse_args()
    setup()
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            if part == "compress":
                part_compress(args.samples, args.seeds, args.hidden, args.mixup, tmp)
            elif part == "curve":
                part_curve(args.samples, args.plot)
            elif part == "maxdrop":
                part_maxdrop(args.samples, args.max_drop, args.mixup, tmp)
            elif part == "narrow":
                part_narrow(args.samples, args.seeds, args.mixup)
            print(flush=True)


if __name__ == "__main__":
    main()
