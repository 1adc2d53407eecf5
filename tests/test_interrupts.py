"""Work that cannot finish: a full disk, an unwritable directory, Ctrl-C or SIGTERM at any moment (the
imports, the fine-tune, the export, a second signal in the clean-up) keep nothing and end with one
line; user files that look like temporary names are left alone; a report is read without code.
Signals go to the CLI started as users start it (a new process from scratch); the other cases run it
in real processes forked from one that imported fixclf (tests/cli_zygote.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli_zygote import exit_codes, start_many
from conftest import FIXCLF
from hostile_inputs import C, ENV, assert_clean_failure, run_cases, tree


def test_file_size_limit_and_read_only_directory_fail_cleanly(template, tmp_path):
    """Disk full (simulated with a file-size limit) and an unwritable directory: exit 8, one line, nothing left."""
    readonly = "/sys/out.pt"  # root writes through permission bits; /sys never
    if os.geteuid() != 0:
        (template / "ro").mkdir(exist_ok=True)
        (template / "ro").chmod(0o555)
        readonly = "ro/out.pt"
    full = run_cases(template, tmp_path / "full", {"fsize": [C, "mlp.pt", "--epochs", "1", "-o", "o.pt"]}, fsize=20_000)
    denied = run_cases(template, tmp_path / "denied", {"read-only": [C, "mlp.pt", "-o", readonly]})
    assert_clean_failure(full["fsize"], 8)
    assert_clean_failure(denied["read-only"], 8)


def _signal(pid: int, sig: int, again: float | None) -> None:
    os.kill(pid, sig)
    if again is not None:
        time.sleep(again)
        os.kill(pid, sig)


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (Linux's caught-signals mask): fixclf's entry
    point installs its handlers first of all; before that, the interpreter is still starting."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def _interrupt(args: list[str], workdir: Path, sig: int, when: str | float, again: float | None = None
               ) -> tuple[int, str, dict, dict]:
    """Start the CLI, send ``sig`` soon after stderr shows ``when`` (0.5 s into a fine-tune; 0.05 s into a
    shorter stage, which on a fast machine can end within 0.5 s) or ``when`` seconds after the entry
    point took over from the starting interpreter (inside the imports), and with ``again`` a second
    time that many seconds later (a double Ctrl-C, landing in the clean-up)."""
    before = tree(workdir)
    if not isinstance(when, str):
        proc = subprocess.Popen([*FIXCLF, *args], cwd=workdir, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while not _handles_sigterm(proc.pid):  # a signal before that is the interpreter's (its traceback)
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.005)
        time.sleep(when)
        _signal(proc.pid, sig, again)
        stderr = proc.communicate(timeout=120)[1]
        return proc.returncode, stderr, before, tree(workdir)
    logs = workdir.parent / "logs"
    logs.mkdir()
    err, pidfile = logs / "err", logs / "pid"
    start_many({"run": {"args": args, "cwd": str(workdir), "out": str(logs / "out"), "err": str(err),
                        "pidfile": str(pidfile), "env": {"FIXCLF_PROGRESS": "1"}}})
    deadline = time.monotonic() + 120
    while when not in (err.read_text() if err.exists() else ""):
        assert time.monotonic() < deadline, f"{when!r} never shown: {err.read_text() if err.exists() else ''}"
        time.sleep(0.02)
    time.sleep(0.5 if when == "Fine-tuning" else 0.05)
    _signal(int(pidfile.read_text()), sig, again)
    return exit_codes(["run"])["run"], err.read_text(), before, tree(workdir)


@pytest.mark.parametrize("sig, when, again", [
    (signal.SIGINT, "Fine-tuning", None),  # Ctrl-C mid fine-tune
    (signal.SIGTERM, "Exporting the compressed", None),  # SIGTERM during export and validation
    (signal.SIGHUP, "Exporting the compressed", None),  # the terminal closed during export: as SIGTERM
    (signal.SIGINT, 0.4, None),  # during the imports
    (signal.SIGINT, "Exporting the compressed", 0.001),  # a double Ctrl-C: the second lands in the clean-up
])
def test_interrupted_at_any_moment_keeps_nothing(template, tmp_path, sig, when, again):
    work = tmp_path / "w"
    shutil.copytree(template, work, symlinks=True)
    epochs = "60" if when == "Fine-tuning" else "3"  # long enough to be interrupted there; short to reach the export
    code, stderr, before, after = _interrupt([C, "mlp.pt", "--epochs", epochs, "--latency-batch", "8"], work, sig, when,
                                             again)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 130, stderr
    assert len(errors) == 1 and "nothing was written" in errors[0], stderr
    assert "Traceback" not in stderr
    assert after == before


def test_checkpoint_data_never_imported_even_when_it_looks_like_code(template, tmp_path, compressed_sample):
    """A compressed checkpoint whose architecture is not built in: its report reads without any code."""
    def add_checkpoint(work: Path) -> None:
        obj = torch.load(work / "c_gadget.fixclf.pt", weights_only=True)
        obj["report"] = compressed_sample["report"]
        torch.save(obj, work / "hostile_but_valid_report.fixclf.pt")
    result = run_cases(template, tmp_path / "w", {"report": ["report", "hostile_but_valid_report.fixclf.pt", "--json"]},
                       prepare=add_checkpoint)["report"]
    assert result["code"] == 0, result["stderr"]
    assert json.loads(result["stdout"])["accuracy"] == compressed_sample["report"]["accuracy"]
    assert not result["canary"] and result["after"] == result["before"]


def test_no_fixed_temporary_names(template, tmp_path):
    """User files that look like fixclf's old temporary names are neither overwritten nor deleted."""
    def add_user_files(work: Path) -> None:
        for name in (".o.original.onnx", ".o.onnx.tmp", ".fixclf-probe-x"):
            (work / name).write_text("user data")
    result = run_cases(template, tmp_path / "w", {"epoch": [C, "mlp.pt", "-o", "o.pt", "--epochs", "1", "--json"]},
                       prepare=add_user_files)["epoch"]
    assert result["code"] == 0, result["stderr"]
    before, after = result["before"], result["after"]
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["o.onnx", "o.pt"]


