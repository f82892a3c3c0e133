"""ViT-B/16 (Dosovitskiy et al.): the published shapes, 86,567,656 parameters at 224x224, 1000 classes.

Pre-norm blocks from ``transformer.py`` (q, k, v as separate ``nn.Linear``: the same parameters
as timm's fused qkv). Images whose sides are not a multiple of the patch are zero-padded on the
right and bottom (timm's ``dynamic_img_pad``), so the preset also runs on 28x28 or 32x32 data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlkit.errors import UsageError
from dlkit.models.registry import Support, register_model
from dlkit.models.transformer import Block, block_widths
from dlkit.spec import IMAGE, DataSpec


@dataclass
class ViTConfig:
    """Defaults: ViT-B/16 (dim 768, 12 blocks of 12 heads, FFN 3072, 16x16 patches)."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    head_dim: int | None = None  # None: dim // heads
    ffn_dim: int = 3072
    patch_size: int = 16
    dropout: float = 0.0


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig, spec: DataSpec):
        super().__init__()
        if cfg.head_dim is None and cfg.dim % cfg.heads:
            raise UsageError(f"dim={cfg.dim} is not divisible by heads={cfg.heads}", hint="set head_dim")
        if cfg.patch_size < 1:
            raise UsageError(f"patch_size={cfg.patch_size} must be at least 1")
        c, h, w = spec.input_shape
        self.patch_size = cfg.patch_size
        tokens = math.ceil(h / cfg.patch_size) * math.ceil(w / cfg.patch_size)
        self.patch = nn.Conv2d(c, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.head_dim or cfg.dim // cfg.heads
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, head_dim, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, spec.num_classes)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[-2] % p, -x.shape[-1] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        t = self.drop(t + self.pos)
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.norm(t)[:, 0])

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (uniform across blocks)."""
        return block_widths(self.blocks, self.norm.normalized_shape[0], "the ViT")


SUPPORT = Support(prune="heads", blocks="blocks", kept=("patch",), unwrapped=("cls", "pos"),
                  widths=ViT.width_overrides)


@register_model("vit-b16", family="vit", build=ViT, modalities=(IMAGE,), default_dataset="imagenet", support=SUPPORT,
                native="imagenet",
                train_defaults=dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=300,
                                    batch_size=256, schedule="cosine", warmup=0.03))
def vit_b16() -> ViTConfig:
    """ViT-B/16: dim 768, 12 blocks, 12 heads, 16x16 patches (86.6M params at 224x224)."""
    return ViTConfig()
