"""Activation checkpointing (``dlkit train --checkpointing full``): each block keeps only its input
in the forward pass and recomputes its activations in the backward pass, so a step holds the
activations of one block at a time instead of all of them, for about one more forward pass.

Registry families declare their blocks (``Support.blocks``: an ``nn.ModuleList``); each block's
``forward`` is replaced on the instance by one that runs the class's forward under
``torch.utils.checkpoint`` (non-reentrant, the random state kept, so dropout masks repeat). No
module is wrapped in another, so the state dict keys, hence the artifact, stay exactly as they
are. Hugging Face models (``hf:``) use transformers' own ``gradient_checkpointing_enable``.
Outside training (no gradients, or eval mode) a block runs its plain forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dlkit.errors import IncompatibleError, UsageError

FAMILIES = "transformer, gpt, bert, vit and hf: models"


def check_supported(model_name: str, mode: str) -> None:
    """Refuse ``--checkpointing full`` for a family without declared blocks, before any work."""
    from dlkit.models import model_entry

    if mode == "none":
        return
    entry = model_entry(model_name)
    if entry.family != "hf" and not entry.support.blocks:
        raise UsageError(f"--checkpointing {mode} recomputes blocks, which the {entry.family} family does not "
                         f"declare ({FAMILIES} do)", hint="drop --checkpointing")


def _has_layers_below(module: nn.Module) -> bool:
    """A transformers model part (LlamaModel) marked for checkpointing, holding the marked layers."""
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules() if m is not module)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward.__get__(self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)


def enable(model: nn.Module, mode: str = "full") -> int:
    """Turn checkpointing on for ``model``'s blocks; returns how many blocks are recomputed."""
    from dlkit.hf.models import is_hf_model
    from dlkit.models.registry import support_of

    if mode == "none":
        return 0
    if is_hf_model(model):
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise IncompatibleError(f"transformers has no gradient checkpointing for {type(model).__name__}",
                                    hint="drop --checkpointing")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return sum(1 for m in model.modules()
                   if getattr(m, "gradient_checkpointing", False) and m is not model and not _has_layers_below(m))
    name = support_of(model).blocks
    blocks = getattr(model, name, None) if name else None
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(f"--checkpointing {mode}: {type(model).__name__} declares no blocks to recompute "
                         f"({FAMILIES} do)", hint="drop --checkpointing")
    for block in blocks:  # a method bound to the block: a deep copy of the model rebinds it to the copy
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def disable(model: nn.Module) -> None:
    """Back to plain forwards (the inverse of ``enable``)."""
    from dlkit.hf.models import is_hf_model

    if is_hf_model(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        return
    for m in model.modules():
        if getattr(m.__dict__.get("forward"), "__func__", None) is _checkpointed_forward:
            del m.forward
