"""Text classification data: a word-level tokenizer, IMDB reviews, and the user's own files.

The tokenizer (``words-v1``)
    1. lower-case the text and replace HTML line breaks (``<br />``, as in IMDB) by spaces;
    2. words are the runs of letters and digits (any script), with inner apostrophes kept:
       ``"Don't stop -- 10/10!"`` -> ``don't stop 10 10``; all other characters separate words;
    3. the vocabulary is built on the training split only (never validation or test): id 0 is
       padding (``<pad>``), id 1 unknown words (``<unk>``), then the most frequent words (ties in
       alphabetical order) until ``vocab_size`` ids are used;
    4. a text becomes its first ``max_len`` ids, right-padded with 0. Longer texts are truncated
       (one note is logged per load, with how many were). Defaults: vocabulary 10000, max length
       100, as in the classic Keras IMDB example.
    The vocabulary and ``max_len`` are kept in the data state (``bundle.state["tokenizer"]``),
    which an artifact's manifest stores, so ``evaluate`` and later steps encode text the same way.

imdb
    Stanford's Large Movie Review Dataset (``aclImdb_v1.tar.gz``, MD5
    ``7c2ac02c03563afcf9b574c7e56c153a``): ``aclImdb/{train,test}/{neg,pos}/*.txt``, 25000
    reviews per split, label 0 = neg, 1 = pos. Looked up in the usual order (``--data-dir``, the
    cache, system folders, download): a folder counts when it is (or holds) the extracted
    ``aclImdb`` tree, or holds the archive. An archive is checked member by member and only the
    review files are extracted, into the cache (``dlkit.data.archive``: no path traversal, no
    links leaving the folder). The tokenized result is cached as safetensors, keyed by the tree
    (folder path, file counts and modification times) and the tokenizer options.

text-csv
    ``--data-file FILE`` (``.csv``, ``.tsv`` or ``.jsonl``, UTF-8) with ``--text-column`` (default
    ``text``) and ``--label-column`` (default ``label``). Labels are mapped to ids in sorted order
    (numerically when they are all integers); their names are kept in the data state. A
    stratified 20% of each class (``numpy.random.RandomState(0)``, independent of ``--seed``) is
    the test split. Evaluated on another file (``evaluate --data-file``), every row of that file
    is test data, encoded with the saved vocabulary and label names.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from dlkit.data import sources
from dlkit.data.archive import safe_extract
from dlkit.data.registry import DatasetEntry, register_dataset
from dlkit.data.sources import FileSet, RemoteFile
from dlkit.errors import DataError, UsageError
from dlkit.spec import TEXT, DataSpec

if TYPE_CHECKING:
    from dlkit.data import DataBundle

log = logging.getLogger("dlkit")

TOKENIZER = "words-v1"
PAD, UNK = "<pad>", "<unk>"
DEFAULT_VOCAB = 10000
DEFAULT_MAX_LEN = 100
TEST_FRACTION = 0.2  # text-csv: share of each class held out for testing

_BREAK = re.compile(r"<br\s*/?>")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(text: str) -> list[str]:
    """The words of ``text`` as the tokenizer sees them (see the module docstring)."""
    return _WORD.findall(_BREAK.sub(" ", text.lower()))


@dataclass
class Tokenizer:
    """A fixed vocabulary (``vocab[0]`` is padding, ``vocab[1]`` unknown) and a sequence length."""

    vocab: list[str]
    max_len: int

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB,
              max_len: int = DEFAULT_MAX_LEN) -> "Tokenizer":
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(words(t))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([PAD, UNK] + [w for w, _ in ranked[: vocab_size - 2]], max_len)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """``(ids, truncated)``: int64 ``(len(texts), max_len)`` right-padded with 0, and how many
        texts had more than ``max_len`` words."""
        index = {w: i for i, w in enumerate(self.vocab) if i > 1}
        out = np.zeros((len(texts), self.max_len), dtype=np.int64)
        truncated = 0
        get = index.get
        for i, t in enumerate(texts):
            toks = words(t)
            if len(toks) > self.max_len:
                truncated += 1
                toks = toks[: self.max_len]
            out[i, : len(toks)] = [get(w, 1) for w in toks]
        return out, truncated

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()

    def to_state(self, requested_vocab: int) -> dict:
        return {"name": TOKENIZER, "vocab_size": requested_vocab, "max_len": self.max_len,
                "vocab": list(self.vocab)}

    @classmethod
    def from_state(cls, d: dict) -> "Tokenizer":
        try:
            if d.get("name") != TOKENIZER:
                raise ValueError(f"unknown tokenizer {d.get('name')!r}")
            vocab = [str(w) for w in d["vocab"]]
            max_len = int(d["max_len"])
            if len(vocab) < 3 or vocab[:2] != [PAD, UNK] or max_len < 1:
                raise ValueError("bad vocabulary or max_len")
            return cls(vocab, max_len)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"the saved tokenizer is malformed ({err})",
                            hint="the artifact may be damaged; retrain it") from None


# ---------------------------------------------------------------------------------------------
# options and the bundle shared by the text datasets


def _int_option(options: dict, key: str, default: int, minimum: int) -> int:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        flag = "--" + key.replace("_", "-")
        raise UsageError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(k for k, v in options.items() if k not in allowed and v is not None)
    if unknown:
        raise UsageError(f"dataset '{name}' takes no option {', '.join(unknown)}",
                         hint=f"its options: {', '.join(allowed)}")


def _tokenizer_options(options: dict) -> tuple[int, int]:
    return (_int_option(options, "vocab_size", DEFAULT_VOCAB, 3),
            _int_option(options, "max_len", DEFAULT_MAX_LEN, 1))


def _state_tokenizer(state: dict, options: dict) -> Tokenizer:
    tok = Tokenizer.from_state(state.get("tokenizer") or {})
    for key, saved in (("max_len", tok.max_len), ("vocab_size", state["tokenizer"].get("vocab_size"))):
        if options.get(key) not in (None, saved):
            log.warning("the saved tokenizer has %s=%s; ignoring %s=%s", key, saved, key, options[key])
    return tok


def _note_truncated(truncated: int, total: int, max_len: int) -> None:
    if truncated:
        log.info("%d of %d texts are longer than max_len=%d words and were truncated to their "
                 "first %d (--max-len changes it)", truncated, total, max_len, max_len)


def _split_state(state: dict | None, val_fraction: float, seed: int) -> tuple[float, int]:
    if state is None:
        return val_fraction, seed
    try:
        return float(state["val_fraction"]), int(state["seed"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"the saved data state is malformed ({err})",
                        hint="the artifact may be damaged; retrain or pass no state") from None


def _bundle(name: str, tok: Tokenizer, class_names: Sequence[str], x_train: np.ndarray,
            y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *, val_fraction: float,
            seed: int, source: str, state: dict, train_idx=None) -> "DataBundle":
    """Split encoded training data into train/val and assemble the bundle."""
    import torch

    from dlkit.data import DataBundle, split_indices

    if train_idx is None:
        train_idx, val_idx = split_indices(len(x_train), val_fraction, seed)
    else:  # the indices the vocabulary was built on; the rest is validation, in order
        train_idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64)
        is_val = torch.ones(len(x_train), dtype=torch.bool)
        is_val[train_idx] = False
        val_idx = is_val.nonzero().squeeze(1)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    spec = DataSpec(TEXT, (tok.max_len,), len(class_names), vocab_size=len(tok.vocab),
                    class_names=tuple(class_names))
    full_state = {"version": 1, "dataset": name, "val_fraction": float(val_fraction), "seed": int(seed),
                  "num_train": len(x_train), "labels": list(class_names), **state}
    return DataBundle(name=name, spec=spec, train=(xt[train_idx], yt[train_idx]),
                      val=(xt[val_idx], yt[val_idx]),
                      test=(torch.from_numpy(x_test), torch.from_numpy(y_test)),
                      source=source, state=full_state)


def _build_or_reuse(texts_train: Sequence[str], state: dict | None, options: dict,
                    val_fraction: float, seed: int):
    """The tokenizer (from ``state``, or built on the train part of the split) and train indices."""
    from dlkit.data import split_indices

    train_idx, _ = split_indices(len(texts_train), val_fraction, seed)
    if state is not None:
        return _state_tokenizer(state, options), train_idx, state["tokenizer"].get("vocab_size")
    vocab_size, max_len = _tokenizer_options(options)
    idx = train_idx.tolist()
    return Tokenizer.build((texts_train[i] for i in idx), vocab_size, max_len), train_idx, vocab_size


# ---------------------------------------------------------------------------------------------
# imdb

IMDB_ARCHIVE = "aclImdb_v1.tar.gz"
IMDB = FileSet(
    name="imdb",
    files=(RemoteFile(IMDB_ARCHIVE, "md5:7c2ac02c03563afcf9b574c7e56c153a", remote=IMDB_ARCHIVE),),
    mirrors=("https://ai.stanford.edu/~amaas/data/sentiment/",),
    hint="or pass --data-dir with the extracted aclImdb/ folder",
)
IMDB_LABELS = ("neg", "pos")
_SPLITS = ("train", "test")
_REVIEW = re.compile(r"aclImdb/(train|test)/(neg|pos)/[^/]+\.txt")
_STAMP = ".dlkit-extracted.json"


def _is_tree(d: Path) -> bool:
    return all((d / s / lab).is_dir() for s in _SPLITS for lab in IMDB_LABELS)


def find_imdb(data_dir: Path | None = None) -> tuple[str, Path, bool] | None:
    """The first place holding IMDB: ``(kind, tree_or_archive, is_tree)``."""
    for kind, folder in sources.candidates(IMDB.name, data_dir):
        if not folder.is_dir():
            continue
        for d in (folder, folder / "aclImdb"):
            if _is_tree(d):
                return kind, d, True
        if (folder / IMDB_ARCHIVE).is_file():
            return kind, folder / IMDB_ARCHIVE, False
    return None


def _locate_imdb(data_dir: Path | None = None) -> str | None:
    hit = find_imdb(Path(data_dir) if data_dir is not None else None)
    return f"{hit[1]} ({hit[0]})" if hit else None


def extract_imdb(archive: Path) -> Path:
    """The review files of ``archive``, extracted (once) into the cache; returns the tree."""
    st = archive.stat()
    stamp = {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    root = sources.cache_dir(IMDB.name)
    tree = root / "aclImdb"
    try:
        if json.loads((tree / _STAMP).read_text()) == stamp and _is_tree(tree):
            return tree
    except (OSError, ValueError):
        pass
    ok, actual = _verify(archive)
    if not ok:
        log.warning("%s has %s, not the published %s; using it anyway", archive, actual,
                    IMDB.files[0].checksum)
    log.info("extracting the reviews of %s into %s", archive, root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / "extract"
    safe_extract(archive, staging, select=lambda n: bool(_REVIEW.fullmatch(n)))
    try:
        if not _is_tree(staging / "aclImdb"):
            raise DataError(f"{archive} holds no aclImdb/{{train,test}}/{{neg,pos}}/ reviews",
                            hint="is this the IMDB archive (aclImdb_v1.tar.gz)?")
        (staging / "aclImdb" / _STAMP).write_text(json.dumps(stamp))
        if tree.exists():
            import shutil

            shutil.rmtree(tree)
        os.replace(staging / "aclImdb", tree)
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return tree


def _verify(path: Path) -> tuple[bool, str]:
    from dlkit.data.download import verify

    return verify(path, IMDB.files[0].checksum)


def read_imdb_tree(tree: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{"train": (texts, labels), "test": ...}``; files in name order, neg (0) before pos (1)."""
    out = {}
    for split in _SPLITS:
        texts: list[str] = []
        labels: list[int] = []
        for label, lab in enumerate(IMDB_LABELS):
            folder = tree / split / lab
            files = sorted(e.path for e in os.scandir(folder) if e.name.endswith(".txt") and e.is_file())
            if not files:
                raise DataError(f"{folder} holds no reviews (*.txt)", hint="the aclImdb folder is incomplete")
            for f in files:
                texts.append(_read_text(Path(f)))
            labels += [label] * len(files)
        out[split] = (texts, np.asarray(labels, dtype=np.int64))
    return out


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return _decode(data, path)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line} "
                        f"(offset {err.start}) cannot be decoded",
                        hint=f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None


