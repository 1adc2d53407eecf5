"""What one forward pass on a few rows shows about a model's ``nn.Linear`` layers: which are called,
which compute ``x W^T + b``, and which are the **heads** (the Linears that make the logits).

The model runs once in eval mode with the autograd graph recorded through its parameters (the
input is cloned, never changed; nothing is trained; modes and ``requires_grad`` flags are restored),
with a forward hook on every Linear. Then:

* a Linear the pass never calls stays dense (``nn.MultiheadAttention``'s ``out_proj``, whose
  weights its owner reads directly; an unused auxiliary head);
* a subclass of ``nn.Linear`` (timm's ``Linear``, a weight-normalised layer) is *affine* when its
  output there equals ``F.linear(x, weight, bias)``; only affine Linears are replaced;
* a **head** is an affine Linear of the output's width (the last dimension) whose output reaches
  the model's output through :data:`LOGIT_PRESERVING` nodes only (sums, scales, averages and
  maxima, reshapes, selections, masking, clamping; softmax and log-softmax unless a product has
  been passed, as in attention pooling where a softmax weighs *other* values) and feeds no
  Linear (so a residual input projection or a Linear applied again inside the body is not one).
  A model that averages two heads (DeiT's distilled models) has two; a feature extractor that ends
  in a normalisation has none. A forward pass that cannot record the graph (an in-place change of
  a parameter) falls back to the last affine Linear called at the output's width.
* a head's **feeder** is the one Linear whose output reaches the head's input with nothing on the
  way that mixes features (another Linear, a matrix product, a convolution, a recurrent layer:
  :data:`MIXING`), only activations, norms, pooling and reshapes (an MLP's or a CNN classifier's
  last hidden layer); a head fed by several (the residual stream of a transformer, a gate), by
  the model's input too (``x + f(x)``; a floating-point input is traced as a node of the graph
  for this) or through a mixing layer (an LSTM, attention pooling) has no feeder.

A training-mode pass (on a copy) finds the Linears the *training-mode* logits do not reach
(:func:`untrained_in_training`): fine-tuning could never train their replacements.

A second pass on the same rows must give the same output: a forward pass with dropout or sampling
left on cannot be distilled or validated; nor can one whose output carries no gradient
(``torch.no_grad()`` inside forward). Outputs that are not logits (not a tensor, no class
axis, one class) are refused. All refusals are :class:`~compressor.errors.PlanError` (exit 5).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PlanError
from .modelcopy import copy_model

__all__ = ["Survey", "survey", "layer_inputs", "untrained_in_training", "training_logits", "check_classes",
           "LOGIT_PRESERVING", "NOT_CALLED", "UNTRAINED"]

NOT_CALLED = "not called by the forward pass"
LOGIT_PRESERVING = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Mean", "Sum", "Amax", "Max", "View", "UnsafeView", "Reshape", "ReshapeAlias",
    "Select", "Slice", "Index", "IndexSelect", "Transpose", "Permute", "Squeeze", "Unsqueeze", "Cat", "Stack", "Split",
    "SplitWithSizes", "Unbind", "Clone", "ToCopy", "Expand", "Flip", "AsStrided", "Alias", "Tanh", "Clamp", "ClampMin",
    "ClampMax", "MaskedFill", "Where", "AvgPool2D", "AdaptiveAvgPool2D", "AvgPool1D", "AdaptiveAvgPool1D",
    "MaxPool2DWithIndices", "AdaptiveMaxPool2D", "AdaptiveMaxPool1D", "Softmax", "LogSoftmax"})
"""Autograd nodes (``<Name>Backward<n>``) through which a head's output is still the logits."""
PRODUCTS = frozenset({"Mul", "Div"})
SOFTMAXES = frozenset({"Softmax", "LogSoftmax"})
T = TypeVar("T")


@dataclass
class Survey:
    """The heads' names, per Linear the forward pass rules out the reason, and per head its feeder."""

    heads: set[str]
    kept: dict[str, str] = field(default_factory=dict)
    feeders: dict[str, str] = field(default_factory=dict)  # head -> the one Linear feeding it (module docstring)


