"""Resumable training checkpoints: tensors in safetensors, everything else in JSON. No pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlkit.engine.trainer import TrainState
from dlkit.errors import ArtifactError

TENSORS = "checkpoint.safetensors"
STATE = "checkpoint.json"


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


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    extra: dict) -> None:
    """Write the checkpoint into ``folder`` atomically (the JSON last, after its tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tmp = folder / (TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / TENSORS)
    doc = {"state": state.to_dict(), "optimizer": opt_meta, **extra}
    tmp = folder / (STATE + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, folder / STATE)


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE).is_file() and (folder / TENSORS).is_file()


def load_checkpoint(folder: Path, model: torch.nn.Module) -> tuple[TrainState, dict, dict]:
    """Load weights into ``model``, restore the RNG; returns (state, optimizer state, extra JSON)."""
    try:
        doc = json.loads((folder / STATE).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ArtifactError(f"the checkpoint in {folder} cannot be read: {exc}",
                            hint="remove the folder and train from scratch") from None
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_sd)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state = TrainState(**doc.pop("state"))
    opt_state = _unflatten_optimizer(tensors, doc.pop("optimizer"))
    return state, opt_state, doc
