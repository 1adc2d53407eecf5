"""The ``fixclf`` console entry point. Signals are handled before anything heavy is imported, so a
Ctrl-C or SIGTERM at any moment (imports included) ends with one line and exit code 130.

A signal that arrives while a module is being imported is held until the import has finished
(checked again every ``RETRY_S`` seconds): raised inside an import, the KeyboardInterrupt can
surface in C++ code that torch's module initialisation runs (``torch.distributed``'s
``_c10d_init``), which cannot pass it on and aborts the process (SIGABRT and a C++ trace instead
of one line)."""
from __future__ import annotations

import signal
import sys

INTERRUPTED = 130
RETRY_S = 0.02
STATE = {"signalled": False, "held": False}


def _inside_an_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame) -> None:
    """SIGINT / SIGTERM: unwind like Ctrl-C, so that every cleanup (temporary files) runs. Only the
    first signal unwinds: a second one (a double Ctrl-C) must not cut the cleanup the first started.
    Inside an import the signal is held and this runs again on SIGALRM once ``RETRY_S`` has passed."""
    if STATE["signalled"]:
        return
    if _inside_an_import(frame):
        STATE["held"] = True
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    STATE["signalled"] = True
    raise KeyboardInterrupt


def _on_retry(signum, frame) -> None:
    """SIGALRM from the timer :func:`_on_signal` set: the held signal, delivered again."""
    if STATE["held"]:
        _on_signal(signum, frame)


def ignore_late_signals() -> None:
    """Once the outcome is decided (outputs committed, exit code known), a late Ctrl-C changes nothing.
    Only the handlers this entry point installed are replaced (an embedding process keeps its own)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        if signal.getsignal(sig) in (_on_signal, _on_retry):
            signal.signal(sig, signal.SIG_IGN)


def main() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_retry)
    for stream in (sys.stdout, sys.stderr):  # a terminal or pipe that cannot show a character gets '?', not an error
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if hasattr(signal, "SIGXFSZ"):  # over a file-size limit, writes fail (exit 8) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        from cli.main import run
        from compressor.outputs import AFTER_FINAL_COMMIT

        AFTER_FINAL_COMMIT.append(ignore_late_signals)

        code = run(sys.argv[1:])
    except KeyboardInterrupt:
        ignore_late_signals()
        sys.stderr.write("error: interrupted; nothing was written\n")
        code = INTERRUPTED
    ignore_late_signals()
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
