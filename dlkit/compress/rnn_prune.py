"""Hidden-unit pruning for nn.RNN, nn.LSTM and nn.GRU, which Torch-Pruning cannot prune.

A hidden unit ``j`` of layer ``l``, direction ``d`` owns: row ``g * H + j`` of ``weight_ih``,
``weight_hh``, ``bias_ih`` and ``bias_hh`` for every gate ``g`` (4 for LSTM, 3 for GRU, 1 for a
plain RNN); column ``j`` of the same layer/direction's ``weight_hh``; column ``d * H + j`` of every
direction's ``weight_ih`` in layer ``l + 1``; and, for the last layer, column ``d * H + j`` of the
consumer (the ``nn.Linear`` that reads the concatenated final hidden states, forward then
backward). Removing a unit removes all of these together, so the pruned cell computes exactly what
the original would with that unit's output forced to zero.

``nn.RNNBase`` has one ``hidden_size`` for all layers and directions, so every (layer, direction)
keeps the same number of units, each choosing its own by importance.
"""

from __future__ import annotations

import torch
from torch import nn

from dlkit.errors import UsageError

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def num_gates(rnn: nn.RNNBase) -> int:
    for cls, g in GATES.items():
        if type(rnn) is cls:
            return g
    raise UsageError(f"cannot prune a {type(rnn).__name__}", hint="dlkit prunes nn.RNN, nn.LSTM and nn.GRU")


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _dirs(rnn: nn.RNNBase) -> int:
    return 2 if rnn.bidirectional else 1


def _unit_tensors(rnn: nn.RNNBase, consumer: nn.Linear | None, layer: int, direction: int,
                  use_grad: bool) -> torch.Tensor:
    """(H, k) matrix: every weight a unit owns, one row per unit (gradients if ``use_grad``)."""
    h, g, dirs = rnn.hidden_size, num_gates(rnn), _dirs(rnn)

    def get(t: torch.Tensor) -> torch.Tensor:
        if use_grad:
            if t.grad is None:
                raise UsageError("taylor importance needs gradients, and none were computed")
            return (t.detach() * t.grad).abs()
        return t.detach()

    sfx = _suffix(layer, direction)
    parts = []
    for name in ("weight_ih", "weight_hh"):
        w = get(getattr(rnn, name + sfx))  # (g*H, in)
        parts.append(w.reshape(g, h, -1).permute(1, 0, 2).reshape(h, -1))
    if rnn.bias:
        for name in ("bias_ih", "bias_hh"):
            parts.append(get(getattr(rnn, name + sfx)).reshape(g, h).t())
    parts.append(get(getattr(rnn, "weight_hh" + sfx)).t())  # column j: how others read unit j
    if layer + 1 < rnn.num_layers:
        for d in range(dirs):
            w = get(getattr(rnn, "weight_ih" + _suffix(layer + 1, d)))
            parts.append(w[:, direction * h:(direction + 1) * h].t())
    elif consumer is not None:
        w = get(consumer.weight)
        parts.append(w[:, direction * h:(direction + 1) * h].t())
    return torch.cat(parts, dim=1)


def unit_importance(rnn: nn.RNNBase, consumer: nn.Linear | None, criterion: str,
                    generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
    """Importance of every hidden unit: ``scores[layer][direction]`` is a tensor of H scores.

    l1/l2: norm of all weights the unit owns; taylor: sum of |weight x gradient| over them
    (gradients must be in ``.grad``); lamp: as l2 (LAMP's normalization is monotone within a
    layer, and every layer here keeps the same count); random: uniform noise.
    """
    scores = []
    for layer in range(rnn.num_layers):
        row = []
        for d in range(_dirs(rnn)):
            if criterion == "random":
                row.append(torch.rand(rnn.hidden_size, generator=generator))
                continue
            t = _unit_tensors(rnn, consumer, layer, d, use_grad=criterion == "taylor")
            if criterion == "l1":
                row.append(t.abs().sum(1))
            elif criterion in ("l2", "lamp"):
                row.append(t.pow(2).sum(1).sqrt())
            elif criterion == "taylor":
                row.append(t.sum(1))
            else:
                raise UsageError(f"unknown importance '{criterion}'")
        scores.append(row)
    return scores


def keep_top(scores: list[list[torch.Tensor]], keep: int) -> list[list[torch.Tensor]]:
    """The ``keep`` best units of each (layer, direction), in their original order."""
    return [[torch.topk(s, keep).indices.sort().values for s in row] for row in scores]


@torch.no_grad()
def prune_hidden(rnn: nn.RNNBase, keep: list[list[torch.Tensor]],
                 consumer: nn.Linear | None = None) -> tuple[nn.RNNBase, nn.Linear | None]:
    """A new cell keeping units ``keep[layer][direction]`` (and a new consumer reading them).

    Returns ``(rnn, consumer)``: new modules with the selected weights copied; the caller puts
    them in place of the old ones. The consumer's outputs are untouched.
    """
    if getattr(rnn, "proj_size", 0):
        raise UsageError("cannot prune an LSTM with proj_size", hint="prune its projection by hand")
    g, h, dirs = num_gates(rnn), rnn.hidden_size, _dirs(rnn)
    new_h = len(keep[0][0])
    if any(len(k) != new_h for row in keep for k in row):
        raise UsageError("every layer and direction of an RNN must keep the same number of units")
    if not 1 <= new_h <= h:
        raise UsageError(f"an RNN of {h} units cannot keep {new_h}")
    new = type(rnn)(rnn.input_size, new_h, num_layers=rnn.num_layers, bias=rnn.bias,
                    batch_first=rnn.batch_first, dropout=rnn.dropout, bidirectional=rnn.bidirectional)
    new = new.to(device=rnn.weight_ih_l0.device, dtype=rnn.weight_ih_l0.dtype)
    for layer in range(rnn.num_layers):
        if layer == 0:
            in_idx = None  # the data's features are not pruned
        else:
            in_idx = torch.cat([keep[layer - 1][d] + d * h for d in range(dirs)])
        for d in range(dirs):
            sfx = _suffix(layer, d)
            rows = torch.cat([keep[layer][d] + gate * h for gate in range(g)])
            w_ih = getattr(rnn, "weight_ih" + sfx)[rows]
            if in_idx is not None:
                w_ih = w_ih[:, in_idx]
            getattr(new, "weight_ih" + sfx).copy_(w_ih)
            getattr(new, "weight_hh" + sfx).copy_(getattr(rnn, "weight_hh" + sfx)[rows][:, keep[layer][d]])
            if rnn.bias:
                for name in ("bias_ih", "bias_hh"):
                    getattr(new, name + sfx).copy_(getattr(rnn, name + sfx)[rows])
    new.train(rnn.training)
    new_consumer = None
    if consumer is not None:
        last = rnn.num_layers - 1
        cols = torch.cat([keep[last][d] + d * h for d in range(dirs)])
        if consumer.in_features != dirs * h:
            raise UsageError(f"the layer after the RNN reads {consumer.in_features} features, not "
                             f"{dirs * h} (its final hidden states)")
        new_consumer = nn.Linear(len(cols), consumer.out_features, bias=consumer.bias is not None)
        new_consumer = new_consumer.to(device=consumer.weight.device, dtype=consumer.weight.dtype)
        new_consumer.weight.copy_(consumer.weight[:, cols])
        if consumer.bias is not None:
            new_consumer.bias.copy_(consumer.bias)
        new_consumer.train(consumer.training)
    return new, new_consumer
