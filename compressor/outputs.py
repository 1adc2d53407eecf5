"""Every file a command writes: derived names, checks before any work, temporary files, commit or roll back.

An :class:`Artifacts` set owns the outputs of one command (the compressed checkpoint and its ONNX,
int8 and ORT files, or an export's files). Before any work, :meth:`Artifacts.check` refuses an
output that is one of the inputs (same file, also through a link), exists without ``force``, is a
directory, has a name the file system cannot hold, or lies in a directory that cannot be
written; :meth:`Artifacts.commit` checks all of that again right before it renames (the run may have
taken hours). Each file is written to a uniquely named temporary file in its target directory
(``tempfile.mkstemp``: a user's file is never clobbered by a fixed name) and all of them are
renamed into place together by :meth:`Artifacts.commit`; on any exit without commit (an error,
Ctrl-C, SIGTERM turned into an exception by the CLI) every temporary file is removed. A write
that fails (disk full, file-size limit, read-only file system) is an :class:`OutputError`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from .errors import OutputError

__all__ = ["Artifacts", "atomic_file", "check_output_path", "check_resume_path", "compress_outputs", "export_outputs"]

TEMP_PREFIX = ".fixclf-"
COMPRESSED_SUFFIX = ".fixclf.pt"
"""What ``compress`` names its checkpoint by default, and what ``report`` looks for."""
T = TypeVar("T")
AFTER_FINAL_COMMIT: list[Callable[[], None]] = []
"""Run while Ctrl-C / SIGTERM are still held back, right after a command's outputs are in place
(``commit(final=True)``): the CLI ignores late signals there, so a signal landing in that instant can
neither remove committed outputs nor report them lost."""


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back for a few system calls that must not be split (create + record, renames);
    SIGALRM too, on which the CLI delivers a signal that arrived during an import (cli/entry.py)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _is_input(path: Path, inputs: Iterable[Path]) -> bool:
    """Whether ``path`` is one of ``inputs`` (the same file, also through a link, or the same resolved path)."""
    return any(_same_file(path, source) or path.resolve() == Path(source).resolve() for source in inputs)


def check_output_path(output: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse ``output`` before any work: an input, existing (without ``force``), or not writable."""
    parent = output.parent
    if len(os.fsencode(output.name)) > _name_max(parent if parent.is_dir() else Path(".")):
        raise OutputError(f"output name {output.name[:40]}... is longer than the file system allows "
                          f"({_name_max(parent)} bytes); choose a shorter --output")
    try:
        _check_target(output, inputs, force)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (Path.resolve on Python 3.11)
        reason = exc.strerror if isinstance(exc, OSError) else "a symbolic link loop"
        raise OutputError(f"cannot use {output} as an output ({reason}); choose another --output") from exc


def _check_target(output: Path, inputs: Iterable[Path], force: bool) -> None:
    for source in inputs:
        if _is_input(output, [source]):
            raise OutputError(f"output {output} is the input file {source}; choose another --output (inputs are never modified)")
    if output.is_dir():
        raise OutputError(f"output {output} is a directory; give a file name")
    if (output.exists() or output.is_symlink()) and not force:  # a dangling link is something of the user's too
        raise OutputError(f"{output} exists; pass --force to overwrite it or choose another --output")
    parent = output.parent
    if not parent.is_dir():
        raise OutputError(f"directory {parent} does not exist; create it or choose another --output")
    try:  # a real write probe: os.access says yes to root even on read-only file systems
        with _signals_held():
            fd, probe = tempfile.mkstemp(dir=parent, prefix=f"{TEMP_PREFIX}probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to directory {parent} ({exc.strerror}); choose another --output") from exc


