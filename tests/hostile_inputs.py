"""The inputs of the bad-input tests and how a case runs: hostile checkpoints, broken data, odd
outputs (written once per test module into a template directory), the corpus of CLI invocations
with their documented exit codes, and the runner that gives every case its own copy of the inputs
and its own process, forked from one that imported fixclf once (tests/cli_zygote.py). The
``compressed_sample`` and ``template`` fixtures (tests/conftest.py) make the inputs.

A clean failure: the documented exit code, exactly one stderr line starting ``error:`` and no
traceback, every input byte-identical afterwards, no new file anywhere in the working directory
(hidden files and subdirectories included), and no canary file from code a checkpoint tried to run.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from compressor.zoo import mlp
from cli_zygote import run_many
from conftest import ROOT, SAMPLES, sha256

CANARY = "PWNED"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", FIXCLF_PROGRESS="1")
MODEL_FORMAT, COMPRESSED_FORMAT = "fixclf.model/1", "fixclf.compressed/1"


class RunsCode:
    """A malicious pickle: unpickling it would create the canary file."""

    def __init__(self, protocol_zero: bool = False) -> None:
        self.protocol_zero = protocol_zero

    def __reduce__(self):
        return (os.system, (f"touch {CANARY}",))


def _fixclf(obj: dict, path: Path) -> None:
    torch.save(obj, path)


def _sample_state() -> dict:
    return torch.load(SAMPLES / "mlp.pt", weights_only=True)


def write_inputs(d: Path, compressed: dict) -> None:
    """Every input any case uses, created once; each case runs on its own copy."""
    shutil.copy(SAMPLES / "mlp.pt", d / "mlp.pt")
    shutil.copy(SAMPLES / "cnn.pt", d / "cnn.pt")
    shutil.copy(SAMPLES / "digits.npz", d / "digits.npz")
    (d / "empty.pt").write_bytes(b"")
    full = (SAMPLES / "mlp.pt").read_bytes()
    (d / "truncated.pt").write_bytes(full[: len(full) // 2])
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "folder").mkdir()
    (d / "dangling.fixclf.pt").symlink_to(d / "gone.pt")
    with open(d / "evil.pt", "wb") as f:
        pickle.dump(RunsCode(), f, protocol=2)
    (d / "evil0.pt").write_bytes(b"cos\nsystem\n(S'touch " + CANARY.encode() + b"'\ntR.")  # protocol 0, no class needed
    torch.save({"model": RunsCode()}, d / "evil_zip.pt")
    torch.save({"w": torch.zeros(2), "model": RunsCode()}, d / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    legacy = io.BytesIO()  # 147 elements: the size field of its first tensor reads as the STACK_GLOBAL opcode (0x93)
    torch.save(torch.nn.Linear(7, 21).state_dict(), legacy, _use_new_zipfile_serialization=False)
    (d / "legacy_truncated.pt").write_bytes(legacy.getvalue()[:-100])
    torch.save(mlp(64, [512, 512], 10).state_dict(), d / "weights.pt")
    torch.save({**mlp(64, [512, 512], 10).state_dict(), "epoch": 7, "note": "best"}, d / "weights_and_epoch.pt")
    torch.save(torch.nn.Conv2d(1, 4, 3).state_dict(), d / "conv.pt")
    torch.save(mlp(64, [512, 512], 10), d / "pickled.pt")
    digits = np.load(SAMPLES / "digits.npz")
    x, y = digits["x"], digits["y"]
    np.savez(d / "narrow.npz", x=x[:, :32], y=y)
    np.savez(d / "badlabels.npz", x=x, y=y + 5)
    np.savez(d / "onehot.npz", x=x, y=np.eye(10)[y])
    nan = x.copy()
    nan[3, 7] = np.nan
    np.savez(d / "nan.npz", x=nan, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, d / "d.pt")
    (d / "hostile_code.py").write_text(
        "import sys\nimport torch\n\ndef net(**kw):\n    sys.exit(0)\n\ndef data():\n    raise SystemExit(3)\n\n"
        "class Pair(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n    def forward(self, x):\n        return self.fc(x), x\n\n"
        "class PerToken(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(8, 10)\n    def forward(self, x):\n        return self.fc(x.reshape(-1, 8, 8))\n\n"
        "class Ragged(torch.utils.data.Dataset):\n    def __len__(self):\n        return 100\n"
        "    def __getitem__(self, i):\n        return torch.zeros(64 if i % 2 else 32)\n\n"
        "def ragged():\n    return Ragged()\n\n"
        "class Empty(torch.utils.data.IterableDataset):\n    def __iter__(self):\n        return iter(())\n\n"
        "def empty_stream():\n    return Empty()\n\n"
        "class FixedBatch(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n    def forward(self, x):\n"
        "        return self.fc(x.reshape(int(x.shape[0]), 64))\n\n"
        "class ConvWide(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(16, 20)\n"
        "    def forward(self, x):\n        h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8)))\n"
        "        return self.fc(torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))\n\n"
        "class Float64(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10).double()\n    def forward(self, x):\n"
        "        return self.fc(x.double()).float()\n\n"
        "class Endless(torch.utils.data.IterableDataset):\n    def __iter__(self):\n"
        "        while True:\n            yield torch.zeros(64), 0\n\n"
        "def endless():\n    return Endless()\n\n"
        "class Reshuffled(torch.utils.data.IterableDataset):\n    def __iter__(self):\n"
        "        for i in torch.randperm(200).tolist():\n            yield torch.full((64,), float(i)), i % 10\n\n"
        "def reshuffled():\n    return Reshuffled()\n\n"
        "def pairs():\n    return ((torch.zeros(64), i % 10) for i in range(100))\n\n"
        "class Tokens(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(50, 64)\n        self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, ids):\n        return self.fc(self.emb(ids).mean(1))\n\n"
        "class Bag(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.emb = torch.nn.EmbeddingBag(50, 64)\n        self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, ids):\n        return self.fc(self.emb(ids))\n\n"
        "class IdRows(torch.utils.data.Dataset):  # 2,000 rows of 6 ids for Tokens; row bad holds id 77 (beyond its 50)\n"
        "    def __init__(self, bad, labelled=True):\n        self.bad, self.labelled = bad, labelled\n"
        "    def __len__(self):\n        return 2000\n"
        "    def __getitem__(self, i):\n        ids = torch.arange(6) + i % 40\n        ids[2] = 77 if i == self.bad else ids[2]\n"
        "        return (ids, i % 10) if self.labelled else ids\n\n"
        "class IdStream(torch.utils.data.IterableDataset):\n"
        "    def __init__(self, bad, labelled=True):\n        self.bad, self.labelled = bad, labelled\n"
        "    def __iter__(self):\n        rows = IdRows(self.bad, self.labelled)\n        return (rows[i] for i in range(len(rows)))\n\n"
        "class HalfIdRows(IdRows):  # row 1,999 (a training batch) as floats, one of them 2.5\n"
        "    def __getitem__(self, i):\n        ids, label = super().__getitem__(i)\n"
        "        return (ids.float() + 0.5 * (torch.arange(6) == 3), label) if i == 1999 else (ids, label)\n\n"
        "def triple():\n    x = torch.zeros(100, 64)\n    return x, torch.zeros(100, dtype=torch.long), x\n\n"
        "def ids_unlabelled_stream_bad_at_1995():\n    return IdStream(1995, labelled=False)\n\n"
        "def ids_dataset_one_not_whole():\n    return HalfIdRows(None)\n\n"
        "def ids_dataset_bad_at_3():\n    return IdRows(3)\n\n"
        "def ids_stream_bad_at_700():\n    return IdStream(700)\n\n"
        "def ids_stream_bad_at_1500():\n    return IdStream(1500)\n\n"
        "def ids_stream_bad_at_1999():\n    return IdStream(1999)\n\n"
        "class ExitingRows(torch.utils.data.Dataset):  # 2,000 digits-shaped rows; item 1,999 calls sys.exit(0)\n"
        "    def __len__(self):\n        return 2000\n"
        "    def __getitem__(self, i):\n        if i == 1999:\n            sys.exit(0)\n"
        "        return torch.full((64,), float(i % 7)), i % 10\n\n"
        "class ExitingStream(torch.utils.data.IterableDataset):\n"
        "    def __iter__(self):\n        rows = ExitingRows()\n        return (rows[i] for i in range(len(rows)))\n\n"
        "class ExitingLength(ExitingStream):\n    def __len__(self):\n        sys.exit(0)\n\n"
        "def exiting_length():\n    return ExitingLength()\n\n"
        "def exiting_rows():\n    return ExitingRows()\n\n"
        "def exiting_stream():\n    return ExitingStream()\n\n"
        "class ExitsInTraining(torch.nn.Module):  # its forward calls sys.exit(0) on its 10th call in training mode\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc1 = torch.nn.Linear(64, 256)\n"
        "        self.fc = torch.nn.Linear(256, 10)\n        self.calls = 0\n"
        "    def forward(self, x):\n        self.calls += self.training\n        if self.calls == 10:\n            sys.exit(0)\n"
        "        return self.fc(torch.relu(self.fc1(x)))\n")
    ids = np.random.default_rng(0).integers(0, 50, (300, 12))
    beyond = ids.copy()
    beyond[250, 3] = 60
    fractional = ids.astype(np.float32)
    fractional[7, 0] = 1.5
    np.savez(d / "ids_beyond_vocabulary.npz", x=beyond, y=ids[:, 0] % 10)
    np.savez(d / "ids_not_whole.npz", x=fractional, y=ids[:, 0] % 10)
    np.savez(d / "ids_int32.npz", x=ids.astype(np.int32), y=ids[:, 0] % 10)
    np.savez(d / "misnamed_split.npz", x=x[:300], y=y[:300], x_valid=x[300:], y_valid=y[300:])
    np.savez_compressed(d / "bomb.npz", x=np.zeros((200_000, 64), np.float32))  # 51 MB of zeros in ~50 KB
    np.savez(d / "val_without_labels.npz", x=x, y=y, x_val=x[:50])
    (d / "shards_mixed").mkdir()
    np.save(d / "shards_mixed" / "a.npy", x)
    np.save(d / "shards_mixed" / "b.npy", x[:, :32])
    (d / "shards_bytes_and_floats").mkdir()
    np.save(d / "shards_bytes_and_floats" / "a.npy", x)
    np.save(d / "shards_bytes_and_floats" / "b.npy", x.astype(np.uint8))
    (d / "shards_empty").mkdir()
    (d / "shards_zero_width").mkdir()
    np.save(d / "shards_zero_width" / "a.npy", np.empty((300_000_000, 0), np.float32))  # 128 bytes claiming 3e8 rows
    (d / "shards_orphan_labels").mkdir()
    np.save(d / "shards_orphan_labels" / "a.npy", x)
    np.save(d / "shards_orphan_labels" / "a.y.npy", y)
    np.save(d / "shards_orphan_labels" / "b.y.npy", y)
    (d / "o.fixclf.resume.pt").write_bytes(b"not a resume state")
    (d / "dir.fixclf.resume.pt").mkdir()  # and a FIFO, piped.fixclf.resume.pt, in each case's copy
    (d / "text.npz").write_text("x,y\n1,2\n")
    laughs = [0] * 1000  # "billion laughs": 1000**4 values from a few KB of shared references
    for _ in range(3):
        laughs = [laughs] * 1000
    deep: list = []
    for _ in range(200):
        deep = [deep]
    torch.save({**_sample_state(), "format": laughs}, d / "laughs.pt")
    torch.save({**_sample_state(), "kwargs": {"hidden": deep}}, d / "deep.pt")
    digits_arrays = np.load(SAMPLES / "digits.npz")
    torch.save({"x": torch.from_numpy(digits_arrays["x"]), "y": torch.from_numpy(digits_arrays["y"]), "notes": laughs},
               d / "laughs_data.pt")
    torch.save({"x": digits_arrays["x"], "y": digits_arrays["y"]}, d / "numpy_in.pt")
    for name, width in (("pair", 64), ("per_token", 8), ("fixed_batch", 64), ("float64", 64)):
        torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(width, 10).state_dict().items()}, d / f"{name}.pt")
    torch.save({f"{name}.{k}": v for name, shape in (("fc1", (64, 256)), ("fc", (256, 10)))
                for k, v in torch.nn.Linear(*shape).state_dict().items()}, d / "exits.pt")
    torch.save({"emb.weight": torch.randn(50, 64), **{f"fc.{k}": v for k, v in torch.nn.Linear(64, 10).state_dict().items()}},
               d / "tokens.pt")
    shutil.copy(d / "tokens.pt", d / "bag.pt")
    torch.save({"conv.weight": torch.randn(4, 1, 3, 3), "conv.bias": torch.zeros(4),
                **{f"fc.{k}": v for k, v in torch.nn.Linear(16, 20).state_dict().items()}}, d / "conv_wide.pt")
    _write_hostile_checkpoints(d, compressed)


def _lying_shard(path: Path) -> None:
    """An .npz shard whose x header claims 10^12 rows of 64 floats over 1 KB of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 64)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(1024))


