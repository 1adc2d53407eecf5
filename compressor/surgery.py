"""Find a classifier's dense layers, plan their replacement, replace them, initialise from the dense ones.

The **head** is the model's last ``nn.Linear`` (in module registration order); every other
``nn.Linear`` is a **hidden** FC layer. ``include`` / ``exclude`` are fnmatch patterns on module
names (``classifier.*``); a pattern that matches no Linear layer is an error, not a silent no-op.

Initialisation from the trained model (DESIGN: "fit each structured layer to the dense layer it
replaces"): with calibration activations X captured at each layer's input in the original model,

* hidden layers: minimise ||f(X) - (X W^T + b)||^2 over the structured parameters with Adam
  (:data:`FIT_STEPS` steps; the diagonals have few parameters so this takes well under a second);
* head: alpha and b by least squares so that ``alpha * Q x_hat + b`` matches the original
  logits z (one scalar alpha: alpha = cov(u, z) / var(u) over all entries, u = Q x_hat; then
  b_c = mean(z_c - alpha u_c)).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import PlanError
from .layers import HEADS, HIDDEN, FixedHead, count_stored

__all__ = ["LayerPlan", "make_plan", "apply_plan", "initialise_from_dense", "FIT_STEPS"]

FIT_STEPS = 300


@dataclass
class LayerPlan:
    """One Linear layer: what replaces it (``kind`` None: kept, ``reason`` says why)."""

    name: str
    role: str  # "head" or "hidden"
    in_features: int
    out_features: int
    params_before: int
    kind: str | None
    options: dict
    params_after: int
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _build(entry: dict) -> nn.Module:
    registry = HEADS if entry["role"] == "head" else HIDDEN
    return registry[entry["kind"]](entry["in_features"], entry["out_features"], **entry["options"])


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def make_plan(
    model: nn.Module,
    *,
    head: str = "hadamard",
    hidden: str = "acdc",
    depth: int = 2,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    seed: int = 0,
) -> list[LayerPlan]:
    """Decide, without touching the model, what replaces each Linear layer."""
    if head not in (*HEADS, "keep"):
        raise PlanError(f"unknown --head {head!r}; choose one of {', '.join([*HEADS, 'keep'])}")
    if hidden not in (*HIDDEN, "keep"):
        raise PlanError(f"unknown --hidden {hidden!r}; choose one of {', '.join([*HIDDEN, 'keep'])}")
    if depth < 1:
        raise PlanError(f"--depth must be >= 1, got {depth}")
    linears = _linear_layers(model)
    if not linears:
        raise PlanError("the model has no nn.Linear layer, so there is nothing to replace; fixclf compresses FC layers")
    names = [n for n, _ in linears]
    for pattern in [*(include or []), *(exclude or [])]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise PlanError(f"pattern {pattern!r} matches no Linear layer; layers are: {', '.join(names)}")
    plan = []
    for index, (name, linear) in enumerate(linears):
        role = "head" if index == len(linears) - 1 else "hidden"
        kind = head if role == "head" else hidden
        before = count_stored(linear)
        reason = ""
        if kind == "keep":
            reason = f"--{role} keep"
        elif include and not _matches(name, include):
            reason = "not matched by --include"
        elif exclude and _matches(name, exclude):
            reason = "matched by --exclude"
        if reason:
            plan.append(LayerPlan(name, role, linear.in_features, linear.out_features, before, None, {}, before, reason))
            continue
        options = {"seed": seed + index} | ({"depth": depth} if kind == "acdc" else {})
        entry = LayerPlan(name, role, linear.in_features, linear.out_features, before, kind, options, 0)
        entry.params_after = count_stored(_build(entry.as_dict()))
        plan.append(entry)
    if all(p.kind is None for p in plan):
        raise PlanError("no layer would be replaced (all kept or filtered out); relax --include/--exclude or --head/--hidden")
    return plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: list[LayerPlan] | list[dict]) -> nn.Module:
    """Replace, in place, each planned Linear by its freshly built structured module; returns model."""
    for entry in plan:
        entry = entry.as_dict() if isinstance(entry, LayerPlan) else entry
        if entry["kind"] is not None:
            _set_submodule(model, entry["name"], _build(entry))
    return model


@torch.no_grad()
def _capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: captured.__setitem__(n, args[0].detach()))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _fit_hidden(module: nn.Module, dense: nn.Linear, x: torch.Tensor) -> None:
    target = dense(x).detach()
    optimiser = torch.optim.Adam(module.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, FIT_STEPS)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            optimiser.zero_grad()
            loss = torch.mean((module(x) - target) ** 2)
            loss.backward()
            optimiser.step()
            scheduler.step()


@torch.no_grad()
def _fit_head(head: FixedHead, dense: nn.Linear, x: torch.Tensor) -> None:
    z = dense(x)
    x_hat = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + head.eps)
    u = head.codes(x_hat)
    u_centred, z_centred = u - u.mean(0), z - z.mean(0)
    alpha = (u_centred * z_centred).sum() / u_centred.pow(2).sum().clamp_min(1e-12)
    alpha = alpha.clamp_min(1e-3)  # a negative scale would flip every class code
    head.alpha.copy_(alpha)
    if head.bias is not None:
        head.bias.copy_((z - alpha * u).mean(0))


def initialise_from_dense(original: nn.Module, compressed: nn.Module, plan: list[LayerPlan], x: torch.Tensor) -> None:
    """Fit each replaced layer of ``compressed`` to the dense layer it replaced in ``original``.

    ``x``: calibration inputs of the whole model (M, ...); each layer is fitted on the
    activations the *original* model feeds it.
    """
    replaced = [p for p in plan if p.kind is not None]
    inputs = _capture_inputs(original, [p.name for p in replaced], x)
    for entry in replaced:
        dense = original.get_submodule(entry.name)
        module = compressed.get_submodule(entry.name)
        if entry.role == "head":
            _fit_head(module, dense, inputs[entry.name])
        else:
            _fit_hidden(module, dense, inputs[entry.name])
