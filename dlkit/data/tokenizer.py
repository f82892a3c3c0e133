"""The word-level tokenizer (``words-v1``) the text datasets share.

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
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dlkit.errors import DataError, UsageError

log = logging.getLogger("dlkit")

TOKENIZER = "words-v1"
PAD, UNK = "<pad>", "<unk>"
DEFAULT_VOCAB = 10000
DEFAULT_MAX_LEN = 100

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


def _int_option(options: dict, key: str, default: int, minimum: int) -> int:
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        flag = "--" + key.replace("_", "-")
        raise UsageError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def tokenizer_options(options: dict) -> tuple[int, int]:
    """``(vocab_size, max_len)`` from a dataset's options, defaults filled in, bad values refused."""
    return (_int_option(options, "vocab_size", DEFAULT_VOCAB, 3),
            _int_option(options, "max_len", DEFAULT_MAX_LEN, 1))


def saved_tokenizer(state: dict, options: dict) -> Tokenizer:
    """The tokenizer a data state holds; options that disagree with it are ignored, with a warning."""
    tok = Tokenizer.from_state(state.get("tokenizer") or {})
    for key, saved in (("max_len", tok.max_len), ("vocab_size", state["tokenizer"].get("vocab_size"))):
        if options.get(key) not in (None, saved):
            log.warning("the saved tokenizer has %s=%s; ignoring %s=%s", key, saved, key, options[key])
    return tok


def note_truncated(truncated: int, total: int, max_len: int) -> None:
    if truncated:
        log.info("%d of %d texts are longer than max_len=%d words and were truncated to their "
                 "first %d (--max-len changes it)", truncated, total, max_len, max_len)
