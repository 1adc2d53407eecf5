"""Each fast transform equals its dense reference, autograds, and exports without dense constants."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from compressor.transforms import DCT2, DCT3, WalshHadamard, dct_matrix, dct_size, hadamard_matrix, split_factors

DCT_SIZES = [2, 6, 8, 18, 64, 100, 512, 1024, 4096]
WHT_SIZES = [1, 2, 4, 8, 32, 128, 1024, 4096]


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


@pytest.mark.parametrize("n", WHT_SIZES)
def test_walsh_hadamard_matches_scipy(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    reference = x @ torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64)).T / np.sqrt(n)
    assert _rel(WalshHadamard(n).double()(x), reference) <= 1e-10
    assert _rel(WalshHadamard(n)(x.float()), reference.float()) <= 1e-5
    assert _rel(WalshHadamard(n).double()(WalshHadamard(n).double()(x)), x) <= 1e-10  # its own inverse


def test_dense_references_are_orthonormal():
    for n in (6, 64):
        c = dct_matrix(n)
        assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    h = hadamard_matrix(16)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("module", [DCT2(12), DCT3(12), WalshHadamard(16)], ids=["dct2", "dct3", "wht"])
def test_transforms_gradcheck(module):
    x = torch.randn(3, module.n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module.double(), (x,))


def test_transform_constants_are_not_in_state_dict():
    for module in (DCT2(64), DCT3(64), WalshHadamard(64)):
        assert module.state_dict() == {}


def test_sizes_and_bad_sizes():
    assert split_factors(4096) == (64, 64) and split_factors(9216) == (96, 96)
    assert dct_size(9216) == 9216 and dct_size(7) == 8 and dct_size(13) % 2 == 0
    a, b = split_factors(dct_size(997))
    assert b <= 4 * a
    with pytest.raises(ValueError):
        WalshHadamard(12)
    with pytest.raises(ValueError):
        DCT2(7)
