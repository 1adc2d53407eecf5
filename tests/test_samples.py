"""The product's headline claim on the bundled samples, with the CLI's default settings:
every hidden FC and the head replaced, >= 10x fewer parameters in the replaced layers, held-out
accuracy within 0.5 pp (MLP) / 1 pp (CNN) of the original. (Wall-time targets are measured by
benchmarks/bench_samples.py, not asserted here.) The MLP's run is the session's shared
``fixclf compress sample_models/mlp.pt --json`` (tests/conftest.py: ``default_mlp``)."""
from __future__ import annotations

import pytest

from compressor import CompressOptions, Report, SourceOptions, compress, load_report
from compressor.options import BUDGET_STEPS
from conftest import SAMPLES


def _assert_keeps_accuracy(report: Report, original: float, max_drop: float) -> None:
    assert report.accuracy.before == pytest.approx(original, abs=1e-4)  # the README's figure
    assert all(layer.kind is not None for layer in report.layers)
    assert report.params.replaced.ratio >= 10
    assert report.accuracy.after >= report.accuracy.before - max_drop, report.accuracy
    slower = any(pair.speedup < 1 for pair in (report.latency, report.mobile_latency))
    assert report.warnings == ([next(w for w in report.warnings if w.startswith("the compressed model runs slower"))]
                               if slower else [])  # the one warning the samples may carry: ORT speed (0.3-0.7x)
    # the default budget: 2,500 steps of 23 (1,438 rows at batch 64) = 109 epochs, on mixed rows
    assert report.options["epochs"] == 109 and report.finetune.steps >= BUDGET_STEPS and report.options["mixup"] is True


def test_default_compress_of_the_mlp_keeps_accuracy(default_mlp):
    directory, printed = default_mlp
    report = load_report(directory / "mlp.fixclf.pt")
    assert report.to_dict() == printed  # what --json printed is what the checkpoint stores
    _assert_keeps_accuracy(report, 0.9889, 0.005)


def test_default_compress_of_the_cnn_keeps_accuracy(workdir):
    report = compress(CompressOptions(SourceOptions(SAMPLES / "cnn.pt")))  # the CLI's defaults
    _assert_keeps_accuracy(report, 0.9916, 0.01)
