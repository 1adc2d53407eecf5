"""Calibration and fine-tuning data: loading, splitting, validation.

``--data`` accepts

* ``.npz`` or ``.pt`` (read with weights_only) holding ``x`` (N, ...) and optionally ``y`` (N,)
  integer labels, and optionally a validation split ``x_val`` / ``y_val``;
* ``package.module:function`` returning such a dict (or a tuple ``(x, y)``).

Without a validation split, a deterministic :data:`HOLDOUT_FRACTION` of the rows (seeded
permutation) is held out for evaluation. Nothing here downloads anything.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .references import call_user_code, import_reference, is_reference
from .errors import DataError, PlanError

__all__ = ["HOLDOUT_FRACTION", "Dataset", "load_data", "check_against_model"]

HOLDOUT_FRACTION = 0.2


@dataclass
class Dataset:
    """Training rows (for fitting and distillation) and held-out rows (for evaluation)."""

    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor | None
    source: str
    files: tuple[Path, ...] = ()  # what was read (the data file, or the data function's module): never overwritten

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None and self.y_val is not None


def _as_tensor(value, name: str, source: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    except Exception as exc:
        raise DataError(f"{source}: {name} is not an array ({type(value).__name__})") from exc


def _read(spec: str) -> tuple[dict, tuple[Path, ...]]:
    """The arrays ``spec`` names and the files they came from."""
    if is_reference(spec) and not Path(spec).exists():
        function = import_reference(spec, "--data", DataError)
        result = call_user_code(function, {}, f"--data {spec}", DataError)
        module_file = getattr(sys.modules.get(getattr(function, "__module__", "")), "__file__", None)
        arrays = dict(zip(("x", "y"), result)) if isinstance(result, tuple) else result
        return arrays, (Path(module_file),) if module_file else ()
    return _read_file(Path(spec), spec), (Path(spec),)


def _read_file(path: Path, spec: str) -> dict:
    if not path.is_file():
        raise DataError(f"--data {spec}: no such file; give an .npz/.pt file with x (and y) or module:function")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"--data {spec}: cannot read it ({type(exc).__name__}); expected .npz or .pt with x and y") from exc


def _check_rows(x: torch.Tensor, y: torch.Tensor | None, name: str, source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{source}: {name} must be (samples, features...) with at least one sample, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{source}: {name} contains NaN or infinite values; clean the data first")
    if y is not None:
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{source}: labels for {name} must be integer class indices of shape ({x.shape[0]},), got shape "
                            f"{tuple(y.shape)}; convert one-hot or probability labels with y.argmax(1)")
        if torch.is_floating_point(y) and not (torch.isfinite(y).all() and torch.equal(y, y.round())):
            raise DataError(f"{source}: labels must be integer class indices, not fractions; pass y as integers")
        y = y.long()
    return x.float(), y


def load_data(spec: str | Path, *, seed: int = 0) -> Dataset:
    """Read ``spec`` (see module docstring) and split off held-out rows when none are given."""
    source = str(spec)
    arrays, files = _read(source)
    if not isinstance(arrays, dict) or "x" not in arrays:
        raise DataError(f"--data {source}: expected a dict with key 'x' (and optional 'y', 'x_val', 'y_val')")
    x = _as_tensor(arrays["x"], "x", source)
    y = _as_tensor(arrays["y"], "y", source) if arrays.get("y") is not None else None
    x, y = _check_rows(x, y, "x", source)
    if arrays.get("x_val") is not None:
        x_val = _as_tensor(arrays["x_val"], "x_val", source)
        y_val = _as_tensor(arrays["y_val"], "y_val", source) if arrays.get("y_val") is not None else None
        x_val, y_val = _check_rows(x_val, y_val, "x_val", source)
        return Dataset(x, y, x_val, y_val, source, files)
    if x.shape[0] < 2:
        raise DataError(f"{source}: need at least 2 samples to hold some out for evaluation")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(HOLDOUT_FRACTION * x.shape[0])))
    val, train = order[:n_val], order[n_val:]
    return Dataset(x[train], y[train] if y is not None else None, x[val], y[val] if y is not None else None, source, files)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


@torch.no_grad()
def check_against_model(data: Dataset, model: nn.Module) -> int:
    """Check the data fits the model before any work; returns the number of classes C."""
    if data.x_val.shape[1:] != data.x_train.shape[1:]:
        raise DataError(f"{data.source}: x_val rows have shape {tuple(data.x_val.shape[1:])}, x rows {tuple(data.x_train.shape[1:])}")
    try:
        logits = model(data.x_train[:2])
    except (Exception, SystemExit) as exc:
        raise DataError(
            f"{data.source}: samples of shape {tuple(data.x_train.shape[1:])} do not fit the model "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}); check --data"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or not logits.is_floating_point():
        raise PlanError(f"the model returns {_describe(logits)}; fixclf compresses classifiers whose forward returns "
                        "one float logits tensor (batch, classes): wrap the model so that it does")
    if data.has_labels and logits.ndim != 2:
        raise DataError(f"{data.source}: labels need a model returning (batch, classes) logits, this one returns shape "
                        f"{tuple(logits.shape)}; drop y (distillation alone needs no labels) or pool the outputs")
    classes = logits.shape[-1]
    for labels in (data.y_train, data.y_val):
        if labels is not None and labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise DataError(
                f"{data.source}: labels range over [{int(labels.min())}, {int(labels.max())}] but the model has "
                f"{classes} classes (labels must be in [0, {classes})); check the labels"
            )
    return classes
