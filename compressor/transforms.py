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
Makhoul's reordering and a real FFT in S Cooley-Tukey stages, n = r_1 r_2 ... r_S::

    v = [x_0, x_2, ..., x_{n-2}, x_{n-1}, ..., x_3, x_1]          (one gather)
    V[k] = sum_m v[m] W_n^(m k),  W_n = exp(-2 pi i / n)
    X[k] = s_k Re(w_k V[k]),  w_k = exp(-i pi k / (2n)),  s_0 = sqrt(1/n), s_k = sqrt(2/n)
    X[n - k] = -s_k Im(w_k V[k])                                   (v real: V[n - k] = conj V[k])

Stage s combines r_s interleaved sub-sequences' spectra of length L = r_1 .. r_(s-1) into one of
length L r_s: ``Z'[k + L j] = sum_m W_(L r_s)^(m k) W_(r_s)^(m j) Z_m[k]`` (decimation in time, m the
most significant remaining digit of v's index). Every spectrum is of a real sequence, hence
Hermitian, and is stored as L reals, in *units* of two: ``(Z[0], Z[L/2])`` (both real) and
``(Re Z[k], Im Z[k])`` for one k of each pair {k, L - k}. The unit of frequency k, taken over the
r_s sub-sequences (2 r_s reals), determines exactly the r_s units of frequencies k + L j: one
real 2r x 2r block per unit, the twiddled DFT ``F_r diag(W^(m k))`` in real form (the real unit's
block is its own). So stage 1 is one r_1 x r_1 MatMul and stage s > 1 a batched MatMul of
L / 2 blocks of 2 r_s x 2 r_s, all on real numbers, with no multiply spent on the redundant
half of a spectrum: r_1 + 2 (r_2 + ... + r_S) multiply-adds per element (80 at 4096 = 16^3, 100
at 9216 = 32 x 16 x 18), half of a complex-arithmetic chain's. The last stage also folds in
Makhoul's w_k, the scales s_k and the (Re, -Im) rows, so it returns the DCT coefficients
themselves, in the chain's own order (``order``); ACDC moves its diagonal and bias there (n
numbers each) instead of moving activations. The DCT-III is the same chain transposed, run
backwards. Each stage is scaled by 1/sqrt(r_s), so intermediate values keep the input's magnitude
(float16 stays accurate).

