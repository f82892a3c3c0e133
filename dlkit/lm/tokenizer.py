"""Tokenizers of language-model data, saved as a JSON state and rebuilt from it.

- ``char``: one id per character of the training text (sorted); text with other characters is
  refused where it is a prompt (naming them) and dropped with a warning where it is data.
- ``bpe``: a byte-level BPE trained on the training text to ``--vocab-size`` with the
  ``tokenizers`` library (any text encodes; decode(encode(t)) == t).
- ``hf:NAME``: the tokenizer of a Hugging Face model (dlkit.hf.load_tokenizer); its state is the name.

``unit`` says what bits are reported per: ``char`` for the char tokenizer, ``byte`` (of UTF-8) else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterable

import numpy as np

from dlkit.errors import DataError, UsageError

log = logging.getLogger("dlkit")

TOKENIZER_KINDS = ("char", "bpe", "hf")
DEFAULT_BPE_VOCAB = 1024


class CharTokenizer:
    kind = "char"
    unit = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self._table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int64)
        self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def build(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.index))

    def encode(self, text: str, *, what: str = "the text") -> np.ndarray:
        """Ids of ``text``; characters outside the vocabulary are dropped (with a warning)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._table), self._table[np.minimum(codes, len(self._table) - 1)], -1)
        bad = ids < 0
        if bad.any():
            missing = self.unknown(text)
            log.warning("%s has %d characters outside the %d-character vocabulary (%s); they are skipped",
                        what, int(bad.sum()), self.vocab_size, _show(missing))
            ids = ids[~bad]
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise UsageError(f"the prompt has characters outside the model's {self.vocab_size}-character "
                             f"vocabulary: {_show(missing)}", hint="remove or replace them")
        return [self.index[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class BPETokenizer:
    kind = "bpe"
    unit = "byte"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def build(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from dlkit.extras import require

        tokenizers = require("tokenizers", "--tokenizer bpe", "hf")
        if vocab_size < 257:
            raise UsageError(f"--vocab-size {vocab_size} is too small for a byte-level BPE",
                             hint="give at least 257 (256 bytes and one merge)")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_chunks(text), trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, doc: str) -> "BPETokenizer":
        from dlkit.extras import require

        tokenizers = require("tokenizers", "a bpe-tokenized language model", "hf")
        return cls(tokenizers.Tokenizer.from_str(doc))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, *, what: str = "the text") -> np.ndarray:
        ids: list[int] = []
        for batch in _batches(_chunks(text), 256):
            for enc in self.tok.encode_batch(batch, add_special_tokens=False):
                ids += enc.ids
        return np.asarray(ids, dtype=np.int64)

    def encode_prompt(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_state(self) -> dict:
        return {"kind": "bpe", "json": self.tok.to_str()}


class HFTokenizer:
    """A Hugging Face model's tokenizer (loaded by name through dlkit.hf; no remote code)."""

    kind = "hf"
    unit = "byte"

    def __init__(self, name: str):
        from dlkit.hf import load_tokenizer

        self.name = name
        self.tok = load_tokenizer(name)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str, *, what: str = "the text") -> np.ndarray:
        ids: list[int] = []
        for batch in _batches(_chunks(text), 256):
            for row in self.tok(batch, add_special_tokens=False)["input_ids"]:
                ids += row
        return np.asarray(ids, dtype=np.int64)

    def encode_prompt(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def to_state(self) -> dict:
        return {"kind": "hf", "name": self.name}


Tokenizer = CharTokenizer | BPETokenizer | HFTokenizer


def build_tokenizer(kind: str, text: str, vocab_size: int | None) -> Tokenizer:
    """A tokenizer made for the training ``text``: ``char``, ``bpe`` or ``hf:NAME``."""
    if kind == "char":
        if vocab_size is not None:
            raise UsageError("--vocab-size is for --tokenizer bpe", hint="char's vocabulary is the text's characters")
        return CharTokenizer.build(text)
    if kind == "bpe":
        return BPETokenizer.build(text, vocab_size or DEFAULT_BPE_VOCAB)
    if kind.startswith("hf:"):
        return HFTokenizer(kind)
    if kind == "hf":
        raise UsageError("--tokenizer hf is the tokenizer of the hf: model being trained",
                         hint="train an hf: model, or name one: --tokenizer hf:gpt2")
    raise UsageError(f"unknown tokenizer '{kind}'", hint="use char, bpe or hf:NAME (a Hugging Face model's)")


def tokenizer_from_state(state: dict) -> Tokenizer:
    """The tokenizer an artifact saved (its data state's ``tokenizer``)."""
    try:
        kind = state["kind"]
        if kind == "char":
            return CharTokenizer(state["chars"])
        if kind == "bpe":
            return BPETokenizer.from_json(state["json"])
        if kind == "hf":
            return HFTokenizer(state["name"])
    except (KeyError, TypeError, ValueError, Exception) as exc:
        if isinstance(exc, UsageError):
            raise
        raise DataError(f"the saved tokenizer cannot be rebuilt ({type(exc).__name__}: {exc})",
                        hint="the artifact may be damaged") from None
    raise DataError(f"the saved tokenizer has an unknown kind {kind!r}", hint="the artifact may be damaged")


def state_digest(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """``text`` cut after newlines into pieces of about ``size`` characters (no word is split)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _show(chars: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")