def _write_hostile_checkpoints(d: Path, compressed: dict) -> None:
    sample = _sample_state()
    state, kwargs = sample["state_dict"], sample["kwargs"]
    gadget = {"arch": "subprocess:run", "kwargs": {"args": ["touch", CANARY]}}
    _fixclf({"format": MODEL_FORMAT, "arch": "compressor.checkpoint:build_arch", "kwargs": gadget, "state_dict": {}},
            d / "gadget.pt")
    _fixclf({"format": MODEL_FORMAT, "arch": "subprocess:run", "kwargs": {"args": ["touch", CANARY]}, "state_dict": {}},
            d / "foreign_call.pt")
    _fixclf({**sample, "data": "tempfile:mkdtemp"}, d / "data_code.pt")
    _fixclf({**sample, "data": "../../etc/passwd.npz"}, d / "data_escape.pt")
    _fixclf({**sample, "data": "/etc/hosts.npz"}, d / "data_absolute.pt")
    _fixclf({**sample, "data": 5}, d / "data_int.pt")
    _fixclf({**sample, "arch": 123}, d / "arch_int.pt")
    _fixclf({**sample, "state_dict": [1, 2, 3]}, d / "state_list.pt")
    _fixclf({**sample, "kwargs": {**kwargs, "hidden": torch.tensor([512, 512])}}, d / "kwargs_tensor.pt")
    _fixclf({**sample, "kwargs": {**kwargs, "hidden": [10**6] * 3}}, d / "kwargs_huge.pt")
    _fixclf({**sample, "kwargs": {**kwargs, "unknown": 1}}, d / "kwargs_unknown.pt")
    _fixclf({**sample, "format": "fixclf.model/99"}, d / "format_future.pt")
    nan_state = {k: v.clone() for k, v in state.items()}
    nan_state["2.weight"][0, 0] = float("nan")
    _fixclf({**sample, "state_dict": nan_state}, d / "nan_weights.pt")
    disguised = nan_state["2.weight"].fill_(float("nan"))
    disguised.is_floating_point = set  # weights-only unpickling restores it: every check of the values would skip it
    _fixclf({**sample, "state_dict": nan_state}, d / "nan_disguised.pt")
    broadcast = dict(state, **{"2.weight": torch.zeros(1).expand(512, 512)})
    _fixclf({**sample, "state_dict": broadcast}, d / "broadcast.pt")
    linear = torch.nn.Linear(3, 10)
    _fixclf({"format": MODEL_FORMAT, "arch": "compressor.zoo:mlp", "kwargs": {"in_features": 64, "hidden": [3],
             "num_classes": 10}, "state_dict": mlp(64, [3], 10).state_dict()}, d / "narrow_hidden.pt")
    torch.save(linear.state_dict(), d / "linear3.pt")
    _fixclf({"format": MODEL_FORMAT, "arch": "compressor.zoo:mlp", "kwargs": {"in_features": 64, "hidden": [-5],
             "num_classes": 10}, "state_dict": mlp(64, [3], 10).state_dict()}, d / "negative_width.pt")
    (d / "nodata").mkdir()
    shutil.copy(SAMPLES / "mlp.pt", d / "nodata" / "mlp.pt")  # names digits.npz beside it, which is not there
    np.savez(d / "objects.npz", x=np.array([{"pixels": 1}] * 8, dtype=object), y=np.zeros(8, dtype=np.int64))
    (d / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(64))  # an ONNX protobuf's first bytes
    inf_state = {k: v.clone() for k, v in compressed["state_dict"].items()}
    next(v for v in inf_state.values() if v.is_floating_point())[0] = float("inf")
    plan = compressed["plan"]
    perm_key = next(k for k in compressed["state_dict"] if k.endswith("permutations"))
    perm = compressed["state_dict"][perm_key]
    bad_perm = perm.clone()
    bad_perm.view(-1)[0] = 10**6
    for name, value in {
        "c_report_empty": {**compressed, "report": {}},
        "c_report_list": {**compressed, "report": [1, 2]},
        "c_plan_str": {**compressed, "plan": "x", "report": {}},
        "c_plan_missing_layer": {**compressed, "plan": [{**plan[0], "name": "nope"}, *plan[1:]]},
        "c_plan_depth": {**compressed, "plan": [{**plan[0], "options": {**plan[0]["options"], "depth": 10**6}}, *plan[1:]]},
        "c_plan_kind": {**compressed, "plan": [{**plan[0], "kind": "compressor.checkpoint:build_arch"}, *plan[1:]]},
        "c_plan_options_str": {**compressed, "plan": [{**plan[0], "options": "x"}, *plan[1:]]},
        "c_gadget": {**compressed, "arch": "compressor.checkpoint:build_arch", "kwargs": gadget},
        "c_inf": {**compressed, "state_dict": inf_state},
        "c_missing_fields": {"format": COMPRESSED_FORMAT, "arch": "compressor.zoo:mlp", "state_dict": {}},
        "c_perm_out_of_range": {**compressed, "state_dict": {**compressed["state_dict"], perm_key: bad_perm}},
        "c_meta_tensor": {**compressed, "state_dict": {**compressed["state_dict"], perm_key: perm.to("meta")}},
        "c_report_huge_number": {**compressed, "report": {**compressed["report"], "seconds": 10**400}},
        "c_report_many_layers": {**compressed, "report": {**compressed["report"],
                                                          "layers": compressed["report"]["layers"] * 3000}},
        "c_report_shared_text": {**compressed, "report": {**compressed["report"], "layers": [
            dict(compressed["report"]["layers"][0], name="A" * 4096, reason="A" * 4096)] * 4096}},
        "c_report_hidden_text": {**compressed, "report": {**compressed["report"], "options": {  # past the first 8,192
            **compressed["report"]["options"], "exclude": [0] * 8192 + ["A" * 2**20] * 4}}},  # entries, 1 MB strings
        "c_zero_classes": {**compressed, "kwargs": {**compressed["kwargs"], "num_classes": 0}},
        "c_intact": compressed,
    }.items():
        _fixclf(value, d / f"{name}.fixclf.pt")
    n = 1 << 20  # a 4 KB file planning ACDC layers 2^20 wide, 64 deep, with none of their weights
    bomb = [{"name": str(2 * i), "role": "hidden", "in_features": n, "out_features": n, "params_before": 1,
             "kind": "acdc", "options": {"seed": i, "bias": True, "depth": 64}, "params_after": 0, "reason": ""}
            for i in range(4)]
    bomb.append({"name": "8", "role": "head", "in_features": n, "out_features": 10, "params_before": 1,
                 "kind": "hadamard", "options": {"seed": 0, "bias": True}, "params_after": 0, "reason": ""})
    _fixclf({**compressed, "kwargs": {"in_features": n, "hidden": [n] * 4, "num_classes": 10}, "state_dict": {},
             "plan": bomb}, d / "c_bomb.fixclf.pt")
    (d / "data_code_file.py").write_text(f"open({CANARY!r}, 'w').close()\nx = None\n")
    _fixclf({**sample, "data": "data_code_file:x.npz"}, d / "data_module.pt")  # a module name dressed as a file
    _fixclf({**sample, "data": "fifo.npz"}, d / "data_fifo.pt")  # the FIFOs are made in each case's copy
    (d / "shards_lie").mkdir()
    _lying_shard(d / "shards_lie" / "a.npz")
    (d / "shards_fifo").mkdir()
    np.save(d / "shards_fifo" / "a.npy", np.zeros((8, 64), np.float32))
    shutil.copy(SAMPLES / "mlp.pt", d / "exists.fixclf.pt")
    os.link(d / "mlp.pt", d / "hardlink.pt")
    (d / "data_link.pt").symlink_to(d / "d.pt")


