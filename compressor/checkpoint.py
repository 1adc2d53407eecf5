"""Safe loading and saving of checkpoints; the compressed checkpoint format (the plan serialised only here).

Accepted inputs (:func:`load_model`):

* a **fixclf checkpoint**: ``{"format": "fixclf.model/1", "arch": "compressor.zoo:mlp",
  "kwargs": {...}, "state_dict": {...}, "data": "digits.npz"}``;
* a **state_dict** plus the user's ``arch`` (``"package.module:factory"`` or a callable) and
  ``arch_kwargs``;
* a **compressed checkpoint** written by fixclf (``"format": "fixclf.compressed/1"``: the same
  plus ``"plan"``, the replacement of each layer, and ``"report"``);
* a **whole pickled nn.Module**, only with ``trust_pickle=True``.

Trust model. Everything is read with ``torch.load(weights_only=True)``: a pickle that needs any
class or function (the way a malicious ``__reduce__`` runs code) is refused, naming what it
wanted. Nothing read from a file decides which code runs:

* ``arch`` in a file is looked up in the allow-list :data:`compressor.zoo.ARCHITECTURES`, never
  imported; any other name is refused unless the user names the same architecture;
* ``data`` in a file is a file name next to the checkpoint (relative, no ``..``), never code;
* every other field is type- and range-checked: ``kwargs`` plain JSON values that must bind to
  the factory's signature (an allow-listed model is first built on the meta device and its
  shapes compared with the state_dict, so a tiny file cannot make fixclf allocate a huge model),
  ``state_dict`` tensors finite and backed by real storage, the ``plan`` checked against the
  layer registry's limits and the model's actual Linear layers, the ``report`` against its type.

A problem with any of it is a :class:`CheckpointError` (exit code 3).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import pickle
import pickletools
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .errors import CheckpointError
from .layers import REGISTRY
from .layers.heads import with_log_alpha
from .references import call_user_code, current_directory_first, describe, import_reference
from .outputs import atomic_file
from .pickles import CHECKPOINT_LIMITS, load_bounded
from .surgery import LayerPlan, apply_plan, linear_layers
from .zoo import ARCHITECTURES

__all__ = [
    "MODEL_FORMAT",
    "COMPRESSED_FORMAT",
    "Architecture",
    "LoadedModel",
    "load_model",
    "load_compressed",
    "read_stored_report",
    "compressed_payload",
    "plan_from_records",
    "save_checkpoint",
]

MODEL_FORMAT = "fixclf.model/1"
COMPRESSED_FORMAT = "fixclf.compressed/1"
DATA_SUFFIXES = (".npz", ".pt")
MAX_PLAIN_ITEMS = 10_000
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
                torch.int32, torch.int64, torch.bool)
Architecture = str | Callable[..., nn.Module]
"""How a caller names an architecture: ``"package.module:factory"`` or the factory itself."""


@dataclass
class LoadedModel:
    """A float32 model in eval mode and what fixclf knows about where it came from."""

    model: nn.Module
    path: Path
    arch: str | None = None  # reference stored in outputs (None: a whole pickled model)
    kwargs: dict = field(default_factory=dict)
    data: Path | None = None  # data file bundled with the checkpoint, resolved
    plan: list[LayerPlan] | None = None  # only for compressed checkpoints
    factory_file: Path | None = None  # source file of a user's --arch module (protected from overwrite)

    @property
    def compressed(self) -> bool:
        return self.plan is not None


def _first_line(exc: BaseException) -> str:
    """The exception's first line; a bare key or number (the legacy unpickler's KeyError on junk bytes)
    says nothing to a user, so it becomes "invalid pickle data"."""
    lines = str(exc).strip().splitlines()
    if not lines or not any(c.isalpha() for c in lines[0]):
        return "invalid pickle data" if isinstance(exc, (KeyError, pickle.UnpicklingError)) else type(exc).__name__
    return _whole_sentences(lines[0], 160)


def _whole_sentences(line: str, limit: int) -> str:
    """``line``, or as many of its first sentences as fit in ``limit`` characters (cut with "..." only
    when not even the first one fits)."""
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[: end + 1] if end > 0 else line[: limit - 3] + "..."


def _unsafe_globals(path: Path) -> list[str]:
    """Classes/functions a checkpoint's pickle would import, found without unpickling it."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        if found:
            return found
    except Exception:  # not a zip checkpoint: scan the raw pickle's opcodes
        pass
    names = []
    stream = io.BytesIO(path.read_bytes())  # a plain pickle, or the legacy format's pickles one after another
    try:
        for _ in range(LEGACY_PICKLES):
            names += _globals_of_one_pickle(stream)
            if stream.read(1) != pickle.PROTO:  # the legacy format's raw tensor bytes follow its last pickle
                break
            stream.seek(-1, io.SEEK_CUR)
    except Exception:  # a damaged or truncated file: what was found so far
        pass
    allowed = _weights_only_globals()
    return [name for name in names if name not in allowed]


