"""The typed results of fixclf: :class:`Report` (``compress``) and :class:`PlanReport` (``plan``).

The CLI renders them and ``--json`` prints :meth:`Report.to_dict`; a compressed checkpoint stores
the same dict and :meth:`Report.from_dict` reads it back, checking every field's type (a
malformed stored report is refused, never half-rendered).

Figures: ``params`` counts stored numbers (parameters and persistent buffers) of the whole model
and of the replaced layers; ``onnx`` the exported file (bytes before / after, what it holds, the
validation difference); ``latency`` ONNX Runtime CPU latency of the original and the compressed
file, measured in alternating rounds with thread spinning off (:mod:`compressor.runtime`);
``accuracy`` held-out top-1 before, right after initialisation and after fine-tuning.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field

from .cost import LayerCost
from .runtime import Latency

__all__ = ["Counts", "ParamSummary", "LayerRow", "Accuracy", "LatencyPair", "OnnxFigures", "ReducedFigures",
           "DataSummary", "FinetuneSummary", "PlanReport", "Report", "ratio"]

MAX_ITEMS = 4_096  # layers, warnings, notes: a ViT-L has 96 Linear layers; the limit bounds reading and printing
MAX_TEXT = 4_096  # characters in one stored string (a path, a reason, a note)
MAX_TOTAL_TEXT = 2_000_000  # characters in all a report's strings: 4,096 layers with 400 characters each and more;
# shared references are counted at each use (a file of 66 KB whose rows all shared one long string printed 139 MB)


def ratio(before: float, after: float) -> float | None:
    return round(before / after, 2) if after else None


@dataclass
class Counts:
    before: int
    after: int
    ratio: float | None

    @classmethod
    def of(cls, before: int, after: int) -> "Counts":
        return cls(before, after, ratio(before, after))


@dataclass
class ParamSummary:
    """Stored numbers of the whole model and of the replaced layers alone."""

    model: Counts
    replaced: Counts


@dataclass
class LayerRow:
    """One Linear layer of the plan, as reported."""

    name: str
    role: str
    in_features: int
    out_features: int
    params_before: int
    kind: str | None
    options: dict[str, int | bool]
    params_after: int
    reason: str
    cost: LayerCost | None = None  # ORT latency of the layer alone, dense and structured (plan with data)


@dataclass
class Accuracy:
    """Held-out top-1: the original, the compressed model right after initialisation, after fine-tuning."""

    before: float
    after_init: float
    after: float


@dataclass
class LatencyPair:
    before: Latency
    after: Latency
    speedup: float | None


@dataclass
class OnnxFigures:
    path: str
    bytes_before: int
    bytes_after: int
    ratio: float | None
    stored_parameter_bytes: int
    constant_bytes: int
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    extra_files: list[str]
    mobile_notes: list[str]
    ort_bytes: int | None = None  # the .ort file (--ort), which stores the graph expanded for the mobile runtime


@dataclass
class ReducedFigures:
    path: str
    bytes: int
    top1_agreement: float
    accuracy: float | None
    latency: Latency


@dataclass
class DataSummary:
    source: str
    train: int
    held_out: int
    labels: bool


@dataclass
class FinetuneSummary:
    epochs_run: int
    steps: int
    stopped_by: str
    seconds: float  # fine-tune time of the whole run: a resumed run includes the interrupted ones' (--max-time counts it)
    world_size: int = 1
    samples_per_second: float = 0.0


@dataclass
class PlanReport:
    """What ``compress`` would replace, by what, and the stored numbers; nothing is touched."""

    model: str
    layers: list[LayerRow]
    params: ParamSummary
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    """Everything one ``compress`` run measured."""

    model: str
    output: str
    options: dict[str, int | float | str | bool | list | None]
    data: DataSummary
    params: ParamSummary
    layers: list[LayerRow]
    finetune: FinetuneSummary
    accuracy: Accuracy | None
    onnx: OnnxFigures
    latency: LatencyPair
    int8: ReducedFigures | None
    warnings: list[str]
    notes: list[str]
    seconds: float
    mobile_latency: LatencyPair | None = None  # batch 1 on 1 thread, how ONNX Runtime Mobile runs
    fp16: ReducedFigures | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "Report":
        """Rebuild a report from its dict, checking every field (TypeError / ValueError otherwise)."""
        if _text_length(data, MAX_TOTAL_TEXT) > MAX_TOTAL_TEXT:
            raise ValueError(f"it holds more than {MAX_TOTAL_TEXT:,} characters of text, more than any report fixclf writes")
        return _build(cls, data, "report")


def _text_length(value, budget: int, depth: int = 0) -> int:
    """Characters in the strings (keys included) under ``value``, counted up to just past ``budget``
    (each use of a shared string counts); depth and entry limits are checked later by :func:`_build`."""
    if isinstance(value, str):
        return len(value)
    if depth > 8 or not isinstance(value, (list, dict)):
        return 0
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    if len(items) > MAX_ITEMS * 2:  # more entries than any report holds: over budget, whatever they are
        return budget + 1
    total = 0
    for item in items:
        total += _text_length(item, budget - total, depth + 1)
        if total > budget:
            break
    return total


def _check_plain(value, where: str, depth: int = 0):
    if depth > 4:
        raise ValueError(f"{where} is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is not a finite number")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"{where} is longer than a report's text ({MAX_TEXT} characters)")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise ValueError(f"{where} has {len(value)} entries, more than a report holds ({MAX_ITEMS})")
        return [_check_plain(v, where, depth + 1) for v in value]
    raise TypeError(f"{where} holds a {type(value).__name__}")


def _convert(hint, value, where: str):
    """``value`` checked against the type ``hint`` (dataclasses, unions, list[X], dict[str, X], scalars)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(option, value, where)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{where} has an unexpected value of type {type(value).__name__}")
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} must be a list")
        if len(value) > MAX_ITEMS:
            raise ValueError(f"{where} has {len(value)} entries, more than a report holds ({MAX_ITEMS})")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{where}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where} must be a mapping")
        _, item = typing.get_args(hint)
        return {k: _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is list:
        return _check_plain(value, where)
    if hint is type(None):
        if value is not None:
            raise TypeError(f"{where} must be empty")
        return None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if (isinstance(value, int) and abs(value) > 2**63) or not math.isfinite(value) or abs(value) > 1e300:
            raise ValueError(f"{where} is not a finite number")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**63:
        raise ValueError(f"{where} is out of range")
    if hint is str and isinstance(value, str) and len(value) > MAX_TEXT:
        raise ValueError(f"{where} is longer than a report's text ({MAX_TEXT} characters)")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TypeError(f"{where} must be {hint.__name__}, got {type(value).__name__}")
    return value


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing or set(data) - set(names):
        raise ValueError(f"{where} has fields {sorted(data)}, expected {names}")
    return cls(**{n: _convert(hints[n], data[n], f"{where}.{n}") for n in names if n in data})
