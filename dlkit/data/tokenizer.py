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

With ``--tokenizer hf:...`` (what ``train hf:...`` passes), the Hugging Face model's own fast
tokenizer (``HFTokenizer``, name ``hf``) is used instead: its ``tokenizer.json`` is kept whole in the
data state, so evaluation encodes with it offline, without the model folder. Texts get the
model's special tokens, are truncated to ``max_len`` ids (default 128) and right-padded with the
tokenizer's padding id (its end-of-text id where it has none, as for GPT-2).
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

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_state(self, requested_vocab: int) -> dict:
        return {"name": TOKENIZER, "vocab_size": requested_vocab, "max_len": self.max_len,
                "vocab": list(self.vocab)}

    @classmethod
    def from_state(cls, d: dict) -> "Tokenizer":
        if isinstance(d, dict) and d.get("name") == HF_TOKENIZER:
            from dlkit.errors import IncompatibleError

            raise IncompatibleError("this text is encoded by a Hugging Face tokenizer, which export and predict "
                                    "do not describe yet", hint="use evaluate, or the folder's tokenizer.json with "
                                    "transformers")
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


HF_TOKENIZER = "hf"
DEFAULT_HF_MAX_LEN = 128


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``), truncating and padding to ``max_len``."""

    vocab: list[str] = []  # the vocabulary lives in ``json``

    def __init__(self, source: str, json_text: str, max_len: int, pad_id: int):
        from dlkit.extras import require

        tokenizers = require("tokenizers", "Hugging Face tokenizers", "hf")
        self.source, self.json, self.max_len, self.pad_id = source, json_text, int(max_len), int(pad_id)
        self._tok = tokenizers.Tokenizer.from_str(json_text)
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_len)

    @classmethod
    def from_model(cls, name: str, max_len: int = DEFAULT_HF_MAX_LEN) -> "HFTokenizer":
        from dlkit.hf import load_tokenizer

        tok = load_tokenizer(name)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(name, tok.backend_tokenizer.to_str(), max_len, pad if pad is not None else 0)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.max_len}:{self.pad_id}:{self.json}".encode()).hexdigest()

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int64)
        truncated = 0
        for i, enc in enumerate(self._tok.encode_batch([_BREAK.sub(" ", t) for t in texts])):
            truncated += bool(enc.overflowing)
            out[i, : len(enc.ids)] = enc.ids
        return out, truncated

    def to_state(self, requested_vocab=None) -> dict:
        return {"name": HF_TOKENIZER, "source": self.source, "max_len": self.max_len, "pad_id": self.pad_id,
                "vocab_size": self.vocab_size, "sha256": hashlib.sha256(self.json.encode()).hexdigest(),
                "tokenizer_json": self.json}

    @classmethod
    def from_state(cls, d: dict) -> "HFTokenizer":
        try:
            text = d["tokenizer_json"]
            if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != d["sha256"]:
                raise ValueError("tokenizer.json does not match its checksum")
            return cls(str(d.get("source", "")), text, int(d["max_len"]), int(d["pad_id"]))
        except (KeyError, TypeError, ValueError, Exception) as err:  # tokenizers raises its own types
            raise DataError(f"the saved Hugging Face tokenizer is malformed ({err})",
                            hint="the artifact may be damaged; retrain it") from None


def make_tokenizer(options: dict, texts_train) -> tuple["Tokenizer | HFTokenizer", int | None]:
    """A new tokenizer for a dataset's options (``tokenizer``: ``words`` or ``hf:NAME``) and the
    vocabulary size to record; the word tokenizer is built on ``texts_train``."""
    name = options.get("tokenizer") or TOKENIZER
    vocab_size, max_len = tokenizer_options(options)
    if name.startswith("hf:"):
        return HFTokenizer.from_model(name, options.get("max_len") or DEFAULT_HF_MAX_LEN), None
    return Tokenizer.build(texts_train, vocab_size, max_len), vocab_size


def check_tokenizer_option(options: dict) -> None:
    name = options.get("tokenizer")
    if name in (None, TOKENIZER, "words"):
        return
    if not isinstance(name, str) or not name.startswith("hf:"):
        raise UsageError(f"--tokenizer {name!r} is not known", hint="use words, or hf:NAME (a model's own tokenizer)")
    if options.get("vocab_size") is not None:
        raise UsageError("--vocab-size is for the word tokenizer; a Hugging Face tokenizer has its own vocabulary",
                         hint="drop --vocab-size")


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
    if (state.get("tokenizer") or {}).get("name") == HF_TOKENIZER:
        return HFTokenizer.from_state(state["tokenizer"])
    tok = Tokenizer.from_state(state.get("tokenizer") or {})
    for key, saved in (("max_len", tok.max_len), ("vocab_size", state["tokenizer"].get("vocab_size"))):
        if options.get(key) not in (None, saved):
            log.warning("the saved tokenizer has %s=%s; ignoring %s=%s", key, saved, key, options[key])
    return tok


def note_truncated(truncated: int, total: int, max_len: int) -> None:
    if truncated:
        log.info("%d of %d texts are longer than max_len=%d words and were truncated to their "
                 "first %d (--max-len changes it)", truncated, total, max_len, max_len)
