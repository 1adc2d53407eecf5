"""AlexNet (torchvision's layout; the papers' CaffeNet head) through `fixclf compress`, as README's
"Your own model" walks through it: random weights, synthetic 224 x 224 inputs, a time-boxed fine-tune.

Run: python benchmarks/bench_alexnet.py [--max-time 60]
Prints stored numbers of the whole model and of the replaced FC layers, whole-model ONNX bytes and
ORT latency at batch 1, before and after. (With torchvision installed the same command line takes
`--arch torchvision.models:alexnet`.)
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import setup
from compressor import CompressOptions, ExportOptions, FinetuneOptions, SourceOptions, compress

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-time", type=float, default=60.0)
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args()
    setup()
    os.chdir(HERE)  # --arch alexnet:alexnet is found in the current directory, as python -m does
    from alexnet import alexnet

    with tempfile.TemporaryDirectory() as tmp:
        model = alexnet().eval()
        torch.save(model.state_dict(), Path(tmp) / "alexnet.pt")
        x = torch.randn(args.rows, 3, 224, 224)
        with torch.no_grad():
            y = model(x).argmax(1)
        np.savez(Path(tmp) / "images.npz", x=x.numpy(), y=y.numpy())
        r = compress(CompressOptions(
            SourceOptions(Path(tmp) / "alexnet.pt", arch="alexnet:alexnet", data=str(Path(tmp) / "images.npz")),
            finetune=FinetuneOptions(epochs=1000, max_time=args.max_time, batch_size=16),
            export=ExportOptions(latency_batch=1), output=Path(tmp) / "alexnet.fixclf.pt"))
    m, f, o, lat = r.params.model, r.params.replaced, r.onnx, r.latency
    print("| figure | before | after | ratio |")
    print("|---|---|---|---|")
    print(f"| stored numbers, whole model | {m.before:,} | {m.after:,} | {m.ratio}x |")
    print(f"| stored numbers, the three FC layers | {f.before:,} | {f.after:,} | {f.ratio}x |")
    print(f"| ONNX file, whole model | {o.bytes_before:,} B | {o.bytes_after:,} B | {o.ratio}x |")
    print(f"| ORT latency, batch 1, 2 threads (median) | {lat.before.median:.2f} ms | {lat.after.median:.2f} ms | "
          f"{lat.speedup}x |")
    print(f"\nfine-tune: {r.finetune.steps} steps in {r.finetune.seconds} s ({r.finetune.stopped_by}); "
          f"the convolutions ({m.before - f.before:,} numbers) stay dense")


if __name__ == "__main__":
    main()
