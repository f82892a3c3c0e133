"""The dataset registry: every dataset knows its shape, where it may be found, and how to load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dlkit.registry import Registry
from dlkit.spec import DataSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RawData:
    """A dataset as found on disk: train and test splits, before normalization and val split.

    Images are uint8 ``(N, C, H, W)`` or float ``(N, C, H, W)``; labels are int64 ``(N,)``.
    """

    x_train: "torch.Tensor"
    y_train: "torch.Tensor"
    x_test: "torch.Tensor"
    y_test: "torch.Tensor"
    source: str  # where it came from: a folder, a file, or "scikit-learn (bundled)"


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    spec: DataSpec
    description: str
    # Find (and if allowed, download) and parse the data. ``data_dir`` is the user's --data-dir.
    fetch: Callable[..., RawData]
    # Where the data would be found right now, without downloading or parsing; None if nowhere.
    locate: Callable[[Path | None], str | None]
    # Name of a batch augmentation that suits this data ("hflip"), or None.
    augment: str | None = None


DATASETS: Registry[DatasetEntry] = Registry("dataset", list_command="dlkit datasets")


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    return DATASETS.add(entry.name, entry)