LEGACY_PICKLES = 5
"""Pickles a legacy (PyTorch < 1.6) file holds before its raw tensor bytes: magic number, protocol
version, system info, the object, the storage keys."""


def _globals_of_one_pickle(stream: io.BytesIO) -> list[str]:
    """The classes and functions one pickle (read from ``stream`` up to its STOP) would import."""
    names, strings = [], []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return names


def _weights_only_globals() -> set[str]:
    """What torch's weights-only unpickler imports itself (``torch._utils._rebuild_tensor_v2`` and the like),
    as :func:`torch.serialization.get_unsafe_globals_in_checkpoint` leaves them out of zip checkpoints."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals()) | set(_weights_only_unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):  # another torch: every name found is reported
        return set()


def _load_failure(exc: BaseException) -> str:
    """Why torch.load failed, in a few words: torch's weights-only refusal opens with a long preamble
    about its defaults; the reason is on its ``WeightsUnpickler error:`` line."""
    _, marker, reason = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return f"not a weights-only checkpoint: {lines[0][:200]}" if marker and lines else _first_line(exc)


def safe_load(path: Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` with weights_only (unless ``trust_pickle``); one-line CheckpointError on failure."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path} is a dangling symbolic link; point it at the checkpoint or pass the file itself")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a pipe, device or socket); pass the checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty; re-save or re-download the checkpoint")
    if trust_pickle is True:  # the classes the file names are imported as an --arch module would be
        current_directory_first()
    return load_bounded(path, CHECKPOINT_LIMITS, CheckpointError, "the file is damaged or not a checkpoint (save the "
                        "state_dict and plain settings only)", lambda exc: _load_refusal(path, exc, trust_pickle),
                        weights_only=trust_pickle is not True)


def _load_refusal(path: Path, exc: BaseException, trust_pickle: bool) -> CheckpointError:
    """Why ``torch.load`` could not read a checkpoint, as the user should hear it."""
    unsafe = [] if trust_pickle else _unsafe_globals(path)
    if unsafe:
        return CheckpointError(f"{path} needs {unsafe[0]} to load, which can run arbitrary code; if you trust this file, "
                               "pass --trust-pickle")
    if isinstance(exc, pickle.UnpicklingError) or not trust_pickle:
        return CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_load_failure(exc)}); it may be truncated "
                               "or of another format: pass the .pt file torch.save or fixclf compress wrote")
    return CheckpointError(f"loading the pickled model {path} failed ({_first_line(exc)})")


def _require(obj: dict, key: str, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{path}: field {key!r} must be {what}, got {type(value).__name__}; the file is damaged "
                              "or not written by fixclf")
    return value


def _check_plain(value: Any, path: Path, where: str, depth: int = 0) -> int:
    """Plain JSON data only (str, int, float, bool, None, lists and str-keyed dicts of them); returns the item count."""
    if depth > 8:
        raise CheckpointError(f"{path}: {where} is nested too deeply")
    if value is None or isinstance(value, (str, int, float, bool)):
        return 1
    if isinstance(value, (list, tuple)):
        count = sum(_check_plain(v, path, where, depth + 1) for v in value)
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        count = sum(_check_plain(v, path, where, depth + 1) for v in value.values())
    else:
        raise CheckpointError(f"{path}: {where} holds a {type(value).__name__}; only plain numbers, strings, lists and "
                              "mappings are accepted")
    if count > MAX_PLAIN_ITEMS:
        raise CheckpointError(f"{path}: {where} is too large ({count} items)")
    return count


def _check_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: state_dict must map parameter names to tensors; the file is damaged")
    for name, tensor in state.items():
        if tensor.is_meta:
            raise CheckpointError(f"{path}: tensor {name} is a meta tensor (a shape without data); save the real weights")
        if tensor.layout is not torch.strided or tensor.is_quantized or tensor.dtype not in STATE_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {tensor.layout} {tensor.dtype}; fixclf reads dense real "
                                  "tensors only: save model.state_dict() of a float model")
        if tensor.numel() and tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
            raise CheckpointError(f"{path}: tensor {name} is a broadcast view larger than its data; save real tensors "
                                  "(tensor.contiguous())")
    _check_views(state, path)
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values; the checkpoint is damaged or its "
                                  "training diverged: use an earlier checkpoint")
    return state


MAX_VIEW_GROWTH = 16
"""How many times over the tensors of a state may read their stored bytes (tied weights read them twice)."""


def _check_views(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a state whose tensors read the same stored bytes many times over: 100,000 views of one
    1 MB storage make 100 GB that every pass over the weights would read."""
    stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    read = sum(t.numel() * t.element_size() for t in state.values())
    if read > MAX_VIEW_GROWTH * sum(stored.values()) + (64 << 20):
        raise CheckpointError(f"{path}: its {len(state):,} tensors are views that read {read:,} bytes out of "
                              f"{sum(stored.values()):,} stored; the file is damaged or not a checkpoint (save "
                              "model.state_dict())")


