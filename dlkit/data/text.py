"""What the text classification datasets share: options, the split state, UTF-8 decoding, the bundle.

The datasets: ``imdb`` (dlkit.data.imdb) and ``text-csv``, the user's own file (dlkit.data.textfile);
both encode with the word tokenizer of dlkit.data.tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dlkit.data.tokenizer import Tokenizer  # also imported from here by benchmarks/text.py
from dlkit.errors import DataError, UsageError
from dlkit.spec import TEXT, DataSpec

if TYPE_CHECKING:
    from dlkit.data import DataBundle


def check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    """Refuse options the dataset does not take (a value of None counts as not given)."""
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise UsageError(f"dataset '{name}' takes no option {', '.join(unknown)}",
                         hint=f"its options: {', '.join(allowed)}")


def split_state(state: dict | None, val_fraction: float, seed: int) -> tuple[float, int]:
    """The validation split's (val_fraction, seed): a saved state's own, else those given."""
    if state is None:
        return val_fraction, seed
    try:
        return float(state["val_fraction"]), int(state["seed"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"the saved data state is malformed ({err})",
                        hint="the artifact may be damaged; retrain or pass no state") from None


def text_bundle(name: str, tok: Tokenizer, class_names: Sequence[str], x_train: np.ndarray,
                y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, val_fraction: float,
                seed: int, source: str, state: dict, train_idx) -> "DataBundle":
    """Assemble the bundle; ``train_idx`` are the training rows the vocabulary was built on, the
    other training rows are validation, in order."""
    import torch

    from dlkit.data import DataBundle

    train_idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64)
    is_val = torch.ones(len(x_train), dtype=torch.bool)
    is_val[train_idx] = False
    val_idx = is_val.nonzero().squeeze(1)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    spec = DataSpec(TEXT, (tok.max_len,), len(class_names), vocab_size=tok.vocab_size,
                    class_names=tuple(class_names))
    full_state = {"version": 1, "dataset": name, "val_fraction": float(val_fraction), "seed": int(seed),
                  "num_train": len(x_train), "labels": list(class_names), **state}
    return DataBundle(name=name, spec=spec, train=(xt[train_idx], yt[train_idx]),
                      val=(xt[val_idx], yt[val_idx]),
                      test=(torch.from_numpy(x_test), torch.from_numpy(y_test)),
                      source=source, state=full_state)


def decode_utf8(data: bytes, path: Path) -> str:
    """The text of a file's bytes (a UTF-8 BOM dropped); where it is not UTF-8, one clear error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line} "
                        f"(offset {err.start}) cannot be decoded",
                        hint=f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None


def no_raw(*args, **kwargs):
    """The registry's ``fetch`` for text datasets: they have no raw arrays to fetch."""
    raise UsageError("text datasets load through dlkit.data.load_dataset, not fetch()")