def _tree_fingerprint(tree: Path) -> list:
    out = []
    for s in _SPLITS:
        for lab in IMDB_LABELS:
            d = tree / s / lab
            out.append([s, lab, sum(1 for _ in os.scandir(d)), d.stat().st_mtime_ns])
    return out


def _imdb_cache_path(tree: Path, vocab_size: int, max_len: int, val_fraction: float, seed: int) -> Path:
    key = json.dumps({"tree": str(tree.resolve()), "files": _tree_fingerprint(tree), "vocab_size": vocab_size,
                      "max_len": max_len, "val_fraction": val_fraction, "seed": seed, "tokenizer": TOKENIZER})
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return sources.cache_dir(IMDB.name) / "tokenized" / f"{digest}.safetensors"


def _read_cache(path: Path) -> tuple[dict, dict] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        extra = json.loads(meta["dlkit"])
        if set(arrays) != {"x_train", "y_train", "x_test", "y_test", "train_idx"}:
            return None
        return arrays, extra
    except Exception as err:  # a damaged cache file is rebuilt, never trusted
        log.warning("ignoring the damaged token cache %s (%s)", path, err)
        return None


def _write_cache(path: Path, arrays: dict, extra: dict) -> None:
    from safetensors.numpy import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                  metadata={"dlkit": json.dumps(extra)})
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache the tokenized IMDB reviews in %s (%s)", path.parent, err)


