"""The one options tree of fixclf: every option, its default (declared once, here) and its check.

``CompressOptions`` holds what ``fixclf compress`` takes, grouped by the stage that uses it:
:class:`SourceOptions` (what to load), :class:`PlanOptions` (what to replace by what),
:class:`FinetuneOptions` (the distillation), :class:`ExportOptions` (ONNX, int8, ORT, latency);
:class:`ExportCommand` is what ``fixclf export`` takes.
``validate()`` checks every value before any work is done and raises :class:`UsageError`
(exit code 2) with one line naming the option and what is accepted. The library validates on
entry too, so Python callers get the same checks as the CLI.

Only the layer kinds come from elsewhere (:mod:`compressor.layers.registry`), so a new kind needs
no change here.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

__all__ = [
    "check_file_name",
    "check_instance",
    "BUDGET_STEPS",
    "SEED_MAX",
    "DEPTH_MAX",
    "DEVICE_PATTERN",
    "KEEP",
    "HIDDEN_INITS",
    "QUANTIZATIONS",
    "PRECISIONS",
    "OBJECTIVES",
    "SourceOptions",
    "PlanOptions",
    "FinetuneOptions",
    "ExportOptions",
    "CompressOptions",
    "ExportCommand",
]

SEED_MAX = 2**32 - 1
"""Seeds are in [0, SEED_MAX]: every RNG fixclf seeds (torch, its generators) accepts them."""
DEPTH_MAX = 64
"""ACDC layers per replaced Linear; the thesis stacks up to 12 (fig. 3.4), 64 is already absurd."""
LATENCY_BATCH_MAX = 65536
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
KEEP = "keep"
"""``--head keep`` / ``--hidden keep``: leave those layers dense."""
HIDDEN_INITS = ("thesis", "fit")
QUANTIZATIONS = ("int8",)
PRECISIONS = ("fp32", "fp16")
OBJECTIVES = ("size", "latency")
BUDGET_STEPS = 2500
"""The default fine-tune length in optimiser steps (docs/hard_samples.md: the noisy harder samples
over-fit in 5,000, and the digits, 23 steps an epoch, need more than 900 to recover with --mixup)."""


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _int_range(flag: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{flag} must be an integer in [{low}, {high}], got {value!r}")


def _number_range(flag: str, value: float, low: float, high: float, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise UsageError(f"{flag} must be a number of {unit} in [{low:g}, {high:g}], got {value!r}")


def _yes_no(flag: str, value: object, *, optional: bool = False) -> None:
    """A switch must be True or False (None too when ``optional``): a string such as "false" would
    otherwise count as on, and ``trust_pickle`` on runs a checkpoint's code."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")  # numpy not imported here
    if not (isinstance(value, bool) or numpy_bool or value is None and optional):
        raise UsageError(f"{flag} must be True or False, got {value!r:.60}")


def check_file_name(flag: str, value: object, *, optional: bool = False) -> None:
    """A file name: a non-empty str or path-like object without NUL characters (None too when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UsageError(f"{flag} must be a file name (str or pathlib.Path), got {value!r:.60}")
    if "\x00" in str(value):
        raise UsageError(f"{flag} {str(value)!r:.60} holds a NUL character, which no file name can; give the name without it")


def _patterns(flag: str, value: object) -> None:
    """Glob patterns: a list (or tuple) of non-empty strings; one string would be read letter by letter."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise UsageError(f"{flag} must be a list of non-empty glob patterns, e.g. ['features.*'], got {value!r:.60}")


def check_instance(flag: str, value: object, kind: type) -> None:
    """``value`` must be a ``kind`` (a dict or a str where the options object belongs is a UsageError)."""
    if not isinstance(value, kind):
        raise UsageError(f"{flag} must be a {kind.__module__}.{kind.__name__} object, got {type(value).__name__}")


