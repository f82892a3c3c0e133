"""Structured pruning: remove whole channels, attention heads, FFN neurons or recurrent units.

How a model is pruned is its family's declaration (``dlkit.models.Support``), never a guess:

- ``channels``: Torch-Pruning builds the dependency graph once and prunes coupled channel groups;
  the classifier (``Support.head``) and the ``kept`` layers keep their outputs.
- ``heads``: the same pruner with its head mapping: q/k/v lose whole heads (head_dim stays) and
  ``fc1`` loses FFN neurons, by the same fraction in every block (configs hold one width per kind);
  the residual width stays, because the layers writing it (``attn.proj``, ``fc2``, the ``kept``
  embeddings) are left alone.
- ``rnn``: dlkit's own hidden-unit pruner (``dlkit.compress.rnn_prune``) on the declared cell.

``ratio`` is the fraction of each prunable group's channels removed (Torch-Pruning's
``pruning_ratio``). The result is a smaller dense model whose config records its new widths
(``Support.widths``), so a pruned artifact rebuilds from its manifest like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.models.registry import Support, support_of


@dataclass
class Unit:
    """Something that can be pruned alone: a Torch-Pruning group (named by its root layer), the
    attention heads or FFN of every block, or a recurrent cell's hidden units."""

    name: str
    kind: str  # channels | heads | ffn | rnn
    modules: list[nn.Module]


def prunable_support(model: nn.Module) -> Support:
    """The model's declaration, or the one-line error of a family that cannot be pruned."""
    support = support_of(model)
    if support.prune == "none":
        raise IncompatibleError(f"{type(model).__name__} cannot be pruned structurally: {support.reason}",
                                hint="--unstructured zeroes weights of any model")
    return support


def head_of(model: nn.Module) -> nn.Module | None:
    return getattr(model, support_of(model).head, None)


def widths_of(model: nn.Module) -> dict:
    """The config fields of the model's current widths, as JSON values ({} when undeclared)."""
    widths = support_of(model).widths
    if widths is None:
        return {}
    try:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in widths(model).items()}
    except UsageError:  # blocks pruned unevenly: no config describes them
        return {}


def resolve_protect(model: nn.Module, names) -> list[nn.Module]:
    """Modules named on the command line (``--protect features.0``); unknown names are an error."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules or name == "":
            some = ", ".join(n for n in list(modules)[1:9] if n)
            raise UsageError(f"--protect {name}: the model has no layer of that name",
                             hint=f"layers include {some}, ...")
        out.append(modules[name])
    return out


def same_modules(src: nn.Module, dst: nn.Module, modules) -> list[nn.Module]:
    """The modules of ``dst`` named as ``modules`` are in ``src`` (for copies and rebuilds)."""
    names = {m: n for n, m in src.named_modules()}
    dst_modules = dict(dst.named_modules())
    return [dst_modules[names[m]] for m in modules if names.get(m) in dst_modules]


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def _blocks(model: nn.Module, support: Support) -> list[nn.Module]:
    return list(getattr(model, support.blocks)) if support.prune == "heads" else []


def _tp_setup(model: nn.Module, support: Support, protect: list[nn.Module]) -> dict:
    """Keyword arguments for Torch-Pruning's pruner: what to leave alone, and the heads."""
    kept = [getattr(model, name) for name in (support.head, *support.kept)]
    ignored = [m for m in kept if m is not None] + list(protect)
    if support.prune != "heads":
        return dict(ignored_layers=ignored)
    blocks = _blocks(model, support)
    # Keep the residual width: ignoring the layers that write it leaves that group unpruned.
    ignored += [b.attn.proj for b in blocks] + [b.fc2 for b in blocks]
    params = [getattr(model, name) for name in support.unwrapped]
    return dict(ignored_layers=ignored, prune_num_heads=True, prune_head_dims=False,
                num_heads={lin: b.attn.num_heads for b in blocks for lin in (b.attn.q, b.attn.k, b.attn.v)},
                unwrapped_parameters=[(p, 2) for p in params if p is not None])


def list_units(model: nn.Module, example: torch.Tensor, protect: list[nn.Module] = ()) -> list[Unit]:
    """The prunable units of ``model``, in forward order."""
    support = prunable_support(model)
    if support.prune == "rnn":
        cell = getattr(model, support.cell)
        return [] if cell in protect else [Unit("rnn", "rnn", [cell])]
    if support.prune == "heads":
        blocks = _blocks(model, support)
        heads = [b.attn.q for b in blocks if not {b.attn, b.attn.q, b.attn.k, b.attn.v} & set(protect)]
        ffn = [b.fc1 for b in blocks if b.fc1 not in protect]
        return [u for u in (Unit("attention heads", "heads", heads), Unit("ffn", "ffn", ffn)) if u.modules]
    import torch_pruning as tp

    setup = _tp_setup(model, support, list(protect))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    ignored = [m for layer in setup["ignored_layers"] for m in layer.modules()]
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(model.modules())}
    roots = [g[0][0].target.module for g in dg.get_all_groups(ignored_layers=ignored,
                                                                root_module_types=[nn.Conv2d, nn.Linear])]
    return [Unit(names.get(r, type(r).__name__), "channels", [r]) for r in sorted(roots, key=order.get)]