def load_imdb(*, data_dir=None, val_fraction: float = 0.1, seed: int = 0, download: bool = True,
              state: dict | None = None, progress=None, options: dict | None = None) -> "DataBundle":
    options = dict(options or {})
    _check_options("imdb", options, ("vocab_size", "max_len"))
    _tokenizer_options(options)  # bad values fail before any reading
    data_dir = Path(data_dir) if data_dir is not None else None
    val_fraction, seed = _split_state(state, val_fraction, seed)
    hit = find_imdb(data_dir)
    if hit is None:
        found = sources.fetch(IMDB, data_dir, download=download, progress=progress)
        hit = (found.kind, found.paths[IMDB_ARCHIVE], False)
    kind, where, is_tree = hit
    if data_dir is not None and kind not in ("data-dir", "download"):
        log.warning("imdb is not in --data-dir %s; using %s", data_dir, where)
    tree = where if is_tree else extract_imdb(where)
    source = f"{where} ({'downloaded' if kind == 'download' else kind})"

    if state is not None:
        tok = _state_tokenizer(state, options)
        vocab_size = state["tokenizer"].get("vocab_size")
    else:
        tok, vocab_size = None, _tokenizer_options(options)[0]
    max_len = tok.max_len if tok else _tokenizer_options(options)[1]
    cache = _imdb_cache_path(tree, vocab_size, max_len, val_fraction, seed)
    hit_cache = _read_cache(cache)
    if hit_cache is not None and (tok is None or hit_cache[1].get("digest") == tok.digest):
        arrays, extra = hit_cache
        tok = tok or Tokenizer(extra["vocab"], max_len)
        log.info("using the tokenized reviews cached in %s", cache)
        _note_truncated(extra["truncated"], extra["total"], max_len)
    else:
        splits = read_imdb_tree(tree)
        texts_train, y_train = splits["train"]
        texts_test, y_test = splits["test"]
        from dlkit.data import split_indices

        train_idx, _ = split_indices(len(texts_train), val_fraction, seed)
        if tok is None:
            tok = Tokenizer.build((texts_train[i] for i in train_idx.tolist()), vocab_size, max_len)
        x_train, t1 = tok.encode(texts_train)
        x_test, t2 = tok.encode(texts_test)
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
                  "train_idx": train_idx.numpy()}
        total = len(texts_train) + len(texts_test)
        _note_truncated(t1 + t2, total, max_len)
        _write_cache(cache, arrays, {"vocab": tok.vocab, "digest": tok.digest, "truncated": t1 + t2,
                                     "total": total})
    return _bundle("imdb", tok, IMDB_LABELS, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], val_fraction=val_fraction, seed=seed, source=source,
                   state={"tokenizer": tok.to_state(vocab_size)}, train_idx=arrays["train_idx"])


