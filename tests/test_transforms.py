"""Each fast transform equals its dense reference, autograds, and exports without dense constants."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from compressor.transforms import (DCT2, DCT3, MAX_RADIX, KroneckerHadamard, WalshHadamard, dct_matrix, dct_radices,
                                  dct_size, dct_work, hadamard_matrix, kronecker_orders, kronecker_size)

DCT_SIZES = [2, 6, 8, 18, 64, 66, 100, 300, 512, 1000, 1024, 2048, 4096]
WHT_SIZES = [1, 2, 4, 8, 32, 128, 1024, 4096]
KRONECKER_SIZES = [3, 12, 96, 320, 1536, 9216]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("n", DCT_SIZES)
def test_dct2_matches_scipy(n):
    x = torch.randn(3, 4, n, dtype=torch.float64)
    reference = torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))
    assert _rel(DCT2(n).double()(x), reference) <= 1e-10
    assert _rel(DCT2(n)(x.float()), reference.float()) <= 1e-5


@pytest.mark.parametrize("n", DCT_SIZES)
def test_dct3_matches_scipy_and_inverts_dct2(n):
    y = torch.randn(5, n, dtype=torch.float64)
    reference = torch.from_numpy(scipy.fft.dct(y.numpy(), type=3, norm="ortho", axis=-1))
    assert _rel(DCT3(n).double()(y), reference) <= 1e-10
    assert _rel(DCT3(n)(y.float()), reference.float()) <= 1e-5
    assert _rel(DCT3(n).double()(DCT2(n).double()(y)), y) <= 1e-10


def _dct_ii(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis (scipy): x @ C^T for the dense C of dct_matrix."""
    return torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1))


def _inverse_dct_ii(y: torch.Tensor) -> torch.Tensor:
    """Its inverse, the DCT-III, along the last axis: y @ C."""
    return torch.from_numpy(scipy.fft.idct(y.numpy(), type=2, norm="ortho", axis=-1))


def _from_half_complex(layout: torch.Tensor, n: int) -> torch.Tensor:
    """Natural-order coefficients (M, n) from the FFT path's half-complex layout (M, n/2 + 1, 2)."""
    h = n // 2
    return torch.cat([layout[:, :, 0], -layout[:, 1:h, 1].flip(-1)], -1)


@pytest.mark.parametrize("n", [*DCT_SIZES, 9216])
def test_fft_path_dct2_and_dct3_match_scipy(n):
    """ACDC's eager path: RFFT in the half-complex layout and its IRFFT inverse, against scipy."""
    dct2, dct3 = DCT2(n), DCT3(n)
    x = torch.randn(4, n, dtype=torch.float64)
    v = x[:, dct2.gather_in]
    reference = _dct_ii(x)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        layout = dct2.to(dtype).rfft_of_reordered(v.to(dtype))
        assert _rel(_from_half_complex(layout, n), reference.to(dtype)) <= tolerance
        # the DCT-III of a layout (scaled by a diagonal, as ACDC does) is the dense C^T of its coefficients
        d = 1 + torch.rand(n, dtype=dtype)
        scaled = layout * dct2.half_complex_layout(d, negate_im=False) + dct2.half_complex_layout(d)
        inverse = dct3.to(dtype).irfft_reordered(scaled)[:, dct2.gather_out]
        expected = _inverse_dct_ii(reference * d.double() + d.double()).to(dtype)  # = (reference * d + d) @ C
        assert _rel(inverse, expected) <= tolerance


@pytest.mark.parametrize("n", WHT_SIZES)
def test_walsh_hadamard_matches_scipy(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    reference = x @ torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)).T / np.sqrt(n)
    assert _rel(WalshHadamard(n).double()(x), reference) <= 1e-10
    assert _rel(WalshHadamard(n)(x.float()), reference.float()) <= 1e-5
    assert _rel(WalshHadamard(n).double()(WalshHadamard(n).double()(x)), x) <= 1e-10  # its own inverse


