"""ONNX export: an export spec, the exported graph, one writer per format, and validation on its own.

:func:`to_onnx` runs ``torch.onnx.export(dynamo=True)`` at opset :data:`OPSET` as the
:class:`ExportSpec` says (input and output names, the batch axis dynamic, the token axis too when
asked, the rest as in the example), strips the exporter's debug metadata, merges identical
initializers (the DCT / Walsh-Hadamard constants of every layer of the same size become one) and
checks the graph with ``onnx.checker.check_model(full_check=True)``.

:data:`FORMATS` holds one :class:`Format` per output kind: ``onnx`` (float32), ``onnx-int8``
(ONNX Runtime's dynamic quantisation of the dense layers, never of the transform constants) and
``ort`` (the ONNX Runtime Mobile format of the float32 graph, by onnxruntime's own converter). Each writes one file
and names its acceptance rule, which :func:`validate` applies by running the file in ONNX Runtime
on real inputs against PyTorch: float formats need ``max|onnx - torch| <= tolerance *
max(1, max|torch|)`` (default 1e-4); int8 needs top-1 agreement >= :data:`INT8_MIN_AGREEMENT`.
A file that fails is an :class:`ExportError` and is never kept (the caller writes to temporary
files, :mod:`compressor.outputs`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from . import runtime
from .errors import DataError, ExportError
from .layers.base import ReplacesLinear, pruned_tensors, stored_tensors
from .modelcopy import copy_model
from .options import PRECISIONS, QUANTIZATIONS, ExportOptions
from .outputs import Artifacts, export_outputs, scratch_directory

__all__ = [
    "OPSET",
    "DEFAULT_TOLERANCE",
    "INT8_MIN_AGREEMENT",
    "ExportSpec",
    "Exported",
    "Validation",
    "Format",
    "FORMATS",
    "main_format",
    "ExportResult",
    "FileResult",
    "choose_formats",
    "write_exports",
    "to_onnx",
    "validate",
    "validate_lengths",
    "has_dense_layers",
    "export_onnx",
    "onnx_initializer_bytes",
    "stored_state_bytes",
    "mobile_usability",
]

OPSET = 18
"""ONNX opset of every export: supported by ONNX Runtime >= 1.14 on all platforms, mobile included."""
DEFAULT_TOLERANCE = ExportOptions.tolerance
INT8_MIN_AGREEMENT = 0.98
FP16_MIN_AGREEMENT = 0.99
DENSE_OPS = ("MatMul", "Gemm", "Conv")
FOLD_GROWTH_LIMIT = 1024
OTHER_SIZE_ROWS = 8
"""Rows validated at the sizes of a dynamic axis other than the example's (:func:`validate_lengths`)."""
"""The exporter's constant folding may store a computed constant larger than its inputs only up to
this many elements: the ACDC stage matrices (O(n r) numbers) stay in the file as their O(n)
patterns and twiddles, and ONNX Runtime computes them once when it loads the file."""


@dataclass(frozen=True)
class ExportSpec:
    """Names and dynamic axes of the exported graph. Axis 0 (batch) is always dynamic. With
    ``dynamic_tokens`` axis 1 is too, for inputs of token ids (batch, tokens) or of token features
    (batch, tokens, features): one file takes every sequence length (a model whose positional
    embeddings or reshapes fix the length is refused by name, :func:`to_onnx`). Every other axis
    keeps the example's size."""

    input_name: str = "input"
    output_name: str = "logits"
    opset: int = OPSET
    dynamic_tokens: bool = False

    def dynamic_axes(self, example: torch.Tensor) -> dict[int, str]:
        """Axis -> name of the axes left symbolic for ``example`` (M, ...) as the model takes it;
        DataError where ``dynamic_tokens`` is asked of inputs without a token axis or of 1 token."""
        if not self.dynamic_tokens:
            return {0: "batch"}
        shape = tuple(example.shape[1:])
        if not (len(shape) == 2 or (len(shape) == 1 and not example.is_floating_point())):
            kind = "feature rows (batch, features)" if len(shape) == 1 else f"(batch, {', '.join(map(str, shape))})"
            raise DataError(f"--dynamic-tokens needs inputs of token ids (batch, tokens) or token features (batch, "
                              f"tokens, features); these inputs are {kind}, with no token axis: leave it out")
        if shape[0] < 2:
            raise DataError("--dynamic-tokens needs rows of at least 2 tokens to export from (the exporter fixes an "
                              "axis of size 1); give longer rows or leave it out")
        return {0: "batch", 1: "tokens"}