# ---------------------------------------------------------------------------------------------
# text-csv: the user's own file

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
    text = _decode(data, path)
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
    _check_options("text-csv", options, ("data_file", "text_column", "label_column", "vocab_size", "max_len"))
    _tokenizer_options(options)  # bad values fail before any reading
    val_fraction, seed = _split_state(state, val_fraction, seed)
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
    from dlkit.data.vision import digits_test_mask

    test = digits_test_mask(ids, TEST_FRACTION, seed=0)
    if test.all() or not test.any():
        raise DataError(f"{path} has too few rows ({len(ids)}) to hold out a test split",
                        hint="give at least 3 rows per class")
    tr = np.flatnonzero(~test)
    texts_train = [texts[i] for i in tr]
    texts_test = [texts[i] for i in np.flatnonzero(test)]
    tok, train_idx, vocab_size = _build_or_reuse(texts_train, state, options, val_fraction, seed)
    x_train, t1 = tok.encode(texts_train)
    x_test, t2 = tok.encode(texts_test)
    _note_truncated(t1 + t2, len(texts), tok.max_len)
    return _bundle("text-csv", tok, names, x_train, ids[tr], x_test, ids[test], val_fraction=val_fraction,
                   seed=seed, source=str(path), state={**info, "tokenizer": tok.to_state(vocab_size)},
                   train_idx=train_idx)


