"""Transformer encoder classifier: image patches (ViT) or text tokens (BERT-like), pre-norm blocks.

Written with our own small modules rather than ``nn.TransformerEncoder``, whose fused fast path
hides its matmuls from FLOP counters, quantizers and pruners: every projection is an ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.models.mlp import masked_mean
from dlkit.models.registry import Support, register_model
from dlkit.spec import IMAGE, TEXT, DataSpec


@dataclass
class TransformerConfig:
    """Defaults: a tiny ViT (dim 64, 2 blocks of 4 heads, 4x4 patches)."""

    dim: int = 64
    depth: int = 2
    heads: int = 4
    head_dim: int | None = None  # None: dim // heads; q, k, v project to heads * head_dim
    ffn_dim: int = 128
    dropout: float = 0.1
    patch_size: int = 4  # images: side of the square patches
    max_len: int | None = None  # text: position embeddings; None: the data's sequence length
    pool: str = "cls"  # "cls" token or "mean" of the (non-padding) tokens


class Attention(nn.Module):
    """Multi-head self-attention; ``mask`` (N, 1, 1, L) is true where a key may be attended to."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads = heads  # a head pruner updates this along with q, k, v
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, heads * head_dim)
        self.v = nn.Linear(dim, heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, L, H*D) -> (N, H, L, D)
            return t.reshape(n, length, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(n, length, -1))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm2(x))))))



def block_widths(blocks, dim: int, what: str) -> dict[str, Any]:
    """Config fields for the current widths of attention blocks (``attn.q/num_heads``, ``fc1``).

    Configs hold one width per kind for all blocks, so blocks must have been pruned uniformly."""
    per_block = {(b.attn.num_heads, b.attn.q.out_features // b.attn.num_heads, b.fc1.out_features) for b in blocks}
    if len(per_block) > 1:
        raise UsageError(f"{what}'s blocks have different widths, which its config cannot describe",
                         hint="prune every block by the same ratio")
    out: dict[str, Any] = {"dim": dim}
    if per_block:
        heads, head_dim, ffn = per_block.pop()
        out.update(heads=heads, head_dim=head_dim, ffn_dim=ffn)
    return out

def _check(cfg: TransformerConfig, spec: DataSpec) -> int:
    """Validate ``cfg`` for ``spec``; returns the number of tokens (patches, or max_len)."""
    if cfg.pool not in ("cls", "mean"):
        raise UsageError(f"pool={cfg.pool!r} is not a pooling", hint="use cls or mean")
    if cfg.head_dim is None and cfg.dim % cfg.heads:
        raise UsageError(f"dim={cfg.dim} is not divisible by heads={cfg.heads}",
                         hint="change one of them, or set head_dim")
    if spec.modality == TEXT:
        seq = spec.input_shape[0]
        if cfg.max_len is not None and seq > cfg.max_len:
            raise IncompatibleError(f"sequences of {seq} tokens are longer than max_len={cfg.max_len}",
                                    hint=f"--set max_len={seq}, or shorter sequences")
        return cfg.max_len or seq
    _, h, w = spec.input_shape
    p = cfg.patch_size
    if p < 1 or h % p or w % p:
        divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        raise IncompatibleError(f"patch_size={p} does not divide the {h}x{w} image",
                                hint=f"--set patch_size= one of {', '.join(map(str, divisors))}")
    return (h // p) * (w // p)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, spec: DataSpec):
        super().__init__()
        tokens = _check(cfg, spec)
        self.patch: nn.Conv2d | None = None
        self.embed: nn.Embedding | None = None
        if spec.modality == IMAGE:
            self.patch = nn.Conv2d(spec.input_shape[0], cfg.dim, cfg.patch_size, cfg.patch_size)
        else:
            self.embed = nn.Embedding(spec.vocab_size, cfg.dim, padding_idx=0)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.pos = nn.Parameter(torch.zeros(1, tokens + (cfg.pool == "cls"), cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.head_dim or cfg.dim // cfg.heads
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, head_dim, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        if next(self.parameters()).is_meta:  # nothing to draw, and normal_ on meta costs ~2 s of imports
            return
        # N(0, 0.02) as BERT and ViT. (timm's trunc_normal_(std=.02) cuts at +-2, i.e. 100 std:
        # the same distribution, several times slower to draw.)
        nn.init.normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                with torch.no_grad():
                    m.weight[0].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = None  # text: (N, L) true on real tokens
        if self.patch is not None:
            t = self.patch(x).flatten(2).transpose(1, 2)
        else:
            keep = x != 0
            t = self.embed(x)
        n = t.shape[0]
        if self.cls is not None:
            t = torch.cat([self.cls.expand(n, -1, -1), t], dim=1)
            if keep is not None:
                keep = torch.cat([keep.new_ones(n, 1), keep], dim=1)
        t = self.drop(t + self.pos[:, : t.shape[1]])
        mask = None
        if keep is not None:
            # A sequence of padding only (no cls token) attends to everything rather than to nothing.
            mask = (keep | ~keep.any(1, keepdim=True))[:, None, None, :]
        for blk in self.blocks:
            t = blk(t, mask)
        t = self.norm(t)
        if self.cls is not None:
            feats = t[:, 0]
        elif keep is None:
            feats = t.mean(1)
        else:
            feats = masked_mean(t, keep)
        return self.head(feats)

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (changed by pruning)."""
        return block_widths(self.blocks, self.norm.normalized_shape[0], "the transformer")


# Whole heads and FFN neurons; the residual width stays (the patch embedding writes it). Attention
# is not a chain of modules eager static int8 can follow.
SUPPORT = Support(prune="heads", blocks="blocks", kept=("patch",), unwrapped=("cls", "pos"),
                  widths=Transformer.width_overrides)
TRAIN = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=10, batch_size=128,
             schedule="cosine", warmup=0.1)


@register_model(family="transformer", build=Transformer, modalities=(IMAGE, TEXT),
                default_dataset="mnist", train_defaults=TRAIN, support=SUPPORT)
def transformer() -> TransformerConfig:
    """Tiny transformer encoder: dim 64, 2 blocks, 4 heads (4x4 image patches or tokens)."""
    return TransformerConfig()


@register_model(family="transformer", build=Transformer, modalities=(IMAGE, TEXT),
                default_dataset="mnist", train_defaults=TRAIN, support=SUPPORT)
def transformer_small() -> TransformerConfig:
    """Small transformer encoder: dim 128, 4 blocks, 4 heads, FFN 256."""
    return TransformerConfig(dim=128, depth=4, heads=4, ffn_dim=256)
