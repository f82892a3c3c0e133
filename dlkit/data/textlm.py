"""Language-model data: ``text-lm`` (the user's text) and ``tinyshakespeare``.

``--data-file FILE`` is UTF-8 text, or a folder whose ``*.txt`` files (in name order) are joined.
The last ``--val-fraction`` (10%) of the characters is the validation text: a contiguous tail, so
no window overlaps both splits. ``--test-file`` gives a separate test text; without it the test
split is the validation text. The tokenizer (``--tokenizer char|bpe|hf:NAME``, see
dlkit.lm.tokenizer) is made on the training text and saved in the data state, hence the artifact.

Every split is a stream of token ids. The bundle holds the training stream as ``train =
(ids (T,), empty)``: the trainer draws random windows of ``--seq-len`` tokens from it (the targets
are the next tokens). Validation and test are cut into non-overlapping windows, ``(x, y)`` of shape
``(N, seq_len)`` with ``y`` the tokens one position later. The state records each split's number
of tokens, characters and UTF-8 bytes, for bits per character (or byte).

Token ids (and a trained BPE) are cached as safetensors in the data cache
(``<cache>/text-lm/tokens/``), keyed by the file's SHA-256, the split and the tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dlkit.data import sources
from dlkit.data.registry import DatasetEntry, register_dataset
from dlkit.data.sources import FileSet, RemoteFile
from dlkit.data.text import check_options, decode_utf8, no_raw, split_state
from dlkit.errors import DataError, UsageError
from dlkit.spec import LM, TEXT, DataSpec

if TYPE_CHECKING:
    from dlkit.data import DataBundle

log = logging.getLogger("dlkit")

DEFAULT_SEQ_LEN = 64
OPTIONS = ("data_file", "test_file", "tokenizer", "vocab_size", "seq_len")
CACHE_VERSION = 1

SHAKESPEARE = FileSet(
    name="tinyshakespeare",
    files=(RemoteFile("input.txt", "md5:6fb458f1232090904fb40fe944165e91", remote="input.txt"),),
    mirrors=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",),
    hint="a --data-dir holding tinyshakespeare.txt works too; or train on any text with --data-file FILE",
)
SHAKESPEARE_NAMES = ("input.txt", "tinyshakespeare.txt")


# ---- reading ---------------------------------------------------------------------------------------

def read_text(path: str | Path, what: str = "--data-file") -> tuple[str, str]:
    """(the text, its SHA-256) of a UTF-8 file or of a folder's ``*.txt`` files joined in name order."""
    import hashlib

    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path} holds no .txt files", hint=f"point {what} at a text file or a folder of .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path} does not exist", hint=f"check {what}")
    parts, h = [], hashlib.sha256()
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {f}: {err.strerror or err}") from None
        h.update(data)
        parts.append(decode_utf8(data, f))
    text = "".join(parts)
    if not text.strip():
        raise DataError(f"{path} is empty", hint="a language model needs text to learn from")
    return text, h.hexdigest()


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(training text, validation text): the last ``val_fraction`` of the characters is validation."""
    n_val = int(round(len(text) * val_fraction))
    return text[: len(text) - n_val], text[len(text) - n_val :]


def windows(ids, seq_len: int):
    """Non-overlapping ``(x, y)`` windows of a token stream: x = ids[i L : (i+1) L], y one later."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.int64)
    n = max(len(ids) - 1, 0) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return x, y


# ---- the cache ---------------------------------------------------------------------------------------

def _cache_path(key: dict) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return sources.cache_dir("text-lm") / "tokens" / f"{digest}.safetensors"


def _read_cache(path: Path) -> tuple[dict, dict] | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["dlkit"])
            arrays = {k: f.get_tensor(k).astype(np.int64) for k in f.keys()}
        return arrays, meta
    except Exception as err:  # a damaged cache file is rebuilt, never trusted
        log.warning("ignoring the damaged token cache %s (%s)", path, err)
        return None


def _write_cache(path: Path, arrays: dict, meta: dict) -> None:
    from safetensors.numpy import save_file

    small = max((int(a.max()) for a in arrays.values() if a.size), default=0) < 2**31
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: np.ascontiguousarray(v.astype(np.int32 if small else np.int64)) for k, v in arrays.items()},
                  str(tmp), metadata={"dlkit": json.dumps(meta)})
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not cache the token ids in %s (%s)", path.parent, err)


# ---- loading -----------------------------------------------------------------------------------------

def _seq_len(options: dict, state: dict | None) -> int:
    seq_len = options.get("seq_len") or (state or {}).get("seq_len") or DEFAULT_SEQ_LEN
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"--seq-len must be a positive integer (got {seq_len!r})")
    return seq_len


def _short(n_tokens: int, seq_len: int, what: str = "the training text") -> DataError:
    return DataError(f"{what} is {n_tokens:,} tokens, shorter than one window of --seq-len {seq_len} plus its "
                     "next token", hint="give more text or a smaller --seq-len")


