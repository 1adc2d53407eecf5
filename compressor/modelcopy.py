"""Deep copies of users' models, including models that keep computed tensors as plain attributes.

``copy.deepcopy`` refuses a tensor that autograd computed (not a graph leaf). A model can hold one
after any forward pass with gradients on: LeViT caches its attention biases in eval mode, and the
forward pass that surveys the model (:mod:`compressor.trace`) records the graph. During the copy
such tensors are copied detached wherever the model holds them (module attributes, containers,
plain objects, objects with their own ``__deepcopy__``): ``torch.Tensor.__deepcopy__`` is wrapped
for the duration of the copy, under a lock, and put back afterwards. A detached tensor shares its
storage, so views of one storage stay views of one copied storage. Parameters, buffers and
everything else are copied as ``deepcopy`` copies them; what ``deepcopy`` itself cannot copy (an
open file, a lock) still raises its own error.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from typing import Iterator, TypeVar

import torch
from torch import nn

__all__ = ["copy_model"]

M = TypeVar("M", bound=nn.Module)
_TENSOR_DEEPCOPY_PATCHED = threading.Lock()


def copy_model(model: M) -> M:
    """``copy.deepcopy(model)``, with the computed (non-leaf) tensors it holds copied detached."""
    with _computed_tensors_copied_detached():
        return copy.deepcopy(model)


@contextlib.contextmanager
def _computed_tensors_copied_detached() -> Iterator[None]:
    original = torch.Tensor.__deepcopy__
    detached_while_copying: list[torch.Tensor] = []  # alive until the copy ends, so that no id in memo is reused

    def deepcopy_detached(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
        if tensor.is_leaf:
            return original(tensor, memo)
        detached = tensor.detach()
        detached_while_copying.append(detached)
        memo[id(tensor)] = original(detached, memo)
        return memo[id(tensor)]

    with _TENSOR_DEEPCOPY_PATCHED:
        torch.Tensor.__deepcopy__ = deepcopy_detached
        try:
            yield
        finally:
            torch.Tensor.__deepcopy__ = original