def _bundled_data(path: Path, obj: dict) -> Path | None:
    """The data file a checkpoint names: a relative path next to (or below) the checkpoint, never code."""
    ref = obj.get("data")
    if ref is None:
        return None
    if not isinstance(ref, str) or not ref:
        raise CheckpointError(f"{path}: field 'data' must be a file name next to the checkpoint; the file is damaged")
    if ":" in ref or "\x00" in ref or "\\" in ref or len(ref) > 255:
        raise CheckpointError(f"{path} names data {ref[:80]!r}: only an .npz/.pt file name next to the checkpoint is "
                              "accepted from a file (never code); pass your data with --data instead")
    relative = PurePosixPath(ref)
    target = path.parent / relative
    try:
        inside = target.resolve().is_relative_to(path.parent.resolve())
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} names data {ref!r}, which cannot be resolved ({type(exc).__name__}); pass your "
                              "data with --data instead") from exc
    if relative.is_absolute() or ".." in relative.parts or relative.suffix not in DATA_SUFFIXES or not inside:
        raise CheckpointError(f"{path} names data {ref!r}: only an .npz/.pt file next to the checkpoint is accepted "
                              "from a file; pass your data with --data instead")
    return target


def _factory(stored: str | None, given: Architecture | None, path: Path) -> tuple[str, Callable, bool]:
    """(reference to store, factory, allow-listed) for a checkpoint's stored arch and the caller's."""
    if callable(given):
        return stored or describe(given), given, False
    if given is not None and not isinstance(given, str):
        raise CheckpointError(f"architecture must be 'package.module:factory' or a callable, got {type(given).__name__}")
    if given and stored and given != stored and _importable(stored):
        leave_out = " (or leave it out: it is built in)" if stored in ARCHITECTURES else ""
        raise CheckpointError(f"{path} was saved with architecture {stored}, but {given} was given; name {stored}"
                              f"{leave_out} (arch= in Python, --arch on the command line)")
    name = given or stored
    if not name:
        raise CheckpointError(f"{path} holds a bare state_dict; name its architecture: arch='package.module:factory' in "
                              "Python, --arch on the command line")
    if name in ARCHITECTURES:
        return name, ARCHITECTURES[name], True
    if not given and not _importable(name):
        raise CheckpointError(f"{path} names architecture {name}, defined in a script or inside a function, which cannot "
                              "be imported by name; name it yourself: --arch package.module:factory (arch= in Python)")
    if not given:
        raise CheckpointError(f"{path} names architecture {name}, which is not built into fixclf; if you trust that "
                              f"code, name it yourself: --arch {name} (arch={name!r} in Python)")
    return name, import_reference(name, "the architecture", CheckpointError), False


