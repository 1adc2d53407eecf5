"""fixclf: compress trained PyTorch classifiers with fixed Hadamard heads and structured efficient
linear layers (ACDC, Adaptive Fastfood), distil them back, and export validated ONNX.

Public API: :func:`compress`, :func:`plan_checkpoint`, :func:`export_checkpoint`,
:func:`load_report`, :func:`load_compressed_model`, the layers in :mod:`compressor.layers` and the
transforms in :mod:`compressor.transforms`.
"""
from .api import CompressOptions, Events, compress, export_checkpoint, load_compressed_model, load_report, plan_checkpoint
from .errors import FixclfError
from .layers import ACDC, ACDCStack, AdaptiveFastfood, HadamardHead, OrthogonalHead

__version__ = "0.1.0"

__all__ = [
    "ACDC",
    "ACDCStack",
    "AdaptiveFastfood",
    "CompressOptions",
    "Events",
    "FixclfError",
    "HadamardHead",
    "OrthogonalHead",
    "compress",
    "export_checkpoint",
    "load_compressed_model",
    "load_report",
    "plan_checkpoint",
]