@dataclass
class Exported:
    """A validated-to-be graph and what its file holds."""

    proto: onnx.ModelProto
    stored_matrices: frozenset[str]  # initializers holding a stored weight of 2+ dims (not transform constants)
    stored_parameter_bytes: int
    constant_bytes: int  # shared transform constants (DCT / Walsh-Hadamard factors, index vectors)
    notes: list[str] = field(default_factory=list)  # sizes of a dynamic axis the file is limited to


@dataclass
class Validation:
    """How an exported file compares with PyTorch on the validation inputs."""

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float


@dataclass
class FileResult:
    """One written format: where, how big, how it compared with PyTorch."""

    format: str
    path: str
    bytes: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float


@dataclass
class ExportResult:
    """What an export produced: one :class:`FileResult` per format, the file's make-up, notes."""

    files: dict[str, FileResult]
    stored_parameter_bytes: int  # the model's stored parameters at float32 (each file's own size: ``files``)
    constant_bytes: int  # shared transform constants (DCT / Walsh-Hadamard factors, index vectors), float32
    initializers: int
    mobile_notes: list[str] = field(default_factory=list)  # onnxruntime's mobile usability checker, with ORT format
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def onnx_initializer_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of the graph's initializers (the weights and constants the file carries)."""
    return sum(onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer)


def stored_state_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (float32 parameters, integer permutations, ...), each once."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(model))


def has_dense_layers(model: nn.Module) -> bool:
    """Whether ``model`` keeps a dense weight int8 can quantise: a floating parameter of two or more
    dimensions that no structured layer, fixed head or embedding table owns (an nn.Linear or
    convolution, any subclass of them such as attention's ``out_proj``, attention's ``in_proj_weight``,
    a user's own weight multiplied with ``F.linear``)."""
    not_dense = (ReplacesLinear, nn.Embedding, nn.EmbeddingBag)
    return any(parameter.dim() >= 2 and parameter.is_floating_point()
               for module in model.modules() if not isinstance(module, not_dense)
               for parameter in module.parameters(recurse=False))


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata and intermediate value_info (in place)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    model.graph.doc_string = ""