def _importable(reference: str) -> bool:
    """Whether a stored ``module:qualname`` can name its factory again: not one of a script run as
    ``__main__``, a lambda or a function defined inside another (a callable given as ``arch=`` is stored
    by :func:`~compressor.references.describe`, whatever it is)."""
    return not reference.startswith("__main__:") and "<" not in reference


def _meta_model(factory: Callable, kwargs: dict, path: Path, name: str, stored: bool) -> nn.Module:
    """An allow-listed model built on the meta device: its shapes, without allocating its memory.
    ``stored``: the kwargs were read from ``path`` (not given by the user)."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        if not stored:
            raise CheckpointError(f"--arch-kwargs do not fit {name} ({exc}); check --arch-kwargs") from exc
        raise CheckpointError(f"{path}: kwargs do not fit {name} ({exc}); the file is damaged") from exc
    with _on_meta():
        return _build(factory, kwargs, name, path if stored else None)


@contextlib.contextmanager
def _on_meta() -> Iterator[None]:
    """Build on the meta device (shapes without memory), keeping torch's warnings about meta tensors
    out of the user's sight: the real build that follows shows the factory's own."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _user_model_on_meta(factory: Callable, kwargs: dict) -> nn.Module | None:
    """A user's (trusted, not allow-listed) model built on the meta device, to check a file's shapes
    before the real build allocates memory: a file of a few bytes whose stored kwargs ask for a huge
    layer is refused by its mismatch instead of first allocating gigabytes. ``None`` when the factory
    cannot build there (it reads tensor values, say): the real build then reports what it reports, and
    prints what the factory prints (here its output is kept)."""
    try:
        with _on_meta(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return _build(factory, kwargs, describe(factory))
    except CheckpointError:
        return None


def _compare_shapes(model: nn.Module, state: dict, path: Path, name: str, replaced: tuple[str, ...] = ()) -> None:
    """``state`` must have ``model``'s keys and shapes, except below the ``replaced`` module names."""
    def kept(key: str) -> bool:
        return not any(r == "" or key.startswith(f"{r}.") for r in replaced)

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if kept(k)}
    got = {k: tuple(v.shape) for k, v in _unwrapped(state, model).items() if kept(k)}
    if expected != got:
        wrong = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise CheckpointError(f"{path}: state_dict does not match {name}(**kwargs) (first difference: {wrong[0]}); "
                              "the file is damaged or belongs to another architecture")


def _in_current_form(plan: list[LayerPlan], state: dict, path: Path) -> dict:
    """``state`` with what an earlier fixclf stored in another form given in today's: a fixed head's
    scale, once stored as alpha, is learned as log(alpha) (:func:`~compressor.layers.heads.with_log_alpha`)."""
    for entry in plan:
        if entry.replaced and entry.role == "head":
            try:
                state = with_log_alpha(state, f"{entry.name}." if entry.name else "")
            except ValueError as exc:
                raise CheckpointError(f"{path}: {exc}; the file is damaged") from exc
    return state


def _compare_replacements(plan: list[LayerPlan], state: dict, path: Path) -> None:
    """Each replaced layer's stored tensors must be exactly those its kind builds, checked on the meta
    device before anything is allocated: a small file cannot make fixclf build huge layers whose
    weights it does not even hold."""
    for entry in plan:
        if not entry.replaced:
            continue
        with torch.device("meta"):
            built = entry.build().state_dict()
        prefix = f"{entry.name}." if entry.name else ""
        expected = {prefix + k: tuple(v.shape) for k, v in built.items()}
        got = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        if expected != got:
            wrong = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
            raise CheckpointError(f"{path}: the stored weights of {entry.name or 'the model'} do not match its plan "
                                  f"(first difference: {wrong[0]}); the file is damaged")
        for key, tensor in built.items():
            _check_index(prefix + key, state[prefix + key], tensor.dtype, path)


def _check_index(name: str, stored: torch.Tensor, dtype: torch.dtype, path: Path) -> None:
    """The structured layers' integer buffers are fixed permutations (each row of the last axis a
    permutation of 0..n-1): anything else would index out of range or silently drop features."""
    if stored.dtype != dtype:
        raise CheckpointError(f"{path}: {name} is {stored.dtype}, its layer needs {dtype}; the file is damaged")
    if dtype.is_floating_point or stored.numel() == 0:
        return
    rows = stored.reshape(-1, stored.shape[-1])
    if not torch.equal(rows.sort(dim=-1).values, torch.arange(rows.shape[-1]).expand_as(rows)):
        raise CheckpointError(f"{path}: {name} is not a permutation; the file is damaged")