def test_a_signal_during_an_import_is_held_until_the_import_is_done(template, tmp_path):
    """Raised inside an import, the KeyboardInterrupt can reach C++ module initialisation that cannot
    pass it on (torch.distributed's: the process aborted with SIGABRT and a C++ trace). The CLI holds
    a signal that arrives during an import until the import is done, then stops with its one line."""
    def add_module(work: Path) -> None:
        torch.save(torch.nn.Linear(4, 2).state_dict(), work / "weights.pt")  # names no architecture
        (work / "signals_itself.py").write_text(
            "import os, signal, time\n"
            "os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of this module's import\n"
            "time.sleep(0.2)\n"
            "open('imported', 'w').write('to the end')\n"
            "def net():\n    time.sleep(5)\n    raise AssertionError('the interrupt should have come first')\n")
    result = run_cases(template, tmp_path / "w", {"import": ["plan", "weights.pt", "--arch", "signals_itself:net"]},
                       prepare=add_module)["import"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 130 and lines == ["error: interrupted; nothing was written"], result["stderr"]
    assert "imported" in result["after"]  # the import ran to its end before the interrupt was raised


def test_a_second_signal_during_an_import_stops_at_once(template, tmp_path):
    """An import that never ends must not make fixclf impossible to stop: Ctrl-C again, and the held
    signal is delivered there and then (and after a few seconds without a second one). A repeat within
    0.5 s is the same Ctrl-C forwarded (--nproc's parent passes it on to its children): still held."""
    def add_module(work: Path) -> None:
        torch.save(torch.nn.Linear(4, 2).state_dict(), work / "weights.pt")
        (work / "hangs.py").write_text("import os, signal, time\n"
                                       "os.kill(os.getpid(), signal.SIGINT)\n"
                                       "time.sleep(0.1)\n"
                                       "os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded: held on\n"
                                       "time.sleep(1)\n"
                                       "open('held', 'w').write('on')\n"
                                       "os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again\n"
                                       "time.sleep(600)\n")
    started = time.monotonic()
    result = run_cases(template, tmp_path / "w", {"hang": ["plan", "weights.pt", "--arch", "hangs:net"]},
                       prepare=add_module)["hang"]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 130 and lines == ["error: interrupted; nothing was written"], result["stderr"]
    assert time.monotonic() - started < 60
    assert "held" in result["after"]  # the repeat 0.1 s after the first (a forwarded copy) did not cut the import


def test_outputs_are_checked_again_right_before_they_are_renamed_into_place(tmp_path):
    """What was checked before the work may change during it: a file created at an output's name (no
    --force) or a directory link re-pointed at the inputs' directory is refused at commit, nothing is
    replaced and no temporary file is left."""
    from compressor.errors import OutputError
    from compressor.outputs import Artifacts

    inputs, empty = tmp_path / "inputs", tmp_path / "empty"
    inputs.mkdir(), empty.mkdir()
    (inputs / "model.pt").write_bytes(b"the user's model")
    (tmp_path / "link").symlink_to(empty)
    cases = {"appeared": ({"checkpoint": tmp_path / "new.pt"}, lambda: (tmp_path / "new.pt").write_bytes(b"theirs")),
             "re-pointed": ({"checkpoint": tmp_path / "link" / "model.pt"},
                            lambda: ((tmp_path / "link").unlink(), (tmp_path / "link").symlink_to(inputs)))}
    for name, (paths, change) in cases.items():
        with Artifacts(paths, [inputs / "model.pt"], force=False) as artifacts:
            artifacts.check()
            artifacts.write("checkpoint", lambda path: path.write_bytes(b"compressed"))
            change()
            with pytest.raises(OutputError, match="changed during the run"):
                artifacts.commit(final=True)
        assert (inputs / "model.pt").read_bytes() == b"the user's model", name
        assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".fixclf-")], name
    assert (tmp_path / "new.pt").read_bytes() == b"theirs"


def test_a_signal_after_the_outputs_are_in_place_changes_nothing():
    """Once a command's outputs are committed (compressor.outputs.AFTER_FINAL_COMMIT, which the CLI's entry
    point fills) its SIGINT / SIGTERM handlers are replaced by SIG_IGN: a late signal neither removes the
    outputs nor turns the run's exit 0 into 130 (the README's exit-code table)."""
    from cli import entry

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, entry._on_signal)
        entry.ignore_late_signals()
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in previous)
        os.kill(os.getpid(), signal.SIGTERM)  # with the handler still in place this would raise KeyboardInterrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