class Artifacts:
    """Named output files of one command, written to temporary files and committed together.

    ``paths`` maps a role (``"checkpoint"``, ``"onnx"``, ``"int8"``, ``"ort"``) to the final path.
    Use as a context manager: temporary files not committed are removed on exit.
    """

    def __init__(self, paths: dict[str, Path], inputs: Iterable[Path | None], force: bool) -> None:
        self.paths = dict(paths)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.force = force
        self._temps: dict[str, Path] = {}
        self._scratch: list[Path] = []

    def check(self) -> "Artifacts":
        """Refuse any output that cannot or must not be written (before any work); returns self."""
        finals = list(self.paths.values())
        if len({p.resolve() for p in finals}) != len(finals):
            raise OutputError("two outputs would have the same name; choose another --output")
        for path in finals:
            check_output_path(path, self.inputs, self.force)
        return self

    def _mkstemp(self, directory: Path, suffix: str, record: Callable[[Path], None]) -> Path:
        """A new temporary file, recorded for removal before any signal can interrupt in between. Made in
        ``directory``'s real location, so that it is found again if a link on the way is re-pointed."""
        with _signals_held():
            fd, name = tempfile.mkstemp(dir=directory.resolve(), prefix=TEMP_PREFIX, suffix=f".tmp{suffix}")
            record(Path(name))
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        return Path(name)

    def temp(self, role: str) -> Path:
        """A fresh, uniquely named temporary file beside the output of ``role`` (same suffix)."""
        final = self.paths[role]
        return self.guard(lambda: self._mkstemp(final.parent, final.suffix, lambda p: self._temps.__setitem__(role, p)),
                          role)

    def scratch(self, suffix: str) -> Path:
        """A working file beside the first output, never committed, removed with the temporary files."""
        first = next(iter(self.paths.values()))
        return self.guard(lambda: self._mkstemp(first.parent, suffix, self._scratch.append))

    def guard(self, action: Callable[[], T], role: str | None = None) -> T:
        """Run a write; an OSError (disk full, file-size limit, read-only) becomes one :class:`OutputError`."""
        target = self.paths[role] if role else next(iter(self.paths.values())).parent
        try:
            return action()
        except OSError as exc:
            raise OutputError(f"cannot write {target} ({exc.strerror or exc}); free some space or choose another "
                              "--output") from exc

    def write(self, role: str, writer: Callable[[Path], None]) -> Path:
        """Run ``writer(temporary_path)`` for ``role``; returns the temporary path."""
        tmp = self.temp(role)
        self.guard(lambda: writer(tmp), role)
        return tmp

    def written(self, role: str) -> Path | None:
        """The temporary file holding ``role``'s content, if it was written."""
        return self._temps.get(role)

    def commit(self, final: bool = False) -> list[Path]:
        """Rename every written temporary file into place, all or none; returns the final paths.

        Ctrl-C / SIGTERM are held back during the renames. ``final``: these are the command's outputs,
        its outcome is decided: :data:`AFTER_FINAL_COMMIT` runs before the signals are let through."""
        done: list[Path] = []
        self._check_again()
        try:
            with _signals_held():
                for role, tmp in list(self._temps.items()):
                    os.replace(tmp, self.paths[role])
                    done.append(self.paths[role])
                    del self._temps[role]
                self.discard()
                for hook in AFTER_FINAL_COMMIT if final else ():
                    hook()
        except BaseException as exc:
            for path in done:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot move the outputs into place ({exc.strerror}); nothing was kept") from exc
            raise
        return done

    def _check_again(self) -> None:
        """The checks of :meth:`check` once more, right before the renames: what was true before the work
        (hours, maybe) may not be now (a file created at an output's name, a directory link re-pointed
        at the inputs' directory), and a rename would silently replace it."""
        try:
            for role in self._temps:
                check_output_path(self.paths[role], self.inputs, self.force)
        except OutputError as exc:
            self.discard()
            raise OutputError(f"{exc} (found when the outputs were about to be written: it changed during the run)") from exc

    def discard(self) -> None:
        """Remove every temporary and scratch file not committed."""
        for tmp in [*self._temps.values(), *self._scratch]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._temps.clear()
        self._scratch.clear()

    def __enter__(self) -> "Artifacts":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def compress_outputs(checkpoint: Path, output: Path | None, *, quantize: bool, ort_format: bool,
                     fp16: bool = False) -> dict[str, Path]:
    """``compress``'s files: ``<name>.fixclf.pt`` (default: in the current directory, named after the
    input) and beside it ``.onnx``, ``.int8.onnx`` (with int8), ``.fp16.onnx`` (with fp16) and
    ``.ort`` (with ORT format)."""
    primary = Path(output) if output is not None else Path(f"{checkpoint.stem}{COMPRESSED_SUFFIX}")
    paths = {"checkpoint": primary, "onnx": primary.with_suffix(".onnx")}
    if quantize:
        paths["int8"] = primary.with_suffix(".int8.onnx")
    if fp16:
        paths["fp16"] = primary.with_suffix(".fp16.onnx")
    if ort_format:
        paths["ort"] = primary.with_suffix(".ort")
    return paths


def resume_path(checkpoint: Path) -> Path:
    """Where ``--resume`` keeps the fine-tune state of a run writing ``checkpoint``: ``<name>.resume.pt`` beside it."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".pt") + ".resume.pt")


def check_resume_path(path: Path, inputs: Iterable[Path]) -> None:
    """Refuse, before any work, a resume state ``path`` that ``--resume`` could neither read nor replace:
    an input of the run, or something other than a regular file (a directory, a pipe, a device)."""
    if _is_input(path, inputs):
        raise OutputError(f"the resume state {path} would overwrite an input; choose another --output")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}, where --resume keeps its state, is not a regular file (a directory, pipe or device); "
                          "move it away or choose another --output")


def latest_compressed(directory: str | Path = ".") -> Path | None:
    """The most recently written compressed checkpoint (``*.fixclf.pt``) in ``directory``."""
    candidates = sorted((p for p in Path(directory).glob(f"*{COMPRESSED_SUFFIX}") if p.is_file()),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def scratch_directory(beside: Path):
    """A uniquely named temporary directory (``.fixclf-*``) in ``beside``'s directory, removed on exit."""
    return tempfile.TemporaryDirectory(dir=beside.parent, prefix=TEMP_PREFIX)


def export_outputs(output: Path, *, ort_format: bool) -> dict[str, Path]:
    """``export``'s files: the ONNX file (int8 when quantised) and, with ORT format, the ``.ort`` beside it."""
    paths = {"onnx": output}
    if ort_format:
        paths["ort"] = output.with_suffix(".ort")
    return paths


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """One file written atomically (a one-file :class:`Artifacts`): yields the temporary path."""
    with Artifacts({"file": path}, [], force=True) as artifacts:
        yield artifacts.temp("file")
        artifacts.commit()
