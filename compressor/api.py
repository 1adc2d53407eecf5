"""The public pipeline: one call per CLI command (DESIGN: load -> plan -> surgery -> fine-tune ->
evaluate -> save -> export -> report).

>>> from compressor import compress, CompressOptions
>>> report = compress(CompressOptions("sample_models/mlp.pt", head="hadamard", hidden="acdc"))
>>> report["params"]["replaced"]["ratio"], report["accuracy"]
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import COMPRESSED_FORMAT, LoadedModel, check_output_path, load_model, save_checkpoint
from .data import Dataset, check_against_model, load_data
from .errors import DataError, UsageError
from .export import DEFAULT_TOLERANCE, ExportResult, export_onnx
from .finetune import EpochStats, FinetuneConfig, distill, evaluate
from .layers import count_stored
from .report import find_latest_report, measure_latency, onnx_accuracy, ratio, summarise_layers
from .surgery import apply_plan, check_hidden_init, initialise_from_dense, make_plan

__all__ = ["CompressOptions", "Events", "compress", "plan_checkpoint", "export_checkpoint", "load_report", "load_compressed_model"]

CALIBRATION_ROWS = 1024
VALIDATION_ROWS = 256


@dataclass
class CompressOptions:
    """Everything ``fixclf compress`` takes. ``output`` None: ``<checkpoint stem>.fixclf.pt`` in the cwd."""

    checkpoint: str | Path
    head: str = "hadamard"
    hidden: str = "acdc"
    depth: int = 2
    hidden_init: str = "thesis"
    data: str | Path | None = None
    epochs: int = 40
    max_time: float | None = None
    lr: float = 2e-2
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    output: str | Path | None = None
    seed: int = 0
    device: str = "cpu"
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False
    quantize: str | None = None
    ort_format: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    latency_batch: int = 128
    force: bool = False


class Events:
    """Progress hooks; the CLI overrides them to draw rich progress. All are no-ops here."""

    def stage(self, text: str) -> None: ...

    def finetune_start(self, epochs: int, steps_per_epoch: int) -> None: ...

    def step(self, epoch: int, step: int, loss: float) -> None: ...

    def epoch(self, stats: EpochStats) -> None: ...


def _load(options) -> LoadedModel:
    return load_model(options.checkpoint, arch=options.arch, arch_kwargs=options.arch_kwargs, trust_pickle=options.trust_pickle)


def _data_for(loaded: LoadedModel, spec, seed: int) -> Dataset:
    source = spec or loaded.data
    if source is None:
        raise DataError(
            f"{loaded.path} comes with no data: pass --data FILE.npz (x: input samples, y: labels, optional); fixclf "
            "needs real inputs to fine-tune the new layers by distillation and to validate the ONNX export"
        )
    return load_data(source, seed=seed)


def _plan(loaded: LoadedModel, options: CompressOptions) -> list:
    return make_plan(loaded.model, head=options.head, hidden=options.hidden, depth=options.depth,
                     include=options.include, exclude=options.exclude, seed=options.seed)


def _params_summary(original: nn.Module, layers: list[dict]) -> dict:
    """Stored numbers of the whole model and of the replaced layers, before and after."""
    before = count_stored(original)
    replaced = summarise_layers(layers)
    after = before - replaced["before"] + replaced["after"]
    return {"before": before, "after": after, "ratio": ratio(before, after), "replaced": replaced}


def plan_checkpoint(options: CompressOptions) -> dict:
    """What ``compress`` would replace, by what, and the parameter counts; touches nothing."""
    loaded = _load(options)
    layers = [p.as_dict() for p in _plan(loaded, options)]
    return {"model": str(loaded.path), "layers": layers, "params": _params_summary(loaded.model, layers)}


def _outputs(options: CompressOptions) -> tuple[Path, Path, Path | None]:
    checkpoint = Path(options.checkpoint)
    output = Path(options.output) if options.output else Path(f"{checkpoint.stem}.fixclf.pt")
    if output.suffix != ".pt":
        raise UsageError(f"--output {output} must end in .pt (the ONNX file is written beside it)")
    onnx_path = output.with_suffix(".onnx")
    int8_path = output.with_suffix(".int8.onnx") if options.quantize else None
    ort_path = onnx_path.with_suffix(".ort") if options.ort_format else None
    for path in (output, onnx_path, int8_path, ort_path):
        if path is not None:
            check_output_path(path, [checkpoint], options.force)
    return output, onnx_path, int8_path


def _export_pair(original: nn.Module, compressed: nn.Module, data: Dataset, options: CompressOptions,
                 onnx_path: Path, int8_path: Path | None, events: Events) -> tuple[dict, list[Path]]:
    """Export original (to a temporary file) and compressed models; sizes, latency, int8 figures."""
    samples = data.x_val[:VALIDATION_ROWS]
    timing = data.x_val[: options.latency_batch]
    written: list[Path] = []
    figures: dict = {}
    original_tmp = onnx_path.with_name(f".{onnx_path.stem}.original.onnx")
    try:
        events.stage("Exporting the original model to ONNX")
        before = export_onnx(original, samples, original_tmp, tolerance=options.tolerance)
        events.stage("Exporting the compressed model to ONNX")
        after = export_onnx(compressed, samples, onnx_path, tolerance=options.tolerance, ort_format=options.ort_format)
        written += [onnx_path, *map(Path, after.extra_files)]
        events.stage("Measuring ONNX Runtime latency")
        figures["latency_ms"] = {
            "before": measure_latency(original_tmp, timing),
            "after": measure_latency(onnx_path, timing),
        }
        figures["latency_ms"]["speedup"] = ratio(figures["latency_ms"]["before"]["median"], figures["latency_ms"]["after"]["median"])
        figures["onnx_bytes"] = {"before": before.bytes, "after": after.bytes, "ratio": ratio(before.bytes, after.bytes)}
        figures["onnx"] = {
            "path": str(onnx_path),
            "stored_parameter_bytes": after.stored_parameter_bytes,
            "constant_bytes": after.constant_bytes,
            "max_abs_diff": after.max_abs_diff,
            "max_rel_diff": after.max_rel_diff,
            "tolerance": options.tolerance,
            "extra_files": after.extra_files,
        }
        if int8_path is not None:
            events.stage("Quantising the compressed model to int8")
            int8 = export_onnx(compressed, samples, int8_path, quantize="int8")
            written.append(int8_path)
            figures["onnx_bytes"]["after_int8"] = int8.bytes
            figures["int8"] = {"path": str(int8_path), "top1_agreement": int8.top1_agreement,
                               "latency_ms": measure_latency(int8_path, timing)}
            if data.y_val is not None:
                figures["int8"]["accuracy"] = onnx_accuracy(int8_path, data.x_val, data.y_val)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        original_tmp.unlink(missing_ok=True)
    return figures, written


def compress(options: CompressOptions, events: Events | None = None) -> dict:
    """Compress a checkpoint end to end; returns the report (also stored in the output checkpoint)."""
    events = events or Events()
    started = time.monotonic()
    events.stage(f"Loading {options.checkpoint}")
    loaded = _load(options)
    plan = _plan(loaded, options)
    if options.device != "cpu" and not (options.device.startswith("cuda") and torch.cuda.is_available()):
        raise UsageError(f"--device {options.device} is not available on this machine; use --device cpu")
    check_hidden_init(options.hidden_init)
    if loaded.arch is None:
        raise UsageError(
            f"{options.checkpoint} is a whole pickled model with no architecture reference, so its compressed checkpoint "
            "could not be reloaded safely; also pass --arch package.module:factory naming its architecture"
        )
    output, onnx_path, int8_path = _outputs(options)
    data = _data_for(loaded, options.data, options.seed)
    check_against_model(data, loaded.model)

    original = loaded.model
    torch.manual_seed(options.seed)
    compressed = apply_plan(copy.deepcopy(original), plan)
    events.stage("Initialising the structured layers from the dense ones")
    initialise_from_dense(original, compressed, plan, data.x_train[:CALIBRATION_ROWS], hidden_init=options.hidden_init)
    accuracy: dict = {}
    if data.has_labels:
        accuracy["before"] = evaluate(original, data.x_val, data.y_val)
        accuracy["after_fit"] = evaluate(compressed, data.x_val, data.y_val)

    config = FinetuneConfig(epochs=options.epochs, max_time=options.max_time, lr=options.lr, seed=options.seed, device=options.device)
    events.stage("Fine-tuning by distillation from the original")
    events.finetune_start(options.epochs, -(-data.x_train.shape[0] // config.batch_size))
    tuned = distill(compressed, original, data, config, on_step=events.step, on_epoch=events.epoch)
    compressed.cpu()
    original.cpu()
    if data.has_labels:
        accuracy["after"] = evaluate(compressed, data.x_val, data.y_val)
    figures, written = _export_pair(original, compressed, data, options, onnx_path, int8_path, events)

    layers = [p.as_dict() for p in plan]
    report = {
        "model": str(options.checkpoint),
        "output": str(output),
        "options": {"head": options.head, "hidden": options.hidden, "depth": options.depth, "init": options.hidden_init,
                    "seed": options.seed,
                    "epochs": options.epochs, "max_time": options.max_time, "lr": options.lr},
        "data": {"source": data.source, "train": int(data.x_train.shape[0]), "held_out": int(data.x_val.shape[0]),
                 "labels": data.has_labels},
        "params": _params_summary(original, layers),
        "accuracy": accuracy,
        "finetune": {"epochs_run": len(tuned.epochs), "stopped_by": tuned.stopped_by,
                     "seconds": round(tuned.epochs[-1].seconds, 2) if tuned.epochs else 0.0},
        "layers": layers,
        **figures,
        "seconds": round(time.monotonic() - started, 2),
    }
    events.stage(f"Saving {output}")
    source = Path(str(options.data or loaded.data))
    data_ref = str(source.resolve()) if source.is_file() else None  # so report/export find it again
    try:
        save_checkpoint(output, {
            "format": COMPRESSED_FORMAT, "arch": loaded.arch, "kwargs": loaded.kwargs, "plan": layers,
            "state_dict": compressed.state_dict(), "report": report, "data": data_ref,
        })
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return report


def load_compressed_model(path: str | Path) -> nn.Module:
    """One line to get a compressed model back: ``model = load_compressed_model("mlp.fixclf.pt")``."""
    return load_model(path).model


def load_report(path: str | Path | None = None) -> dict:
    """The report stored in a compressed checkpoint (None: the newest ``*.fixclf.pt`` in the cwd)."""
    if path is None:
        path = find_latest_report(".")
        if path is None:
            raise UsageError("no *.fixclf.pt in this directory; pass the compressed checkpoint: fixclf report PATH")
    loaded = load_model(path)
    if not loaded.compressed or loaded.report is None:
        raise UsageError(f"{path} is not a fixclf compressed checkpoint; run fixclf compress on it first")
    return loaded.report


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, data: str | Path | None = None,
                      arch: str | None = None, arch_kwargs: dict | None = None, trust_pickle: bool = False,
                      quantize: str | None = None, ort_format: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                      force: bool = False, seed: int = 0) -> ExportResult:
    """Export any accepted checkpoint (dense or compressed) to validated ONNX at ``output``."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise UsageError(f"-o {output} must end in .onnx")
    check_output_path(output, [Path(checkpoint)], force)
    if ort_format:
        check_output_path(output.with_suffix(".ort"), [Path(checkpoint)], force)
    loaded = load_model(checkpoint, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
    dataset = _data_for(loaded, data, seed)
    check_against_model(dataset, loaded.model)
    return export_onnx(loaded.model, dataset.x_val[:VALIDATION_ROWS], output, quantize=quantize,
                       ort_format=ort_format, tolerance=tolerance)
