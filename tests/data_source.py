"""``module:function`` data sources for tests (``--data data_source:digits`` and friends)."""
import os

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from conftest import SAMPLES


def digits():
    arrays = np.load(SAMPLES / "digits.npz")
    return {"x": arrays["x"], "y": arrays["y"]}


class DigitItems(Dataset):
    """The digits rows as a map-style Dataset of (x, y) items."""

    def __init__(self):
        arrays = np.load(SAMPLES / "digits.npz")
        self.x, self.y = arrays["x"], arrays["y"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


class DigitStream(IterableDataset):
    """The digits rows as a stream of (x, y) items."""

    def __iter__(self):
        items = DigitItems()
        for i in range(len(items)):
            yield items[i]


def items():
    return DigitItems()


def stream():
    return DigitStream()


class BadOnRankOne(IterableDataset):
    """Good rows, except that the process of rank 1 of a torchrun job meets a broken item."""

    def __iter__(self):
        items = DigitItems()
        for i in range(len(items)):
            if i == 700 and os.environ.get("RANK") == "1":
                raise ValueError("corrupt record 700")
            yield items[i]


def bad_on_rank_one():
    return BadOnRankOne()


class BadLaterOnRankOne(DigitItems):
    """Digits items; the process of rank 1 meets a broken one at its 2,000th read (in the fine-tune)."""

    reads = 0

    def __getitem__(self, i):
        BadLaterOnRankOne.reads += 1
        if BadLaterOnRankOne.reads == 2000 and os.environ.get("RANK") == "1":
            raise ValueError("corrupt record")
        return super().__getitem__(i)


def bad_later_on_rank_one():
    return BadLaterOnRankOne()


WIDE = 8192  # features of the wide model: few items make many bytes


def wide_mlp():
    """An 8192 -> 32 -> 10 MLP (``--arch data_source:wide_mlp``)."""
    return torch.nn.Sequential(torch.nn.Linear(WIDE, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


class WideStream(IterableDataset):
    """FIXCLF_TEST_ROWS rows of WIDE features made on the fly in blocks (seeded: every pass is the same)."""

    def __iter__(self):
        rows, block = int(os.environ["FIXCLF_TEST_ROWS"]), 256
        generator = torch.Generator().manual_seed(0)
        for start in range(0, rows, block):
            yield from torch.rand(min(block, rows - start), WIDE, generator=generator)


def wide_stream():
    return WideStream()


def mlp_of(**kwargs):
    """compressor.zoo's MLP, as a user's own factory (not on fixclf's allow-list)."""
    from compressor.zoo import mlp

    return mlp(**kwargs)


def compiled_mlp_of(**kwargs):
    """:func:`mlp_of` returned in the wrapper it was trained in: torch.compile's."""
    return torch.compile(mlp_of(**kwargs))


def data_parallel_mlp_of(**kwargs):
    """:func:`mlp_of` returned in DataParallel, as a multi-GPU training script builds it."""
    return torch.nn.DataParallel(mlp_of(**kwargs))


class Vast(Dataset):
    """A map-style Dataset whose len() is far beyond what can be shuffled by index."""

    def __len__(self):
        return 2**62

    def __getitem__(self, i):
        return torch.zeros(64), 0


def vast():
    return Vast()


def requiring_grad():
    """The digits as tensors that require grad (as a training script may leave them)."""
    arrays = digits()
    return {"x": torch.from_numpy(arrays["x"]).requires_grad_(), "y": torch.from_numpy(arrays["y"])}


def big_endian():
    """The digits in the other byte order (``>f4``, ``>i8``), as files written on another machine hold them."""
    arrays = digits()
    return {"x": arrays["x"].astype(">f4"), "y": arrays["y"].astype(">i8")}


class BigEndianItems(DigitItems):
    """Items that are numpy arrays in the other byte order."""

    def __getitem__(self, i):
        return self.x[i].astype(">f4"), int(self.y[i])


def big_endian_items():
    return BigEndianItems()