def _tokenize(name: str, text: str, digest: str, val_fraction: float, options: dict, state: dict | None,
              seq_len: int):
    """(tokenizer, {"train", "val"} ids, counts): from the cache, or made and cached."""
    from dlkit.lm.tokenizer import build_tokenizer, state_digest, tokenizer_from_state

    saved = (state or {}).get("tokenizer")
    kind = options.get("tokenizer") or "char"
    if saved is not None and options.get("tokenizer") not in (None, saved.get("kind"), saved.get("name")):
        raise UsageError(f"the artifact's tokenizer is {saved.get('kind')}, not {options['tokenizer']}",
                         hint="drop --tokenizer: an artifact always encodes with its own")
    key = {"v": CACHE_VERSION, "text": digest, "val_fraction": val_fraction,
           "tokenizer": state_digest(saved) if saved is not None else [kind, options.get("vocab_size")]}
    path = _cache_path(key)
    hit = _read_cache(path)
    train_text, val_text = split_text(text, val_fraction)
    if hit is not None and {"train", "val"} <= set(hit[0]):
        arrays, meta = hit
        tok = tokenizer_from_state(saved if saved is not None else meta["tokenizer"])
        log.info("using the token ids cached in %s", path)
        return tok, arrays
    if saved is not None:
        tok = tokenizer_from_state(saved)
    else:
        if not train_text:
            raise DataError(f"the {name} text has no training part", hint="lower --val-fraction")
        tok = build_tokenizer(kind, train_text, options.get("vocab_size"))
    arrays = {"train": tok.encode(train_text, what="the training text")}
    if len(arrays["train"]) < seq_len + 1:
        raise _short(len(arrays["train"]), seq_len)
    arrays["val"] = tok.encode(val_text, what="the validation text")
    _write_cache(path, arrays, {"tokenizer": tok.to_state()})
    return tok, arrays


def _counts(text: str, n_tokens: int) -> dict:
    return {"tokens": int(n_tokens), "chars": len(text), "bytes": len(text.encode("utf-8"))}


def lm_bundle(name: str, text: str, digest: str, *, val_fraction: float, seed: int, options: dict,
              state: dict | None, source: str, info: dict) -> "DataBundle":
    """Tokenize, split and window ``text`` (plus ``options['test_file']``) into a DataBundle."""
    import torch

    from dlkit.data import DataBundle

    seq_len = _seq_len(options, state)
    tok, arrays = _tokenize(name, text, digest, val_fraction, options, state, seq_len)
    train_text, val_text = split_text(text, val_fraction)
    train_ids, val_ids = arrays["train"], arrays["val"]
    if len(train_ids) < seq_len + 1:
        raise _short(len(train_ids), seq_len)
    if 0 < len(val_ids) < seq_len + 1:
        raise DataError(f"the validation text (the last {val_fraction:.0%}) is {len(val_ids):,} tokens, shorter "
                        f"than one window of --seq-len {seq_len} plus its next token",
                        hint="give more text, a smaller --seq-len or a larger --val-fraction")
    splits = {"train": _counts(train_text, len(train_ids)), "val": _counts(val_text, len(val_ids))}
    val = windows(val_ids, seq_len)
    test_x, test_y = val  # the same tensors: the test split is the validation text
    splits["test"] = splits["val"]
    test_file = options.get("test_file") or (state or {}).get("test_file")
    if test_file:
        test_text, test_digest = read_text(test_file, "--test-file")
        test_ids = tok.encode(test_text, what=str(test_file))
        if len(test_ids) < seq_len + 1:
            raise _short(len(test_ids), seq_len, str(test_file))
        test_x, test_y = windows(test_ids, seq_len)
        splits["test"] = _counts(test_text, len(test_ids))
        info = {**info, "test_file": str(Path(test_file).expanduser().resolve()), "test_sha256": test_digest}
    vocab = tok.vocab_size
    spec = DataSpec(TEXT, (seq_len,), vocab, vocab_size=vocab, task=LM)
    train = torch.from_numpy(np.ascontiguousarray(train_ids))
    new_state = {"version": 1, "dataset": name, "val_fraction": float(val_fraction), "seed": int(seed),
                 "seq_len": seq_len, "tokenizer": tok.to_state(), "unit": tok.unit, "splits": splits, **info}
    return DataBundle(name=name, spec=spec, train=(train, train.new_empty(0)), val=val, test=(test_x, test_y),
                      source=source, state=new_state)


def load_text_lm(*, data_dir=None, val_fraction: float = 0.1, seed: int = 0, download: bool = True,
                 state: dict | None = None, progress=None, options: dict | None = None) -> "DataBundle":
    options = dict(options or {})
    check_options("text-lm", options, OPTIONS)
    val_fraction, seed = split_state(state, val_fraction, seed)
    own = state is not None and state.get("dataset") == "text-lm"
    file = options.get("data_file") or (state.get("file") if own else None)
    if not file:
        raise UsageError("dataset 'text-lm' needs a text", hint="pass --data-file corpus.txt (or a folder of .txt)")
    path = Path(file).expanduser().resolve()
    if own and state.get("file") not in (None, str(path)):
        return text_as_test(path, state, options)
    text, digest = read_text(path)
    if own and state.get("file_sha256") not in (None, digest):
        log.warning("%s changed since the artifact was trained; its splits differ", path)
    return lm_bundle("text-lm", text, digest, val_fraction=val_fraction, seed=seed, options=options, state=state,
                     source=str(path), info={"file": str(path), "file_sha256": digest})


