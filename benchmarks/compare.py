"""fixclf against what a user would pick instead, on one checkpoint with one fine-tuning budget.

Run: python benchmarks/compare.py sample_models/mlp.pt [--json | --markdown] [--plot docs/compare_mlp.png]

Methods, all exported to ONNX the same way and timed in ONNX Runtime in the same run:
* dense: the original checkpoint;
* svd: each Linear layer fixclf replaces becomes two Linears of rank r from its truncated SVD,
  one r for all, chosen so that these layers' parameters add up to fixclf-ACDC's for the same
  layers, then distilled with the same budget and learning rate as fixclf's new layers;
* narrow dense: the replaced layers as a narrower dense chain (same input and output widths, every
  inner width w, the largest w whose layers store no more numbers than fixclf-acdc's replacements),
  freshly initialised and distilled with the same budget and learning rate as fixclf's new layers;
* fixclf-acdc, fixclf-fastfood: `fixclf compress --hidden acdc|fastfood --head hadamard`;
* int8: ONNX Runtime dynamic int8 quantisation of the original;
* fixclf-acdc+int8: the same quantisation of fixclf-acdc's remaining dense layers (n/a when none).
Columns: stored numbers, ONNX bytes, held-out accuracy, ORT median latency (batch 128, 2 threads),
and ratios to dense.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from common import setup
from compressor import CompressOptions, FinetuneOptions, PlanOptions, SourceOptions, compress, runtime
from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.export import export_onnx
from compressor.finetune import distill
from compressor.layers import count_stored
from compressor.surgery import make_plan

BATCH = 128


class LowRank(nn.Module):
    """W ~ U V from the truncated SVD of a trained Linear: ``x -> (x V^T) U^T + b``, rank r.

    Fine-tuned like fixclf's own new layers (its parameters are passed as the new ones: same rate)."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rank = max(1, min(rank, self.in_features, self.out_features))
        u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
        root = s[:rank].sqrt()
        self.first = nn.Linear(self.in_features, rank, bias=False)
        self.second = nn.Linear(rank, self.out_features)
        self.first.weight.data.copy_(root[:, None] * vh[:rank])
        self.second.weight.data.copy_(u[:, :rank] * root)
        self.second.bias.data.copy_(linear.bias.detach())

    def forward(self, x):
        return self.second(self.first(x))


def svd_model(original: nn.Module, plan) -> tuple[nn.Module, list[nn.Parameter]]:
    """Every layer fixclf replaces becomes LowRank with one rank r for all, chosen so that their
    parameters add up to fixclf's for the same layers (matched budget over the whole model)."""
    model = copy.deepcopy(original)
    replaced = [entry for entry in plan if entry.kind is not None]
    budget = sum(entry.params_after for entry in replaced)
    biases = sum(entry.out_features for entry in replaced)
    rank = max(1, round((budget - biases) / sum(e.in_features + e.out_features for e in replaced)))
    new: list[nn.Parameter] = []
    for entry in replaced:
        model.set_submodule(entry.name, LowRank(model.get_submodule(entry.name), rank))
        new += list(model.get_submodule(entry.name).parameters())
    return model, new


def _narrow_params(shapes: list[tuple[int, int, bool]], width: int) -> int:
    """Stored numbers of the chain ``shapes`` ((in, out, bias) per layer) with every inner width set to ``width``."""
    total = 0
    for i, (n_in, n_out, bias) in enumerate(shapes):
        n_in, n_out = (n_in if i == 0 else width), (n_out if i == len(shapes) - 1 else width)
        total += n_in * n_out + (n_out if bias else 0)
    return total


def narrow_model(original: nn.Module, plan, example: torch.Tensor) -> tuple[nn.Module, list[nn.Parameter]] | None:
    """The replaced layers as a narrower *dense* chain: same first input and last output, every inner
    width w, the largest w whose layers store no more numbers than fixclf's replacements of them;
    freshly initialised (seeded by the caller), to be distilled like fixclf's new layers. None when
    the replaced layers are not one chain (layer i + 1 reads layer i's output width) of two or more,
    or the narrowed model does not run (something between them needs the old width)."""
    replaced = [entry for entry in plan if entry.kind is not None]
    shapes = [(e.in_features, e.out_features, original.get_submodule(e.name).bias is not None) for e in replaced]
    if len(shapes) < 2 or any(shapes[i][0] != shapes[i - 1][1] for i in range(1, len(shapes))):
        return None
    budget = sum(entry.params_after for entry in replaced)
    width = max([w for w in range(1, max(s[1] for s in shapes) + 1) if _narrow_params(shapes, w) <= budget], default=1)
    model = copy.deepcopy(original)
    new: list[nn.Parameter] = []
    for i, (entry, (n_in, n_out, bias)) in enumerate(zip(replaced, shapes)):
        layer = nn.Linear(n_in if i == 0 else width, n_out if i == len(shapes) - 1 else width, bias=bias)
        model.set_submodule(entry.name, layer)
        new += list(layer.parameters())
    try:
        with torch.no_grad():
            model.eval()(example)
    except RuntimeError:
        return None
    return model, new


