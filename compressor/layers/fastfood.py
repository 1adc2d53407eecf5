"""Adaptive Fastfood (Yang et al., ICCV 2015; thesis section 3.9).

One block on n features (H the orthonormal Walsh-Hadamard transform, scale 1/sqrt(n))::

    y = S H G Pi H B x       S, G, B learned diagonals (3n parameters), Pi a fixed permutation

The paper needs n = 2^k and pads to it (9216 -> 16384: 1.8x the data and work). fixclf works at
n = :func:`~compressor.transforms.kronecker_size` (in_features) = q 2^k with q odd and <= 15
(9216 = 9 x 1024: no padding; 300 -> 320) and uses for H the orthonormal
:class:`~compressor.transforms.KroneckerHadamard` C_q (x) H_(2^k) (C_q the DCT-II of order q),
which is the Walsh-Hadamard transform itself when q = 1. What Fastfood needs from H holds for it
too: it is orthonormal, costs O(n^(1/3)) multiply-adds per element, stores nothing, and spreads
every input over all outputs (entries of magnitude O(1/sqrt(n))).
``in_features`` is zero-padded to n. For ``out_features > n``,
ceil(out / n) independent blocks are stacked (each with its own S, G, B, Pi) and their outputs
concatenated; the result is sliced to ``out_features``. A learned output bias is added.
Initialisation: B random signs, G ~ N(0, 1), S = 1, so that at init each output has variance
about ||x||^2 / n, like a standard dense initialisation (a random map, not the dense layer it
replaces); ``--init fit`` first fits the diagonals to that dense layer (compressor.surgery).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..transforms import KroneckerHadamard, kronecker_size, permute_last
from .base import StructuredLinear, check_counts

__all__ = ["AdaptiveFastfood"]


class AdaptiveFastfood(StructuredLinear):
    """Adaptive Fastfood replacement of ``nn.Linear(in_features, out_features)``.

    Shapes: (..., in_features) -> (..., out_features). Stored numbers: 3 n per block plus n
    permutation indices per block plus ``out_features`` biases. ``seed`` fixes B, G and Pi
    without touching the global RNG; Pi lives in the state_dict.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        check_counts("AdaptiveFastfood", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.size = kronecker_size(in_features)
        self.blocks = math.ceil(out_features / self.size)
        generator = torch.Generator().manual_seed(seed)
        shape = (self.blocks, self.size)
        self.B = nn.Parameter(torch.randint(0, 2, shape, generator=generator).float() * 2 - 1)
        self.G = nn.Parameter(torch.randn(shape, generator=generator))
        self.S = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # One flat index over (blocks * size): block j permutes its own slice.
        offsets = torch.arange(self.blocks)[:, None] * self.size
        perms = torch.stack([torch.randperm(self.size, generator=generator) for _ in range(self.blocks)])
        self.register_buffer("permutation", (perms + offsets).reshape(-1))
        self.hadamard = KroneckerHadamard(self.size)

    def forward_rows(self, rows: torch.Tensor) -> torch.Tensor:
        h = self.hadamard(rows[:, None, :] * self.B)  # (M, blocks, n)
        h = permute_last(h.reshape(-1, self.blocks * self.size), self.permutation)
        h = self.hadamard(h.reshape(-1, self.blocks, self.size) * self.G) * self.S
        y = h.reshape(-1, self.blocks * self.size)[:, : self.out_features]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, size={self.size}, blocks={self.blocks}"
