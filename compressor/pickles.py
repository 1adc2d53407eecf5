"""Reading a file ``torch.save`` wrote with bounded work, whatever the file holds.

``torch.load(weights_only=True)`` runs no code, but a small file can still cost hours or all
memory: a deflated zip that unpacks a thousand times its size, a pickled structure of hundreds of
MB besides the tensors (the weights-only unpickler reads about 10 MB/s), shared references ("billion
laughs": a few KB that any later walk visits 10^12 times) or nesting deep enough for a Python
recursion. :func:`load_bounded` refuses each before any other code looks at the result; every
reader of a pickle (checkpoints, ``.pt`` data, resume states) goes through it, each with its own
:class:`PickleLimits` and error type.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import FixclfError

__all__ = ["PickleLimits", "CHECKPOINT_LIMITS", "load_bounded", "check_unpacked_size"]

MAX_DEPTH = 32
"""Nesting a loaded structure may have: a state_dict with metadata is a few levels deep."""


@dataclass(frozen=True)
class PickleLimits:
    """What one kind of file may cost: its zip's unpacked size over its size on disk (``unpack_ratio``;
    torch.save never compresses), the bytes of its pickled structure besides the tensors
    (``pickle_bytes``) and the values a walk over the loaded result may visit (``items``)."""

    unpack_ratio: float
    pickle_bytes: int
    items: int


CHECKPOINT_LIMITS = PickleLimits(unpack_ratio=2, pickle_bytes=32 << 20, items=1_000_000)
"""Checkpoints and resume states: the pickled names and settings of the largest models are a few MB
and a few thousand values; these limits are many times that."""


def _entries(path: Path, error: Callable[[str], FixclfError]) -> list[zipfile.ZipInfo] | None:
    """The members of ``path`` as a zip archive (None: not one), read once; a damaged archive is ``error``."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise error(f"{path} is a damaged zip archive ({exc}); write it again") from exc


def _check_unpacked(path: Path, entries: list[zipfile.ZipInfo] | None, max_ratio: float,
                    error: Callable[[str], FixclfError]) -> None:
    """The zip-bomb check of :func:`check_unpacked_size` on members already read (None: not a zip)."""
    if entries is None:
        return
    unpacked = sum(info.file_size for info in entries)
    if unpacked > max_ratio * path.stat().st_size + (1 << 20):
        raise error(f"{path} unpacks to {unpacked:,} bytes from {path.stat().st_size:,}: refused as a zip bomb; "
                    "save it again without compression")


def check_unpacked_size(path: Path, max_ratio: float, error: Callable[[str], FixclfError]) -> None:
    """Refuse a zip container (a torch checkpoint, an .npz) that unpacks to more than ``max_ratio``
    times its size (plus 1 MB): a deflated file that grows hundreds of times is a zip bomb."""
    _check_unpacked(path, _entries(path, error), max_ratio, error)


def _check_pickle_size(path: Path, entries: list[zipfile.ZipInfo] | None, max_bytes: int,
                       error: Callable[[str], FixclfError], advice: str) -> None:
    """Refuse a file whose pickled structure (besides the tensors) may be over ``max_bytes``: a torch zip
    file's ``data.pkl``, or the whole of a file that is not a zip (a plain pickle, or the legacy torch
    format of PyTorch < 1.6, which interleaves structure and tensors)."""
    if entries is None:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path} is {size:,} bytes and not a zip archive, so all of it would be read as one pickle (at "
                        f"most {max_bytes:,} bytes are): if it is an old torch file, load and save it again with PyTorch "
                        f">= 1.6, which writes a zip; else {advice}")
        return
    pickled = max((info.file_size for info in entries if info.filename.endswith("data.pkl")), default=0)
    if pickled > max_bytes:
        raise error(f"{path} holds a pickled structure of {pickled:,} bytes besides its tensors (at most {max_bytes:,} "
                    f"are read); {advice}")


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _children(value: Any) -> list:
    """The values a walk reaches from one container: a dict's keys and values, a sequence's or set's items."""
    return [item for pair in value.items() for item in pair] if isinstance(value, dict) else list(value)


def _check_bounded(obj: Any, path: Path, error: Callable[[str], FixclfError], max_items: int, advice: str,
                   plain_tensors: bool) -> None:
    """Refuse what ``torch.load`` returned when walking it would visit more than ``max_items`` values
    or go deeper than :data:`MAX_DEPTH` (shared references count each time they are reached; a
    reference cycle, which a walk would never leave, counts as too many values). Tensors are leaves.

    Each distinct container is expanded once, its (values visited, depth below it) remembered by
    identity (the loaded structure keeps every object alive): the check costs the distinct objects,
    not the visits it counts, so shared references a walk would visit 10^12 times are refused at once.
    Iterative, so it cannot overflow Python's stack itself.

    ``plain_tensors``: also refuse a tensor that carries attributes of its own (weights-only
    unpickling lets a file set any, ``is_floating_point`` or ``detach`` included, which would fool
    every later check of its values)."""
    def refuse(what: str) -> FixclfError:
        return error(f"{path} holds {what} besides its tensors; {advice}")

    measured: dict[int, tuple[int, int]] = {}  # id -> (values visited from it, itself included; depth below it)
    expanding: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        value, expanded = stack.pop()
        if plain_tensors and isinstance(value, torch.Tensor) and vars(value):
            raise refuse(f"a tensor with attributes of its own ({', '.join(sorted(map(str, vars(value)))[:3])})")
        if not isinstance(value, _CONTAINERS) or id(value) in measured:
            continue
        if not expanded:
            if id(value) in expanding:  # reached again from below itself: a cycle
                raise refuse(f"more than {max_items:,} values")
            if len(expanding) > MAX_DEPTH:  # `expanding` holds its ancestors: their count is its depth
                raise refuse(f"nesting deeper than {MAX_DEPTH}")
            expanding.add(id(value))
            stack.append((value, True))
            stack.extend((child, False) for child in _children(value))
            continue
        expanding.discard(id(value))
        visits, depth = 1, 0
        for child in _children(value):
            child_visits, child_depth = measured.get(id(child), (1, 0)) if isinstance(child, _CONTAINERS) else (1, 0)
            visits, depth = visits + child_visits, max(depth, child_depth + 1)
        if visits > max_items:
            raise refuse(f"more than {max_items:,} values")
        if depth > MAX_DEPTH:
            raise refuse(f"nesting deeper than {MAX_DEPTH}")
        measured[id(value)] = (visits, depth)


def load_bounded(path: Path, limits: PickleLimits, error: Callable[[str], FixclfError], advice: str,
                 failure: Callable[[BaseException], FixclfError], *, weights_only: bool = True) -> Any:
    """``torch.load(path)`` on the CPU, between the checks: the zip's unpacked size and the pickled
    structure's size before loading (the latter only for ``weights_only``: a file the user trusts is
    theirs), a bounded walk after. Each refusal is ``error`` ending in ``advice`` (what the user
    should do); whatever ``torch.load`` raises becomes ``failure(exception)`` (callers know what their
    file should have been). ``torch.load``'s own warnings are silenced."""
    entries = _entries(path, error)
    _check_unpacked(path, entries, limits.unpack_ratio, error)
    if weights_only:
        _check_pickle_size(path, entries, limits.pickle_bytes, error, advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=weights_only)
    except (Exception, SystemExit) as exc:
        raise failure(exc) from exc
    _check_bounded(loaded, path, error, limits.items, advice, plain_tensors=weights_only)
    return loaded
