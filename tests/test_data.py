"""Data sources: .npz, .pt, module:function; deterministic hold-out; validation against the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.checkpoint import load_model
from compressor.data import HOLDOUT_FRACTION, check_against_model, load_data
from compressor.errors import DataError
from conftest import SAMPLES


def test_npz_with_validation_split_is_used_as_given():
    data = load_data(SAMPLES / "digits.npz")
    raw = np.load(SAMPLES / "digits.npz")
    assert torch.equal(data.x_val, torch.from_numpy(raw["x_val"])) and data.has_labels


def test_module_function_and_pt_sources_hold_out_deterministically(tmp_path):
    a = load_data("data_source:digits", seed=3)
    b = load_data("data_source:digits", seed=3)
    assert torch.equal(a.x_val, b.x_val)
    n = a.x_train.shape[0] + a.x_val.shape[0]
    assert a.x_val.shape[0] == round(HOLDOUT_FRACTION * n)
    torch.save({"x": a.x_train, "y": a.y_train}, tmp_path / "d.pt")
    c = load_data(tmp_path / "d.pt")
    assert c.x_train.shape[0] + c.x_val.shape[0] == a.x_train.shape[0]


def test_labels_are_optional(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.rand(50, 64).astype(np.float32))
    data = load_data(tmp_path / "x.npz")
    assert not data.has_labels and data.y_val is None
    assert check_against_model(data, load_model(SAMPLES / "mlp.pt").model) == 10


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "missing.npz")
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(DataError, match="key 'x'"):
        load_data(tmp_path / "nox.npz")
    np.savez(tmp_path / "float_labels.npz", x=np.zeros((4, 64), np.float32), y=np.array([0.5, 1, 2, 3]))
    with pytest.raises(DataError, match="integer"):
        load_data(tmp_path / "float_labels.npz")
