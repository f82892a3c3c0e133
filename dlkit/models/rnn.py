"""Recurrent classifiers (RNN, LSTM, GRU): image rows or text tokens as time steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from dlkit.errors import UsageError
from dlkit.models.registry import Support, register_model
from dlkit.spec import IMAGE, TEXT, DataSpec

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RNNConfig:
    """Defaults: one LSTM layer of 128 units."""

    cell: str = "lstm"  # rnn (tanh), lstm or gru
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    embed_dim: int = 128  # text only: token embedding width
    dropout: float = 0.0  # between stacked layers and before the classifier


class RNN(nn.Module):
    """Images: each of the H rows is a time step of C*W features. Text: embedded tokens, packed so
    that padding (token 0, at the end of a sequence) never reaches the cell. The logits come from
    the last layer's final hidden state (both directions, concatenated, when bidirectional)."""

    def __init__(self, cfg: RNNConfig, spec: DataSpec):
        super().__init__()
        if cfg.cell not in CELLS:
            raise UsageError(f"cell={cfg.cell!r} is not a recurrent cell", hint="use rnn, lstm or gru")
        self.embed: nn.Embedding | None = None
        if spec.modality == TEXT:
            self.embed = nn.Embedding(spec.vocab_size, cfg.embed_dim, padding_idx=0)
            features = cfg.embed_dim
        else:
            c, _, w = spec.input_shape
            features = c * w
        self.rnn = CELLS[cfg.cell](
            features, cfg.hidden, num_layers=cfg.layers, batch_first=True,
            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden * (2 if cfg.bidirectional else 1), spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            n, c, h, w = x.shape
            seq = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
            _, state = self._recur(seq)
        else:
            lengths = (x != 0).sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
            _, state = self._recur(packed)
        h_n = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
        last = h_n[-2:] if self.rnn.bidirectional else h_n[-1:]  # (directions, N, hidden)
        feats = last.transpose(0, 1).reshape(last.shape[1], -1)  # forward then backward
        return self.head(self.dropout(feats))

    def _recur(self, inp):
        # On the CPU the recurrence runs in fp32 even under bf16 autocast: oneDNN cannot build a
        # bf16 LSTM primitive on CPUs without native bf16 ("could not create a primitive
        # descriptor"), and where it can, the gates' accumulation is better kept in fp32 anyway.
        if inp.data.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.rnn(inp.float() if isinstance(inp, torch.Tensor) else inp)
        return self.rnn(inp)

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (changed by pruning)."""
        out: dict[str, Any] = {"hidden": self.rnn.hidden_size}
        if self.embed is not None:
            out["embed_dim"] = self.embed.embedding_dim
        return out


# One recurrent cell's hidden units (dlkit.compress.rnn_prune); no eager static int8 path for
# recurrent cells (dynamic int8 covers LSTM and GRU).
SUPPORT = Support(prune="rnn", cell="rnn", widths=RNN.width_overrides)


def _register(lr: float):
    train = dict(optimizer="adam", lr=lr, weight_decay=0.0, epochs=10, batch_size=128,
                 schedule="cosine", warmup=0.0)
    return register_model(family="rnn", build=RNN, modalities=(IMAGE, TEXT), default_dataset="mnist",
                          train_defaults=train, support=SUPPORT)


@_register(1e-3)  # a plain tanh RNN diverges more easily than the gated cells
def rnn() -> RNNConfig:
    """Elman RNN (tanh), 128 units; image rows or tokens as time steps."""
    return RNNConfig(cell="rnn")


@_register(2e-3)
def lstm() -> RNNConfig:
    """LSTM, 128 units; image rows or tokens as time steps."""
    return RNNConfig(cell="lstm")


@_register(2e-3)
def gru() -> RNNConfig:
    """GRU, 128 units; image rows or tokens as time steps."""
    return RNNConfig(cell="gru")
