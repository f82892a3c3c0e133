"""Datasets: find, verify, normalize and split them into in-memory tensors.

``load_dataset(name)`` returns a ``DataBundle``: float32 images ``(N, C, H, W)`` normalized per
channel with the training split's mean and std, int64 labels, a validation split carved from the
training set with a seeded ``torch.Generator``, and the untouched test split. ``bundle.state``
records what is needed to prepare the data identically later; pass it back as ``state=`` (an
artifact does) and the same tensors come out.

Importing this package registers the built-in datasets and does not import torch.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dlkit.data.registry import DATASETS, DatasetEntry, RawData, register_dataset
from dlkit.data.splits import split_indices, stratified_test_mask
from dlkit.errors import DataError, UsageError
from dlkit.spec import DataSpec

from dlkit.data import vision  # noqa: E402,F401  (registers digits, mnist, fashion-mnist)
from dlkit.data import cifar  # noqa: E402,F401  (registers cifar10)
from dlkit.data import imdb  # noqa: E402,F401  (registers imdb; tokenizer.py has the tokenizer)
from dlkit.data import textfile  # noqa: E402,F401  (registers text-csv: the user's csv/tsv/jsonl)
from dlkit.data import textlm  # noqa: E402,F401  (registers text-lm and tinyshakespeare: language-model text)

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("dlkit")

STATE_VERSION = 1

__all__ = [
    "DATASETS", "DataBundle", "DatasetEntry", "RawData", "dataset_names", "load_dataset",
    "check_split_args", "locate_dataset", "register_dataset", "spec_for", "split_indices", "stratified_test_mask",
]


@dataclass
class DataBundle:
    """A dataset ready for training: every split as in-memory tensors."""

    name: str
    spec: DataSpec
    train: "tuple[Tensor, Tensor]"
    val: "tuple[Tensor, Tensor]"
    test: "tuple[Tensor, Tensor]"
    source: str
    # JSON-able: dataset, scale, mean, std, val_fraction, seed, num_train (see load_dataset);
    # text: dataset, val_fraction, seed, num_train, labels, tokenizer (vocab, max_len), file...
    state: dict


def dataset_names(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)


def spec_for(dataset: str) -> DataSpec:
    """The shape of ``dataset``: a registered dataset's own spec, else a well-known one."""
    from dlkit.spec import STANDARD_SPECS

    if dataset in DATASETS:
        return DATASETS.get(dataset).spec
    if dataset in STANDARD_SPECS:
        return STANDARD_SPECS[dataset]
    raise UsageError(f"no shape is known for dataset '{dataset}'")


def locate_dataset(name: str, data_dir: str | Path | None = None) -> str | None:
    """Where ``name`` would be loaded from right now (no download, no parsing); None if nowhere."""
    return DATASETS.get(name).locate(Path(data_dir) if data_dir is not None else None)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    state: dict | None = None,
    progress: Callable[[int, int | None, str], None] | None = None,
    options: dict | None = None,
) -> DataBundle:
    """Load a registered dataset as normalized tensors with train/val/test splits.

    Pixels are divided by ``scale`` (255 for uint8 images, else 1), then each channel is
    normalized with the mean and std (population) of the full training split, before the
    validation split is taken. The validation split is ``round(val_fraction * N)`` training
    samples chosen by ``torch.randperm`` with a generator seeded by ``seed``; both splits keep
    the original sample order. Given ``state`` (a previous bundle's), its scale, mean, std,
    val_fraction and seed are used instead, so the result is identical.

    ``progress(done_bytes, total_bytes_or_None, file_name)`` is called while downloading.

    Text datasets (``entry.load``) return int64 token ids ``(N, max_len)``, right-padded with 0,
    and are not normalized; ``options`` carries their settings (``vocab_size``, ``max_len``,
    ``data_file``, ...; see ``dlkit.data.textfile``) and ``state`` their vocabulary.
    """
    entry = DATASETS.get(name)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if entry.load is not None:
        check_split_args(val_fraction, seed)
        return entry.load(data_dir=data_dir, val_fraction=val_fraction, seed=seed, download=download,
                          state=state, progress=progress, options=options)
    if options:
        raise UsageError(f"dataset '{name}' takes no data options ({', '.join(sorted(options))})",
                         hint="--data-file, --vocab-size and the like are for text datasets")
    return _load_images(entry, data_dir=data_dir, val_fraction=val_fraction, seed=seed, download=download,
                        state=state, progress=progress)


