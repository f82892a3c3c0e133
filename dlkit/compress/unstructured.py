"""Unstructured pruning: global magnitude (or random) masks that zero single weights.

The tensors stay dense, so MACs, size and latency do not change; ``MaskKeeper`` keeps the pruned
weights at zero while fine-tuning. The classifier and protected layers are left whole.
"""

from __future__ import annotations

import torch
from torch import nn

from dlkit.errors import UsageError


def prunable_weights(model: nn.Module, protected: set[nn.Module]):
    """(module, weight) of every conv, linear and recurrent weight outside ``protected``."""
    for mod in model.modules():
        if mod in protected:
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            yield mod, mod.weight
        elif isinstance(mod, nn.RNNBase):
            for name, p in mod.named_parameters(recurse=False):
                if name.startswith("weight"):
                    yield mod, p


def sparsity_of(model: nn.Module, protected: set[nn.Module]) -> float:
    """The zero fraction of the prunable weights."""
    total = zeros = 0
    for _, t in prunable_weights(model, protected):
        total += t.numel()
        zeros += int((t == 0).sum())
    return zeros / total if total else 0.0


def sparsity_for_params(model: nn.Module, fraction: float, protected: set[nn.Module]) -> float:
    """The sparsity of the prunable weights that keeps ``fraction`` of all parameters nonzero."""
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(p.numel() for _, p in prunable_weights(model, protected))
    remove = (1 - fraction) * total
    if remove > prunable:
        raise UsageError(f"cannot keep only {fraction:.0%} of the parameters: {total - prunable:,} of "
                         f"{total:,} are not prunable (biases, norms, the classifier, protected layers)",
                         hint="ask for a larger fraction")
    return remove / prunable


def magnitude_masks(model: nn.Module, sparsity: float, protected: set[nn.Module], *, random: bool = False,
                    seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global magnitude pruning: (weight, mask) pairs zeroing the ``sparsity`` smallest weights."""
    weights = [p for _, p in prunable_weights(model, protected)]
    if not weights:
        raise UsageError("the model has no prunable weights left (all protected)")
    if random:
        g = torch.Generator().manual_seed(seed)
        scores = [torch.rand(p.shape, generator=g) for p in weights]
    else:
        scores = [p.detach().abs().cpu() for p in weights]
    flat = torch.cat([s.flatten() for s in scores])
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return [(p, torch.ones_like(p, dtype=torch.bool)) for p in weights]
    threshold = torch.kthvalue(flat, k).values
    return [(p, (s > threshold).to(p.device)) for p, s in zip(weights, scores)]


class MaskKeeper:
    """Keeps pruned weights at zero while fine-tuning: re-applies the masks before every forward."""

    def __init__(self, model: nn.Module, masks):
        self.masks = masks
        self.handle = model.register_forward_pre_hook(lambda *_: self.apply())
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.masks:
            p.mul_(m.to(p.device))

    def close(self) -> None:
        self.apply()
        self.handle.remove()