C = "compress"
CASES: dict[str, tuple[list[str], int]] = {
    # code from a checkpoint: must never run (canary), refused as a checkpoint error
    "arch gadget in a fixclf checkpoint": (["plan", "gadget.pt"], 3),
    "arch outside the allow-list": (["plan", "foreign_call.pt"], 3),
    "arch gadget through compress": ([C, "gadget.pt", "--data", "digits.npz"], 3),
    "arch gadget in a compressed checkpoint (export)": (["export", "c_gadget.fixclf.pt", "-o", "o.onnx"], 3),
    "data field naming code": ([C, "data_code.pt"], 3),
    "data field escaping its directory": ([C, "data_escape.pt"], 3),
    "data field absolute": ([C, "data_absolute.pt"], 3),
    "data field naming a module next to the checkpoint as if a file": (["plan", "data_module.pt"], 3),
    "data field naming a module, checkpoint given as ./": ([C, "./data_module.pt"], 3),
    "compressed plan of huge layers without their weights (memory bomb)": (["export", "c_bomb.fixclf.pt", "-o",
                                                                             "o.onnx", "--data", "digits.npz"], 3),
    "bundled data that is a FIFO": (["plan", "data_fifo.pt"], 4),
    "a shard whose header claims 10^12 rows": ([C, "mlp.pt", "--data", "shards_lie"], 4),
    "permutation buffer out of range": (["export", "c_perm_out_of_range.fixclf.pt", "-o", "o.onnx"], 3),
    "meta tensor in a compressed checkpoint": (["export", "c_meta_tensor.fixclf.pt", "-o", "o.onnx"], 3),
    "report number of 400 digits": (["report", "c_report_huge_number.fixclf.pt"], 3),
    "report of 9000 layers": (["report", "c_report_many_layers.fixclf.pt"], 3),
    "report of 4096 rows sharing one long string": (["report", "c_report_shared_text.fixclf.pt"], 3),
    "report whose options hide long strings after 8,192 entries": (["report", "c_report_hidden_text.fixclf.pt", "--json"], 3),
    "compressed checkpoint whose stored kwargs build no classes": (["export", "c_zero_classes.fixclf.pt", "-o", "o.onnx"], 3),
    "--arch-kwargs building the model on the meta device": ([C, "linear3.pt", "--arch", "torch.nn:Linear", "--arch-kwargs",
                                                             '{"in_features": 3, "out_features": 10, "device": "meta"}',
                                                             "--data", "digits.npz"], 3),
    "output a dangling symbolic link": ([C, "mlp.pt", "-o", "dangling.fixclf.pt"], 8),
    "--arch-kwargs nested 3000 deep": (["plan", "weights.pt", "--arch", "compressor.zoo:mlp", "--arch-kwargs",
                                        '{"a": ' + "[" * 3000 + "]" * 3000 + "}"], 2),
    "no command at all": ([], 2),
    "--data that is a FIFO": ([C, "mlp.pt", "--data", "fifo.npz"], 4),
    "a FIFO among the shards": ([C, "mlp.pt", "--data", "shards_fifo"], 4),
    "a shard of 3e8 rows of zero features (128 bytes)": ([C, "mlp.pt", "--data", "shards_zero_width"], 4),
    "malicious pickle": ([C, "evil.pt"], 3),
    "protocol-0 pickle calling os.system": (["plan", "evil0.pt"], 3),
    "legacy (PyTorch < 1.6) checkpoint calling os.system after its tensors": (["plan", "evil_legacy.pt"], 3),
    "legacy checkpoint truncated in its tensor bytes": (["plan", "legacy_truncated.pt"], 3),
    "zip checkpoint holding an object": (["plan", "evil_zip.pt"], 3),
    # malformed fields
    "arch=123": (["plan", "arch_int.pt"], 3),
    "state_dict=[1,2,3]": (["plan", "state_list.pt"], 3),
    "data=5": ([C, "data_int.pt"], 3),
    "tensor in kwargs": (["plan", "kwargs_tensor.pt"], 3),
    "kwargs asking for a huge model": (["plan", "kwargs_huge.pt"], 3),
    "unknown kwargs": (["plan", "kwargs_unknown.pt"], 3),
    "unknown format version": (["plan", "format_future.pt"], 3),
    "NaN weights": (["plan", "nan_weights.pt"], 3),
    "NaN weights in a tensor whose is_floating_point the file replaced": (["plan", "nan_disguised.pt"], 3),
    "broadcast tensor larger than its data": (["plan", "broadcast.pt"], 3),
    "report={}": (["report", "c_report_empty.fixclf.pt"], 3),
    "report=[1,2]": (["report", "c_report_list.fixclf.pt"], 3),
    "plan='x'": (["export", "c_plan_str.fixclf.pt", "-o", "o.onnx", "--data", "digits.npz"], 3),
    "plan naming a missing layer": (["export", "c_plan_missing_layer.fixclf.pt", "-o", "o.onnx", "--data", "digits.npz"], 3),
    "plan with depth 10**6": (["export", "c_plan_depth.fixclf.pt", "-o", "o.onnx", "--data", "digits.npz"], 3),
    "plan naming an unknown kind": (["export", "c_plan_kind.fixclf.pt", "-o", "o.onnx", "--data", "digits.npz"], 3),
    "plan options not a mapping": (["export", "c_plan_options_str.fixclf.pt", "-o", "o.onnx", "--data", "digits.npz"], 3),
    "infinite weights in a compressed checkpoint": (["export", "c_inf.fixclf.pt", "-o", "o.onnx", "--data", "digits.npz"], 3),
    "compressed checkpoint missing fields": (["report", "c_missing_fields.fixclf.pt"], 3),
    "dangling symlink as report input": (["report", "dangling.fixclf.pt"], 3),
    # unreadable or wrong checkpoints
    "missing file": ([C, "nope.pt"], 3),
    "directory": ([C, "folder"], 3),
    "empty file": ([C, "empty.pt"], 3),
    "truncated checkpoint": ([C, "truncated.pt"], 3),
    "checkpoint of shared references ('billion laughs')": (["plan", "laughs.pt"], 3),
    "checkpoint nested 200 deep": (["report", "deep.pt"], 3),
    "random bytes": ([C, "random.pt"], 3),
    "an ONNX file as the checkpoint": (["report", "model.onnx"], 3),
    "a FIFO as the checkpoint": (["report", "fifo.pt"], 3),
    "stored kwargs that do not build the architecture": ([C, "negative_width.pt", "--data", "digits.npz"], 3),
    "state_dict without --arch": ([C, "weights.pt", "--data", "digits.npz"], 3),
    "a checkpoint fixclf already compressed": ([C, "c_intact.fixclf.pt", "--data", "digits.npz"], 5),
    "plan --objective latency with no data to time on": (["plan", "weights.pt", "--arch", "compressor.zoo:mlp",
                                                          "--arch-kwargs", '{"hidden": [512, 512]}', "--objective",
                                                          "latency"], 2),
    "state_dict with an epoch and a note among its tensors": (["plan", "weights_and_epoch.pt", "--arch",
                                                               "compressor.zoo:mlp"], 3),
    "--arch that does not match": ([C, "weights.pt", "--arch", "compressor.zoo:small_cnn", "--data", "digits.npz"], 3),
    "--arch-kwargs other than a checkpoint's stored kwargs": (["plan", "mlp.pt", "--arch", "compressor.zoo:mlp",
                                                               "--arch-kwargs", '{"hidden": [64]}'], 3),
    "--arch-kwargs other than a compressed checkpoint's (export)": (["export", "c_intact.fixclf.pt", "-o", "o.onnx",
                                                                      "--data", "digits.npz", "--arch",
                                                                      "compressor.zoo:mlp", "--arch-kwargs",
                                                                      '{"hidden": [64, 64]}'], 3),
    "--arch that does not import": ([C, "weights.pt", "--arch", "no_such_pkg.models:net"], 3),
    "--arch factory calling sys.exit(0)": (["plan", "weights.pt", "--arch", "hostile_code:net"], 3),
    "whole pickled model without --trust-pickle": ([C, "pickled.pt", "--data", "digits.npz"], 3),
    "truncated compressed checkpoint": (["report", "truncated.pt"], 3),
    "report of a dense checkpoint": (["report", "mlp.pt"], 3),
    # data
    "user checkpoint without --data": ([C, "weights.pt", "--arch", "compressor.zoo:mlp", "--arch-kwargs",
                                        '{"hidden": [512, 512]}'], 4),
    "wrong data feature size": ([C, "mlp.pt", "--data", "narrow.npz"], 4),
    "data a reshaping model regroups into fewer rows": ([C, "cnn.pt", "--data", "narrow.npz"], 4),
    "labels out of range": ([C, "mlp.pt", "--data", "badlabels.npz"], 4),
    "token ids beyond the model's vocabulary (row 250)": ([C, "tokens.pt", "--arch", "hostile_code:Tokens", "--data",
                                                          "ids_beyond_vocabulary.npz"], 4),
    **{name: ([C, "tokens.pt", "--arch", "hostile_code:Tokens", "--data", f"hostile_code:{function}"], 4) for name, function in {
        "token id beyond the vocabulary in a Dataset's calibration rows": "ids_dataset_bad_at_3",
        "token id beyond the vocabulary in a stream's held-out rows the run holds": "ids_stream_bad_at_700",
        "token id beyond the vocabulary in a stream's held-out rows met only in evaluation": "ids_stream_bad_at_1500",
        "token id beyond the vocabulary in a stream's training batch": "ids_stream_bad_at_1999",
        "token id beyond the vocabulary in an unlabelled stream's held-out rows met only in scoring":
            "ids_unlabelled_stream_bad_at_1995",
        "token ids in a Dataset item of floats, one not whole": "ids_dataset_one_not_whole"}.items()},
    "--data function returning a tuple of 3": ([C, "mlp.pt", "--data", "hostile_code:triple"], 4),
    "Dataset item calling sys.exit(0) late": ([C, "mlp.pt", "--data", "hostile_code:exiting_rows", "--epochs", "1"], 4),
    "stream item calling sys.exit(0) late": ([C, "mlp.pt", "--data", "hostile_code:exiting_stream", "--epochs", "1"], 4),
    "stream whose len() calls sys.exit(0)": ([C, "mlp.pt", "--data", "hostile_code:exiting_length", "--epochs", "1"], 4),
    "model forward calling sys.exit(0) in training": (
        [C, "exits.pt", "--arch", "hostile_code:ExitsInTraining", "--data", "digits.npz", "--epochs", "1"], 3),
    "token ids stored as floats, one not whole": (["plan", "tokens.pt", "--arch", "hostile_code:Tokens", "--data",
                                                   "ids_not_whole.npz"], 4),
    "a held-out split under a name fixclf does not read (x_valid)": ([C, "mlp.pt", "--data", "misnamed_split.npz"], 4),
    "int32 token ids into an nn.EmbeddingBag (the exporter lowers it for int64)": (
        [C, "bag.pt", "--arch", "hostile_code:Bag", "--data", "ids_int32.npz"], 7),
    "one-hot labels": ([C, "mlp.pt", "--data", "onehot.npz"], 4),
    "NaN in data": ([C, "mlp.pt", "--data", "nan.npz"], 4),
    "data file of shared references ('billion laughs')": ([C, "mlp.pt", "--data", "laughs_data.pt"], 4),
    ".pt data file of numpy arrays": ([C, "mlp.pt", "--data", "numpy_in.pt"], 4),
    "missing data file": ([C, "mlp.pt", "--data", "nowhere.npz"], 4),
    "data file the checkpoint names is missing": ([C, "nodata/mlp.pt"], 4),
    "object arrays in the data": ([C, "mlp.pt", "--data", "objects.npz"], 4),
    "--data function raising SystemExit": ([C, "mlp.pt", "--data", "hostile_code:data"], 4),
    "--data function returning a generator of pairs": ([C, "mlp.pt", "--data", "hostile_code:pairs"], 4),
    "compressed data unpacking to 1000x its size": ([C, "mlp.pt", "--data", "bomb.npz"], 4),
    "x_val without y_val next to labelled x": ([C, "mlp.pt", "--data", "val_without_labels.npz"], 4),
    "shard directory with rows of two shapes": ([C, "mlp.pt", "--data", "shards_mixed"], 4),
    "empty shard directory": ([C, "mlp.pt", "--data", "shards_empty"], 4),
    "shard labels without their rows": ([C, "mlp.pt", "--data", "shards_orphan_labels"], 4),
    "shard directory with uint8 and float shards": ([C, "mlp.pt", "--data", "shards_bytes_and_floats"], 4),
    "Dataset with items of two shapes": ([C, "mlp.pt", "--data", "hostile_code:ragged"], 4),
    "empty IterableDataset": ([C, "mlp.pt", "--data", "hostile_code:empty_stream"], 4),
    "IterableDataset that never ends, --max-time": ([C, "mlp.pt", "--data", "hostile_code:endless", "--max-time", "0.5"], 4),
    "IterableDataset that reshuffles every pass": ([C, "mlp.pt", "--data", "hostile_code:reshuffled"], 4),
    "a text file named .npz": ([C, "mlp.pt", "--data", "text.npz"], 4),
    "model whose forward runs in float64": ([C, "float64.pt", "--arch", "hostile_code:Float64", "--data", "digits.npz"], 4),
    # plans that cannot be built (these used to hang)
    "model without Linear layers": (["plan", "conv.pt", "--arch", "torch.nn:Conv2d", "--arch-kwargs",
                                     '{"in_channels": 1, "out_channels": 4, "kernel_size": 3}'], 5),
    "Hadamard head with more classes than codes (3 -> 10 Linear)": (
        ["plan", "linear3.pt", "--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 3, "out_features": 10}'], 5),
    "Hadamard head after a 3-wide hidden layer": ([C, "narrow_hidden.pt", "--data", "digits.npz"], 5),
    "empty include match": ([C, "mlp.pt", "--include", "features.*"], 5),
    "model returning a tuple": ([C, "pair.pt", "--arch", "hostile_code:Pair", "--data", "digits.npz"], 5),
    "only Linear a head of more classes than features, behind a convolution": (
        [C, "conv_wide.pt", "--arch", "hostile_code:ConvWide", "--data", "digits.npz"], 5),
    "model whose forward fixes the batch size": ([C, "fixed_batch.pt", "--arch", "hostile_code:FixedBatch", "--data",
                                                 "digits.npz"], 7),
    "labels for a model returning per-token logits": ([C, "per_token.pt", "--arch", "hostile_code:PerToken", "--data",
                                                       "digits.npz"], 4),
    # fine-tuning
    "NaN during fine-tune": ([C, "mlp.pt", "--lr", "1e30", "--epochs", "2"], 6),
    # outputs: inputs are never overwritten, --force or not
    "output equals input": ([C, "mlp.pt", "-o", "mlp.pt"], 8),
    "output is the data file, --force": ([C, "mlp.pt", "--data", "d.pt", "-o", "d.pt", "--force"], 8),
    "output is a link to the data file, --force": ([C, "mlp.pt", "--data", "d.pt", "-o", "data_link.pt", "--force"], 8),
    "output is a hard link to the checkpoint, --force": ([C, "mlp.pt", "-o", "hardlink.pt", "--force"], 8),
    "existing output without --force": ([C, "mlp.pt", "-o", "exists.fixclf.pt"], 8),
    "output name too long": ([C, "mlp.pt", "-o", "x" * 260 + ".pt"], 8),
    "ONNX name beside the output too long": ([C, "mlp.pt", "-o", "x" * 252 + ".pt"], 8),  # .pt fits, .onnx does not
    "output directory missing": ([C, "mlp.pt", "-o", "no/such/dir/out.pt"], 8),
    # usage errors: exit 2 before any work
    "unknown head": ([C, "mlp.pt", "--head", "triangular"], 2),
    "unknown hidden": (["plan", "mlp.pt", "--hidden", "lowrank"], 2),
    "unknown init": ([C, "mlp.pt", "--init", "random"], 2),
    "depth 0": (["plan", "mlp.pt", "--depth", "0"], 2),
    "depth 10**6": (["plan", "mlp.pt", "--depth", "1000000"], 2),
    "depth for Fastfood, which has none": (["plan", "mlp.pt", "--hidden", "fastfood", "--depth", "3"], 2),
    "seed overflow": ([C, "mlp.pt", "--seed", "18446744073709551616"], 2),
    "negative seed": (["plan", "mlp.pt", "--seed", "-1"], 2),
    "epochs -1": ([C, "mlp.pt", "--epochs", "-1"], 2),
    "epochs abc (click's own error)": ([C, "mlp.pt", "--epochs", "abc"], 2),
    "lr -1": ([C, "mlp.pt", "--lr", "-1"], 2),
    "lr nan": ([C, "mlp.pt", "--lr", "nan"], 2),
    "lr inf": ([C, "mlp.pt", "--lr", "inf"], 2),
    "max-time 0": ([C, "mlp.pt", "--max-time", "0"], 2),
    "tolerance -1": ([C, "mlp.pt", "--tolerance", "-1"], 2),
    "latency-batch 0": ([C, "mlp.pt", "--latency-batch", "0"], 2),
    "quantize int4": ([C, "mlp.pt", "--quantize", "int4"], 2),
    "export quantize int4": (["export", "mlp.pt", "-o", "m.onnx", "--quantize", "int4"], 2),
    "device tpu": ([C, "mlp.pt", "--device", "tpu"], 2),
    "batch size 0": ([C, "mlp.pt", "--batch-size", "0"], 2),
    "precision fp8": ([C, "mlp.pt", "--precision", "fp8"], 2),
    "export with both int8 and fp16": (["export", "mlp.pt", "-o", "m.onnx", "--quantize", "int8", "--precision", "fp16"], 2),
    "--save-every without --resume": ([C, "mlp.pt", "--save-every", "10"], 2),
    "--resume over a file that is not a resume state": ([C, "mlp.pt", "--resume", "-o", "o.fixclf.pt"], 2),
    "--resume where a directory holds the resume state's name": ([C, "mlp.pt", "--resume", "-o", "dir.fixclf.pt"], 8),
    "--resume where a FIFO holds the resume state's name": ([C, "mlp.pt", "--resume", "-o", "piped.fixclf.pt"], 8),
    "--arch-kwargs without --arch": ([C, "mlp.pt", "--arch-kwargs", '{"hidden": [512, 512]}'], 2),
    "bad --arch-kwargs JSON": (["plan", "weights.pt", "--arch", "compressor.zoo:mlp", "--arch-kwargs", "{hidden:"], 2),
    "--arch-kwargs not an object": (["plan", "weights.pt", "--arch", "compressor.zoo:mlp", "--arch-kwargs", "[1]"], 2),
    "output not .pt": ([C, "mlp.pt", "-o", "out.onnx"], 2),
    "export to a non-onnx name": (["export", "mlp.pt", "-o", "model.txt"], 2),
    "missing argument": ([C], 2),
    "unknown option": (["plan", "mlp.pt", "--bogus"], 2),
    "unknown command": (["squash", "mlp.pt"], 2),
    "whole pickled model without --arch": ([C, "pickled.pt", "--trust-pickle", "--data", "digits.npz"], 2),
}


def tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) with its hash; links by their target."""
    result = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_symlink():
            result[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            result[rel] = sha256(path)
        elif path.is_dir():
            result[rel] = "dir"
    return result


def _case_dir(template: Path, root: Path, name: str) -> Path:
    """A private copy of the inputs for one case (links re-pointed into the copy, the hard link kept one)."""
    workdir = root / f"case{len(list(root.iterdir()))}"
    shutil.copytree(template, workdir, symlinks=True)
    for link in ("dangling.fixclf.pt", "data_link.pt"):
        target = Path(os.readlink(workdir / link)).name
        (workdir / link).unlink()
        (workdir / link).symlink_to(workdir / target)
    (workdir / "hardlink.pt").unlink()
    os.link(workdir / "mlp.pt", workdir / "hardlink.pt")
    os.mkfifo(workdir / "fifo.npz")  # a pipe nobody writes to: opening it would block forever
    os.mkfifo(workdir / "fifo.pt")
    os.mkfifo(workdir / "shards_fifo" / "b.npy")
    os.mkfifo(workdir / "piped.fixclf.resume.pt")
    return workdir


def run_cases(template: Path, root: Path, cases: dict[str, list[str]], fsize: int | None = None,
              prepare: Callable[[Path], None] | None = None) -> dict[str, dict]:
    """Every case in its own process (forked from one that imported fixclf), its own copy of the inputs
    (with ``prepare``'s additions, made before the snapshot a case's result is compared with)."""
    root.mkdir(exist_ok=True)
    dirs = {name: _case_dir(template, root, name) for name in cases}
    for directory in dirs.values():
        if prepare is not None:
            prepare(directory)
    logs = root.parent / f"{root.name}-logs"
    logs.mkdir()
    befores = {name: tree(d) for name, d in dirs.items()}
    requests = {name: {"args": args, "cwd": str(dirs[name]), "out": str(logs / f"{i}.out"),
                       "err": str(logs / f"{i}.err"), "fsize": fsize} for i, (name, args) in enumerate(cases.items())}
    codes = run_many(requests)
    return {name: {"code": codes[name], "stderr": Path(requests[name]["err"]).read_text(),
                   "stdout": Path(requests[name]["out"]).read_text(), "before": befores[name],
                   "after": tree(dirs[name]), "canary": (dirs[name] / CANARY).exists()} for name in cases}


def assert_clean_failure(result: dict, expected_code: int) -> None:
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == expected_code, result["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert result["after"] == result["before"]  # inputs byte-identical, nothing new, nothing left behind
    assert not result["canary"]
