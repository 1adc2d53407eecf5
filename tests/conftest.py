"""Shared fixtures: small models and a temporary working directory."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"

torch.set_num_threads(min(2, os.cpu_count() or 1))

FIXCLF = [sys.executable, "-c", "from cli.entry import main; main()"]
"""The real entry point in a new process, as the ``fixclf`` console script runs it. Not ``python -m``:
under runpy, CPython turns a KeyboardInterrupt that an extension saw inside ``PyRun_String`` (even one
fixclf then caught) into an exit by SIGINT instead of the 130 the program chose."""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(params=["fft", "matmul"])
def transform_path(request):
    """Run the test once on each of ACDC's two DCT paths: eager ``torch.fft`` and the MatMul chain that exports."""
    from compressor.transforms import matmul_chains

    if request.param == "fft":
        yield request.param
    else:
        with matmul_chains():
            yield request.param


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