@pytest.mark.parametrize("n", WHT_SIZES)
def test_walsh_hadamard_first_outputs_alone(n):
    """``keep`` (the head's truncation) gives exactly the first outputs, computed from fewer rows."""
    x = torch.randn(3, n, dtype=torch.float64)
    full = WalshHadamard(n).double()(x)
    for keep in {1, max(1, n // 3), n - 1, n} - {0}:
        assert _rel(WalshHadamard(n).double()(x, keep=keep), full[:, :keep]) <= 1e-12


@pytest.mark.parametrize("n", KRONECKER_SIZES)
def test_kronecker_hadamard_matches_its_scipy_construction(n):
    q = n // (n & -n)
    reference_matrix = np.kron(scipy.fft.dct(np.eye(q), axis=0, norm="ortho"), scipy.linalg.hadamard(n // q) / np.sqrt(n // q))
    x = torch.randn(2, 3, n, dtype=torch.float64)
    reference = x @ torch.from_numpy(reference_matrix).T
    assert _rel(KroneckerHadamard(n).double()(x), reference) <= 1e-10
    assert _rel(KroneckerHadamard(n)(x.float()), reference.float()) <= 1e-5
    back = KroneckerHadamard(n).double()(x) @ torch.from_numpy(reference_matrix)  # orthonormal: its transpose inverts it
    assert _rel(back, x) <= 1e-10


def test_kronecker_orders_and_sizes():
    assert kronecker_orders(4096) == (16, 16, 16) and kronecker_orders(9216) == (18, 16, 32)
    assert kronecker_orders(512) == (32, 16) and kronecker_orders(64) == (64,)
    for n in (*WHT_SIZES, *KRONECKER_SIZES):
        orders = kronecker_orders(n)
        assert np.prod(orders) == n and len(orders) <= 3 and sum(orders) <= 1.5 * len(orders) * n ** (1 / len(orders))
    assert kronecker_size(9216) == 9216 and kronecker_size(300) == 320 and kronecker_size(17) == 18
    assert all(kronecker_size(n) < 1.15 * n for n in range(16, 5000))  # never the 2x of the next power of two


def test_dense_references_are_orthonormal():
    for n in (6, 64):
        c = dct_matrix(n)
        assert torch.allclose(c, _dct_ii(torch.eye(n, dtype=torch.float64)).T, atol=1e-12)  # C @ x is scipy's DCT-II
        assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    h = hadamard_matrix(16)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("module", [DCT2(12), DCT3(12), WalshHadamard(16), WalshHadamard(4096), KroneckerHadamard(24)],
                         ids=["dct2", "dct3", "wht", "wht-3-stage", "kronecker"])
def test_transforms_gradcheck(module):
    x = torch.randn(2 if module.n > 1000 else 3, module.n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module.double(), (x,), fast_mode=module.n > 1000)


def test_transform_constants_are_not_in_state_dict():
    for module in (DCT2(64), DCT3(64), WalshHadamard(64), KroneckerHadamard(4096 * 3)):
        assert module.state_dict() == {}


def test_dct_chain_in_the_feature_major_layout():
    """ACDC's exported path: the chain on (n, M) in Makhoul's order gives the DCT-II in the chain's order,
    and the transposed chain of d * (C x) + b, both in that order, gives C^T (d * C x + b)."""
    for n in (6, 66, 300, 4096, 9216):
        dct2, dct3 = DCT2(n).double(), DCT3(n).double()
        x = torch.randn(n, 3, dtype=torch.float64)
        c_x = _dct_ii(x.T).T  # C @ x
        coefficients = dct2.chain(x[dct2.gather_in])
        assert _rel(coefficients, c_x[dct2.order]) <= 1e-10
        d, b = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
        back = dct3.chain_transposed(coefficients * d[dct2.order, None] + b[dct2.order, None])[dct2.gather_out]
        assert _rel(back, _inverse_dct_ii((d[:, None] * c_x + b[:, None]).T).T) <= 1e-10  # C^T (d * C x + b)


def test_dct_constants_are_linear_in_n():
    """The per-block stage matrices are computed from O(n) patterns and twiddles (the file holds those)."""
    for n in (512, 4096, 9216, 2**16):
        floats = sum(t.numel() for name, t in DCT2(n).named_buffers() if t.is_floating_point() and not name.startswith(("fft", "half")))
        assert floats <= 2.5 * n + 12 * MAX_RADIX**2, (n, floats)


def test_sizes_and_bad_sizes():
    assert dct_radices(4096) == (16, 16, 16) and dct_radices(512) == (32, 16) and dct_radices(64) == (64,)
    for n in (*DCT_SIZES, 9216, 2**17, 2**20):
        radices = dct_radices(n)
        assert np.prod(radices) == n and radices[0] % 2 == 0 and max(radices) <= MAX_RADIX
    assert dct_work(dct_radices(4096)) == 80 and dct_work(dct_radices(9216)) == 100  # multiply-adds per element
    assert dct_size(9216) == 9216 and dct_size(7) == 8 and dct_size(13) % 2 == 0
    for n in (997, 300, 1000, 5000, 2050, 134):
        m = dct_size(n)
        assert n <= m < 1.1 * n and dct_work(dct_radices(m)) <= 1.25 * (2 * len(dct_radices(m)) - 1) * m ** (1 / len(dct_radices(m)))
    with pytest.raises(ValueError):
        WalshHadamard(12)
    with pytest.raises(ValueError):
        DCT2(7)
    with pytest.raises(ValueError):
        dct_radices(2 * 67)  # a prime factor above MAX_RADIX: dct_size pads it
