"""Structured replacements for a classifier's dense layers, and the registry that names them.

:mod:`compressor.layers.registry` holds one :class:`LayerSpec` per kind (``hadamard`` and
``orthogonal`` heads, ``acdc`` and ``fastfood`` hidden layers): options and limits, build,
initialisation from the dense layer.
"""
from .acdc import ACDC, ACDCStack, DCTPair
from .base import StructuredLinear, count_stored, probe_affine
from .fastfood import AdaptiveFastfood
from .heads import FixedHead, HadamardHead, OrthogonalHead, hadamard_head_limit
from .registry import REGISTRY, LayerSpec, Option, kinds, register, spec_for

__all__ = [
    "ACDC",
    "ACDCStack",
    "AdaptiveFastfood",
    "DCTPair",
    "FixedHead",
    "HadamardHead",
    "OrthogonalHead",
    "StructuredLinear",
    "LayerSpec",
    "Option",
    "REGISTRY",
    "count_stored",
    "hadamard_head_limit",
    "kinds",
    "probe_affine",
    "register",
    "spec_for",
]
