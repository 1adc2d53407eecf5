"""Find a classifier's dense layers, plan their replacement, replace them, initialise from the dense ones.

The **head** is the ``nn.Linear`` that makes the logits: with an example input (``compress``
always has one, ``plan`` when there is data), a Linear of the output's width whose output reaches
the model's output, in the autograd graph of one forward pass, through sums, scales, averages,
reshapes, selections and softmax only (:data:`LOGIT_PRESERVING`; so a head
registered before the body, or an auxiliary Linear registered after it, does not fool it; a model
that averages two heads, like DeiT's distilled ones, has two; a model whose logits come from no
Linear, such as a feature extractor ending in a normalisation, has none); without an example, the
last Linear in registration order. Every other ``nn.Linear`` is a **hidden** FC layer; a Linear the forward
pass never calls stays dense (``nn.MultiheadAttention``'s ``out_proj``, whose weights its owner
reads directly, an unused auxiliary head). A subclass of ``nn.Linear`` (timm's ``Linear``, a
weight-normalised layer) is replaced only when the example shows that it computes
``x W^T + b`` from its ``weight`` and ``bias``; without an example it stays dense. A model that is
itself one ``nn.Linear`` is a head. A Linear registered under several
names (``self.b = self.a``) is planned once and replaced under every name, so the tie holds.
``include`` / ``exclude`` are fnmatch patterns on module names (``classifier.*``); a pattern that
matches no Linear layer is an error, not a silent no-op. Which kind replaces a layer, with which
options and limits, comes from the registry (:mod:`compressor.layers.registry`); each replacement
keeps the dense layer's choice of bias, and a hidden layer whose replacement would store more
numbers than it does stays dense (a tiny layer; the reason says so).

Initialisation from the trained model, with calibration activations X captured at each layer's
input in the original model (each spec's ``init_from_dense``):

* head: b = the original's mean logits over the calibration rows (its class prior), and alpha
  starts small. Measured while building it (MLP sample, 3 seeds, default budget): starting alpha
  from a least-squares fit to the original logits ended 0.3-0.6 pp lower, and matching the spread
  of the original logits (DESIGN's suggestion) 0.6-2 pp lower: its large random logits at the
  start disturb the new hidden layers.
* hidden layers (``fit``): False (default) keeps the thesis initialisation, diagonals
  N(1, sigma^2), near identity; True first fits each structured layer to its dense layer by
  least squares on the calibration activations. The fit approximates the dense layers much better
  (tests/test_surgery.py) but, measured with the default budget on seeds 0/1/2, ends no more
  accurate after distillation: MLP 98.61 / 98.89 / 98.61% with the fit against 98.89% for all
  three with the thesis start; CNN 98.61 / 99.16 / 98.89% against 99.44 / 99.44 / 98.89%. A
  3n-parameter layer cannot represent the dense map (relative fit error 0.4-0.5), and the
  near-identity start keeps the information the next layer needs.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PlanError
from .layers import count_stored, spec_for
from .layers.registry import LayerSpec
from .options import KEEP, PlanOptions

__all__ = ["LayerPlan", "make_plan", "keep_dense", "apply_plan", "initialise_from_dense", "linear_layers",
           "replaced_parameters", "with_dense_layer"]


@dataclass
class LayerPlan:
    """One Linear layer and what replaces it (``kind`` None: kept, ``reason`` says why).

    The only in-memory form of a plan; :mod:`compressor.checkpoint` alone turns it into plain data.
    """

    name: str  # module path in the model ("" when the model is itself the Linear)
    role: str  # "head" or "hidden"
    in_features: int
    out_features: int
    params_before: int
    kind: str | None
    options: dict = field(default_factory=dict)
    params_after: int = 0
    reason: str = ""

    @property
    def replaced(self) -> bool:
        return self.kind is not None

    @property
    def spec(self) -> LayerSpec:
        return spec_for(self.role, self.kind)

    def build(self) -> nn.Module:
        """A freshly built replacement (deterministic: the options carry its seed)."""
        return self.spec.make(self.in_features, self.out_features, self.options)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` module (subclasses included), each once, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(names: list[str], options: PlanOptions) -> None:
    for pattern in [*options.include, *options.exclude]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise PlanError(f"pattern {pattern!r} matches no Linear layer; layers are: {', '.join(names) or '(the model)'}")


def _kept_reason(name: str, role: str, kind: str, options: PlanOptions) -> str:
    if kind == KEEP:
        return f"--{role} keep"
    if options.include and not _matches(name, options.include):
        return "not matched by --include"
    if options.exclude and _matches(name, options.exclude):
        return "matched by --exclude"
    return ""


def _plan_layer(index: int, name: str, linear: nn.Linear, role: str, options: PlanOptions, seed: int,
                blocked: str = "") -> LayerPlan:
    """The plan of one Linear; ``blocked``: why the forward pass rules it out ("" when it does not)."""
    kind = options.head if role == "head" else options.hidden
    before = count_stored(linear)
    entry = LayerPlan(name, role, linear.in_features, linear.out_features, before, None, {}, before)
    entry.reason = _kept_reason(name, role, kind, options) or blocked
    if entry.reason:
        return entry
    spec = spec_for(role, kind)
    entry.reason = spec.unsupported(linear.in_features, linear.out_features)
    if entry.reason:
        raise PlanError(f"layer {name or '(the model)'}: {entry.reason}")
    chosen = {"seed": seed + index, "bias": linear.bias is not None}
    if "depth" in spec.defaults():
        chosen["depth"] = options.depth
    entry.kind, entry.options = kind, spec.check_options(chosen)
    after = count_stored(entry.build())
    if role == "hidden" and after >= before:  # a head's kind is the user's explicit choice (orthogonal stores Q)
        return replace(entry, kind=None, options={}, reason=f"its {kind} form would store {after:,} numbers, the "
                                                              f"dense layer {before:,}")
    entry.params_after = after
    return entry


NOT_CALLED = "not called by the forward pass"


def _subclass_reason(linear: nn.Linear) -> str:
    return (f"an nn.Linear subclass ({type(linear).__name__}) whose output is not x W^T + b from its weight and bias; "
            "fixclf replaces it only when the forward pass on the data shows that it is")


@dataclass
class _Trace:
    """What one forward pass on an example shows about the Linear layers (:func:`_trace`)."""

    called: list[str]  # in the order of their first call
    affine: set[str]  # called, and their output there is F.linear(x, weight, bias)
    final: set[str] | None  # whose outputs reach the model's output through no other Linear (None: no graph)
    width: int | None  # the output's last dimension (None: not a tensor)


LOGIT_PRESERVING = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Mean", "Sum", "Amax", "Max", "View", "UnsafeView", "Reshape", "ReshapeAlias",
    "Select", "Slice", "Index", "IndexSelect", "Transpose", "Permute", "Squeeze", "Unsqueeze", "Cat", "Stack", "Split",
    "SplitWithSizes", "Unbind", "Clone", "ToCopy", "Expand", "Flip", "AsStrided", "Alias", "Softmax", "LogSoftmax",
    "AvgPool2D", "AdaptiveAvgPool2D", "AvgPool1D", "AdaptiveAvgPool1D"})
"""Autograd nodes (``<Name>Backward<n>``) through which a head's output still is the logits: sums,
scales, averages, reshapes, selections, (log-)softmax. A path through anything else (a
normalisation, an activation, a matmul) makes what it carries features, not logits."""


def _node_kind(node) -> str:
    return type(node).__name__.rstrip("0123456789").removesuffix("Backward")


def _final_linears(output: torch.Tensor, produced_by: dict) -> set[str] | None:
    """The Linears whose outputs the autograd graph of ``output`` reaches through
    :data:`LOGIT_PRESERVING` nodes only (``produced_by``: grad_fn of each Linear output -> its name)."""
    if output.grad_fn is None:
        return None
    final, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced_by:
            final.add(produced_by[node])
        elif _node_kind(node) in LOGIT_PRESERVING:
            stack.extend(parent for parent, _ in node.next_functions)
    return final


def _forward_with_graph(model: nn.Module, example: torch.Tensor):
    """``model(example)`` recording the autograd graph (through the parameters; nothing is trained);
    a forward pass that cannot run with gradients on (an in-place op it does on a parameter) runs
    without, and then only the order of the calls tells the head."""
    try:
        with torch.enable_grad():
            return model(example)
    except RuntimeError:
        with torch.no_grad():
            return model(example)


def _trace(model: nn.Module, linears: list[tuple[str, nn.Linear]], example: torch.Tensor) -> _Trace:
    """Run ``model`` on ``example`` with hooks on every Linear (gradients recorded, nothing trained),
    then once more without them: the forward pass must be deterministic."""
    trace, produced_by = _Trace([], set(), None, None), {}

    def seen(name: str, linear: nn.Linear, x: torch.Tensor, out) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            produced_by[out.grad_fn] = name
        if name in trace.called:
            return
        trace.called.append(name)
        with torch.no_grad():
            if type(linear) is nn.Linear or (isinstance(out, torch.Tensor) and torch.allclose(
                    out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)):
                trace.affine.add(name)

    hooks = [linear.register_forward_hook(lambda m, args, out, name=name: seen(name, m, args[0], out))
             for name, linear in linears]
    try:
        output = _forward_with_graph(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(output, torch.Tensor) or not output.dim():
        return trace
    with torch.no_grad():
        if not torch.allclose(model(example), output.detach(), rtol=1e-5, atol=1e-6, equal_nan=True):
            raise PlanError("the model's output differs between two runs on the same rows (dropout or sampling active "
                            "in eval mode?); fixclf distils and validates a deterministic forward: make it depend on "
                            "self.training (e.g. F.dropout(x, training=self.training))")
    trace.final, trace.width = _final_linears(output, produced_by), output.shape[-1]
    return trace


def _survey(model: nn.Module, linears: list[tuple[str, nn.Linear]],
            example: torch.Tensor | None) -> tuple[set[str], dict[str, str]]:
    """The heads' names and, per Linear the forward pass rules out, the reason (module docstring)."""
    if example is None:
        blocked = {name: _subclass_reason(linear) for name, linear in linears if type(linear) is not nn.Linear}
        return {linears[-1][0]}, blocked
    trace = _trace(model, linears, example)
    if trace.width is not None and trace.width < 2:
        raise PlanError(f"the model has {trace.width} output: fixclf distils classifiers through the softmax of their "
                        "logits, which needs at least 2 (give a one-logit binary model a second logit, e.g. (0, z))")
    blocked = {name: NOT_CALLED if name not in trace.called else _subclass_reason(linear)
               for name, linear in linears if name not in trace.affine}
    shapes = dict(linears)
    heads = [name for name in trace.called if name in trace.affine
             and (trace.width is None or shapes[name].out_features == trace.width)]
    if trace.final is not None:
        return {name for name in heads if name in trace.final}, blocked
    return set(heads[-1:]), blocked


