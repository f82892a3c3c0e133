"""The imdb dataset: Stanford's Large Movie Review Dataset (``aclImdb_v1.tar.gz``, MD5
``7c2ac02c03563afcf9b574c7e56c153a``): ``aclImdb/{train,test}/{neg,pos}/*.txt``, 25000
reviews per split, label 0 = neg, 1 = pos. Looked up in the usual order (``--data-dir``, the
cache, system folders, download): a folder counts when it is (or holds) the extracted
``aclImdb`` tree, or holds the archive. An archive is checked member by member and only the
review files are extracted, into the cache (``dlkit.data.archive``: no path traversal, no
links leaving the folder). The tokenized result is cached as safetensors, keyed by the tree
(folder path, file counts and modification times) and the tokenizer options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dlkit.data import sources
from dlkit.data.archive import safe_extract
from dlkit.data.registry import DatasetEntry, register_dataset
from dlkit.data.sources import FileSet, RemoteFile
from dlkit.data.splits import split_indices
from dlkit.data.text import check_options, decode_utf8, no_raw, split_state, text_bundle
from dlkit.data.tokenizer import (DEFAULT_MAX_LEN, DEFAULT_VOCAB, TOKENIZER, HFTokenizer, Tokenizer,
                                  check_tokenizer_option, make_tokenizer, note_truncated, saved_tokenizer,
                                  tokenizer_options)
from dlkit.errors import DataError
from dlkit.spec import TEXT, DataSpec

if TYPE_CHECKING:
    from dlkit.data import DataBundle

log = logging.getLogger("dlkit")

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
            shutil.rmtree(tree)
        os.replace(staging / "aclImdb", tree)
    finally:
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
    return decode_utf8(data, path)


def _tree_fingerprint(tree: Path) -> list:
    out = []
    for s in _SPLITS:
        for lab in IMDB_LABELS:
            d = tree / s / lab
            out.append([s, lab, sum(1 for _ in os.scandir(d)), d.stat().st_mtime_ns])
    return out


def _imdb_cache_path(tree: Path, vocab_size: int, max_len: int, val_fraction: float, seed: int,
                     tokenizer: str = TOKENIZER) -> Path:
    key = json.dumps({"tree": str(tree.resolve()), "files": _tree_fingerprint(tree), "vocab_size": vocab_size,
                      "max_len": max_len, "val_fraction": val_fraction, "seed": seed, "tokenizer": tokenizer})
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
    check_options("imdb", options, OPTIONS)
    tokenizer_options(options)  # bad values fail before any reading
    check_tokenizer_option(options)
    val_fraction, seed = split_state(state, val_fraction, seed)
    tree, source = _find_tree(Path(data_dir) if data_dir is not None else None, download, progress)
    if state is not None:
        tok = saved_tokenizer(state, options)
        vocab_size, max_len = state["tokenizer"].get("vocab_size"), tok.max_len
    elif (options.get("tokenizer") or "").startswith("hf:"):
        tok, vocab_size = make_tokenizer(options, ())
        max_len = tok.max_len
    else:
        tok = None
        vocab_size, max_len = tokenizer_options(options)
    kind = tok.digest if isinstance(tok, HFTokenizer) else TOKENIZER  # a model's tokenizer: by its content
    cache = _imdb_cache_path(tree, vocab_size, max_len, val_fraction, seed, kind)
    hit = _read_cache(cache)
    if hit is not None and (tok is None or hit[1].get("digest") == tok.digest):
        arrays, extra = hit
        tok = tok or Tokenizer(extra["vocab"], max_len)
        log.info("using the tokenized reviews cached in %s", cache)
        note_truncated(extra["truncated"], extra["total"], max_len)
    else:
        arrays, tok = _encode_tree(tree, tok, vocab_size, max_len, val_fraction, seed, cache)
    return text_bundle("imdb", tok, IMDB_LABELS, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                       arrays["y_test"], val_fraction=val_fraction, seed=seed, source=source,
                       state={"tokenizer": tok.to_state(vocab_size)}, train_idx=arrays["train_idx"])


def _find_tree(data_dir: Path | None, download: bool, progress) -> tuple[Path, str]:
    """(the extracted aclImdb tree, where it came from): found, or downloaded and extracted."""
    hit = find_imdb(data_dir)
    if hit is None:
        found = sources.fetch(IMDB, data_dir, download=download, progress=progress)
        hit = (found.kind, found.paths[IMDB_ARCHIVE], False)
    kind, where, is_tree = hit
    if data_dir is not None and kind not in ("data-dir", "download"):
        log.warning("imdb is not in --data-dir %s; using %s", data_dir, where)
    tree = where if is_tree else extract_imdb(where)
    return tree, f"{where} ({'downloaded' if kind == 'download' else kind})"


def _encode_tree(tree: Path, tok: Tokenizer | None, vocab_size: int, max_len: int, val_fraction: float,
                 seed: int, cache: Path) -> tuple[dict, Tokenizer]:
    """Read and encode every review (building the vocabulary on the training part if ``tok`` is None);
    the arrays are written to ``cache`` for the next load."""
    splits = read_imdb_tree(tree)
    texts_train, y_train = splits["train"]
    texts_test, y_test = splits["test"]
    train_idx, _ = split_indices(len(texts_train), val_fraction, seed)
    if tok is None:
        tok = Tokenizer.build((texts_train[i] for i in train_idx.tolist()), vocab_size, max_len)
    x_train, t1 = tok.encode(texts_train)
    x_test, t2 = tok.encode(texts_test)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
              "train_idx": train_idx.numpy()}
    total = len(texts_train) + len(texts_test)
    note_truncated(t1 + t2, total, max_len)
    _write_cache(cache, arrays, {"vocab": tok.vocab, "digest": tok.digest, "truncated": t1 + t2, "total": total})
    return arrays, tok


OPTIONS = ("vocab_size", "max_len", "tokenizer")
IMDB_SPEC = DataSpec(TEXT, (DEFAULT_MAX_LEN,), 2, vocab_size=DEFAULT_VOCAB, class_names=IMDB_LABELS)

register_dataset(DatasetEntry(
    name="imdb", spec=IMDB_SPEC,
    description="IMDB movie reviews, positive/negative (25000 train / 25000 test); word tokens",
    fetch=no_raw, locate=_locate_imdb, load=load_imdb, options=OPTIONS,
))
