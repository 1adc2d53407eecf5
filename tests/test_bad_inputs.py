"""A corpus of bad and hostile inputs through the real CLI, one process per case (tests/hostile_inputs.py):
each must fail cleanly with its documented exit code, and its message must say what to do."""
from __future__ import annotations

import pytest

from conftest import ROOT
from hostile_inputs import CASES, assert_clean_failure, run_cases


@pytest.fixture(scope="module")
def results(template, tmp_path_factory) -> dict[str, dict]:
    return run_cases(template, tmp_path_factory.mktemp("cases"), {name: args for name, (args, _) in CASES.items()})


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, results):
    assert_clean_failure(results[case], CASES[case][1])


def test_messages_say_what_to_do(results):
    said = {name: results[name]["stderr"] for name in CASES}
    assert "--trust-pickle" in said["malicious pickle"] and "system" in said["malicious pickle"]
    assert "system" in said["protocol-0 pickle calling os.system"] and "--trust-pickle" in said["protocol-0 pickle calling os.system"]
    for taken in ("a directory", "a FIFO"):
        assert "is not a regular file" in said[f"--resume where {taken} holds the resume state's name"]
    legacy = said["legacy (PyTorch < 1.6) checkpoint calling os.system after its tensors"]
    assert "system to load" in legacy and "--trust-pickle" in legacy and "truncated" not in legacy
    truncated = said["legacy checkpoint truncated in its tensor bytes"]
    assert "may be truncated" in truncated and "--trust-pickle" not in truncated
    assert "--arch compressor.checkpoint:build_arch" in said["arch gadget in a fixclf checkpoint"]
    assert "--data" in said["data field naming code"]
    assert "integer class indices" in said["one-hot labels"] and "argmax" in said["one-hot labels"]
    assert "--head orthogonal" in said["Hadamard head with more classes than codes (3 -> 10 Linear)"]
    assert "nothing to compress in this model" in said["only Linear a head of more classes than features, behind a convolution"]
    assert "--epochs" in said["epochs abc (click's own error)"]
    assert "--arch" in said["--arch-kwargs without --arch"]
    assert "'epoch', 'note'" in said["state_dict with an epoch and a note among its tensors"]
    assert "torch.from_numpy" in said[".pt data file of numpy arrays"]
    assert "b.y.npy has no b.npy" in said["shard labels without their rows"]
    assert "NaN" in said["NaN weights"]
    assert "row 250 of x" in said["token ids beyond the model's vocabulary (row 250)"]
    assert "but row 7 of x holds values that are not whole" in said["token ids stored as floats, one not whole"]
    beyond = {name: text for name, text in said.items() if name.startswith("token id beyond the vocabulary in a")}
    assert len(beyond) == 5 and all("within the model's vocabulary" in text for text in beyond.values())
    assert "held-out rows 0-399 failed" in beyond[
        "token id beyond the vocabulary in an unlabelled stream's held-out rows met only in scoring"]
    assert "a batch holds values that are not whole numbers" in said["token ids in a Dataset item of floats, one not whole"]
    assert "of the first 1,024 training rows" in beyond["token id beyond the vocabulary in a Dataset's calibration rows"]
    assert "of the first 256 held-out rows" in beyond["token id beyond the vocabulary in a stream's held-out rows the run holds"]
    assert "held-out rows 0-399 failed" in beyond["token id beyond the vocabulary in a stream's held-out rows met only in evaluation"]
    assert "a training batch failed" in beyond["token id beyond the vocabulary in a stream's training batch"]
    assert "returned a tuple of 3; return (x,) or (x, y)" in said["--data function returning a tuple of 3"]
    assert "reading item 1999 failed (SystemExit: 0)" in said["Dataset item calling sys.exit(0) late"]
    assert "reading the stream failed (SystemExit: 0)" in said["stream item calling sys.exit(0) late"]
    assert "called sys.exit(0)" in said["model forward calling sys.exit(0) in training"]
    assert "a tensor with attributes of its own (is_floating_point)" in said[
        "NaN weights in a tensor whose is_floating_point the file replaced"]
    assert "more than 2,000,000 characters" in said["report whose options hide long strings after 8,192 entries"]
    assert "the stream's len() failed (SystemExit: 0)" in said["stream whose len() calls sys.exit(0)"]
    assert "store the ids as int64" in said["int32 token ids into an nn.EmbeddingBag (the exporter lowers it for int64)"]
    assert "returned generator; return a dict of arrays" in said["--data function returning a generator of pairs"]
    assert "'x_valid', 'y_valid'" in said["a held-out split under a name fixclf does not read (x_valid)"]
    assert "not a weights-only checkpoint" in said["an ONNX file as the checkpoint"]
    assert "stored in the file; the file is damaged" in said["stored kwargs that do not build the architecture"]
    assert "digits.npz" in said["data file the checkpoint names is missing"] and "--data" in said["data file the checkpoint names is missing"]
    assert "Python objects" in said["object arrays in the data"]
    assert "not a regular file" in said["a FIFO as the checkpoint"]
    assert "fixes the batch size" in said["model whose forward fixes the batch size"]
    assert "has not ended after 0.5 s" in said["IterableDataset that never ends, --max-time"]
    assert "same items in the same order" in said["IterableDataset that reshuffles every pass"]
    assert "not an .npz archive" in said["a text file named .npz"]
    assert "regroups 2 rows of shape (32,) into 1 row(s) of logits" in said["data a reshaping model regroups into fewer rows"]
    assert "float32" in said["model whose forward runs in float64"] and "check --data" not in said["model whose forward runs in float64"]
    assert "more than 2,000,000 characters" in said["report of 4096 rows sharing one long string"]
    assert "meta device" in said["--arch-kwargs building the model on the meta device"]
    assert said["truncated checkpoint"].rstrip().endswith("compress wrote") and "there is a high)" not in said["truncated checkpoint"]


def test_the_readme_counts_the_corpus():
    assert f"runs {len(CASES)} such cases" in (ROOT / "README.md").read_text()
