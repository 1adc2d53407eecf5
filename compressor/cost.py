"""What a replacement costs at run time: each planned layer timed alone in ONNX Runtime, dense and structured.

Each Linear layer sees inputs of shape (batch, *tokens, in_features) in the real model (a ViT's
qkv layer sees (batch, tokens, features); a Mixer's token-mixing layer sees (batch, features,
tokens)). :func:`layer_shapes` finds those shapes by running the model once on two rows of real
data; :func:`measure` exports the dense layer and its planned replacement alone, with that shape,
and times both together in ONNX Runtime (:func:`compressor.runtime.paired_latency`: thread
spinning off, alternating rounds) at batch 1 with 1 thread (how ONNX Runtime Mobile runs) and at
the latency batch with 2 threads. Layers with the same kind, options (seed aside) and shape are
timed once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import runtime
from .export import to_onnx
from .surgery import LayerPlan
from .trace import layer_inputs

__all__ = ["LayerCost", "layer_shapes", "measure", "MOBILE_THREADS", "BATCH_THREADS"]

MOBILE_THREADS = 1
BATCH_THREADS = 2
TIMING_RUNS = 20


@dataclass
class LayerCost:
    """ORT latency (ms, median) of one layer alone: dense and structured, at batch 1 and batch N."""

    tokens: list[int]
    batch: int
    dense_batch1_ms: float
    structured_batch1_ms: float
    dense_batch_ms: float
    structured_batch_ms: float

    @property
    def slower_at_batch1(self) -> bool:
        return self.structured_batch1_ms > self.dense_batch1_ms


def layer_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The middle axes (tokens) of each named layer's input when ``model`` runs on ``example``."""
    return layer_inputs(model.eval(), names, example, lambda inputs: tuple(inputs.shape[1:-1]))


def _time(dense: nn.Module, structured: nn.Module, shape: tuple[int, ...], batch: int) -> LayerCost:
    """Batch-1 (1 thread) and batch-N (2 threads) latency of ``dense`` and ``structured`` alone on
    inputs (b, *shape), each pair timed together (:func:`compressor.runtime.paired_latency`)."""
    with torch.no_grad():
        example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        files = [to_onnx(module.eval(), example).proto.SerializeToString() for module in (dense, structured)]
    one = runtime.paired_latency(files, torch.randn(1, *shape), threads=MOBILE_THREADS, runs=TIMING_RUNS)
    many = runtime.paired_latency(files, torch.randn(batch, *shape), threads=BATCH_THREADS, runs=TIMING_RUNS)
    return LayerCost(list(shape[:-1]), batch, one[0].median, one[1].median, many[0].median, many[1].median)


def measure(model: nn.Module, plan: list[LayerPlan], tokens: dict[str, tuple[int, ...]], batch: int) -> dict[str, LayerCost]:
    """Time every replaced layer of ``plan`` (dense ``model`` layers vs their replacements) at its real shape."""
    costs: dict[str, LayerCost] = {}
    seen: dict[tuple, LayerCost] = {}
    for entry in plan:
        if not entry.replaced or entry.name not in tokens:
            continue
        shape = (*tokens[entry.name], entry.in_features)
        key = (entry.kind, entry.in_features, entry.out_features, shape,
               tuple(sorted((k, v) for k, v in entry.options.items() if k != "seed")))
        if key not in seen:
            seen[key] = _time(model.get_submodule(entry.name), entry.build(), shape, batch)
        costs[entry.name] = seen[key]
    return costs
