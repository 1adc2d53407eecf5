"""The one error hierarchy of fixclf. Every message says what is wrong and what to do.

The CLI prints ``error: <message>`` on one line and exits with the class's ``exit_code``:

=====  ==========================  ==============================================
code   class                        meaning
=====  ==========================  ==============================================
2      UsageError                   bad option / argument combination
3      CheckpointError              checkpoint missing, unreadable or unsafe
4      DataError                    data missing, of the wrong shape or not finite
5      PlanError                    nothing to replace, patterns that match nothing
6      TrainingError                fine-tuning diverged (best state is restored)
7      ExportError                  ONNX export or its validation failed
8      OutputError                  output path refused (exists, same as input, ...)
130    Interrupted                  Ctrl-C; nothing half-written was kept
1      distributed.DistributedError another process of a torchrun job was lost
=====  ==========================  ==============================================

Under torchrun every process exits with the code of the first failing process's error
(:class:`compressor.distributed.RemoteError` carries it); only rank 0 prints the line, except for an
error the other processes never heard of (a wrong environment, a lost peer: its ``heard_only_here``
is set), which the process that met it prints itself.
"""
from __future__ import annotations


class FixclfError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 1


def _error_class(name: str, exit_code: int, meaning: str) -> type[FixclfError]:
    """The subclass of :class:`FixclfError` for one row of the table above (a plain class: it
    pickles, and ``except`` / ``isinstance`` see it as usual)."""
    return type(name, (FixclfError,), {"__doc__": f"{meaning} (exit code {exit_code}).", "exit_code": exit_code,
                                       "__module__": __name__, "__qualname__": name})


UsageError = _error_class("UsageError", 2, "Bad option or argument combination")
CheckpointError = _error_class("CheckpointError", 3, "Checkpoint missing, unreadable or unsafe")
DataError = _error_class("DataError", 4, "Data missing, of the wrong shape or not finite")
PlanError = _error_class("PlanError", 5, "Nothing to replace, or patterns that match nothing")
TrainingError = _error_class("TrainingError", 6, "Fine-tuning diverged (the last finite state is restored)")
ExportError = _error_class("ExportError", 7, "ONNX export or its validation failed")
OutputError = _error_class("OutputError", 8, "Output path refused (exists, same as an input, ...)")
Interrupted = _error_class("Interrupted", 130, "Ctrl-C, SIGTERM or SIGHUP; nothing half-written was kept")


def exited_in_user_code(exc: SystemExit) -> FixclfError:
    """``sys.exit`` called by the model's code (its forward, a hook) while fixclf ran it, as one
    :data:`CheckpointError`: quietly taking its exit code would end fixclf, even with 0, having written
    nothing. (The code fixclf calls by name, an ``--arch`` factory and a ``--data`` function or
    Dataset, is wrapped where it is called.) The SystemExit stays its cause, for ``--debug``."""
    error = CheckpointError(f"the model's (or the data's) own code called sys.exit({exc.code!r}) while fixclf ran it, so "
                            "nothing was written; a model's forward must return its outputs (rerun with --debug to see where)")
    error.__cause__ = exc
    return error
