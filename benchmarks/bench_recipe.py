"""Can the fine-tune recipe reach its final accuracy sooner? Issue 14's curve goal (within 1 pp of the
final figure by a quarter of the default budget) on a harder sample, held-out accuracy after
``--epochs N`` (each budget its own cosine schedule), one variant of the default recipe at a time:

* ``default``: the library's defaults (``FinetuneOptions()``);
* ``lr=V``: the replaced layers' learning rate (default 2e-2);
* ``kept=V``: the kept layers' learning-rate scale (default 0.05);
* ``T=V``: the distillation temperature (default 2);
* ``nomix``: no mixup;
* ``ramp=F``: mixing strength grows linearly over the first fraction F of the steps (a row's
  weight w becomes 1 - r (1 - w), r from 0 to 1);
* ``late=F``: no mixing for the first fraction F of the steps, the default's after;
* ``ema=D``: the student evaluated is the exponential moving average of its parameters over the
  steps, decay D (warmed up as min(D, (1 + n) / (10 + n)) at step n).

The two schedules and the average change how :class:`compressor.data.MixPartners` weights are used per step, which
the library has no option for: this script wraps the trainer's forward pass to try them.

Run: python benchmarks/bench_recipe.py [--sample hard_cnn] [--epochs 5 20] [--seeds 0]
[--variants default lr=0.04 ...]. Figures: docs/hard_samples.md (fifth and eighth rounds). Not adopted.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from common import setup
from compressor import finetune
from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.finetune import distill, evaluate
from compressor.options import FinetuneOptions, PlanOptions
from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["default", "lr=0.04", "lr=0.06", "lr=0.08", "kept=0.01", "kept=0.2", "kept=1", "T=1", "T=4",
                    "nomix", "ramp=0.5", "late=0.5"]
OPTION_OF = {"lr": ("lr", float), "kept": ("kept_lr_scale", float), "T": ("temperature", float)}
_FORWARD = finetune._Run._forward
_STEP = finetune._Run.step


def mixing_schedule(kind: str | None, fraction: float) -> None:
    """Install (or, with ``kind`` None, remove) a per-step change of the mixup weights."""
    def forward(run, batch):
        x, y, *mixing = batch
        if mixing and mixing[0] is not None:
            progress = run.result.steps / max(1, run.options.epochs * run.epoch_steps)
            partners = mixing[0]
            if kind == "ramp":
                partners.weight = 1 - min(1.0, progress / fraction) * (1 - partners.weight)
            elif progress < fraction:  # "late"
                partners.weight = torch.ones_like(partners.weight)
        return _FORWARD(run, (x, y, *mixing))

    finetune._Run._forward = _FORWARD if kind is None else forward


def averaging(decay: float | None) -> list[torch.Tensor]:
    """Install (or, with ``decay`` None, remove) an exponential moving average of the student's
    parameters after every optimiser step; the averages, filled in as the steps run."""
    averages: list[torch.Tensor] = []

    def step(run, batches, deadline):
        over = _STEP(run, batches, deadline)
        params = list(run.student.parameters())
        if not averages:
            averages.extend(p.detach().clone() for p in params)
        elif not over[0]:
            weight = min(decay, (1 + run.result.steps) / (10 + run.result.steps))
            with torch.no_grad():
                for average, p in zip(averages, params):
                    average.mul_(weight).add_(p.detach(), alpha=1 - weight)
        return over

    finetune._Run.step = _STEP if decay is None else step
    return averages


def options_for(variant: str, epochs: int) -> FinetuneOptions:
    name, _, value = variant.partition("=")
    mixing_schedule(name if name in ("ramp", "late") else None, float(value or 0))
    if name in OPTION_OF:
        field, kind = OPTION_OF[name]
        return FinetuneOptions(epochs=epochs, **{field: kind(value)})
    return FinetuneOptions(epochs=epochs, mixup=False if name == "nomix" else None)


def run(sample: str, seed: int, variant: str, epochs: int) -> tuple[float, float]:
    """Held-out accuracy after the fine-tune, and its seconds."""
    loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
    data = load_data(loaded.data)
    plan = make_plan(loaded.model, PlanOptions(), seed=seed)
    torch.manual_seed(seed)
    student = apply_plan(copy.deepcopy(loaded.model), plan)
    initialise_from_dense(loaded.model, student, plan, data.head("train", 1024)[0])
    start = time.perf_counter()
    name, _, value = variant.partition("=")
    averages = averaging(float(value) if name == "ema" else None)
    distill(student, loaded.model, data, options_for(variant, epochs), replaced_parameters(student, plan), seed=seed)
    with torch.no_grad():
        for average, p in zip(averages, student.parameters()):
            p.copy_(average)
    return evaluate(student, data), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="hard_cnn")
    parser.add_argument("--epochs", nargs="+", type=int, default=[5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    setup()
    print("| variant | " + " | ".join(f"{e} epochs, seed {s}" for e in args.epochs for s in args.seeds) + " | s per run |")
    print("|---|" + "---|" * (len(args.epochs) * len(args.seeds)) + "---|")
    for variant in args.variants:
        runs = [run(args.sample, seed, variant, epochs) for epochs in args.epochs for seed in args.seeds]
        print(f"| {variant} | " + " | ".join(f"{100 * accuracy:.2f}" for accuracy, _ in runs) +
              f" | {sum(s for _, s in runs) / len(runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
