"""Find a classifier's dense layers, plan their replacement, replace them, initialise from the dense ones.

The **heads** (the Linears that make the logits) and the Linears the forward pass rules out (never
called; a subclass of ``nn.Linear`` that does not compute ``x W^T + b``) are found by running the
model on a few rows (:mod:`compressor.trace`; ``compress`` always has them, ``plan`` when there is
data; without them the last ``nn.Linear`` registered is the head and subclasses stay dense), and so
are those the training-mode logits do not reach (a replacement there would never train).
Every other ``nn.Linear`` is a **hidden** FC layer. A model that is itself one ``nn.Linear`` is a
head. A Linear registered under several names (``self.b = self.a``) is planned once, under its
first name, matched by a pattern through any of them, and replaced under every name, so the tie
holds; two distinct Linears sharing a weight tensor are each replaced on their own, and stored numbers
count a shared tensor once (:func:`replaced_numbers`). ``include`` / ``exclude`` are fnmatch patterns on module names (``classifier.*``); a pattern that
matches no Linear layer is an error, not a silent no-op. Which kind replaces a layer, with which
options and limits, comes from the registry (:mod:`compressor.layers.registry`); each replacement
keeps the dense layer's choice of bias, and a hidden layer whose replacement would store more
numbers than it does stays dense (a tiny layer; the reason says so).

**A fixed head with more classes than features** (C > N) cannot have orthogonal codes: its C code
rows are interlocked directions in N dimensions, and the one Linear that feeds it (its *feeder*,
:mod:`compressor.trace`) must place every class's features on its row, a full rotation of its
output that a depth-2 ACDC stack learns far too slowly. That stack is therefore
``ceil(C / N)`` times deeper than ``depth``, as far as it still stores fewer numbers than its dense
layer (:func:`_deepen_feeders`; the note column says so).
Measured (docs/hard_samples.md, seventh round: MLP 32-768-3072-257-C, held-out, default budget):
1,000 classes -4.3 pp at depth 2 for the feeder, -1.1 at 4, -0.3 at 6, -0.2 at 8 (the rule's
choice); 300 classes -1.6 pp at 2, -0.6 at 4 (the rule's). Deepening every layer instead (``--depth
4``) gave -0.7 pp at 1,000 classes for twice the stored numbers of the hidden layers. A feeder kept
dense does the rotation itself. A head with no feeder to deepen stays dense, and its reason says
so: one fed by several Linears (a transformer's residual stream), through a layer that mixes
features (attention, a convolution, an LSTM), or by a Fastfood stack, which has no depth. Measured
(ninth round, a ViT-style model with 256 classes on 64 features): its head replaced, -66 pp;
deepening the Linears that write the residual stream or putting an ACDC stack before the head did
not help (-69, -71 pp), and the fixed head alone on the dense model lost 17.7 pp; the head kept
dense, -4.7 pp. A head that ``--objective latency`` or ``--max-drop`` keeps dense after the plan
was made (``make_plan(keep=...)``) deepens nothing: its feeder keeps ``depth``; a head kept for
want of a feeder is decided before them and stays dense whatever they keep. Without data the
feeders are unknown, and the plan does neither.

Initialisation from the trained model, with calibration activations X captured at each layer's
input in the original model (each spec's ``init_from_dense``):

* head: b = the original's mean logits over the calibration rows (at most :data:`INIT_ROWS` token
  rows, evenly spaced: its class prior), and alpha
  starts at 1, where the logits are still near the prior. Measured while building it (MLP
  sample, 3 seeds, default budget): starting alpha from a least-squares fit to the original
  logits ended 0.3-0.6 pp lower, and matching the spread of the original logits (DESIGN's
  suggestion) 0.6-2 pp lower: its large random logits at the start disturb the new hidden layers.
* hidden layers (``fit``): False (default) keeps the thesis initialisation: ACDC diagonals
  N(1, sigma^2), so that each ACDC layer starts near identity (a stack of K starts near its ReLUs and
  permutations between them), and Fastfood's random start (its module docstring); True first fits each structured layer to its dense layer by
  least squares on the calibration activations. The fit approximates the dense layers much better
  (tests/test_surgery.py) but, measured with the default budget on seeds 0/1/2, ends no more
  accurate after distillation: MLP 98.61 / 98.89 / 98.61% with the fit against 98.89% for all
  three with the thesis start; CNN 98.61 / 99.16 / 98.89% against 99.44 / 99.44 / 98.89%. A
  3n-parameter layer cannot represent the dense map (relative fit error 0.4-0.5), and the
  near-identity start of each ACDC layer keeps the information the next layer needs.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import PlanError
from .layers import count_stored, spec_for
from .layers.base import DenseAttributeRead, own_stored_tensors
from .layers.registry import LayerSpec
from .modelcopy import copy_model
from .options import DEPTH_MAX, KEEP, PlanOptions
from .trace import UNTRAINED, layer_inputs, survey, untrained_in_training

__all__ = ["LayerPlan", "make_plan", "keep_dense", "apply_plan", "initialise_from_dense", "linear_layers",
           "replaced_numbers", "replaced_parameters", "with_dense_layer"]


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
    """Whether ``name`` is one of ``patterns`` or matches one as a glob: a module named with brackets
    (``layers[0]``, which a glob reads as a character class) is found by its own name."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(names: list[str], options: PlanOptions) -> None:
    for pattern in [*options.include, *options.exclude]:
        if not any(_matches(n, [pattern]) for n in names):
            raise PlanError(f"pattern {pattern!r} matches no Linear layer; layers are: {', '.join(names) or '(the model)'}")


