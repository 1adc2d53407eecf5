"""Runs many fixclf CLI invocations fast: a process that imports fixclf once, then forks one child per case.

Each child is a real, separate process running the real entry point (``cli.entry.main``) with its
own working directory, argv, stdout and stderr files and exit code; only the imports (about 2 s of
torch and onnx per process) were done once, before the fork. Nothing in this process starts a
thread before forking, so the children start clean.

Protocol (one JSON object per line): requests on stdin ``{"id", "args", "cwd", "out", "err",
"fsize"}``; replies on stdout ``{"id", "code"}`` as the children finish, at most ``argv[1]`` at a time.
"""
from __future__ import annotations

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


def _child(request: dict) -> None:
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
    running: dict[int, str] = {}

    def reap() -> None:
        pid, status = os.wait()
        print(json.dumps({"id": running.pop(pid), "code": os.waitstatus_to_exitcode(status)}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        while len(running) >= parallel:
            reap()
        pid = os.fork()
        if pid == 0:
            _child(request)
        running[pid] = request["id"]
    while running:
        reap()


def run_many(requests: dict[str, dict], parallel: int = 3) -> dict[str, int]:
    """Run each request (``args``, ``cwd``, ``out``, ``err``, optional ``fsize``) in its own forked process;
    returns each one's exit code."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, __file__, str(parallel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    payload = "".join(json.dumps({"id": key, **request}) + "\n" for key, request in requests.items())
    replies, _ = proc.communicate(payload, timeout=900)
    codes = {reply["id"]: reply["code"] for reply in map(json.loads, replies.splitlines())}
    assert proc.returncode == 0 and set(codes) == set(requests), replies
    return codes


if __name__ == "__main__":
    main()
