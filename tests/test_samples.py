"""The product's headline claim on the bundled samples, with the CLI's default settings:
every hidden FC and the head replaced, >= 10x fewer parameters in the replaced layers, held-out
accuracy within 0.5 pp (MLP) / 1 pp (CNN) of the original. (Wall-time targets are measured by
benchmarks/bench_samples.py, not asserted here.)"""
from __future__ import annotations

import pytest

from compressor import CompressOptions, SourceOptions, compress
from compressor.options import BUDGET_STEPS
from conftest import SAMPLES


@pytest.mark.parametrize("sample, original, max_drop", [("mlp", 0.9889, 0.005), ("cnn", 0.9916, 0.01)])
def test_default_compress_keeps_accuracy(sample, original, max_drop, workdir):
    report = compress(CompressOptions(SourceOptions(SAMPLES / f"{sample}.pt")))  # the CLI's defaults
    assert report.accuracy.before == pytest.approx(original, abs=1e-4)  # the README's figure
    assert all(layer.kind is not None for layer in report.layers)
    assert report.params.replaced.ratio >= 10
    assert report.accuracy.after >= report.accuracy.before - max_drop, report.accuracy
    assert report.warnings == []
    # the default budget: 2,500 steps of 23 (1,437 rows at batch 64) = 109 epochs, on mixed rows
    assert report.options["epochs"] == 109 and report.finetune.steps >= BUDGET_STEPS and report.options["mixup"] is True
