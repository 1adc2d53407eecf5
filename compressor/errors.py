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
(:class:`compressor.distributed.RemoteError` carries it); only rank 0 prints the line.
"""
from __future__ import annotations


class FixclfError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 1


class UsageError(FixclfError):
    exit_code = 2


class CheckpointError(FixclfError):
    exit_code = 3


class DataError(FixclfError):
    exit_code = 4


class PlanError(FixclfError):
    exit_code = 5


class TrainingError(FixclfError):
    exit_code = 6


class ExportError(FixclfError):
    exit_code = 7


class OutputError(FixclfError):
    exit_code = 8


class Interrupted(FixclfError):
    exit_code = 130