def _load_images(entry: DatasetEntry, *, data_dir, val_fraction: float, seed: int, download: bool,
                 state: dict | None, progress) -> DataBundle:
    """An image dataset: fetched raw, normalized with the training split's (or the state's) statistics."""
    import torch

    if state is not None:
        scale, mean, std, val_fraction, seed = _read_state(state, entry.name, entry.spec)
    check_split_args(val_fraction, seed)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    raw = entry.fetch(data_dir=data_dir, download=download, progress=progress)
    _check_raw(raw, entry)
    if state is None:
        scale = 255.0 if raw.x_train.dtype == torch.uint8 else 1.0
        mean, std = channel_stats(raw.x_train, scale)
    elif state.get("num_train") not in (None, len(raw.x_train)):
        log.warning("%s now has %d training samples, the saved state was made with %s; "
                    "the validation split will differ", entry.name, len(raw.x_train), state["num_train"])
    new_state = {"version": STATE_VERSION, "dataset": entry.name, "scale": scale, "mean": list(mean),
                 "std": list(std), "val_fraction": float(val_fraction), "seed": int(seed),
                 "num_train": len(raw.x_train)}
    return _image_bundle(entry, raw, new_state)


def _image_bundle(entry: DatasetEntry, raw: RawData, state: dict) -> DataBundle:
    """Split off validation (seeded) and normalize every split as ``state`` says."""
    import torch

    scale, mean, std = state["scale"], state["mean"], state["std"]
    train_idx, val_idx = split_indices(len(raw.x_train), state["val_fraction"], state["seed"])
    y_all = raw.y_train.to(torch.int64)
    # Select before converting: gathering uint8 is 4x cheaper than gathering float32.
    x_train = raw.x_train if len(val_idx) == 0 else raw.x_train[train_idx]
    return DataBundle(
        name=entry.name,
        spec=entry.spec,
        train=(normalize(x_train, scale, mean, std), y_all[train_idx]),
        val=(normalize(raw.x_train[val_idx], scale, mean, std), y_all[val_idx]),
        test=(normalize(raw.x_test, scale, mean, std), raw.y_test.to(torch.int64)),
        source=raw.source,
        state=state,
    )


def channel_stats(x: "Tensor", scale: float = 1.0) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of ``x / scale`` over (N, H, W), as Python floats.

    uint8 images are summarised exactly through a 256-bin histogram (no float copy of the data).
    A constant channel gets std 1 (and a logged warning) rather than a division by zero.
    """
    import torch

    means, stds = [], []
    for c in range(x.shape[1]):
        xc = x[:, c].reshape(-1)
        if x.dtype == torch.uint8:
            counts = torch.bincount(xc, minlength=256).double()
            values = torch.arange(256, dtype=torch.float64) / scale
            total = counts.sum()
            mean = (counts * values).sum() / total
            var = (counts * (values - mean) ** 2).sum() / total
        else:
            xd = xc.double() / scale
            mean = xd.mean()
            var = ((xd - mean) ** 2).mean()
        std = math.sqrt(var.item())
        if not std > 0:
            log.warning("channel %d is constant; normalizing it with std 1", c)
            std = 1.0
        means.append(mean.item())
        stds.append(std)
    return means, stds


def normalize(x: "Tensor", scale: float, mean: list[float], std: list[float]) -> "Tensor":
    """``(x / scale - mean) / std`` per channel, as a new float32 tensor."""
    import torch

    shape = (1, len(mean)) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    a = (1.0 / (scale * s)).to(torch.float32).view(shape)
    b = (m / s).to(torch.float32).view(shape)
    return x.to(torch.float32).mul_(a).sub_(b)


def check_split_args(val_fraction, seed) -> None:
    """val_fraction in [0, 1) and an integer seed, or a UsageError."""
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real)
            or not 0 <= val_fraction < 1):
        raise UsageError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}",
                         hint="e.g. 0.1 keeps 10% of the training set for validation")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise UsageError(f"seed must be an integer, got {seed!r}")


def _read_state(state: dict, name: str, spec: DataSpec):
    try:
        if state.get("dataset", name) != name:
            raise UsageError(f"the saved data state is for '{state['dataset']}', not '{name}'",
                             hint="load the dataset the state was made for")
        channels = spec.input_shape[0]
        scale = float(state["scale"])
        mean = [float(v) for v in state["mean"]]
        std = [float(v) for v in state["std"]]
        if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
            raise ValueError("mean/std do not match the channels")
        return scale, mean, std, state["val_fraction"], state["seed"]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"the saved data state for '{name}' is malformed ({err})",
                        hint="the artifact may be damaged; retrain or pass no state") from None


def _check_raw(raw: RawData, entry: DatasetEntry) -> None:
    spec = entry.spec
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if tuple(x.shape[1:]) != spec.input_shape or x.dim() != 4:
            raise DataError(f"{entry.name} {split} images have shape {tuple(x.shape)}, "
                            f"expected (N, {', '.join(map(str, spec.input_shape))})")
        if y.dim() != 1 or len(y) != len(x):
            raise DataError(f"{entry.name} {split}: {len(x)} images but {tuple(y.shape)} labels")