@dataclass
class _Calls:
    order: list[str] = field(default_factory=list)  # first calls, in order
    graph: bool = True  # False: the pass ran without recording the graph (an in-place change of a parameter)
    affine: set[str] = field(default_factory=set)
    produced_by: dict = field(default_factory=dict)  # grad_fn of every Linear output -> the Linear's name
    model_input: object = None  # the graph node of the model's (floating-point) input


def _unchecked(linear: nn.Linear) -> str:
    return (f"an nn.Linear subclass ({type(linear).__name__}): without data fixclf cannot check that it computes "
            "x W^T + b; pass --data")


def _not_affine(linear: nn.Linear) -> str:
    return f"an nn.Linear subclass ({type(linear).__name__}) whose output is not x W^T + b from its weight and bias"


def survey(model: nn.Module, linears: list[tuple[str, nn.Linear]], example: torch.Tensor | None) -> Survey:
    """The heads and the Linears to keep (module docstring); without ``example``, the last Linear of
    type exactly ``nn.Linear`` is the head and subclasses are kept."""
    if example is None:
        exact = [name for name, linear in linears if type(linear) is nn.Linear]
        return Survey(set(exact[-1:]), {name: _unchecked(linear) for name, linear in linears if type(linear) is not nn.Linear})
    with _evaluating_with_graph(model):
        calls, output = _record(model, linears, example)
        _check_output(model, example, output)
    if calls.graph and output.grad_fn is None:
        raise PlanError("the model's output carries no gradient (torch.no_grad() or .detach() inside forward?): "
                        "fixclf fine-tunes through the forward pass; leave gradients on in forward")
    kept = {name: NOT_CALLED if name not in calls.order else _not_affine(linear)
            for name, linear in linears if name not in calls.affine}
    width, shapes = output.shape[-1], dict(linears)
    candidates = [name for name in calls.order if name in calls.affine and shapes[name].out_features == width]
    if output.grad_fn is None:
        return Survey(set(candidates[-1:]), kept)
    sources, feeders = _logit_sources(output, calls.produced_by), _feeders(calls.produced_by)
    heads = {name for name in candidates if name in sources and name not in feeders}
    return Survey(heads, kept, {head: fed[0] for head in heads if len(fed := _nearest_linears(head, calls)) == 1})


