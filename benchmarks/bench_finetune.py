"""Fine-tune throughput (samples/s) and peak memory, 1 and 2 processes (torchrun, DDP over gloo).

Run: python benchmarks/bench_finetune.py [--device cuda]
Two workloads, each fine-tuned by fixclf's own ``distill`` exactly as ``fixclf compress`` does:

* ``mlp``: the bundled digits MLP (64-256-128-10) on its 1,437 training rows, 5 epochs, batch 64,
  without mixup (the workload the tables were measured with, before mixup became the default);
* ``caffenet``: the CaffeNet-scale head 9216 -> 4096 -> 4096 -> 1000 (random weights, ACDC depth 2
  for FC6 and FC7, Hadamard head for FC8) on a synthetic ImageNet-shaped *stream* (an
  IterableDataset: 9216 features, 1000 classes, made on the fly, never held in memory) for
  STEPS fixed steps of batch 64 (global).

Each configuration runs as ``torchrun --standalone --nproc_per_node=N`` of this file; rank 0
prints one JSON line (samples/s over the fine-tune, peak RSS of rank 0); this driver prints a
markdown table. Float32 on CPU; with ``--device cuda`` autocast (bf16 where supported).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

STEPS = 40
BATCH = 64
CLASSES, FEATURES = 1000, 9216


class ImageNetShapedStream(IterableDataset):
    """Rows of 9216 features (CaffeNet's pool5) with labels in [0, 1000), made on the fly, seeded."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for start in range(0, self.rows, 256):
            n = min(256, self.rows - start)
            x = torch.relu(torch.randn(n, FEATURES, generator=generator))
            y = torch.randint(0, CLASSES, (n,), generator=generator)
            yield from zip(x, y.tolist())


def _workload(name: str):
    """(teacher, data source, epochs) of a workload."""
    from compressor.checkpoint import load_model
    from compressor.data import load_data

    if name == "mlp":
        loaded = load_model(ROOT / "sample_models" / "mlp.pt")
        return loaded.model, load_data(loaded.data), 5
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(FEATURES, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, CLASSES))
    return head, load_data("bench_finetune:imagenet_stream"), 1


def imagenet_stream() -> ImageNetShapedStream:
    """``--data bench_finetune:imagenet_stream``: STEPS global batches of training rows (+ one in five held out)."""
    return ImageNetShapedStream(STEPS * BATCH * 5 // 4)


def worker(name: str, device: str) -> None:
    import copy

    from compressor.distributed import world_from_environment
    from compressor.finetune import distill
    from compressor.options import FinetuneOptions, PlanOptions
    from compressor.surgery import apply_plan, initialise_from_dense, make_plan, replaced_parameters

    world = world_from_environment(device)
    teacher, data, epochs = _workload(name)
    plan = make_plan(teacher, PlanOptions())
    torch.manual_seed(0)
    student = apply_plan(copy.deepcopy(teacher), plan)
    initialise_from_dense(teacher, student, plan, data.head("train", 256)[0])
    options = FinetuneOptions(epochs=epochs, batch_size=BATCH, device=device, mixup=False)  # the workload as documented
    result = distill(student, teacher, data, options, replaced_parameters(student, plan), world=world)
    if world.is_main:
        print(json.dumps({"workload": name, "processes": world.size, "steps": result.steps,
                          "samples_per_s": round(result.samples_per_second, 1),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}), flush=True)
    world.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.device)
    from common import machine

    print(f"machine: {machine()}\n")
    print("| workload | processes | device | steps | samples/s | peak RSS rank 0 |")
    print("|---|---|---|---|---|---|")
    for name in ("mlp", "caffenet"):
        for n in (1, 2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
                   "--worker", name, "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // n or 1)})
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(out.returncode)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {n} | {args.device} | {row['steps']} | {row['samples_per_s']:,.0f} | "
                  f"{row['peak_rss_mb']:,} MB |", flush=True)


if __name__ == "__main__":
    main()
