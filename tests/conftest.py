"""Shared fixtures: small models and a temporary working directory."""
from __future__ import annotations

import fcntl
import hashlib
import json
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


@pytest.fixture(scope="session")
def default_mlp(tmp_path_factory) -> tuple[Path, dict]:
    """``fixclf compress sample_models/mlp.pt -o DIR/mlp.fixclf.pt --json`` with every other option at
    its default: (DIR, the printed report). Made once per test session: the first process to get here
    runs it, the others wait on the lock and read it. The headline claim (test_samples.py) and every
    test that needs a real compressed checkpoint share this one run."""
    base = _session_directory(tmp_path_factory)
    directory = base / "default-mlp"
    with open(base / "default-mlp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        printed = base / "default-mlp.json"
        if not printed.exists():
            from typer.testing import CliRunner

            from cli.main import app

            directory.mkdir()
            before = sha256(SAMPLES / "mlp.pt")
            result = CliRunner().invoke(app, ["compress", str(SAMPLES / "mlp.pt"), "-o", str(directory / "mlp.fixclf.pt"),
                                              "--json"])
            assert result.exit_code == 0, result.output
            assert sha256(SAMPLES / "mlp.pt") == before  # the input is never modified
            printed.write_text(result.stdout)
        return directory, json.loads(printed.read_text())


@pytest.fixture(scope="module")
def compressed_sample(default_mlp) -> dict:
    """The compressed MLP sample's checkpoint as stored (a plain dict, read without code)."""
    return torch.load(default_mlp[0] / "mlp.fixclf.pt", weights_only=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory, compressed_sample) -> Path:
    """Every input of the bad-input tests, written once per test module (tests/hostile_inputs.py)."""
    from hostile_inputs import write_inputs

    directory = tmp_path_factory.mktemp("inputs")
    write_inputs(directory, compressed_sample)
    return directory


LONGEST_FIRST = ("test_scale.py", "test_samples.py", "test_interrupts.py", "test_architectures.py", "test_cli.py",
                 "test_export.py", "test_bad_inputs.py")
"""Modules in the order `make test`'s two workers start them: longest first (as measured:
test_samples.py includes the session's shared default compress), so that neither waits alone at the
end for a long module (each module runs on one worker: --dist loadfile; --no-loadscope-reorder keeps
this order, which pytest-xdist would otherwise replace by the modules' test counts)."""


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module stays as written
