"""Device and precision choices shared by every command."""

from __future__ import annotations

import contextlib

import torch

from dlkit.choices import DEVICES, PRECISIONS
from dlkit.errors import UsageError


def check_device_name(name: str) -> str:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UsageError(f"unknown device '{name}'", hint="use auto, cpu or cuda")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available", hint="use --device cpu or auto")
    return torch.device(name)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'", hint="use fp32 or bf16")
    return precision


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math runs natively here (CUDA, or a CPU with AVX512-BF16/AMX through oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: if it goes away, assume it is fine
        return True


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA; a no-op context for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def uses_channels_last(model: torch.nn.Module, example_shape: tuple[int, ...]) -> bool:
    """channels_last pays off for convolutional models on 4-d input (measured in benchmarks/)."""
    return len(example_shape) == 4 and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def prepare_inference(model: torch.nn.Module, device: torch.device, input_shape: tuple[int, ...]) -> bool:
    """Move ``model`` to ``device`` in the memory format training used; returns channels_last."""
    model.to(device)
    channels_last = uses_channels_last(model, (1, *input_shape))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return channels_last
