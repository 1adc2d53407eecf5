"""fixclf command line. Each command parses options, calls one function of ``compressor`` and
prints: progress and errors on stderr, results on stdout (a rich table, or JSON with ``--json``).

Errors print one line ``error: ...`` and exit with the code of their class (compressor.errors);
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import compressor
from compressor.errors import FixclfError, Interrupted, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress trained PyTorch classifiers: fixed Hadamard head, ACDC / Fastfood hidden layers, "
    "brief distillation, validated ONNX.",
)
# Pipes and logs get a wide table rather than rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
T = TypeVar("T")
STATE = {"debug": False}
DEFAULTS = compressor.CompressOptions(checkpoint="")


def _run(call: Callable[[], T]) -> T:
    """Run a library call; turn its errors into one line and an exit code (traceback with --debug)."""
    try:
        return call()
    except KeyboardInterrupt:
        if STATE["debug"]:
            raise
        err.print("error: interrupted; nothing was written", style="red", highlight=False, soft_wrap=True)
        raise typer.Exit(Interrupted.exit_code) from None
    except FixclfError as exc:
        if STATE["debug"]:
            raise
        err.print(f"error: {exc}", style="red", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _arch_kwargs(text: Optional[str]) -> Optional[dict]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-kwargs is not valid JSON ({exc.msg}); example: '{{\"hidden\": 256}}'") from exc
    if not isinstance(value, dict):
        raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": 256}'")
    return value


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    STATE["debug"] = debug


class _RichEvents(compressor.Events):
    """Draws fine-tuning progress on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None

    def stage(self, text: str) -> None:
        self.close()
        if not self.quiet:
            err.print(f"[bold cyan]›[/] {text}")

    def finetune_start(self, epochs: int, steps_per_epoch: int) -> None:
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("  epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  held-out {task.fields[score]}"), TimeElapsedColumn(),
            console=err, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("finetune", total=epochs * steps_per_epoch, epoch=0, loss=0.0, score="-")

    def step(self, epoch: int, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, epoch=epoch, loss=loss)

    def epoch(self, stats) -> None:
        if self.progress is not None:
            self.progress.update(self.task, score=f"{stats.score:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _layers_table(layers: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("layer", "role", "before", "after", "params before", "params after", "note"):
        table.add_column(col, justify="right" if col.startswith("params") else "left")
    for p in layers:
        after = p["kind"] or "kept"
        table.add_row(p["name"], p["role"], f"Linear({p['in_features']}, {p['out_features']})", after,
                      f"{p['params_before']:,}", f"{p['params_after']:,}", p.get("reason", ""))
    return table


def _print_report(report: dict) -> None:
    out.print(_layers_table(report["layers"], f"fixclf report: {report['model']} → {report['output']}"))
    summary = Table(show_header=True, title_justify="left")
    for col in ("", "before", "after", "ratio"):
        summary.add_column(col, justify="right")
    p, r = report["params"], report["params"]["replaced"]
    summary.add_row("parameters (model)", f"{p['before']:,}", f"{p['after']:,}", f"{p['ratio']}x")
    summary.add_row("parameters (replaced layers)", f"{r['before']:,}", f"{r['after']:,}", f"{r['ratio']}x")
    b = report.get("onnx_bytes", {})
    summary.add_row("ONNX file", _fmt_bytes(b.get("before")), _fmt_bytes(b.get("after")), f"{b.get('ratio')}x")
    if "after_int8" in b:
        summary.add_row("ONNX file, int8", "", _fmt_bytes(b["after_int8"]), "")
    acc = report.get("accuracy", {})
    if acc:
        delta = 100 * (acc["after"] - acc["before"])
        summary.add_row("held-out accuracy", _pct(acc["before"]), _pct(acc["after"]), f"{delta:+.2f} pp")
    if "int8" in report and "accuracy" in report["int8"]:
        summary.add_row("held-out accuracy, int8", "", _pct(report["int8"]["accuracy"]), "")
    lat = report.get("latency_ms")
    if lat:
        summary.add_row(
            f"ORT latency median / p90 (batch {lat['after']['batch']}, {lat['after']['threads']} threads)",
            f"{lat['before']['median']:.3f} / {lat['before']['p90']:.3f} ms",
            f"{lat['after']['median']:.3f} / {lat['after']['p90']:.3f} ms", f"{lat['speedup']}x")
    out.print(summary)
    if "onnx" in report:
        o = report["onnx"]
        out.print(f"ONNX: {o['path']} ({_fmt_bytes(report['onnx_bytes']['after'])}: stored state "
                  f"{_fmt_bytes(o['stored_parameter_bytes'])}, shared transform constants {_fmt_bytes(o['constant_bytes'])}); "
                  f"max |ONNX - PyTorch| = {o['max_abs_diff']:.2e} (relative {o['max_rel_diff']:.2e})", highlight=False)


def _emit(result: dict, as_json: bool, printer: Callable[[dict], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        printer(result)


ARCH = typer.Option(None, "--arch", help="Architecture of a bare state_dict, as package.module:factory.")
ARCH_KW = typer.Option(None, "--arch-kwargs", help="JSON object of keyword arguments for --arch.")
TRUST = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that is a whole pickled model (can run code).")
HEAD = typer.Option(DEFAULTS.head, "--head", help="Replacement of the classification layer: hadamard, orthogonal or keep.")
HIDDEN = typer.Option(DEFAULTS.hidden, "--hidden", help="Replacement of hidden Linear layers: acdc, fastfood or keep.")
DEPTH = typer.Option(DEFAULTS.depth, "--depth", help="ACDC layers per replaced Linear (K).")
INCLUDE = typer.Option(None, "--include", help="Replace only Linear layers whose name matches (glob; repeatable).")
EXCLUDE = typer.Option(None, "--exclude", help="Keep Linear layers whose name matches (glob; repeatable).")
SEED = typer.Option(DEFAULTS.seed, "--seed", help="Seed of the fixed permutations, signs, initialisation and data order.")
JSON_OUT = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.")
QUANTIZE = typer.Option(None, "--quantize", help="Also write an int8 ONNX file (dynamic quantisation of the dense layers): int8.")
ORT_FORMAT = typer.Option(False, "--ort", help="Also write the ONNX Runtime mobile format (.ort) and check mobile usability.")
TOLERANCE = typer.Option(DEFAULTS.tolerance, "--tolerance", help="Max relative |ONNX - PyTorch| accepted at export.")
FORCE = typer.Option(False, "--force", help="Overwrite existing outputs.")


@app.command()
def compress(
    checkpoint: Path = typer.Argument(..., help="Trained checkpoint (.pt)."),
    head: str = HEAD,
    hidden: str = HIDDEN,
    depth: int = DEPTH,
    hidden_init: str = typer.Option(DEFAULTS.hidden_init, "--init", help="Hidden layers start from the thesis' near-identity "
                                    "(thesis) or are first fitted to the dense layers by least squares (fit)."),
    data: Optional[str] = typer.Option(None, "--data", help="Data: .npz/.pt with x (and y, x_val, y_val) or module:function. "
                                       "Not needed for checkpoints that bundle data (the samples)."),
    epochs: int = typer.Option(DEFAULTS.epochs, "--epochs", help="Fine-tuning epochs (at most)."),
    max_time: Optional[float] = typer.Option(None, "--max-time", help="Fine-tuning time budget in seconds."),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", help="Fine-tuning learning rate (Adam)."),
    include: Optional[List[str]] = INCLUDE,
    exclude: Optional[List[str]] = EXCLUDE,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Compressed checkpoint to write (.pt); the .onnx goes beside it. "
                                          "Default: ./<name>.fixclf.pt"),
    seed: int = SEED,
    device: str = typer.Option(DEFAULTS.device, "--device", help="Fine-tuning device: cpu or cuda."),
    quantize: Optional[str] = QUANTIZE,
    ort_format: bool = ORT_FORMAT,
    tolerance: float = TOLERANCE,
    latency_batch: int = typer.Option(DEFAULTS.latency_batch, "--latency-batch", help="Batch size of the latency measurement."),
    force: bool = FORCE,
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KW,
    trust_pickle: bool = TRUST,
    as_json: bool = JSON_OUT,
) -> None:
    """Replace the head and hidden FC layers, fine-tune by distillation, save, export ONNX and report."""
    events = _RichEvents(quiet=as_json)

    def call() -> dict:
        options = compressor.CompressOptions(
            checkpoint=checkpoint, head=head, hidden=hidden, depth=depth, hidden_init=hidden_init, data=data,
            epochs=epochs, max_time=max_time,
            lr=lr, include=include or [], exclude=exclude or [], output=output, seed=seed, device=device,
            arch=arch, arch_kwargs=_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle, quantize=quantize,
            ort_format=ort_format, tolerance=tolerance, latency_batch=latency_batch, force=force,
        )
        try:
            return compressor.compress(options, events)
        finally:
            events.close()

    _emit(_run(call), as_json, _print_report)


@app.command()
def plan(
    checkpoint: Path = typer.Argument(..., help="Trained checkpoint (.pt)."),
    head: str = HEAD,
    hidden: str = HIDDEN,
    depth: int = DEPTH,
    include: Optional[List[str]] = INCLUDE,
    exclude: Optional[List[str]] = EXCLUDE,
    seed: int = SEED,
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KW,
    trust_pickle: bool = TRUST,
    as_json: bool = JSON_OUT,
) -> None:
    """Show which layers compress would replace by what, and the parameter counts; changes nothing."""
    def call() -> dict:
        return compressor.plan_checkpoint(compressor.CompressOptions(
            checkpoint=checkpoint, head=head, hidden=hidden, depth=depth, include=include or [], exclude=exclude or [],
            seed=seed, arch=arch, arch_kwargs=_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle))

    def show(result: dict) -> None:
        out.print(_layers_table(result["layers"], f"fixclf plan: {result['model']}"))
        p, r = result["params"], result["params"]["replaced"]
        out.print(f"parameters: model {p['before']:,} → {p['after']:,} ({p['ratio']}x); "
                  f"replaced layers {r['before']:,} → {r['after']:,} ({r['ratio']}x)")

    _emit(_run(call), as_json, show)


@app.command()
def report(
    path: Optional[Path] = typer.Argument(None, help="Compressed checkpoint; default: the newest *.fixclf.pt here."),
    as_json: bool = JSON_OUT,
) -> None:
    """Print the report of a compressed checkpoint: layers, parameters, ONNX bytes, accuracy, latency."""
    _emit(_run(lambda: compressor.load_report(path)), as_json, _print_report)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to export (dense or compressed)."),
    output: Path = typer.Option(..., "--output", "-o", help="ONNX file to write."),
    data: Optional[str] = typer.Option(None, "--data", help="Inputs to validate the export on (default: the checkpoint's bundled data)."),
    quantize: Optional[str] = QUANTIZE,
    ort_format: bool = ORT_FORMAT,
    tolerance: float = TOLERANCE,
    force: bool = FORCE,
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KW,
    trust_pickle: bool = TRUST,
    as_json: bool = JSON_OUT,
) -> None:
    """Export a checkpoint to ONNX (opset 18, dynamic batch), validated against PyTorch in ONNX Runtime."""
    def call() -> dict:
        return compressor.export_checkpoint(
            checkpoint, output, data=data, arch=arch, arch_kwargs=_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle,
            quantize=quantize, ort_format=ort_format, tolerance=tolerance, force=force).as_dict()

    def show(result: dict) -> None:
        out.print(f"wrote {result['path']} ({_fmt_bytes(result['bytes'])}); max |ONNX - PyTorch| = "
                  f"{result['max_abs_diff']:.2e} (relative {result['max_rel_diff']:.2e})", highlight=False)
        for extra in result["extra_files"]:
            out.print(f"wrote {extra} ({_fmt_bytes(Path(extra).stat().st_size)})", highlight=False)
        for note in result["mobile_notes"]:
            out.print(f"mobile: {note}", highlight=False, markup=False)

    _emit(_run(call), as_json, show)


if __name__ == "__main__":
    app()
