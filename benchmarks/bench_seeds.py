"""Seed spread of the default compression on the samples, and of variants of it.

Run: python benchmarks/bench_seeds.py [--seeds 0 1 2] [--samples mlp cnn hard_mlp ...] [--variants default init=fit ...]
Prints held-out accuracy per sample, variant and seed (the same pipeline as
`fixclf compress SAMPLE --seed S`; export included, so each run takes 15-35 s). A variant is
``default`` or ``NAME=VALUE`` changing one option of the plan or the fine-tune (several joined by commas):

* ``init=fit``: hidden layers first fitted to the dense ones by least squares (``--init fit``);
* ``depth=K``: ACDC layers per replaced Linear (``--depth``);
* ``hidden=fastfood``: the hidden layers' kind (``--hidden``);
* ``T=V``: the distillation temperature (``FinetuneOptions.temperature``, default 2);
* ``lr=V``: the replaced layers' learning rate (``--lr``);
* ``mixup=0``: no mixup (``--no-mixup``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import setup
from compressor import CompressOptions, FinetuneOptions, PlanOptions, SourceOptions, compress

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_OPTION = {"init": ("init", str), "T": ("temperature", float), "lr": ("lr", float),
                   "mixup": ("mixup", lambda v: bool(int(v)))}
PLAN_OPTION = {"depth": ("depth", int), "hidden": ("hidden", str)}


def options_of(variant: str) -> tuple[PlanOptions, FinetuneOptions]:
    """The plan and fine-tune options of ``default`` or ``NAME=VALUE[,NAME=VALUE...]``."""
    plan, finetune = {}, {}
    for change in ([] if variant == "default" else variant.split(",")):
        name, value = change.split("=", 1)
        target, (field, parse) = (plan, PLAN_OPTION[name]) if name in PLAN_OPTION else (finetune, FINETUNE_OPTION[name])
        target[field] = parse(value)
    return PlanOptions(**plan), FinetuneOptions(**finetune)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--variants", nargs="+", default=["default", "init=fit"])
    args = parser.parse_args()
    setup()
    print("| sample | variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        for sample in args.samples:
            for variant in args.variants:
                plan, finetune = options_of(variant)
                cells = []
                for seed in args.seeds:
                    report = compress(CompressOptions(SourceOptions(ROOT / "sample_models" / f"{sample}.pt"), plan,
                                                      finetune, seed=seed, output=Path(tmp) / "run.fixclf.pt", force=True))
                    acc = report.accuracy
                    cells.append(f"{100 * acc.before:.2f}% → {100 * acc.after:.2f}%")
                print(f"| {sample} | {variant} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
