"""Devices the planner knows: memory and peak dense matmul throughput, each with its source.

Peaks are the vendors' dense numbers (no structured sparsity). ``fp32`` is plain FP32 (PyTorch
keeps TF32 off for matmuls by default); ``bf16`` is the tensor-core BF16 peak with FP32
accumulation. Memory is the marketed capacity (GiB where the vendor's number is binary).

``cpu`` is this machine: its physical RAM, and a peak measured now (a square matmul timed for
about 0.2 s in the precision asked for, with the threads PyTorch uses).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from dlkit.errors import UsageError
from dlkit.plan.choices import KNOWN_DEVICES

GIB = 1024 ** 3


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes
    peak_fp32: float  # FLOP/s
    peak_bf16: float  # FLOP/s
    source: str
    kind: str = "cuda"  # "cuda" or "cpu": which kernels the plan models (attention, LSTM)

    def peak(self, precision: str) -> float:
        return self.peak_fp32 if precision == "fp32" else self.peak_bf16


_A100 = "NVIDIA A100 Tensor Core GPU datasheet (SXM): FP32 19.5 TFLOPS, BF16 312 TFLOPS dense"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (SXM): FP32 67 TFLOPS, BF16 989 TFLOPS dense"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB; FP32 67 TFLOPS, BF16 989 TFLOPS dense"
_4090 = ("NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): FP32 82.6 TFLOPS, "
         "BF16 tensor 165.2 TFLOPS dense with FP32 accumulate")

KNOWN: dict[str, Device] = {
    "a100-40": Device("a100-40", 40 * GIB, 19.5e12, 312e12, _A100),
    "a100-80": Device("a100-80", 80 * GIB, 19.5e12, 312e12, _A100),
    "h100-80": Device("h100-80", 80 * GIB, 67e12, 989e12, _H100),
    "h200-141": Device("h200-141", 141 * 10 ** 9, 67e12, 989e12, _H200),
    "rtx4090-24": Device("rtx4090-24", 24 * GIB, 82.6e12, 165.2e12, _4090),
}
DEVICE_NAMES = (*KNOWN, "cpu")
assert DEVICE_NAMES == KNOWN_DEVICES, "dlkit.plan.choices.KNOWN_DEVICES is out of date"

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024 ** 2, "gib": GIB, "tib": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``40GB``, ``512MiB``, ``1.5e9`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise UsageError(f"cannot read {text!r} as a memory size",
                         hint="e.g. 80GiB, 40GB, 512MiB, or a device: " + ", ".join(DEVICE_NAMES))
    return int(float(m.group(1)) * _UNITS[unit])


def physical_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 16 * GIB


_CPU_PEAK: dict[str, float] = {}


def cpu_peak(precision: str) -> float:
    """FLOP/s of a 1024x1024 matmul on this CPU in ``precision`` (fp32 or bf16), timed ~0.2 s."""
    import torch

    key = "fp32" if precision == "fp32" else "bf16"
    if key not in _CPU_PEAK:
        dtype = torch.float32 if key == "fp32" else torch.bfloat16
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < 0.2:
            a @ b
            runs += 1
        _CPU_PEAK[key] = 2 * n ** 3 * runs / (time.perf_counter() - start)
    return _CPU_PEAK[key]


def resolve_device(memory: str | None, precision: str) -> Device:
    """A known device name, ``cpu``, or a size (``80GiB``: a CUDA device with H100 peaks)."""
    if memory is None or memory == "h100-80":
        return KNOWN["h100-80"]
    if memory in KNOWN:
        return KNOWN[memory]
    if memory == "cpu":
        import torch

        peak = cpu_peak(precision)
        return Device("cpu", physical_ram(), peak, peak,
                      f"this machine: physical RAM; {peak / 1e9:.0f} GFLOP/s measured now "
                      f"({'fp32' if precision == 'fp32' else 'bf16'} 1024x1024 matmul, "
                      f"{torch.get_num_threads()} threads)", kind="cpu")
    size = parse_bytes(memory)
    if size <= 0:
        raise UsageError(f"--device-memory {memory} is not a positive size", hint="e.g. 80GiB")
    h100 = KNOWN["h100-80"]
    return Device(f"{memory}", size, h100.peak_fp32, h100.peak_bf16,
                  "memory as given; peaks assumed as H100 SXM (" + h100.source + ")")
