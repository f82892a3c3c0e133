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


# oneDNN's ISA levels (its ONEDNN_MAX_CPU_ISA values) below which it has no bf16 dot products.
_ONEDNN_ISA_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN was capped to by ``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``), upper case."""
    import os

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math runs natively here: CUDA with bf16, or a CPU with AVX512-BF16 or AMX.

    oneDNN's own probe (``_is_mkldnn_bf16_supported``) also says yes for AVX512 CPUs without
    AVX512-BF16, where bf16 is emulated and slower than fp32: the instruction sets decide first.
    oneDNN capped below AVX512-BF16 (``ONEDNN_MAX_CPU_ISA=AVX2``, say) emulates bf16 whatever the
    CPU has, so a cap counts too: it also lets one CPU stand in for an AVX2-only one."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if onednn_isa_cap() in _ONEDNN_ISA_WITHOUT_BF16:
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is not None for p in probes):
        return any(p() for p in probes)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: if it goes away, assume it is fine
        return True


# Models whose default training measured no accuracy loss in bf16 against fp32 (the same seed, data
# and recipe, on a native-bf16 CPU): where bf16 is native, training them without --precision picks
# bf16. cnn: 92.89% bf16 and 92.66% fp32 on Fashion-MNIST with its defaults, seed 0
# (benchmarks/accuracy.py --cases cnn:fashion-mnist --precisions fp32,bf16 repeats it). gpt-mini:
# 2000 steps on tinyshakespeare, validation loss 1.8250 in bf16 and 1.8250 in fp32 (1.7x the tokens/s).
BF16_BY_DEFAULT = frozenset({"cnn", "gpt-mini"})


def default_precision(model_name: str, device: torch.device) -> tuple[str, str]:
    """The precision to train ``model_name`` in when ``--precision`` is not given, and why (one
    line, for stderr and the manifest). bf16 only where it is native and measured no accuracy loss."""
    if model_name not in BF16_BY_DEFAULT:
        return "fp32", f"fp32: bf16 was not measured free of accuracy loss for {model_name}"
    if device.type != "cpu":
        return "fp32", f"fp32: bf16 is chosen by itself on CPUs only (this is {device.type})"
    if not native_bf16(device):
        return "fp32", "fp32: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is emulated and slower"
    return "bf16", (f"bf16 chosen by dlkit: this CPU runs bf16 natively (AVX512-BF16/AMX) and {model_name} "
                    f"measured no accuracy loss in bf16; --precision fp32 turns it off")


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