def _label_ids(labels: Sequence[str], names: Sequence[str], path: Path) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{path} has labels the model was not trained on: {', '.join(map(repr, unknown[:5]))}",
                        hint=f"its classes: {', '.join(map(repr, names))}")
    return np.asarray([index[lab] for lab in labels], dtype=np.int64)


def _other_file(path, texts, labels, state, options, info, val_fraction, seed) -> "DataBundle":
    """Every row of another file as test data, with the saved vocabulary and label names."""
    tok = _state_tokenizer(state, options)
    names = list(state["labels"])
    ids = _label_ids(labels, names, path)
    x, truncated = tok.encode(texts)
    _note_truncated(truncated, len(texts), tok.max_len)
    empty = np.zeros((0, tok.max_len), dtype=np.int64)
    log.info("evaluating on %s: all %d rows form the test split", path, len(texts))
    return _bundle("text-csv", tok, names, empty, np.zeros(0, dtype=np.int64), x, ids,
                   val_fraction=val_fraction, seed=seed, source=str(path),
                   state={**info, "tokenizer": tok.to_state(state["tokenizer"].get("vocab_size"))},
                   train_idx=np.zeros(0, dtype=np.int64))


def _no_raw(*args, **kwargs):
    raise UsageError("text datasets load through dlkit.data.load_dataset, not fetch()")


IMDB_SPEC = DataSpec(TEXT, (DEFAULT_MAX_LEN,), 2, vocab_size=DEFAULT_VOCAB, class_names=IMDB_LABELS)
CSV_SPEC = DataSpec(TEXT, (DEFAULT_MAX_LEN,), 2, vocab_size=DEFAULT_VOCAB)

register_dataset(DatasetEntry(
    name="imdb", spec=IMDB_SPEC,
    description="IMDB movie reviews, positive/negative (25000 train / 25000 test); word tokens",
    fetch=_no_raw, locate=_locate_imdb, load=load_imdb, options=("vocab_size", "max_len"),
))
register_dataset(DatasetEntry(
    name="text-csv", spec=CSV_SPEC,
    description="your own labelled text: --data-file FILE.csv|.tsv|.jsonl --text-column --label-column",
    fetch=_no_raw, locate=lambda data_dir=None: "--data-file (your own)", load=load_text_file,
    options=("data_file", "text_column", "label_column", "vocab_size", "max_len"),
))
