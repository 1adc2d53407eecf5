"""Structured replacements for a classifier's dense layers, and the registries that name them.

``HEADS`` maps a ``--head`` name to a fixed-classifier class built as ``cls(in_features,
num_classes, seed=...)``; ``HIDDEN`` maps a ``--hidden`` name to a structured linear class built
as ``cls(in_features, out_features, **options)``.
"""
from .acdc import ACDC, ACDCStack, DCTPair
from .base import StructuredLinear, count_stored, probe_affine
from .fastfood import AdaptiveFastfood
from .heads import FixedHead, HadamardHead, OrthogonalHead

HEADS: dict[str, type[FixedHead]] = {"hadamard": HadamardHead, "orthogonal": OrthogonalHead}
HIDDEN: dict[str, type[StructuredLinear]] = {"acdc": ACDCStack, "fastfood": AdaptiveFastfood}

__all__ = [
    "ACDC",
    "ACDCStack",
    "AdaptiveFastfood",
    "DCTPair",
    "FixedHead",
    "HadamardHead",
    "OrthogonalHead",
    "StructuredLinear",
    "HEADS",
    "HIDDEN",
    "count_stored",
    "probe_affine",
]