def onnx_figures(model: nn.Module, data, path: Path, quantize: str | None = None) -> dict:
    result = export_onnx(model, data.head("val", 256)[0], path, quantize=quantize)
    if quantize and "onnx-int8" not in result.files:
        return {"note": f"n/a: {result.notes[0]}"}
    return {"bytes": path.stat().st_size, "accuracy": runtime.accuracy(path, data.batches("val", 256)),
            "latency_ms": runtime.latency(path, data.head("val", BATCH)[0]).median}


def run(checkpoint: Path, workdir: Path) -> list[dict]:
    loaded = load_model(checkpoint)
    data = load_data(loaded.data)
    original = loaded.model
    rows = [{"method": "dense", "params": count_stored(original), **onnx_figures(original, data, workdir / "dense.onnx")}]

    plan = make_plan(original)  # the default plan: Hadamard head, ACDC hidden layers
    svd, new = svd_model(original, plan)
    distill(svd, original, data, FinetuneOptions(), new)
    rows.append({"method": "svd (same params as fixclf-acdc)", "params": count_stored(svd), **onnx_figures(svd, data, workdir / "svd.onnx")})

    torch.manual_seed(0)
    narrow = narrow_model(original, plan, data.head("train", 2)[0])
    if narrow is None:
        rows.append({"method": "narrow dense", "params": 0, "note": "n/a: the replaced layers are not one chain"})
    else:
        distill(narrow[0], original, data, FinetuneOptions(), narrow[1])
        rows.append({"method": "narrow dense (same params as fixclf-acdc)", "params": count_stored(narrow[0]),
                     **onnx_figures(narrow[0], data, workdir / "narrow.onnx")})

    for hidden in ("acdc", "fastfood"):
        out = workdir / f"{hidden}.fixclf.pt"
        report = compress(CompressOptions(SourceOptions(checkpoint), PlanOptions(hidden=hidden), output=out))
        model = load_model(out).model
        rows.append({"method": f"fixclf-{hidden}", "params": report.params.model.after,
                     **onnx_figures(model, data, workdir / f"{hidden}.onnx")})
        if hidden == "acdc":
            compressed_acdc = model

    rows.append({"method": "int8 (dynamic, ORT)", "params": count_stored(original),
                 **onnx_figures(original, data, workdir / "int8.onnx", quantize="int8")})
    rows.append({"method": "fixclf-acdc+int8", "params": count_stored(compressed_acdc),
                 **onnx_figures(compressed_acdc, data, workdir / "acdc-int8.onnx", quantize="int8")})
    dense = rows[0]
    for row in rows:
        if "bytes" in row:
            row["bytes_ratio"] = round(dense["bytes"] / row["bytes"], 2)
            row["params_ratio"] = round(dense["params"] / row["params"], 2)
            row["speedup"] = round(dense["latency_ms"] / row["latency_ms"], 2)
            row["accuracy_delta_pp"] = round(100 * (row["accuracy"] - dense["accuracy"]), 2)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, row in enumerate(r for r in rows if "bytes" in r):
        ax.scatter(row["bytes"], 100 * row["accuracy"], s=40)
        ax.annotate(row["method"].split(" (")[0], (row["bytes"], 100 * row["accuracy"]), fontsize=8,
                    xytext=(4, 5 if i % 2 else -11), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f} KB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ONNX file size (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (as in docs/benchmarks.md)")
    parser.add_argument("--plot", type=Path, help="write accuracy vs ONNX bytes as PNG (needs matplotlib)")
    args = parser.parse_args()
    setup()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.checkpoint, Path(tmp))
    if args.plot:
        plot(rows, args.plot, f"{args.checkpoint.name}: accuracy vs size")
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print_markdown(rows)
    else:
        print_rich(rows, args.checkpoint.name)


def _cells(r: dict) -> list[str]:
    if "bytes" not in r:
        return [r["method"], r["note"], "", "", ""]
    return [r["method"], f"{r['params']:,} ({r['params_ratio']}x)", f"{r['bytes']:,} ({r['bytes_ratio']}x)",
            f"{100 * r['accuracy']:.2f}% ({r['accuracy_delta_pp']:+.2f} pp)", f"{r['latency_ms']:.3f} ({r['speedup']}x)"]


HEADER = ["method", "stored numbers", "ONNX bytes", "held-out accuracy", f"ORT median ms (batch {BATCH})"]


def print_markdown(rows: list[dict]) -> None:
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        print("| " + " | ".join(_cells(r)) + " |")


def print_rich(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: fixclf against the alternatives (ratios to dense)", title_justify="left")
    for name in HEADER:
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