def _content_key(array: np.ndarray) -> tuple:
    """Type, shape and a digest of the values: equal keys, equal tensors."""
    return array.dtype.str, array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _dedupe_initializers(model: onnx.ModelProto) -> dict[str, tuple]:
    """Merge initializers with identical type, shape and bytes into one (in place); returns each kept
    initializer's :func:`_content_key`."""
    graph, first_of, rename = model.graph, {}, {}
    for init in graph.initializer:
        key = _content_key(onnx.numpy_helper.to_array(init))
        rename[init.name] = first_of.setdefault(key, init.name)
    kept_keys = {name: key for key, name in first_of.items()}
    rename = {old: new for old, new in rename.items() if old != new}
    if not rename:
        return kept_keys
    kept = [init for init in graph.initializer if init.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    return kept_keys


@contextlib.contextmanager
def _quiet():
    """The exporter and ORT's tools log, warn and print a lot (graph dumps on failure); keep fixclf's output
    clean: their failures still surface, as one-line ExportErrors."""
    names = ("torch.onnx", "torch", "torch.export", "root", "", "onnxruntime", "ort_format_model", "ort_format_model.utils")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            try:
                yield
            finally:
                for logger, level in zip(loggers, levels):
                    logger.setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    chain = [exc]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    return chain


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of ``exc``'s chain as one plain line: the exporter wraps the real cause
    (a view it cannot trace, an op it has no translation for) in its own multi-line, coloured message."""
    exc = _chain(exc)[-1]
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _export_advice(exc: BaseException, axes: dict[int, str]) -> str:
    """What to do when capturing the forward (torch.export, the exporter's first step) failed: the file
    takes inputs of any size along ``axes`` (the batch, with --dynamic-tokens the tokens), so the
    forward must trace with those sizes symbolic. Nothing for a failure after it (an operator ONNX
    has no translation for)."""
    if not any(type(e).__name__ == "TorchExportError" for e in _chain(exc)):
        return ""
    dims = ", ".join(f"{axis}: torch.export.Dim({name!r}, min=1)" for axis, name in axes.items())
    view = ("a .view() whose strides the exporter cannot prove for every size exports as .reshape() (timm: "
            "TIMM_FUSED_ATTN=0 avoids its fused attention path); " if "Cannot view a tensor" in _root_cause(exc) else "")
    return (f"; {view}the ONNX file takes any size along axes {sorted(axes)}, so the forward must trace with them "
            f"symbolic: torch.export.export(model, (x,), dynamic_shapes=({{{dims}}},)) shows where it does not")


_OPERATOR_REGISTRIES: dict[tuple, object] = {}


@contextlib.contextmanager
def _torch_private_replaced(module: str, owner: str | None, name: str,
                            replacement: Callable[[object], object]) -> Iterator[None]:
    """Within the context torch's private ``name`` (an attribute of ``module``, or of its class
    ``owner``) is ``replacement(torch's own)``, and torch's own is put back afterwards. Where torch's
    private layout differs (another torch release) nothing is replaced and the exporter runs unchanged."""
    try:
        holder = importlib.import_module(module)
        holder = getattr(holder, owner) if owner else holder
        torchs_own = vars(holder)[name]
        replaced = replacement(torchs_own)
    except (ImportError, AttributeError, KeyError):
        yield
        return
    setattr(holder, name, replaced)
    try:
        yield
    finally:
        setattr(holder, name, torchs_own)


def _operator_registry_built_once() -> contextlib.AbstractContextManager[None]:
    """``torch.onnx.export(dynamo=True)`` rebuilds its ATen -> ONNX operator registry on every call
    (onnxscript re-reads the source of ~500 torchlib functions: 0.7 s, half the cost of exporting an
    nn.Linear). fixclf exports several times a run (the original, the compressed model, each layer
    ``plan`` times) and never changes the registry (no custom translation table), so within this
    context each opset's registry is built once per process and reused."""
    def reusing(torchs_own):
        build = torchs_own.__func__

        def reused(cls, *args, **kwargs):
            key = (cls, args, tuple(sorted(kwargs.items())))
            if key not in _OPERATOR_REGISTRIES:
                _OPERATOR_REGISTRIES[key] = build(cls, *args, **kwargs)
            return _OPERATOR_REGISTRIES[key]
        return classmethod(reused)

    return _torch_private_replaced("torch.onnx._internal.exporter._registration", "ONNXRegistry", "from_torchlib",
                                   reusing)


def _forget_dispatch_choices() -> None:
    """Clear every operator's cache of which kernel serves which dispatch key, so that each export
    traces as the first export of a fresh process does. Once an earlier export (or run) has cached a
    Python decomposition for a key, a later trace takes it where a fresh one did not: ``aten.gru``'s
    unrolls the sequence, and the second export of a GRU model (compress exports the original, then
    the compressed model) fixed the token axis that the first left dynamic. The caches refill on
    the next call."""
    for namespace_name in list(getattr(torch.ops, "_dir", ())):
        namespace = getattr(torch.ops, namespace_name, None)
        for packet in list(vars(namespace).values()) if namespace is not None else ():
            if isinstance(packet, torch._ops.OpOverloadPacket):
                for overload in list(vars(packet).values()):
                    if isinstance(overload, torch._ops.OpOverload):
                        overload._dispatch_cache.clear()


_MATERIALISED_CIA_REGISTRATIONS: set[frozenset[str]] = set()


def _dispatcher_ops_materialised_once() -> contextlib.AbstractContextManager[None]:
    """torch.export's decomposition walks every operator namespace (about 27) and, for each, makes
    Python objects for every CompositeImplicitAutograd operator the C++ dispatcher registers
    (``torch._export.utils._materialize_cpp_cia_ops``, twice an export: 0.4 s of the 0.9 s an MLP's
    export takes). The walk only fills ``torch.ops``' attributes, so when the dispatcher's list of such
    registrations is the one already walked it has nothing to add and is skipped; a custom operator
    registered since (a new list) is walked as before."""
    def once_per_registration_list(torchs_own):
        registrations = torch._C._dispatch_get_registrations_for_dispatch_key

        def walk() -> None:
            listed = frozenset(registrations("CompositeImplicitAutograd"))
            if listed not in _MATERIALISED_CIA_REGISTRATIONS:
                torchs_own()
                _MATERIALISED_CIA_REGISTRATIONS.add(listed)
        return walk

    return _torch_private_replaced("torch._export.utils", None, "_materialize_cpp_cia_ops", once_per_registration_list)


def _stored_matrices(proto: onnx.ModelProto, model: nn.Module, content: dict[str, tuple]) -> frozenset[str]:
    """The initializers that hold one of ``model``'s stored weights of 2+ dimensions: under its state_dict
    name, or under a new one with the same values or their transpose (the exporter stores a Linear
    applied to (batch, tokens, features) as a MatMul with the weight pre-transposed). ``content``: each
    initializer's :func:`_content_key` (from :func:`_dedupe_initializers`)."""
    state = model.state_dict()
    keys = set()
    for tensor in state.values():
        if tensor.dim() >= 2 and tensor.is_floating_point():
            keys.add(_content_key(tensor.detach().cpu().numpy()))
            if tensor.dim() == 2:
                keys.add(_content_key(tensor.detach().cpu().T.numpy()))
    return frozenset(init.name for init in proto.graph.initializer if len(init.dims) >= 2 and (
        init.name in state or content[init.name] in keys))


def _check_axes_are_dynamic(proto: onnx.ModelProto, axes: dict[int, str]) -> None:
    """The graph's dynamic axes must stay symbolic. A forward that turns the batch size into a Python
    number (``int(x.shape[0])``, ``torch.zeros(b, ...)`` with that b) is traced at the example's batch and
    the exporter keeps that number, so the file would run at that batch only; a token count is fixed
    the same way, or by positional embeddings of one length (the exporter then keeps the example's)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    fixed = {axis: dims[axis].dim_value for axis in axes if axis < len(dims) and dims[axis].HasField("dim_value")}
    if 0 in fixed:
        raise ExportError(f"the exported graph fixes the batch size of {proto.graph.input[0].name} at {fixed[0]}: the "
                          "model's forward turns the batch size into a plain number (int(x.shape[0]) or similar); keep "
                          "it symbolic (x.shape[0], reshape(-1, ...), x.new_zeros(x.shape[0], ...)) so that the model "
                          "exports for any batch")
    if 1 in fixed:
        raise ExportError(f"--dynamic-tokens: the model fixes axis 1 of its inputs, taken as the token axis, at "
                          f"{fixed[1]} (positional embeddings of that length, a layer across the token axis, a reshape "
                          "or Python number made from it; or axis 1 is no token axis, e.g. the channels of a "
                          "convolution), so no file can take other sizes there; leave --dynamic-tokens out (the file "
                          "then takes exactly that many)")


def _held_ranges(program, axes: dict[int, str]) -> dict[int, tuple[int, int | None]]:
    """For each dynamic axis, the sizes the exported graph holds for, ``(lowest, highest or None)``.
    The exporter narrows an axis silently where the forward branches on its size (``if x.shape[1] > 4``)
    or a layer needs a least size (a convolution across the tokens): the graph keeps the branch the
    example took and records the range in ``range_constraints``."""
    import sympy

    exported = program.exported_program
    name = exported.graph_signature.user_inputs[0]
    shape = next(node for node in exported.graph.nodes if node.op == "placeholder" and node.name == name).meta["val"].shape
    held = {}
    for axis in axes:
        size = shape[axis]
        bounds = exported.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        if bounds is not None:
            upper = int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else None
            held[axis] = (int(bounds.lower), upper)
    return held


def _resized(example: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``example`` cut or repeated along ``axis`` to ``size``."""
    repeats = -(-size // example.shape[axis])
    return torch.cat([example] * repeats, dim=axis).narrow(axis, 0, size)


def _runs(model: nn.Module, inputs: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            model(inputs)
    except Exception:  # the model's own refusal of that size
        return False
    return True


def _check_held_ranges(model: nn.Module, example: torch.Tensor, axes: dict[int, str],
                       held: dict[int, tuple[int, int | None]]) -> list[str]:
    """Refuse a graph that holds for fewer sizes of a dynamic axis than the model runs at: just outside
    the range the file would run the branch the example took, not the model's. A range the model
    itself keeps (PyTorch refuses the size just outside it too) is accepted; the notes say it."""
    notes = []
    for axis, (lowest, highest) in held.items():
        outside = [size for size in (lowest - 1, None if highest is None else highest + 1) if size is not None and size >= 1]
        if not outside:
            continue
        what = "rows" if axis == 0 else "tokens"
        lowest = max(lowest, 1)
        span = f"{lowest} or more" if highest is None else f"{lowest} to {highest}"
        running = [size for size in outside if _runs(model, _resized(example, axis, size))]
        if running:
            flag = "" if axis == 0 else "--dynamic-tokens: "
            fix = ("leave --dynamic-tokens out (the file then takes exactly the example's token count)" if axis else
                   "make the forward independent of the batch size")
            raise ExportError(f"{flag}the exported graph holds for {span} {what} only (the forward takes another path, "
                              f"an `if` on x.shape[{axis}] or similar, at other sizes), yet the model runs on "
                              f"{running[0]} {what}, where the file would answer differently; {fix}")
        notes.append(f"the ONNX file takes {span} {what}, as the model does")
    return notes


def _two_rows(example: torch.Tensor) -> torch.Tensor:
    """Two rows to trace with: one row would make the exporter fix the batch size at 1 (it specialises a
    dimension of size 0 or 1), so a single row is taken twice."""
    return example[:2] if example.shape[0] >= 2 else torch.cat([example, example])


@contextlib.contextmanager
def _as_exported(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as it is exported: eval mode, float32, and each parametrisation
    (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal, a user's own) and pruned
    weight (``torch.nn.utils.prune``) computed once into the plain tensor it makes, as a deployed model
    stores it (the file would otherwise recompute it every inference, and orthogonal's matrix
    exponential has no ONNX form). The
    caller's model is left as it was: its modules' modes are put back afterwards, and a model that
    needs a change of dtype or parametrisations is exported from a copy (casting float64 weights
    there and back would round them)."""
    modes = [(module, module.training) for module in model.modules()]
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    as_it_is = all(t.dtype == torch.float32 for t in floats) and not _parametrised(model)
    target = model if as_it_is else _export_copy(model)
    try:
        yield target.eval()
    finally:
        for module, training in modes:
            module.training = training


def _parametrised(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights are computed before each call: parametrised or pruned."""
    return [module for module in model.modules() if parametrize.is_parametrized(module) or pruned_tensors(module)]


def _export_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` with its parametrisations and pruned weights computed into plain tensors."""
    try:
        copied = copy_model(model)
    except Exception as exc:  # a module holding tensors computed from others, an object deepcopy cannot take
        raise ExportError(f"the model holds floats other than float32 or parametrised weights and cannot be copied to "
                          f"export it as float32 plain weights ({_root_cause(exc)}); convert it first (model.float(), "
                          "torch.nn.utils.parametrize.remove_parametrizations)") from exc
    with torch.no_grad():
        for module in filter(parametrize.is_parametrized, copied.modules()):
            # torch deletes the tensor's property from the module's class, which the copy shares with the
            # caller's module: the copy gets a class of its own first
            shared = type(module)
            module.__class__ = type(shared.__name__, shared.__bases__,
                                    {k: v for k, v in vars(shared).items() if k not in ("__dict__", "__weakref__")})
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        for module in copied.modules():  # pruned weights (weight_orig * weight_mask each call) as the weights they make
            for name in pruned_tensors(module):
                prune.remove(module, name)
    return copied.float()


def to_onnx(model: nn.Module, example: torch.Tensor, spec: ExportSpec = ExportSpec()) -> Exported:
    """Export ``model`` (in eval mode and float32; the caller's model is left as it was) with ``example``
    (M, ...) as the spec says; checked, not yet validated."""
    with _as_exported(model) as model:
        return _to_onnx(model, example, spec)


def _to_onnx(model: nn.Module, example: torch.Tensor, spec: ExportSpec) -> Exported:
    import onnxscript.optimizer  # here, not at the top: 0.9 s of every start of the CLI (report, plan) otherwise

    example = _two_rows(runtime.as_model_input(example))
    axes = spec.dynamic_axes(example)
    _forget_dispatch_choices()
    try:
        with _quiet(), _operator_registry_built_once(), _dispatcher_ops_materialised_once():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=spec.opset,
                                        dynamic_shapes=({axis: torch.export.Dim(name, min=1) for axis, name in axes.items()},),
                                        input_names=[spec.input_name],
                                        output_names=[spec.output_name], external_data=False, optimize=False)
            proto = onnxscript.optimizer.optimize(program.model_proto, output_size_limit=FOLD_GROWTH_LIMIT)
    except Exception as exc:  # the exporter raises many types; one line for the user
        raise ExportError(f"torch.onnx.export failed: {_root_cause(exc)}{_export_advice(exc, axes)}") from exc
    _check_axes_are_dynamic(proto, axes)
    notes = _check_held_ranges(model, example, axes, _held_ranges(program, axes))
    _strip_debug_info(proto)
    content = _dedupe_initializers(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"exported model failed onnx.checker: {str(exc).splitlines()[0][:300]}") from exc
    # The exporter folds parameter-only arithmetic into new initializers of the same size, so stored
    # state is counted on the model and everything else the file carries is a constant.
    stored = stored_state_bytes(model)
    return Exported(proto, _stored_matrices(proto, model, content), stored,
                    max(0, onnx_initializer_bytes(proto) - stored), notes)


def validate(onnx_file, model: nn.Module, inputs: torch.Tensor, *, tolerance: float | None = None,
             min_agreement: float | None = None, what: str = "reduced-precision") -> Validation:
    """Run the file (a path, serialised bytes or an open session) in ONNX Runtime on ``inputs`` and
    compare with ``model``; ExportError past the rule."""
    with torch.no_grad():
        reference = model(runtime.as_model_input(inputs)).float().numpy()
    try:
        opened = onnx_file if hasattr(onnx_file, "run") else runtime.session(onnx_file)
        got = runtime.run(opened, inputs)
    except Exception as exc:  # onnxruntime raises its own types (InvalidArgument, Fail, ...)
        raise ExportError(f"ONNX Runtime cannot run the exported model on {inputs.shape[0]} validation rows: "
                          f"{_root_cause(exc)}") from exc
    diff = float(np.abs(got - reference).max())
    result = Validation(diff, diff / max(1.0, float(np.abs(reference).max())),
                        float((got.argmax(-1) == reference.argmax(-1)).mean()))
    if tolerance is not None and not result.max_rel_diff <= tolerance:
        raise ExportError(f"ONNX output differs from PyTorch: max abs diff {diff:.3g}, relative {result.max_rel_diff:.3g} "
                          f"> tolerance {tolerance:g}; no file written (raise --tolerance only if this difference is acceptable)")
    if min_agreement is not None and result.top1_agreement < min_agreement:
        raise ExportError(f"the {what} model agrees with the float32 model on only {result.top1_agreement:.1%} of "
                          f"inputs (need {min_agreement:.0%}); export without --quantize / --precision")
    return result


def validate_lengths(onnx_file: str | Path | bytes, model: nn.Module, inputs: torch.Tensor, *, tolerance: float,
                     spec: ExportSpec) -> Validation:
    """:func:`validate` on ``inputs`` at the relative ``tolerance``, then on sizes of the dynamic axes
    the example did not have: a single row; with ``spec.dynamic_tokens`` the rows one token shorter
    (the model must run there), and 1 token and twice the tokens where the model runs. The exporter
    keeps the path the example took through an ``if`` on a size and does not always record it (an
    ``if x.shape[0] > 1`` is assumed true), so these runs are the proof that the file takes other sizes."""
    opened = runtime.session(onnx_file)
    result = validate(opened, model, inputs, tolerance=tolerance)
    few = inputs[:OTHER_SIZE_ROWS]
    _validate_size(opened, model, few[:1], tolerance, "a single row", "make the forward independent of the batch size")
    if spec.dynamic_tokens:
        tokens = inputs.shape[1]
        shorter = few[:, :tokens - 1]
        if not _runs(model, shorter):
            raise ExportError(f"--dynamic-tokens: the model does not run on {tokens - 1} tokens in PyTorch, so its "
                              "token count is fixed; leave --dynamic-tokens out")
        for rows in (shorter, few[:, :1], _resized(few, 1, 2 * tokens)):
            if rows is shorter or _runs(model, rows):
                _validate_size(opened, model, rows, tolerance, f"the rows cut or repeated to {rows.shape[1]} tokens",
                               "leave --dynamic-tokens out")
    return result


def _validate_size(opened, model: nn.Module, rows: torch.Tensor, tolerance: float, where: str, fix: str) -> None:
    try:
        validate(opened, model, rows, tolerance=tolerance)
    except ExportError as exc:
        flag = "--dynamic-tokens, " if "tokens" in where else ""
        raise ExportError(f"{flag}on {where}: {exc.args[0].split('; no file written')[0]}: the forward takes another "
                          f"path at this size (an `if` on a shape, a size turned into a Python number) that the "
                          f"exported graph does not hold; {fix}") from exc


def _accept_shorter(fmt: "Format", out: Path, model: nn.Module, inputs: torch.Tensor, tolerance: float) -> None:
    """``fmt``'s acceptance rule also on rows one token shorter (every format of a --dynamic-tokens export)."""
    try:
        fmt.accept(out, model, inputs[:, :-1], tolerance)
    except ExportError as exc:
        raise ExportError(f"--dynamic-tokens, the {fmt.name} file on rows cut to {inputs.shape[1] - 1} tokens: "
                          f"{exc}") from exc


def _write_onnx(exported: Exported, float_file: Path, out: Path) -> None:
    shutil.copyfile(float_file, out)


def _write_int8(exported: Exported, float_file: Path, out: Path) -> None:
    """Dynamic 8-bit quantisation of the dense layers (MatMul/Gemm/Conv with a stored weight); the
    transform MatMuls are excluded by node name (the quantiser renames the nodes it rewrites).

    Weights are stored as unsigned 8-bit (U8U8 with the dynamically quantised uint8 activations):
    ONNX Runtime's U8S8 kernel on x86 CPUs without VNNI (AVX2, plain AVX-512) sums pairs of
    products in saturating int16 and measured 39% relative error on a plain nn.Linear(64, 256);
    U8U8 has no such overflow on any CPU and keeps the full 8 bits (0.9% on the same layer)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = [n.name for n in exported.proto.graph.node
                if n.op_type in DENSE_OPS and not exported.stored_matrices.intersection(n.input)]
    with _quiet():
        quantize_dynamic(str(float_file), str(out), weight_type=QuantType.QUInt8, op_types_to_quantize=list(DENSE_OPS),
                         nodes_to_exclude=excluded)


def _write_fp16(exported: Exported, float_file: Path, out: Path) -> None:
    """Float16 weights and arithmetic (onnxconverter-common's converter), inputs and outputs as in the float32 file.
    Cast nodes stay as they are, with float16 casts around them: the converter would type a Cast to
    float (integer inputs a model converts itself: uint8 images, ids) as float16 without changing it."""
    from onnxconverter_common import float16

    with _quiet():
        converted = float16.convert_float_to_float16(exported.proto, keep_io_types=True,
                                                     op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Cast"])
    onnx.save_model(converted, str(out))


def _write_ort(exported: Exported, float_file: Path, out: Path) -> None:
    """ONNX -> ORT format (the format of the ONNX Runtime mobile packages), via onnxruntime's tools."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with scratch_directory(out) as work:
        source = Path(work) / "model.onnx"
        shutil.copyfile(float_file, source)
        with _quiet():
            convert_onnx_models_to_ort(source, output_dir=Path(work), optimization_styles=[OptimizationStyle.Fixed])
        produced = next(Path(work).glob("*.ort"), None)
        if produced is None:
            raise ExportError("ORT format conversion produced no .ort file; export plain ONNX instead")
        os.replace(produced, out)


@dataclass(frozen=True)
class Format:
    """One output format: ``write(exported, float_onnx_file, out_path)`` and its acceptance rule
    (``min_agreement`` None: the relative tolerance; else top-1 agreement on the inputs)."""

    name: str
    write: Callable[[Exported, Path, Path], None]
    min_agreement: float | None = None
    validation_rows: int | None = None  # None: every validation input
    needs_dense_layer: bool = False

    def accept(self, out: Path, model: nn.Module, inputs: torch.Tensor, tolerance: float) -> Validation:
        rows = inputs if self.validation_rows is None else inputs[: self.validation_rows]
        if self.min_agreement is None:
            return validate(out, model, rows, tolerance=tolerance)
        return validate(out, model, rows, min_agreement=self.min_agreement, what=self.name)


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", _write_onnx),
    "onnx-int8": Format("onnx-int8", _write_int8, min_agreement=INT8_MIN_AGREEMENT, needs_dense_layer=True),
    "onnx-fp16": Format("onnx-fp16", _write_fp16, min_agreement=FP16_MIN_AGREEMENT),
    "ort": Format("ort", _write_ort, validation_rows=8),
}
"""Every output format by name; a new one is a writer and one entry here."""


def main_format(quantize: str | None, precision: str) -> str:
    """The format of ``fixclf export``'s one ONNX file."""
    if quantize and precision != "fp32":
        raise ExportError("--quantize int8 and --precision fp16 are two different files; choose one")
    return "onnx-int8" if quantize else ("onnx-fp16" if precision == "fp16" else "onnx")


def choose_formats(model: nn.Module, requested: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Which formats can be written for ``model`` (``requested``: format -> artifact role), decided
    before any work. int8 of a model with no dense layer left is replaced by the float file when
    it was to be the main output, else skipped; the notes say so."""
    chosen, notes = {}, []
    for name, role in requested.items():
        if FORMATS[name].needs_dense_layer and not has_dense_layers(model):
            notes.append("int8 skipped: no dense weight (Linear, convolution, attention projection) is left to "
                         "quantise (int8 would touch neither the structured layers' small diagonals nor embedding "
                         "tables); the float32 ONNX file is the deliverable")
            if role == "onnx":
                chosen["onnx"] = role
            continue
        chosen[name] = role
    return chosen, notes


def mobile_usability(onnx_path: str | os.PathLike) -> list[str]:
    """What onnxruntime's mobile usability checker (``python -m
    onnxruntime.tools.check_onnx_model_mobile_usability``) says of the file."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage().strip())

    logger = logging.getLogger("fixclf.mobile_usability")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    collector = Collect()
    logger.addHandler(collector)
    try:
        with _quiet():
            try_eps = usability_checker.analyze_model(Path(onnx_path), skip_optimize=False, logger=logger)
    except Exception as exc:  # the checker is best effort; the .ort file itself was produced and validated
        return [f"mobile usability check unavailable: {type(exc).__name__}: {exc}"]
    finally:
        logger.removeHandler(collector)
    verdict = ("NNAPI (Android) / CoreML (iOS) may help: compare them with the CPU EP" if try_eps
               else "use the CPU execution provider on mobile")
    return [line for line in collector.lines if line] + [verdict]


def export_onnx(model: nn.Module, inputs: torch.Tensor, path: str | os.PathLike, *, tolerance: float = DEFAULT_TOLERANCE,
                quantize: str | None = None, precision: str = "fp32", ort_format: bool = False,
                dynamic_tokens: bool = False) -> ExportResult:
    """Export ``model`` to one validated file at ``path`` (the library's one-call export).

    ``inputs``: (M, ...) real samples, also the example. ``quantize="int8"`` writes the int8 model
    at ``path`` (the float one, with a note, when no dense layer is left); ``precision="fp16"`` the
    float16 one (accepted on >= 99% top-1 agreement with float32). ``ort_format`` also writes
    ``path`` with suffix ``.ort``. ``dynamic_tokens``: the file takes any sequence length
    (:class:`ExportSpec`). Nothing is left behind on failure.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantisation {quantize!r}; use {' or '.join(QUANTIZATIONS)} or leave it out")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
    if Path(path).suffix != ".onnx":
        raise ExportError(f"{path}: the file name must end in .onnx")
    if not isinstance(dynamic_tokens, bool):
        raise ExportError(f"dynamic_tokens must be True or False, got {dynamic_tokens!r:.60}")
    requested = {main_format(quantize, precision): "onnx"} | ({"ort": "ort"} if ort_format else {})
    formats, notes = choose_formats(model, requested)
    with Artifacts(export_outputs(Path(path), ort_format=ort_format), [], force=True).check() as artifacts:
        result = write_exports(model, inputs, artifacts, formats, tolerance=tolerance,
                               spec=ExportSpec(dynamic_tokens=dynamic_tokens))
        artifacts.commit()
    result.notes += notes
    return result


def write_exports(model: nn.Module, inputs: torch.Tensor, artifacts, formats: dict[str, str], *,
                  tolerance: float, spec: ExportSpec = ExportSpec()) -> ExportResult:
    """Export ``model`` once as ``spec`` says, then write each format (name -> ``artifacts`` role) and
    validate it by its rule. The model is exported in eval mode and float32; the caller's is left as it was."""
    with _as_exported(model) as model:
        return _write_exports(model, inputs, artifacts, formats, tolerance, spec)


def _write_exports(model: nn.Module, inputs: torch.Tensor, artifacts, formats: dict[str, str],
                   tolerance: float, spec: ExportSpec) -> ExportResult:
    exported = _to_onnx(model, inputs, spec)
    float_file = artifacts.scratch(".onnx")
    artifacts.guard(lambda: onnx.save_model(exported.proto, str(float_file)))
    validate_lengths(float_file, model, inputs, tolerance=tolerance, spec=spec)
    result = ExportResult({}, exported.stored_parameter_bytes, exported.constant_bytes,
                          len(exported.proto.graph.initializer), notes=list(exported.notes))
    for name, role in formats.items():
        fmt = FORMATS[name]
        out = artifacts.write(role, lambda target: fmt.write(exported, float_file, target))
        check = fmt.accept(out, model, inputs, tolerance)
        if spec.dynamic_tokens:
            _accept_shorter(fmt, out, model, inputs, tolerance)
        result.files[name] = FileResult(name, str(artifacts.paths[role]), out.stat().st_size, check.max_abs_diff,
                                        check.max_rel_diff, check.top1_agreement)
    int8, float_bytes = result.files.get("onnx-int8"), float_file.stat().st_size
    if int8 is not None and int8.bytes >= float_bytes:
        result.notes.append(f"the int8 file ({int8.bytes:,} bytes) is no smaller than the float32 one "
                            f"({float_bytes:,}): too few dense weights are left to outweigh the "
                            "quantisation's own nodes and scales, so the float32 file (made without --quantize) is "
                            "the better deliverable")
    if "ort" in formats:
        shown = Path(artifacts.paths["ort"]).with_suffix(".onnx").name
        result.mobile_notes = [line.replace(str(float_file), shown).replace(float_file.name, shown)
                               for line in mobile_usability(float_file)]
        reduced = [name for name in formats if FORMATS[name].min_agreement is not None]
        if reduced:
            names = " and ".join(name.removeprefix("onnx-") for name in reduced)
            verb = "models are" if len(reduced) > 1 else "model is"
            result.notes.append(f"the .ort file holds the float32 model; the {names} {verb} written as ONNX only "
                                "(ONNX Runtime's converter is given the float32 graph)")
    return result
