"""How datasets are split: a seeded validation split, and a stratified test split."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlkit.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor


def split_indices(n: int, val_fraction: float, seed: int) -> "tuple[Tensor, Tensor]":
    """``(train_idx, val_idx)``: ``round(val_fraction * n)`` samples chosen by ``torch.randperm``
    seeded with ``seed`` go to validation; both index lists keep the original order."""
    import torch

    n_val = int(round(val_fraction * n))
    if n and n_val >= n:
        raise UsageError(f"val_fraction={val_fraction} leaves no training samples out of {n}",
                         hint="use a smaller val_fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[perm[:n_val]] = True
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def stratified_test_mask(labels, test_fraction: float = 0.2, seed: int = 0):
    """Boolean mask of the test samples: ``round(test_fraction * n)`` of each class, chosen by
    ``numpy.random.RandomState(seed)`` (digits and text-csv hold out their test split this way)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        mask[idx[: int(round(test_fraction * len(idx)))]] = True
    return mask