@contextlib.contextmanager
def _evaluating_with_graph(model: nn.Module) -> Iterator[None]:
    """Eval mode, and every floating-point parameter recording gradients (so that the graph exists
    for a frozen model too); both restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters() if p.is_floating_point()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def _record(model: nn.Module, linears: list[tuple[str, nn.Linear]], example: torch.Tensor) -> tuple[_Calls, object]:
    """Run the model once with a hook on every Linear; the calls seen and the output."""
    calls = _Calls()

    def seen(name: str, linear: nn.Module, args: tuple, kwargs: dict, out) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if out.grad_fn is not None:
            calls.produced_by[out.grad_fn] = name
        if name in calls.order:
            return
        calls.order.append(name)
        x = _input(args, kwargs)
        with torch.no_grad():
            if type(linear) is nn.Linear or (isinstance(x, torch.Tensor) and torch.allclose(
                    out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)):
                calls.affine.add(name)

    with _hooked(linears, seen):
        try:
            with torch.enable_grad():
                output = model(_traced_input(example, calls))
        except RuntimeError:  # e.g. an in-place change of a parameter: without the graph
            calls.produced_by.clear()
            calls.graph = False
            with torch.no_grad():
                output = model(example.clone())
    return calls, output


def _traced_input(example: torch.Tensor, calls: _Calls) -> torch.Tensor:
    """A copy of ``example`` that, when it is floating-point, is a node of the graph (``calls.model_input``),
    so that a path from the model's input to a head that meets no Linear is seen (a residual ``x + f(x)``
    on the input). It is not a leaf, so the model may still change it in place."""
    if not example.is_floating_point():
        return example.clone()
    traced = example.clone().requires_grad_(True) * 1
    calls.model_input = traced.grad_fn
    return traced


def check_classes(width: int) -> None:
    """At least two logits: fixclf distils through their softmax."""
    if width < 2:
        raise PlanError(f"the model has {width} output: fixclf distils classifiers through the softmax of their logits, "
                        "which needs at least 2 (give a one-logit binary model a second logit, e.g. (0, z))")


def _check_output(model: nn.Module, example: torch.Tensor, output) -> None:
    """Logits of at least two classes, the same on a second run."""
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        what = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        raise PlanError(f"the model's output is {what}; fixclf compresses classifiers whose forward returns logits "
                        "(batch, ..., classes)")
    check_classes(output.shape[-1])
    with torch.no_grad():
        if not torch.allclose(model(example.clone()), output.detach(), rtol=1e-5, atol=1e-6, equal_nan=True):
            raise PlanError("the model's output differs between two runs on the same rows in eval mode (dropout or "
                            "sampling left on?); fixclf distils and validates a deterministic forward: make it depend "
                            "on self.training (e.g. F.dropout(x, training=self.training))")


def _kind(node) -> str:
    return type(node).__name__.rstrip("0123456789").removesuffix("Backward")


def _logit_sources(output: torch.Tensor, produced_by: dict) -> set[str]:
    """The Linears whose outputs the graph of ``output`` reaches through :data:`LOGIT_PRESERVING`
    nodes (a softmax only while no product has been passed)."""
    sources, seen, stack = set(), set(), [(output.grad_fn, False)]
    while stack:
        node, through_product = stack.pop()
        if node is None or (node, through_product) in seen:
            continue
        seen.add((node, through_product))
        kind = _kind(node)
        if node in produced_by:
            sources.add(produced_by[node])
        elif kind in LOGIT_PRESERVING and not (kind in SOFTMAXES and through_product):
            stack.extend((parent, through_product or kind in PRODUCTS) for parent, _ in node.next_functions)
    return sources


def _feeders(produced_by: dict) -> set[str]:
    """The Linears whose output (of some call) reaches another Linear call's input, through any ops."""
    return {name for start in produced_by for name in _linears_before(start, produced_by) or ()}


MIXING = ("mm", "mv", "dot", "conv", "rnn", "lstm", "gru", "einsum", "linear", "embedding", "fft", "cumsum",
          "cumprod", "cummax", "cummin")
"""Autograd node kinds (lower case, any part) that mix features: matrix products, convolutions,
recurrent layers, lookups, Fourier transforms, cumulative sums and products. On the way back
from a head they are another linear map than a Linear."""


def _mixes(node) -> bool:
    kind = _kind(node).lower()
    return any(part in kind for part in MIXING)


def _nearest_linears(name: str, calls: _Calls) -> list[str]:
    """The Linears whose outputs reach an input of any call of Linear ``name`` with nothing between
    that mixes features (no other Linear, matrix product, convolution, recurrent layer); none when
    such a thing, or the model's input itself, stands between the head and some source of its input."""
    found: set[str] = set()
    produced_by = calls.produced_by
    stop = (lambda n: _mixes(n) or n is calls.model_input)
    for node, called in produced_by.items():
        if called != name:
            continue
        while node is not None and not _mixes(node):  # down to the call's own product (through its reshapes)
            node = next((parent for parent, _ in node.next_functions if parent is not None), None)
        if node is None or (before := _linears_before(node, produced_by, stop=stop)) is None:
            return []
        found |= before
    return sorted(found - {name})


def _linears_before(start, produced_by: dict, stop: Callable[[object], bool] | None = None) -> set[str] | None:
    """The Linears met first on each path back from the graph node ``start`` (not counting itself);
    None when a path meets a node ``stop`` accepts first."""
    found, seen, stack = set(), set(), [parent for parent, _ in start.next_functions]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced_by:
            found.add(produced_by[node])
        elif stop is not None and stop(node):
            return None
        else:
            stack.extend(parent for parent, _ in node.next_functions)
    return found


