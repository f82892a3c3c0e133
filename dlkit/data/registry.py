"""The dataset registry: every dataset knows its shape, where it may be found, and how to load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    # Text datasets: load(data_dir=, val_fraction=, seed=, download=, state=, progress=, options=)
    # returns the whole DataBundle (tokenized), replacing fetch + image normalization.
    load: Callable[..., Any] | None = None
    # Names of the data options ``load`` accepts (--vocab-size -> "vocab_size", ...).
    options: tuple[str, ...] = ()
    # Training options that depend on the data's size (a small set wants smaller batches and more
    # epochs); applied over the model's own defaults, under what the user gives.
    train_defaults: dict = field(default_factory=dict)


DATASETS: Registry[DatasetEntry] = Registry("dataset", list_command="dlkit datasets")


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    return DATASETS.add(entry.name, entry)
