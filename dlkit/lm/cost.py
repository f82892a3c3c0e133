"""What a language model costs per token: MACs (forward and training), the key/value cache it
keeps per token and for a whole window, and measured prefill and per-token decode latency.

The KV-cache size is measured, not derived from a config: the model decodes two tokens and the
tensors of the cache it returns are summed (so it holds for any module with ``decode``, dlkit's
gpt and ``hf:`` models alike). The cache is stored in the dtype the model computes in (fp32, or
bf16 under autocast).
"""

from __future__ import annotations

import torch
from torch import nn

from dlkit.lm.generate import is_language_model


def _cache_tensors(cache):
    if isinstance(cache, torch.Tensor):
        yield cache
    elif isinstance(cache, (list, tuple)):
        for c in cache:
            yield from _cache_tensors(c)
    elif hasattr(cache, "to_legacy_cache"):  # a transformers Cache object
        yield from _cache_tensors(cache.to_legacy_cache())
    elif hasattr(cache, "layers"):
        for layer in cache.layers:
            yield from _cache_tensors([getattr(layer, "keys", None), getattr(layer, "values", None)])


def kv_bytes_per_token(model: nn.Module, x: torch.Tensor, element_bytes: int) -> int:
    """Bytes of keys and values the model caches per token of one sequence (measured on 2 tokens)."""
    with torch.no_grad():
        _, cache = model.decode(x[:1, :2], None)
    elements = sum(t.numel() for t in _cache_tensors(cache))
    return elements * element_bytes // 2


def lm_cost(model: nn.Module, real: nn.Module | None, x: torch.Tensor, *, fwd_macs: int, train_macs: int | None,
            precision: str, device: torch.device, latency: bool, notes: list[str]) -> dict | None:
    """The ``lm`` section of a profile: None when ``model`` is not a language model."""
    if not is_language_model(model) or x.dim() != 2 or x.is_floating_point():
        return None
    batch, seq_len = x.shape
    tokens = batch * seq_len
    element = 2 if precision == "bf16" else 4
    per_token = kv_bytes_per_token(model, x, element)
    doc = {
        "seq_len": seq_len,
        "macs_per_token": fwd_macs / tokens,
        "training_macs_per_token": train_macs / tokens if train_macs is not None else None,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_per_sequence": per_token * seq_len,
        "kv_cache_bytes_per_batch": per_token * seq_len * batch,
        "kv_cache_dtype": "bf16" if element == 2 else "fp32",
        "prefill": None,
        "decode": None,
    }
    if latency and real is not None:
        doc["prefill"], doc["decode"] = _latencies(real, x.to(device), precision)
        notes.append(f"lm latency: prefill = one sequence of {seq_len} tokens; decode = one new token after "
                     f"{seq_len - 1} cached positions")
    return doc


class _Decode(nn.Module):
    """``decode(x, cache)`` of a fixed cache, as a module the latency timer can call."""

    def __init__(self, model: nn.Module, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, x):
        return self.model.decode(x, self.cache)[0]


def _latencies(model: nn.Module, x: torch.Tensor, precision: str) -> tuple[dict, dict]:
    from dlkit.device import autocast
    from dlkit.profiling.latency import measure_latency

    model.eval()
    seq = x[:1]
    prefill = measure_latency(_Decode(model, None), seq, precision=precision)
    with torch.no_grad(), autocast(x.device, precision):
        _, cache = model.decode(seq[:, :-1], None)
    decode = measure_latency(_Decode(model, cache), seq[:, -1:], precision=precision)
    out = []
    for lat, n in ((prefill, seq.shape[1]), (decode, 1)):
        d = lat.to_dict()
        d["tokens_per_s"] = n / (lat.median_ms / 1000) if lat.median_ms else None
        out.append(d)
    return out[0], out[1]