def text_as_test(path: Path, state: dict, options: dict | None = None) -> "DataBundle":
    """Evaluation on another text: all of it is the test (and validation) split, encoded with the
    saved tokenizer; the training text is not read."""
    import torch

    from dlkit.data import DataBundle
    from dlkit.lm.tokenizer import tokenizer_from_state

    seq_len = _seq_len(options or {}, state)
    tok = tokenizer_from_state(state["tokenizer"])
    path = Path(path).expanduser().resolve()
    text, digest = read_text(path)
    ids = tok.encode(text, what=str(path))
    if len(ids) < seq_len + 1:
        raise DataError(f"{path} is {len(ids):,} tokens, shorter than one window of --seq-len {seq_len} plus its "
                        "next token", hint="give more text")
    counts = _counts(text, len(ids))
    spec = DataSpec(TEXT, (seq_len,), tok.vocab_size, vocab_size=tok.vocab_size, task=LM)
    log.info("evaluating on %s: all of it is the test split", path)
    new_state = {**state, "splits": {"train": _counts("", 0), "val": counts, "test": counts},
                 "test_file": str(path), "test_sha256": digest}
    empty = torch.zeros(0, dtype=torch.int64)
    return DataBundle(name=state.get("dataset", "text-lm"), spec=spec, train=(empty, empty),
                      val=windows(ids, seq_len), test=windows(ids, seq_len), source=str(path), state=new_state)


def find_shakespeare(data_dir: Path | None = None) -> tuple[str, Path] | None:
    for kind, folder in sources.candidates(SHAKESPEARE.name, data_dir):
        for name in SHAKESPEARE_NAMES:
            if (folder / name).is_file():
                return kind, folder / name
    return None


def _locate_shakespeare(data_dir: Path | None = None) -> str | None:
    hit = find_shakespeare(Path(data_dir) if data_dir is not None else None)
    return f"{hit[1]} ({hit[0]})" if hit else None


def load_shakespeare(*, data_dir=None, val_fraction: float = 0.1, seed: int = 0, download: bool = True,
                     state: dict | None = None, progress=None, options: dict | None = None) -> "DataBundle":
    from dlkit.data.download import verify

    options = dict(options or {})
    check_options("tinyshakespeare", options, ("tokenizer", "vocab_size", "seq_len", "test_file"))
    val_fraction, seed = split_state(state, val_fraction, seed)
    hit = find_shakespeare(Path(data_dir) if data_dir is not None else None)
    saved = (state or {}).get("file") if (state or {}).get("dataset") == "tinyshakespeare" else None
    if hit is None and saved and Path(saved).is_file():  # where the artifact's text was found
        hit = ("saved", Path(saved))
    if hit is None:
        found = sources.fetch(SHAKESPEARE, data_dir, download=download, progress=progress)
        hit = (found.kind, found.paths["input.txt"])
    kind, path = hit
    ok, actual = verify(path, SHAKESPEARE.files[0].checksum)
    if not ok:
        log.warning("%s has %s, not the published %s; using it anyway", path, actual, SHAKESPEARE.files[0].checksum)
    text, digest = read_text(path)
    return lm_bundle("tinyshakespeare", text, digest, val_fraction=val_fraction, seed=seed, options=options,
                     state=state, source=f"{path} ({'downloaded' if kind == 'download' else kind})",
                     info={"file": str(Path(path).resolve()), "file_sha256": digest})


register_dataset(DatasetEntry(
    name="text-lm", spec=DataSpec(TEXT, (DEFAULT_SEQ_LEN,), 256, vocab_size=256, task=LM),
    description="your own text for a language model: --data-file FILE|DIR --tokenizer char|bpe|hf:NAME --seq-len",
    fetch=no_raw, locate=lambda data_dir=None: "--data-file (your own)", load=load_text_lm, options=OPTIONS,
))
register_dataset(DatasetEntry(
    name="tinyshakespeare", spec=DataSpec(TEXT, (DEFAULT_SEQ_LEN,), 65, vocab_size=65, task=LM),
    description="Tiny Shakespeare (1,115,394 characters) for character language models; last 10% validation",
    fetch=no_raw, locate=_locate_shakespeare, load=load_shakespeare,
    options=("tokenizer", "vocab_size", "seq_len", "test_file"),
    # nanoGPT's CPU example: 2000 steps, validated every 250 on 20 batches
    train_defaults=dict(max_steps=2000, eval_every=250, eval_batches=20),
))
