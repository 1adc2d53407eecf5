"""Fast orthonormal transforms that train in PyTorch and export to small, fast ONNX.

Every transform here acts on the last dimension of a tensor of any batch shape
``(..., n)`` and is written only with real MatMul, elementwise Mul/Add, Reshape,
Transpose, Slice and Concat, so that

* autograd works without custom backward code,
* ``torch.onnx.export(dynamo=True)`` emits standard ONNX ops (no complex tensors,
  no ``DFT``), and
* the constants are O(n): Kronecker factors of size about sqrt(n), never an
  n x n matrix.

Walsh-Hadamard (Sylvester order), ``n = a * b`` with a, b powers of two::

    H_n = H_a (x) H_b   =>   H_n x = vec(H_a X H_b),  X = x.reshape(a, b)

DCT-II (orthonormal, as ``scipy.fft.dct(norm="ortho")``) by Makhoul's reordering
plus a real-arithmetic "four-step" FFT with ``n = a * b`` (thesis section 3.10
uses DCT-II for ACDC)::

    v = [x_0, x_2, ..., x_{n-2}, x_{n-1}, ..., x_3, x_1]          (no constants)
    V[k] = sum_m v[m] exp(-2 pi i m k / n)
    X[k] = s_k Re(exp(-i pi k / (2n)) V[k]),  s_0 = sqrt(1/n), s_k = sqrt(2/n)

    with m = b*m1 + m2, k = k1 + a*k2:
    V[k1 + a k2] = sum_m2 W_n^(m2 k1) W_b^(m2 k2) sum_m1 v[b m1 + m2] W_a^(m1 k1)

The half-sample shift exp(-i pi k/(2n)) splits into a k1 factor (folded into the
twiddles) and a k2 factor (folded into the last DFT matrix), so the DCT is:
one gather (Makhoul order and the first transpose in one index), one real MatMul
(a -> 2a: real and imaginary parts), a transpose, the complex twiddle (4 Mul) and two
b x b MatMuls (real part only). The DCT-III (the inverse)
is the exact transpose of that chain, run backwards.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

__all__ = [
    "WalshHadamard",
    "DCT2",
    "DCT3",
    "hadamard_matrix",
    "dct_matrix",
    "split_factors",
    "next_power_of_two",
    "permute_last",
    "dct_size",
]


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def split_factors(n: int) -> tuple[int, int]:
    """Split ``n = a * b`` with ``a <= b`` as balanced as possible (a the largest divisor <= sqrt(n))."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def dct_size(n: int, max_ratio: int = 4) -> int:
    """Smallest even size >= n whose balanced factors ``a * b`` have ``b <= max_ratio * a``.

    ACDC pads its features to this size so that the four-step DCT stays O(n sqrt(n))
    with small factors (a prime n would otherwise give a = 1, a dense DFT).
    """
    m = max(2, int(n))
    while True:
        if m % 2 == 0:
            a, b = split_factors(m)
            if b <= max_ratio * a:
                return m
        m += 1


@lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal Sylvester Hadamard matrix ``H_n / sqrt(n)`` (reference for tests and small sizes)."""
    if n != next_power_of_two(n):
        raise ValueError(f"Walsh-Hadamard size must be a power of two, got {n}")
    return (_sylvester(n) / math.sqrt(n)).to(dtype)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal DCT-II matrix C (C @ x == scipy.fft.dct(x, norm="ortho")); C.T is the DCT-III."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * k * (2 * m + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


class _ConstantTransform(nn.Module):
    """A transform holding fixed constants as non-persistent buffers (never in the state_dict).

    The float64 values are kept aside, so that ``.double()`` / ``.to(dtype)`` re-derive the
    buffers at full precision instead of up-casting rounded float32 values.
    """

    def __init__(self, constants: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._exact = constants
        for name, value in constants.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for name, value in self._exact.items():
            current = getattr(self, name)
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))
        return self


class WalshHadamard(_ConstantTransform):
    """Orthonormal Walsh-Hadamard transform ``y = H_n x / sqrt(n)`` along the last dim, n a power of two.

    Computed as ``H_a X H_b`` with ``X = x.reshape(..., a, b)``: two MatMuls with the
    a x a and b x b Kronecker factors (a + b ~ 2 sqrt(n) per element instead of n).
    The transform is symmetric and its own inverse. Shapes: (..., n) -> (..., n).
    The factors are non-persistent buffers: nothing goes into the state_dict.
    """

    def __init__(self, n: int) -> None:
        if n < 1 or n != next_power_of_two(n):
            raise ValueError(f"Walsh-Hadamard size must be a power of two, got {n}")
        a, b = split_factors(n)
        super().__init__({"h_a": hadamard_matrix(a), "h_b": hadamard_matrix(b)})
        self.n, self.a, self.b = n, a, b

    def forward(self, x: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """``H_n x / sqrt(n)``; with ``keep``, only its first ``keep`` outputs (..., keep).

        Output i = i_a b + i_b needs only rows i_a < r = ceil(keep / b) of H_a. Contracting with
        those r rows first shrinks the data before the second MatMul, so a head with C << n
        classes pays about n (r + b) multiply-adds instead of n (a + b).
        """
        batch = x.shape[:-1]
        rows = self.a if keep is None else -(-keep // self.b)
        x = x.reshape(-1, self.a, self.b).transpose(1, 2) @ self.h_a[:, :rows]  # (H_a[:r] X)^T, H_a symmetric
        x = (x.transpose(1, 2) @ self.h_b).reshape(*batch, rows * self.b)  # H_a[:r] X H_b
        return x if keep is None else x[..., :keep]


def _four_step_constants(n: int) -> dict[str, torch.Tensor]:
    """Float64 constants of the real four-step DCT-II of size n (see module docstring)."""
    a, b = split_factors(n)
    m1 = k1 = torch.arange(a, dtype=torch.float64)
    m2 = k2 = torch.arange(b, dtype=torch.float64)
    # Stage 1: length-a DFT over m1 of a real input -> [Re | Im], shape (a, 2a), acting on the right.
    ang1 = -2 * math.pi * torch.outer(m1, k1) / a
    first = torch.cat([torch.cos(ang1), torch.sin(ang1)], dim=1)
    # Twiddle W_n^(m2 k1) times the k1 part of the half-sample shift, laid out (a, b) = [k1, m2].
    ang_t = -2 * math.pi * torch.outer(k1, m2) / n - math.pi * k1[:, None] / (2 * n)
    # Stage 2: length-b DFT over m2 times the k2 part of the shift; only the real part is kept:
    # Re(z g) = Re z Re g - Im z Im g, so the two (b, b) matrices are Re g and -Im g.
    ang2 = -2 * math.pi * torch.outer(m2, k2) / b - math.pi * a * k2[None, :] / (2 * n)
    # Natural-order scale of the orthonormal DCT-II: sqrt(2/n), and sqrt(1/n) for k = 0.
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return {
        "first": first,
        "twiddle_re": torch.cos(ang_t),
        "twiddle_im": torch.sin(ang_t),
        "second_re": torch.cos(ang2),
        "second_im": -torch.sin(ang2),
        "scale": scale,
    }


def permute_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]`` for a 2-D x (M, n) and a fixed 1-D index.

    Written as ``gather`` with the index expanded to x's shape: it exports to ONNX
    Expand + GatherElements, which ONNX Runtime runs >10x faster than Gather on the
    last axis (0.16 ms vs 1.96 ms at 128 x 4096, measured with ORT 1.32, 2 threads).
    """
    return torch.gather(x, -1, index.expand(x.shape[0], -1))


