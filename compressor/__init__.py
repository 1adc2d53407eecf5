"""fixclf: compress trained PyTorch classifiers with fixed Hadamard heads and structured efficient
linear layers (ACDC, Adaptive Fastfood), distil them back, and export validated ONNX.

Public API: :func:`compress` (-> :class:`Report`), :func:`plan_checkpoint` (-> :class:`PlanReport`),
:func:`export_checkpoint`, :func:`load_report`, :func:`load_compressed_model`; the options tree
(:class:`CompressOptions` and its parts); the layers in :mod:`compressor.layers` and the transforms in
:mod:`compressor.transforms`.

Names are imported on first use (PEP 562), so ``compressor.options`` and ``compressor.errors`` load
without torch: the CLI checks its options, and handles Ctrl-C, before the heavy imports.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_WHERE = {
    "Events": "api", "ExportCommand": "options", "compress": "api", "export_checkpoint": "api",
    "load_compressed_model": "api", "load_report": "api", "plan_checkpoint": "api",
    "FixclfError": "errors",
    "ACDC": "layers", "ACDCStack": "layers", "AdaptiveFastfood": "layers", "HadamardHead": "layers",
    "OrthogonalHead": "layers",
    "CompressOptions": "options", "ExportOptions": "options", "FinetuneOptions": "options", "PlanOptions": "options",
    "SourceOptions": "options",
    "PlanReport": "report", "Report": "report",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