def _kept_reason(names: list[str], role: str, kind: str, options: PlanOptions) -> str:
    """Why the user's options keep the Linear of these names (any of them matching a pattern counts)."""
    if kind == KEEP:
        return f"--{role} keep"
    if options.include and not any(_matches(name, options.include) for name in names):
        return "not matched by --include"
    if options.exclude and any(_matches(name, options.exclude) for name in names):
        return "matched by --exclude"
    return ""


FORWARD_HOOKS = "it has forward hooks (a structured replacement would drop them)"


def _has_own_forward_hooks(linear: nn.Linear) -> bool:
    """Whether the model registered forward (pre-)hooks on ``linear`` that change what it computes. The
    hooks of torch's weight reparametrisations (weight_norm, spectral_norm, pruning) only recompute
    ``.weight``, which the structured layer is initialised from, so they do not count."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(not isinstance(hook, (WeightNorm, SpectralNorm, BasePruningMethod))
               for hook in (*linear._forward_pre_hooks.values(), *linear._forward_hooks.values()))


def _plan_layer(index: int, names: list[str], linear: nn.Linear, role: str, options: PlanOptions, seed: int,
                traced_reason: str = "") -> tuple[LayerPlan, str]:
    """The plan of one Linear (``names``: all its names, the first one planned) and the rule that
    decided it: "replaced", "options" (the user's flags; "head keep" for ``--head keep``), "hooks"
    (:data:`FORWARD_HOOKS`), "forward pass" (``traced_reason``: why the forward pass rules it out, ""
    when it does not) or "size"."""
    kind = options.head if role == "head" else options.hidden
    before, name = count_stored(linear), names[0]
    entry = LayerPlan(name, role, linear.in_features, linear.out_features, before, None, {}, before)
    entry.reason = _kept_reason(names, role, kind, options)
    if entry.reason:
        return entry, "head keep" if role == "head" and kind == KEEP else "options"
    if _has_own_forward_hooks(linear):
        return replace(entry, reason=FORWARD_HOOKS), "hooks"
    if traced_reason:
        return replace(entry, reason=traced_reason), "forward pass"
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
                                                              f"dense layer {before:,}"), "size"
    entry.params_after = after
    return entry, "replaced"


def make_plan(model: nn.Module, options: PlanOptions | None = None, *, seed: int = 0,
              example: torch.Tensor | None = None, keep: Mapping[str, str] | None = None) -> list[LayerPlan]:
    """Decide, without touching the model, what replaces each Linear layer. ``example``: a few input
    rows (M, ...), with which the heads and the Linears the forward pass calls are found (module
    docstring); without them the head is the last Linear registered. ``keep``: layers decided dense
    later (name -> reason: ``--objective latency``, ``--max-drop``), kept before the stacks feeding
    the heads are deepened, so that a stack feeding a head kept dense keeps its usual depth."""
    options = options or PlanOptions()
    options.validate()
    linears = linear_layers(model)
    if not linears:
        raise PlanError("the model has no nn.Linear layer, so there is nothing to replace; fixclf compresses FC layers")
    aliases = _aliases(model)
    _check_patterns([alias for name, _ in linears for alias in aliases[name]], options)
    found = survey(model, linears, example)
    planned = [_plan_layer(i, aliases[name], linear, "head" if name in found.heads else "hidden", options, seed,
                           found.kept.get(name, ""))
               for i, (name, linear) in enumerate(linears)]
    if not any(entry.replaced for entry, _ in planned):
        raise PlanError(_nothing_replaced({rule for _, rule in planned}, without_data=example is None))
    plan = [entry for entry, _ in planned]
    if example is None:
        return keep_dense(plan, keep or {})
    read = _read_by_the_model(model, plan, example)
    plan = keep_dense(plan, read)
    untrained = untrained_in_training(model, [entry.name for entry in plan if entry.replaced], example)
    plan = keep_dense(plan, dict.fromkeys(untrained, UNTRAINED))
    if not any(entry.replaced for entry in plan):
        raise PlanError(_nothing_replaced({rule for rule, kept in (("read by the model", read), ("untrained", untrained))
                                           if kept}, without_data=False))
    plan = keep_dense(plan, _heads_without_a_deep_feeder(plan, found.feeders))
    if not any(entry.replaced for entry in plan):
        raise PlanError(_nothing_replaced({"classes"} | {rule for _, rule in planned if rule == "options"},
                                          without_data=False))
    return _deepen_feeders(keep_dense(plan, keep or {}), found.feeders)


def _wide_heads(plan: list[LayerPlan], feeders: dict[str, str]) -> Iterator[tuple[LayerPlan, LayerPlan | None]]:
    """Each replaced (fixed) head of C classes on N < C features, with the plan of its feeder (None
    when it has none; ``feeders``: head -> feeder, module docstring)."""
    by_name = {entry.name: entry for entry in plan}
    for head in plan:
        if head.replaced and head.role == "head" and head.out_features > head.in_features:
            yield head, by_name.get(feeders.get(head.name))


def _heads_without_a_deep_feeder(plan: list[LayerPlan], feeders: dict[str, str]) -> dict[str, str]:
    """The wide heads (:func:`_wide_heads`) that no dense or ACDC feeder can turn onto their codes, each
    with its reason. Decided on the user's plan, before ``--objective latency`` or ``--max-drop`` keep
    anything: a budget that keeps a Fastfood feeder dense does not bring such a head back."""
    return {head.name: _no_deep_feeder(head, feeder) for head, feeder in _wide_heads(plan, feeders)
            if feeder is None or (feeder.replaced and not _deepenable(feeder))}


def _deepen_feeders(plan: list[LayerPlan], feeders: dict[str, str]) -> list[LayerPlan]:
    """A new plan: each replaced ACDC stack that feeds a wide head made deeper (:func:`_deepened`; for
    the widest of the heads it feeds)."""
    changed: dict[str, LayerPlan] = {}
    for head, feeder in _wide_heads(plan, feeders):
        if feeder is not None and feeder.replaced and _deepenable(feeder):
            deeper = _deepened(feeder, head)
            if deeper.options["depth"] > changed.get(feeder.name, feeder).options["depth"]:
                changed[feeder.name] = deeper
    return [changed.get(entry.name, entry) for entry in plan]


def _deepenable(feeder: LayerPlan) -> bool:
    """Whether a replaced feeder's kind has a depth to add (ACDC has; Fastfood has not)."""
    return "depth" in feeder.options


def _no_deep_feeder(head: LayerPlan, feeder: LayerPlan | None) -> str:
    """Why a fixed head of more classes than features stays dense."""
    if feeder is None:
        fed = "fed by no single Linear (e.g. a residual stream, a concatenation, attention, a convolution)"
    else:
        fed = f"fed by {feeder.name}, a {feeder.kind} stack, which cannot be made deeper (--hidden acdc can)"
    shape = f"{head.out_features:,} classes on {head.in_features:,} features"
    return f"{shape}, {fed}: a fixed head would lose most of the accuracy"


def _deepened(feeder: LayerPlan, head: LayerPlan) -> LayerPlan:
    """``feeder``, an ACDC stack, ``ceil(C / N)`` times deeper than planned for ``head`` (C classes on
    N features), up to the depth limit and to the deepest that stores fewer numbers than its dense
    layer (the note says when that caps it)."""
    wanted = min(DEPTH_MAX, feeder.options["depth"] * math.ceil(head.out_features / head.in_features))
    depth = min(wanted, _deepest_within_dense(feeder))
    if depth <= feeder.options["depth"]:
        return feeder
    feeds = f"feeds a fixed head of {head.out_features:,} classes on {head.in_features:,} features"
    capped = "" if depth == wanted else f" (wanted {wanted}; deeper would store more than the dense layer)"
    entry = replace(feeder, options={**feeder.options, "depth": depth}, reason=f"depth {depth}: {feeds}{capped}")
    entry.params_after = count_stored(entry.build())
    return entry


def _deepest_within_dense(entry: LayerPlan) -> int:
    """The largest depth at which ``entry``'s stack stores fewer numbers than its dense layer (each
    layer of a stack stores as many as the next)."""
    depth = entry.options["depth"]
    per_layer = count_stored(replace(entry, options={**entry.options, "depth": depth + 1}).build()) - entry.params_after
    return depth + max(0, (entry.params_before - 1 - entry.params_after) // max(1, per_layer))


READ_BY_THE_MODEL = "the model reads its .{} directly (e.g. nn.TransformerEncoderLayer's fast path)"


def _read_by_the_model(model: nn.Module, plan: list[LayerPlan], example: torch.Tensor) -> dict[str, str]:
    """The replaced layers whose dense ``weight`` or ``bias`` the model's code reads (name -> reason):
    found by running one copy with the plan applied on ``example``, in eval mode and in training mode
    (the caller's random state untouched), putting the dense layer back at each
    :class:`DenseAttributeRead` and running again. Any other error ends the check: it is the
    fine-tune's to report (a batch too small for BatchNorm, a float64 model)."""
    kept: dict[str, str] = {}
    aliases = _aliases(model)
    replaced = {alias: entry.name for entry in plan if entry.replaced for alias in aliases.get(entry.name, [entry.name])}
    trial = apply_plan(copy_model(model), plan)
    with torch.random.fork_rng(devices=[]):
        while True:
            try:
                _run_both_modes(trial, example)
                return kept
            except DenseAttributeRead as exc:
                names = _names_by_module(trial).get(id(exc.module), [])
                name = next((replaced[n] for n in names if n in replaced), None)
                if name is None or name in kept or name == "":
                    return kept
                kept[name] = READ_BY_THE_MODEL.format(exc.attribute)
                _set_everywhere(trial, name, copy_model(model.get_submodule(name)))
            except Exception:  # noqa: BLE001 (not this check's to report)
                return kept


@torch.no_grad()
def _run_both_modes(model: nn.Module, example: torch.Tensor) -> None:
    """One forward in each mode. Without gradients a training-mode forward makes torch warn where the
    user's own training would not (``torch.utils.checkpoint``'s "None of the inputs have requires_grad"):
    this probe's warnings are its own, not the user's to read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval()(example.clone())
        model.train()(example.clone())


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each submodule (a module registered twice has two), keyed by ``id(module)``,
    first name first."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of each Linear, keyed by its first name."""
    return {names[0]: names for names in _names_by_module(model).values()
            if isinstance(model.get_submodule(names[0]), nn.Linear)}


def _nothing_replaced(rules: set[str], *, without_data: bool) -> str:
    """Why no layer is replaced, from the rules that kept them (:func:`_plan_layer`; "read by the model":
    :func:`_read_by_the_model` kept every layer the plan had left to replace; "untrained": the training-mode
    logits reach none of those left, :func:`~compressor.trace.untrained_in_training`; "classes": only wide heads
    without a deep feeder were left, :func:`_heads_without_a_deep_feeder`)."""
    if "size" in rules and rules <= {"size", "head keep"}:
        return ("no layer would be replaced: each replacement would store more numbers than its dense layer (layers this "
                "small gain nothing from a structured form)")
    if "hooks" in rules and rules <= {"hooks", "head keep", "options", "size"}:
        return ("no layer would be replaced: the Linears left to replace have forward hooks of the model's own, which "
                "a structured replacement would drop; remove the hooks to replace them")
    if "classes" in rules:
        wide = ("no layer would be replaced: only heads of more classes than features are left, with no Linear feeding "
                "them that could be made deeper, and a fixed head there loses most of the accuracy")
        return f"{wide}; relax --include/--exclude or --hidden" if "options" in rules else \
            f"{wide}: fixclf has nothing to compress in this model"
    if rules == {"untrained"}:
        return ("no layer would be replaced: the logits of the model's training-mode forward do not reach the Linears "
                "left to replace (it returns their outputs apart from the logits), so replacements would never train")
    if rules == {"read by the model"}:
        return ("no layer would be replaced: the model's own code reads the weights of every Linear fixclf would replace "
                "(e.g. nn.TransformerEncoderLayer's fast path), which structured layers do not have")
    if rules == {"read by the model", "untrained"}:
        return ("no layer would be replaced: the model's own code reads the weights of some Linears fixclf would replace "
                "(e.g. nn.TransformerEncoderLayer's fast path), which structured layers do not have, and the logits of "
                "its training-mode forward do not reach the others (it returns their outputs apart from the logits), so "
                "their replacements would never train")
    if without_data and "forward pass" in rules:  # without data the forward pass rules out only unchecked subclasses
        return ("no layer would be replaced without data: nn.Linear subclasses are replaced only after the forward pass "
                "on data shows they compute x W^T + b; pass --data")
    return "no layer would be replaced (all kept or filtered out); relax --include/--exclude or --head/--hidden"


def keep_dense(plan: list[LayerPlan], names: dict[str, str]) -> list[LayerPlan]:
    """A new plan: ``plan`` with the layers in ``names`` (name -> reason) kept dense (``plan`` is unchanged)."""
    return [replace(entry, kind=None, options={}, params_after=entry.params_before, reason=names[entry.name])
            if entry.name in names else entry for entry in plan]


def replaced_numbers(model: nn.Module, plan: list[LayerPlan]) -> int:
    """Stored numbers that replacing the Linears ``plan`` replaces in ``model`` (before :func:`apply_plan`)
    frees: each tensor once however many of them share it, and only those no module the plan keeps
    also holds (a head's weight tied to a kept embedding stays in the model). A replaced Linear's own
    submodules go with it (``torch.nn.utils.parametrize`` keeps a parametrized weight in one)."""
    replaced = {id(sub) for entry in plan if entry.replaced for sub in model.get_submodule(entry.name).modules()}
    held = {id(t): t.numel() for m in model.modules() if id(m) in replaced for t in own_stored_tensors(m)}
    still_held = {id(t) for m in model.modules() if id(m) not in replaced for t in own_stored_tensors(m)}
    return sum(n for key, n in held.items() if key not in still_held)


def replaced_parameters(model: nn.Module, plan: list[LayerPlan]) -> list[nn.Parameter]:
    """The parameters of the replacements in ``model`` (after :func:`apply_plan`): the new layers."""
    return [p for entry in plan if entry.replaced for p in model.get_submodule(entry.name).parameters()]


def _set_everywhere(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` and at every other name of the module registered there (aliases)."""
    for alias in _names_by_module(model)[id(model.get_submodule(name))]:
        if alias:
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
        return copy_model(original)
    model = copy_model(compressed)
    _set_everywhere(model, name, copy_model(original.get_submodule(name)))
    return model


INIT_ROWS = 4096
"""The most activation rows one layer's initialisation holds, evenly spaced over the calibration
rows times their tokens: a ViT-B's 1,024 calibration images are 200k token rows at every Linear,
about 50 GB for all of them."""


def _capture_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's input when ``model`` runs on ``x``, flattened to (rows, features), at most
    :data:`INIT_ROWS` of them, evenly spaced."""
    return layer_inputs(model, names, x, lambda inputs: _evenly(inputs.detach().reshape(-1, inputs.shape[-1]), INIT_ROWS))


def _evenly(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """``rows``, or ``limit`` of them evenly spaced from the first to the last."""
    return rows if rows.shape[0] <= limit else rows[torch.linspace(0, rows.shape[0] - 1, limit).round().long()]


def initialise_from_dense(original: nn.Module, compressed: nn.Module, plan: list[LayerPlan], x: torch.Tensor,
                          *, fit: bool = False) -> None:
    """Initialise the replaced layers of ``compressed`` from the dense layers they replaced in ``original``.

    ``x``: calibration inputs of the whole model (M, ...); each layer that needs them (the heads; every
    layer with ``fit``) sees the activations the *original* model feeds it (token axes flattened into
    rows, :data:`INIT_ROWS` at most); the others get None. ``fit``: hidden layers are first fitted to
    their dense layers by least squares (``--init fit``; see the module docstring).
    """
    replaced = [p for p in plan if p.replaced]
    inputs = _capture_inputs(original, [p.name for p in replaced if fit or p.role == "head"], x)
    for entry in replaced:
        entry.spec.init_from_dense(compressed.get_submodule(entry.name), original.get_submodule(entry.name),
                                   inputs.get(entry.name), fit=fit)
