"""Profile targets: a registry name, an artifact folder (or ``-``), a Hugging Face model (``hf:``), or
the user's own module (``path/to/file.py:Name``).

``resolve_target`` turns any of them into a ``Target``: how to build the model (on ``meta`` or a
real device), how to make example inputs of a given batch, and the per-sample input shape.

A user's module (``file.py:Name``, see ``dlkit.profiling.user_module``) is fed ``--input-shape``
floats, or with ``--input-dtype long`` token ids below ``--vocab-size`` (default: the size of its
first ``nn.Embedding``). Registry presets take their native shape unless ``--dataset`` sizes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dlkit.choices import INPUT_DTYPES
from dlkit.errors import IncompatibleError, NotFoundError, UsageError
from dlkit.profiling.user_module import build_user_model, first_embedding, load_module_class  # noqa: F401


@dataclass
class Target:
    """A model to profile, and how to build it and its inputs."""

    kind: str  # "registry", "artifact", "module" or "hf"
    name: str
    example: Callable[[int, str], Any]  # (batch, device) -> inputs
    build: Callable[[str], nn.Module]  # device ("meta" or real) -> model
    real: nn.Module | None = None  # already built with weights (artifacts, user modules)
    precision: str = "fp32"
    input_shape: tuple[int, ...] = ()  # per sample
    default_batch: int = 1
    path: Path | None = None  # an artifact's folder


def is_module_ref(target: str) -> bool:
    """``path/to/file.py:Name``."""
    head, sep, name = target.rpartition(":")
    return bool(sep) and head.endswith(".py") and bool(name)


def target_kind(target: str) -> str:
    """What ``target`` names: ``hf``, ``artifact`` (a folder or ``-``), ``module`` or ``registry``."""
    if target.startswith("hf:"):
        return "hf"
    if target == "-" or Path(target).is_dir():
        return "artifact"
    if is_module_ref(target):
        return "module"
    return "registry"


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
    from dlkit.spec import IMAGE, TEXT

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
    from dlkit.profiling.measure import random_input
    from dlkit.spec import TEXT

    vocab = spec.vocab_size if spec.modality == TEXT else None
    return lambda batch, device: random_input(batch, spec.input_shape, vocab_size=vocab).to(device)


def _check_input_kind(spec, input_dtype: str | None, vocab_size: int | None, what: str):
    """A registry model's or an artifact's spec with --vocab-size applied; --input-dtype must agree."""
    from dlkit.spec import TEXT

    text = spec.modality == TEXT
    if input_dtype is not None and input_dtype != ("long" if text else "float"):
        raise IncompatibleError(f"{what} takes {'token ids (long)' if text else 'float images'}, not "
                                f"--input-dtype {input_dtype}", hint="drop --input-dtype: it knows its inputs")
    if vocab_size is None:
        return spec
    if not text:
        raise UsageError(f"--vocab-size is for token inputs; {what} takes images", hint="drop --vocab-size")
    if what.startswith("artifact"):
        raise UsageError(f"--vocab-size cannot change {what}: its vocabulary is trained",
                         hint="drop --vocab-size")
    return dataclasses.replace(spec, vocab_size=vocab_size)


def registry_target(name: str, dataset: str | None, shape, seq_len, overrides: dict, input_dtype=None,
                    vocab_size=None) -> tuple[Target, int | None]:
    """A preset: without ``dataset`` its native shape (ImageNet 224x224 and 1000 classes for vgg16),
    else sized for the dataset (its shape, classes and vocabulary)."""
    from dlkit.data import spec_for
    from dlkit.models import MODELS, create_model

    entry = MODELS.get(name)
    spec, batch = _spec_input(spec_for(dataset or entry.native_dataset), shape, seq_len)
    spec = _check_input_kind(spec, input_dtype, vocab_size, f"'{name}'")

    def build(device: str) -> nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return create_model(name, spec, overrides)[0]

    return Target("registry", name, _spec_example(spec), build, input_shape=spec.input_shape,
                  default_batch=entry.train_defaults.get("batch_size", 32)), batch


def artifact_target(path: Path, shape, seq_len, input_dtype=None, vocab_size=None) -> tuple[Target, int | None]:
    from dlkit import artifacts

    art = artifacts.read_artifact(path)
    spec, batch = _spec_input(art.spec, shape, seq_len)
    _check_input_kind(spec, input_dtype, vocab_size, f"artifact {path}")
    model = artifacts.load_model(art)
    t = Target("artifact", art.model_name, _spec_example(spec), lambda device: model, real=model,
               precision=art.manifest.get("precision", "fp32"), input_shape=spec.input_shape, path=art.path)
    return t, batch


def module_target(target: str, shape, seq_len=None, overrides=None, input_dtype=None,
                  vocab_size=None) -> tuple[Target, int | None]:
    """``file.py:Name`` fed ``--input-shape`` (batch first) floats, or with ``--input-dtype long``
    token ids below ``--vocab-size`` (default: the model's first ``nn.Embedding``'s size)."""
    from dlkit.profiling.measure import random_input

    dtype = input_dtype or "float"
    if dtype not in INPUT_DTYPES:
        raise UsageError(f"unknown --input-dtype {dtype!r}", hint="use " + " or ".join(INPUT_DTYPES))
    tokens = dtype == "long"
    if vocab_size is not None and not tokens:
        raise UsageError("--vocab-size is for token inputs", hint="add --input-dtype long")
    if seq_len is not None and not tokens:
        raise UsageError("--seq-len is for token inputs", hint="add --input-dtype long, or give --input-shape")
    if seq_len is not None and shape is not None:
        raise UsageError("--seq-len and --input-shape both give the input's length", hint="give one of them")
    if shape is None and seq_len is None:
        raise UsageError(f"{target} needs --input-shape",
                         hint="e.g. --input-shape 1,3,224,224 (batch first), or --input-dtype long --seq-len 64")
    batch, per_sample = (None, (seq_len,)) if seq_len is not None else (shape[0], tuple(shape[1:]))
    model, user = build_user_model(target, overrides)
    vocab = None
    if tokens:
        emb = first_embedding(model)
        vocab = vocab_size or (emb.num_embeddings if emb is not None else None)
        if vocab is None:
            raise UsageError(f"{target} has no nn.Embedding to size its token ids by",
                             hint="give --vocab-size N")

    def make(b: int, device: str) -> torch.Tensor:
        return random_input(b, per_sample, vocab_size=vocab, low=0).to(device)

    t = Target("module", user.name, make, lambda device: model, real=model, input_shape=per_sample)
    return t, batch


def resolve_target(target: str, *, dataset=None, input_shape=None, seq_len=None, overrides=None,
                   input_dtype=None, vocab_size=None) -> tuple[Target, int | None]:
    """(the target, the batch size its --input-shape gave or None)."""
    shape = _parse_shape(input_shape) if isinstance(input_shape, str) else input_shape
    kind = target_kind(target)
    if input_dtype is not None and input_dtype not in INPUT_DTYPES:
        raise UsageError(f"unknown --input-dtype {input_dtype!r}", hint="use " + " or ".join(INPUT_DTYPES))
    if vocab_size is not None and vocab_size < 2:
        raise UsageError(f"--vocab-size {vocab_size} needs at least 2 tokens")
    if dataset is not None and kind in ("module", "artifact"):
        raise UsageError(f"--dataset sizes registry models, not {target}",
                         hint="give --input-shape (and --input-dtype) instead" if kind == "module"
                         else "an artifact is sized by its own data: drop --dataset")
    if overrides and kind == "artifact":
        raise UsageError("--set changes a registry model's config or a module's arguments, not an artifact",
                         hint="drop --set")
    if kind == "hf":
        if input_dtype is not None or vocab_size is not None:
            raise UsageError("--input-dtype and --vocab-size are for your own modules; an hf: model takes "
                             "its inputs from its config", hint="drop them")
    if target.startswith("hf:"):  # a Hugging Face config/checkpoint (dlkit.hf)
        from dlkit.hf.target import hf_target

        return hf_target(target, shape, seq_len, overrides or {})
    if kind == "artifact":
        from dlkit.artifacts import resolve_path

        return artifact_target(resolve_path(target), shape, seq_len, input_dtype, vocab_size)
    if kind == "module":
        return module_target(target, shape, seq_len, overrides, input_dtype, vocab_size)
    from dlkit.models import MODELS

    if target not in MODELS and ("/" in target or target.endswith(".py")):
        raise NotFoundError(f"no artifact folder or module file at {target}",
                            hint="give a registry name, an artifact folder, or path/to/file.py:Name")
    return registry_target(target, dataset, shape, seq_len, overrides or {}, input_dtype, vocab_size)