def _build(factory: Callable, kwargs: dict, name: str, stored_in: Path | None = None, *,
           given_callable: bool = False) -> nn.Module:
    """``factory(**kwargs)`` without the wrappers it may return the model in (:func:`_unwrapped_model`);
    ``stored_in``: the checkpoint the kwargs were read from, which a failure then says is damaged unless
    the factory is the caller's own callable, ``given_callable`` (the user's own --arch-kwargs are
    theirs to fix)."""
    if given_callable and name != describe(factory):
        name = f"{describe(factory)} (given for {name})"
    try:
        model = call_user_code(factory, kwargs, f"building the architecture {name}", CheckpointError)
    except CheckpointError as exc:
        if stored_in is None:
            raise CheckpointError(f"{exc}; check --arch and --arch-kwargs") from exc
        if given_callable:
            raise CheckpointError(f"{stored_in}: {exc} with the kwargs the file stores ({kwargs!r:.120}); give the "
                                  "factory that compressed it, which takes them") from exc
        raise CheckpointError(f"{stored_in}: {exc} with the kwargs stored in the file; the file is damaged") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{name} returned {type(model).__name__}, not a torch.nn.Module; name a factory that returns the model")
    model = _unwrapped_model(model)
    lazy = [n or "the model" for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise CheckpointError(f"{name} builds lazy modules whose sizes are known only after a first call ({', '.join(map(repr, lazy[:3]))}); "
                              "fixclf rebuilds the model from its architecture: build them with their sizes "
                              "(nn.Linear(in_features, out_features) for nn.LazyLinear)")
    return model


def _unwrapped_model(model: nn.Module) -> nn.Module:
    """The model inside the wrappers a factory may return it in: DataParallel / DistributedDataParallel
    (``.module``) and torch.compile (``._orig_mod``), which neither ONNX export nor layer surgery see
    through; their state's key prefixes are taken off likewise (:func:`_unwrapped`)."""
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())  # imported by torch.compile
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""What a wrapper adds to every key of the state it saves: DataParallel / DistributedDataParallel, torch.compile."""


def _without_wrappers(state: dict, expected: list[str]) -> dict:
    """``state`` without DDP's and torch.compile's prefixes on every key, when the model's keys lack them."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if (state and all(isinstance(key, str) and key.startswith(prefix) for key in state)
                    and not any(key.startswith(prefix) for key in expected)):
                state, stripped = {key[len(prefix):]: value for key, value in state.items()}, True
    return state


def _unwrapped(state: dict, model: nn.Module) -> dict:
    """``state`` without the prefixes a wrapper put before every key, when the model's own keys lack them:
    DDP's and torch.compile's, and any one first name that every key shares when without it (and those
    wrappers) the keys are exactly the model's (a training framework's ``model.`` / ``net.`` attribute,
    as in Lightning, also around a compiled or DDP model)."""
    expected = list(model.state_dict())
    state = _without_wrappers(state, expected)
    firsts = {key.partition(".")[0] + "." for key in state}
    if len(firsts) == 1 and all("." in key for key in state):
        prefix = firsts.pop()
        without = _without_wrappers({key[len(prefix):]: value for key, value in state.items()}, expected)
        state = without if set(without) == set(expected) else state
    return state


def _key_mismatch(state: dict, model: nn.Module) -> str | None:
    """How the keys of ``state`` differ from the model's, one example of each kind (None: the same keys)."""
    expected, given = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    parts = ([f"{len(missing)} of the model's keys missing, e.g. {missing[0]!r}"] if missing else []) + (
        [f"{len(unexpected)} keys the model does not have, e.g. {unexpected[0]!r}"] if unexpected else [])
    return "; ".join(parts) or None


