"""How the CLI draws things: fine-tuning progress on stderr, reports and plans as rich tables on stdout."""
from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import compressor
from compressor.export import ExportResult
from compressor.report import LayerRow, ParamSummary, PlanReport, Report

out = Console(width=None if sys.stdout.isatty() else 140)  # pipes and logs get a wide table


class RichEvents(compressor.Events):
    """Stages as lines and fine-tuning as a bar (steps, loss, held-out score, samples/s), on stderr."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.console, self.quiet = console, quiet
        self.progress: Progress | None = None
        self.task = None
        self.batch_rows, self.started, self.steps, self.steps_per_epoch = 0, 0.0, 0, 1

    def stage(self, text: str) -> None:
        self.close()
        if not self.quiet:
            self.console.print(f"[bold cyan]›[/] {_safe(text)}", highlight=False)

    def finetune_start(self, epochs: int, steps_per_epoch: int, rows: int) -> None:
        if self.quiet:
            return
        self.batch_rows, self.steps_per_epoch = rows / max(1, steps_per_epoch), max(1, steps_per_epoch)
        self.started, self.steps = time.monotonic(), 0
        self.progress = Progress(
            TextColumn("  epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  held-out {task.fields[score]}  {task.fields[rate]} samples/s"),
            TimeElapsedColumn(), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("finetune", total=epochs * steps_per_epoch, epoch=0, loss=0.0, score="-",
                                           rate="-")

    def step(self, epoch: int, step: int, loss: float) -> None:
        """Step ``step`` of epoch ``epoch`` (both from 1): the bar shows the run's position, which a resumed
        run starts past zero; the rate counts this invocation's steps."""
        if self.progress is not None:
            self.steps += 1
            rate = self.steps * self.batch_rows / max(1e-9, time.monotonic() - self.started)
            self.progress.update(self.task, completed=(epoch - 1) * self.steps_per_epoch + step, epoch=epoch, loss=loss,
                                 rate=f"{rate:,.0f}")

    def epoch(self, stats) -> None:
        if self.progress is not None:
            self.progress.update(self.task, score=f"{stats.score:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _safe(text: object) -> str:
    """User-controlled text for rich: markup escaped, control characters (newlines, escapes) made spaces."""
    return escape(" ".join("".join(ch if ch.isprintable() else " " for ch in str(text)).split()))


def _bytes(n: Optional[float]) -> str:
    """A file size in decimal units (1 KB = 1000 bytes), as the README and docs quote sizes."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ratio(x: Optional[float]) -> str:
    """A ratio before / after ("-" where there is none: nothing was replaced)."""
    return "-" if x is None else f"{x}x"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _latency_cells(row: LayerRow, timed: bool) -> list[str]:
    if not timed:
        return []
    c = row.cost
    if c is None:
        return ["", ""]
    mark = " [bold red]slower[/]" if c.slower_at_batch1 else ""
    return [f"{c.dense_batch1_ms:.3f} → {c.structured_batch1_ms:.3f}{mark}",
            f"{c.dense_batch_ms:.3f} → {c.structured_batch_ms:.3f}"]


def _layers_table(layers: list[LayerRow], title: str) -> Table:
    timed = next((row.cost for row in layers if row.cost is not None), None)
    columns = ["layer", "role", "before", "after", "stored before", "stored after"]
    if timed is not None:
        columns += ["ms batch 1 (1 thread)", f"ms batch {timed.batch} (2 threads)"]
    table = Table(title=_safe(title), title_justify="left")
    for col in [*columns, "note"]:  # on a narrow terminal cells fold onto more lines rather than lose characters
        number = col.startswith(("stored", "ms"))
        table.add_column(col, justify="right" if number else "left", overflow="fold", min_width=7 if number else None)
    for row in layers:
        shape = "x".join(str(t) for t in (row.cost.tokens if row.cost else []))
        table.add_row(_safe(row.name or "(the model)"), _safe(row.role),
                      f"Linear({row.in_features}, {row.out_features})" + (f" on {shape} tokens" if shape else ""),
                      _safe(row.kind or "kept"), f"{row.params_before:,}", f"{row.params_after:,}",
                      *_latency_cells(row, timed is not None), _safe(row.reason))
    return table


def _params_line(params: ParamSummary) -> str:
    m, r = params.model, params.replaced
    return (f"stored numbers: model {m.before:,} → {m.after:,} ({_ratio(m.ratio)}); "
            f"replaced layers {r.before:,} → {r.after:,} ({_ratio(r.ratio)})")


def print_plan(result: PlanReport) -> None:
    out.print(_layers_table(result.layers, f"fixclf plan: {result.model}"))
    out.print(_params_line(result.params), highlight=False)
    _lines("note", result.notes)
    _lines("warning", result.warnings, style="yellow")


def _summary(report: Report) -> Table:
    table = Table(show_header=True, title_justify="left")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    m, r, o = report.params.model, report.params.replaced, report.onnx
    table.add_row("stored numbers (model)", f"{m.before:,}", f"{m.after:,}", _ratio(m.ratio))
    table.add_row("stored numbers (replaced layers)", f"{r.before:,}", f"{r.after:,}", _ratio(r.ratio))
    table.add_row("ONNX file", _bytes(o.bytes_before), _bytes(o.bytes_after), _ratio(o.ratio))
    if o.ort_bytes is not None:
        table.add_row("ORT file (mobile)", "", _bytes(o.ort_bytes), "")
    for label, reduced in (("int8", report.int8), ("fp16", report.fp16)):
        if reduced is not None:
            table.add_row(f"ONNX file, {label}", "", _bytes(reduced.bytes), f"top-1 agreement {reduced.top1_agreement:.1%}")
    if report.accuracy is not None:
        a = report.accuracy
        table.add_row("held-out accuracy", _pct(a.before), _pct(a.after), f"{100 * (a.after - a.before):+.2f} pp")
    for label, reduced in (("int8", report.int8), ("fp16", report.fp16)):
        if reduced is not None and reduced.accuracy is not None:
            table.add_row(f"held-out accuracy, {label}", "", _pct(reduced.accuracy), "")
    for lat in (report.latency, report.mobile_latency):
        if lat is not None:
            table.add_row(f"ORT latency median / p90 (batch {lat.after.batch}, {lat.after.threads} thread"
                          f"{'s' if lat.after.threads > 1 else ''}, spinning off)",
                          f"{lat.before.median:.3f} / {lat.before.p90:.3f} ms",
                          f"{lat.after.median:.3f} / {lat.after.p90:.3f} ms", f"{lat.speedup}x")
    return table


def _lines(prefix: str, lines: list[str], style: str | None = None) -> None:
    """One printed line per item, never wrapped by fixclf (so ``grep warning:`` finds the whole line)."""
    for line in lines:
        out.print(f"{prefix}: {_safe(line)}", style=style, highlight=False, soft_wrap=True)


def print_report(report: Report) -> None:
    out.print(_layers_table(report.layers, f"fixclf report: {report.model} → {report.output}"))
    out.print(_summary(report))
    o = report.onnx
    out.print(f"ONNX: {_safe(o.path)} ({_bytes(o.bytes_after)}: stored state {_bytes(o.stored_parameter_bytes)}, shared "
              f"transform constants {_bytes(o.constant_bytes)}); max |ONNX - PyTorch| = {o.max_abs_diff:.2e} "
              f"(relative {o.max_rel_diff:.2e}); inputs: any batch size"
              f"{' and token count' if report.options.get('dynamic_tokens') else ''}", highlight=False)
    _lines("mobile", o.mobile_notes)
    _lines("note", report.notes)
    _lines("warning", report.warnings, style="yellow")


def print_export(result: ExportResult) -> None:
    for name, written in result.files.items():
        out.print(f"wrote {_safe(written.path)} ({_bytes(written.bytes)}, {name}); max |ONNX - PyTorch| = "
                  f"{written.max_abs_diff:.2e} (relative {written.max_rel_diff:.2e}), top-1 agreement "
                  f"{written.top1_agreement:.1%}", highlight=False)
    _lines("mobile", result.mobile_notes)
    _lines("note", result.notes)
