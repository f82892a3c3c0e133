"""Resumable training checkpoints: tensors in safetensors, everything else in JSON. No pickles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlkit.engine.trainer import TrainState
from dlkit.errors import ArtifactError, OutputError
from dlkit.output import os_error

STATE = "checkpoint.json"  # names its tensors file
LEGACY_TENSORS = "checkpoint.safetensors"  # the tensors file of checkpoints that name none


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, slots in opt_state["state"].items():
        entry = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"optim.{idx}.{key}"}
            else:
                entry[key] = {"value": value}
        meta["state"][str(idx)] = entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState, extra: dict) -> None:
    """Write the checkpoint into ``folder`` atomically, so that it is always whole: the previous one
    survives a kill or a full disk. ``optimizer`` None: a run that has not started (its first
    checkpoint). Tensors go to safetensors, the rest to JSON: loading never runs code. A model
    sharded by FSDP is saved unsharded (``gather_state``: the other ranks call ``take_part``)."""
    model_sd, opt_sd = gather_state(model, optimizer)
    tensors, aliases = _model_tensors(model_sd)
    opt_meta = None
    if opt_sd is not None:
        opt_tensors, opt_meta = _flatten_optimizer(opt_sd)
        tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # The tensors go to a file named by the step; the JSON naming it replaces the old one last, in
    # one rename: a kill at any moment leaves the old pair or the new pair, never a mix.
    name = f"checkpoint-{state.step}-{state.batch}.safetensors"
    doc = {"state": state.to_dict(), "optimizer": opt_meta, "tensors": name, "aliases": aliases, **extra}
    tmp_tensors, tmp_state = folder / (name + ".tmp"), folder / (STATE + ".tmp")
    old = _tensors_file(folder)
    try:
        save_file(tensors, str(tmp_tensors))
        os.replace(tmp_tensors, folder / name)
        tmp_state.write_text(json.dumps(doc))
        os.replace(tmp_state, folder / STATE)
    except (OSError, SafetensorError) as exc:
        tmp_tensors.unlink(missing_ok=True)
        tmp_state.unlink(missing_ok=True)
        if old is None or old.name != name:
            (folder / name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise os_error(exc, folder) from None
        raise OutputError(f"cannot write a checkpoint in {folder}: {str(exc).splitlines()[0]}",
                          hint="free some space; the previous checkpoint is kept for --resume") from None
    if old is not None and old.name != name:
        old.unlink(missing_ok=True)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict or None) as one process holding the whole model
    would have them. For a model sharded by FSDP they are gathered: a collective, so every rank
    calls this at the same point (rank 0 through ``save_checkpoint``, the others through
    ``take_part``)."""
    from dlkit.engine import fsdp

    if fsdp.is_sharded(model):
        model_sd = fsdp.full_state_dict(model)
        return model_sd, None if optimizer is None else fsdp.full_optimizer_state(optimizer)
    return model.state_dict(), None if optimizer is None else optimizer.state_dict()


def take_part(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A rank other than 0, while rank 0 saves a checkpoint: join the gathers of a sharded model."""
    from dlkit.engine import fsdp

    if fsdp.is_sharded(model):
        gather_state(model, optimizer)


def _model_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as ``model.<name>`` tensors, each storage once: a tied weight (a language
    model's head and token embedding) is stored under its first name, the others are aliases."""
    tensors, aliases, first = {}, {}, {}
    for k, v in state_dict.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in first:
            aliases[k] = first[key]
            continue
        first[key] = k
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    return tensors, aliases


def _tensors_file(folder: Path) -> Path | None:
    """The tensors file the checkpoint's JSON names (None without a readable checkpoint)."""
    try:
        name = json.loads((folder / STATE).read_text()).get("tensors", LEGACY_TENSORS)
    except (OSError, ValueError, AttributeError):
        return None
    return folder / name if isinstance(name, str) and Path(name).name == name else None


def trained_steps(folder: Path) -> int | None:
    """Optimizer steps the checkpoint in ``folder`` holds (0: the untrained start), None without one."""
    if not has_checkpoint(folder):
        return None
    try:
        return int(json.loads((folder / STATE).read_text())["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard_untrained(folder: Path) -> bool:
    """Remove a work folder whose checkpoint is the untrained start: after a failure it holds
    nothing to resume and would only block the next run. True if it was removed."""
    if trained_steps(folder) != 0:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def remove_checkpoint(folder: Path) -> None:
    """Delete the checkpoint files in ``folder`` (once the artifact they led to is in place)."""
    for path in list(folder.glob("checkpoint-*.safetensors*")) + [folder / LEGACY_TENSORS, folder / STATE]:
        path.unlink(missing_ok=True)


def has_checkpoint(folder: Path) -> bool:
    tensors = _tensors_file(folder)
    return tensors is not None and tensors.is_file()


def load_checkpoint(folder: Path, model: torch.nn.Module) -> tuple[TrainState, dict | None, dict]:
    """Load weights into ``model``, restore the RNG; returns (state, optimizer state or None for a
    run that had not started, extra JSON)."""
    try:
        doc = json.loads((folder / STATE).read_text())
        doc.pop("tensors", None)
        tensors = load_file(str(_tensors_file(folder) or folder / LEGACY_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"the checkpoint in {folder} cannot be read: {exc}",
                            hint="remove the folder and train from scratch") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, name in (doc.pop("aliases", None) or {}).items():
        model_sd[alias] = model_sd[name]
    model.load_state_dict(model_sd)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state = TrainState(**doc.pop("state"))
    opt_meta = doc.pop("optimizer")
    opt_state = None if opt_meta is None else _unflatten_optimizer(tensors, opt_meta)
    return state, opt_state, doc