def _positive_finite(flag: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{flag} must be a finite number > 0, got {value!r}")


@dataclass
class SourceOptions:
    """What to load. ``arch`` / ``arch_kwargs`` name the architecture of a bare state_dict (or
    confirm one named inside a checkpoint); ``data`` is a file or ``package.module:function``."""

    checkpoint: str | Path = ""
    arch: str | None = None
    arch_kwargs: dict | None = None
    trust_pickle: bool = False
    data: str | Path | None = None

    def validate(self) -> None:
        if isinstance(self.checkpoint, str) and not self.checkpoint:
            raise UsageError("no checkpoint given; pass the trained model's .pt file")
        check_file_name("the checkpoint", self.checkpoint)
        if self.arch is not None and not (isinstance(self.arch, str) or callable(self.arch)):
            raise UsageError(f"--arch must be a package.module:factory reference or the factory itself, got {self.arch!r:.60}")
        _yes_no("--trust-pickle", self.trust_pickle)
        check_file_name("--data", self.data, optional=True)
        if self.arch_kwargs is not None and self.arch is None:
            raise UsageError("--arch-kwargs is given without --arch; pass --arch package.module:factory too")
        if self.arch_kwargs is not None and not isinstance(self.arch_kwargs, dict):
            raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": 256}'")


@dataclass
class PlanOptions:
    """What replaces what: ``head`` for the Linear that makes the logits (:mod:`compressor.surgery`), ``hidden`` for the others; ``depth`` is
    ACDC's K (times ``ceil(C / N)`` for the stack feeding a head of C classes on N < C features:
    :mod:`compressor.surgery`); ``include`` / ``exclude`` are glob patterns on module names. ``objective``: ``size``
    replaces every planned layer; ``latency`` keeps dense each layer whose replacement is slower
    alone in ONNX Runtime at batch 1 at the model's real shapes (:mod:`compressor.cost`).
    ``max_drop``: ``compress`` keeps dense, one at a time, the replaced layer that costs the most
    accuracy on rows set aside from training (never the held-out rows the report quotes) and
    fine-tunes again, until the loss there plus 1.645 standard errors (a one-sided 95% bound) is
    within ``max_drop`` percentage points; failing that, the most-replaced plan whose loss alone was
    within it, with a note (:func:`compressor.api.paired_drop`)."""

    head: str = "hadamard"
    hidden: str = "acdc"
    depth: int = 2
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    objective: str = "size"
    max_drop: float | None = None  # percentage points of accuracy the compressed model may lose (compress only)

    def validate(self) -> None:
        from .layers.registry import kinds, spec_for  # the registry names the kinds; it needs torch

        if self.max_drop is not None:
            _number_range("--max-drop", self.max_drop, 0, 100, "percentage points")

        _choice("--head", self.head, (*kinds("head"), KEEP))
        _choice("--hidden", self.hidden, (*kinds("hidden"), KEEP))
        _int_range("--depth", self.depth, 1, DEPTH_MAX)
        if self.depth != PlanOptions.depth and (self.hidden == KEEP or "depth" not in spec_for("hidden", self.hidden).defaults()):
            raise UsageError(f"--depth sets the number of ACDC layers, and --hidden {self.hidden} has none; drop --depth "
                             "or use --hidden acdc")
        _choice("--objective", self.objective, OBJECTIVES)
        _patterns("--include", self.include)
        _patterns("--exclude", self.exclude)


@dataclass
class FinetuneOptions:
    """The distillation fine-tune (see :mod:`compressor.finetune` for the loss and schedule)."""

    epochs: int | None = None  # None: the fewest epochs with at least BUDGET_STEPS steps (finetune.resolved_options)
    max_time: float | None = None  # seconds, checked after every step
    lr: float = 2e-2
    batch_size: int = 64
    temperature: float = 2.0
    kept_lr_scale: float = 0.05  # layers fixclf keeps are trained: smaller steps
    init: str = "thesis"
    device: str = "cpu"
    update_norm_stats: bool = False  # kept BatchNorm layers keep their running statistics unless True
    mixup: bool | None = None  # distil on mixed rows w x + (1 - w) x', w ~ U(0, 1) (compressor.data.MixPartners);
    # None: on wherever the data has random access (not a stream)
    amp: bool = True  # on CUDA: autocast (bf16 where supported, else fp16 with gradient scaling)
    resume: bool = False  # keep a resume state beside the output and continue from it if one is there
    save_every: int | None = None  # steps between resume states (besides every epoch end)

    def validate(self) -> None:
        if self.epochs is not None:
            _int_range("--epochs", self.epochs, 1, 1_000_000)
        _positive_finite("--max-time", self.max_time, optional=True)
        _positive_finite("--lr", self.lr)
        _int_range("--batch-size", self.batch_size, 1, 1 << 20)
        _positive_finite("temperature", self.temperature)
        _positive_finite("kept-layer learning-rate scale", self.kept_lr_scale)
        _choice("--init", self.init, HIDDEN_INITS)
        _yes_no("--update-norm-stats", self.update_norm_stats)
        _yes_no("--mixup", self.mixup, optional=True)
        _yes_no("--amp", self.amp)
        _yes_no("--resume", self.resume)
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise UsageError(f"--device {self.device!r} is not cpu, cuda or cuda:N")
        if self.save_every is not None:
            _int_range("--save-every", self.save_every, 1, 1 << 40)
            if not self.resume:
                raise UsageError("--save-every keeps a resume state: pass --resume too")


