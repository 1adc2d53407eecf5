"""ACDC structured efficient linear layers (Moczulski et al., ICLR 2016; thesis section 3.10).

One layer, n features (the orthonormal DCT-II written C, its inverse C^T)::

    y = C^T (d * C (a * x) + bias)          a, d, bias in R^n: 3n parameters, O(n^(4/3)) work

with ``a`` and ``d`` learned diagonals initialised N(1, sigma^2) (thesis: sigma = 0.061 for
CaffeNet; standard linear initialisations fail for deep stacks, fig. 3.4) and the bias added to D
as in the thesis. A stack of K layers interleaves ReLU and fixed random permutations (so the
DCT bases of consecutive layers are incoherent)::

    x_{k+1} = P_k relu(ACDC_k(x_k)),   the last layer has neither ReLU nor permutation.

``in_features != out_features``: the stack works at n = dct_size(max(in, out)) >= max(in, out);
the input is zero-padded to n and the output sliced to ``out_features``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..transforms import DCT2, DCT3, dct_size, permute_last, rows_first, use_fft
from .base import StructuredLinear, check_counts

__all__ = ["ACDC", "ACDCStack", "DCTPair"]


class DCTPair(nn.Module):
    """The DCT-II and DCT-III of one size, shared by every ACDC layer of a stack."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.dct, self.idct = DCT2(n), DCT3(n)


