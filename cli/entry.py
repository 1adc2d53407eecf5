"""The ``fixclf`` console entry point. Signals are handled before anything heavy is imported, so a
Ctrl-C or SIGTERM at any moment (imports included) ends with one line and exit code 130."""
from __future__ import annotations

import signal
import sys

INTERRUPTED = 130
STATE = {"signalled": False}


def _on_signal(signum, frame) -> None:
    """SIGINT / SIGTERM: unwind like Ctrl-C, so that every cleanup (temporary files) runs. Only the
    first signal unwinds: a second one (a double Ctrl-C) must not cut the cleanup the first started."""
    if STATE["signalled"]:
        return
    STATE["signalled"] = True
    raise KeyboardInterrupt


def ignore_late_signals() -> None:
    """Once the outcome is decided (outputs committed, exit code known), a late Ctrl-C changes nothing.
    Only the handlers this entry point installed are replaced (an embedding process keeps its own)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, signal.SIG_IGN)


def main() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
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
