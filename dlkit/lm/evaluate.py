"""Language-model quality: mean next-token loss, perplexity and bits per character (or byte).

Over windows ``x, y`` (N, L) with ``y`` the tokens one position after ``x``:

    loss = sum of -log p(y_ij | x_i1..x_ij) / (N L)      (natural log, every position counted)
    perplexity = exp(loss)
    bits per unit = loss / ln 2 * tokens / units          (units: the split's characters or UTF-8 bytes)

so bits per character equals bits per token for a char tokenizer, and a BPE model is put on the
same scale as a char model through the split's token and character counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dlkit.device import autocast

LOGITS_BUDGET = 1 << 24  # float32 logits per batch (64 MiB): GPT-2's 50257-way outputs stay bounded


@dataclass
class TokenSums:
    nll: float  # summed negative log-likelihood (nats)
    correct: int  # positions whose most likely token was the next one
    tokens: int


@torch.no_grad()
def token_loss(model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64, device=None,
               precision: str = "fp32") -> TokenSums:
    """Summed next-token loss of ``model`` over every position of the windows ``x`` -> ``y``."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    nll, correct, i = 0.0, 0, 0
    step = min(batch_size, 8)  # until the vocabulary is known: then as many windows as 64 MiB of logits hold
    try:
        while i < len(x):
            xb, yb = x[i : i + step].to(device), y[i : i + step].to(device)
            i += len(xb)
            with autocast(device, precision):
                logits = model(xb)
            step = min(batch_size, max(1, LOGITS_BUDGET // (logits.shape[1] * logits.shape[-1])))
            logits = logits.float().reshape(-1, logits.shape[-1])
            nll += F.cross_entropy(logits, yb.reshape(-1), reduction="sum").item()
            correct += int((logits.argmax(1) == yb.reshape(-1)).sum())
    finally:
        model.train(was_training)
    return TokenSums(nll, correct, int(y.numel()))


@dataclass
class LMResult:
    split: str
    loss: float
    perplexity: float
    accuracy: float  # next-token accuracy
    bits_per_unit: float | None
    unit: str  # char or byte
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d[f"bits_per_{self.unit}"] = self.bits_per_unit
        return d

    def summary(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, f"bits_per_{self.unit}": self.bits_per_unit}


def evaluate_lm(model, x: torch.Tensor, y: torch.Tensor, *, split: str, counts: dict | None = None,
                unit: str = "char", batch_size: int = 64, device=None, precision: str = "fp32") -> LMResult:
    """Loss, perplexity, next-token accuracy and bits per ``unit`` (``counts``: the split's
    ``tokens`` and ``chars``/``bytes``, from the data state) over the windows ``x`` -> ``y``."""
    s = token_loss(model, x, y, batch_size=batch_size, device=device, precision=precision)
    loss = s.nll / max(s.tokens, 1)
    bits = None
    units = (counts or {}).get(f"{unit}s")
    if counts and units:
        bits = loss / math.log(2) * counts["tokens"] / units
    return LMResult(split=split, loss=loss, perplexity=math.exp(min(loss, 700.0)), accuracy=s.correct / max(s.tokens, 1),
                    bits_per_unit=bits, unit=unit, tokens=s.tokens, windows=len(x))
