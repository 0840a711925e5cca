"""Parts of a split: a fixed number of training images per epoch, a fixed validation subset.

A search trial may train on ``train_images`` images a epoch (drawn anew each epoch,
seeded by the trial's seed and its rate vector, :class:`EpochSample`) and be scored on a
fixed seeded subset of ``val_images`` validation images (the same for every trial):
:func:`sized_data`. The loaders share the data's tensors. :func:`check_images` says in
one line when a number does not fit its split.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from sketch_core.data.sets import Data, loader_rows, with_rows
from sketch_core.errors import UserError

__all__ = ["EpochSample", "sized_data", "check_images", "draw_seed"]


def _draw(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` of ``rows``, drawn without replacement by a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed % (2**63))
    pick = torch.randperm(len(rows), generator=g)[:n].sort().values
    return rows[pick.to(rows.device)]


class EpochSample:
    """A training loader that serves ``n`` images of its split per epoch, drawn anew
    each epoch (seeded by ``seed`` and the epoch); otherwise the loader it wraps."""

    def __init__(self, loader: Any, n: int, seed: int) -> None:
        self.loader, self.n, self.seed = loader, int(n), int(seed)
        self.rows = loader_rows(loader)
        self.epoch, self.start_batch = 0, 0

    def rows_of(self, epoch: int) -> torch.Tensor:
        """The rows epoch ``epoch`` trains on."""
        return _draw(self.rows, self.n, self.seed * 1_000_003 + epoch * 7919 + 1)

    def __len__(self) -> int:
        return len(with_rows(self.loader, self.rows[:self.n]))

    def __repr__(self) -> str:
        return f"EpochSample({self.n} of {len(self.rows)} images per epoch, {self.loader!r})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "loader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        view = with_rows(self.loader, self.rows_of(epoch))
        view.set_epoch(epoch, start)
        return iter(view)


def check_images(train_images: int | None, val_images: int | None, data: Data,
                 what: str = "trial") -> None:
    """``train_images`` / ``val_images`` fit the training / validation split of ``data``;
    a :class:`UserError` naming both numbers when one does not."""
    n_train = len(loader_rows(data.train))
    n_val = 0 if data.val is None else len(loader_rows(data.val))
    if train_images is not None and train_images > n_train:
        raise UserError(f"{what}.train_images: {train_images} is larger than the "
                        f"training split ({n_train} images)")
    if val_images is not None and val_images > n_val:
        raise UserError(f"{what}.val_images: {val_images} is larger than the "
                        f"validation split ({n_val} images)")


def draw_seed(seed: int, rates: Sequence[float]) -> int:
    """The seed of one trial's image draws: its recipe's seed and its rate vector."""
    text = ",".join(f"{float(r):.6g}" for r in rates)
    return seed * 1_000_003 + zlib.crc32(text.encode())


def sized_data(data: Data, train_images: int | None, val_images: int | None, seed: int,
               rates: Sequence[float]) -> Data:
    """``data`` as one trial sees it: ``train_images`` per epoch and the fixed
    ``val_images`` subset (the same for every trial); ``data`` itself when both are None."""
    if train_images is None and val_images is None:
        return data
    check_images(train_images, val_images, data)
    changes: dict[str, Any] = {}
    if train_images is not None:
        changes["train"] = EpochSample(data.train, train_images, draw_seed(seed, rates))
    if val_images is not None and data.val is not None:
        rows = _draw(loader_rows(data.val), val_images, seed * 1_000_003 + 17)
        changes["val"] = with_rows(data.val, rows)
    return dataclasses.replace(data, **changes)