def _makhoul_gather_index(n: int) -> torch.Tensor:
    """Index g with ``x[..., g]`` = Makhoul's reordering v laid out as [m2, m1] (m = b m1 + m2)."""
    a, b = split_factors(n)
    m = torch.arange(n)
    makhoul = torch.where(m < n // 2, 2 * m, 2 * (n - 1 - m) + 1)
    return makhoul.reshape(a, b).T.reshape(n)


class _FourStepDCT(_ConstantTransform):
    """Constants of DCT-II / DCT-III of size n (even), as non-persistent buffers.

    Besides the natural order, both transforms expose the *spectral layout*: the unscaled
    coefficients as a (..., a, b) tensor indexed [k1, k2] with k = k1 + a k2. ACDC multiplies
    its diagonal in that layout, which saves the output transpose of the DCT-II, the input
    transpose of the DCT-III and both scale multiplications (see :meth:`spectral_layout`).
    """

    transposed = False  # DCT3 keeps its matrices transposed: no Transpose of constants at run time

    def __init__(self, n: int) -> None:
        if n < 2 or n % 2:
            raise ValueError(f"DCT size must be even and >= 2, got {n} (pad with compressor.transforms.dct_size)")
        constants = _four_step_constants(n)
        if self.transposed:
            for name in ("first", "second_re", "second_im"):
                constants[name] = constants[name].T.contiguous()
        super().__init__(constants)
        self.n = n
        self.a, self.b = split_factors(n)
        gather = _makhoul_gather_index(n)
        self.register_buffer("gather_in", gather, persistent=False)
        self.register_buffer("gather_out", torch.argsort(gather), persistent=False)

    def spectral_layout(self, v: torch.Tensor) -> torch.Tensor:
        """Natural order (..., n) -> spectral layout (..., a, b): ``v[k1 + a k2]`` at ``[k1, k2]``.

        ``DCT2(x) == scale * natural_order(spectrum(x))``; ACDC moves its diagonal and bias into
        this layout (cheap, on parameters) instead of moving every activation out of it.
        """
        return v.reshape(*v.shape[:-1], self.b, self.a).transpose(-1, -2)


class DCT2(_FourStepDCT):
    """Orthonormal DCT-II along the last dim: ``y = C x`` (== scipy.fft.dct(x, norm="ortho")).

    Shapes: (..., n) -> (..., n), n even. Work per element: 2a + 2b multiply-adds in MatMuls plus
    six elementwise ops, with n = a * b balanced; constants 2a^2 + 2b^2 + 3n floats and two
    n-long index vectors, shared by all layers of the same size after export.
    """

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled DCT-II coefficients of x (..., n) in the spectral layout (M, a, b), M = prod(batch)."""
        a, b = self.a, self.b
        v = permute_last(x.reshape(-1, self.n), self.gather_in).reshape(-1, b, a)  # [m2, m1]
        y = (v @ self.first).transpose(1, 2).reshape(-1, 2, a, b)  # [re|im, k1, m2]
        y_re, y_im = y[:, 0], y[:, 1]
        z_re = y_re * self.twiddle_re - y_im * self.twiddle_im
        z_im = y_re * self.twiddle_im + y_im * self.twiddle_re
        return z_re @ self.second_re + z_im @ self.second_im  # [k1, k2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        natural = self.spectrum(x).transpose(1, 2).reshape(-1, self.n)
        return (natural * self.scale).reshape(x.shape)


class DCT3(_FourStepDCT):
    """Orthonormal DCT-III, the inverse (and transpose) of :class:`DCT2`: ``x = C^T y``.

    Runs the DCT-II chain backwards with every stage transposed; shapes (..., n) -> (..., n).
    """

    transposed = True

    def from_spectrum(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`DCT2.spectrum`: spectral layout (M, a, b) -> natural order (M, n)."""
        a, b = self.a, self.b
        z_re = spectrum @ self.second_re  # [k1, m2]
        z_im = spectrum @ self.second_im
        y_re = z_re * self.twiddle_re + z_im * self.twiddle_im  # conjugate twiddle
        y_im = z_im * self.twiddle_re - z_re * self.twiddle_im
        y = torch.stack([y_re, y_im], dim=1).reshape(-1, 2 * a, b).transpose(1, 2)  # [m2, re|im k1]
        v = y @ self.first  # [m2, m1]
        return permute_last(v.reshape(-1, self.n), self.gather_out)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.from_spectrum(self.spectral_layout(y.reshape(-1, self.n) * self.scale)).reshape(y.shape)
