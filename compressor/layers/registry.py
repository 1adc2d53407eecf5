"""The layer registry: one :class:`LayerSpec` per replacement kind, the only place kinds are named.

A spec says what a kind replaces (its ``role``: the classification ``head`` or a ``hidden`` FC
layer), its options with their defaults and limits, how to build it for a dense
``nn.Linear(in_features, out_features)``, whether it can at that shape, and how to initialise it
from the dense layer it replaces. Plans read from a checkpoint are checked against the same
limits, so a file can never ask for more than the command line could.

Adding a kind (say low-rank, Monarch or butterfly) is one file with its ``nn.Module`` and one
``register(LayerSpec(...))`` line below; the CLI's choices, the plan, the checkpoint loader and
the trainer's parameter groups all follow from the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..options import DEPTH_MAX, PlanOptions
from .acdc import ACDCStack
from .fastfood import AdaptiveFastfood
from .heads import HadamardHead, OrthogonalHead, fixed_head_refusal, hadamard_head_refusal

__all__ = ["Option", "LayerSpec", "REGISTRY", "register", "spec_for", "kinds", "ALPHA_START", "FIT_STEPS",
           "init_head_from_dense", "fit_to_dense"]

ALPHA_START = 1.0
"""A fixed head starts with this alpha (see :func:`init_head_from_dense`)."""
FIT_STEPS = 100
"""Adam steps of the least-squares fit of a hidden layer to its dense layer (``--init fit``)."""
SEED_LIMIT = 2**64 - 1


@dataclass(frozen=True)
class Option:
    """One option of a kind: an integer in [low, high] or a bool (``low`` / ``high`` ignored)."""

    name: str
    default: int | bool
    low: int = 0
    high: int = 0

    def check(self, value) -> None:
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"option {self.name} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise ValueError(f"option {self.name} must be an integer in [{self.low}, {self.high}], got {value!r}")


COMMON_OPTIONS = (Option("seed", 0, 0, SEED_LIMIT), Option("bias", True))
"""Every kind: ``seed`` fixes its permutations / placements / initial values without touching
the global RNG; ``bias`` follows the dense layer it replaces (``bias=False`` stays bias-free)."""


@torch.no_grad()
def init_head_from_dense(head: nn.Module, dense: nn.Linear, x: torch.Tensor, fit: bool = False) -> None:
    """A fixed head starts from the original's class prior: ``b = mean(dense(x))`` over the
    calibration rows ``x`` (M, N) and alpha = :data:`ALPHA_START`. Q is fixed and unrelated to the
    trained class vectors, so a feature's cosine with a code row is about 1/sqrt(N) and the logits
    start within about alpha/sqrt(N) of the prior; distillation moves the features into Q's code
    space while alpha grows (learned as its logarithm: :mod:`~compressor.layers.heads`; measured
    better than matching the original logit spread: surgery.py docstring). ``fit`` does not apply
    to heads."""
    head.set_alpha(ALPHA_START)
    if head.bias is not None:
        head.bias.copy_(dense(x).mean(0))


def fit_to_dense(module: nn.Module, dense: nn.Linear, x: torch.Tensor | None, fit: bool = False) -> None:
    """With ``fit``, least squares on calibration activations: min ||module(x) - dense(x)||^2
    (:data:`FIT_STEPS` Adam steps, cosine schedule); without it the layer's own start stays (ACDC's near-identity
    layers, Fastfood's random map) and ``x`` is None (never captured)."""
    if not fit:
        return
    with torch.no_grad():
        target = dense(x)
    optimiser = torch.optim.Adam(module.parameters(), lr=0.02)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, FIT_STEPS)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            optimiser.zero_grad()
            torch.mean((module(x) - target) ** 2).backward()
            optimiser.step()
            schedule.step()


MAX_FEATURES = 1 << 20
"""Widest layer any kind is built for (CaffeNet's widest is 9216): a bound on what a plan read from a
file can make fixclf allocate."""


def _always(in_features: int, out_features: int) -> str:
    if max(in_features, out_features) > MAX_FEATURES:
        return f"layers wider than {MAX_FEATURES:,} features are not supported"
    return ""


def _hadamard_fits(in_features: int, out_features: int) -> str:
    if _always(in_features, out_features):
        return _always(in_features, out_features)
    refusal = hadamard_head_refusal(in_features, out_features)
    if not refusal:
        return ""
    advice = "--head keep" if fixed_head_refusal(in_features) else "--head orthogonal or --head keep"
    return f"{refusal}; use {advice}"


def _orthogonal_fits(in_features: int, out_features: int) -> str:
    if _always(in_features, out_features):
        return _always(in_features, out_features)
    refusal = fixed_head_refusal(in_features)
    if refusal:
        return f"{refusal}; use --head keep"
    if in_features * out_features > MAX_FEATURES * 64:
        return f"an orthogonal head stores C x N numbers; {out_features} x {in_features} is too large: use --head hadamard"
    return ""


@dataclass(frozen=True)
class LayerSpec:
    """One replacement kind. ``build(in_features, out_features, **options)`` makes the module;
    ``unsupported(in, out)`` returns why it cannot replace that shape ("" when it can)."""

    kind: str
    role: str  # "head" or "hidden"
    build: Callable[..., nn.Module]
    summary: str
    options: tuple[Option, ...] = COMMON_OPTIONS
    init_from_dense: Callable[..., None] = fit_to_dense
    unsupported: Callable[[int, int], str] = _always
    replaces: tuple[type[nn.Module], ...] = field(default=(nn.Linear,))

    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}

    def check_options(self, options: dict) -> dict:
        """Options exactly as this kind defines them, each in range; raises ValueError otherwise."""
        if not isinstance(options, dict):
            raise ValueError(f"options of {self.kind} must be a mapping, got {type(options).__name__}")
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{self.kind} has no option {unknown[0]!r} (options: {', '.join(known)})")
        merged = self.defaults() | options
        for name, value in merged.items():
            known[name].check(value)
        return merged

    def make(self, in_features: int, out_features: int, options: dict) -> nn.Module:
        return self.build(in_features, out_features, **self.check_options(options))


REGISTRY: dict[tuple[str, str], LayerSpec] = {}


def register(spec: LayerSpec) -> LayerSpec:
    """Add a kind; its (role, kind) must be new."""
    key = (spec.role, spec.kind)
    if key in REGISTRY:
        raise ValueError(f"layer kind {spec.kind!r} is already registered for role {spec.role}")
    REGISTRY[key] = spec
    return spec


def spec_for(role: str, kind: str) -> LayerSpec:
    """The spec of ``kind`` for ``role``; KeyError when there is none."""
    return REGISTRY[(role, kind)]


def kinds(role: str) -> tuple[str, ...]:
    """Registered kinds for ``role``, in registration order."""
    return tuple(kind for r, kind in REGISTRY if r == role)


register(LayerSpec("hadamard", "head", HadamardHead, "fixed truncated Hadamard head: alpha and bias stored",
                   init_from_dense=init_head_from_dense, unsupported=_hadamard_fits))
register(LayerSpec("orthogonal", "head", OrthogonalHead, "fixed random orthogonal head (C x N stored buffer)",
                   init_from_dense=init_head_from_dense, unsupported=_orthogonal_fits))
register(LayerSpec("acdc", "hidden", ACDCStack, "ACDC stack: K x (A, DCT, D, IDCT) with ReLU and permutations",
                   options=(*COMMON_OPTIONS, Option("depth", PlanOptions.depth, 1, DEPTH_MAX))))
register(LayerSpec("fastfood", "hidden", AdaptiveFastfood, "Adaptive Fastfood: S H G Pi H B"))
