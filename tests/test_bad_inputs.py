"""A corpus of bad inputs through the real CLI. For each: exit code != 0, exactly one error line on
stderr and no traceback, the input files byte-identical afterwards, and no partial output."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from compressor.zoo import mlp
from conftest import ROOT, SAMPLES, sha256

runner = CliRunner()


class WritesAFile:
    """A malicious pickle: loading it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _setup(workdir: Path) -> None:
    """Every input a case may use, created before hashing."""
    shutil.copy(SAMPLES / "mlp.pt", workdir / "mlp.pt")
    shutil.copy(SAMPLES / "digits.npz", workdir / "digits.npz")
    (workdir / "empty.pt").write_bytes(b"")
    full = (SAMPLES / "mlp.pt").read_bytes()
    (workdir / "truncated.pt").write_bytes(full[: len(full) // 2])
    (workdir / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (workdir / "folder").mkdir()
    with open(workdir / "evil.pt", "wb") as f:
        pickle.dump(WritesAFile(str(workdir / "PWNED")), f)
    torch.save(mlp(64, [512, 512], 10).state_dict(), workdir / "weights.pt")
    torch.save(torch.nn.Conv2d(1, 4, 3).state_dict(), workdir / "conv.pt")
    torch.save(mlp(64, [512, 512], 10), workdir / "pickled.pt")
    digits = np.load(SAMPLES / "digits.npz")
    x, y = digits["x"], digits["y"]
    np.savez(workdir / "narrow.npz", x=x[:, :32], y=y)
    np.savez(workdir / "badlabels.npz", x=x, y=y + 5)
    nan = x.copy()
    nan[3, 7] = np.nan
    np.savez(workdir / "nan.npz", x=nan, y=y)
    torch.save({"format": "fixclf.compressed/1", "arch": "compressor.zoo:mlp", "state_dict": {}}, workdir / "broken.fixclf.pt")
    linear = torch.nn.Linear(64, 10)
    torch.save({"format": "fixclf.model/1", "arch": "torch.nn:Linear", "kwargs": {"in_features": 64, "out_features": 10},
                "state_dict": linear.state_dict()}, workdir / "foreign_arch.pt")
    shutil.copy(SAMPLES / "mlp.pt", workdir / "exists.fixclf.pt")


def _readonly_dir(workdir: Path) -> str:
    if os.geteuid() == 0:  # root writes through permission bits; /sys is read-only even for root
        return "/sys/out.pt"
    target = workdir / "readonly"
    target.mkdir()
    target.chmod(0o555)
    return str(target / "out.pt")


CASES = {
    "missing file": ["compress", "nope.pt"],
    "directory": ["compress", "folder"],
    "empty file": ["compress", "empty.pt"],
    "truncated checkpoint": ["compress", "truncated.pt"],
    "random bytes": ["compress", "random.pt"],
    "malicious pickle": ["compress", "evil.pt"],
    "state_dict without --arch": ["compress", "weights.pt", "--data", "digits.npz"],
    "--arch that does not match": ["compress", "weights.pt", "--arch", "compressor.zoo:small_cnn", "--data", "digits.npz"],
    "--arch that does not import": ["compress", "weights.pt", "--arch", "no_such_pkg.models:net"],
    "model without Linear layers": ["plan", "conv.pt", "--arch", "torch.nn:Conv2d",
                                    "--arch-kwargs", '{"in_channels": 1, "out_channels": 4, "kernel_size": 3}'],
    "user checkpoint without --data": ["compress", "weights.pt", "--arch", "compressor.zoo:mlp",
                                       "--arch-kwargs", '{"hidden": [512, 512]}'],
    "wrong data feature size": ["compress", "mlp.pt", "--data", "narrow.npz"],
    "labels out of range": ["compress", "mlp.pt", "--data", "badlabels.npz"],
    "NaN in data": ["compress", "mlp.pt", "--data", "nan.npz"],
    "missing data file": ["compress", "mlp.pt", "--data", "nowhere.npz"],
    "NaN during fine-tune": ["compress", "mlp.pt", "--lr", "1e30", "--epochs", "2"],
    "output equals input": ["compress", "mlp.pt", "-o", "mlp.pt"],
    "existing output without --force": ["compress", "mlp.pt", "-o", "exists.fixclf.pt"],
    "unknown head": ["compress", "mlp.pt", "--head", "triangular"],
    "unknown hidden": ["plan", "mlp.pt", "--hidden", "lowrank"],
    "unknown init": ["compress", "mlp.pt", "--init", "random"],
    "depth 0": ["plan", "mlp.pt", "--depth", "0"],
    "empty include match": ["compress", "mlp.pt", "--include", "features.*"],
    "bad --arch-kwargs JSON": ["plan", "weights.pt", "--arch", "compressor.zoo:mlp", "--arch-kwargs", "{hidden:"],
    "corrupt compressed checkpoint": ["report", "broken.fixclf.pt"],
    "whole pickled model without --trust-pickle": ["compress", "pickled.pt", "--data", "digits.npz"],
    "whole pickled model without --arch": ["compress", "pickled.pt", "--trust-pickle", "--data", "digits.npz"],
    "report of a dense checkpoint": ["report", "mlp.pt"],
    "truncated compressed checkpoint": ["report", "truncated.pt"],
    "export to a non-onnx name": ["export", "mlp.pt", "-o", "model.txt"],
    "architecture outside compressor.* not confirmed": ["plan", "foreign_arch.pt"],
}

# The documented exit code of each kind of error (compressor/errors.py, README "Errors").
EXIT_CODES = {
    "missing file": 3, "malicious pickle": 3, "state_dict without --arch": 3, "--arch that does not match": 3,
    "model without Linear layers": 5, "user checkpoint without --data": 4, "wrong data feature size": 4,
    "labels out of range": 4, "NaN in data": 4, "NaN during fine-tune": 6, "output equals input": 8,
    "existing output without --force": 8, "unknown head": 5, "empty include match": 5,
    "bad --arch-kwargs JSON": 2, "export to a non-onnx name": 2, "architecture outside compressor.* not confirmed": 3,
}


def _snapshot(workdir: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in workdir.iterdir() if p.is_file()}


def _assert_clean_failure(exit_code: int, stderr: str, before: dict, workdir: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    assert _snapshot(workdir) == before  # inputs byte-identical, nothing new written


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, workdir):
    _setup(workdir)
    before = _snapshot(workdir)
    result = runner.invoke(app, [*CASES[case], "--json"] if CASES[case][0] == "compress" else CASES[case])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _assert_clean_failure(result.exit_code, result.stderr, before, workdir)
    assert not (workdir / "PWNED").exists()
    if case in EXIT_CODES:
        assert result.exit_code == EXIT_CODES[case], result.stderr


def test_read_only_output_directory(workdir):
    _setup(workdir)
    before = _snapshot(workdir)
    result = runner.invoke(app, ["compress", "mlp.pt", "-o", _readonly_dir(workdir), "--json"])
    _assert_clean_failure(result.exit_code, result.stderr, before, workdir)


def test_foreign_architecture_runs_once_confirmed(workdir):
    _setup(workdir)
    refused = runner.invoke(app, ["plan", "foreign_arch.pt"])
    assert "--arch torch.nn:Linear" in refused.stderr
    confirmed = runner.invoke(app, ["plan", "foreign_arch.pt", "--arch", "torch.nn:Linear"])
    assert confirmed.exit_code == 0, confirmed.output


def test_malicious_pickle_names_the_global_and_the_flag(workdir):
    _setup(workdir)
    result = runner.invoke(app, ["plan", "evil.pt"])
    assert "system" in result.stderr and "--trust-pickle" in result.stderr
    assert not (workdir / "PWNED").exists()


def test_interrupted_fine_tune_keeps_nothing(workdir):
    """Ctrl-C (SIGINT) in the middle of fine-tuning, in a real process."""
    _setup(workdir)
    before = _snapshot(workdir)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "compress", "mlp.pt", "--epochs", "10000"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    for line in proc.stderr:  # wait until fine-tuning has started
        lines.append(line)
        if "Fine-tuning" in line:
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    errors = [l for l in (lines + rest.splitlines()) if l.startswith("error:")]
    assert proc.returncode == 130
    assert errors == ["error: interrupted during fine-tuning; nothing was written"], rest
    assert "Traceback" not in rest
    assert _snapshot(workdir) == before