class ACDC(StructuredLinear):
    """One ACDC layer ``y = C^T (d * C (a * x) + bias)`` on ``features`` features.

    Shapes: (..., features) -> (..., features). When ``features`` is not a size the fast DCT
    supports (even, with balanced factors: :func:`compressor.transforms.dct_size`), the layer
    works at the next such size, zero-padding its input and slicing its output.
    ``transforms`` lets a stack share one :class:`DCTPair` between its layers.
    """

    def __init__(
        self,
        features: int,
        *,
        sigma: float = 0.061,
        bias: bool = True,
        generator: torch.Generator | None = None,
        transforms: DCTPair | None = None,
    ) -> None:
        super().__init__()
        check_counts("ACDC", features=features)
        self.in_features = self.out_features = features
        self.size = dct_size(features)
        self.transforms = transforms if transforms is not None else DCTPair(self.size)
        if self.transforms.dct.n != self.size:
            raise ValueError(f"shared transforms have size {self.transforms.dct.n}, this layer needs {self.size}")
        self.a = nn.Parameter(1 + sigma * torch.randn(self.size, generator=generator))
        self.d = nn.Parameter(1 + sigma * torch.randn(self.size, generator=generator))
        self.bias = nn.Parameter(torch.zeros(self.size)) if bias else None

    def forward_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return _through_layers(rows, [self], [], self.out_features)

    def rows_step(self, v: torch.Tensor) -> torch.Tensor:
        """The layer on rows (M, n) given in the DCT's input order, ``v = x[..., g]`` (g =
        ``dct.gather_in``), returning ``y[..., g]``, through ``torch.fft`` in the half-complex layout,
        into which d and bias move (n numbers). Works in float32 at least (FFTs of reduced precision
        need power-of-two sizes). The gathers in and out are left to the caller, so that a stack
        folds them into its permutations."""
        dct, idct = self.transforms.dct, self.transforms.idct
        work = torch.promote_types(v.dtype, torch.float32)
        layout = dct.rfft_of_reordered(v.to(work) * rows_first(self.a, dct.gather_in).to(work))
        layout = layout * dct.half_complex_layout(self.d.to(work), negate_im=False)
        if self.bias is not None:
            layout = layout + dct.half_complex_layout(self.bias.to(work))
        return idct.irfft_reordered(layout).to(v.dtype)

    def features_step(self, v: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`rows_step` on the feature-major layout (n, M), through the MatMul chains (what
        exports) of the stage ``blocks`` (``dct.stage_blocks()``, shared by the DCT-II and DCT-III):
        a, d and bias multiply or add to rows, d and bias moved into the chain's order (n numbers
        each) rather than the activations out of it."""
        dct = self.transforms.dct
        z = dct.chain(v * rows_first(self.a, dct.gather_in)[:, None], blocks) * rows_first(self.d, dct.order)[:, None]
        if self.bias is not None:
            z = z + rows_first(self.bias, dct.order)[:, None]
        return self.transforms.idct.chain_transposed(z, blocks)


def _through_layers(rows: torch.Tensor, layers: list[ACDC], links: list[torch.Tensor], out_features: int,
                    relu: bool = True) -> torch.Tensor:
    """Rows (M, n) through ACDC layers in the DCT's input order g: gather g once, run each layer,
    between layers k and k + 1 apply ReLU and the one index ``links[k]`` (g_out, the stack's
    permutation and g in one), and finally gather g_out (sliced to ``out_features``).

    Eager PyTorch (training) runs each layer on rows through ``torch.fft``; a traced model (ONNX)
    transposes once to the feature-major layout (n, M), where every gather moves whole rows and
    every DCT stage is one batched MatMul over M, and transposes back at the end.
    """
    dct = layers[0].transforms.dct
    fft = use_fft() and rows.shape[0] > 0  # torch.fft refuses zero rows; the MatMul chains take them
    gather = permute_last if fft else rows_first
    v = gather(rows if fft else rows.T, dct.gather_in)
    blocks = None if fft else dct.stage_blocks()
    for k, layer in enumerate(layers):
        v = layer.rows_step(v) if fft else layer.features_step(v, blocks)
        if k < len(links):
            v = gather(torch.relu(v) if relu else v, links[k])
    v = gather(v, dct.gather_out[:out_features])
    return v if fft else v.T


class ACDCStack(StructuredLinear):
    """K ACDC layers with ReLU and fixed random permutations between them, replacing
    ``nn.Linear(in_features, out_features)``.

    Parameters: 3n per layer (n = dct_size(max(in, out))) plus (K - 1) stored permutations of
    n indices. ``relu=False`` gives a purely linear stack (its :meth:`dense_equivalent` is exact).
    ``seed`` fixes the initial diagonals and the permutations without touching the global RNG;
    the permutations live in the state_dict, so a reloaded stack computes the same function.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int = 2,
        *,
        sigma: float = 0.061,
        bias: bool = True,
        relu: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_counts("ACDCStack", in_features=in_features, out_features=out_features, depth=depth)
        self.in_features, self.out_features, self.depth, self.relu = in_features, out_features, depth, relu
        self.size = dct_size(max(in_features, out_features))
        generator = torch.Generator().manual_seed(seed)
        shared = DCTPair(self.size)
        self.layers = nn.ModuleList(
            ACDC(self.size, sigma=sigma, bias=bias, generator=generator, transforms=shared) for _ in range(depth)
        )
        perms = [torch.randperm(self.size, generator=generator) for _ in range(depth - 1)]
        self.register_buffer("permutations", torch.stack(perms) if perms else torch.zeros(0, self.size, dtype=torch.long))

    def forward_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """x_{k+1} = P_k relu(ACDC_k(x_k)), computed with K + 1 gathers instead of 3K - 1: each layer
        works in the DCT's input order g, so the gather out of layer k, P_k and the gather into layer
        k + 1 are one index, g_out[P_k][g] (ReLU commutes with them), and the final gather also slices
        the output. Exactly the same function."""
        g_in, g_out = self.layers[0].transforms.dct.gather_in, self.layers[0].transforms.dct.gather_out
        links = [rows_first(rows_first(g_out, self.permutations[k]), g_in) for k in range(self.depth - 1)]
        return _through_layers(rows, list(self.layers), links, self.out_features, self.relu)

    def dense_equivalent(self) -> nn.Linear:
        """Exact dense form; defined only for a linear stack (depth 1, or ``relu=False``)."""
        if self.relu and self.depth > 1:
            raise ValueError("an ACDC stack with ReLU between layers has no dense equivalent; build it with relu=False")
        return super().dense_equivalent()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, depth={self.depth}, size={self.size}, relu={self.relu}"