def make_plan(model: nn.Module, options: PlanOptions | None = None, *, seed: int = 0,
              example: torch.Tensor | None = None) -> list[LayerPlan]:
    """Decide, without touching the model, what replaces each Linear layer. ``example``: a few input
    rows (M, ...), with which the heads and the Linears the forward pass calls are found (module
    docstring); without them the head is the last Linear registered."""
    options = options or PlanOptions()
    options.validate()
    linears = linear_layers(model)
    if not linears:
        raise PlanError("the model has no nn.Linear layer, so there is nothing to replace; fixclf compresses FC layers")
    _check_patterns([n for n, _ in linears], options)
    heads, blocked = _survey(model, linears, example)
    plan = [_plan_layer(i, name, linear, "head" if name in heads else "hidden", options, seed, blocked.get(name, ""))
            for i, (name, linear) in enumerate(linears)]
    if not any(p.replaced for p in plan):
        if example is None and blocked:
            raise PlanError("no layer would be replaced without data: nn.Linear subclasses are replaced only after the "
                            "forward pass on data shows they compute x W^T + b; pass --data")
        raise PlanError("no layer would be replaced (all kept or filtered out); relax --include/--exclude or --head/--hidden")
    return plan


def keep_dense(plan: list[LayerPlan], names: dict[str, str]) -> list[LayerPlan]:
    """A new plan: ``plan`` with the layers in ``names`` (name -> reason) kept dense (``plan`` is unchanged)."""
    return [replace(entry, kind=None, options={}, params_after=entry.params_before, reason=names[entry.name])
            if entry.name in names else entry for entry in plan]


