"""Profile targets: a registry name, an artifact folder (or ``-``), or a user's ``file.py:Class``.

``resolve_target`` turns any of them into a ``Target``: how to build the model (on ``meta`` or a
real device), how to make example inputs of a given batch, and the per-sample input shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dlkit.errors import IncompatibleError, NotFoundError, UsageError


@dataclass
class Target:
    """A model to profile, and how to build it and its inputs."""

    kind: str  # "registry", "artifact" or "module"
    name: str
    example: Callable[[int, str], Any]  # (batch, device) -> inputs
    build: Callable[[str], nn.Module]  # device ("meta" or real) -> model
    real: nn.Module | None = None  # already built with weights (artifacts, user modules)
    precision: str = "fp32"
    input_shape: tuple[int, ...] = ()  # per sample
    default_batch: int = 1
    path: Path | None = None  # an artifact's folder


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", hint="e.g. 1,3,224,224") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} needs positive sizes", hint="e.g. 1,3,224,224")
    return shape


def _spec_input(spec, shape: tuple[int, ...] | None, seq_len: int | None):
    """The data spec with the per-sample shape replaced; returns (spec, batch from the shape or None)."""
    from dlkit.spec import IMAGE, TEXT, DataSpec

    batch = None
    if seq_len is not None:
        if spec.modality != TEXT:
            raise UsageError("--seq-len is for text models", hint="use --input-shape C,H,W for images")
        shape = (seq_len,)
    if shape is not None:
        want = 3 if spec.modality == IMAGE else 1
        if len(shape) == want + 1:
            batch, shape = shape[0], shape[1:]
        if len(shape) != want:
            form = "C,H,W (or N,C,H,W)" if spec.modality == IMAGE else "L (or N,L)"
            raise IncompatibleError(f"input shape {','.join(map(str, shape))} does not fit {spec.modality} "
                                    f"data", hint=f"give {form}")
        spec = dataclasses.replace(spec, input_shape=shape)
    return spec, batch


def _spec_example(spec) -> Callable[[int, str], torch.Tensor]:
    from dlkit.spec import IMAGE

    def make(batch: int, device: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        if spec.modality == IMAGE:
            x = torch.randn(batch, *spec.input_shape, generator=g)
        else:
            x = torch.randint(1, spec.vocab_size, (batch, *spec.input_shape), generator=g)
        return x.to(device)

    return make


def registry_target(name: str, dataset: str | None, shape, seq_len, overrides: dict) -> tuple[Target, int | None]:
    from dlkit.data import spec_for
    from dlkit.models import MODELS, create_model

    entry = MODELS.get(name)
    spec, batch = _spec_input(spec_for(dataset or entry.default_dataset), shape, seq_len)

    def build(device: str) -> nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return create_model(name, spec, overrides)[0]

    return Target("registry", name, _spec_example(spec), build, input_shape=spec.input_shape,
                   default_batch=entry.train_defaults.get("batch_size", 32)), batch


def artifact_target(path: Path, shape, seq_len) -> tuple[Target, int | None]:
    from dlkit import artifacts

    art = artifacts.read_artifact(path)
    model = artifacts.load_model(art)
    spec, batch = _spec_input(art.spec, shape, seq_len)
    t = Target("artifact", art.model_name, _spec_example(spec), lambda device: model, real=model,
                precision=art.manifest.get("precision", "fp32"), input_shape=spec.input_shape, path=art.path)
    return t, batch


def load_module_class(spec: str) -> type:
    """``path/to/file.py:ClassName`` -> the class, with one clear error per way it can fail."""
    file, _, cls_name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise NotFoundError(f"no module file {file}", hint="give path/to/file.py:ClassName")
    mod_name = f"dlkit_user_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        with contextlib.redirect_stdout(sys.stderr):  # its prints must not mix into dlkit's stdout
            module_spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(mod_name, None)
        raise UsageError(f"cannot load {file}: it calls sys.exit({exc.code!r}) when imported",
                         hint="put the script part under `if __name__ == \"__main__\":`") from None
    except Exception as exc:  # the user's code: any error is theirs to see, in one line
        sys.modules.pop(mod_name, None)
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        raise UsageError(f"cannot load {file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         f"{where}", hint="fix the file so that `python " + file + "` imports") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)]
        raise NotFoundError(f"{file} has no class {cls_name}",
                            hint="nn.Module classes there: " + (", ".join(names) or "none"))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UsageError(f"{cls_name} in {file} is not a torch.nn.Module (it is a {type(cls).__name__})",
                         hint="point at a class that subclasses torch.nn.Module")
    return cls


def module_target(target: str, shape) -> tuple[Target, int | None]:
    if shape is None:
        raise UsageError(f"{target} needs --input-shape", hint="e.g. --input-shape 1,3,224,224 (batch first)")
    cls = load_module_class(target)
    try:
        torch.manual_seed(0)
        with contextlib.redirect_stdout(sys.stderr):
            model = cls()
    except (Exception, SystemExit) as exc:
        raise UsageError(f"{cls.__name__}() failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="profile needs a class that builds with no arguments") from None

    def make(batch: int, device: str) -> torch.Tensor:
        return torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0)).to(device)

    t = Target("module", cls.__name__, make, lambda device: model, real=model, input_shape=tuple(shape[1:]))
    return t, shape[0]


def resolve_target(target: str, *, dataset=None, input_shape=None, seq_len=None,
                   overrides=None) -> tuple[Target, int | None]:
    """(the target, the batch size its --input-shape gave or None)."""
    shape = _parse_shape(input_shape) if isinstance(input_shape, str) else input_shape
    if target.startswith("hf:"):  # a Hugging Face config/checkpoint (dlkit.hf)
        from dlkit.hf.target import hf_target

        return hf_target(target, shape, seq_len, overrides or {})
    if target == "-" or Path(target).is_dir():
        from dlkit.artifacts import resolve_path

        return artifact_target(resolve_path(target), shape, seq_len)
    if ":" in target and target.rpartition(":")[0].endswith(".py"):
        return module_target(target, shape)
    from dlkit.models import MODELS

    if target not in MODELS and ("/" in target or target.endswith(".py")):
        raise NotFoundError(f"no artifact folder or module file at {target}",
                            hint="give a registry name, an artifact folder, or path/to/file.py:ClassName")
    return registry_target(target, dataset, shape, seq_len, overrides or {})
