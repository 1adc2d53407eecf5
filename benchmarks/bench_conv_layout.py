"""Fine-tune speed of the convolutional samples in the default memory layout against channels-last
(what ``compressor.finetune.distill`` picks for models with 2-D convolutions), same seed, same
budget: milliseconds per optimiser step and the held-out accuracy each ends at.

Run: python benchmarks/bench_conv_layout.py [--samples cnn hard_cnn] [--epochs 5]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import compressor.finetune as finetune
from common import setup
from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.options import FinetuneOptions, PlanOptions
from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters

ROOT = Path(__file__).resolve().parents[1]


def fine_tune(sample: str, epochs: int, channels_last: bool) -> tuple[float, float]:
    """(ms per step, held-out accuracy after) of the default replacement of ``sample``."""
    loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
    data = load_data(loaded.data)
    plan = make_plan(loaded.model, PlanOptions())
    torch.manual_seed(0)
    student = apply_plan(copy.deepcopy(loaded.model), plan)
    initialise_from_dense(loaded.model, student, plan, data.head("train", 1024)[0])
    chosen = finetune.channels_last
    if not channels_last:
        finetune.channels_last = lambda models, example: []
    try:
        start = time.perf_counter()
        result = finetune.distill(student, loaded.model, data, FinetuneOptions(epochs=epochs),
                                  replaced_parameters(student, plan))
        seconds = time.perf_counter() - start
    finally:
        finetune.channels_last = chosen
    return 1e3 * seconds / result.steps, finetune.evaluate(student, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", default=["cnn", "hard_cnn"])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    setup()
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (~1.5 s): not a step
    print("| sample | epochs | default layout: ms per step, accuracy | channels-last: ms per step, accuracy | speed-up |")
    print("|---|---|---|---|---|")
    for sample in args.samples:
        (slow, slow_acc), (fast, fast_acc) = (fine_tune(sample, args.epochs, layout) for layout in (False, True))
        print(f"| {sample} | {args.epochs} | {slow:.2f} ms, {100 * slow_acc:.2f}% | {fast:.2f} ms, {100 * fast_acc:.2f}% | "
              f"{slow / fast:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
