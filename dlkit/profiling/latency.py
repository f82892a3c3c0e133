"""Latency of one model: median and p90 of repeated forward passes after warm-up, and throughput
(``dlkit profile``), run by PyTorch (``measure_latency``) or by ONNX Runtime (``measure_onnx_latency``). Models compared before/after go through ``measure.measure_models`` instead,
which times them alternately, prepared alike."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    samples_per_s: float
    runs: int
    warmup: int
    device: str
    threads: int
    precision: str
    runtime: str = "torch"  # or "onnxruntime"

    def to_dict(self) -> dict:
        return asdict(self)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _timed(run: Callable[[], Any], sync: Callable[[], None], warmup: int, min_runs: int, max_runs: int,
           budget_s: float) -> list[float]:
    """Seconds of each timed ``run()``: ``warmup`` untimed runs, then at least ``min_runs`` and at
    most ``max_runs`` timed ones, stopping once ``budget_s`` seconds are spent."""
    for _ in range(warmup):
        run()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs and (len(times) < min_runs or spent < budget_s):
        t0 = time.perf_counter()
        run()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return times


def _latency(times: list[float], batch: int, warmup: int, device: str, threads: int, precision: str,
             runtime: str) -> Latency:
    med = statistics.median(times)
    return Latency(batch=batch, median_ms=1000 * med, p90_ms=1000 * _percentile(times, 0.9),
                   samples_per_s=batch / med if med > 0 else float("inf"), runs=len(times), warmup=warmup,
                   device=device, threads=threads, precision=precision, runtime=runtime)


def measure_latency(model: nn.Module, example: Any, *, warmup: int = 2, min_runs: int = 10,
                    max_runs: int = 50, budget_s: float = 0.25, precision: str = "fp32") -> Latency:
    """Time ``model(example)`` (a tensor or a tuple of tensors) in inference mode.

    Runs ``warmup`` untimed passes, then at least ``min_runs`` and at most ``max_runs`` timed ones,
    stopping once ``budget_s`` seconds are spent. The batch is ``example``'s first dimension.
    """
    from dlkit.device import autocast

    args = example if isinstance(example, tuple) else (example,)
    first = next(a for a in args if isinstance(a, torch.Tensor))
    device = first.device
    batch = int(first.shape[0]) if first.dim() else 1
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(device, precision):
        times = _timed(lambda: model(*args), sync, warmup, min_runs, max_runs, budget_s)
    return _latency(times, batch, warmup, str(device), torch.get_num_threads(), precision, "torch")


def measure_onnx_latency(session: Any, feeds: dict, *, threads: int, warmup: int = 2, min_runs: int = 10,
                         max_runs: int = 50, budget_s: float = 0.25) -> Latency:
    """Time ``session.run(None, feeds)`` (an ONNX Runtime CPU session, ``threads`` intra-op threads)
    as :func:`measure_latency` times a PyTorch model. The batch is the first input's first dimension."""
    first = next(iter(feeds.values()))
    batch = int(first.shape[0]) if first.ndim else 1
    times = _timed(lambda: session.run(None, feeds), lambda: None, warmup, min_runs, max_runs, budget_s)
    return _latency(times, batch, warmup, "cpu", threads, "fp32", "onnxruntime")
