"""The ``fixclf`` console entry point. Signals are handled before anything heavy is imported, so a
Ctrl-C or SIGTERM at any moment (imports included) ends with one line and exit code 130.

A signal that arrives while a module is being imported is held until the import has finished
(for a few seconds at most, or until a second signal): raised inside an import, the
KeyboardInterrupt can surface in C++ code that torch's module initialisation runs
(``torch.distributed``'s ``_c10d_init``), which cannot pass it on and aborts the process (SIGABRT
and a C++ trace instead of one line).

One of several ``torchrun`` processes ends with ``os._exit`` once its outcome is printed: the
interpreter's own teardown would race torch.distributed's C++ threads (an abort, "terminate called
without an active exception", was seen once in about ten test-suite runs), and nothing is left to
clean by then (outputs are committed or removed and the process group destroyed before)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

INTERRUPTED = 130
RETRY_S = 0.02
HOLD_MAX_S = 5.0
ORPHAN_POLL_S = 0.5
INSIST_AFTER_S = 0.5  # a repeat sooner is the same Ctrl-C arriving twice (--nproc's parent forwards it to its children)
STATE: dict = {"signalled": False, "held_since": None}


def _inside_an_import(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _deliver(frame, *, insisted: bool) -> None:
    """Unwind like Ctrl-C (KeyboardInterrupt), so that every cleanup (temporary files) runs; only once:
    a second signal (a double Ctrl-C) must not cut the cleanup the first started. Inside an import the
    signal is held (:func:`_on_retry` tries again every ``RETRY_S``), but for ``HOLD_MAX_S`` at most and
    not when the user insisted (signalled again, ``INSIST_AFTER_S`` or more after the held one): an
    import that never ends (a user's module waiting on something) must not make the process impossible
    to stop."""
    if STATE["signalled"]:
        return
    held_since = STATE["held_since"]
    if _inside_an_import(frame) and not insisted and (held_since is None or time.monotonic() - held_since < HOLD_MAX_S):
        if held_since is None:
            STATE["held_since"] = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    STATE["signalled"] = True
    raise KeyboardInterrupt


def _on_signal(signum, frame) -> None:
    """SIGINT / SIGTERM / SIGHUP (the terminal or SSH session closed)."""
    held_since = STATE["held_since"]
    _deliver(frame, insisted=held_since is not None and time.monotonic() - held_since >= INSIST_AFTER_S)


def _on_retry(signum, frame) -> None:
    """SIGALRM from the timer :func:`_deliver` set: the held signal, delivered again."""
    if STATE["held_since"] is not None:
        _deliver(frame, insisted=False)


def ignore_late_signals() -> None:
    """Once the outcome is decided (outputs committed, exit code known), a late Ctrl-C changes nothing.
    Only the handlers this entry point installed are replaced (an embedding process keeps its own)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        if signal.getsignal(sig) in (_on_signal, _on_retry):
            signal.signal(sig, signal.SIG_IGN)
    if STATE["held_since"] is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _launcher() -> int | None:
    """The process id of the ``fixclf compress --nproc`` that started this process (its
    ``compressor.distributed.LAUNCHED`` variable; not imported here, it would import torch), else None."""
    launcher = os.environ.get("FIXCLF_LAUNCHED", "")
    return int(launcher) if launcher.isdigit() else None


def launched_by_fixclf() -> bool:
    """One of the processes ``--nproc`` started: on Ctrl-C the launcher says so, once, for all of them."""
    return _launcher() is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def stop_when_orphaned() -> None:
    """In a process ``--nproc`` started: once its launcher is gone (killed with SIGKILL, which it cannot
    pass on: this process's parent changes, or the launcher no longer exists), stop as on SIGTERM, so
    that nothing is written for a job nobody waits for. A daemon thread looks every ``ORPHAN_POLL_S``;
    SIGTERM then unwinds the main thread as Ctrl-C does (or is ignored once the outputs are committed)."""
    launcher = _launcher()
    if launcher is None:
        return
    parent = os.getppid()  # the launcher, or a wrapper between them (an interpreter shim that forks)

    def watch() -> None:
        while os.getppid() == parent and _alive(launcher):
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fixclf-launcher-watch", daemon=True).start()


def one_of_several_processes() -> bool:
    """``WORLD_SIZE`` read as :func:`compressor.distributed.world_from_environment` reads it (not imported
    here: it would import torch on the way out of a run that never needed it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        return False


def main() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup it stays ignored
        signal.signal(signal.SIGHUP, _on_signal)
    signal.signal(signal.SIGALRM, _on_retry)
    stop_when_orphaned()
    for fd, name in ((1, "stdout"), (2, "stderr")):  # started with it closed (`fixclf ... >&-`): print nowhere
        if getattr(sys, name) is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:  # the descriptor itself, so no file opened later takes its number
                os.dup2(devnull, fd)
                os.close(devnull)
            setattr(sys, name, open(fd, "w", closefd=False))
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
        if not launched_by_fixclf():
            sys.stderr.write("error: interrupted; nothing was written\n")
        code = INTERRUPTED
    ignore_late_signals()
    sys.stdout.flush()
    if one_of_several_processes():
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
