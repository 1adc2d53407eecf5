"""``--max-drop``: the plan keeps dense, one at a time, the replaced layer that costs the most
accuracy, judged on rows set aside from training and distinct from the held-out rows the report
quotes, until the loss there plus 1.645 standard errors of it is within the budget."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import architectures
from cli.main import app
from compressor.api import paired_drop
from compressor.cost import LayerCost
from compressor.finetune import resolved_options
from compressor.options import BUDGET_STEPS, FinetuneOptions
from compressor.data import SELECTION_FRACTION, load_data

runner = CliRunner()
ARCH = "architectures:one_sensitive_layer"
# lr ~ 0 and depth 1: the structured layers stay at their near-identity start, so what each replacement costs is
# fixed by the model alone (the identity layer almost nothing, the random projection nearly everything)
FROZEN = ["--depth", "1", "--epochs", "1", "--lr", "1e-9", "--latency-batch", "8", "--json"]


def _model_and_data(workdir) -> None:
    torch.manual_seed(0)
    model = architectures.one_sensitive_layer()
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(32))
        model[2].bias.zero_()
    torch.save(model.state_dict(), workdir / "net.pt")
    x = torch.randn(1200, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(workdir / "data.npz", x=x.numpy(), y=y.numpy())


def _rows(data, split: str) -> set[bytes]:
    return {row.numpy().tobytes() for x, _ in data.batches(split, 4096) for row in x}


class _Rows:
    """A data source of ``rows`` training rows (counted only when asked)."""

    def __init__(self, rows: int, random_access: bool = True, token_ids: bool = False):
        self.rows, self.random_access, self.counted = rows, random_access, 0
        self.mixable = random_access and not token_ids

    def training_rows(self) -> int:
        self.counted += 1
        return self.rows


def test_the_default_fine_tune_is_a_budget_of_steps_and_mixes_wherever_rows_can_be_mixed():
    default = FinetuneOptions()
    assert default.epochs is None and default.mixup is None
    digits = resolved_options(default, _Rows(1438))  # 23 steps an epoch at batch 64
    assert digits.epochs == math.ceil(BUDGET_STEPS / 23) == 109 and digits.mixup is True
    assert resolved_options(default, _Rows(8000, random_access=False)) == replace(default, epochs=20, mixup=False)
    assert resolved_options(default, _Rows(8000, token_ids=True)) == replace(default, epochs=20, mixup=False)
    assert resolved_options(default, _Rows(10**7)).epochs == 1  # never less than one epoch
    assert resolved_options(FinetuneOptions(batch_size=10), _Rows(100)).epochs == 250
    chosen, stream = FinetuneOptions(epochs=3, mixup=False, batch_size=8), _Rows(8000)
    assert resolved_options(chosen, stream) == chosen and stream.counted == 0  # the user's choice stands, uncounted


def test_paired_drop_is_the_mean_row_difference_and_its_standard_error():
    reference = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    hits = torch.tensor([1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)  # d = 0 1 0 1 0 -1 0 0: mean 1/8
    lost, se = paired_drop(reference, hits)
    d = np.array([0, 1, 0, 1, 0, -1, 0, 0], dtype=float)
    assert lost == pytest.approx(100 / 8) and se == pytest.approx(100 * d.std(ddof=1) / np.sqrt(8))
    assert paired_drop(reference, reference) == (0.0, 0.0)  # the same predictions: nothing lost, no doubt


def test_selection_rows_are_set_aside_from_training_and_held_out(tmp_path):
    x = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(1000) % 3)
    plain, data = load_data(tmp_path / "d.npz", seed=5), load_data(tmp_path / "d.npz", seed=5, selection=True)
    train, val, select = _rows(data, "train"), _rows(data, "val"), _rows(data, "select")
    assert _rows(plain, "val") == val  # the held-out rows the report quotes do not move
    assert not (train & select) and not (val & select) and train | select == _rows(plain, "train")
    assert len(select) == round(SELECTION_FRACTION * len(_rows(plain, "train"))) == data.train_rows // 9
    assert _rows(load_data(tmp_path / "d.npz", seed=5, selection=True), "select") == select  # deterministic


def test_max_drop_keeps_the_costly_layer_dense_and_replaces_the_cheap_one(workdir):
    _model_and_data(workdir)
    result = runner.invoke(app, ["compress", "net.pt", "--arch", ARCH, "--data", "data.npz", "--head", "keep",
                                 "--max-drop", "10", *FROZEN])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["0"]["kind"] is None and "kept dense for --max-drop 10" in layers["0"]["reason"]
    assert layers["2"]["kind"] == "acdc"
    assert report["options"]["max_drop"] == 10
    assert any(note.startswith("--max-drop 10:") and "after keeping 0 dense" in note for note in report["notes"])


def test_max_drop_falls_back_to_the_plan_whose_estimate_alone_fits_and_says_so(workdir, monkeypatch):
    """Every plan loses 0.4 ± 0.3 pp: within 0.5 on the estimate, never with the margin. The first plan
    (everything replaced) is kept, and its note says the rows set aside could not confirm it."""
    _model_and_data(workdir)
    monkeypatch.setattr("compressor.api.paired_drop", lambda reference, hits: (0.4, 0.3))
    result = runner.invoke(app, ["compress", "net.pt", "--arch", ARCH, "--data", "data.npz", "--head", "keep",
                                 "--max-drop", "0.5", *FROZEN])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {layer["name"]: layer["kind"] for layer in report["layers"]} == {"0": "acdc", "2": "acdc", "3": None}
    assert any(note.startswith("--max-drop 0.5: 0.40 ± 0.30 pp lost") and "not with a margin of 1.645 standard errors"
               in note for note in report["notes"])


def test_max_drop_wants_a_one_sided_95_percent_bound_not_one_standard_error(workdir, monkeypatch):
    """0.00 ± 0.40 pp is within 0.5 by one standard error but not by 1.645 (0.66): the costliest layer
    is kept dense and the next plan, -0.50 ± 0.40 (0.16 with the margin), passes."""
    _model_and_data(workdir)
    estimates = iter([(0.0, 0.4), (-0.5, 0.4)])
    monkeypatch.setattr("compressor.api.paired_drop", lambda reference, hits: next(estimates))
    result = runner.invoke(app, ["compress", "net.pt", "--arch", ARCH, "--data", "data.npz", "--head", "keep",
                                 "--max-drop", "0.5", *FROZEN])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(layer["kind"] is None for layer in report["layers"]) == 2  # the head, and one kept for the budget
    assert any(note.startswith("--max-drop 0.5: -0.50 ± 0.40 pp lost on the rows set aside after keeping")
               for note in report["notes"])


def test_a_head_kept_for_the_budget_takes_the_depth_it_gave_its_feeder_back(workdir, monkeypatch):
    """40 classes on 32 features: layer 2, which feeds the head, is planned twice as deep. Once --max-drop
    keeps the head dense, the next plan trains layer 2 at --depth again, with no note left about the head."""
    torch.manual_seed(0)
    torch.save(architectures.one_sensitive_layer(classes=40).state_dict(), workdir / "net.pt")
    x = torch.randn(600, 8)
    np.savez(workdir / "data.npz", x=x.numpy(), y=torch.randint(0, 40, (600,)).numpy())
    estimates = iter([(5.0, 0.1), (0.0, 0.1)])
    monkeypatch.setattr("compressor.api.paired_drop", lambda reference, hits: next(estimates))
    monkeypatch.setattr("compressor.api._costliest_layer", lambda compressed, original, data, replaced, score: ("3", 0.01))
    forty = ["net.pt", "--arch", ARCH, "--arch-kwargs", '{"classes": 40}', "--data", "data.npz"]
    plan = runner.invoke(app, ["plan", *forty, "--depth", "1", "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["layers"][1]["options"]["depth"] == 2
    result = runner.invoke(app, ["compress", *forty, "--max-drop", "1", *FROZEN])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["3"]["kind"] is None and "kept dense for --max-drop 1" in layers["3"]["reason"]
    assert layers["2"]["kind"] == "acdc" and layers["2"]["options"]["depth"] == 1 and layers["2"]["reason"] == ""


def test_a_head_kept_for_latency_takes_the_depth_it_gave_its_feeder_back(workdir, monkeypatch):
    """The same with --objective latency (the head timed slower than dense here): the feeder is timed
    again at the depth it is then planned with."""
    torch.manual_seed(0)
    torch.save(architectures.one_sensitive_layer(classes=40).state_dict(), workdir / "net.pt")
    np.savez(workdir / "data.npz", x=torch.randn(100, 8).numpy(), y=torch.randint(0, 40, (100,)).numpy())
    timed = []

    def measure(model, plan, tokens, batch):
        timed.append({entry.name: entry.options.get("depth") for entry in plan})
        return {e.name: LayerCost([], batch, 1.0, 2.0 if e.role == "head" else 0.5, 1.0, 1.0) for e in plan if e.replaced}
    monkeypatch.setattr("compressor.api.measure", measure)
    result = runner.invoke(app, ["plan", "net.pt", "--arch", ARCH, "--arch-kwargs", '{"classes": 40}', "--data", "data.npz",
                                 "--depth", "1", "--objective", "latency", "--json"])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["3"]["kind"] is None and layers["3"]["reason"].startswith("slower than dense")
    assert layers["2"]["options"]["depth"] == 1 and layers["2"]["reason"] == ""
    assert timed == [{"0": 1, "2": 2, "3": None}, {"2": 1}]


def test_max_drop_that_no_plan_meets_is_refused_and_writes_nothing(workdir):
    _model_and_data(workdir)
    result = runner.invoke(app, ["compress", "net.pt", "--arch", ARCH, "--data", "data.npz", "--max-drop", "0",
                                 "--hidden", "keep", *FROZEN[2:]])  # no --depth: --hidden keep has no ACDC layers
    assert result.exit_code == 5
    assert "no plan stays within --max-drop 0" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["data.npz", "net.pt"]


def test_max_drop_is_checked_before_any_work(workdir):
    for bad in ("-1", "101", "nan"):
        result = runner.invoke(app, ["compress", "missing.pt", "--max-drop", bad])
        assert result.exit_code == 2 and "--max-drop" in result.stderr, result.output
    result = runner.invoke(app, ["compress", "missing.pt", "--max-drop", "1", "--resume"])
    assert result.exit_code == 2 and "--resume" in result.stderr


def test_the_reason_a_layer_was_kept_reads_right_whatever_the_sign_of_what_putting_it_back_did():
    from compressor.api import _kept_for_budget

    assert "putting it back regained 1.50 pp" in _kept_for_budget(3, 0.015)
    lowered = _kept_for_budget(3, -0.8264)
    assert "lowered its accuracy" in lowered and "(-82.64 pp)" in lowered and "regained" not in lowered
    assert "changed nothing" in _kept_for_budget(3, 0.0)


def test_accuracy_from_few_held_out_rows_is_said_to_be_coarse():
    from compressor.api import _few_held_out
    from compressor.report import Accuracy

    measured = Accuracy(before=0.9, after_init=0.1, after=0.8)
    [coarse] = _few_held_out(measured, 1)
    assert "comes from 1 row (one row is 100 pp)" in coarse and "x_val / y_val" in coarse
    assert "(one row is 2.5 pp)" in _few_held_out(measured, 40)[0]
    assert _few_held_out(measured, 100) == [] and _few_held_out(None, 1) == []  # unlabelled data: no figures to judge


def test_a_compressed_model_slower_in_onnx_runtime_is_warned_about_with_each_ratio():
    from compressor.api import _slower_warnings
    from compressor.report import LatencyPair
    from compressor.runtime import Latency

    def pair(before: float, after: float, batch: int, threads: int) -> LatencyPair:
        return LatencyPair(Latency(before, before, batch, threads, 9), Latency(after, after, batch, threads, 9), before / after)
    assert _slower_warnings(pair(1.0, 0.5, 128, 2), pair(1.0, 1.0, 1, 1)) == []
    [warning] = _slower_warnings(pair(1.0, 2.5, 128, 2), pair(1.0, 1.5, 1, 1))
    assert "(1 row on 1 thread: 1.5x slower; 128 rows on 2 threads: 2.5x slower)" in warning
    assert "--objective latency" in warning
    [slightly] = _slower_warnings(pair(1.0, 1.045, 128, 2), pair(1.0, 1.005, 1, 1))  # under 1% is timing noise
    assert "(128 rows on 2 threads: 1.04x slower)" in slightly  # never "1.0x slower"
