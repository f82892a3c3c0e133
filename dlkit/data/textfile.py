"""The text-csv dataset: the user's own labelled texts.

``--data-file FILE`` (``.csv``, ``.tsv`` or ``.jsonl``, UTF-8) with ``--text-column`` (default
``text``) and ``--label-column`` (default ``label``). Labels are mapped to ids in sorted order
(numerically when they are all integers); their names are kept in the data state. A
stratified 20% of each class (``numpy.random.RandomState(0)``, independent of ``--seed``) is
the test split. Evaluated on another file (``evaluate --data-file``), every row of that file
is test data, encoded with the saved vocabulary and label names.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dlkit.data.registry import DatasetEntry, register_dataset
from dlkit.data.splits import split_indices, stratified_test_mask
from dlkit.data.text import check_options, decode_utf8, no_raw, split_state, text_bundle
from dlkit.data.tokenizer import (DEFAULT_MAX_LEN, DEFAULT_VOCAB, check_tokenizer_option, make_tokenizer,
                                  note_truncated, saved_tokenizer, tokenizer_options)
from dlkit.errors import DataError, UsageError
from dlkit.spec import TEXT, DataSpec

if TYPE_CHECKING:
    from dlkit.data import DataBundle

log = logging.getLogger("dlkit")

TEST_FRACTION = 0.2  # share of each class held out for testing
FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".ndjson": None}


def read_table(path: str | Path, text_column: str = "text",
               label_column: str = "label") -> tuple[list[str], list[str]]:
    """Texts and label strings from a UTF-8 ``.csv``/``.tsv``/``.jsonl`` file."""
    path = Path(path).expanduser()
    fmt = path.suffix.lower()
    if fmt not in FORMATS:
        raise UsageError(f"{path}: unknown file type '{path.suffix}'",
                         hint=f"use one of {', '.join(FORMATS)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", hint="check --data-file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if not data.strip():
        raise DataError(f"{path} is empty", hint="a header line and one row per labelled text are needed")
    text = decode_utf8(data, path)
    if FORMATS[fmt] is None:
        rows = _read_jsonl(text, path, (text_column, label_column))
    else:
        rows = _read_csv(text, path, FORMATS[fmt], (text_column, label_column))
    texts, labels = [], []
    for line, t, lab in rows:
        if lab == "":
            raise DataError(f"{path} line {line}: empty label in column '{label_column}'",
                            hint="every row needs a label; remove unlabelled rows")
        texts.append(t)
        labels.append(lab)
    if not texts:
        raise DataError(f"{path} has no rows, only a header", hint="add one row per labelled text")
    return texts, labels


def _missing(path: Path, columns: Sequence[str], have: Sequence[str]) -> DataError:
    flags = {0: "--text-column", 1: "--label-column"}
    missing = [f"'{c}' ({flags[i]})" for i, c in enumerate(columns) if c not in have]
    return DataError(f"{path} has no column {' or '.join(missing)}; its columns: "
                     f"{', '.join(repr(h) for h in have) or 'none'}",
                     hint="name the columns with --text-column and --label-column")


def _read_csv(text: str, path: Path, delimiter: str, columns: tuple[str, str]):
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, 1 << 26))  # long reviews exceed the default 128 KiB per field
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        if not all(c in header for c in columns):
            raise _missing(path, columns, header)
        ti, li = header.index(columns[0]), header.index(columns[1])
        rows = []
        for row in reader:
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {reader.line_num}: {len(row)} fields, the header has "
                                f"{len(header)}", hint="quote fields that contain the delimiter")
            rows.append((reader.line_num, row[ti], row[li].strip()))
        return rows
    except csv.Error as err:
        raise DataError(f"{path} is not valid {'CSV' if delimiter == ',' else 'TSV'} ({err})") from None
    finally:
        csv.field_size_limit(old)


def _label_str(value) -> str:
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else json.dumps(value)


def _read_jsonl(text: str, path: Path, columns: tuple[str, str]):
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n} is not JSON ({err.msg})",
                            hint="a .jsonl file holds one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {n} is not a JSON object")
        if not all(c in obj for c in columns):
            raise _missing(path, columns, list(obj)) if not rows else DataError(
                f"{path} line {n} lacks {' or '.join(repr(c) for c in columns if c not in obj)}")
        t = obj[columns[0]]
        rows.append((n, t if isinstance(t, str) else ("" if t is None else str(t)), _label_str(obj[columns[1]])))
    return rows


def label_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels in id order: numerically if all are integers, else as strings."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _file_digest(path: Path) -> str:
    from dlkit.data.download import file_digest

    return "sha256:" + file_digest(path, "sha256")


def load_text_file(*, data_dir=None, val_fraction: float = 0.1, seed: int = 0, download: bool = True,
                   state: dict | None = None, progress=None, options: dict | None = None) -> "DataBundle":
    options = dict(options or {})
    check_options("text-csv", options, OPTIONS)
    tokenizer_options(options)  # bad values fail before any reading
    check_tokenizer_option(options)
    val_fraction, seed = split_state(state, val_fraction, seed)
    own = state is not None and state.get("dataset") == "text-csv"
    saved_file = state.get("file") if own else None
    file = options.get("data_file") or saved_file
    if not file:
        raise UsageError("dataset 'text-csv' needs a file", hint="pass --data-file reviews.csv")
    path = Path(file).expanduser().resolve()
    text_col = options.get("text_column") or (state.get("text_column") if own else None) or "text"
    label_col = options.get("label_column") or (state.get("label_column") if own else None) or "label"
    texts, labels = read_table(path, text_col, label_col)
    digest = _file_digest(path)
    info = {"file": str(path), "file_sha256": digest, "text_column": text_col, "label_column": label_col,
            "test_fraction": TEST_FRACTION}

    if own and saved_file and str(path) != saved_file:
        return _other_file(path, texts, labels, state, options, info, val_fraction, seed)
    if own and state.get("file_sha256") not in (None, digest):
        log.warning("%s changed since the artifact was trained; its splits may differ", path)

    names = list(state["labels"]) if own else label_names(labels)
    if len(names) < 2:
        raise DataError(f"{path}: every label in column '{label_col}' is {names[0]!r}; a classifier "
                        "needs at least two classes", hint="check --label-column")
    ids = _label_ids(labels, names, path)
    test = _test_mask(ids, path)
    tr = np.flatnonzero(~test)
    texts_train = [texts[i] for i in tr]
    texts_test = [texts[i] for i in np.flatnonzero(test)]
    tok, train_idx, vocab_size = _build_or_reuse(texts_train, state, options, val_fraction, seed)
    x_train, t1 = tok.encode(texts_train)
    x_test, t2 = tok.encode(texts_test)
    note_truncated(t1 + t2, len(texts), tok.max_len)
    return text_bundle("text-csv", tok, names, x_train, ids[tr], x_test, ids[test], val_fraction=val_fraction,
                       seed=seed, source=str(path), state={**info, "tokenizer": tok.to_state(vocab_size)},
                       train_idx=train_idx)


def _test_mask(ids: np.ndarray, path: Path) -> np.ndarray:
    """The rows held out for testing: a stratified TEST_FRACTION of each class, the same for every seed."""
    test = stratified_test_mask(ids, TEST_FRACTION, seed=0)
    if test.all() or not test.any():
        raise DataError(f"{path} has too few rows ({len(ids)}) to hold out a test split",
                        hint="give at least 3 rows per class")
    return test


def _label_ids(labels: Sequence[str], names: Sequence[str], path: Path) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{path} has labels the model was not trained on: {', '.join(map(repr, unknown[:5]))}",
                        hint=f"its classes: {', '.join(map(repr, names))}")
    return np.asarray([index[lab] for lab in labels], dtype=np.int64)


def _other_file(path, texts, labels, state, options, info, val_fraction, seed) -> "DataBundle":
    """Every row of another file as test data, with the saved vocabulary and label names."""
    tok = saved_tokenizer(state, options)
    names = list(state["labels"])
    ids = _label_ids(labels, names, path)
    x, truncated = tok.encode(texts)
    note_truncated(truncated, len(texts), tok.max_len)
    empty = np.zeros((0, tok.max_len), dtype=np.int64)
    log.info("evaluating on %s: all %d rows form the test split", path, len(texts))
    return text_bundle("text-csv", tok, names, empty, np.zeros(0, dtype=np.int64), x, ids,
                       val_fraction=val_fraction, seed=seed, source=str(path),
                       state={**info, "tokenizer": tok.to_state(state["tokenizer"].get("vocab_size"))},
                       train_idx=np.zeros(0, dtype=np.int64))


def _build_or_reuse(texts_train: Sequence[str], state: dict | None, options: dict,
                    val_fraction: float, seed: int):
    """The tokenizer (from ``state``, or built on the train part of the split) and train indices."""
    train_idx, _ = split_indices(len(texts_train), val_fraction, seed)
    if state is not None:
        return saved_tokenizer(state, options), train_idx, state["tokenizer"].get("vocab_size")
    tok, vocab_size = make_tokenizer(options, (texts_train[i] for i in train_idx.tolist()))
    return tok, train_idx, vocab_size


OPTIONS = ("data_file", "text_column", "label_column", "vocab_size", "max_len", "tokenizer")
CSV_SPEC = DataSpec(TEXT, (DEFAULT_MAX_LEN,), 2, vocab_size=DEFAULT_VOCAB)

register_dataset(DatasetEntry(
    name="text-csv", spec=CSV_SPEC,
    description="your own labelled text: --data-file FILE.csv|.tsv|.jsonl --text-column --label-column",
    fetch=no_raw, locate=lambda data_dir=None: "--data-file (your own)", load=load_text_file,
    options=OPTIONS,
))
