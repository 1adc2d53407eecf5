"""Does the fixed head's start matter? The default (Hadamard rows 1..C in class order, alpha 1,
bias = the original's mean logits) against two starts that use the data (issue 14's "which class
gets which code row"), held-out accuracy after the default fine-tune.

* ``assign``: each class gets the Hadamard row (of all P - 1 nonzero rows) that best matches the
  class-mean direction of the student's initial head features, classes as the teacher labels the
  calibration rows; one assignment for all classes at once (Hungarian algorithm, scipy);
* ``assign_fit``: that, and alpha and the bias fitted to the teacher's logits by least squares, so
  the student starts informative instead of at the class prior.

Run: python benchmarks/bench_head_init.py [--samples hard_mlp hard_cnn mlp cnn] [--seeds 0 1 2]
[--variants default assign assign_fit] [--epochs N]  (needs scipy: pip install -e '.[test]')
Not adopted: docs/hard_samples.md (fourth round) has the figures.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import setup
from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.finetune import distill, evaluate
from compressor.layers import HadamardHead
from compressor.options import FinetuneOptions, PlanOptions
from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def head_features(model: torch.nn.Module, head: HadamardHead, x: torch.Tensor) -> torch.Tensor:
    """The head's inputs on x, each row L2-normalised as the head does."""
    seen = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append(args[0].reshape(-1, head.in_features)))
    model(x)
    hook.remove()
    return seen[0] / (seen[0].norm(dim=1, keepdim=True) + head.eps)


@torch.no_grad()
def assign_rows(student: torch.nn.Module, teacher: torch.nn.Module, head: HadamardHead, x: torch.Tensor) -> None:
    """Give each class the code row closest to its centred class-mean feature direction."""
    from scipy.optimize import linear_sum_assignment

    features, classes = head_features(student, head, x), teacher(x).argmax(-1)
    means = torch.stack([features[classes == c].mean(0) if (classes == c).any() else torch.zeros(head.in_features)
                         for c in range(head.num_classes)])
    means = means - means.mean(0)
    basis = F.pad(torch.eye(head.in_features), (0, head.size - head.in_features))
    rows = head.hadamard(basis).T[1:] * head.code_scale  # every nonzero Sylvester row on the N features
    picked, chosen = linear_sum_assignment(-(means @ rows.T).numpy())
    index = torch.as_tensor(chosen[np.argsort(picked)] + 1)

    def raw_codes(v: torch.Tensor) -> torch.Tensor:
        return head.hadamard(F.pad(v, (0, head.size - head.in_features)))[:, index]

    head.raw_codes = raw_codes


@torch.no_grad()
def fit_alpha(student: torch.nn.Module, teacher: torch.nn.Module, head: HadamardHead, x: torch.Tensor) -> None:
    """alpha and bias minimising ||alpha Q x_hat + b - teacher(x)||^2 (kept when alpha > 0)."""
    codes, target = head.codes(head_features(student, head, x)), teacher(x)
    centred = codes - codes.mean(0)
    alpha = float((centred * (target - target.mean(0))).sum() / (centred * centred).sum())
    if alpha > 0:
        head.set_alpha(alpha)
        head.bias.copy_(target.mean(0) - alpha * codes.mean(0))


def run(sample: str, seed: int, variant: str, epochs: int | None) -> tuple[float, float, float, float]:
    loaded = load_model(ROOT / "sample_models" / f"{sample}.pt")
    data = load_data(loaded.data)
    plan = make_plan(loaded.model, PlanOptions(), seed=seed)
    torch.manual_seed(seed)
    student = apply_plan(copy.deepcopy(loaded.model), plan)
    x = data.head("train", 1024)[0]
    initialise_from_dense(loaded.model, student, plan, x)
    head = next(m for m in student.modules() if isinstance(m, HadamardHead))
    if variant in ("assign", "assign_fit"):
        assign_rows(student, loaded.model, head, x)
    if variant == "assign_fit":
        fit_alpha(student, loaded.model, head, x)
    start_accuracy, start = evaluate(student, data), time.perf_counter()
    distill(student, loaded.model, data, FinetuneOptions(epochs=epochs), replaced_parameters(student, plan), seed=seed)
    return evaluate(loaded.model, data), start_accuracy, evaluate(student, data), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", default=["hard_mlp", "hard_cnn", "mlp", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["default", "assign", "assign_fit"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the default budget (2,500 steps)")
    args = parser.parse_args()
    setup()
    print("| sample | start | " + " | ".join(f"seed {s}: at start → after" for s in args.seeds) + " | mean after | s per run |")
    print("|---|---|" + "---|" * len(args.seeds) + "---|---|")
    for sample in args.samples:
        for variant in args.variants:
            runs = [run(sample, seed, variant, args.epochs) for seed in args.seeds]
            cells = [f"{100 * start:.2f} → {100 * after:.2f}" for _, start, after, _ in runs]
            print(f"| {sample} (original {100 * runs[0][0]:.2f}) | {variant} | {' | '.join(cells)} | "
                  f"{100 * np.mean([r[2] for r in runs]):.2f} | {np.mean([r[3] for r in runs]):.0f} |", flush=True)


if __name__ == "__main__":
    main()