def _load_state(model: nn.Module, state: dict, source: Path, assign: bool = False) -> nn.Module:
    """Load ``state`` strictly (``assign``: the tensors become the parameters, as for a meta-device model)
    into ``model`` made float32 (whatever precision its factory built it in). Only the values are taken:
    a tensor object from the file (a Parameter rebuilt with backward hooks, which torch's weights-only
    loader allows) never becomes the model's own."""
    state = {key: value.detach() if isinstance(value, torch.Tensor) else value
             for key, value in _unwrapped(state, model).items()}
    if not assign and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"the architecture builds its weights on the meta device (shapes without memory), so "
                              f"{source}'s values cannot be loaded into it; build it on the CPU (no device='meta' in "
                              "--arch-kwargs or the factory)")
    if not assign:  # float32 before the values arrive: a factory's bfloat16 / float16 layers would round them
        model.float()
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except (RuntimeError, ValueError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise _mismatch(source, _key_mismatch(state, model) or (lines[1:2] or lines[:1] or ["mismatch"])[0][:200]) from exc
    return model.float().cpu().eval()


def _mismatch(source: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{source} does not match the architecture ({detail}); check the architecture and its keyword "
                           "arguments (arch= / arch_kwargs in Python, --arch / --arch-kwargs)")


def _check_fits_on_meta(model: nn.Module | None, state: dict, source: Path) -> None:
    """Refuse ``state`` as :func:`_load_state` would, before the real model exists: its keys and shapes
    against ``model`` built on the meta device (None: the factory cannot build there; nothing checked)."""
    if model is None:
        return
    state = _unwrapped(state, model)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    detail = _key_mismatch(state, model) or next(
        (f"size mismatch for {key}: {tuple(value.shape)} in the file, {expected[key]} in the model"
         for key, value in state.items() if isinstance(value, torch.Tensor) and tuple(value.shape) != expected[key]), None)
    if detail:
        raise _mismatch(source, detail)


def _source_file(factory: Callable) -> Path | None:
    """The file a user's factory was imported from (protected from being overwritten), if any."""
    try:
        source = inspect.getsourcefile(factory)
    except TypeError:
        return None
    return Path(source).resolve() if source else None


def _model_from(obj: dict, state: dict, given: Architecture | None, kwargs: dict | None, path: Path,
                stored: bool = False) -> LoadedModel:
    """The model ``obj`` / ``state`` describe, built with ``kwargs`` (``stored``: read from ``path``)."""
    name, factory, allow_listed = _factory(obj.get("arch"), given, path)
    _check_plain(kwargs, path, "kwargs")
    if allow_listed:
        _compare_shapes(_meta_model(factory, kwargs, path, name, stored), state, path, name)
    else:
        _check_fits_on_meta(_user_model_on_meta(factory, kwargs), state, path)
    model = _build(factory, kwargs, name, path if stored else None, given_callable=callable(given))
    return LoadedModel(model, path, name, kwargs, factory_file=None if allow_listed else _source_file(factory))


def _stored_kwargs(obj: dict, path: Path) -> dict:
    kwargs = obj.get("kwargs")
    if kwargs is None:
        return {}
    return _require(obj, "kwargs", dict, path, "a mapping of keyword arguments")


def _check_kwargs_agree(given: dict | None, obj: dict, path: Path) -> None:
    """A checkpoint that stores its architecture's kwargs is built from them: ``--arch-kwargs``, when
    given, must say the same (as ``--arch`` must name the same architecture), not be silently ignored."""
    stored = _stored_kwargs(obj, path)
    if given is not None and _as_json(given) != _as_json(stored):
        raise CheckpointError(f"--arch-kwargs {_as_json(given)[:200]} differ from the kwargs stored in {path} "
                              f"({_as_json(stored)[:200]}), which build its model; drop --arch-kwargs")


def _as_json(value: Any) -> str:
    """Keyword arguments as canonical JSON (tuples read as lists), for comparing and showing them."""
    return json.dumps(value, sort_keys=True, default=repr)


def load_model(path: str | os.PathLike, *, arch: Architecture | None = None, arch_kwargs: dict | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load any accepted checkpoint (see module docstring) as a float32 model in eval mode."""
    path = Path(path)
    obj = safe_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") in (COMPRESSED_FORMAT, MODEL_FORMAT):
        _check_kwargs_agree(arch_kwargs, obj, path)
    if isinstance(obj, nn.Module):
        _check_state(obj.state_dict(), path)
        if arch is None:
            return LoadedModel(_unwrapped_model(obj).float().eval(), path)
        loaded = _model_from({}, obj.state_dict(), arch, arch_kwargs or {}, path)
        _load_state(loaded.model, obj.state_dict(), path)
        return loaded
    if isinstance(obj, dict) and obj.get("format") == COMPRESSED_FORMAT:
        return load_compressed(path, arch=arch, _obj=obj)
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        _require(obj, "arch", str, path, "an architecture name")
        state = _check_state(obj.get("state_dict"), path)
        loaded = _model_from(obj, state, arch, _stored_kwargs(obj, path), path, stored=True)
        loaded.data = _bundled_data(path, obj)
        _load_state(loaded.model, state, path)
        return loaded
    if isinstance(obj, dict) and "format" in obj:
        raise CheckpointError(f"{path} has format {str(obj['format'])[:40]!r}, which this fixclf does not read; "
                              f"expected {MODEL_FORMAT} or {COMPRESSED_FORMAT}")
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        state = _check_state(obj, path)
        loaded = _model_from({}, state, arch, arch_kwargs or {}, path)
        _load_state(loaded.model, state, path)
        return loaded
    nested = [k for k, v in obj.items() if isinstance(k, str) and isinstance(v, dict) and v
              and all(isinstance(t, torch.Tensor) for t in v.values())] if isinstance(obj, dict) else []
    if nested:
        raise CheckpointError(f"{path} is a training checkpoint (a dict of {', '.join(map(repr, list(obj)[:5]))}), not a "
                              f"model; save its state_dict on its own: torch.save(checkpoint[{nested[0]!r}], 'model.pt')")
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)] if isinstance(obj, dict) else []
    if tensors:
        others = [repr(k)[:40] for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise CheckpointError(f"{path} holds {len(tensors)} tensors and {len(others)} entries that are not "
                              f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): a state_dict holds "
                              "tensors only; save model.state_dict() on its own")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model, state_dict or fixclf checkpoint; "
                          "save model.state_dict() or the whole model")


def plan_from_records(records: Any, model: nn.Module, path: Path) -> list[LayerPlan]:
    """Check a stored plan against the registry and the model's Linear layers; the typed plan."""
    if not isinstance(records, list) or not records:
        raise CheckpointError(f"{path}: 'plan' must be a non-empty list of layers; the file is damaged")
    linears = dict(linear_layers(model))
    names = [f.name for f in fields(LayerPlan)]
    plan, seen = [], set()
    for record in records:
        if not isinstance(record, dict) or set(record) != set(names):
            raise CheckpointError(f"{path}: each plan entry must have exactly the fields {', '.join(names)}")
        entry = LayerPlan(**record)
        _check_plan_types(entry, f"{path}: plan entry")
        _check_plan_entry(entry, linears.get(entry.name), path)
        if entry.name in seen:
            raise CheckpointError(f"{path}: the plan names layer {entry.name!r} twice")
        seen.add(entry.name)
        plan.append(entry)
    return plan


def _check_plan_types(entry: LayerPlan, where: str) -> None:
    ints = (entry.in_features, entry.out_features, entry.params_before, entry.params_after)
    if (not isinstance(entry.name, str) or entry.role not in ("head", "hidden") or not isinstance(entry.reason, str)
            or not (entry.kind is None or isinstance(entry.kind, str)) or not isinstance(entry.options, dict)
            or not all(type(v) is int and 0 <= v < 2**63 for v in ints) or len(entry.reason) > 500):
        raise CheckpointError(f"{where} has malformed fields; the file is damaged")


def _check_plan_entry(entry: LayerPlan, linear: nn.Linear | None, path: Path) -> None:
    where = f"{path}: plan entry {str(entry.name)[:60]!r}"
    _check_plan_types(entry, where)
    if linear is None:
        raise CheckpointError(f"{where} names no Linear layer of the model; the file does not belong to this architecture")
    if (entry.in_features, entry.out_features) != (linear.in_features, linear.out_features):
        raise CheckpointError(f"{where} says Linear({entry.in_features}, {entry.out_features}), the model has "
                              f"Linear({linear.in_features}, {linear.out_features})")
    if entry.kind is None:
        if entry.options != {}:
            raise CheckpointError(f"{where} keeps the layer but carries options")
        return
    if (entry.role, entry.kind) not in REGISTRY:
        raise CheckpointError(f"{where}: {entry.role!r}/{entry.kind!r} is not a known layer kind")
    try:
        entry.options = entry.spec.check_options(entry.options)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    reason = entry.spec.unsupported(entry.in_features, entry.out_features)
    if reason:
        raise CheckpointError(f"{where}: {reason}")


def load_compressed(path: str | os.PathLike, *, arch: Architecture | None = None, _obj: dict | None = None) -> LoadedModel:
    """Load a compressed checkpoint (weights_only) and rebuild the structured model exactly.

    ``arch``: needed only when the original architecture is not built into fixclf; the same
    ``"package.module:factory"`` that compressed it, or that factory itself."""
    path = Path(path)
    obj = _obj if _obj is not None else safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != COMPRESSED_FORMAT:
        raise CheckpointError(f"{path} is not a fixclf compressed checkpoint; compress the model first (fixclf compress)")
    _require(obj, "arch", str, path, "an architecture name")
    state = _check_state(obj.get("state_dict"), path)
    read_stored_report(path, obj)
    name, factory, allow_listed = _factory(obj["arch"], arch, path)
    kwargs = _stored_kwargs(obj, path)
    _check_plain(kwargs, path, "kwargs")
    if allow_listed:  # everything is checked on the meta device; the dense layers a plan replaces are never allocated
        meta = _meta_model(factory, kwargs, path, name, stored=True)
        plan = plan_from_records(obj.get("plan"), meta, path)
        state = _in_current_form(plan, state, path)
        _compare_shapes(meta, state, path, name, tuple(p.name for p in plan if p.replaced))
        _compare_replacements(plan, state, path)
        model = _load_state(apply_plan(meta, plan), state, path, assign=True)
    else:
        meta = _user_model_on_meta(factory, kwargs)
        if meta is not None:  # the shapes are checked before the real build allocates the layers the plan replaces
            plan = plan_from_records(obj.get("plan"), meta, path)
            state = _in_current_form(plan, state, path)
            _check_fits_on_meta(apply_plan(meta, plan), state, path)
        base = _build(factory, kwargs, name, path, given_callable=callable(arch))
        plan = plan_from_records(obj.get("plan"), base, path)
        state = _in_current_form(plan, state, path)  # nothing left to convert when the meta check did it
        _compare_replacements(plan, state, path)
        model = _load_state(apply_plan(base, plan), state, path)
    return LoadedModel(model, path, name, kwargs, _bundled_data(path, obj), plan,
                       factory_file=None if allow_listed else _source_file(factory))


def read_stored_report(path: str | os.PathLike, _obj: dict | None = None):
    """The typed report stored in a compressed checkpoint, read without building or importing the model."""
    from .report import Report  # lazily: report imports cost -> export -> onnx, which loading weights never needs

    path = Path(path)
    obj = _obj if _obj is not None else safe_load(path)
    if not isinstance(obj, dict) or obj.get("format") != COMPRESSED_FORMAT:
        raise CheckpointError(f"{path} is not a fixclf compressed checkpoint (no stored report); run fixclf compress on it first")
    try:
        return Report.from_dict(obj.get("report"))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the stored report is malformed ({_first_line(exc)}); compress the model again") from exc


def compressed_payload(loaded: LoadedModel, plan: list[LayerPlan], model: nn.Module, report, data_ref: str | None) -> dict:
    """The plain dict a compressed checkpoint stores (loadable with weights_only=True)."""
    return {
        "format": COMPRESSED_FORMAT, "arch": loaded.arch, "kwargs": loaded.kwargs,
        "plan": [asdict(entry) for entry in plan], "state_dict": model.state_dict(),
        "report": report.to_dict(), "data": data_ref,
    }


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Atomically ``torch.save`` a plain dict (loadable with weights_only=True), e.g. a fixclf checkpoint
    ``{"format": MODEL_FORMAT, "arch": ..., "kwargs": ..., "state_dict": ..., "data": ...}``."""
    with atomic_file(Path(path)) as tmp:
        torch.save(payload, tmp)
