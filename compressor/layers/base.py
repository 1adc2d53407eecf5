"""What every fixclf structured layer shares: its dense equivalent and its parameter count."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune


def stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a checkpoint stores for ``module``: parameters and persistent buffers (e.g.
    permutations), each once however many names it has (a module or weight shared by two layers)."""
    seen: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for t in own_stored_tensors(m):
            seen.setdefault(id(t), t)
    return list(seen.values())


def own_stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and persistent buffers registered on ``module`` itself (not its children). A pruned
    weight (``torch.nn.utils.prune``: ``weight_orig`` and ``weight_mask``, multiplied before each call)
    counts once, as the weight it makes: its mask is in the zeros of that weight."""
    masks = {f"{name}_mask" for name in pruned_tensors(module)}
    persistent = [b for name, b in module._buffers.items() if name not in module._non_persistent_buffers_set | masks]
    return [t for t in [*module._parameters.values(), *persistent] if t is not None]


def pruned_tensors(module: nn.Module) -> set[str]:
    """The names of ``module``'s tensors that ``torch.nn.utils.prune`` computes before each call
    (``weight`` from ``weight_orig`` and ``weight_mask``)."""
    return {hook._tensor_name for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)}


def count_stored(module: nn.Module) -> int:
    """Numbers a checkpoint stores for ``module`` (:func:`stored_tensors`)."""
    return sum(t.numel() for t in stored_tensors(module))


@torch.no_grad()
def probe_affine(module: nn.Module, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(W, b)`` of an affine module, found by probing: ``b = f(0)``, ``W[:, j] = f(e_j) - b``.

    Valid only for modules that are affine in their input (a single ACDC layer, a stack built
    with ``relu=False``, Adaptive Fastfood). Returns W of shape (out, in) and b of shape (out,).
    """
    ref = next(iter(module.parameters()))
    probes = torch.cat([torch.zeros(1, in_features), torch.eye(in_features)]).to(ref)
    out = module(probes)
    bias = out[0]
    return (out[1:] - bias).T.contiguous(), bias.clone()


def check_counts(layer: str, **counts: object) -> None:
    """Each count (features, classes, depth) a layer is built with must be an integer >= 1: a zero, a
    fraction or a tensor fails at once with its name, not later inside a reshape."""
    for name, value in counts.items():
        try:
            whole = operator.index(value)  # Python and numpy integers
        except TypeError:
            whole = 0
        if isinstance(value, bool) or whole < 1:
            raise ValueError(f"{layer}: {name} must be an integer >= 1, got {value!r:.40}")


class DenseAttributeRead(AttributeError):
    """The model's own code read ``weight`` or ``bias`` of a layer fixclf replaced (``module``): what
    an ``nn.Linear`` has and the replacement does not (:func:`compressor.surgery.make_plan` keeps
    such layers dense)."""

    def __init__(self, module: nn.Module, attribute: str) -> None:
        super().__init__(f"{type(module).__name__} (which replaced an nn.Linear) has no {attribute!r}")
        self.module, self.attribute = module, attribute


class ReplacesLinear(nn.Module):
    """Base of every module that replaces an ``nn.Linear``: reading the dense ``weight`` or ``bias`` it
    does not have raises :class:`DenseAttributeRead` (an AttributeError, so ``hasattr`` stays False)."""

    in_features: int

    def rows(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """(..., in_features) -> (M, in_features). Refused as ``nn.Linear`` refuses them: inputs that are
        not floating point (an integer tensor would otherwise be rounded on the way back, or not, by
        path) and inputs whose last axis is not ``in_features`` (named here, not as a reshape error)."""
        if not input.is_floating_point():
            raise TypeError(f"{type(self).__name__} takes floating-point inputs, got {input.dtype}; convert them "
                            "(x.float())")
        if not torch.jit.is_tracing() and (input.dim() == 0 or input.shape[-1] != self.in_features):  # traced: shapes are tensors
            raise ValueError(f"{type(self).__name__} takes inputs (..., {self.in_features}), got shape "
                             f"{tuple(input.shape)}")
        return input.reshape(-1, self.in_features)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias"):
                raise DenseAttributeRead(self, name) from None
            raise


class StructuredLinear(ReplacesLinear):
    """Base of the structured replacements of ``nn.Linear(in_features, out_features)``.

    Each works on ``size >= in_features`` features: :meth:`forward` flattens the batch axes, zero-pads
    the rows to ``size`` and hands them to the subclass's :meth:`forward_rows`, which returns
    (M, out_features)."""

    in_features: int
    out_features: int
    size: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name: models call it as input=)
        """(..., in_features) -> (..., out_features)."""
        batch = input.shape[:-1]
        rows = self.rows(input)
        if self.size != self.in_features:
            rows = F.pad(rows, (0, self.size - self.in_features))
        return self.forward_rows(rows).reshape(*batch, self.out_features)

    def forward_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(M, size) zero-padded rows -> (M, out_features)."""
        raise NotImplementedError

    def dense_equivalent(self) -> nn.Linear:
        """The ``nn.Linear`` computing exactly this layer (for inspection and tests)."""
        weight, bias = probe_affine(self, self.in_features)
        linear = nn.Linear(self.in_features, self.out_features).to(weight)
        linear.weight.data.copy_(weight)
        linear.bias.data.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
