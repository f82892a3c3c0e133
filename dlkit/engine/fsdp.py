"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``): ZeRO-3 for a worker.

``--strategy fsdp`` keeps DDP's semantics (engine.distributed: the global batch, each rank's part,
the loss weights, unscaled lr) and changes what a rank holds: a 1/N shard of every parameter, of
its gradient and of its optimizer state. The model is sharded in units, so that only one unit's
full weights need to be gathered at a time:

- the family's blocks (``dlkit.plan.find_blocks``: the declared ``Support.blocks`` of transformer,
  gpt, bert, vit; else the repeated blocks of a container, e.g. ResNet stages), the same units
  the planner assumes for ``--strategy fsdp``;
- for a model without blocks (mlp, cnn, rnn): each top-level child that holds parameters, so the
  largest layer alone is gathered in full, never the whole model;
- then the root, which takes what is left (embeddings, heads, norms). A unit that shares a
  parameter with anything outside it (a language model's tied head and embedding) is not a unit:
  the root keeps the shared parameter, so one parameter is never in two shards.

FSDP2 gathers a unit's weights in its forward pre-hook and frees them after it; an evaluation
pass would do the same for every batch, and the ranks' validation shares may differ by one batch,
so a rank would wait for a gather the other never starts. In evaluation mode (``model.eval()``)
the units therefore keep their gathered weights after the first forward (one collective, which
every rank makes), every further batch is local, and the next training forward frees them again.

What leaves the run is unsharded: a checkpoint and the artifact are written from full state
dicts gathered on every rank (collectives) and kept on rank 0, in the same format as a
single-process run's; a resumed run loads the full weights before sharding and cuts the
optimizer state back into shards (``load_optimizer_state``). BatchNorm statistics (buffers) are
not sharded: each rank keeps its own, and rank 0's are saved, as DDP's broadcast from rank 0 does.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from dlkit.errors import IncompatibleError


@dataclass
class Sharded:
    """What ``shard`` did to a model: its units, a weightless copy of the model before, and whether
    the units hold gathered weights for evaluation now."""

    units: list[str]
    skeleton: nn.Module  # the unsharded model on the meta device: rebuilt with the gathered weights
    evaluating: bool = False
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


_SHARDED: "weakref.WeakKeyDictionary[nn.Module, Sharded]" = weakref.WeakKeyDictionary()


def is_sharded(model: nn.Module) -> bool:
    return model in _SHARDED


def units_of(model: nn.Module) -> list[str]:
    """The submodules ``shard`` makes FSDP units (before the root), as dotted paths."""
    from dlkit.models.registry import support_of
    from dlkit.plan import find_blocks

    candidates = find_blocks(model, support_of(model).blocks)
    if not candidates:
        candidates = [n for n, child in model.named_children() if any(True for _ in child.parameters())]
    outside_ids = {}  # parameter id -> paths of the modules that own it
    for path, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                outside_ids.setdefault(id(p), set()).add(path)
    units = []
    for path in candidates:
        inside = path + "."
        shared = any(any(o != path and not o.startswith(inside) for o in outside_ids[id(p)])
                     for p in model.get_submodule(path).parameters())
        if not shared:
            units.append(path)
    return units


def check_shardable(model: nn.Module, world_size: int) -> None:
    """One line for a model FSDP cannot take (before anything is sharded); what fully_shard itself
    refuses is turned into one line by ``shard``."""
    params = list(model.parameters())
    if not params:
        raise IncompatibleError("--strategy fsdp: the model has no parameters to shard",
                                hint="train it with --strategy ddp (or without --nproc)")
    if any(p.ndim == 0 for p in params):
        names = [n for n, p in model.named_parameters() if p.ndim == 0][:3]
        raise IncompatibleError(f"--strategy fsdp cannot shard scalar parameters ({', '.join(names)})",
                                hint="use --strategy ddp for this model")


def _meta_copy(model: nn.Module) -> nn.Module:
    """The model with every parameter and buffer replaced by a meta tensor (no memory), ties kept."""
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard ``model`` in place (units, then the root) over all ranks; returns it (an FSDPModule).

    Rank 0's weights and buffers are broadcast first, as DDP does, so every rank cuts its slice of
    the same tensors whatever each built or loaded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_shardable(model, world_size)
    units = units_of(model)
    try:
        skeleton = _meta_copy(model)
    except Exception as exc:  # noqa: BLE001 - a module deepcopy cannot copy: one line, not a traceback
        raise IncompatibleError(f"--strategy fsdp needs a copy of the model's structure, and it cannot be copied: "
                                f"{type(exc).__name__}: {exc}", hint="use --strategy ddp for this model") from None
    for t in {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values():
        torch.distributed.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    try:
        for path in units:
            fully_shard(model.get_submodule(path), mesh=mesh)
        fully_shard(model, mesh=mesh)
    except (RuntimeError, ValueError, AssertionError, NotImplementedError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IncompatibleError(f"--strategy fsdp cannot shard this model: {first}",
                                hint="use --strategy ddp for this model") from None
    _SHARDED[model] = Sharded(units, skeleton)
    model.register_forward_pre_hook(_switch_mode, prepend=True)
    return model


def track_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Remember the sharded model's optimizer, for ``local_bytes``."""
    _SHARDED[model].optimizer = optimizer


def _units(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(path) for path in _SHARDED[model].units]


def _switch_mode(model: nn.Module, args) -> None:
    """Before the root's forward (and FSDP's own hooks): keep gathered weights while evaluating,
    free them at the first training forward after an evaluation."""
    record = _SHARDED[model]
    if not model.training and not record.evaluating:
        for unit in _units(model):
            unit.set_reshard_after_forward(False, recurse=False)
        record.evaluating = True
    elif model.training and record.evaluating:
        _back_to_training(model)


def _back_to_training(model: nn.Module) -> None:
    record = _SHARDED[model]
    if not record.evaluating:
        return
    for unit in _units(model):
        unit.set_reshard_after_forward(True, recurse=False)
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()  # frees the gathered weights: local, no collective
    record.evaluating = False


def _full(value, memo: dict):
    """A DTensor's full tensor on the CPU (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, DTensor):
        return value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if id(value) not in memo:
        full = value.full_tensor().detach().cpu()
        if full.untyped_storage().nbytes() != full.numel() * full.element_size():
            full = full.clone()  # a view into the padded gather buffer: keep the tensor's own bytes only
        memo[id(value)] = full
    return memo[id(value)]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (its keys, tied weights as one tensor), gathered on every rank."""
    _back_to_training(model)
    memo: dict = {}
    return {k: _full(v, memo) for k, v in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded tensor gathered: what a single process's
    optimizer over the unsharded model would return (parameters numbered in the same order)."""
    sd = optimizer.state_dict()
    memo: dict = {}
    state = {idx: {k: _full(v, memo) for k, v in slots.items()} for idx, slots in sorted(sd["state"].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a full (unsharded) optimizer state into the optimizer of a sharded model: each rank
    cuts its own slice of every state tensor shaped like its parameter (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, slots in full["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v
            for k, v in slots.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def gather_model(model: nn.Module, rank: int) -> nn.Module | None:
    """The trained model unsharded: a plain module (the class it was built as, no FSDP, no
    DTensors) on rank 0; None on the others. A collective: every rank calls it."""
    sd = full_state_dict(model)
    if rank != 0:
        return None
    plain = _SHARDED[model].skeleton
    buffers = dict(model.named_buffers(remove_duplicate=False))
    owners: dict[int, list] = {}  # one meta tensor -> every (module, key, path) holding it
    for mpath, mod in plain.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(mod, kind).items():
                if t is not None:
                    owners.setdefault(id(t), []).append((mod, kind, key, f"{mpath}.{key}" if mpath else key))
    for group in owners.values():
        mod, kind, key, path = group[0]
        meta = getattr(mod, kind)[key]
        if kind == "_parameters":
            value = next((sd[p] for *_, p in group if p in sd), None)
            if value is None:
                raise IncompatibleError(f"--strategy fsdp: the parameter {path} was not gathered",
                                        hint="this is a bug in dlkit; use --strategy ddp meanwhile")
            new = nn.Parameter(value, requires_grad=meta.requires_grad)
        else:  # buffers are not sharded: rank 0's own (non-persistent ones too)
            new = next((sd[p] for *_, p in group if p in sd), None)
            new = new if new is not None else buffers[path].detach().cpu()
        for m, k, name, _ in group:
            getattr(m, k)[name] = new
    return plain


def local_bytes(model: nn.Module) -> dict[str, int]:
    """What this rank holds now: bytes of its parameter, gradient and optimizer-state shards."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    _back_to_training(model)
    params = {id(p): p for p in model.parameters()}.values()
    out = {"parameters": sum(local(p).numel() * p.element_size() for p in params),
           "gradients": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer_state": 0}
    optimizer = _SHARDED[model].optimizer
    if optimizer is not None:
        for slots in optimizer.state.values():
            for v in slots.values():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    out["optimizer_state"] += local(v).numel() * v.element_size()
    return out
