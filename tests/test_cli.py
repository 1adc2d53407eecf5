"""The CLI end to end on the bundled samples: compress, plan, report (table, JSON), export."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from compressor import CompressOptions, FinetuneOptions, SourceOptions, load_compressed_model, load_report
from compressor.data import load_data
from cli_zygote import run_many
from conftest import FIXCLF, SAMPLES, sha256

runner = CliRunner()
MLP = str(SAMPLES / "mlp.pt")
CNN = str(SAMPLES / "cnn.pt")


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_compress_report_json_fields(default_mlp):
    out, report = default_mlp
    for key in ("params", "onnx", "accuracy", "latency", "layers", "warnings", "notes"):
        assert key in report
    assert report["params"]["model"]["after"] < report["params"]["model"]["before"]
    assert report["onnx"]["bytes_after"] < report["onnx"]["bytes_before"]
    assert set(report["accuracy"]) == {"before", "after_init", "after"}
    assert set(report["latency"]["after"]) >= {"median", "p90", "batch", "threads"}
    assert report["latency"]["after"]["spinning"] is False
    mobile = report["mobile_latency"]  # batch 1 on 1 thread, as ONNX Runtime Mobile runs
    assert mobile["after"]["batch"] == mobile["before"]["batch"] == 1 and mobile["after"]["threads"] == 1
    kinds = {layer["name"]: layer["kind"] for layer in report["layers"]}
    assert kinds == {"0": "acdc", "2": "acdc", "4": "hadamard"}
    assert (out / "mlp.fixclf.onnx").is_file() and (out / "mlp.fixclf.pt").is_file()
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary leftovers


def test_compressed_checkpoint_reloads_weights_only_with_same_logits(default_mlp):
    out, _ = default_mlp
    raw = torch.load(out / "mlp.fixclf.pt", weights_only=True)
    assert raw["format"] == "fixclf.compressed/1"
    model = load_compressed_model(out / "mlp.fixclf.pt")
    x = load_data(SAMPLES / "digits.npz").head("val", 64)[0]
    again = load_compressed_model(out / "mlp.fixclf.pt", arch="compressor.zoo:mlp")
    assert torch.equal(model(x), again(x))
    session = ort.InferenceSession(str(out / "mlp.fixclf.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(onnx_logits), model(x).detach(), atol=1e-4)


@pytest.mark.parametrize("user_architecture", [False, True])
def test_a_checkpoint_that_stores_the_heads_alpha_itself_loads_as_before(default_mlp, compressed_sample, tmp_path,
                                                                          user_architecture):
    """fixclf before 2026-12-04 stored a fixed head's scale as ``alpha``; it is now learned as log(alpha).
    Such a file gives the same logits, through the built-in and a user's architecture alike; an
    alpha that no logarithm can hold is a damaged file, not NaN logits."""
    from compressor.checkpoint import load_model
    from compressor.errors import CheckpointError
    from compressor.zoo import mlp

    state = dict(compressed_sample["state_dict"])
    key = next(k for k in state if k.endswith("log_alpha"))
    state[key.removesuffix("log_alpha") + "alpha"] = state.pop(key).exp()
    stored = {**compressed_sample, "arch": "user_models:mlp"} if user_architecture else compressed_sample
    arch = mlp if user_architecture else None
    torch.save({**stored, "state_dict": state}, tmp_path / "old.fixclf.pt")
    x = load_data(SAMPLES / "digits.npz").head("val", 64)[0]
    with torch.no_grad():
        expected = load_compressed_model(default_mlp[0] / "mlp.fixclf.pt")(x)
        assert torch.allclose(load_compressed_model(tmp_path / "old.fixclf.pt", arch=arch)(x), expected, atol=1e-5)
    state[key.removesuffix("log_alpha") + "alpha"] = torch.tensor(-2.0)
    torch.save({**stored, "state_dict": state}, tmp_path / "old.fixclf.pt")
    with pytest.raises(CheckpointError, match="alpha must be one positive number; the file is damaged"):
        load_model(tmp_path / "old.fixclf.pt", arch=arch)


def test_report_table_json_and_latest(default_mlp, monkeypatch):
    out, report = default_mlp
    table = invoke("report", str(out / "mlp.fixclf.pt"))
    assert table.exit_code == 0 and "held-out accuracy" in table.stdout and "ONNX file" in table.stdout
    assert "batch 1, 1 thread" in table.stdout
    as_json = json.loads(invoke("report", str(out / "mlp.fixclf.pt"), "--json").stdout)
    assert as_json["params"] == report["params"]
    accuracy = report["accuracy"]
    not_recovered = accuracy["after"] <= accuracy["after_init"] and accuracy["after"] < accuracy["before"]
    assert not_recovered == any("has not recovered" in w for w in report["warnings"])  # the warning follows the figures
    if not_recovered:
        assert "warning: fine-tuning has not recovered the model" in " ".join(table.stdout.split())
    monkeypatch.chdir(out)
    latest = invoke("report", "--json")
    assert latest.exit_code == 0 and json.loads(latest.stdout)["output"] == report["output"]


def test_plan_touches_nothing(workdir):
    before = sha256(MLP)
    result = invoke("plan", MLP, "--hidden", "fastfood", "--exclude", "0", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    kinds = {layer["name"]: (layer["kind"], layer["reason"]) for layer in plan["layers"]}
    assert kinds == {"0": (None, "matched by --exclude"), "2": ("fastfood", ""), "4": ("hadamard", "")}
    assert plan["params"]["model"]["after"] < plan["params"]["model"]["before"]
    assert all(layer["cost"]["dense_batch1_ms"] > 0 for layer in plan["layers"] if layer["kind"])  # timed (bundled data)
    assert sha256(MLP) == before and os.listdir(workdir) == []
    table = invoke("plan", CNN)
    assert table.exit_code == 0 and "classifier.0" in table.stdout


def test_export_command(default_mlp, workdir):
    out, _ = default_mlp
    # the data lives outside the output's directory, so the checkpoint does not name it: --data again
    refused = invoke("export", str(out / "mlp.fixclf.pt"), "-o", "m.onnx")
    assert refused.exit_code == 4 and "--data" in refused.stderr
    result = invoke("export", str(out / "mlp.fixclf.pt"), "-o", "m.onnx", "--json", "--data", str(SAMPLES / "digits.npz"))
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)["files"]["onnx"]
    assert info["bytes"] == os.path.getsize("m.onnx") and info["max_rel_diff"] <= 1e-4
    dense = invoke("export", CNN, "-o", "cnn.onnx")
    assert dense.exit_code == 0 and "wrote cnn.onnx" in dense.stdout


def test_arch_kwargs_equal_to_the_stored_ones_are_accepted():
    """A checkpoint that stores its kwargs is built from them; --arch-kwargs saying the same (in any key
    order) is no conflict (other kwargs: tests/hostile_inputs.py)."""
    from compressor.checkpoint import load_model

    same = {"num_classes": 10, "hidden": [512, 512], "in_features": 64}
    assert load_model(MLP, arch="compressor.zoo:mlp", arch_kwargs=same).kwargs == same


def test_an_architecture_stored_as_a_lambda_or_script_function_is_named_again_by_the_user(workdir):
    """``compress(arch=lambda ...)`` (or a function of a script run as __main__) stores a name nothing can
    import: loading asks for --arch, and a --arch naming the same factory is accepted, not refused as a
    different architecture."""
    from compressor.checkpoint import load_model
    from compressor.errors import CheckpointError

    stored = torch.load(MLP, weights_only=True)
    for name in ("__main__:<lambda>", "__main__:build", "mymodels:train.<locals>.build"):
        torch.save({**stored, "arch": name}, "m.pt")
        with pytest.raises(CheckpointError, match="cannot be imported by name; name it yourself: --arch package.module"):
            load_model("m.pt")
        assert load_model("m.pt", arch="compressor.zoo:mlp").arch == "compressor.zoo:mlp"
    torch.save({**stored, "arch": "mymodels:build"}, "m.pt")
    with pytest.raises(CheckpointError, match="saved with architecture mymodels:build, but compressor.zoo:mlp was given"):
        load_model("m.pt", arch="compressor.zoo:mlp")


def test_a_factory_given_in_python_that_refuses_the_stored_kwargs_is_named_and_the_file_not_blamed():
    from compressor.checkpoint import load_model
    from compressor.errors import CheckpointError

    def no_kwargs():
        return torch.nn.Linear(64, 10)

    with pytest.raises(CheckpointError, match=r"test_cli:.*no_kwargs \(given for compressor.zoo:mlp\) failed: TypeError: .*with the kwargs "
                                              r"the file stores \(\{.*\}\); give the factory that compressed it") as refused:
        load_model(MLP, arch=no_kwargs)
    assert "damaged" not in str(refused.value)


def _recording_mlp(devices: list[str]):
    """``compressor.zoo:mlp`` that records the device each build ran on."""
    from compressor.zoo import mlp

    def build(**kwargs):
        devices.append(torch.empty(0).device.type)
        return mlp(**kwargs)
    return build


@pytest.mark.parametrize("compressed", [False, True])
def test_a_small_file_whose_stored_kwargs_ask_for_a_huge_model_is_refused_before_allocating(compressed_sample, tmp_path,
                                                                                           compressed):
    """A user's architecture (not allow-listed) is first built on the meta device and the file's shapes
    checked there: a file of a few KB whose kwargs ask for 32k x 32k layers (4 GB each) is refused by its
    mismatch; the factory never runs on a real device."""
    from compressor.checkpoint import load_model
    from compressor.errors import CheckpointError

    obj = compressed_sample if compressed else torch.load(MLP, weights_only=True)
    torch.save({**obj, "arch": "user_models:mlp", "kwargs": {**obj["kwargs"], "hidden": [32768, 32768]}},
               tmp_path / "huge.pt")
    devices: list[str] = []
    with pytest.raises(CheckpointError, match=r"does not match the architecture \(size mismatch for 0.weight|the model has Linear\(64, 32768\)"):
        load_model(tmp_path / "huge.pt", arch=_recording_mlp(devices))
    assert devices == ["meta"]


def test_subprocess_compress_cnn(workdir):
    """A real process running the console entry point (forked from one that imported fixclf:
    tests/cli_zygote.py), on the CNN sample."""
    args = ["compress", CNN, "--hidden", "fastfood", "--epochs", "1", "--no-mixup", "--quantize", "int8", "--precision",
            "fp16", "--ort", "--json"]
    code = run_many({"cnn": {"args": args, "cwd": str(workdir), "out": "out.json", "err": "err.txt"}})["cnn"]
    assert code == 0, (workdir / "err.txt").read_text()
    (workdir / "err.txt").unlink()
    report = json.loads((workdir / "out.json").read_text())
    (workdir / "out.json").unlink()
    assert report["output"] == "cnn.fixclf.pt" and (workdir / "cnn.fixclf.onnx").is_file()
    assert {layer["kind"] for layer in report["layers"]} == {"fastfood", "hadamard"}
    assert report["options"]["epochs"] == 1 and report["options"]["mixup"] is False  # as asked (defaults: test_samples)
    assert {k: report["options"][k] for k in ("quantize", "precision", "ort", "include", "batch_size")} == {
        "quantize": "int8", "precision": "fp16", "ort": True, "include": [], "batch_size": 64}  # what made these files
    # int8 of the remaining dense layers (the convolutions) and the ORT mobile format
    assert (workdir / "cnn.fixclf.int8.onnx").is_file() and (workdir / "cnn.fixclf.ort").is_file()
    assert report["int8"]["bytes"] < report["onnx"]["bytes_after"]
    assert set(report["int8"]) >= {"accuracy", "latency", "top1_agreement"}
    assert set(report["latency"]["before"]) >= {"median", "p90"}
    assert report["onnx"]["extra_files"] == ["cnn.fixclf.int8.onnx", "cnn.fixclf.fp16.onnx", "cnn.fixclf.ort"]
    shown = invoke("report", "cnn.fixclf.pt")  # the mobile checker's verdict, in words as in --json
    assert report["onnx"]["mobile_notes"] and f"mobile: {report['onnx']['mobile_notes'][0][:40]}" in " ".join(shown.stdout.split())
    assert report["onnx"]["ort_bytes"] == (workdir / "cnn.fixclf.ort").stat().st_size
    # float16: accepted on >= 99% top-1 agreement with float32, its held-out accuracy reported
    assert report["fp16"]["top1_agreement"] >= 0.99 and report["fp16"]["bytes"] < report["onnx"]["bytes_after"]
    assert abs(report["fp16"]["accuracy"] - report["accuracy"]["after"]) <= 0.01


def test_whole_pickled_model_with_opt_in_and_arch(workdir):
    """--trust-pickle loads a pickled nn.Module; --arch names an importable architecture for it."""
    from compressor.zoo import mlp

    torch.save(mlp(64, [512, 512], 10), workdir / "pickled.pt")
    plan = invoke("plan", "pickled.pt", "--trust-pickle", "--json")
    assert plan.exit_code == 0 and len(json.loads(plan.stdout)["layers"]) == 3
    result = invoke("compress", "pickled.pt", "--trust-pickle", "--arch", "compressor.zoo:mlp", "--arch-kwargs",
                    '{"hidden": [512, 512]}', "--data", str(SAMPLES / "digits.npz"), "--epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    assert load_compressed_model(workdir / "pickled.fixclf.pt") is not None


def test_a_pickled_model_whose_class_is_in_the_current_directory_loads(workdir):
    """A model pickled by the user's own script names its class by the script's module: with
    --trust-pickle that module is found in the current directory, as --arch finds one."""
    (workdir / "own_net.py").write_text("import torch\n\nclass Net(torch.nn.Sequential):\n    def __init__(self):\n"
                                        "        super().__init__(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))\n")
    sys.path.insert(0, str(workdir))
    try:
        torch.save(__import__("own_net").Net(), "own.pt")  # pickled as the class own_net.Net
    finally:
        sys.path.remove(str(workdir))
        del sys.modules["own_net"]
    code = run_many({"own": {"args": ["plan", "own.pt", "--trust-pickle", "--json"], "cwd": str(workdir), "out": "out.json",
                             "err": "err.txt"}})["own"]
    assert code == 0, (workdir / "err.txt").read_text()
    assert [layer["role"] for layer in json.loads((workdir / "out.json").read_text())["layers"]] == ["hidden", "head"]


def test_max_time_is_checked_every_step(workdir):
    digits = np.load(SAMPLES / "digits.npz")
    np.savez("big.npz", x=np.tile(digits["x"], (20, 1)), y=np.tile(digits["y"], 20))  # 450 steps an epoch
    result = invoke("compress", MLP, "--data", "big.npz", "--epochs", "3", "--max-time", "0.5", "--latency-batch", "8",
                    "--json")
    assert result.exit_code == 0, result.output
    finetune = json.loads(result.stdout)["finetune"]
    assert finetune["stopped_by"] == "max_time" and finetune["epochs_run"] == 1  # stopped inside the first epoch
    assert finetune["steps"] < 400


def test_int8_of_a_model_with_no_dense_layer_left_is_decided_before_work(workdir, monkeypatch):
    """The MLP sample loses every dense layer: the user is told before the fine-tune, the float ONNX
    file is written and the report says why."""
    monkeypatch.setenv("FIXCLF_PROGRESS", "1")
    result = invoke("compress", MLP, "--quantize", "int8", "--epochs", "1", "--latency-batch", "8")
    assert result.exit_code == 0, result.output
    progress = " ".join(result.stderr.split())
    assert -1 < progress.index("note: int8 skipped") < progress.index("Fine-tuning") < progress.index("Exporting the compressed")
    report = load_report("mlp.fixclf.pt")
    assert report.int8 is None and any("int8 skipped" in note for note in report.notes)
    assert sorted(os.listdir(workdir)) == ["mlp.fixclf.onnx", "mlp.fixclf.pt"]


def test_debug_is_accepted_after_the_command_and_keeps_the_exit_code(capsys):
    """--debug belongs to the app, but users put it anywhere: it adds the real exception's traceback and
    the exit code stays the documented one (scripts branch on it)."""
    from cli.main import STATE, run

    try:
        assert run(["plan", MLP, "--debug", "--exclude", "zzz"]) == 5
        assert run(["compress", MLP, "--depth", "0", "--debug"]) == 2
    finally:
        STATE["debug"] = False
    err = capsys.readouterr().err
    assert "Traceback" in err and "PlanError: " in err and "matches no Linear layer" in err


@pytest.mark.parametrize("after, max_drop, warned", [(0.985, None, False), (0.975, None, True), (0.975, 2.0, False),
                                                     (0.975, 0.5, True), (0.982, 0.5, True), (0.5, None, True)])
def test_a_drop_over_1_pp_or_over_max_drop_is_a_warning(after, max_drop, warned):
    from compressor.api import _warnings
    from compressor.finetune import FinetuneResult
    from compressor.report import Accuracy

    found = _warnings(Accuracy(before=0.99, after_init=0.4, after=after), FinetuneResult(), max_drop)
    assert any("held-out accuracy dropped" in w and "--max-drop" in w for w in found) == warned, found
    advice = "--max-drop PP" if max_drop is None else f"lower --max-drop below {max_drop:g}"  # not the option given
    assert all(advice in w for w in found if "held-out accuracy dropped" in w)


def test_closed_standard_streams_are_no_error(default_mlp):
    """Started with stdout or stderr closed (`fixclf report ... >&-`), the command still does its work
    and exits with its own code, printing nowhere."""
    out, _ = default_mlp
    for closed, args, code in ((1, ["report", str(out / "mlp.fixclf.pt")], 0), (2, ["report", str(out / "none.pt")], 3)):
        result = subprocess.run([*FIXCLF, *args], capture_output=True, text=True, timeout=120,
                                preexec_fn=lambda fd=closed: os.close(fd))
        assert result.returncode == code and "Traceback" not in result.stdout + result.stderr, result


def test_a_full_disk_or_a_reader_gone_on_standard_output_is_one_line_or_quiet(default_mlp):
    """`> /dev/full`: exit 8 and one line (the work is done); a reader that stopped reading (`| head`): quietly,
    with the exit of a command that SIGPIPE ended (141). Tables and --json alike."""
    out, _ = default_mlp
    for as_json in ([], ["--json"]):
        command = [*FIXCLF, "report", str(out / "mlp.fixclf.pt"), *as_json]
        with open("/dev/full", "w") as full:
            result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert result.returncode == 8 and result.stderr.startswith("error: writing to standard output failed (No space"), result
        assert result.stderr.count("\n") == 1, result.stderr
        read_end, write_end = os.pipe()
        os.close(read_end)
        result = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
        os.close(write_end)
        assert (result.returncode, result.stderr) == (141, ""), result


def test_forced_progress_goes_to_stderr_also_with_json(monkeypatch):
    """FIXCLF_PROGRESS=1 is for logs: progress (on stderr) also with --json; unset, none with --json; =0, none."""
    from cli.main import _progress_wanted

    monkeypatch.setenv("FIXCLF_PROGRESS", "1")
    assert _progress_wanted(as_json=True) and _progress_wanted(as_json=False)
    monkeypatch.setenv("FIXCLF_PROGRESS", "0")
    assert not _progress_wanted(as_json=False)
    monkeypatch.delenv("FIXCLF_PROGRESS")
    assert not _progress_wanted(as_json=True)


def test_a_resume_state_left_by_an_interrupted_run_is_named_in_the_notes(tmp_path):
    """Run again without --resume, a compress says that the old state is still there (and leaves it alone)."""
    from compressor.api import _stale_resume_notes

    (tmp_path / "mlp.fixclf.resume.pt").write_bytes(b"state")
    options = CompressOptions(SourceOptions(MLP))
    assert "mlp.fixclf.resume.pt, the resume state of an earlier interrupted run" in _stale_resume_notes(
        options, tmp_path / "mlp.fixclf.pt")[0]
    assert _stale_resume_notes(options, tmp_path / "other.fixclf.pt") == []
    resuming = CompressOptions(SourceOptions(MLP), finetune=FinetuneOptions(resume=True))
    assert _stale_resume_notes(resuming, tmp_path / "mlp.fixclf.pt") == []


def test_tables_fold_long_names_rather_than_cut_them(workdir):
    """Two layers whose names differ only at their ends stay told apart in the plan's table (no ellipsis)."""
    import architectures

    torch.save(architectures.long_names().state_dict(), "long.pt")
    shown = invoke("plan", "long.pt", "--arch", "architectures:long_names")
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout
    flat = "".join(line.split("│")[1].strip() for line in shown.stdout.splitlines() if line.startswith("│"))
    assert "a_really_long_layer_name_" * 3 + "one" in flat and "a_really_long_layer_name_" * 3 + "two" in flat