def replaced_parameters(model: nn.Module, plan: list[LayerPlan]) -> list[nn.Parameter]:
    """The parameters of the replacements in ``model`` (after :func:`apply_plan`): the new layers."""
    return [p for entry in plan if entry.replaced for p in model.get_submodule(entry.name).parameters()]


def _set_everywhere(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` and at every other name of the module registered there (aliases)."""
    current = model.get_submodule(name)
    for alias in [alias for alias, m in model.named_modules(remove_duplicate=False) if m is current and alias]:
        model.set_submodule(alias, module)


def apply_plan(model: nn.Module, plan: list[LayerPlan]) -> nn.Module:
    """Replace each planned Linear by its freshly built module (under every name it has); returns the
    model (a new module when the model itself was the replaced Linear)."""
    for entry in plan:
        if not entry.replaced:
            continue
        if entry.name == "":
            return entry.build()
        _set_everywhere(model, entry.name, entry.build())
    return model


def with_dense_layer(compressed: nn.Module, original: nn.Module, name: str) -> nn.Module:
    """A copy of ``compressed`` whose layer ``name`` is the original dense one again (to measure what
    replacing that layer costs)."""
    if name == "":
        return copy.deepcopy(original)
    model = copy.deepcopy(compressed)
    _set_everywhere(model, name, copy.deepcopy(original.get_submodule(name)))
    return model


@torch.no_grad()
def _capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's input when ``model`` runs on ``x``, flattened to (rows, features)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        return lambda m, args, out: captured.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]))

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


def initialise_from_dense(original: nn.Module, compressed: nn.Module, plan: list[LayerPlan], x: torch.Tensor,
                          *, fit: bool = False) -> None:
    """Initialise the replaced layers of ``compressed`` from the dense layers they replaced in ``original``.

    ``x``: calibration inputs of the whole model (M, ...); each layer sees the activations the
    *original* model feeds it (token axes flattened into rows). ``fit``: hidden layers are first
    fitted to their dense layers by least squares (``--init fit``; see the module docstring).
    """
    replaced = [p for p in plan if p.replaced]
    inputs = _capture_inputs(original, [p.name for p in replaced], x)
    for entry in replaced:
        entry.spec.init_from_dense(compressed.get_submodule(entry.name), original.get_submodule(entry.name),
                                   inputs[entry.name], fit=fit)
