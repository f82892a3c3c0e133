"""GPT-2 small (Radford et al.), decoder-only: the published shapes, 124,439,808 parameters.

Token and position embeddings (vocab from the data: 50257 on the ``sst2-gpt2`` shape, 1024
positions), 12 pre-norm causal blocks (GELU with the tanh approximation) and a final LayerNorm.

Two heads, picked by ``lm_head``:
* ``lm_head=False`` (the registered default, so ``gpt2`` trains and evaluates like every other
  classifier): ``head`` is a linear classifier on the last non-padding token (token id 0 is
  padding here). Parameters: 124,439,808 + ``768 * classes + classes``.
* ``lm_head=True`` (``dlkit profile gpt2 --set lm_head=true``): the language model, ``head`` is
  tied to the token embedding (no extra parameters: exactly 124,439,808) and the output is
  next-token logits ``(N, L, vocab)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.models.registry import Support, register_model
from dlkit.models.transformer import Block, block_widths
from dlkit.spec import TEXT, DataSpec


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
    lm_head: bool = False


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, spec: DataSpec):
        super().__init__()
        if cfg.head_dim is None and cfg.dim % cfg.heads:
            raise UsageError(f"dim={cfg.dim} is not divisible by heads={cfg.heads}", hint="set head_dim")
        if spec.input_shape[0] > cfg.max_len:
            raise IncompatibleError(f"sequences of {spec.input_shape[0]} tokens are longer than "
                                    f"max_len={cfg.max_len}", hint="use shorter sequences")
        self.lm = cfg.lm_head
        self.wte = nn.Embedding(spec.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.head_dim or cfg.dim // cfg.heads
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, head_dim, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.depth))
        for blk in self.blocks:
            blk.act = nn.GELU(approximate="tanh")
        self.norm = nn.LayerNorm(cfg.dim)
        if cfg.lm_head:
            self.head = nn.Linear(cfg.dim, spec.vocab_size, bias=False)
        else:
            self.head = nn.Linear(cfg.dim, spec.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if cfg.lm_head:
            self.head.weight = self.wte.weight  # tied: no extra parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape
        positions = torch.arange(length, device=x.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None, None]
        t = self.drop(self.wte(x) + self.wpe(positions))
        for blk in self.blocks:
            t = blk(t, causal)
        t = self.norm(t)
        if self.lm:
            return self.head(t)
        last = (x != 0).sum(1).clamp(min=1) - 1  # right padding: the last real token sees all others
        return self.head(t[torch.arange(n, device=x.device), last])

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (uniform across blocks)."""
        return block_widths(self.blocks, self.norm.normalized_shape[0], "GPT")


SUPPORT = Support(prune="heads", blocks="blocks", widths=GPT.width_overrides)


@register_model("gpt2", family="gpt", build=GPT, modalities=(TEXT,), default_dataset="sst2-gpt2", support=SUPPORT,
                train_defaults=dict(optimizer="adamw", lr=5e-5, weight_decay=0.01, epochs=3, batch_size=16,
                                    schedule="cosine", warmup=0.1))
def gpt2() -> GPTConfig:
    """GPT-2 small (decoder-only, 124.4M params) + a classifier on the last token (lm_head=true: tied LM)."""
    return GPTConfig()
