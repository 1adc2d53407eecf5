"""Options given from Python are checked as the CLI's are: every value before any work, each wrong
one a :class:`UsageError` (exit 2) naming the option; a switch is True or False, not a string that
happens to be truthy ("false" must not turn on --trust-pickle or --force)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from compressor import (CompressOptions, ExportCommand, ExportOptions, FinetuneOptions, PlanOptions, SourceOptions,
                        compress, export_checkpoint, load_compressed_model, load_report, plan_checkpoint)
from compressor.errors import UsageError
from conftest import SAMPLES

MLP = SAMPLES / "mlp.pt"
BAD_OPTIONS = {
    "trust_pickle as a string": (CompressOptions(SourceOptions(MLP, trust_pickle="false")), "--trust-pickle"),
    "force as a string": (CompressOptions(SourceOptions(MLP), force="no"), "--force"),
    "resume as a string": (CompressOptions(SourceOptions(MLP), finetune=FinetuneOptions(resume="no")), "--resume"),
    "mixup as a number": (CompressOptions(SourceOptions(MLP), finetune=FinetuneOptions(mixup=0)), "--mixup"),
    "update_norm_stats as a string": (CompressOptions(SourceOptions(MLP), finetune=FinetuneOptions(update_norm_stats="n")),
                                      "--update-norm-stats"),
    "ort_format as a string": (CompressOptions(SourceOptions(MLP), export=ExportOptions(ort_format="false")), "--ort"),
    "dynamic_tokens as a string": (CompressOptions(SourceOptions(MLP), export=ExportOptions(dynamic_tokens="no")),
                                   "--dynamic-tokens"),
    "include as one string": (CompressOptions(SourceOptions(MLP), plan=PlanOptions(include="net.*")), "--include"),
    "exclude as None": (CompressOptions(SourceOptions(MLP), plan=PlanOptions(exclude=None)), "--exclude"),
    "output as a number": (CompressOptions(SourceOptions(MLP), output=123), "--output"),
    "checkpoint None": (CompressOptions(SourceOptions(None)), "checkpoint"),
    "data as a number": (CompressOptions(SourceOptions(MLP, data=5)), "--data"),
    "arch as a number": (CompressOptions(SourceOptions(MLP, arch=5)), "--arch"),
    "source as a dict": (CompressOptions({"checkpoint": MLP}), "CompressOptions.source"),
    "plan None": (CompressOptions(SourceOptions(MLP), plan=None), "CompressOptions.plan"),
    "output with a NUL": (CompressOptions(SourceOptions(MLP), output="m\x00.fixclf.pt"), "--output .* holds a NUL"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_a_wrong_option_from_python_is_a_usage_error_naming_it(case, workdir):
    options, flag = BAD_OPTIONS[case]
    with pytest.raises(UsageError, match=flag):
        compress(options)
    assert list(Path().iterdir()) == []


@pytest.mark.parametrize("command, flag", [
    (ExportCommand(SourceOptions(MLP), None), "-o"),
    (ExportCommand(SourceOptions(MLP), "m.onnx", seed=-5), "--seed"),
    (ExportCommand(SourceOptions(MLP), "m.onnx", seed="x"), "--seed"),
    (ExportCommand(SourceOptions(MLP), "m.onnx", force="no"), "--force"),
    (ExportCommand(SourceOptions(MLP), "m.onnx", export=ExportOptions(precision="fp61")), "--precision"),
])
def test_the_export_command_checks_its_options_too(command, flag, workdir):
    with pytest.raises(UsageError, match=flag):
        export_checkpoint(command)
    assert list(Path().iterdir()) == []


@pytest.mark.parametrize("call, refusal", [
    (lambda: plan_checkpoint("mlp.pt"), r"plan_checkpoint\(options\) must be a compressor.options.CompressOptions"),
    (lambda: compress({"source": {"checkpoint": "mlp.pt"}}), r"compress\(options\) must be"),
    (lambda: compress(CompressOptions(SourceOptions(MLP)), events="x"), r"compress\(events\) must be a compressor.api.Events"),
    (lambda: export_checkpoint("mlp.pt"), r"export_checkpoint\(command\) must be"),
    (lambda: load_compressed_model(None), r"load_compressed_model\(path\) must be a file name"),
    (lambda: load_compressed_model(b"m.fixclf.pt"), r"load_compressed_model\(path\) must be a file name"),
    (lambda: load_report(5), r"load_report\(path\) must be a file name"),
    (lambda: load_report("a\x00b"), r"load_report\(path\) 'a\\x00b' holds a NUL character"),
])
def test_the_python_api_refuses_arguments_of_the_wrong_kind_by_name(call, refusal, workdir):
    """Bare TypeError / AttributeError from deep inside (pathlib, a missing .validate) became UsageErrors."""
    with pytest.raises(UsageError, match=refusal):
        call()
    assert list(Path().iterdir()) == []


def test_numpy_switches_and_numbers_are_accepted_and_kept_as_plain_values(workdir):
    """numpy's bool and float are a bool and a number: accepted (a resume state stores them as plain values)."""
    import numpy as np

    options = CompressOptions(SourceOptions(MLP, trust_pickle=np.bool_(False)), force=np.bool_(True),
                              finetune=FinetuneOptions(temperature=np.float64(2.0), mixup=np.bool_(False)))
    options.validate()


def test_trust_pickle_false_as_a_string_never_unpickles(workdir):
    """A config file's "false" is refused before the checkpoint is opened: its code cannot run."""
    class Canary:
        def __reduce__(self):
            return (Path("ran").touch, ())

    Path("evil.pt").write_bytes(pickle.dumps(Canary()))
    with pytest.raises(UsageError, match="--trust-pickle must be True or False"):
        plan_checkpoint(CompressOptions(SourceOptions("evil.pt", trust_pickle="false")))
    assert not Path("ran").exists()
