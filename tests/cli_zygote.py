"""Runs many fixclf CLI invocations fast: a process that imports fixclf once, then forks one child per case.

Each child is a real, separate process running the real entry point (``cli.entry.main``) with its
own working directory, argv, stdout and stderr files and exit code; only the start-up work (about
3 s: the imports of torch, onnx and the exporter, and the exporter's operator registry) was done
once, before the fork. Apart from the one thread onnxruntime's import starts (the children's own
ONNX Runtime sessions work without it: every compress case validates its export in one), nothing
here starts a thread before forking (``_warm_up`` checks it), so the children start clean. One
zygote serves every test of a test process (:func:`run_many`).

Protocol (one JSON object per line): requests on stdin ``{"id", "args", "cwd", "out", "err",
"fsize", "env", "pidfile"}`` (the last three optional; ``env`` is added to the child's environment),
then ``{"drain": true}``; replies on stdout ``{"id", "code", "peak_rss_mb"}`` as the children finish,
at most ``argv[1]`` at a time; after a drain, every child started before it has replied. A child's
peak resident memory counts the zygote's pages it started with, the same for every child: compare
children with each other, not with a fresh process.
"""
from __future__ import annotations

import atexit
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # the imports the children inherit (only in the zygote itself)
    import contextlib
    import importlib

    import cli.entry  # noqa: F401
    import cli.main  # noqa: F401
    import cli.render  # noqa: F401
    import compressor.api  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript.optimizer  # noqa: F401  (compressor.export imports it on the first export)

    for lazy in ("typer._adapters", "rich._emoji_codes"):  # what typer and rich import on first use (~0.1 s a case)
        with contextlib.suppress(ImportError):
            importlib.import_module(lazy)


def _warm_up() -> None:
    """Export one nn.Linear: the exporter's lazy imports and its operator registry (built once per
    process, compressor.export) are then inherited by every child. At one thread, so no thread pool
    exists to be lost in the fork; the check below fails loudly if that ever changes."""
    import torch

    from compressor.export import to_onnx

    before = len(os.listdir("/proc/self/task"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    to_onnx(torch.nn.Linear(4, 2), torch.zeros(2, 4))
    torch.set_num_threads(threads)
    assert len(os.listdir("/proc/self/task")) == before, "the warm-up started a thread: the children would not start clean"


def _steady_malloc(threshold: str | None) -> None:
    """glibc reads MALLOC_MMAP_THRESHOLD_ when a process starts, which a forked child does not: set it as that would."""
    if threshold is not None:
        import ctypes

        M_MMAP_THRESHOLD = -3
        assert ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1


def _child(request: dict) -> None:
    if request.get("pidfile"):
        Path(request["pidfile"]).write_text(str(os.getpid()))
    os.environ.update(request.get("env", {}))
    _steady_malloc(request.get("env", {}).get("MALLOC_MMAP_THRESHOLD_"))
    os.chdir(request["cwd"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, name in ((1, request["out"]), (2, request["err"])):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if request.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    sys.argv = ["fixclf", *request["args"]]
    import cli.entry

    try:
        cli.entry.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    parallel = int(sys.argv[1])
    _warm_up()
    print(json.dumps({"ready": True}), flush=True)
    running: dict[int, str] = {}

    def reap() -> None:
        pid, status, usage = os.wait4(-1, 0)
        print(json.dumps({"id": running.pop(pid), "code": os.waitstatus_to_exitcode(status),
                          "peak_rss_mb": usage.ru_maxrss / 1024}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("drain"):
            while running:
                reap()
            continue
        while len(running) >= parallel:
            reap()
        pid = os.fork()
        if pid == 0:
            _child(request)
        running[pid] = request["id"]
    while running:
        reap()


_ZYGOTE: dict[str, subprocess.Popen] = {}


def _zygote(parallel: int) -> subprocess.Popen:
    """This test process's zygote, started on first use and closed when the process exits."""
    if "proc" not in _ZYGOTE:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        proc = subprocess.Popen([sys.executable, __file__, str(parallel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
        assert json.loads(proc.stdout.readline()) == {"ready": True}
        atexit.register(proc.communicate, timeout=900)  # end of input: it reaps what runs and exits
        _ZYGOTE["proc"] = proc
    return _ZYGOTE["proc"]


def start_many(requests: dict[str, dict], parallel: int = 3) -> None:
    """Start each request (``args``, ``cwd``, ``out``, ``err``, optional ``fsize``, ``env`` and ``pidfile``,
    where the child writes its process id first) in its own forked process, at most ``parallel`` at a
    time (the first call's figure); :func:`exit_codes` waits for them."""
    proc = _zygote(parallel)
    proc.stdin.write("".join(json.dumps({"id": key, **request}) + "\n" for key, request in requests.items()))
    proc.stdin.write(json.dumps({"drain": True}) + "\n")
    proc.stdin.flush()


def replies(ids) -> dict[str, dict]:
    """The reply (``code``, ``peak_rss_mb``) of each started request in ``ids`` (all of the last :func:`start_many`'s)."""
    proc, got = _ZYGOTE["proc"], {}
    while len(got) < len(ids):
        line = proc.stdout.readline()
        assert line, f"the zygote ended (exit {proc.poll()}) with {sorted(set(ids) - set(got))} unanswered"
        reply = json.loads(line)
        got[reply.pop("id")] = reply
    assert set(got) == set(ids), got
    return got


def exit_codes(ids) -> dict[str, int]:
    """The exit code of each started request in ``ids`` (all of the last :func:`start_many`'s)."""
    return {key: reply["code"] for key, reply in replies(ids).items()}


def run_many(requests: dict[str, dict], parallel: int = 3) -> dict[str, int]:
    """:func:`start_many`, then each request's exit code."""
    start_many(requests, parallel)
    return exit_codes(requests)


if __name__ == "__main__":
    main()
