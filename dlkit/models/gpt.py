"""GPT (Radford et al.): a decoder-only transformer, as a language model or a classifier.

Token and learned position embeddings, pre-LayerNorm causal blocks (self-attention through
``scaled_dot_product_attention(is_causal=True)``, then a GELU MLP), a final LayerNorm. The head
follows the data's task (``DataSpec.task``):

* ``lm`` (language modelling, the registered presets' own data): ``head`` is tied to the token
  embedding (no extra parameters) and ``forward(ids (N, L)) -> logits (N, L, vocab)``.
  ``gpt2`` has exactly 124,439,808 parameters; ``gpt-mini`` (4 x 4 heads x 128, context 64) is
  nanoGPT's CPU Shakespeare model.
* ``classify`` (``--dataset sst2-gpt2``, a text-csv file): ``head`` is a linear classifier on the
  last non-padding token (token id 0 is padding): ``768 * classes + classes`` more parameters.

``lm_head`` in the config forces one or the other (``None``: the task decides).

The language model also decodes incrementally with a key/value cache::

    logits, cache = model.decode(prompt_ids, None)       # prefill: every prompt position
    logits, cache = model.decode(next_id[:, None], cache)  # one new position, attending to the cache

``cache`` holds per block the keys and values of every position so far (``(N, heads, T, head_dim)``
each); positions continue after its length, so each new token costs one position, not the whole
context. dlkit.lm.generate drives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.models.registry import Support, register_model
from dlkit.models.transformer import block_widths
from dlkit.spec import LM, TEXT, DataSpec

KVCache = list  # per block: (keys, values), each (N, heads, T, head_dim)


@dataclass
class GPTConfig:
    """Defaults: GPT-2 small (dim 768, 12 blocks of 12 heads, FFN 3072, 1024 positions)."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    head_dim: int | None = None
    ffn_dim: int = 3072
    max_len: int = 1024
    dropout: float = 0.1
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2 has them; nanoGPT's small models do not)
    lm_head: bool | None = None  # None: a tied LM head for language-model data, a classifier otherwise


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q``, ``k``, ``v`` projections (so a head
    pruner can remove whole heads) and an optional key/value cache."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float, bias: bool = True):
        super().__init__()
        self.num_heads = heads  # a head pruner updates this along with q, k, v
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k = nn.Linear(dim, heads * head_dim, bias=bias)
        self.v = nn.Linear(dim, heads * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``x`` (N, T, dim) -> (N, T, dim), and the keys and values of all positions so far."""
        n, t, _ = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:  # (N, T, H*D) -> (N, H, T, D)
            return z.view(n, t, self.num_heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        mask, causal = None, True
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            if t == 1:
                causal = False  # one new query attends to every cached key
            else:  # query i (absolute position p + i) sees keys 0 .. p + i
                p = k.shape[2] - t
                mask = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(p)
                causal = False
        out = _attention(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, -1)), (k, v)


def _attention(q, k, v, mask, causal: bool, dropout: float) -> torch.Tensor:
    """``scaled_dot_product_attention``; under bf16 autocast on a CPU in fp32: the CPU's bf16
    flash-attention backward took 14.4 ms per gpt-mini step against 2.6 ms in fp32 (torch 2.13,
    AVX512-BF16), more than the bf16 matmuls save. Elsewhere (fp32, CUDA) as it comes."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                                  dropout_p=dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)


def _dropout(p: float) -> nn.Module:
    """Dropout, or for p = 0 (gpt-mini) an identity, which skips F.dropout in each of the nine places
    a decoded token passes one."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, dropout: float, bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = CausalSelfAttention(dim, heads, head_dim, dropout, bias)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.fc1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(ffn_dim, dim, bias=bias)
        self.drop = _dropout(dropout)

    def forward(self, x: torch.Tensor, past=None):
        a, kv = self.attn(self.norm1(x), past)
        x = x + self.drop(a)
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm2(x))))), kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, spec: DataSpec):
        super().__init__()
        if cfg.head_dim is None and cfg.dim % cfg.heads:
            raise UsageError(f"dim={cfg.dim} is not divisible by heads={cfg.heads}", hint="set head_dim")
        if spec.input_shape[0] > cfg.max_len:
            raise IncompatibleError(f"sequences of {spec.input_shape[0]} tokens are longer than the model's "
                                    f"context max_len={cfg.max_len}",
                                    hint=f"use --seq-len {cfg.max_len} or less, or --set max_len={spec.input_shape[0]}")
        self.lm = spec.task == LM if cfg.lm_head is None else bool(cfg.lm_head)
        self.max_len = cfg.max_len
        self.wte = nn.Embedding(spec.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = _dropout(cfg.dropout)
        head_dim = cfg.head_dim or cfg.dim // cfg.heads
        self.blocks = nn.ModuleList(
            CausalBlock(cfg.dim, cfg.heads, head_dim, cfg.ffn_dim, cfg.dropout, cfg.bias) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.head = nn.Linear(cfg.dim, spec.vocab_size if self.lm else spec.num_classes, bias=not self.lm)
        self._init_weights(cfg.depth)
        if self.lm:
            self.head.weight = self.wte.weight  # tied: no extra parameters

    def _init_weights(self, depth: int) -> None:
        if next(self.parameters()).is_meta:
            return
        for name, p in self.named_parameters():
            if p.ndim >= 2:  # GPT-2: N(0, 0.02), the residual projections scaled by 1/sqrt(2 * depth)
                std = 0.02 / (2 * depth) ** 0.5 if name.endswith(("attn.proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _trunk(self, x: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        start = 0 if cache is None else cache[0][0].shape[2]
        if start + x.shape[1] > self.max_len:
            raise IncompatibleError(f"{start + x.shape[1]} positions exceed the model's context of {self.max_len}",
                                    hint="shorten the input (generation slides its window by itself)")
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        t = self.drop(self.wte(x) + self.wpe(positions))
        new_cache = []
        for i, blk in enumerate(self.blocks):
            t, kv = blk(t, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.norm(t), new_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, _ = self._trunk(x, None)
        if self.lm:
            return self.head(t)
        last = (x != 0).sum(1).clamp(min=1) - 1  # right padding: the last real token sees all others
        return self.head(t[torch.arange(x.shape[0], device=x.device), last])

    def decode(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Next-token logits ``(N, T, vocab)`` for ``x`` (N, T) placed after the cached positions,
        and the cache extended by them (``cache=None`` starts a sequence)."""
        if not self.lm:
            raise IncompatibleError("this GPT is a classifier, not a language model", hint="train it on text-lm data")
        t, new_cache = self._trunk(x, cache)
        return self.head(t), new_cache

    @property
    def context(self) -> int:
        return self.max_len

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (uniform across blocks)."""
        return block_widths(self.blocks, self.norm.normalized_shape[0], "GPT")


# Whole heads and FFN neurons; the residual width stays (the embeddings and the tied head keep it).
SUPPORT = Support(prune="heads", blocks="blocks", widths=GPT.width_overrides)


@register_model("gpt2", family="gpt", build=GPT, modalities=(TEXT,), default_dataset="tinyshakespeare", native="gpt2-lm",
                support=SUPPORT,
                train_defaults=dict(optimizer="adamw", lr=5e-5, weight_decay=0.01, epochs=3, batch_size=16,
                                    schedule="cosine", warmup=0.1))
def gpt2() -> GPTConfig:
    """GPT-2 small: decoder-only language model, 124,439,808 params (tied head); a classifier on labelled text."""
    return GPTConfig()


@register_model("gpt-mini", family="gpt", build=GPT, modalities=(TEXT,), default_dataset="tinyshakespeare",
                support=SUPPORT,
                # nanoGPT's recipe but lr 2e-3: 2000 steps on tinyshakespeare reached val loss 1.81 (1e-3: 1.91)
                train_defaults=dict(optimizer="adamw", lr=2e-3, beta2=0.99, weight_decay=0.1, batch_size=12,
                                    schedule="cosine", warmup=0.05, grad_clip=1.0))
def gpt_mini() -> GPTConfig:
    """nanoGPT's CPU Shakespeare model: 4 blocks of 4 heads, 128 wide, context 64 (character LM)."""
    return GPTConfig(dim=128, depth=4, heads=4, ffn_dim=512, max_len=64, dropout=0.0, bias=False)
