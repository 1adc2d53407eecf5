"""Shared fixtures: small models and a temporary working directory."""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the two cores: one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # the CLI processes a test starts included (they inherit it)
    torch.set_num_threads(1)
else:
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


def _session_directory(tmp_path_factory) -> Path:
    """A directory every process of this test session sees (the pytest-xdist workers' common base),
    or this process's own when it runs alone."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def compressed_sample(tmp_path_factory) -> dict:
    """The compressed MLP sample, made once per test session: the first process to get here makes it,
    the others wait on the lock and read it."""
    directory = _session_directory(tmp_path_factory) / "compressed-sample"
    directory.mkdir(exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from hostile_inputs import compressed_sample_in

        return compressed_sample_in(directory)


@pytest.fixture(scope="module")
def template(tmp_path_factory, compressed_sample) -> Path:
    """Every input of the bad-input tests, written once per test module (tests/hostile_inputs.py)."""
    from hostile_inputs import write_inputs

    directory = tmp_path_factory.mktemp("inputs")
    write_inputs(directory, compressed_sample)
    return directory


LONGEST_FIRST = ("test_samples.py", "test_scale.py", "test_bad_inputs.py", "test_cli.py", "test_architectures.py",
                 "test_interrupts.py", "test_export.py")
"""Modules in the order `make test`'s two workers should start them: longest first, so that neither
waits alone at the end for a long module (each module runs on one worker: --dist loadfile)."""


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module stays as written
