"""Data sources: files, shard directories, Datasets, streams; deterministic disjoint hold-out;
batches split among processes exactly as one process would see them; validation against the model."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from compressor.checkpoint import load_model
from compressor.data import HOLDOUT_FRACTION, _StreamSource, check_against_model, load_data, training_batch_count
from compressor import CompressOptions, FinetuneOptions, SourceOptions, compress
from compressor.errors import DataError, OutputError, UsageError
from conftest import SAMPLES


def _all(data, split):
    xs, ys = zip(*data.batches(split, 100))
    return torch.cat(xs), torch.cat(ys) if ys[0] is not None else None


def test_npz_with_validation_split_is_used_as_given():
    data = load_data(SAMPLES / "digits.npz")
    raw = np.load(SAMPLES / "digits.npz")
    x_val, y_val = _all(data, "val")
    assert torch.equal(x_val, torch.from_numpy(raw["x_val"])) and torch.equal(y_val, torch.from_numpy(raw["y_val"]))
    assert data.has_labels and data.train_rows == len(raw["x"]) and data.val_rows == len(raw["x_val"])


def test_module_function_and_pt_sources_hold_out_deterministically(tmp_path):
    a = load_data("data_source:digits", seed=3)
    b = load_data("data_source:digits", seed=3)
    assert torch.equal(_all(a, "val")[0], _all(b, "val")[0])
    n = a.train_rows + a.val_rows
    assert a.val_rows == round(HOLDOUT_FRACTION * n)
    x_train, y_train = _all(a, "train")
    torch.save({"x": x_train, "y": y_train}, tmp_path / "d.pt")
    c = load_data(tmp_path / "d.pt")
    assert c.train_rows + c.val_rows == a.train_rows


def _rows_as_set(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


@pytest.mark.parametrize("spec", ["data_source:items", "data_source:stream", "shards-npy", "shards-npz"])
def test_every_source_kind_gives_disjoint_complete_splits(tmp_path, spec):
    raw = np.load(SAMPLES / "digits.npz")
    if spec.startswith("shards"):
        for i, part in enumerate(np.array_split(np.arange(len(raw["x"])), 5)):
            if spec == "shards-npy":
                np.save(tmp_path / f"part{i}.npy", raw["x"][part])
                np.save(tmp_path / f"part{i}.y.npy", raw["y"][part])
            else:
                np.savez(tmp_path / f"part{i}.npz", x=raw["x"][part], y=raw["y"][part])
        spec = str(tmp_path)
    data = load_data(spec, seed=1)
    (x_train, _), (x_val, _) = _all(data, "train"), _all(data, "val")
    assert data.has_labels and x_train.shape[1:] == (64,)
    assert not _rows_as_set(x_train) & _rows_as_set(x_val)
    assert x_train.shape[0] + x_val.shape[0] == len(raw["x"])
    assert data.training_rows() == x_train.shape[0]
    again = load_data(spec, seed=1)
    assert torch.equal(_all(again, "val")[0], x_val)
    assert check_against_model(data, load_model(SAMPLES / "mlp.pt").model) == 10


@pytest.mark.parametrize("spec", ["data_source:digits", "data_source:stream"])
def test_processes_together_see_exactly_the_single_process_batches(spec):
    data = load_data(spec)
    alone = list(data.batches("train", 64, epoch=3, seed=7))
    split = [list(data.batches("train", 64, epoch=3, seed=7, rank=r, world=3)) for r in range(3)]
    assert all(len(chunks) == len(alone) for chunks in split)
    for step, (x, y) in enumerate(alone):
        assert torch.equal(torch.cat([split[r][step][0] for r in range(3)]), x)
        assert torch.equal(torch.cat([split[r][step][1] for r in range(3)]), y)
    resumed = list(data.batches("train", 64, epoch=3, seed=7, skip=5))
    assert torch.equal(resumed[0][0], alone[5][0])


class _Rows(torch.utils.data.IterableDataset):
    def __init__(self, x):
        self.x = x

    def __iter__(self):
        return iter(torch.from_numpy(self.x))


@pytest.mark.parametrize("rows, batch, world", [(129, 64, 1), (130, 64, 2), (131, 64, 2), (67, 64, 3), (65, 8, 4),
                                                (5, 64, 1), (20, 1, 1), (40, 2, 2), (50, 5, 3)])
def test_no_training_batch_gives_a_process_one_row(tmp_path, rows, batch, world):
    """BatchNorm cannot train on one row: an epoch's last, partial batch that would give a process one
    row is left out (unless it is the only batch), for arrays and streams alike, and the step count the
    schedule is sized by says so."""
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    np.savez(tmp_path / "d.npz", x=x, x_val=x[:3])
    for data in (load_data(tmp_path / "d.npz"), _StreamSource(_Rows(x), "stream", (), 0)):
        trained = data.training_rows()
        chunks = [list(data.batches("train", batch, epoch=1, rank=r, world=world)) for r in range(world)]
        assert all(len(mine) == training_batch_count(trained, batch, world) for mine in chunks)
        sizes = [x.shape[0] for mine in chunks for x, _ in mine]
        assert 1 not in sizes or trained < batch or batch < 2 * world  # full batches are the user's choice
        assert 0 <= trained - sum(sizes) < 2 * world and (trained % batch or trained == sum(sizes))


@pytest.mark.parametrize("spec", ["data_source:digits", "shards-npz"])
def test_mixup_partners_are_rows_of_the_batch_and_the_same_for_any_number_of_processes(tmp_path, spec):
    if spec == "shards-npz":
        raw = np.load(SAMPLES / "digits.npz")
        for i, part in enumerate(np.array_split(np.arange(len(raw["x"])), 4)):
            np.savez(tmp_path / f"part{i}.npz", x=raw["x"][part], y=raw["y"][part])
        spec = str(tmp_path)
    data = load_data(spec)
    alone = list(data.batches("train", 64, epoch=2, seed=5, mix=True))
    split = [list(data.batches("train", 64, epoch=2, seed=5, rank=r, world=3, mix=True)) for r in range(3)]
    for step, (x, y, partners) in enumerate(alone):
        batch_rows = _rows_as_set(x)
        assert _rows_as_set(partners.x) <= batch_rows and partners.x.shape == x.shape  # partners from the batch
        assert partners.y.shape == y.shape and bool(((partners.weight >= 0) & (partners.weight < 1)).all())
        assert not torch.equal(partners.x, x)  # a permutation, not the identity
        for field in ("x", "y", "weight"):
            joined = torch.cat([getattr(split[r][step][2], field) for r in range(3) if split[r][step][2] is not None])
            assert torch.equal(joined, getattr(partners, field)), field
    resumed = next(iter(data.batches("train", 64, epoch=2, seed=5, skip=3, mix=True)))
    assert torch.equal(resumed[2].weight, alone[3][2].weight)
    plain = next(iter(data.batches("train", 64, epoch=2, seed=5)))
    assert len(plain) == 2 and torch.equal(plain[0], alone[0][0])


def test_streams_are_not_mixed_and_compress_refuses_mixup_on_them(tmp_path):
    x, y, partners = next(iter(load_data("data_source:stream").batches("train", 32, epoch=1, mix=True)))
    assert partners is None and x.shape[0] == 32
    options = CompressOptions(SourceOptions(SAMPLES / "mlp.pt", data="data_source:stream"),
                              finetune=FinetuneOptions(epochs=1, mixup=True), output=tmp_path / "m.fixclf.pt")
    with pytest.raises(UsageError, match="--mixup"):
        compress(options)
    assert not list(tmp_path.iterdir())


def test_a_stream_is_counted_only_after_the_outputs_are_checked(tmp_path, monkeypatch):
    """The default budget counts the training rows (one pass over a stream): not before an existing
    output has been refused."""
    (tmp_path / "m.fixclf.pt").write_bytes(b"mine")
    monkeypatch.setattr("compressor.data._StreamSource.training_rows",
                        lambda self: pytest.fail("the stream was counted before the output check"))
    options = CompressOptions(SourceOptions(SAMPLES / "mlp.pt", data="data_source:stream"), output=tmp_path / "m.fixclf.pt")
    with pytest.raises(OutputError, match="--force"):
        compress(options)
    assert (tmp_path / "m.fixclf.pt").read_bytes() == b"mine"


def test_epochs_are_shuffled_differently_and_reproducibly():
    data = load_data("data_source:digits")
    first = lambda epoch: next(iter(data.batches("train", 64, epoch=epoch, seed=0)))[0]  # noqa: E731
    assert not torch.equal(first(1), first(2)) and torch.equal(first(2), first(2))


def test_labels_are_optional(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.rand(50, 64).astype(np.float32))
    data = load_data(tmp_path / "x.npz")
    assert not data.has_labels and _all(data, "val")[1] is None
    assert check_against_model(data, load_model(SAMPLES / "mlp.pt").model) == 10


def test_selection_rows_are_used_whenever_given(tmp_path):
    """x_select/y_select set the --max-drop decision rows, with or without x_val; none of them train."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 16)).astype(np.float32), rng.integers(0, 5, 200)
    np.savez(tmp_path / "select.npz", x=x, y=y, x_select=x[:20] + 1, y_select=y[:20])
    data = load_data(tmp_path / "select.npz", selection=True)
    assert torch.equal(_all(data, "select")[0], torch.from_numpy(x[:20] + 1))
    assert data.train_rows + data.val_rows == 200
    np.savez(tmp_path / "few.npz", x=x, y=y, x_select=x[:19], y_select=y[:19])
    with pytest.raises(DataError, match="x_select has 19 row\\(s\\).* at least 20"):
        load_data(tmp_path / "few.npz", selection=True)
    np.savez(tmp_path / "small.npz", x=x[:45], y=y[:45])  # 36 training rows: 20 set aside would leave 16
    with pytest.raises(DataError, match="36 training rows are too few to set 20 aside"):
        load_data(tmp_path / "small.npz", selection=True)
    assert load_data(tmp_path / "small.npz").train_rows == 36
    np.savez(tmp_path / "enough.npz", x=x[:50], y=y[:50])
    assert load_data(tmp_path / "enough.npz", selection=True).train_rows == 20
    np.savez(tmp_path / "wrong.npz", x=x, y=y, x_select=x[:20], y_select=y[:20] + 20)  # the wrong array named
    with pytest.raises(DataError, match=r"labels y_select range over \[20, 24\] but the model has 5 classes"):
        check_against_model(load_data(tmp_path / "wrong.npz", selection=True), torch.nn.Linear(16, 5))


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "missing.npz")
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(DataError, match="key 'x'"):
        load_data(tmp_path / "nox.npz")
    np.savez(tmp_path / "float_labels.npz", x=np.zeros((4, 64), np.float32), y=np.array([0.5, 1, 2, 3]))
    with pytest.raises(DataError, match="integer"):
        load_data(tmp_path / "float_labels.npz")
    np.savez(tmp_path / "half.npz", x=np.zeros((4, 64), np.float32), y=np.arange(4), x_val=np.zeros((2, 64), np.float32))
    with pytest.raises(DataError, match="only one of"):
        load_data(tmp_path / "half.npz")
    np.savez(tmp_path / "half_select.npz", x=np.zeros((4, 64), np.float32), y=np.arange(4), y_select=np.arange(2))
    with pytest.raises(DataError, match="y_select is given without x_select"):
        load_data(tmp_path / "half_select.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npy or .npz shards"):
        load_data(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a.npy", np.zeros((3, 64), np.float32))
    np.save(tmp_path / "mixed" / "b.npy", np.zeros((3, 32), np.float32))
    with pytest.raises(DataError, match="different shapes"):
        load_data(tmp_path / "mixed")


@pytest.mark.parametrize("spec", ["data_source:requiring_grad", "data_source:big_endian", "data_source:big_endian_items"])
def test_tensors_that_require_grad_and_arrays_in_the_other_byte_order_are_read_as_their_values(spec):
    """Data is values: a tensor that requires grad is detached (it failed at the export as 'cannot be
    exported'), a big-endian array converted (it was 'not a numeric array')."""
    data, expected = load_data(spec, seed=0), load_data("data_source:digits", seed=0)
    for split in ("train", "val"):
        (x, y), (x0, y0) = _all(data, split), _all(expected, split)
        assert not x.requires_grad and torch.equal(x, x0) and torch.equal(y, y0)


def test_a_dataset_too_long_to_shuffle_by_index_is_a_data_error():
    with pytest.raises(DataError, match=r"has 4,611,686,018,427,387,904 items, more than fixclf shuffles by index .*"
                                        r"return an IterableDataset \(streamed\)"):
        load_data("data_source:vast")


def test_data_messages_name_the_real_problem(tmp_path):
    """A one-logit model's 0/1 labels are not the problem (its single logit is); a label count that
    differs from the row count is not one-hot labels; an id beyond the vocabulary is not a dtype."""
    from compressor.errors import PlanError

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    np.savez(tmp_path / "binary.npz", x=x, y=rng.integers(0, 2, 40))
    np.savez(tmp_path / "short.npz", x=x, y=rng.integers(0, 2, 35))
    ids = rng.integers(0, 20, (40, 12))
    ids[:, 0] = 500
    np.savez(tmp_path / "ids.npz", x=ids, y=rng.integers(0, 10, 40))
    one_logit = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with pytest.raises(PlanError, match="give a one-logit binary model a second logit"):
        check_against_model(load_data(str(tmp_path / "binary.npz")), one_logit)
    with pytest.raises(DataError, match="40 rows but 35 labels; give one label per row"):
        load_data(str(tmp_path / "short.npz"))
    np.savez(tmp_path / "column.npz", x=x, y=np.arange(40)[:, None] % 3)  # (N, 1) class indices: taken as they are
    column = load_data(str(tmp_path / "column.npz"))
    labels = torch.cat([_all(column, "train")[1], _all(column, "val")[1]])
    assert labels.ndim == 1 and sorted(labels.tolist()) == sorted((np.arange(40) % 3).tolist())
    tokens = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    with pytest.raises(DataError, match=r"as integers \(token ids\) do not fit the model \(IndexError: index out of range"):
        check_against_model(load_data(str(tmp_path / "ids.npz")), tokens)


def test_checkpoint_and_data_layouts_from_training_code_get_the_fix(tmp_path):
    """What training scripts commonly save: x_train/y_train arrays, a {'state_dict', 'epoch'} dict, a
    DistributedDataParallel or torch.compile state_dict (keys 'module.*', '_orig_mod.*'): the layouts are
    taken as they are where that is unambiguous, else the error line says what to change."""
    from compressor.errors import CheckpointError
    from compressor.zoo import mlp

    np.savez(tmp_path / "named.npz", x_train=np.zeros((10, 64), np.float32), y_train=np.zeros(10, np.int64))
    with pytest.raises(DataError, match=r"it has 'x_train', 'y_train'; rename the arrays \(x_train -> x"):
        load_data(str(tmp_path / "named.npz"))
    state = mlp(64, [32], 10).state_dict()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "training.pt")
    with pytest.raises(CheckpointError, match=r"training checkpoint .*torch.save\(checkpoint\['state_dict'\]"):
        load_model(tmp_path / "training.pt")
    # DDP / DataParallel, torch.compile, both, and a training framework's attribute (Lightning's self.model)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "model.", "module.net.", "model._orig_mod."):
        torch.save({f"{prefix}{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
        for arch in ("compressor.zoo:mlp", "data_source:mlp_of"):  # built in (checked on meta first), and the user's
            loaded = load_model(tmp_path / "wrapped.pt", arch=arch, arch_kwargs={"hidden": [32]}).model.state_dict()
            assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    for wrapping in ("data_source:compiled_mlp_of", "data_source:data_parallel_mlp_of"):  # a factory returning the wrapper
        loaded = load_model(tmp_path / "wrapped.pt", arch=wrapping, arch_kwargs={"hidden": [32]}).model
        assert isinstance(loaded, torch.nn.Sequential) and loaded.state_dict().keys() == state.keys()
    torch.save({**{f"model.{k}": v for k, v in state.items()}, "model.extra": state["0.bias"]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"4 of the model's keys missing, e.g. '0.bias'; 5 keys the model does "
                                              r"not have, e.g. 'model.0.bias'"):
        load_model(tmp_path / "other.pt", arch="data_source:mlp_of", arch_kwargs={"hidden": [32]})


def test_integer_rows_go_to_a_model_as_float32_unless_it_takes_them_only_as_stored(tmp_path):
    """Integer rows: float32 to a model that takes floats, as stored to one that answers otherwise as stored
    (it converts its own bytes; with a note) or takes them only so (int32 ids into an nn.Embedding)."""
    class ScalesBytes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.float() / 255 if x.dtype == torch.uint8 else x)

    class Ids(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = torch.nn.Embedding(256, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.embed(x).mean(1))

    rows = np.random.default_rng(0).integers(0, 256, (40, 4))
    np.savez(tmp_path / "bytes.npz", x=rows.astype(np.uint8))
    np.savez(tmp_path / "ids.npz", x=rows.astype(np.int32))
    for model, file, dtype, noted in ((ScalesBytes(), "bytes.npz", torch.uint8, True),
                                      (torch.nn.Linear(4, 3), "bytes.npz", torch.float32, False),
                                      (Ids(), "ids.npz", torch.int32, False)):
        data = load_data(tmp_path / file)
        check_against_model(data, model)
        assert data.input_dtype == dtype and data.mixable == dtype.is_floating_point
        assert bool(data.notes) == noted
        assert next(iter(data.batches("train", 8)))[0].dtype == dtype


def test_a_damaged_npz_archive_is_a_data_error(tmp_path):
    """A zip whose central directory is damaged (it still looks like a zip) is refused by name, not 'unexpected'."""
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 4), np.float32), y=np.zeros(8, np.int64))
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    header = raw.index(b"PK\x01\x02")
    raw[header:header + 4] = b"XX\x01\x02"
    (tmp_path / "d.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="damaged zip archive"):
        load_data(str(tmp_path / "d.npz"))


def test_the_bounded_walk_counts_every_visit_of_shared_references_exactly(tmp_path):
    """The refusal of a pickled structure counts what a naive walk would visit (shared references each
    time they are reached, a dict's keys and values, the container itself), but costs only the distinct
    objects: 1000^4 visits are counted exactly, at once. A reference cycle is refused; depth is bounded."""
    from pathlib import Path

    from compressor.pickles import MAX_DEPTH, _check_bounded

    def refusal(obj, limit: int) -> str | None:
        try:
            _check_bounded(obj, Path("f.pt"), DataError, limit, "advice", plain_tensors=True)
        except DataError as exc:
            return str(exc)
        return None

    laughs, visits = [0] * 1000, 1001
    for _ in range(3):
        laughs, visits = [laughs] * 1000, 1 + 1000 * visits
    assert visits > 10**12 and refusal(laughs, visits) is None
    assert "more than" in refusal(laughs, visits - 1)
    table = {"a": [1, 2], "b": [1, 2]}  # 1 + 2 keys + 2 x (list + 2 items)
    assert refusal(table, 9) is None and refusal(table, 8) is not None
    cycle: list = []
    cycle.append([cycle])
    assert "more than 100 values" in refusal({"x": cycle}, 100)
    deep: list = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert refusal(deep, 100) is None and f"deeper than {MAX_DEPTH}" in refusal([deep], 100)


class _FirstItems(torch.utils.data.IterableDataset):
    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        for i in range(self.count):
            yield torch.full((64,), float(i)), i % 10


def one_item():
    return _FirstItems(1)


def four_items():
    return _FirstItems(4)


@pytest.mark.parametrize("spec, seed, refused", [("test_data:one_item", 0, True), ("test_data:one_item", 2, True),
                                                 ("test_data:four_items", 4, True), ("test_data:four_items", 3, False),
                                                 ("test_data:four_items", 0, False)])
def test_a_stream_too_short_for_both_splits_is_a_data_error(spec, seed, refused):
    """Item i of a stream is held out when i % 5 == seed % 5: a stream must reach that item and one more."""
    if refused:
        with pytest.raises(DataError, match="yields \\d item\\(s\\).* at least \\d are needed"):
            load_data(spec, seed=seed)
    else:
        data = load_data(spec, seed=seed)
        assert data.head("train", 8)[0].shape[0] == 3 and data.head("val", 8)[0].shape[0] == 1


@pytest.mark.parametrize("label", [lambda i: i, np.int64, lambda i: np.array(i), lambda i: np.array([i]), lambda i: torch.tensor(i)])
def test_dataset_items_label_as_int_numpy_scalar_or_array_alike(label):
    from compressor.data import _collate

    items = [(np.full(4, i, np.float32), label(i)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it builds a tensor from a list of numpy arrays
        x, y = _collate(items, True, "items")
    assert torch.equal(y, torch.arange(3)) and x.shape == (3, 4)


def test_arrays_named_as_another_split_are_refused_and_other_extra_arrays_are_not(tmp_path):
    x, y = np.zeros((20, 4), np.float32), np.arange(20) % 2
    np.savez(tmp_path / "extra.npz", x=x, y=y, x_mean=x.mean(0), y_names=np.array(["a", "b"]))
    assert load_data(tmp_path / "extra.npz").has_labels
    np.savez(tmp_path / "keras.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    with pytest.raises(DataError, match=r"'x_test', 'y_test' are not among the arrays fixclf reads"):
        load_data(tmp_path / "keras.npz")


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_a_shard_replaced_during_the_run_is_a_data_error_naming_it(tmp_path, kind):
    """Shards are read when their rows are needed: one rewritten since the run began (here with fewer rows)
    is refused by name, not an IndexError from rows it no longer has, nor a SIGBUS from the memory map of
    the shard in use."""
    raw = np.load(SAMPLES / "digits.npz")
    x, y = raw["x"][:600], raw["y"][:600]

    def write(name: str, rows: slice) -> None:
        if kind == "npy":
            np.save(tmp_path / f"{name}.npy", x[rows])
            np.save(tmp_path / f"{name}.y.npy", y[rows])
        else:
            np.savez(tmp_path / f"{name}.npz", x=x[rows], y=y[rows])

    write("a", slice(0, 300))
    write("b", slice(300, 600))
    data = load_data(tmp_path, seed=0)
    assert _all(data, "train")[0].shape[0] == data.training_rows()
    write("b", slice(300, 350))
    with pytest.raises(DataError, match=r"shard b\.np[yz] changed during the run"):
        _all(data, "train")
    data = load_data(tmp_path, seed=0)  # a shard in use, rewritten in place: its memory map would end the process
    next(iter(data.batches("train", 10 ** 4, epoch=1)))
    write("a", slice(0, 30))
    write("b", slice(300, 330))
    with pytest.raises(DataError, match=r"shard [ab]\.np[yz] changed during the run"):
        _all(data, "train")



class _Shrinking(_Rows):
    """Rows that lose their last row on every pass, as a stream reading a file being truncated would."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(torch.from_numpy(self.x[:len(self.x) - self.passes]))


class _Promising(_Rows):
    def __len__(self):
        return len(self.x) + 20


@pytest.mark.parametrize("stream, said", [(_Promising, "gave 80 training items where its len\\(\\) promised 96"),
                                          (_Shrinking, "gave 77 training items where the pass before gave 78")])
def test_a_stream_whose_item_count_differs_from_its_len_or_from_pass_to_pass_is_a_data_error(stream, said):
    """The fine-tune's steps and schedule are sized by the training item count: a pass that yields another
    number of items than len() promised, or than the pass before, is refused rather than trained on."""
    data = _StreamSource(stream(np.arange(100 * 2, dtype=np.float32).reshape(100, 2)), "stream", (), 0)
    data.training_rows()
    with pytest.raises(DataError, match=f"a pass over the stream {said}"):
        list(data.batches("train", 16, epoch=1))
