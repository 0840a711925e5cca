"""What data a run reads, as one frozen, picklable description: :class:`DataRequest`.

A run describes its data once (data set, folder, batches, the validation split, the
normalisation, and which test images choose when the test split is split in two), and
every process that runs it (this one, a trial worker, a data-parallel worker) loads the
very same images with :meth:`DataRequest.load`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from sketch_core.data.normalize import from_record
from sketch_core.data.sets import Data, hold_out_test, load_data, loader_rows
from sketch_core.errors import UserError

__all__ = ["DataRequest"]


@dataclass(frozen=True)
class DataRequest:
    """The arguments of :func:`sketch_core.data.sets.load_data`, plus ``test_holdout``.

    ``normalize`` is a recorded ``{"mean": [...], "std": [...]}`` (or a preset's name);
    None: the data set's own. ``test_holdout`` (with ``holdout_seed``): that many test
    images become the validation split (they choose) and the other test images stay the
    test split (they report); use it with ``val_fraction`` 0.
    """

    data_set: str = "cifar10"
    data_path: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 100
    val_fraction: float = 0.1
    seed: int = 0
    input_size: int | None = None
    synthetic: dict | None = None
    normalize: Any = None
    download: bool = False
    num_workers: int | None = None
    test_holdout: int | None = None
    holdout_seed: int = 0
    test_images: int | None = None

    def load(self, device: str | torch.device = "cpu") -> Data:
        """The data set on ``device``, split as described."""
        normalize = self.normalize
        if isinstance(normalize, dict):
            normalize = from_record(normalize)
        data = load_data(self.data_set, self.data_path, batch_size=self.batch_size,
                         eval_batch_size=self.eval_batch_size, val_fraction=self.val_fraction,
                         seed=self.seed, device=device, download=self.download,
                         input_size=self.input_size, num_workers=self.num_workers,
                         synthetic=self.synthetic, normalize=normalize)
        if self.test_holdout is not None:
            n_test = len(loader_rows(data.test))
            if self.test_images is not None and n_test != self.test_images:
                raise UserError(f"the test split of {self.data_set} has {n_test} images, but the "
                                f"search chose on {self.test_holdout} of {self.test_images}; use "
                                f"the data the search used")
            data = hold_out_test(data, self.test_holdout, self.holdout_seed)
        return data

    def replace(self, **changes: Any) -> DataRequest:
        return dataclasses.replace(self, **changes)
