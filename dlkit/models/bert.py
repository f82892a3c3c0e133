"""BERT-base (Devlin et al.), uncased encoder: the published shapes, post-norm blocks.

The bare ``BertModel`` (word, position and token-type embeddings with their LayerNorm, 12 post-norm
layers, the tanh pooler) has 109,482,240 parameters with vocab 30522, 512 positions and 2 token
types. That is ``bert-base`` with no dataset (its native shape ``bert-pooled``: 512 WordPiece ids in,
the pooled [CLS] features out, no classifier). With ``--dataset`` it adapts: ``head``, a linear
classifier on the pooled [CLS] (first) token, takes the data's classes (``768 * classes + classes``
more parameters), and the word embedding its vocabulary (30522 on the ``sst2-bert`` shape). Token id
0 is padding (BERT's [PAD]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.models.registry import Support, register_model
from dlkit.models.transformer import Attention, block_widths
from dlkit.spec import TEXT, DataSpec


@dataclass
class BertConfig:
    """Defaults: BERT-base (dim 768, 12 layers of 12 heads, FFN 3072, 512 positions)."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    head_dim: int | None = None
    ffn_dim: int = 3072
    max_len: int = 512
    type_vocab: int = 2
    dropout: float = 0.1
    eps: float = 1e-12


class PostNormBlock(nn.Module):
    """BERT's layer: x = norm1(x + attn(x)); x = norm2(x + fc2(gelu(fc1(x))))."""

    def __init__(self, cfg: BertConfig, head_dim: int):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, head_dim, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig, spec: DataSpec):
        super().__init__()
        if cfg.head_dim is None and cfg.dim % cfg.heads:
            raise UsageError(f"dim={cfg.dim} is not divisible by heads={cfg.heads}", hint="set head_dim")
        if spec.input_shape[0] > cfg.max_len:
            raise IncompatibleError(f"sequences of {spec.input_shape[0]} tokens are longer than "
                                    f"max_len={cfg.max_len}", hint="use shorter sequences")
        self.word = nn.Embedding(spec.vocab_size, cfg.dim, padding_idx=0)
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        head_dim = cfg.head_dim or cfg.dim // cfg.heads
        self.blocks = nn.ModuleList(PostNormBlock(cfg, head_dim) for _ in range(cfg.depth))
        self.pooler = nn.Linear(cfg.dim, cfg.dim)
        self.pool_act = nn.Tanh()
        # No classes (the native shape): the pooled features are the output, as BertModel's.
        self.head = nn.Linear(cfg.dim, spec.num_classes) if spec.num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.word.weight[0].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x != 0
        positions = torch.arange(x.shape[1], device=x.device)
        t = self.word(x) + self.position(positions) + self.token_type.weight[0]  # one segment
        t = self.drop(self.embed_norm(t))
        mask = (keep | ~keep.any(1, keepdim=True))[:, None, None, :]
        for blk in self.blocks:
            t = blk(t, mask)
        return self.head(self.drop(self.pool_act(self.pooler(t[:, 0]))))

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (uniform across blocks)."""
        return block_widths(self.blocks, self.pooler.in_features, "BERT")


# Whole heads and FFN neurons; the pooler keeps the residual width its config ties to ``dim``.
SUPPORT = Support(prune="heads", blocks="blocks", kept=("pooler",), widths=Bert.width_overrides)


@register_model("bert-base", family="bert", build=Bert, modalities=(TEXT,), default_dataset="sst2-bert",
                support=SUPPORT, native="bert-pooled",
                train_defaults=dict(optimizer="adamw", lr=2e-5, weight_decay=0.01, epochs=3, batch_size=32,
                                    schedule="cosine", warmup=0.1))
def bert_base() -> BertConfig:
    """BERT-base uncased encoder (post-norm, pooler): 109.5M params; a dataset adds its classifier."""
    return BertConfig()