The chain works on the *feature-major* layout (n, M): every stage is then one MatMul whose
inner dimension is the whole batch (or the batch times the digits still to come), the gathers
move whole rows, and the data is transposed only where an ACDC stack begins and ends. The
per-block matrices hold O(n r) numbers but are computed from O(n) constants (two 2r x 2r patterns
and per-block cosines and sines: ``P cos + Q sin``), which is what the exported file stores
(:data:`compressor.export.FOLD_GROWTH_LIMIT`); ONNX Runtime computes the blocks once at load.

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
from functools import lru_cache, wraps
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
    "dct_radices",
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
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * k * (2 * m + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


class _ConstantTransform(nn.Module):
    """A transform holding fixed constants as non-persistent buffers (never in the state_dict).

    Every subclass is constructed on the CPU whatever the default device: a layer built under
    ``torch.device("meta")`` (to check a checkpoint's shapes) gets real constants, and the cached
    Hadamard factors are never meta tensors.

    The float64 values are kept aside, so that ``.double()`` / ``.to(dtype)`` re-derive the
    buffers at full precision instead of up-casting rounded float32 values; index buffers are kept
    aside too, so that ``to_empty`` (which leaves every buffer uninitialised, and nothing in a
    state_dict restores these) finds them again.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        build = cls.__init__

        @wraps(build)
        def build_on_cpu(self, *args, **kw) -> None:
            with torch.device("cpu"):
                build(self, *args, **kw)

        cls.__init__ = build_on_cpu

    def __init__(self, constants: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._exact: dict[str, torch.Tensor] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self._register_constants(constants)

    def _register_constants(self, constants: dict[str, torch.Tensor]) -> None:
        """Keep the float64 ``constants`` aside and register them as float32 non-persistent buffers."""
        for name, value in constants.items():
            self._exact[name] = value
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    def _register_indices(self, indices: dict[str, torch.Tensor]) -> None:
        """Keep the integer ``indices`` aside and register them as non-persistent buffers of their dtype."""
        for name, value in indices.items():
            self._indices[name] = value
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for name, value in [*self._exact.items(), *self._indices.items()]:
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


MAX_RADIX = 64
"""Largest radix of a DCT stage (its blocks are 2r x 2r matrices)."""


def _dct_stage_count(n: int) -> int:
    """Stages of the size-n DCT: 1 up to 64, 2 below 2048, 3 below 2^17, 4 above (measured in ONNX
    Runtime at batch 1 and 128: fewer, larger stages win until the radices pass ~64)."""
    return 1 if n <= 64 else 2 if n < 2048 else 3 if n < 1 << 17 else 4


def _ordered_factorisations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every ``(r_1, .., r_parts)`` with product n and each r in [2, MAX_RADIX]."""
    if parts == 1:
        if 2 <= n <= MAX_RADIX:
            yield (n,)
        return
    for r in range(2, min(n, MAX_RADIX) + 1):
        if n % r == 0:
            for rest in _ordered_factorisations(n // r, parts - 1):
                yield (r, *rest)


def dct_work(radices: tuple[int, ...]) -> int:
    """Multiply-adds per element of the real DCT chain with these radices: r_1 + 2 (r_2 + ... + r_S)."""
    return radices[0] + 2 * sum(radices[1:])


@lru_cache(maxsize=None)
def dct_radices(n: int) -> tuple[int, ...]:
    """Radices ``(r_1, .., r_S)`` of the S-stage real DCT of size n: n = prod(r_s), r_1 even.

    S is :func:`_dct_stage_count` (n); the radices minimise the work per element
    (:func:`dct_work`), each at most :data:`MAX_RADIX`, ties going to the larger last radix, then
    the larger middle ones (the last stage is many small GEMMs, which run faster on bigger blocks):
    16 x 16 x 16 at 4096, 32 x 16 x 18 at 9216, 32 x 16 at 512. ValueError when n has none (n odd,
    or a prime factor above MAX_RADIX): :func:`dct_size` pads to a size that has.
    """
    candidates = [r for r in _ordered_factorisations(n, _dct_stage_count(n)) if r[0] % 2 == 0]
    if not candidates:
        raise ValueError(f"DCT size {n} has no even-first factorisation into {_dct_stage_count(n)} radices <= {MAX_RADIX} "
                         "(pad with compressor.transforms.dct_size)")
    return min(candidates, key=lambda r: (dct_work(r), tuple(-x for x in reversed(r))))


def dct_size(n: int, slack: float = 1.25) -> int:
    """Smallest even size >= n whose DCT costs at most ``slack`` times the work of balanced radices
    ((2S - 1) n^(1/S) per element): ACDC pads its features to it, so that the DCT stays
    O(n^(1 + 1/S)) with small radices (a prime n would otherwise leave one radix n)."""
    m = max(2, int(n))
    while True:
        if m % 2 == 0:
            with contextlib.suppress(ValueError):
                stages = _dct_stage_count(m)
                if dct_work(dct_radices(m)) <= slack * (2 * stages - 1) * m ** (1 / stages):
                    return m
        m += 1


def _unit_rows(z0: torch.Tensor, z1: torch.Tensor, frequency: int | None, n: int, last: bool) -> list[torch.Tensor]:
    """The two rows of one output unit. A *unit* holds two reals of a Hermitian spectrum Z of even
    length: ``(Z_0, Z_(L/2))`` (both real; ``frequency`` None) or ``(Re Z_k, Im Z_k)``. In the last stage
    a complex unit becomes the DCT coefficients ``(X_k, X_(n-k)) = sqrt(2) (Re, -Im)(w_k V_k)``,
    w_k = exp(-i pi k / (2n)) (Makhoul), and the real unit ``(X_0, X_(n/2))`` is already scaled."""
    if frequency is None or not last:
        return [z0, z1]
    phi = -math.pi * frequency / (2 * n)
    c, s = math.cos(phi), math.sin(phi)
    return [math.sqrt(2.0) * (c * z0 - s * z1), -math.sqrt(2.0) * (s * z0 + c * z1)]


def _first_stage(r: int, n: int, last: bool) -> tuple[torch.Tensor, list[int | None]]:
    """Stage 1: the real length-r DFT of r reals as r/2 units (the real one first), scaled 1/sqrt(r)."""
    m = torch.arange(r, dtype=torch.float64)
    rows = _unit_rows(torch.ones(r, dtype=torch.float64), torch.cos(math.pi * m), None, n, last)
    units: list[int | None] = [None]
    for p in range(1, r // 2):
        angle = -2 * math.pi * p * m / r
        rows += _unit_rows(torch.cos(angle), torch.sin(angle), p, n, last)
        units.append(p)
    return torch.stack(rows) / math.sqrt(r), units


def _real_unit_block(r: int, length: int, n: int, last: bool) -> tuple[torch.Tensor, list[int | None]]:
    """Block 0 of a stage of radix r after a spectrum of length L: from the real unit's
    ``(Z_m[0], Z_m[L/2])``, m < r, the r units of the new spectrum (length L r) they determine:
    ``Z'[L j] = sum_m W_r^(m j) Z_m[0]`` and ``Z'[L/2 + L j] = sum_m W_r^(m (j + 1/2)) Z_m[L/2]``
    (each sequence Hermitian, so half of it is stored). Rows over columns (re|im input, m)."""
    m = torch.arange(r, dtype=torch.float64)
    zero = torch.zeros(r, dtype=torch.float64)
    second_real = torch.cat([torch.cos(math.pi * m), zero]) if r % 2 == 0 else torch.cat([zero, torch.cos(math.pi * m)])
    rows = _unit_rows(torch.cat([torch.ones(r, dtype=torch.float64), zero]), second_real, None, n, last)
    units: list[int | None] = [None]
    for j in range(1, (r - 1) // 2 + 1):  # Z'[L j] from Z_m[0]
        angle = -2 * math.pi * m * j / r
        rows += _unit_rows(torch.cat([torch.cos(angle), zero]), torch.cat([torch.sin(angle), zero]), length * j, n, last)
        units.append(length * j)
    for j in range(r // 2):  # Z'[L/2 + L j] from Z_m[L/2] (for odd r, j = (r - 1)/2 is the real Z'[L r / 2])
        angle = -2 * math.pi * m * (j + 0.5) / r
        rows += _unit_rows(torch.cat([zero, torch.cos(angle)]), torch.cat([zero, torch.sin(angle)]), length // 2 + length * j, n, last)
        units.append(length // 2 + length * j)
    return torch.stack(rows) / math.sqrt(r), units


def _twiddled_dft(r: int, n: int, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Patterns P, Q (2r x 2r) with ``P cos(theta_m) + Q sin(theta_m)`` the real form of the complex
    matrix ``F[j, m] exp(i theta_m)``, F[j, m] = W_r^(m j) / sqrt(r) (times exp(-i pi j / (2r)), the
    row part of Makhoul's twiddle, and (Re, -Im) sqrt(2) rows, in the last stage). Rows (j, re|im),
    columns (re|im, m): (F e^(i theta)) z = (Fr c - Fi s + i (Fr s + Fi c)) (x + i y)."""
    j = torch.arange(r, dtype=torch.float64)[:, None]
    m = torch.arange(r, dtype=torch.float64)[None, :]
    f = torch.polar(torch.ones(r, r, dtype=torch.float64) / math.sqrt(r), -2 * math.pi * m * j / r)
    if last:
        f = f * torch.polar(torch.full_like(j, math.sqrt(2.0)), -math.pi * j / (2 * r))
    fr, fi = f.real, f.imag
    p = torch.stack([torch.cat([fr, -fi], 1), torch.cat([fi, fr], 1)], 1).reshape(2 * r, 2 * r)
    q = torch.stack([torch.cat([-fi, -fr], 1), torch.cat([fr, -fi], 1)], 1).reshape(2 * r, 2 * r)
    if last:  # rows (X_k, X_(n-k)) = (Re, -Im)
        sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(r)[:, None]
        p, q = p * sign, q * sign
    return p, q


def _dct_chain_constants(radices: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Float64 constants of the real DCT-II chain (module docstring) and its output order
    (``order[i]``: the index of the DCT coefficient at position i)."""
    n, last_stage = math.prod(radices), len(radices) - 1
    first, units = _first_stage(radices[0], n, last_stage == 0)
    constants, length = {"stage0": first}, radices[0]
    for s, r in enumerate(radices[1:], start=1):
        last = s == last_stage
        special, new_units = _real_unit_block(r, length, n, last)
        frequencies = torch.tensor(units[1:], dtype=torch.float64)[:, None]  # complex units of the previous spectrum
        m = torch.arange(r, dtype=torch.float64)[None, :]
        theta = -2 * math.pi * m * frequencies / (length * r) - (math.pi * frequencies / (2 * n) if last else 0.0)
        constants[f"pattern_p{s}"], constants[f"pattern_q{s}"] = _twiddled_dft(r, n, last)
        constants[f"special{s}"] = special
        constants[f"twiddle_cos{s}"], constants[f"twiddle_sin{s}"] = torch.cos(theta), torch.sin(theta)
        units = new_units + [k + length * j for k in units[1:] for j in range(r)]
        length *= r
    order = [index for k in units for index in ((0, n // 2) if k is None else (k, n - k))]
    return constants, torch.tensor(order, dtype=torch.long)


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
    return torch.gather(x, -1, index.long().expand(x.shape[0], -1))


def _makhoul_index(n: int) -> torch.Tensor:
    """Index g with ``x[..., g]`` = Makhoul's reordering v = [x_0, x_2, ..., x_{n-2}, x_{n-1}, ..., x_3, x_1]."""
    m = torch.arange(n)
    return torch.where(m < n // 2, 2 * m, 2 * (n - 1 - m) + 1)


def rows_first(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along the first axis (ONNX Gather on axis 0: whole rows of M contiguous floats)."""
    return torch.index_select(x, 0, index)


class _RealDCT(_ConstantTransform):
    """The constants of the orthonormal DCT-II / DCT-III of size n and the two MatMul chains.

    The chains work on the *feature-major* layout (n, M) (M = rows of the batch), in Makhoul's input
    order (``gather_in``) and the chain's output order (``order``: the DCT coefficient at each
    position), so that ACDC gathers and multiplies by its diagonals once, on rows.
    """

    transposed = False  # the DCT-III's eager FFT path takes the inverse twiddle

    def __init__(self, n: int) -> None:
        if n < 2 or n % 2:
            raise ValueError(f"DCT size must be even and >= 2, got {n} (pad with compressor.transforms.dct_size)")
        self.radices = dct_radices(n)
        constants, order = _dct_chain_constants(self.radices)
        super().__init__(constants)
        self.n = n
        gather = _makhoul_index(n)
        self._register_indices({name: index.to(torch.int32)  # int32: half the bytes in the file
                                for name, index in (("gather_in", gather), ("gather_out", torch.argsort(gather)),
                                                    ("order", order), ("natural", torch.argsort(order)))})
        self._register_fft_constants(n)

    def stage_matrix(self, s: int) -> torch.Tensor:
        """Stage s >= 1 as (B, 2r, 2r) matrices: block 0 is the real unit's, the others are the
        twiddled DFT ``P cos(theta_b) + Q sin(theta_b)`` (computed from O(n) constants; ONNX Runtime
        folds it once when it loads the file)."""
        cos, sin = (getattr(self, f"twiddle_{f}{s}").repeat(1, 2)[:, None, :] for f in ("cos", "sin"))  # columns (re|im, m)
        twisted = getattr(self, f"pattern_p{s}") * cos + getattr(self, f"pattern_q{s}") * sin
        return torch.cat([getattr(self, f"special{s}")[None], twisted])

    def _blocks(self, s: int) -> torch.Tensor:
        """Stage s as (B, rows, columns) block matrices (the first stage is one block)."""
        return self.stage_matrix(s) if s else self.stage0[None]

    def stage_blocks(self) -> list[torch.Tensor]:
        """Every stage as (B, rows, columns) block matrices, in order. The DCT-II and DCT-III of one
        size have the same blocks, so a stack computes them once for all its layers and both
        directions (each computation is ~10 nodes of the traced graph, which the exporter pays for)."""
        return [self._blocks(s) for s in range(len(self.radices))]

    def chain(self, v: torch.Tensor, blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """DCT-II of v (n, M) given in Makhoul's order, in the chain's order (n, M); ``blocks``:
        :meth:`stage_blocks`, when the caller has them."""
        y = v
        for w in self.stage_blocks() if blocks is None else blocks:
            y = w @ y.reshape(w.shape[0], w.shape[2], -1)
        return y.reshape(self.n, -1)

    def chain_transposed(self, z: torch.Tensor, blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """DCT-III of z (n, M) given in the chain's order, in Makhoul's order (n, M): the transposed
        chain run backwards. (A diagonal folded into its first blocks would make per-layer copies of
        the largest constants, which ONNX Runtime's mobile format stores expanded.)"""
        y = z
        for w in reversed(self.stage_blocks() if blocks is None else blocks):
            w = w.transpose(-1, -2)
            y = w @ y.reshape(w.shape[0], w.shape[2], -1)
        return y.reshape(self.n, -1)

    def _register_fft_constants(self, n: int) -> None:
        """Twiddles of the eager FFT path (float64-exact real and imaginary parts): ``w_j s_j`` for the
        DCT-II, its inverse ``conj(w_j) / s_j`` for the DCT-III, j = 0 .. n/2 (see :func:`use_fft`)."""
        j = torch.arange(n // 2 + 1, dtype=torch.float64)
        s = torch.full_like(j, math.sqrt(2.0 / n))
        s[0] = math.sqrt(1.0 / n)
        w = torch.polar(torch.ones_like(j), -math.pi * j / (2 * n))
        twiddle = w.conj() / s if self.transposed else w * s
        # Half-complex layout (n/2 + 1, 2) of n coefficients X: [j, 0] = X_j, [j, 1] = -X_(n-j) (j >= 1).
        half = torch.arange(n // 2 + 1)
        im_source = torch.cat([torch.zeros(1, dtype=torch.long), n - half[1:]])
        self._register_indices({"half_complex_index": torch.stack([half, im_source], 1)})
        keep = torch.ones(n // 2 + 1, 2, dtype=torch.float64)
        keep[0, 1] = 0.0
        negate = keep * torch.tensor([1.0, -1.0], dtype=torch.float64)
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


class DCT2(_RealDCT):
    """Orthonormal DCT-II along the last dim: ``y = C x`` (== scipy.fft.dct(x, norm="ortho")).

    Shapes: (..., n) -> (..., n), n even with :func:`dct_radices` (:func:`dct_size` pads to such an
    n). Work per element: r_1 + 2 (r_2 + ... + r_S) multiply-adds (80 at 4096); constants O(n),
    shared by all layers of the same size after export.
    """

    def rfft_of_reordered(self, v: torch.Tensor) -> torch.Tensor:
        """The DCT-II (scaled) of x given as ``v = x[..., gather_in]`` (M, n), in the half-complex layout
        (M, n/2 + 1, 2), by ``torch.fft``: ``U = w s * RFFT(v)``, X_j = Re U_j and X_(n-j) = -Im U_j
        (Makhoul; v real, so V_(n-j) = conj V_j). The same function as the MatMul chain (eager PyTorch
        runs it about 3x faster: training), but with complex tensors, which do not export (:func:`use_fft`)."""
        return torch.view_as_real(torch.fft.rfft(v) * self._fft_twiddle(v.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coefficients = self.chain(rows_first(x.reshape(-1, self.n).T, self.gather_in))
        return rows_first(coefficients, self.natural).T.reshape(x.shape)


class DCT3(_RealDCT):
    """Orthonormal DCT-III, the inverse (and transpose) of :class:`DCT2`: ``x = C^T y``.

    Runs the DCT-II chain backwards with every stage transposed; shapes (..., n) -> (..., n).
    """

    transposed = True

    def irfft_reordered(self, layout: torch.Tensor) -> torch.Tensor:
        """The DCT-III of coefficients given in the half-complex layout (M, n/2 + 1, 2), as
        ``x[..., gather_in]`` (M, n): the inverse of :meth:`DCT2.rfft_of_reordered`,
        ``v = IRFFT(conj(w) / s * U)`` (the layout's [n/2, 1] must be -[n/2, 0], as a layout made by
        DCT2 times a diagonal in :meth:`half_complex_layout` is)."""
        return torch.fft.irfft(torch.view_as_complex(layout.contiguous()) * self._fft_twiddle(layout.dtype), self.n)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        reordered = self.chain_transposed(rows_first(y.reshape(-1, self.n).T, self.order))
        return rows_first(reordered, self.gather_out).T.reshape(y.shape)