@dataclass
class ExportOptions:
    """ONNX export: validation tolerance, optional int8 and ORT-format files, latency batch, whether
    the token axis stays dynamic."""

    quantize: str | None = None
    ort_format: bool = False
    tolerance: float = 1e-4
    latency_batch: int = 128
    precision: str = "fp32"  # fp16: also (compress) or instead (export) a float16 ONNX file
    dynamic_tokens: bool = False  # the ONNX file takes any sequence length (export.ExportSpec)

    def validate(self) -> None:
        if self.quantize is not None:
            _choice("--quantize", self.quantize, QUANTIZATIONS)
        _choice("--precision", self.precision, PRECISIONS)
        _yes_no("--ort", self.ort_format)
        _yes_no("--dynamic-tokens", self.dynamic_tokens)
        _positive_finite("--tolerance", self.tolerance)
        _int_range("--latency-batch", self.latency_batch, 1, LATENCY_BATCH_MAX)


@dataclass
class CompressOptions:
    """Everything ``fixclf compress`` takes. ``output`` None: ``<checkpoint stem>.fixclf.pt`` in the
    current directory; the ONNX file (and the int8 / ORT files) are written beside it."""

    source: SourceOptions = field(default_factory=SourceOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    output: str | Path | None = None
    seed: int = 0
    force: bool = False

    def validate(self) -> None:
        """Check every option; raises :class:`UsageError` (exit 2) before any work."""
        for name, kind in (("source", SourceOptions), ("plan", PlanOptions), ("finetune", FinetuneOptions),
                           ("export", ExportOptions)):
            check_instance(f"CompressOptions.{name}", getattr(self, name), kind)
        check_file_name("--output", self.output, optional=True)
        _yes_no("--force", self.force)
        self.source.validate()
        self.plan.validate()
        self.finetune.validate()
        self.export.validate()
        _int_range("--seed", self.seed, 0, SEED_MAX)
        if self.plan.max_drop is not None and self.finetune.resume:
            raise UsageError("--max-drop fine-tunes several plans in turn, --resume continues one: use one of them")
        if self.output is not None and (not str(self.output) or Path(self.output).suffix != ".pt"):
            raise UsageError(f"--output {str(self.output)!r} must be a file name ending in .pt (the ONNX file is written "
                             "beside it)")


@dataclass
class ExportCommand:
    """What ``fixclf export`` takes: a checkpoint (dense or compressed) and the ONNX file to write."""

    source: SourceOptions
    output: str | Path
    export: ExportOptions = field(default_factory=ExportOptions)
    force: bool = CompressOptions.force
    seed: int = CompressOptions.seed

    def validate(self) -> None:
        check_instance("ExportCommand.source", self.source, SourceOptions)
        check_instance("ExportCommand.export", self.export, ExportOptions)
        self.source.validate()
        self.export.validate()
        check_file_name("-o", self.output)
        if Path(self.output).suffix != ".onnx":
            raise UsageError(f"-o {self.output} must end in .onnx")
        if self.export.quantize and self.export.precision != "fp32":
            raise UsageError("--quantize int8 and --precision fp16 each make the one exported file; choose one")
        _yes_no("--force", self.force)
        _int_range("--seed", self.seed, 0, SEED_MAX)
