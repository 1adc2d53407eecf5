"""Deep copies of users' models, including models that keep computed tensors as plain attributes.

``copy.deepcopy`` refuses a tensor that autograd computed (not a graph leaf). A model can hold one
after any forward pass with gradients on: LeViT caches its attention biases in eval mode, and the
forward pass that surveys the model (:mod:`compressor.trace`) records the graph. Such tensors are
copied detached; parameters, buffers and everything else are copied as ``deepcopy`` copies them.
"""
from __future__ import annotations

import copy
from typing import Iterator, TypeVar

import torch
from torch import nn

__all__ = ["copy_model"]

M = TypeVar("M", bound=nn.Module)
NESTING = 3
"""How deep into dicts, lists and tuples held by a module the computed tensors are looked for."""


def copy_model(model: M) -> M:
    """``copy.deepcopy(model)``, with the computed tensors its modules hold copied detached."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for tensor in _tensors_in(list(vars(module).values()), NESTING):
            if not tensor.is_leaf:
                memo.setdefault(id(tensor), tensor.detach().clone())
    return copy.deepcopy(model, memo)


def _tensors_in(value: object, depth: int) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors_in(item, depth - 1)
