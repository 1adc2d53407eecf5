"""Fine-tuning data: where samples come from, the held-out split, and batches for one or many processes.

``--data`` accepts

* an ``.npz`` or ``.pt`` file (``.pt`` read with weights_only) holding ``x`` (N, ...), optional
  integer labels ``y`` (N,) and an optional validation split ``x_val`` / ``y_val``: read into memory;
* a **directory of shards**, read lazily: ``NAME.npy`` files hold ``x`` rows and are memory-mapped,
  each with optional labels in ``NAME.y.npy``; ``NAME.npz`` files hold ``x`` (and ``y``) and are
  read one shard at a time. Shards are taken in name order;
* ``package.module:function`` returning such a dict (or a tuple ``(x, y)``), or a
  ``torch.utils.data.Dataset`` (read item by item; items ``x``, ``(x,)``, ``(x, y)`` or ``{"x", "y"}``), or an
  ``IterableDataset`` (streamed: one pass per epoch; it must be finite and yield the same items in
  the same order every pass, as a file reader does: the first items of every pass are checked).

A stream's length (to size the learning-rate schedule) is its ``len()`` when it defines one, else
counted by one reading pass before training (which fails after ``--max-time`` seconds, when given).

Rows are fed to the model as float32, except integer rows (token ids) that the model takes only as they
are stored (:func:`check_against_model` decides once, on two rows).

Memory bound: arrays from files and functions are held in memory; a shard directory holds one
``.npz`` shard (``.npy`` shards are paged in by the OS) plus one batch; a ``Dataset`` holds what
its items hold; an ``IterableDataset`` holds one batch. Calibration (:data:`CALIBRATION_ROWS`),
ONNX validation and latency rows are the first rows of a split, held in memory.

Held-out rows: the given ``x_val`` split, else a seeded, deterministic :data:`HOLDOUT_FRACTION` of
the rows (at most :data:`HOLDOUT_MAX`), disjoint from the training rows. For an
``IterableDataset`` (no random access) item ``i`` is held out when ``i % 5 == seed % 5`` (the
first :data:`HOLDOUT_MAX` such items). Labels are optional everywhere. Nothing here downloads
anything.

Batches (:meth:`DataSource.batches`): the training rows are shuffled per epoch (epoch e's order is the
e-th draw of a generator seeded with ``seed``) (shard directories: shards shuffled, then rows within each shard, so
one shard is read at a time), cut into *global* batches of ``batch_size`` rows, and each global
batch is split into ``world`` contiguous chunks, one per process: the processes of a
``torchrun`` job together see exactly the batches one process would, except that an epoch's last,
partial batch that would give one of them a single row is left out (:func:`training_batch_count`).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .pickles import PickleLimits, check_unpacked_size, load_bounded
from .errors import DataError, PlanError
from .references import call_user_code, import_reference, is_reference
from .trace import check_classes

__all__ = ["HOLDOUT_FRACTION", "HOLDOUT_MAX", "DataSource", "load_data", "check_against_model", "check_labels",
           "dtype_name", "training_batch_count", "SPLIT_WORDS"]

HOLDOUT_FRACTION = 0.2
HOLDOUT_MAX = 10_000
USER_CODE_FAILURES = (Exception, SystemExit, GeneratorExit)
"""What the user's data code (a Dataset's ``__getitem__``, a stream's ``__iter__``) may raise and fixclf
turns into one data error: ``sys.exit`` included, which would otherwise end fixclf with its code and
no message. (Ctrl-C, KeyboardInterrupt, stays an interruption.)"""
SPLIT_WORDS = {"train": "training", "val": "held-out", "select": "selection"}
"""Each split's name as a message says it."""
SELECTION_FRACTION = 0.1  # of the training rows, for decisions (--max-drop) when no x_select is given
SELECTION_MIN_ROWS = 20  # fewer rows measure accuracy in steps of more than 5 pp: no basis for a pp budget
MAX_INDEXED_ROWS = 2**28  # a map-style Dataset's rows are shuffled by index (8 bytes a row): 2 GB at this size
STREAM_HOLDOUT_EVERY = 5  # an IterableDataset holds out one item in five
STREAM_SAME_ITEMS = 4  # the first items of every pass of a stream are checked against the first pass
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
NUMERIC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, *INTEGER_DTYPES, torch.bool)
DATA_LIMITS = PickleLimits(unpack_ratio=200, pickle_bytes=64 << 20, items=10_000_000)
"""A data file: a compressed .npz of real data unpacks a few times its size (zeros thousands of times);
a .pt file's pickled structure may hold x as nested lists (7M floats: 64 MB, about 7 s to read)."""
LABELS_SUFFIX = ".y.npy"

Rows = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class MixPartners:
    """Mixup distillation (``FinetuneOptions.mixup``): each training row r of a batch trains as
    ``w_r x_r + (1 - w_r) x_p(r)``, p a random permutation of the global batch (so about one row a
    batch is its own partner) and w_r ~ U(0, 1), both drawn from (seed, epoch, batch number) over
    the *global* batch, so that N processes mix exactly as one does. ``x`` / ``y``: the partners' rows (M, ...) and labels; ``weight``: w (M,)."""

    x: torch.Tensor
    y: torch.Tensor | None
    weight: torch.Tensor


MixedRows = tuple[torch.Tensor, "torch.Tensor | None", "MixPartners | None"]