def _input(args: tuple, kwargs: dict):
    """A layer's input, however it was passed (``layer(x)`` or ``layer(input=x)``)."""
    return args[0] if args else kwargs.get("input")


UNTRAINED = ("its output does not reach the logits the training-mode forward returns (it is returned apart from them, "
             "as DeiT's distillation training returns its second head), so a replacement would never train")
TRAINING_PROBES = 3  # training-mode passes: a layer a random layer-drop skipped in one is met in another


def untrained_in_training(model: nn.Module, names: list[str], example: torch.Tensor) -> set[str]:
    """The named Linears whose output the logits of a training-mode forward never reach: fine-tuning
    takes the training-mode logits (the output, or the first of a ``(logits, aux, ...)`` tuple), so a
    Linear the evaluation-mode output uses but those logits do not (DeiT's distillation head, which
    evaluation averages in and training returns apart) would never train if replaced.

    On a copy of ``model`` (its buffers and the caller's random state untouched), every call of each
    Linear gets a zero that records gradients added to its output; a Linear none of whose zeros the
    sum of the logits reaches, in any of :data:`TRAINING_PROBES` passes on ``example``, is returned.
    Empty when that cannot be told (a training-mode output that is not logits of the evaluation
    output's shape, or any error): the fine-tune reports those."""
    trial = copy_model(model)
    zeros: dict[str, list[torch.Tensor]] = {}

    def add_zero(name: str, module: nn.Module, args: tuple, kwargs: dict, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            zeros.setdefault(name, []).append(torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True))
            return out + zeros[name][-1]
        return None

    unreached = set(names)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # the probe's warnings (a training-mode forward on 2 rows) are its own
            with torch.no_grad():
                shape = trial.eval()(example.clone()).shape
            with _hooked([(name, trial.get_submodule(name)) for name in names], add_zero):
                for _ in range(TRAINING_PROBES):
                    zeros.clear()
                    logits = training_logits(trial.train()(example.clone()))
                    if logits is None or logits.shape != shape or not logits.requires_grad:
                        return set()
                    probes = [(name, zero) for name, made in zeros.items() for zero in made]
                    grads = torch.autograd.grad(logits.float().sum(), [zero for _, zero in probes], allow_unused=True) \
                        if probes else []
                    unreached -= {name for (name, _), grad in zip(probes, grads) if grad is not None}
                    if not unreached:
                        break
    except Exception:  # noqa: BLE001 (not this check's to report)
        return set()
    return unreached


def training_logits(output) -> torch.Tensor | None:
    """The logits of a training-mode output: itself, or the first element of a tuple or list (GoogLeNet's
    and Inception's ``(logits, aux, ...)``); None when that is not a tensor. The fine-tune's loss takes
    the same (:class:`compressor.finetune._TrainingLogits`)."""
    if isinstance(output, torch.Tensor):
        return output
    first = output[0] if isinstance(output, (tuple, list)) and len(output) else None
    return first if isinstance(first, torch.Tensor) else None


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], example: torch.Tensor, keep: Callable[[torch.Tensor], T]
                 ) -> dict[str, T]:
    """``keep(x)`` of the input x of each named layer's first call when ``model`` runs on ``example``."""
    kept: dict[str, T] = {}

    def seen(name: str, module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        if name not in kept:
            kept[name] = keep(_input(args, kwargs))

    with _hooked([(n, model.get_submodule(n)) for n in names], seen):
        model(example)
    return kept


@contextlib.contextmanager
def _hooked(modules: list[tuple[str, nn.Module]], seen: Callable[[str, nn.Module, tuple, dict, object], None]
            ) -> Iterator[None]:
    """``seen(name, module, args, kwargs, output)`` after every call of each named module, while inside."""
    hooks = [module.register_forward_hook(lambda m, args, kwargs, out, name=name: seen(name, m, args, kwargs, out),
                                          with_kwargs=True) for name, module in modules]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