def _check_widths(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.numel() == 0:
            raise UsageError(f"pruning leaves no channels in {name.rsplit('.', 1)[0]}",
                             hint="use a smaller ratio or target")


def _ratio_dicts(model, support, example, protect, unit_ratios) -> tuple[dict, dict]:
    """Per-module ratios for Torch-Pruning: (channel groups by root layer, q/k/v by head)."""
    ratio_dict, head_dict = {}, {}
    units = {u.name: u for u in list_units(model, example, protect)}
    for name, r in (unit_ratios or {}).items():
        if name not in units:
            raise UsageError(f"no prunable layer named '{name}'")
        for m in units[name].modules:
            if units[name].kind == "heads":
                attn = next(b.attn for b in _blocks(model, support) if b.attn.q is m)
                head_dict.update({attn.q: r, attn.k: r, attn.v: r})
            else:
                ratio_dict[m] = r
    return ratio_dict, head_dict


def prune_structured(model: nn.Module, example: torch.Tensor, *, ratio: float, importance: str = "l2",
                     global_pruning: bool = False, protect: list[nn.Module] = (), steps: int = 1,
                     unit_ratios: dict[str, float] | None = None,
                     before_step: Callable[[nn.Module], None] | None = None,
                     after_step: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
    """Prune ``model`` in place by ``ratio`` (or per-unit ``unit_ratios``, others by ``ratio``)
    in ``steps`` equal steps. ``before_step(model)`` runs before each step (taylor gradients),
    ``after_step(model, step)`` after it (fine-tuning). Returns the model."""
    support = prunable_support(model)
    if support.prune == "rnn":
        return _prune_rnn_model(model, support, ratio=ratio, importance=importance, protect=protect,
                                steps=steps, unit_ratios=unit_ratios, before_step=before_step,
                                after_step=after_step)
    if global_pruning and support.prune == "heads":
        raise UsageError(f"--global is not supported for the {type(model).__name__.lower()}: its config holds "
                         "one width for all blocks", hint="drop --global (every block is pruned by the same ratio)")
    import torch_pruning as tp

    setup = _tp_setup(model, support, list(protect))
    ratio_dict, head_dict = _ratio_dicts(model, support, example, protect, unit_ratios) if unit_ratios else ({}, {})
    if support.prune == "heads":
        setup.update(head_pruning_ratio=ratio, head_pruning_ratio_dict=head_dict or None)
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=_importance(importance), pruning_ratio=ratio,
                                  pruning_ratio_dict=ratio_dict or None, global_pruning=global_pruning,
                                  iterative_steps=steps, **setup)
    head_dims = {b.attn: b.attn.q.out_features // b.attn.num_heads for b in _blocks(model, support)}
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(model)
        model.eval()
        pruner.step()
        model.zero_grad(set_to_none=True)
        for attn, head_dim in head_dims.items():  # whole heads go: head_dim stays
            attn.num_heads = attn.q.out_features // head_dim
        _check_widths(model)
        if after_step is not None:
            after_step(model, step)
    model.train(was_training)
    return model


def _prune_rnn_model(model: nn.Module, support: Support, *, ratio: float, importance: str, protect,
                     steps: int, unit_ratios: dict[str, float] | None, before_step, after_step) -> nn.Module:
    from dlkit.compress.rnn_prune import keep_top, prune_hidden, unit_importance

    if getattr(model, support.cell) in protect:
        return model
    r = (unit_ratios or {}).get("rnn", ratio)
    h0 = getattr(model, support.cell).hidden_size
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        cell, head = getattr(model, support.cell), getattr(model, support.head, None)
        keep = max(1, int(round(h0 * (1 - r * step / steps))))
        if keep < cell.hidden_size:
            if before_step is not None and importance == "taylor":
                before_step(model)
            scores = unit_importance(cell, head, importance, generator=gen)
            new_cell, new_head = prune_hidden(cell, keep_top(scores, keep), head)
            setattr(model, support.cell, new_cell)
            if new_head is not None:
                setattr(model, support.head, new_head)
            model.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, step)
    return model
