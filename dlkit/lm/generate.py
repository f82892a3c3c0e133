"""Text generation from a language model: temperature, top-k and top-p sampling, a key/value cache.

With the cache, the prompt is run once (prefill) and each new token costs one position
(``model.decode(next_id, cache)``). When the cache reaches the model's context (``model.context``,
the number of learned positions, or the window it was trained on if shorter), the window
slides: the last half of the context is run again as a fresh prefill and decoding goes on from
there. Without the cache (``use_cache=False``, for comparison) every new token runs the model over
the whole window, as nanoGPT's ``generate`` does.

Sampling at ``temperature`` 0 is greedy (the most likely token). Otherwise the logits are divided
by the temperature, cut to the ``top_k`` most likely tokens and to the smallest set whose
probability reaches ``top_p``, and a token is drawn with a ``torch.Generator`` seeded by ``seed``:
the same seed gives the same text.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dlkit.errors import DataError, IncompatibleError, UsageError

log = logging.getLogger("dlkit")


def is_language_model(model) -> bool:
    """Whether ``model`` follows the language-model protocol: ``forward(ids) -> (N, L, V)`` logits
    and ``decode(ids, cache) -> (logits, cache)`` (a gpt built for language-model data, or an
    ``hf:`` causal LM)."""
    return callable(getattr(model, "decode", None)) and getattr(model, "lm", True) is not False


def pick_token(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float,
               generator: torch.Generator | None) -> int:
    """One token id from next-token ``logits`` (V,)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], 0)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(0) - probs >= top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, 0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Timings:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def add(self, other: "Timings") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def rates(self) -> dict:
        return {"prefill_tokens_per_s": self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else None,
                "decode_tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else None}


@torch.inference_mode()  # no autograd bookkeeping at all: less fixed cost per decoded token
def sample(model, prompt: list[int], *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
           on_token: Callable[[int], None] | None = None, device=None,
           context: int | None = None) -> tuple[list[int], Timings]:
    """``max_new_tokens`` ids continuing ``prompt`` (a non-empty list of ids), and how long the
    model took for the prompt (prefill) and the new tokens (decode). ``context``: the most
    positions the model is run on (default: ``model.context``, its learned positions)."""
    device = device or torch.device("cpu")
    context = context or getattr(model, "context", None) or 1 << 30
    ids = list(prompt)[-context:]
    new: list[int] = []
    t = Timings()
    if max_new_tokens <= 0:
        return new, t

    def run(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def tensor(seq: list[int]) -> torch.Tensor:
        return torch.tensor([seq], dtype=torch.long, device=device)

    if use_cache:
        (logits, cache), t.prefill_seconds = run(lambda: model.decode(tensor(ids), None))
        t.prefill_tokens, cached = len(ids), len(ids)
    else:
        logits, t.prefill_seconds = run(lambda: model(tensor(ids)))
        t.prefill_tokens = len(ids)
    while True:
        nxt = pick_token(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        new.append(nxt)
        ids.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if len(new) == max_new_tokens:
            return new, t
        if not use_cache:
            window = ids[-context:]
            logits, s = run(lambda: model(tensor(window)))
        elif cached + 1 > context:  # the window is full: slide by half a context, prefill again
            window = ids[-max(1, context // 2):]
            (logits, cache), s = run(lambda: model.decode(tensor(window), None))
            cached = len(window)
        else:
            (logits, cache), s = run(lambda: model.decode(tensor([nxt]), cache))
            cached += 1
        t.decode_seconds += s
        t.decode_tokens += 1


class TextStream:
    """Decodes ids as they come and passes on the new text; holds back an incomplete UTF-8
    character (a BPE token may end inside one)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tok, self.write = tokenizer, write
        self.ids: list[int] = []
        self.sent = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.write(text[self.sent:])
        self.sent = len(text)

    def text(self) -> str:
        return self.tok.decode(self.ids)


@dataclass
class GenerateOptions:
    prompt: str | None = None
    prompt_file: str | None = None
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    kv_cache: bool = True
    device: str = "auto"

    def validate(self) -> "GenerateOptions":
        problems = []
        if self.prompt is not None and self.prompt_file is not None:
            problems.append("give --prompt or --prompt-file, not both")
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            problems.append(f"--temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"--top-k must be >= 1 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.num_samples < 1:
            problems.append(f"--num-samples must be >= 1 (got {self.num_samples})")
        if problems:
            raise UsageError("; ".join(problems))
        return self


@dataclass
class GenerateResult:
    artifact: str
    model: str
    prompt: str
    prompt_tokens: int
    samples: list[dict] = field(default_factory=list)  # {"text": the new text only, "new_tokens"}
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    kv_cache: bool = True
    device: str = "cpu"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompt(opts: GenerateOptions, stdin=None) -> str:
    """The prompt text: --prompt, --prompt-file, or stdin when ``opts.prompt`` is ``-`` (read by the
    CLI before this); an empty prompt starts from a newline."""
    if opts.prompt_file is not None:
        path = Path(opts.prompt_file).expanduser()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path} does not exist", hint="check --prompt-file") from None
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror or err}") from None
        from dlkit.data.text import decode_utf8

        return decode_utf8(data, path)
    return opts.prompt or ""


def load_lm(target: str):
    """(model, tokenizer, path, name, precision, cpu_only, trained window) of an LM artifact folder
    or an ``hf:`` causal LM."""
    from dlkit import artifacts
    from dlkit.lm.tokenizer import tokenizer_from_state
    from dlkit.spec import LM

    if target.startswith("hf:"):
        return _load_hf(target)
    art = artifacts.read_artifact(target)
    if art.spec.task != LM:
        raise IncompatibleError(f"{art.path} is a classifier ({art.spec.describe()}), not a language model",
                                hint="generate from a model trained on text-lm data (dlkit train gpt-mini)")
    state = art.manifest["data"].get("state") or {}
    if "tokenizer" not in state:
        raise IncompatibleError(f"{art.path} holds no tokenizer", hint="retrain it with this dlkit")
    tok = tokenizer_from_state(state["tokenizer"])
    model = artifacts.load_model(art)
    cpu_only = any(t.get("cpu_only") for t in art.manifest["model"].get("transforms", []))
    return model, tok, str(art.path), art.model_name, art.precision, cpu_only, art.spec.input_shape[0]


def _load_hf(name: str):
    """A Hugging Face causal LM (``hf:DIR`` or ``hf:ORG/NAME``) with its own tokenizer."""
    from dlkit.lm.tokenizer import HFTokenizer
    from dlkit.models import create_model, model_entry
    from dlkit.spec import LM, TEXT, DataSpec

    tok = HFTokenizer(name)
    hf_config = model_entry(name).make_config().hf_config
    vocab = int(hf_config.get("vocab_size") or tok.vocab_size)
    positions = int(hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or 1024)
    spec = DataSpec(TEXT, (positions,), vocab, vocab_size=vocab, task=LM)
    model, _ = create_model(name, spec)
    if not is_language_model(model):
        raise IncompatibleError(f"{name} is not a causal language model", hint="generate from a *ForCausalLM model")
    return model.eval(), tok, name, name, "fp32", False, positions


def generate_artifact(target: str | Path, opts: GenerateOptions, *, write: Callable[[str], None] | None = None,
                      ) -> GenerateResult:
    """Sample ``opts.num_samples`` continuations of the prompt from the LM artifact ``target``.

    ``write(text)`` receives the text as it is produced (the prompt, then each sample's new text,
    samples separated by a blank line); the result holds the same texts and the token rates."""
    from dlkit.device import autocast, resolve_device

    opts.validate()
    started = time.perf_counter()
    model, tok, path, name, precision, cpu_only, window = load_lm(str(target))
    dev = torch.device("cpu") if cpu_only else resolve_device(opts.device)
    model.to(dev).eval()
    text = read_prompt(opts)
    if text == "":
        text = "\n"
    prompt = tok.encode_prompt(text)
    if not prompt:
        raise UsageError("the prompt encodes to no tokens", hint="give a longer --prompt")
    context = min(window, getattr(model, "context", None) or window)  # positions it was trained on
    if len(prompt) > context:
        log.warning("the prompt is %d tokens; the model sees its last %d (its context)", len(prompt), context)
    gen = torch.Generator().manual_seed(opts.seed)
    result = GenerateResult(artifact=path, model=name, prompt=text, prompt_tokens=len(prompt), kv_cache=opts.kv_cache,
                            device=str(dev))
    total = Timings()
    for i in range(opts.num_samples):
        if write is not None:
            write(("\n" if i else "") + text)
        stream = TextStream(tok, write or (lambda s: None))
        with autocast(dev, precision):
            new, t = sample(model, prompt, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                            top_k=opts.top_k, top_p=opts.top_p, generator=gen, use_cache=opts.kv_cache,
                            on_token=stream, device=dev, context=context)
        if write is not None:
            write(stream.text()[stream.sent:] + "\n")
        total.add(t)
        result.samples.append({"text": stream.text(), "new_tokens": len(new)})
    rates = total.rates()
    result.prefill_tokens_per_s, result.decode_tokens_per_s = rates["prefill_tokens_per_s"], rates["decode_tokens_per_s"]
    result.seconds = time.perf_counter() - started
    return result


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
