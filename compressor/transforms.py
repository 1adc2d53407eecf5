"""Fast orthonormal transforms that train in PyTorch and export to small, fast ONNX.

Every transform here acts on the last dimension of a tensor of any batch shape
``(..., n)`` and is written only with real MatMul, elementwise Mul/Add, Reshape,
Transpose, Slice and Concat, so that

* autograd works without custom backward code,
* ``torch.onnx.export(dynamo=True)`` emits standard ONNX ops (no complex tensors,
  no ``DFT``), and
* the constants are O(n): Kronecker factors of size about n^(1/3) and per-element twiddles,
  never an n x n matrix.

Walsh-Hadamard (Sylvester order) and its extension to n = q 2^k are Kronecker products of small
orthonormal factors, ``H_n = H_(d_0) (x) H_(d_1) (x) H_(d_2)``: each factor is one MatMul on its own
axis of ``x.reshape(M, d_0, d_1, d_2)``, from the left or (the last) from the right, so no data is
transposed (:class:`OrthogonalKronecker`; 3 n^(1/3) multiply-adds per element).

DCT-II (orthonormal, as ``scipy.fft.dct(norm="ortho")``; thesis section 3.10 uses it for ACDC) by
Makhoul's reordering and a real-arithmetic three-stage FFT, n = a b c::

    v = [x_0, x_2, ..., x_{n-2}, x_{n-1}, ..., x_3, x_1]          (one gather)
    V[k] = sum_m v[m] W_n^(m k),  W_n = exp(-2 pi i / n)
    X[k] = s_k Re(exp(-i pi k / (2n)) V[k]),  s_0 = sqrt(1/n), s_k = sqrt(2/n)

    with m = b c m1 + c m2 + m3 and k = k1 + a k2 + a b k3:
    V[k] = sum_m3 W_c^(m3 k3) W_n^(m3 (k1 + a k2)) sum_m2 W_b^(m2 k2) W_ab^(m2 k1) sum_m1 W_a^(m1 k1) v[m1, m2, m3]

Stage 1 is a real (2a x a) MatMul from the left (real input, complex output, rows (k1, re|im));
stage 2 one complex b x b matrix *per k1* (a real (2b x 2b) matrix, batched over k1), into which
the twiddle W_ab^(m2 k1) and the k1 and k2 parts of the half-sample shift are folded; the
remaining twiddle W_n^(m3 (k1 + a k2)) and stage 3 (the k3 part of the shift folded in, real part
only) are two elementwise Mul and two MatMuls over (re|im, m3). Work per element:
2a + 4b + 4c multiply-adds (160 at 4096 against 4 sqrt(n) = 256 for the two-stage "four-step"
form fixclf used before); constants O(n) (the per-k1 matrices hold 4 a b^2 ~ 4n numbers). The
DCT-III (the inverse) is the exact transpose of that chain, run backwards.

In eager PyTorch (training and evaluation: :func:`use_fft`) ACDC runs its DCTs through
``torch.fft`` instead: ``U = w s RFFT(v)`` gives the n coefficients in a half-complex layout
(X_j = Re U_j, X_(n-j) = -Im U_j; v real), and the DCT-III is ``IRFFT(conj(w) U / s)``. Same
function; PyTorch runs it about 3x faster than the MatMul chain's many small batched GEMMs (at
n = 512, batch 64, forward + backward: 0.48 against 1.7 ms per layer), which matters for the
fine-tune's thousands of steps. Complex tensors do not export, so a traced model (ONNX export)
always gets the MatMul chain.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "OrthogonalKronecker",
    "WalshHadamard",
    "KroneckerHadamard",
    "kronecker_hadamard_matrix",
    "kronecker_orders",
    "kronecker_size",
    "odd_part",
    "DCT2",
    "DCT3",
    "hadamard_matrix",
    "dct_matrix",
    "dct_factors",
    "next_power_of_two",
    "permute_last",
    "use_fft",
    "matmul_chains",
    "dct_size",
]


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


@lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")
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
    k = torch.arange(n, dtype=torch.float64, device="cpu")[:, None]
    m = torch.arange(n, dtype=torch.float64, device="cpu")[None, :]
    c = torch.cos(math.pi * k * (2 * m + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


class _ConstantTransform(nn.Module):
    """A transform holding fixed constants as non-persistent buffers (never in the state_dict).

    Constants are made on the CPU whatever the default device (a layer built under
    ``torch.device("meta")`` to check a checkpoint's shapes shares the cached Hadamard factors).

    The float64 values are kept aside, so that ``.double()`` / ``.to(dtype)`` re-derive the
    buffers at full precision instead of up-casting rounded float32 values.
    """

    def __init__(self, constants: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._exact: dict[str, torch.Tensor] = {}
        self._register_constants(constants)

    def _register_constants(self, constants: dict[str, torch.Tensor]) -> None:
        """Keep the float64 ``constants`` aside and register them as float32 non-persistent buffers."""
        for name, value in constants.items():
            self._exact[name] = value
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for name, value in self._exact.items():
            current = getattr(self, name)
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))
        return self


def odd_part(n: int) -> tuple[int, int]:
    """``(q, k)`` with ``n = q * 2^k`` and q odd."""
    k = (n & -n).bit_length() - 1
    return n >> k, k


def kronecker_orders(n: int) -> tuple[int, ...]:
    """Orders ``d_0 .. d_{s-1}`` of the Kronecker factors of a size-n :class:`OrthogonalKronecker`.

    n = q 2^k (q odd): d_0 = q 2^(k_0), d_i = 2^(k_i), k_0 + ... + k_{s-1} = k, with s = 1 stage up
    to n = 64, 2 below 2048 and 3 from there (measured in ONNX Runtime, batch 1 and 128: at 4096,
    16 x 16 x 16 ran 1.1-1.4x faster than 64 x 64; at 512, 16 x 32 ran faster than 8 x 8 x 8). The
    k_i minimise the work per element, sum(d_i).
    """
    q, k = odd_part(n)
    stages = 1 if n <= 64 else 2 if n < 2048 else 3
    stages = min(stages, k + 1) if q == 1 else stages
    best: tuple[int, ...] | None = None
    for split in itertools.product(range(k + 1), repeat=stages - 1):
        if sum(split) > k:
            continue
        orders = (q << (k - sum(split)), *(1 << e for e in split))
        if min(orders) > 1 or stages == 1:
            if best is None or sum(orders) < sum(best):
                best = orders
    return best if best is not None else (n,)


def kronecker_size(n: int, max_odd: int = 15) -> int:
    """Smallest size >= n of the form q 2^k with q odd and q <= ``max_odd``: what Adaptive Fastfood
    pads to (9216 = 9 x 1024 needs no padding; 300 -> 320 = 5 x 64 instead of 512)."""
    m = max(1, int(n))
    while odd_part(m)[0] > max_odd:
        m += 1
    return m


class OrthogonalKronecker(_ConstantTransform):
    """``y = (F_0 (x) F_1 (x) ... (x) F_{s-1}) x`` along the last dim, each F_i a fixed orthonormal
    d_i x d_i matrix, n = prod(d_i); shapes (..., n) -> (..., n).

    With ``X = x.reshape(M, d_0, .., d_{s-1})`` each factor acts on its own axis, as a MatMul with
    no Transpose of the data: the last factor multiplies from the right ((M n / d, d) @ F^T, one
    GEMM), every other one from the left (F_i @ (M prod(d_<i), d_i, prod(d_>i)), broadcast over the
    leading axis). Work: sum(d_i) multiply-adds per element (3 n^(1/3) for three balanced
    factors), constants sum(d_i^2) floats.
    """

    def __init__(self, factors: list[torch.Tensor]) -> None:
        super().__init__({**{f"factor{i}": f for i, f in enumerate(factors[:-1])}, "last_t": factors[-1].T.contiguous()})
        self.orders = tuple(int(f.shape[0]) for f in factors)
        self.n = math.prod(self.orders)

    def forward(self, x: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """The transform of x; with ``keep``, only its first ``keep`` outputs (..., keep).

        Output i = i_0 (n / d_0) + ... needs only rows i_0 < r = ceil(keep / (n / d_0)) of F_0,
        which is applied first, so the other factors run on r / d_0 of the data (a head with
        C << n classes pays about n (r + d_1 + ...) multiply-adds, not n sum(d_i)).
        """
        batch, orders, n = x.shape[:-1], self.orders, self.n
        rows = orders[0] if keep is None else min(orders[0], -(-keep // (n // orders[0])))
        y = x.reshape(-1, n)
        if len(orders) == 1:
            y = y @ self.last_t[:, :rows]
        else:
            y = self.factor0[:rows] @ y.reshape(-1, orders[0], n // orders[0])
            for i in range(1, len(orders) - 1):
                y = getattr(self, f"factor{i}") @ y.reshape(-1, orders[i], math.prod(orders[i + 1:]))
            y = y.reshape(-1, orders[-1]) @ self.last_t
        y = y.reshape(*batch, rows * (n // orders[0]))
        return y if keep is None else y[..., :keep]


class WalshHadamard(OrthogonalKronecker):
    """Orthonormal Walsh-Hadamard transform ``y = H_n x / sqrt(n)`` along the last dim, n a power of two.

    H_n = H_(d_0) (x) H_(d_1) (x) ... (Sylvester order), applied as an :class:`OrthogonalKronecker`
    with the orders of :func:`kronecker_orders` (16 x 16 x 16 at 4096: 48 multiply-adds per element
    instead of n). The transform is symmetric and its own inverse. Shapes: (..., n) -> (..., n).
    The factors are non-persistent buffers: nothing goes into the state_dict.
    """

    def __init__(self, n: int) -> None:
        if n < 1 or n != next_power_of_two(n):
            raise ValueError(f"Walsh-Hadamard size must be a power of two, got {n}")
        super().__init__([hadamard_matrix(d) for d in kronecker_orders(n)])


def kronecker_hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense reference of :class:`KroneckerHadamard`: ``C_q (x) H_(2^k) / sqrt(2^k)``, n = q 2^k."""
    q, k = odd_part(n)
    return torch.kron(dct_matrix(q), hadamard_matrix(1 << k)).to(dtype)


class KroneckerHadamard(OrthogonalKronecker):
    """The Walsh-Hadamard transform extended to n = q 2^k, q odd: ``y = (C_q (x) H_(2^k)/sqrt(2^k)) x``
    with C_q the orthonormal DCT-II of order q (a dense q x q factor; equal to :class:`WalshHadamard`
    when q = 1). Orthonormal like H, every entry of magnitude O(1/sqrt(n)) when q is small, and
    applied with the same O(n^(1/3)) work: Adaptive Fastfood uses it so that 9216 = 9 x 1024 is
    transformed at its own size instead of being padded to 16384 (1.8x the data).
    Shapes (..., n) -> (..., n); its inverse is its transpose.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"transform size must be >= 1, got {n}")
        q, k = odd_part(n)
        orders = kronecker_orders(n)
        first = torch.kron(dct_matrix(q), hadamard_matrix(orders[0] // q))
        super().__init__([first, *(hadamard_matrix(d) for d in orders[1:])])


@lru_cache(maxsize=None)
def dct_factors(n: int) -> tuple[int, int, int]:
    """``(a, b, c)`` with ``n = a b c`` for the three-stage DCT of size n.

    Work per element is 2a + 4b + 4c multiply-adds (see the module docstring), but stage 2 runs as
    M a small GEMMs, so a costs more than its flops say; the factors minimise a + b + c (balanced:
    16 x 16 x 16 at 4096, 16 x 24 x 24 at 9216), ties going to the larger c. Measured in ONNX
    Runtime at 4096 (batch 128, 2 threads; batch 1, 1 thread), the other orders of the same sizes
    (8 x 16 x 32, 32 x 16 x 8, 4 x 32 x 32, ...) were no faster.
    """
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divisors = sorted({*small, *(n // d for d in small)})
    candidates = [(a, b, n // (a * b)) for a in divisors for b in divisors if n % (a * b) == 0]
    return min(candidates, key=lambda f: (f[0] + f[1] + f[2], -f[2], -f[1]))


def dct_size(n: int, max_ratio: int = 4) -> int:
    """Smallest even size >= n whose :func:`dct_factors` are within ``max_ratio`` of each other.

    ACDC pads its features to this size so that the DCT stays O(n^(4/3)) with small factors (a
    prime n would otherwise give one factor n, a dense DFT).
    """
    m = max(2, int(n))
    while True:
        if m % 2 == 0:
            factors = dct_factors(m)
            if max(factors) <= max_ratio * min(factors) or m <= 8:
                return m
        m += 1


def _dct_constants(a: int, b: int, c: int) -> dict[str, torch.Tensor]:
    """Float64 constants of the three-stage real DCT-II of size n = a b c (see the module docstring)."""
    n = a * b * c
    m1, m2, m3 = (torch.arange(d, dtype=torch.float64, device="cpu") for d in (a, b, c))
    k1, k2, k3 = m1, m2, m3
    # Stage 1: length-a DFT over m1 of the real input, rows (k1, re|im), acting from the left.
    ang1 = -2 * math.pi * torch.outer(k1, m1) / a
    first = torch.stack([torch.cos(ang1), torch.sin(ang1)], 1).reshape(2 * a, a)
    # Stage 2, one complex b x b matrix per k1: W_b^(m2 k2) W_ab^(m2 k1) and the k1, k2 parts of the
    # half-sample shift; as a real (2b, 2b) matrix with rows (k2, re|im out), columns (re|im in, m2).
    ang2 = (-2 * math.pi * m2[None, None, :] * (k2[None, :, None] / b + k1[:, None, None] / (a * b))
            - math.pi * (k1[:, None, None] + a * k2[None, :, None]) / (2 * n))
    g_re, g_im = torch.cos(ang2), torch.sin(ang2)  # [k1, k2, m2]
    second = torch.stack([torch.stack([g_re, -g_im], 2), torch.stack([g_im, g_re], 2)], 2)  # [k1, k2, out, in, m2]
    # Twiddle W_n^(m3 (k1 + a k2)) on (k1, k2, m3), as two real (re|im, m3) patterns (see DCT2.spectrum).
    ang_t = -2 * math.pi * m3[None, None, :] * (k1[:, None, None] + a * k2[None, :, None]) / n
    t_re, t_im = torch.cos(ang_t), torch.sin(ang_t)
    # Stage 3: length-c DFT over m3 with the k3 part of the shift; only the real part is kept.
    ang3 = -2 * math.pi * torch.outer(m3, k3) / c - math.pi * a * b * k3[None, :] / (2 * n)
    h_re, h_im = torch.cos(ang3), torch.sin(ang3)
    # Orthonormal scale in the spectral layout [k1, k2, k3]: sqrt(2/n), and sqrt(1/n) for k = 0.
    scale = torch.full((a, b, c), math.sqrt(2.0 / n), dtype=torch.float64, device="cpu")
    scale[0, 0, 0] = math.sqrt(1.0 / n)
    return {
        "first": first,
        "second": second.reshape(a, 2 * b, 2 * b),
        "twiddle_a": torch.stack([t_re, t_im], 2).reshape(a, b, 2 * c),
        "twiddle_b": torch.stack([t_im, t_re], 2).reshape(a, b, 2 * c),
        "third_a": torch.cat([h_re, -h_re], 0),
        "third_b": torch.cat([-h_im, -h_im], 0),
        "scale": scale,
    }


_MATMUL_CHAINS = contextvars.ContextVar("fixclf_matmul_chains", default=False)


def use_fft() -> bool:
    """Whether ACDC's DCTs run through ``torch.fft`` (eager PyTorch: training, evaluation).

    While a model is traced (``torch.onnx.export`` with either exporter, ``torch.export``,
    ``torch.jit.trace``, ``torch.compile``), or inside
    :func:`matmul_chains`, they run the real MatMul chains instead, which export to standard ONNX
    ops and run fast in ONNX Runtime. Both compute the same function (to float rounding; the tests
    pin each against the dense matrix).
    """
    return not (_MATMUL_CHAINS.get() or torch.compiler.is_compiling() or torch.jit.is_tracing())


@contextlib.contextmanager
def matmul_chains() -> Iterator[None]:
    """Run the transforms as the MatMul chains that export, also in eager PyTorch (tests, profiling)."""
    token = _MATMUL_CHAINS.set(True)
    try:
        yield
    finally:
        _MATMUL_CHAINS.reset(token)


def permute_last(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., index]`` for a 2-D x (M, n) and a fixed 1-D index.

    Written as ``gather`` with the index expanded to x's shape: it exports to ONNX
    Expand + GatherElements, which ONNX Runtime runs >10x faster than Gather on the
    last axis (0.16 ms vs 1.96 ms at 128 x 4096, measured with ORT 1.32, 2 threads).
    """
    return torch.gather(x, -1, index.expand(x.shape[0], -1))


def _makhoul_index(n: int) -> torch.Tensor:
    """Index g with ``x[..., g]`` = Makhoul's reordering v = [x_0, x_2, ..., x_{n-2}, x_{n-1}, ..., x_3, x_1]."""
    m = torch.arange(n, device="cpu")
    return torch.where(m < n // 2, 2 * m, 2 * (n - 1 - m) + 1)


class _ThreeStageDCT(_ConstantTransform):
    """Constants of DCT-II / DCT-III of size n (even), as non-persistent buffers.

    Besides the natural order, both transforms expose the *spectral layout*: the unscaled
    coefficients as a (..., a, b, c) tensor indexed [k1, k2, k3] with k = k1 + a k2 + a b k3. ACDC
    multiplies its diagonal in that layout, which saves moving every activation into natural order
    and both scale multiplications (see :meth:`spectral_layout`).
    """

    transposed = False  # DCT3 keeps its matrices transposed: no Transpose of constants at run time

    def __init__(self, n: int) -> None:
        if n < 2 or n % 2:
            raise ValueError(f"DCT size must be even and >= 2, got {n} (pad with compressor.transforms.dct_size)")
        self.a, self.b, self.c = dct_factors(n)
        constants = _dct_constants(self.a, self.b, self.c)
        if self.transposed:
            for name in ("first", "second", "third_a", "third_b"):
                constants[name] = constants[name].transpose(-1, -2).contiguous()
        super().__init__(constants)
        self.n = n
        gather = _makhoul_index(n)
        self.register_buffer("gather_in", gather, persistent=False)
        self._register_fft_constants(n)
        self.register_buffer("gather_out", torch.argsort(gather), persistent=False)

    def _register_fft_constants(self, n: int) -> None:
        """Twiddles of the eager FFT path (float64-exact real and imaginary parts): ``w_j s_j`` for the
        DCT-II, its inverse ``conj(w_j) / s_j`` for the DCT-III, j = 0 .. n/2 (see :func:`use_fft`)."""
        j = torch.arange(n // 2 + 1, dtype=torch.float64, device="cpu")
        s = torch.full_like(j, math.sqrt(2.0 / n))
        s[0] = math.sqrt(1.0 / n)
        w = torch.polar(torch.ones_like(j), -math.pi * j / (2 * n))
        twiddle = w.conj() / s if self.transposed else w * s
        # Half-complex layout (n/2 + 1, 2) of n coefficients X: [j, 0] = X_j, [j, 1] = -X_(n-j) (j >= 1).
        half = torch.arange(n // 2 + 1, device="cpu")
        im_source = torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), n - half[1:]])
        self.register_buffer("half_complex_index", torch.stack([half, im_source], 1), persistent=False)
        keep = torch.ones(n // 2 + 1, 2, dtype=torch.float64, device="cpu")
        keep[0, 1] = 0.0
        negate = keep * torch.tensor([1.0, -1.0], dtype=torch.float64, device="cpu")
        self._register_constants({"fft_twiddle_re": twiddle.real.contiguous(), "fft_twiddle_im": twiddle.imag.contiguous(),
                                  "half_complex_keep": keep, "half_complex_negate": negate})

    def _fft_twiddle(self, dtype: torch.dtype) -> torch.Tensor:
        """The twiddle as a complex tensor at real precision ``dtype`` (float32 or float64): FFTs and
        complex numbers have no bfloat16, so a reduced-precision module takes its float64 values."""
        re, im = self.fft_twiddle_re, self.fft_twiddle_im
        if re.dtype not in (torch.float32, torch.float64):
            re, im = (self._exact[name].to(re.device) for name in ("fft_twiddle_re", "fft_twiddle_im"))
        return torch.complex(re.to(dtype), im.to(dtype))

    def half_complex_layout(self, coefficients: torch.Tensor, *, negate_im: bool = True) -> torch.Tensor:
        """Natural-order coefficients (n,) in the half-complex layout (n/2 + 1, 2) of the FFT path:
        ``[j, 0] = c_j``, ``[j, 1] = -c_(n-j)`` (``negate_im=False``: ``+c_(n-j)``, the layout of a
        diagonal that multiplies the layout of X), ``[0, 1] = 0``."""
        return coefficients[self.half_complex_index] * (self.half_complex_negate if negate_im else self.half_complex_keep)

    def spectral_layout(self, v: torch.Tensor) -> torch.Tensor:
        """Natural order (..., n) -> spectral layout (..., a, b, c): ``v[k1 + a k2 + a b k3]`` at [k1, k2, k3].

        ``DCT2(x) == scale * natural_order(spectrum(x))``; ACDC moves its diagonal and bias into
        this layout (cheap, on parameters) instead of moving every activation out of it.
        """
        return v.reshape(*v.shape[:-1], self.c, self.b, self.a).transpose(-1, -3)

    def natural_order(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Spectral layout (M, a, b, c) -> natural order (M, n); the inverse of :meth:`spectral_layout`."""
        return spectrum.transpose(-1, -3).reshape(-1, self.n)


class DCT2(_ThreeStageDCT):
    """Orthonormal DCT-II along the last dim: ``y = C x`` (== scipy.fft.dct(x, norm="ortho")).

    Shapes: (..., n) -> (..., n), n even, n = a b c (:func:`dct_factors`). Work per element:
    2a + 4b + 4c multiply-adds in MatMuls and two elementwise Mul; constants about
    2a^2 + 4 a b^2 + 4c^2 + 5n floats and two n-long index vectors, shared by all layers of the
    same size after export.
    """

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled DCT-II coefficients of x (..., n) in the spectral layout (M, a, b, c), M = prod(batch)."""
        return self.spectrum_of_reordered(permute_last(x.reshape(-1, self.n), self.gather_in))

    def spectrum_of_reordered(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`spectrum` of x given as ``v = x[..., gather_in]`` (M, n): Makhoul's order, m = b c m1 +
        c m2 + m3 laid out [m1, m2, m3]. A stack that permutes between its layers folds this gather
        into its own."""
        a, b, c = self.a, self.b, self.c
        y = self.first @ v.reshape(-1, a, b * c)  # [k1 re|im, (m2, m3)]
        y = (self.second @ y.reshape(-1, a, 2 * b, c)).reshape(-1, a, b, 2 * c)  # [k1, k2, (re|im, m3)]
        # Re(sum_m3 H[m3, k3] T[k1, k2, m3] Z[m3]) with Z = y_re + i y_im: the complex product's four
        # real terms come out of two elementwise Mul and two MatMuls over (re|im, m3).
        return (y * self.twiddle_a) @ self.third_a + (y * self.twiddle_b) @ self.third_b  # [k1, k2, k3]

    def rfft_of_reordered(self, v: torch.Tensor) -> torch.Tensor:
        """The DCT-II (scaled) of x given as ``v = x[..., gather_in]`` (M, n), in the half-complex layout
        (M, n/2 + 1, 2), by ``torch.fft``: ``U = w s * RFFT(v)``, X_j = Re U_j and X_(n-j) = -Im U_j
        (Makhoul; v real, so V_(n-j) = conj V_j). The same function as the MatMul chain (eager PyTorch
        runs it about 3x faster: training), but with complex tensors, which do not export (:func:`use_fft`)."""
        return torch.view_as_real(torch.fft.rfft(v) * self._fft_twiddle(v.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.natural_order(self.spectrum(x) * self.scale).reshape(x.shape)


class DCT3(_ThreeStageDCT):
    """Orthonormal DCT-III, the inverse (and transpose) of :class:`DCT2`: ``x = C^T y``.

    Runs the DCT-II chain backwards with every stage transposed; shapes (..., n) -> (..., n).
    """

    transposed = True

    def from_spectrum(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`DCT2.spectrum`: spectral layout (M, a, b, c) -> natural order (M, n)."""
        return permute_last(self.reordered_from_spectrum(spectrum), self.gather_out)

    def reordered_from_spectrum(self, spectrum: torch.Tensor) -> torch.Tensor:
        """:meth:`from_spectrum` before its last gather: the result x as ``x[..., gather_in]`` (M, n)."""
        a, b, c = self.a, self.b, self.c
        y = (spectrum @ self.third_a) * self.twiddle_a + (spectrum @ self.third_b) * self.twiddle_b  # [k1, k2, (re|im, m3)]
        y = self.second @ y.reshape(-1, a, 2 * b, c)  # [k1, (re|im, m2), m3]
        return (self.first @ y.reshape(-1, 2 * a, b * c)).reshape(-1, self.n)  # [m1, m2, m3]

    def irfft_reordered(self, layout: torch.Tensor) -> torch.Tensor:
        """The DCT-III of coefficients given in the half-complex layout (M, n/2 + 1, 2), as
        ``x[..., gather_in]`` (M, n): the inverse of :meth:`DCT2.rfft_of_reordered`,
        ``v = IRFFT(conj(w) / s * U)`` (the layout's [n/2, 1] must be -[n/2, 0], as a layout made by
        DCT2 times a diagonal in :meth:`half_complex_layout` is)."""
        return torch.fft.irfft(torch.view_as_complex(layout.contiguous()) * self._fft_twiddle(layout.dtype), self.n)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        spectrum = self.spectral_layout(y.reshape(-1, self.n)) * self.scale
        return self.from_spectrum(spectrum).reshape(y.shape)