def _tensor(value) -> torch.Tensor:
    """``value`` as a tensor of values only: detached from any autograd graph (data never needs one), and
    an array in the other byte order (``>f4`` on this machine) converted, since torch holds native order."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    array = np.asarray(value)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.as_tensor(array)


def _as_tensor(value, name: str, source: str) -> torch.Tensor:
    """A dense real tensor backed by its own data (no broadcast views, sparse, quantised or meta tensors)."""
    try:
        tensor = _tensor(value)
    except Exception as exc:
        raise DataError(f"{source}: {name} is not a numeric array ({type(value).__name__} of "
                        f"{getattr(getattr(value, 'dtype', None), 'name', '?')}); give numbers") from exc
    if (tensor.layout is not torch.strided or tensor.is_quantized or tensor.device.type != "cpu"
            or tensor.is_complex() or tensor.dtype not in NUMERIC_DTYPES):
        raise DataError(f"{source}: {name} is a {tensor.layout} {tensor.dtype} tensor on {tensor.device}; give a dense "
                        "real array")
    if tensor.numel() and tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
        raise DataError(f"{source}: {name} is a broadcast view larger than its data; save a real array")
    return tensor


def _checked_rows(x: torch.Tensor, y: torch.Tensor | None, name: str, source: str) -> Rows:
    """``x`` as (N, ...) rows, integers as stored (:func:`check_against_model` decides how the model is
    fed them), anything else as finite float32; ``y`` as int64 (N,) class indices."""
    if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise DataError(f"{source}: {name} must be (samples, features...) with at least one sample and one feature, got "
                        f"shape {tuple(x.shape)}")
    if x.dtype not in INTEGER_DTYPES:
        x = x.float()  # checked after the cast: 1e300 in float64 is infinite in float32
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{source}: {name} contains NaN or infinite values; clean the data first")
    if y is not None:
        if y.ndim == 2 and y.shape[1] == 1:  # a column of class indices (what y.reshape(-1, 1) or a DataFrame gives)
            y = y[:, 0]
        if y.ndim == 1 and y.shape[0] != x.shape[0]:
            raise DataError(f"{source}: {name} has {x.shape[0]} rows but {y.shape[0]} labels; give one label per row")
        if y.ndim != 1:
            raise DataError(f"{source}: labels for {name} must be integer class indices of shape ({x.shape[0]},), got shape "
                            f"{tuple(y.shape)}; convert one-hot or probability labels with y.argmax(1)")
        if torch.is_floating_point(y) and not (torch.isfinite(y).all() and torch.equal(y, y.round())):
            raise DataError(f"{source}: labels must be integer class indices, not fractions; pass y as integers")
        y = y.long()
    return x, y


def _mix_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one global batch's mixup draws (:class:`MixPartners`)."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + batch) % (1 << 63)


def _split_for_rank(rows: int, rank: int, world: int) -> slice:
    """This process's contiguous chunk of a global batch of ``rows`` rows."""
    per = -(-rows // world)
    return slice(min(rows, rank * per), min(rows, (rank + 1) * per))


def _leaves_a_process_one_row(rows: int, world: int) -> bool:
    """Whether splitting a global batch of ``rows`` among ``world`` processes gives one of them exactly
    one row (BatchNorm cannot train on one row)."""
    return any(part.stop - part.start == 1 for part in (_split_for_rank(rows, rank, world) for rank in range(world)))


def _dropped_tail(full_batches: int, tail: int, world: int) -> bool:
    """Whether an epoch's last, partial training batch of ``tail`` rows is left out: when it would give a
    process exactly one row (BatchNorm layers that train, ``--update-norm-stats``, fail on one row,
    whatever the data's size) and it is not the epoch's only batch. Arrays are reshuffled every epoch,
    so no row is always the one left out; a stream leaves out the same last items."""
    return full_batches > 0 and _leaves_a_process_one_row(tail, world)


def training_batch_count(rows: int, batch_size: int, world: int = 1) -> int:
    """The global batches (optimiser steps) of one epoch of ``rows`` training rows."""
    full, tail = divmod(rows, batch_size)
    return full + int(tail > 0 and not _dropped_tail(full, tail, world))


# --- row stores: random access to rows by index --------------------------------------------------------------


class _Store:
    """Rows by index. ``rows``: how many; ``labelled``: whether rows carry labels."""

    rows: int
    labelled: bool

    def fetch(self, index: torch.Tensor) -> Rows:
        raise NotImplementedError

    def shuffled(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``index`` in a random order (a store may keep rows that live together close together)."""
        return index[torch.randperm(index.numel(), generator=generator)]


class _ArrayStore(_Store):
    def __init__(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.x, self.y = x, y
        self.rows, self.labelled = x.shape[0], y is not None

    def fetch(self, index: torch.Tensor) -> Rows:
        return self.x[index], None if self.y is None else self.y[index]


class _ShardStore(_Store):
    """A directory of ``.npy`` (memory-mapped) or ``.npz`` (one resident shard) files."""

    def __init__(self, directory: Path, source: str) -> None:
        self.source = source
        self.x_files = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".npz")
                              and not p.name.endswith(LABELS_SUFFIX))
        for shard in self.x_files:
            _regular_file(shard, source)
        if not self.x_files:
            raise DataError(f"--data {source}: the directory holds no .npy or .npz shards; put x rows in NAME.npy "
                            f"(labels in NAME{LABELS_SUFFIX}) or NAME.npz (x, y)")
        if len({p.suffix for p in self.x_files}) > 1:
            raise DataError(f"--data {source}: mixes .npy and .npz shards; use one kind")
        rows_of = {p.name[:-len(LABELS_SUFFIX)] + ".npy" for p in directory.iterdir() if p.name.endswith(LABELS_SUFFIX)}
        orphans = sorted(rows_of - {p.name for p in self.x_files})
        if orphans:  # labels whose rows are missing: a shard lost or misnamed, which would otherwise go unnoticed
            raise DataError(f"--data {source}: {orphans[0][:-4]}{LABELS_SUFFIX} has no {orphans[0]} beside it; restore or "
                            f"rename the shard's rows (NAME.npy with labels in NAME{LABELS_SUFFIX})")
        headers = [self._header(p) for p in self.x_files]
        shapes = [shape for shape, _ in headers]
        if len({s[1:] for s in shapes}) > 1:
            raise DataError(f"--data {source}: shards hold rows of different shapes {sorted({s[1:] for s in shapes})}; "
                            "give every shard rows of one shape")
        stored_as = {dtype.name if dtype.kind in "iu" else "floating point" for _, dtype in headers}
        if len(stored_as) > 1:  # integer rows may reach the model as stored (check_against_model): all or none
            raise DataError(f"--data {source}: shards store x as {', '.join(sorted(stored_as))}; store every shard's x "
                            "alike")
        labelled = [self._has_labels(p) for p in self.x_files]
        if len(set(labelled)) > 1:
            raise DataError(f"--data {source}: some shards have labels and some do not; label all or none")
        self.labelled = labelled[0]
        self.stamps = [self._stamps(i) for i in range(len(self.x_files))]
        self.sizes = torch.tensor([s[0] for s in shapes])
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.rows = int(self.sizes.sum())
        self._resident: tuple[int, Rows] | None = None

    def _header(self, path: Path) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of a shard's x, read from its header."""
        try:
            if path.suffix == ".npy":
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                shape, dtype = array.shape, array.dtype
            else:
                check_unpacked_size(path, DATA_LIMITS.unpack_ratio, DataError)
                with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                    stored = archive.getinfo("x.npy").file_size
                # the header must not claim more than the member holds: a lying header would make fixclf
                # allocate what the file never had
                if math.prod(shape) * dtype.itemsize > stored:
                    raise DataError(f"--data {self.source}: shard {path.name} claims shape {tuple(shape)} but holds "
                                    f"{stored:,} bytes; the shard is damaged")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"--data {self.source}: cannot read shard {path.name} ({type(exc).__name__}); shards are "
                            ".npy arrays or .npz files with x (and y)") from exc
        if len(shape) < 2 or shape[0] == 0 or math.prod(shape[1:]) == 0:
            raise DataError(f"--data {self.source}: shard {path.name} has shape {shape}; rows must be (samples, features...)"
                            " with at least one sample and one feature")
        return tuple(shape), np.dtype(dtype)

    def _has_labels(self, path: Path) -> bool:
        if path.suffix == ".npy":
            labels = path.with_name(path.stem + LABELS_SUFFIX)
            _regular_file(labels, self.source)
            return labels.is_file()
        with zipfile.ZipFile(path) as archive:
            return "y.npy" in archive.namelist()

    def _files(self, i: int) -> list[Path]:
        """Shard ``i``'s files: its rows, and its labels when they are a file of their own."""
        path = self.x_files[i]
        return [path, path.with_name(path.stem + LABELS_SUFFIX)] if path.suffix == ".npy" and self.labelled else [path]

    def _stamps(self, i: int) -> list[tuple[int, int, int] | None]:
        """(inode, size, modification time) of shard ``i``'s files; None for one that is gone."""
        stamps = []
        for path in self._files(i):
            try:
                stat = path.stat()
                stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                stamps.append(None)
        return stamps

    def _shard(self, i: int) -> Rows:
        """Shard ``i``'s rows (memory-mapped for .npy; the last .npz shard read stays resident), after
        checking that its files are those the run began with: rows read from a memory-mapped file that
        was rewritten in place would end the process (SIGBUS) or be other rows."""
        if self._stamps(i) != self.stamps[i]:
            raise DataError(f"--data {self.source}: shard {self.x_files[i].name} changed during the run (rewritten, "
                            "replaced or removed since it began); leave the data as it is while fixclf runs, then run "
                            "again")
        if self._resident is not None and self._resident[0] == i:
            return self._resident[1]
        path = self.x_files[i]
        try:
            if path.suffix == ".npy":
                x = np.load(path, mmap_mode="r", allow_pickle=False)
                y = np.load(path.with_name(path.stem + LABELS_SUFFIX), allow_pickle=False) if self.labelled else None
            else:
                with np.load(path, allow_pickle=False) as npz:
                    x, y = npz["x"], (npz["y"] if self.labelled else None)
        except Exception as exc:
            raise DataError(f"--data {self.source}: cannot read shard {path.name} ({type(exc).__name__}); the shard is "
                            "damaged: write it again with numpy.save / numpy.savez") from exc
        if y is not None and (y.ndim != 1 or y.shape[0] != x.shape[0]):
            raise DataError(f"--data {self.source}: shard {path.name} has {x.shape[0]} rows but labels of shape {y.shape}")
        self._resident = (i, (x, y))
        return x, y

    def fetch(self, index: torch.Tensor) -> Rows:
        shard_of = torch.searchsorted(self.starts, index, right=True) - 1
        xs, ys = [], []
        for shard in shard_of.unique_consecutive().tolist():
            local = (index[shard_of == shard] - self.starts[shard]).numpy()
            x, y = self._shard(shard)
            xs.append(_as_tensor(np.ascontiguousarray(x[local]), "x", self.source))
            ys.append(None if y is None else _as_tensor(np.asarray(y[local]), "y", self.source))
        name = self.x_files[int(shard_of[0])].name
        return _checked_rows(torch.cat(xs), None if ys[0] is None else torch.cat(ys), name, self.source)

    def shuffled(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Shards in a random order, then rows in a random order within each shard."""
        shard_of = torch.searchsorted(self.starts, index, right=True) - 1
        parts = []
        for shard in torch.randperm(len(self.x_files), generator=generator).tolist():
            rows = index[shard_of == shard]
            parts.append(rows[torch.randperm(rows.numel(), generator=generator)])
        return torch.cat(parts)


class _ItemStore(_Store):
    """A map-style ``torch.utils.data.Dataset``: items ``x``, ``(x,)``, ``(x, y)`` or ``{"x", "y"}``."""

    def __init__(self, dataset, source: str) -> None:
        self.dataset, self.source = dataset, source
        try:
            self.rows = len(dataset)
        except USER_CODE_FAILURES as exc:
            raise DataError(f"--data {source}: the Dataset has no usable len() ({type(exc).__name__}); define __len__ "
                            "or return an IterableDataset") from exc
        if not isinstance(self.rows, int) or self.rows < 1:
            raise DataError(f"--data {source}: the Dataset is empty; give it samples")
        if self.rows > MAX_INDEXED_ROWS:
            raise DataError(f"--data {source}: the Dataset has {self.rows:,} items, more than fixclf shuffles by index "
                            f"({MAX_INDEXED_ROWS:,}); return an IterableDataset (streamed) or a Subset of it")
        self.labelled = _item_parts(self._item(0), source)[1] is not None

    def _item(self, i: int):
        try:
            return self.dataset[i]
        except USER_CODE_FAILURES as exc:
            raise DataError(f"--data {self.source}: reading item {i} failed ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:120]})") from exc

    def fetch(self, index: torch.Tensor) -> Rows:
        return _collate([self._item(i) for i in index.tolist()], self.labelled, self.source)


def _item_parts(item, source: str) -> tuple[object, object | None]:
    """An item's (x, y): ``x``, ``(x,)`` (a ``TensorDataset`` of inputs only), ``(x, y)`` or ``{"x", "y"}``."""
    if isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise DataError(f"--data {source}: items must be x, (x,) or (x, y), got a {type(item).__name__} of {len(item)}")
        return item[0], item[1] if len(item) == 2 else None
    if isinstance(item, dict):
        return item.get("x"), item.get("y")
    return item, None


def _collate(items: list, labelled: bool, source: str) -> Rows:
    """Stack items (``x`` or ``(x, y)``) into checked rows (checked once per batch, not per item)."""
    parts = [_item_parts(item, source) for item in items]
    if any((y is not None) != labelled for _, y in parts):
        raise DataError(f"--data {source}: some items have labels and some do not; give (x, y) for all or x for all")
    try:
        xs = [_tensor(x) for x, _ in parts]
        if len({x.shape for x in xs}) > 1:
            raise DataError(f"--data {source}: items have different shapes {sorted({tuple(x.shape) for x in xs})}; "
                            "give items of one shape")
        x = torch.stack(xs)
        y = torch.stack([_tensor(y) for _, y in parts]) if labelled else None  # ints, numpy scalars or arrays alike
    except (TypeError, RuntimeError, ValueError) as exc:
        raise DataError(f"--data {source}: items are not numeric arrays ({type(exc).__name__}); give numbers") from exc
    return _checked_rows(_as_tensor(x, "x", source), None if y is None else _as_tensor(y, "y", source), "items", source)


# --- the source ------------------------------------------------------------------------------------------------


class DataSource:
    """Training rows and held-out rows of one ``--data`` (see the module docstring).

    ``train_rows`` / ``val_rows`` are None for a stream until one pass has counted them."""

    source: str
    files: tuple[Path, ...]  # what was read (data file, directory or module): never overwritten
    has_labels: bool
    random_access: bool = True  # rows can be fetched by index (False: a stream); --mixup needs it
    input_dtype: torch.dtype | None = None  # what the model takes (check_against_model); None: rows as read
    notes: tuple[str, ...] | list[str] = ()  # what check_against_model decided that the user should know
    train_rows: int | None
    val_rows: int | None

    @property
    def mixable(self) -> bool:
        """Whether rows can be mixed (w x + (1 - w) x'): random access and real-valued model inputs (not
        token ids)."""
        return self.random_access and (self.input_dtype or self.head("train", 1)[0].dtype).is_floating_point

    def as_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (float32 or integers as read) in the dtype the model takes. Float rows become integers
        (token ids) only when whole: a Dataset or stream may make one batch of floats among integer ones."""
        if self.input_dtype in (None, x.dtype):
            return x
        if not self.input_dtype.is_floating_point:
            _check_whole(self, x, "a batch", rows_are_the_stores=False)
        return x.to(self.input_dtype)

    def head(self, split: str, n: int) -> Rows:
        """The first ``n`` rows (fewer if the split is smaller) of ``split`` ("train" or "val"), in memory."""
        xs, ys, got = [], [], 0
        for x, y in self.batches(split, min(n, 4096)):
            xs.append(x[: n - got])
            ys.append(None if y is None else y[: n - got])
            got += xs[-1].shape[0]
            if got >= n:
                break
        return torch.cat(xs), None if ys[0] is None else torch.cat(ys)

    def training_rows(self, seconds: float | None = None) -> int:
        """The number of training rows (a stream of unknown length is counted by one pass, which fails
        after ``seconds``)."""
        return self.train_rows

    def batches(self, split: str, batch_size: int, *, epoch: int | None = None, seed: int = 0, rank: int = 0,
                world: int = 1, skip: int = 0, mix: bool = False) -> Iterator[Rows | MixedRows]:
        """Batches of ``split``. With ``epoch`` the training rows are shuffled for that epoch and each
        global batch of ``batch_size`` rows is split among ``world`` processes (this is ``rank``'s
        chunk, possibly empty); ``skip`` global batches are passed over first (resume). ``mix`` (with
        ``epoch``): each batch comes with its :class:`MixPartners` as a third element (None for an
        empty chunk and for streams, which have no random access to draw partners from)."""
        raise NotImplementedError


class _IndexedSource(DataSource):
    """Rows with random access: in-memory arrays, shard directories, map-style Datasets."""

    def __init__(self, source: str, files: tuple[Path, ...], train: _Store, train_index: torch.Tensor, val: _Store,
                 val_index: torch.Tensor) -> None:
        self.source, self.files = source, files
        self.stores = {"train": (train, train_index), "val": (val, val_index)}
        self.has_labels = train.labelled and val.labelled
        self.train_rows, self.val_rows = int(train_index.numel()), int(val_index.numel())

    def batches(self, split, batch_size, *, epoch=None, seed=0, rank=0, world=1, skip=0, mix=False):
        store, index = self.stores[split]
        if epoch is not None:
            index = self._epoch_order(store, index, seed, epoch)
        full, tail = divmod(index.numel(), batch_size)
        count = full + (1 if tail and not (epoch is not None and _dropped_tail(full, tail, world)) else 0)
        for number in range(skip, count):  # chunk by chunk: head(split, 2) of 10^7 rows must not make 5 x 10^6 views
            chunk = index[number * batch_size:(number + 1) * batch_size]
            part = _split_for_rank(chunk.numel(), rank, world) if epoch is not None else slice(None)
            mine = chunk[part]
            x, y = store.fetch(mine) if mine.numel() else self._empty(store)
            x, y = self.as_model_input(x), y if self.has_labels else None
            if mix and epoch is not None:
                yield x, y, self._partners(store, chunk, part, (x, y), _mix_seed(seed, epoch, number))
            else:
                yield x, y

    def _partners(self, store: _Store, chunk: torch.Tensor, part: slice, mine: Rows, seed: int) -> MixPartners | None:
        """The :class:`MixPartners` of this process's ``part`` of the global batch ``chunk`` (row
        indices), whose rows ``mine`` it has read: a partner among them is taken from there, only the
        others (other processes' rows) are read from the store."""
        x, y = mine
        if x.shape[0] == 0:
            return None
        generator = torch.Generator().manual_seed(seed)
        partner = torch.randperm(chunk.numel(), generator=generator)[part]
        weight = torch.rand(chunk.numel(), generator=generator)[part]
        local = (partner - part.start).clamp(0, x.shape[0] - 1)
        own = partner - part.start == local
        px, py = x[local], None if y is None else y[local]  # copies: the others are written over below
        if not own.all():
            rows, inverse = chunk[partner[~own]].unique(return_inverse=True)  # a store reads sorted rows fastest
            fx, fy = store.fetch(rows)  # as stored (uint8 images, int32 labels): as ``mine`` was made
            px[~own] = fx[inverse].to(px.dtype)
            if py is not None:
                py[~own] = fy[inverse].to(py.dtype)
        return MixPartners(px, py, weight)

    @staticmethod
    def _epoch_order(store: _Store, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order: the epoch-th draw of one generator seeded with ``seed`` (replayed, so
        that a resumed run and every process of a distributed run draw the same order)."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epoch - 1):
            store.shuffled(index, generator)
        return store.shuffled(index, generator)

    def carve_selection(self, seed: int) -> None:
        """Set aside a "select" split for decisions that must not look at the held-out rows the report
        quotes: ``x_select``/``y_select`` when given, else a seeded SELECTION_FRACTION of the training rows
        (at least SELECTION_MIN_ROWS, at most HOLDOUT_MAX), which then no longer train."""
        if "select" in self.stores:
            given = self.stores["select"][1].numel()
            if given < SELECTION_MIN_ROWS:
                raise DataError(f"{self.source}: x_select has {given} row(s); --max-drop measures accuracy on them and "
                                f"needs at least {SELECTION_MIN_ROWS}: give more")
            return
        store, index = self.stores["train"]
        order = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed + 1))
        n = min(HOLDOUT_MAX, max(SELECTION_MIN_ROWS, int(round(SELECTION_FRACTION * index.numel()))))
        if index.numel() - n < n:
            raise DataError(f"{self.source}: {index.numel()} training rows are too few to set {n} aside for --max-drop "
                            f"(it measures accuracy on at least {SELECTION_MIN_ROWS}) and train on more; give more data or "
                            "x_select/y_select")
        self.stores["select"] = (store, index[order[:n]].sort().values)
        self.stores["train"] = (store, index[order[n:]].sort().values)
        self.train_rows = self.train_rows - n

    def _empty(self, store: _Store) -> Rows:
        x, y = store.fetch(torch.zeros(1, dtype=torch.long))
        return x[:0], None if y is None else y[:0]


class _StreamSource(DataSource):
    """An ``IterableDataset``: item ``i`` is held out when ``i % 5 == seed % 5`` (first HOLDOUT_MAX)."""

    random_access = False

    def __init__(self, dataset, source: str, files: tuple[Path, ...], seed: int) -> None:
        self.dataset, self.source, self.files = dataset, source, files
        self.offset = seed % STREAM_HOLDOUT_EVERY
        self.train_rows = self.val_rows = None
        self.counted_by_len = False
        self.first_items: dict[int, bytes | None] = {}
        need = max(self.offset + 1, 2)  # item `offset` is the first held out; one other is the first to train on
        firsts = list(itertools.islice(self._items(), need))
        if not firsts:
            raise DataError(f"--data {source}: the IterableDataset yields no items; give it samples")
        if len(firsts) < need:
            raise DataError(f"--data {source}: the IterableDataset yields {len(firsts)} item(s); item i is held out for "
                            f"evaluation when i % {STREAM_HOLDOUT_EVERY} == {self.offset} (from --seed), so at least "
                            f"{need} are needed to train on some and evaluate on others; give it more samples")
        self.labelled = _item_parts(firsts[0][1], source)[1] is not None
        self.has_labels = self.labelled

    def _items(self) -> Iterator[tuple[int, object]]:
        """The stream's items, numbered; what its code raises while making one is a data error (not what
        closes this generator, which passes through its ``yield``)."""
        items = enumerate(self._read(iter, self.dataset))
        while True:
            numbered = self._read(next, items, None)
            if numbered is None:
                return
            if numbered[0] < STREAM_SAME_ITEMS:
                self._check_same_as_first_pass(*numbered)
            yield numbered

    def _read(self, step: Callable, *args):
        """``step(*args)`` (the stream's own code runs in it), its failure one data error."""
        try:
            return step(*args)
        except USER_CODE_FAILURES as exc:
            raise DataError(f"--data {self.source}: reading the stream failed ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:120]})") from exc

    def _check_same_as_first_pass(self, i: int, item) -> None:
        """Items are held out by position, so every pass must yield the same items in the same order: a
        stream that reshuffles would move training items into the held-out ones."""
        digest = _digest(item)
        if self.first_items.setdefault(i, digest) != digest:
            raise DataError(f"--data {self.source}: the stream yields a different item {i} on another pass; fixclf holds "
                            "out items by position, so every pass must yield the same items in the same order (shuffle "
                            "once, when the stream is made, not on every pass)")

    def _split(self, split: str) -> Iterator[object]:
        held, count = 0, 0
        for i, item in self._items():
            is_val = i % STREAM_HOLDOUT_EVERY == self.offset and held < HOLDOUT_MAX
            held += is_val
            if is_val == (split == "val"):
                count += 1
                yield item
            if split == "val" and held == HOLDOUT_MAX:  # no more held-out items can come
                break
        if split == "train":
            self._check_same_count(count)
            self.train_rows = count
        else:
            self.val_rows = count

    def _check_same_count(self, count: int) -> None:
        """A whole pass yields as many training items as the stream's ``len()`` promised, or as the pass
        before: the fine-tune's steps and its learning-rate schedule are sized by that count."""
        if self.train_rows is None or count == self.train_rows:
            return
        said = "its len() promised" if self.counted_by_len else "the pass before gave"
        raise DataError(f"--data {self.source}: a pass over the stream gave {count:,} training items where {said} "
                        f"{self.train_rows:,}; the fine-tune is sized by that count, so every pass must yield the same "
                        "items (and __len__, if defined, their number)")

    def batches(self, split, batch_size, *, epoch=None, seed=0, rank=0, world=1, skip=0, mix=False):
        training = epoch is not None
        pending, done = [], 0
        for item in self._split(split):
            pending.append(item)
            if len(pending) == batch_size:
                done += 1
                if done > skip:
                    yield self._chunk(pending, rank, world, training, mix)
                pending = []
        if pending and done + 1 > skip and not (training and _dropped_tail(done, len(pending), world)):
            yield self._chunk(pending, rank, world, training, mix)

    def training_rows(self, seconds: float | None = None) -> int:
        """From the stream's ``len()`` when it has one, else counted by one reading pass, which fails
        after ``seconds`` (a stream that never ends would otherwise be counted forever)."""
        if self.train_rows is None and _has_len(self.dataset):
            items, self.counted_by_len = len(self.dataset), True
            self.val_rows = min(HOLDOUT_MAX, len(range(self.offset, items, STREAM_HOLDOUT_EVERY)))
            self.train_rows = items - self.val_rows
        deadline = None if seconds is None else time.monotonic() + seconds
        if self.train_rows is None:
            for count, _ in enumerate(self._split("train"), start=1):
                if deadline is not None and time.monotonic() > deadline:
                    raise DataError(f"--data {self.source}: the stream has not ended after {seconds:g} s (--max-time) of "
                                    f"counting ({count:,} training items so far; a stream without __len__ is counted by "
                                    "one pass first); give it a __len__ (and an end), or a longer --max-time")
        return self.train_rows

    def _chunk(self, items: list, rank: int, world: int, training: bool, mix: bool) -> Rows | MixedRows:
        """This process's rows of a global batch; in training with ``mix``, with no partners (a stream
        has no random access to draw them from)."""
        mine = items[_split_for_rank(len(items), rank, world)] if training else items
        x, y = _collate(mine or items[:1], self.labelled, self.source)
        x = self.as_model_input(x)
        rows = (x, y) if mine else (x[:0], None if y is None else y[:0])
        return (*rows, None) if training and mix else rows


def _digest(item) -> bytes | None:
    """A stream item's bytes, hashed (None when they cannot be read as arrays: the batch will say why)."""
    digest = hashlib.sha256()
    try:
        for part in _item_parts(item, ""):
            if part is not None:
                tensor = _tensor(part)
                digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
                digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    except Exception:
        return None
    return digest.digest()


def _has_len(dataset) -> bool:
    try:
        return isinstance(len(dataset), int)
    except TypeError:
        return False
    except USER_CODE_FAILURES as exc:
        raise DataError(f"--data: the stream's len() failed ({_said(exc)}); define __len__ to return its length, "
                        "or drop it") from exc


def _holdout(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, disjoint (train, val) row indices, each in ascending order."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    n_val = min(HOLDOUT_MAX, max(1, int(round(HOLDOUT_FRACTION * rows))))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _from_store(store: _Store, source: str, files: tuple[Path, ...], seed: int) -> _IndexedSource:
    if store.rows < 2:
        raise DataError(f"{source}: need at least 2 samples to hold some out for evaluation")
    train, val = _holdout(store.rows, seed)
    return _IndexedSource(source, files, store, train, store, val)


SPLIT_KEYS = ("x", "y", "x_val", "y_val", "x_select", "y_select")
"""The arrays fixclf reads from a data file or a --data function's dict."""


def _from_arrays(arrays, source: str, files: tuple[Path, ...], seed: int) -> _IndexedSource:
    train = _named_rows(arrays, "x", "y", source) if isinstance(arrays, dict) and "x" in arrays else None
    if train is None:
        found = f"; it has {', '.join(map(repr, sorted(arrays)[:8]))}" if isinstance(arrays, dict) and arrays else ""
        raise DataError(f"--data {source}: expected a dict with key 'x' (and optional {', '.join(map(repr, SPLIT_KEYS[1:]))})"
                        f"{found}; rename the arrays (x_train -> x, y_train -> y)")
    _refuse_unread_splits(arrays, source)
    val = _named_rows(arrays, "x_val", "y_val", source, like=train)
    if val is None:
        data = _from_store(train, source, files, seed)
    else:
        data = _IndexedSource(source, files, train, torch.arange(train.rows), val, torch.arange(val.rows))
    select = _named_rows(arrays, "x_select", "y_select", source, like=train)
    if select is not None:
        data.stores["select"] = (select, torch.arange(select.rows))
    return data


OTHER_SPLIT_NAMES = ("train", "training", "valid", "validation", "dev", "test", "testing", "eval", "evaluation",
                     "holdout", "held_out")


def _refuse_unread_splits(arrays: dict, source: str) -> None:
    """Arrays named as a split fixclf does not read (``x_valid``, ``y_test``: x_/y_ and one of
    :data:`OTHER_SPLIT_NAMES`) are refused: ignored, the user's held-out rows would silently be
    replaced by a carve-out of ``x``. Other names (``x_mean``, ``classes``) are left alone."""
    unread = sorted(k for k in arrays if isinstance(k, str) and k[:2] in ("x_", "y_") and k[2:] in OTHER_SPLIT_NAMES)
    if unread:
        raise DataError(f"--data {source}: {', '.join(map(repr, unread[:4]))} {'is' if len(unread) == 1 else 'are'} not "
                        f"among the arrays fixclf reads ({', '.join(SPLIT_KEYS)}); rename (held-out rows: x_val, y_val) "
                        "or remove them")


def _named_rows(arrays: dict, x_key: str, y_key: str, source: str, like: _ArrayStore | None = None) -> _ArrayStore | None:
    """The rows ``arrays[x_key]`` with labels ``arrays[y_key]`` (None when neither is given), checked
    against the training rows ``like``: same row shape, labels for both or for neither."""
    if arrays.get(x_key) is None:
        if arrays.get(y_key) is not None:
            raise DataError(f"{source}: {y_key} is given without {x_key}; give both, or neither")
        return None
    x = _as_tensor(arrays[x_key], x_key, source)
    y = _as_tensor(arrays[y_key], y_key, source) if arrays.get(y_key) is not None else None
    store = _ArrayStore(*_checked_rows(x, y, x_key, source))
    if like is None:
        return store
    if store.x.shape[1:] != like.x.shape[1:]:
        raise DataError(f"{source}: {x_key} rows have shape {tuple(store.x.shape[1:])}, x rows {tuple(like.x.shape[1:])}; "
                        f"give {x_key} rows shaped like x's")
    if store.x.dtype != like.x.dtype:
        raise DataError(f"{source}: {x_key} is stored as {dtype_name(store.x.dtype)} and x as {dtype_name(like.x.dtype)}; store "
                        f"{x_key} as x is (the model sees both the same way)")
    if store.labelled != like.labelled:
        raise DataError(f"{source}: labels are given for only one of x and {x_key}; give both y and {y_key}, or neither")
    return store


def _regular_file(path: Path, spec: str) -> None:
    """Refuse anything but a regular file before it is opened (a FIFO or device would block or never end)."""
    if path.exists() and not path.is_file():
        raise DataError(f"--data {spec}: {path.name} is not a regular file (a directory, pipe, device or socket); give a file")


def _read_file(path: Path, spec: str) -> dict:
    _regular_file(path, spec)
    if not path.is_file():
        raise DataError(f"--data {spec}: no such file; give an .npz/.pt file with x (and y), a directory of shards or "
                        "module:function")
    return _read_npz(path, spec) if path.suffix == ".npz" else _read_pt(path, spec)


def _read_npz(path: Path, spec: str) -> dict:
    """The arrays of an .npz archive (never unpickled), after the zip-bomb check."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"--data {spec}: not an .npz archive (numpy.savez writes one); give an .npz or .pt file with x and y")
    check_unpacked_size(path, DATA_LIMITS.unpack_ratio, DataError)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"--data {spec}: it holds arrays of Python objects, which fixclf never unpickles; save numeric "
                            "arrays (x.astype(np.float32), y.astype(np.int64))") from exc
        raise DataError(f"--data {spec}: cannot read it ({type(exc).__name__}); expected .npz or .pt with x and y") from exc


def _read_pt(path: Path, spec: str) -> dict:
    """What a .pt data file holds, read weights-only with bounded work (:func:`compressor.pickles.load_bounded`)."""
    return load_bounded(path, DATA_LIMITS, lambda message: DataError(f"--data {spec}: {message}"),
                        "save x and y as tensors (or numpy arrays in an .npz), not lists", lambda exc: _pt_refusal(spec, exc))


def _pt_refusal(spec: str, exc: BaseException) -> DataError:
    """Why a .pt data file could not be read weights-only: numpy arrays inside (which such a load does not
    read) are named, with the two ways to save them."""
    if "numpy" in str(exc):
        return DataError(f"--data {spec}: holds numpy arrays, which a weights-only load does not read; save tensors "
                         "(torch.from_numpy(x)) in the .pt, or the arrays with numpy.savez as an .npz")
    return DataError(f"--data {spec}: cannot read it ({type(exc).__name__}); expected .npz or .pt with x and y")


def load_data(spec: str | Path, *, seed: int = 0, selection: bool = False) -> DataSource:
    """The data ``spec`` names (see the module docstring), split into training and held-out rows
    (and, with ``selection``, a "select" split for decisions: see :meth:`_IndexedSource.carve_selection`)."""
    data = _load(spec, seed)
    if selection:
        if not isinstance(data, _IndexedSource) or not data.has_labels:
            raise DataError(f"--data {spec}: --max-drop needs labelled data with random access (arrays, shards or a "
                            "Dataset), to measure accuracy on rows set aside from training")
        data.carve_selection(seed)
    return data


def _load(spec: str | Path, seed: int) -> DataSource:
    """A ``Path`` is always read as data (a checkpoint's bundled file is one); only a string that names
    no existing file and has the form ``package.module:function`` imports and calls code."""
    source = str(spec)
    path = Path(source)
    if path.is_dir():
        return _from_store(_ShardStore(path, source), source, (path,), seed)
    if isinstance(spec, Path) or not (is_reference(source) and not path.exists()):
        return _from_arrays(_read_file(path, source), source, (path,), seed)
    function = import_reference(source, "--data", DataError)
    result = call_user_code(function, {}, f"--data {source}", DataError)
    module_file = getattr(sys.modules.get(getattr(function, "__module__", "")), "__file__", None)
    files = (Path(module_file),) if module_file else ()
    if isinstance(result, torch.utils.data.IterableDataset):
        return _StreamSource(result, source, files, seed)
    if isinstance(result, torch.utils.data.Dataset):
        return _from_store(_ItemStore(result, source), source, files, seed)
    if not isinstance(result, (dict, tuple)):  # a generator, a list of pairs, a DataLoader: none is rows fixclf can split
        raise DataError(f"--data {source} returned {type(result).__name__}; return a dict of arrays (x, y, optional "
                        "x_val, y_val), an (x, y) tuple, a torch Dataset of (x, y) items or an IterableDataset")
    if isinstance(result, tuple) and len(result) not in (1, 2):
        raise DataError(f"--data {source} returned a tuple of {len(result)}; return (x,) or (x, y), or a dict of arrays "
                        "(x, y, optional x_val, y_val) to give a held-out split")
    return _from_arrays(dict(zip(("x", "y"), result)) if isinstance(result, tuple) else result, source, files, seed)


def dtype_name(dtype: torch.dtype) -> str:
    """How rows are stored or fed, as a user names it: integers by their dtype, anything else as floating point."""
    return str(dtype).removeprefix("torch.") if dtype in INTEGER_DTYPES else "floating point"


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_labels(y: torch.Tensor | None, classes: int, source: str, name: str = "") -> None:
    """Labels must index the model's ``classes`` outputs (``name``: the array they came from, if known)."""
    if y is not None and y.numel() and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"{source}: labels{f' {name}' if name else ''} range over [{int(y.min())}, {int(y.max())}] but the "
                        f"model has {classes} classes (labels must be in [0, {classes})); check the labels")


EXACT_INTEGERS = 2**24
"""Whole numbers below this magnitude are exact in float32, as rows are read (a larger one may have been rounded)."""


def _logits_of_rows_as_read(data: DataSource, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits on rows ``x`` as read, settling ``data.input_dtype``: float32 when the model takes
    it (whatever the rows are stored as), else integer rows as stored (token ids into an ``nn.Embedding``),
    else whole-number float rows as int64 (:func:`_as_integer_inputs`). Integer rows that the model takes
    both ways but answers differently as stored (it converts its own bytes: ``x.float() / 255`` for uint8)
    are fed as stored, where the model's own conversion runs, with a note saying so (``data.notes``)."""
    try:
        logits = model(x.float())
    except (Exception, SystemExit) as exc:
        failure: BaseException = exc
    else:
        data.input_dtype = torch.float32
        as_stored = _answer_as_stored(model, x, logits) if x.dtype in INTEGER_DTYPES else None
        if as_stored is not None:
            name = dtype_name(x.dtype)
            data.input_dtype = x.dtype
            data.notes.append(f"x is stored as {name}, and the model answers those rows differently as {name} than as "
                              f"float32 (it converts them itself): fixclf feeds them as stored, the ONNX input included "
                              "(store x as float32 to feed floats)")
            return as_stored
        return logits
    if x.dtype in INTEGER_DTYPES:
        try:
            logits = model(x)
        except (Exception, SystemExit):
            pass
        else:
            data.input_dtype = x.dtype
            return logits
    return _as_integer_inputs(data, model, x.float(), failure)


def _said(exc: BaseException) -> str:
    """An exception as a message quotes it: its type and its first line (150 characters at most)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}"


def _answer_as_stored(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    """The model's answer on integer rows ``x`` as they are, when it takes them and answers other than
    ``logits`` (its answer on them as float32); None otherwise."""
    try:
        as_stored = model(x)
    except (Exception, SystemExit):
        return None
    if not isinstance(as_stored, torch.Tensor) or as_stored.shape != logits.shape:
        return None
    return None if torch.allclose(as_stored.float(), logits.float(), rtol=1e-4, atol=1e-5) else as_stored


def _as_integer_inputs(data: DataSource, model: nn.Module, x: torch.Tensor, failure: BaseException) -> torch.Tensor:
    """A model the float rows do not fit may take integer inputs (token ids into an ``nn.Embedding``):
    when the rows are whole numbers, try them as int64; if that works the data is fed as int64 from now
    on (``data.input_dtype``) and the logits are returned, else the float rows' failure is the error."""
    whole = bool(torch.equal(x, x.round()) and x.abs().max() < EXACT_INTEGERS)
    as_ids = ""
    if whole:
        try:
            logits = model(x.long())
        except (Exception, SystemExit) as exc:
            if "indices" in str(failure):  # the model takes ids; what they did says more (an id beyond the vocabulary)
                failure, as_ids = exc, " as integers (token ids)"
        else:
            data.input_dtype = torch.long
            return logits
    said = _said(failure)
    if "indices" in said:  # the model takes integer indices (token ids): are these rows whole?
        _check_whole(data, x, "x", rows_are_the_stores=False)
    if not as_ids and ("dtype" in said or "scalar type" in said):  # the data is not the problem
        raise DataError(f"the model fails in float32, the precision fixclf fine-tunes and exports in ({said}); make its "
                        "forward follow its parameters' dtype (no .double() or .half() inside forward)") from failure
    raise DataError(f"{data.source}: samples of shape {tuple(x.shape[1:])}{as_ids} do not fit the model ({said}); "
                    "check --data") from failure


@torch.no_grad()
def check_against_model(data: DataSource, model: nn.Module, held: Mapping[str, int] | None = None) -> int:
    """Check the data fits the model before any work; returns the number of classes C. Labels held
    in memory are all checked here; streamed labels are checked batch by batch as they come. Settles the
    dtype the rows are fed in from here on (:func:`_logits_of_rows_as_read`). ``held``: split -> how many
    rows of its head the run keeps in memory and runs the model on outside the batches (calibration,
    validation, timing rows); where the data is not in memory, those rows' token ids are checked here."""
    data.input_dtype, data.notes = None, []  # rows as read
    x, _ = data.head("train", 2)
    val_x, _ = data.head("val", 1)
    if val_x.shape[1:] != x.shape[1:]:
        raise DataError(f"{data.source}: held-out rows have shape {tuple(val_x.shape[1:])}, training rows {tuple(x.shape[1:])}")
    logits = _logits_of_rows_as_read(data, model, x)
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or not logits.is_floating_point():
        raise PlanError(f"the model returns {_describe(logits)}; fixclf compresses classifiers whose forward returns "
                        "one float logits tensor (batch, classes): wrap the model so that it does")
    if logits.shape[0] < x.shape[0]:  # more rows are a model's own layout (a tagger's batch x tokens rows)
        raise DataError(f"{data.source}: the model's forward regroups {x.shape[0]} rows of shape {tuple(x.shape[1:])} "
                        f"into {logits.shape[0]} row(s) of logits (a reshape to the input shape it was built for), so "
                        "these samples are not of that shape; check --data")
    if data.has_labels and logits.ndim != 2:
        raise DataError(f"{data.source}: labels need a model returning (batch, classes) logits, this one returns shape "
                        f"{tuple(logits.shape)}; drop y (distillation alone needs no labels) or pool the outputs")
    classes = logits.shape[-1]
    check_classes(classes)  # before the labels: a one-logit model's 0/1 labels are not the problem
    if isinstance(data, _IndexedSource):
        train, checked = data.stores["train"][0], set()
        for split, (store, _) in data.stores.items():
            if isinstance(store, _ArrayStore) and id(store) not in checked:  # splits carved from x share its store
                checked.add(id(store))
                name = "" if store is train else f"_{split}"
                check_labels(store.y, classes, data.source, f"y{name}")
                _check_extreme_ids(data, model, store.x, f"x{name}")
    _check_held_ids(data, model, held or {})
    return classes


def _check_held_ids(data: DataSource, model: nn.Module, held: Mapping[str, int]) -> None:
    """The token ids of the rows the run holds (``held``: split -> rows of its head) where the data is
    not all in memory (a Dataset, shards, a stream; arrays are checked whole), as arrays are."""
    in_memory = isinstance(data, _IndexedSource) and all(isinstance(store, _ArrayStore) for store, _ in data.stores.values())
    if in_memory or data.input_dtype is None or data.input_dtype.is_floating_point:
        return
    for split, rows in held.items():
        x = data.head(split, rows)[0]
        _check_extreme_ids(data, model, x, f"the first {x.shape[0]:,} {SPLIT_WORDS[split]} rows (counted in that split)")


def _check_whole(data: DataSource, x: torch.Tensor, name: str, *, rows_are_the_stores: bool = True) -> None:
    """Rows ``x`` the model takes as integer indices must hold whole numbers; the message names the
    first row that does not when ``x`` holds the store's rows in order (not a few rows from a split)."""
    fractional = (x != x.round()).reshape(x.shape[0], -1).any(dim=1).nonzero() if x.is_floating_point() else []
    if len(fractional):
        where = f"row {int(fractional[0])} of {name}" if rows_are_the_stores else name
        raise DataError(f"{data.source}: the model takes {name} as integer indices (token ids), but {where} holds "
                        "values that are not whole numbers; store the ids as integers")


ID_CHECK_ROWS = 4_096  # most rows the id check runs the model on (in batches of 256)


def _check_extreme_ids(data: DataSource, model: nn.Module, x: torch.Tensor, name: str) -> None:
    """Inputs the model takes as integers (token ids) are indices: every row must be whole, and the
    model is run on the rows holding each column's smallest and largest value (each column may index
    its own vocabulary: a tabular model's per-column embeddings), so that an id outside a vocabulary
    is a data error now, not a failure later in the run. Of rows not held in memory (a Dataset, shards,
    a stream), those the run holds are checked so too (:func:`_check_held_ids`); the rest fail where
    they come, as a data error of their batch (:func:`compressor.finetune.failed_in_model`)."""
    if data.input_dtype is None or data.input_dtype.is_floating_point or x.numel() == 0:
        return
    _check_whole(data, x, name)
    flat = x.reshape(x.shape[0], -1)
    rows = torch.cat([flat.argmin(dim=0), flat.argmax(dim=0)]).unique()[:ID_CHECK_ROWS]
    for chunk in rows.split(256):
        if _fails(data, model, x, chunk) is None:
            continue
        row, exc = next((int(r), exc) for r in chunk if (exc := _fails(data, model, x, r.reshape(1))) is not None)
        raise DataError(f"{data.source}: the model fails on row {row} of {name}, which holds a column's smallest or "
                        f"largest value ({_said(exc)}); token ids must be within the model's vocabulary (its nn.Embedding's "
                        "num_embeddings); check --data") from exc


def _fails(data: DataSource, model: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> BaseException | None:
    """What the model raises on rows ``rows`` of ``x`` (run as two rows at least, as the first check ran:
    a model in training mode with batch norm needs them), or None."""
    try:
        model(data.as_model_input(x[rows if len(rows) > 1 else rows.repeat(2)]))
    except (Exception, SystemExit) as exc:
        return exc
    return None
