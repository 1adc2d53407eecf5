"""Safe loading and saving of checkpoints; the compressed checkpoint format.

Accepted inputs (``load_model``):

* a **fixclf checkpoint**: ``{"format": "fixclf.model/1", "arch": "pkg.module:factory",
  "kwargs": {...}, "state_dict": {...}, "data": "optional/relative.npz"}``;
* a **state_dict** plus ``arch="pkg.module:factory"`` (and ``arch_kwargs``);
* a **compressed checkpoint** written by fixclf (``"format": "fixclf.compressed/1"``: the same
  plus ``"plan"``, the replacement of each layer, and ``"report"``);
* a **whole pickled nn.Module**, only with ``trust_pickle=True``.

Everything is read with ``torch.load(weights_only=True)``: a pickle that needs any class or
function (the way a malicious ``__reduce__`` runs code) is refused, naming what it wanted.
An architecture named *inside* a checkpoint is imported only from ``compressor.*``; any other
module must be confirmed by the user passing the same ``arch``.

Writes are atomic: a temporary file in the target directory, then ``os.replace``.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import CheckpointError, OutputError

__all__ = [
    "MODEL_FORMAT",
    "COMPRESSED_FORMAT",
    "LoadedModel",
    "load_model",
    "load_compressed",
    "save_checkpoint",
    "atomic_write",
    "check_output_path",
    "build_arch",
    "IMPORT_REFERENCE",
]

IMPORT_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""``package.module:name``: how --arch and --data name code to import."""
MODEL_FORMAT = "fixclf.model/1"
COMPRESSED_FORMAT = "fixclf.compressed/1"


@dataclass
class LoadedModel:
    """A model and what fixclf knows about where it came from."""

    model: nn.Module
    path: Path
    arch: str | None = None
    kwargs: dict = field(default_factory=dict)
    data: Path | None = None  # data file bundled with the checkpoint, resolved
    plan: list[dict] | None = None  # only for compressed checkpoints
    report: dict | None = None  # only for compressed checkpoints
    compressed: bool = False


def build_arch(arch: str, kwargs: dict | None = None) -> nn.Module:
    """Import ``pkg.module:factory`` and call it with ``kwargs``; it must return an nn.Module."""
    if not IMPORT_REFERENCE.fullmatch(arch or ""):
        raise CheckpointError(f"--arch {arch!r} is not of the form package.module:factory")
    module_name, factory_name = arch.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CheckpointError(f"cannot import {module_name!r} for --arch ({type(exc).__name__}: {exc}); check PYTHONPATH") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise CheckpointError(f"{module_name} has no callable {factory_name!r}; check --arch")
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:
        raise CheckpointError(f"{arch}(**{json.dumps(kwargs or {})}) failed: {type(exc).__name__}: {exc}; check --arch-kwargs") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _unsafe_globals(path: Path) -> list[str]:
    """Classes/functions a checkpoint's pickle would import, found without unpickling it."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: scan the raw pickle's opcodes
        pass
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:
        pass
    return names


def _safe_torch_load(path: Path, trust_pickle: bool) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty; re-save or re-download the checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path} needs {unsafe[0]} to load, which can run arbitrary code; if you trust this file, pass --trust-pickle"
            ) from exc
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]})") from exc
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "it may be truncated or of another format"
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_state(model: nn.Module, state: dict, source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2] or [str(exc)[:200]]
        raise CheckpointError(f"{source} does not match the architecture ({first[0][:200]}); check --arch / --arch-kwargs") from exc


def _bundled_data(path: Path, obj: dict) -> Path | None:
    """The data file a fixclf checkpoint names, relative to the checkpoint (or absolute)."""
    return (path.parent / obj["data"]) if obj.get("data") else None


def _resolve_arch(stored: str | None, given: str | None, path: Path) -> str:
    if given and stored and given != stored:
        raise CheckpointError(f"{path} was saved with architecture {stored}, but --arch {given} was given; drop --arch")
    arch = given or stored
    if not arch:
        raise CheckpointError(f"{path} holds a bare state_dict; pass --arch package.module:factory to say which model it is")
    if not given and not arch.startswith("compressor."):
        raise CheckpointError(f"{path} names architecture {arch}; pass --arch {arch} to allow importing that code")
    return arch


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load any accepted checkpoint (see module docstring) as a float32 model in eval mode."""
    path = Path(path)
    obj = _safe_torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if arch is None:
            return LoadedModel(obj.float().eval(), path)
        model = build_arch(arch, arch_kwargs)  # give the pickled weights an importable architecture
        _load_state(model, obj.state_dict(), str(path))
        return LoadedModel(model.float().eval(), path, arch, arch_kwargs or {})
    if isinstance(obj, dict) and obj.get("format") in (MODEL_FORMAT, COMPRESSED_FORMAT):
        if obj["format"] == COMPRESSED_FORMAT:
            return load_compressed(path, arch=arch, _obj=obj)
        name = _resolve_arch(obj.get("arch"), arch, path)
        kwargs = obj.get("kwargs") or {}
        model = build_arch(name, kwargs)
        _load_state(model, obj.get("state_dict", {}), str(path))
        return LoadedModel(model.float().eval(), path, name, kwargs, _bundled_data(path, obj))
    if _is_state_dict(obj):
        name = _resolve_arch(None, arch, path)
        model = build_arch(name, arch_kwargs)
        _load_state(model, obj, str(path))
        return LoadedModel(model.float().eval(), path, name, arch_kwargs or {})
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a model, state_dict or fixclf checkpoint; "
        "save model.state_dict() or the whole model"
    )


def load_compressed(path: str | os.PathLike, *, arch: str | None = None, _obj: dict | None = None) -> LoadedModel:
    """Load a compressed checkpoint (weights_only) and rebuild the structured model exactly."""
    from .surgery import apply_plan  # surgery imports this module

    path = Path(path)
    obj = _obj if _obj is not None else _safe_torch_load(path, trust_pickle=False)
    if not isinstance(obj, dict) or obj.get("format") != COMPRESSED_FORMAT:
        raise CheckpointError(f"{path} is not a fixclf compressed checkpoint; run fixclf compress first")
    try:
        name = _resolve_arch(obj["arch"], arch, path)
        kwargs, plan, state = obj.get("kwargs") or {}, obj["plan"], obj["state_dict"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is a damaged fixclf checkpoint (missing {exc}); compress the model again") from exc
    model = apply_plan(build_arch(name, kwargs), plan)
    _load_state(model, state, str(path))
    return LoadedModel(model.float().eval(), path, name, kwargs, _bundled_data(path, obj), plan, obj.get("report"),
                       compressed=True)


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that is one of the inputs, exists (without force) or cannot be written."""
    resolved = output.resolve()
    for source in inputs:
        if source.exists() and resolved == source.resolve():
            raise OutputError(f"output {output} is the input file; choose another --output (inputs are never modified)")
    if output.is_dir():
        raise OutputError(f"output {output} is a directory; give a file name")
    if output.exists() and not force:
        raise OutputError(f"{output} exists; pass --force to overwrite it or choose another --output")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"directory {parent} does not exist; create it or choose another --output")
    try:  # a real write probe: os.access says yes to root even on read-only file systems
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fixclf-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to directory {parent} ({exc.strerror}); choose another --output") from exc


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    # keep the suffix: onnxruntime picks the file format (.onnx or .ort) by it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically ``torch.save`` a plain dict (loadable with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
