"""Planning and initialisation on a trained sample: what is replaced, and how it starts."""
from __future__ import annotations

import copy

import pytest
import torch

from compressor.checkpoint import load_model
from compressor.data import load_data
from compressor.errors import PlanError
from compressor.surgery import ALPHA_START, _capture_inputs, apply_plan, initialise_from_dense, make_plan
from conftest import SAMPLES


@pytest.fixture(scope="module")
def mlp_and_data():
    loaded = load_model(SAMPLES / "mlp.pt")
    return loaded.model, load_data(loaded.data)


def _layer_errors(original, compressed, plan, x):
    hidden = [p.name for p in plan if p.role == "hidden"]
    inputs = _capture_inputs(original, hidden, x)
    with torch.no_grad():
        return [float((compressed.get_submodule(n)(inputs[n]) - original.get_submodule(n)(inputs[n])).norm()
                      / original.get_submodule(n)(inputs[n]).norm()) for n in hidden]


def test_fit_init_approximates_the_dense_layers_better_than_thesis_init(mlp_and_data):
    original, data = mlp_and_data
    plan = make_plan(original)
    errors = {}
    for init in ("thesis", "fit"):
        compressed = apply_plan(copy.deepcopy(original), plan)
        initialise_from_dense(original, compressed, plan, data.x_train[:512], hidden_init=init)
        errors[init] = _layer_errors(original, compressed, plan, data.x_val)
    assert all(f < 0.8 * t for f, t in zip(errors["fit"], errors["thesis"])), errors


def test_head_starts_from_the_original_class_prior(mlp_and_data):
    original, data = mlp_and_data
    plan = make_plan(original)
    compressed = apply_plan(copy.deepcopy(original), plan)
    initialise_from_dense(original, compressed, plan, data.x_train[:512])
    head = compressed.get_submodule(plan[-1].name)
    with torch.no_grad():
        prior = original(data.x_train[:512]).mean(0)
    assert torch.allclose(head.bias, prior, atol=1e-5) and float(head.alpha) == pytest.approx(ALPHA_START)
    with pytest.raises(PlanError):
        initialise_from_dense(original, compressed, plan, data.x_train[:8], hidden_init="random")


def test_plan_is_a_pure_function_of_the_model(mlp_and_data):
    original, _ = mlp_and_data
    state = copy.deepcopy(original.state_dict())
    plan = make_plan(original, hidden="fastfood", include=["2", "4"])
    assert [(p.name, p.kind) for p in plan] == [("0", None), ("2", "fastfood"), ("4", "hadamard")]
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())
