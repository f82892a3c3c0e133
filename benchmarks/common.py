"""Shared helpers for the benchmark scripts: timing, tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent  # the repository
# Instruction sets that decide int8/bf16 speed (/proc/cpuinfo flags): AVX2; AVX512-VNNI (or
# AVX-VNNI) for one-instruction int8 multiply-accumulate; AVX512-BF16 and AMX for native bf16/int8.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")

# Time models the way the `dlkit` command runs them: with freed memory kept in the process
# (dlkit/malloc.py). Without it, page faults make fp32 latencies bimodal (a batch-256 cnn forward
# at 24-29 ms or 64 ms) and inflate every ratio against a model with smaller activations.
from dlkit.malloc import keep_freed_memory  # noqa: E402

keep_freed_memory()


def _cpuinfo(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.split(":", 1)[0].strip() == key), "")
    except OSError:
        return ""


def cpu_flags() -> dict[str, bool]:
    """Which of FLAGS this CPU has (empty where /proc/cpuinfo cannot be read)."""
    present = set(_cpuinfo("flags").split())
    return {f: f in present for f in FLAGS} if present else {}


# Settings that make this CPU stand in for a lesser one (ONEDNN_MAX_CPU_ISA=AVX2
# ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2: an AVX2-only CPU, emulated by oneDNN,
# PyTorch's own kernels and FBGEMM's int8 kernels): recorded, and results go to their own file.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS")


def isa_caps() -> dict[str, str]:
    return {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}


def results_path(name: str) -> Path:
    """``results/NAME.json``, or ``results/NAME-capped-ISA.json`` when an ISA cap is set."""
    caps = isa_caps()
    suffix = "-capped-" + "-".join(dict.fromkeys(v.lower() for v in caps.values())) if caps else ""
    return RESULTS / f"{name}{suffix}.json"


def machine() -> dict:
    import torch

    return {"cpu": _cpuinfo("model name") or "unknown", "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "isa_caps": isa_caps(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def portable(value):
    """``value`` with absolute paths made machine-free: relative to the repository when inside it,
    else the last component (a temporary folder's name means nothing elsewhere)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return value


def median(xs):
    return statistics.median(xs)


def timed(fn, repeats: int = 5, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_timed(cmd: list[str], what: str) -> tuple[str, float]:
    """Run ``cmd`` (a `dlkit` command, say) in a subprocess: its stdout and wall seconds, start-up
    included. A failure stops the benchmark with ``what`` and the command's stderr."""
    import subprocess

    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr}")
    return proc.stdout, seconds


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def write_json(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = results_path(name)
    path.write_text(json.dumps(portable({"machine": machine(), **doc}), indent=2))
    print(f"\nwrote {path}")
    return path
