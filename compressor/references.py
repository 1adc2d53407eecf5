"""User code named on the command line: ``package.module:name`` references, imported and called safely.

Only the user's own flags (``--arch``, ``--data``) or a Python caller name code this way; nothing
read from a file is ever imported (see :mod:`compressor.checkpoint`). Like ``python -m``, the
current directory comes first on ``sys.path``, so ``--arch mymodel:net`` finds ``./mymodel.py``.
Whatever the user code raises, ``SystemExit`` included, becomes one error of the caller's class.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

from .errors import FixclfError

__all__ = ["IMPORT_REFERENCE", "is_reference", "current_directory_first", "import_reference", "call_user_code", "describe"]

IMPORT_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
"""``package.module:name`` (name may be dotted: ``module:Class.factory``)."""


def is_reference(text: str) -> bool:
    return bool(IMPORT_REFERENCE.fullmatch(text))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def current_directory_first() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` does, so that the user's own
    modules there import: for ``--arch`` / ``--data`` references, and for the classes a pickled
    model the user trusts (``--trust-pickle``) names, usually defined in a script beside it."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def import_reference(reference: str, flag: str, error: type[FixclfError]) -> Callable:
    """Import ``package.module:name`` (current directory first, as ``python -m`` does); must be callable."""
    if not is_reference(reference):
        raise error(f"{flag} {reference!r} is not of the form package.module:name")
    module_name, attribute = reference.split(":")
    current_directory_first()
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (Exception, SystemExit) as exc:
        raise error(f"cannot import {reference} for {flag} ({_first_line(exc)}); check the name, and that the module "
                    "is in the current directory or installed") from exc
    if not callable(target):
        raise error(f"{reference} ({flag}) is not callable; name a function or class")
    return target


def call_user_code(function: Callable, kwargs: dict, what: str, error: type[FixclfError]) -> Any:
    """``function(**kwargs)``; anything it raises (SystemExit too) becomes ``error`` with one line."""
    try:
        return function(**kwargs)
    except (Exception, SystemExit) as exc:
        raise error(f"{what} failed: {_first_line(exc)}") from exc


def describe(function: Callable) -> str:
    """``module:qualname`` of a callable, the form a reference takes."""
    return f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"
