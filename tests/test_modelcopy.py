"""copy_model: computed tensors held anywhere in a model are copied detached; nothing else changes."""
from __future__ import annotations

import collections
import copy
import types

import pytest
import torch
from torch import nn

from compressor.modelcopy import copy_model


class OwnCopy:
    """An object with its own ``__deepcopy__`` that copies the tensor it holds."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __deepcopy__(self, memo: dict) -> "OwnCopy":
        return OwnCopy(copy.deepcopy(self.tensor, memo))


def test_computed_tensors_are_copied_detached_wherever_the_model_holds_them():
    model = nn.Linear(3, 3)
    computed = model(torch.randn(2, 3))
    model.namespace = types.SimpleNamespace(cached=computed)
    model.nested = {"a": [{"b": ({"c": computed},)}]}
    model.queue = collections.deque([computed, computed[0]])
    model.own = OwnCopy(computed)
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)

    copied = copy_model(model)
    held = [copied.namespace.cached, copied.nested["a"][0]["b"][0]["c"], copied.queue[0], copied.own.tensor]
    assert all(tensor is held[0] for tensor in held)  # one tensor stays one tensor
    assert not held[0].requires_grad and torch.equal(held[0], computed)
    assert copied.queue[1].untyped_storage().data_ptr() == held[0].untyped_storage().data_ptr()  # a view stays a view
    assert copied.weight is not model.weight and copied.weight.requires_grad and torch.equal(copied.weight, model.weight)
    with pytest.raises(RuntimeError, match="graph leaves"):  # torch's own deepcopy is put back
        copy.deepcopy(model)