def test_a_parameter_from_the_file_brings_only_its_values(tmp_path):
    """torch's weights-only loader rebuilds a Parameter with backward hooks (allow-listed callables):
    the model takes the values, never the file's tensor object with its hooks (assign=True did)."""
    import collections

    from compressor.checkpoint import _load_state

    hooked = torch.nn.Parameter(torch.ones(3))
    hooked._backward_hooks = collections.OrderedDict({0: collections.Counter})
    for assign in (True, False):
        model = torch.nn.Linear(2, 3) if not assign else torch.nn.Linear(2, 3, device="meta")
        _load_state(model, {"weight": torch.zeros(3, 2), "bias": hooked}, tmp_path / "f.pt", assign=assign)
        assert not model.bias._backward_hooks and torch.equal(model.bias.detach(), torch.ones(3))
        model(torch.ones(1, 2)).sum().backward()  # a hook from the file would run here


def test_a_rank_without_a_world_of_several_processes_prints_its_errors(monkeypatch):
    from cli.main import _is_rank_zero

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert _is_rank_zero()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not _is_rank_zero()


def test_an_output_name_that_is_not_utf8_is_checked_as_bytes(tmp_path):
    from compressor.outputs import check_output_path

    check_output_path(tmp_path / os.fsdecode(b"caf\xe9.fixclf.pt"), [], force=False)  # no UnicodeEncodeError


def test_the_progress_bar_shows_the_runs_position_a_resumed_run_starts_past_zero():
    """A resumed run's first step is, say, step 5 of epoch 2: the bar starts there, not at zero."""
    import io

    from rich.console import Console

    from cli.render import RichEvents

    events = RichEvents(Console(file=io.StringIO()), quiet=False)
    events.finetune_start(epochs=3, steps_per_epoch=10, rows=640)
    events.step(2, 5, 0.1)
    events.step(2, 6, 0.1)
    assert events.progress.tasks[0].completed == 16 and events.progress.tasks[0].total == 30
    events.close()


def test_a_compressed_model_traces_and_exports_with_torch_but_does_not_script(default_mlp):
    """What the README says of TorchScript and torch.export: trace and export give the same logits;
    torch.jit.script is refused by torch (the layers' annotations are postponed), so the README
    points to the other three."""
    model = load_compressed_model(default_mlp[0] / "mlp.fixclf.pt")
    x = load_data(SAMPLES / "digits.npz").head("val", 8)[0]
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(torch.jit.trace(model, x)(x), expected, atol=1e-6)
        assert torch.allclose(torch.export.export(model, (x,)).module()(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="annotation"):
        torch.jit.script(model)
