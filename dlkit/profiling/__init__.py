"""What a model costs: parameters, MACs/FLOPs, memory and latency.

The small reusable API (other commands, recipes and benchmarks call these):

    count_macs(model, example_inputs) -> Counts(macs, flops, params, uncounted)
        One forward pass under ``torch.no_grad()`` in the model's current mode (call ``.eval()``
        first for inference numbers). ``example_inputs``: a tensor or a tuple of tensors, on the
        model's device or on ``meta`` for a model built on ``meta``. ``uncounted`` maps each op
        with no counting rule to its number of calls (never a silent zero). The result unpacks
        as a tuple: ``macs, flops, params, uncounted = count_macs(model, x)``.

    measure_latency(model, example, *, warmup=2, min_runs=10, max_runs=50, budget_s=0.25,
                    precision="fp32") -> Latency(batch, median_ms, p90_ms, samples_per_s, ...)
        Inference-mode timing of ``model(example)`` after warm-up.

    measure_models([Subject(model, samples, precision, transform), ...], device=, batches=(1, 256),
                   repeats=10, threads=None) -> [Measurement(params, macs, size_bytes, zeros, latency_ms, ...)]
        The one before/after measurement (prune, quantize, compare, benchmarks): every model
        prepared as ``dlkit evaluate`` runs it, on the same inputs, timed in alternation (medians).

    profile_target(target, ProfileOptions(...)) -> ProfileResult
        Everything ``dlkit profile`` reports, for a registry name, an artifact folder (or ``-``)
        or ``path/to/file.py:ClassName``.

    cross_check(model, example_inputs) -> dict
        dlkit's forward FLOPs next to ``torch.utils.flop_counter.FlopCounterMode``'s, per family
        of ops (matmul/conv, attention, recurrent), on the families both count.

Convention, once: one MAC is one multiply-add (matrix products, convolutions, attention matmuls,
recurrent gates); FLOPs = 2 x MACs + the other FLOPs (norms, activations, softmax, bias and
residual adds, pooling: one per element per arithmetic step). Embedding lookups cost 0 and are
listed. See ``dlkit.profiling.counting`` for the handle table.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from dlkit.profiling.counting import (FUNCTION_HANDLES, OP_HANDLES, Cost, Counter_, OpCounts, rnn_cost,
                                      sdpa_cost, set_op_handle)
from dlkit.profiling.latency import Latency, measure_latency
from dlkit.profiling.measure import (Measurement, Subject, example_batch, measure_models, time_round_robin,
                                    weights_bytes)
from dlkit.profiling.profile import CONVENTION, ProfileOptions, ProfileResult, load_module_class, profile_target

__all__ = [
    "CONVENTION", "Cost", "Counts", "Latency", "OpCounts", "ProfileOptions", "ProfileResult", "count_macs", "count_ops",
    "count_params", "cross_check", "load_module_class", "measure_latency",
    "Measurement", "Subject", "example_batch", "measure_models", "time_round_robin", "weights_bytes", "profile_target", "set_op_handle",
    "OP_HANDLES", "FUNCTION_HANDLES", "rnn_cost", "sdpa_cost",
]


class Counts(NamedTuple):
    macs: int
    flops: int
    params: int
    uncounted: dict[str, int]


def _call(model: nn.Module, inputs: Any):
    return model(*inputs) if type(inputs) is tuple else model(inputs)  # a PackedSequence is one input


def count_ops(model: nn.Module, inputs: Any, *, backward: bool = False) -> tuple[OpCounts, OpCounts | None]:
    """Forward counts (per op and per module), and with ``backward=True`` the backward's too
    (the loss is the mean of the output)."""
    if backward:
        with Counter_(model) as c:
            out = _call(model, inputs)
            loss = (out if isinstance(out, torch.Tensor) else out[0]).float().mean()
            c.phase = "backward"
            loss.backward()
        return c.forward, c.backward
    with torch.no_grad(), Counter_(model) as c:
        _call(model, inputs)
    return c.forward, None


def count_macs(model: nn.Module, example_inputs: Any) -> Counts:
    """MACs and FLOPs of one forward pass, the parameter count, and the ops left uncounted."""
    fwd, _ = count_ops(model, example_inputs)
    return Counts(fwd.macs, fwd.flops, count_params(model), dict(fwd.uncounted))


def count_params(model: nn.Module) -> int:
    """Parameters, shared ones once, including int8 weights that quantized modules keep packed
    (outside ``parameters()``): quantized Linear/Conv expose ``weight()``/``bias()``, dynamic
    quantized LSTM/GRU ``get_weight()``/``get_bias()``."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for m in model.modules():
        if not type(m).__module__.startswith("torch.ao.nn.quantized"):
            continue
        if callable(getattr(m, "get_weight", None)) and callable(getattr(m, "get_bias", None)):
            tensors = [*m.get_weight().values(), *m.get_bias().values()]
        elif callable(getattr(m, "weight", None)) and callable(getattr(m, "bias", None)):
            tensors = [m.weight(), m.bias()]
        else:
            continue
        total += sum(t.numel() for t in tensors if t is not None)
    return total


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution",
              "aten::_convolution"}
RNN_OPS = {"aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu", "aten::mkldnn_rnn_layer"}
ATTENTION_OPS = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                 "aten::_scaled_dot_product_cudnn_attention"}


class _Regions(torch.overrides.TorchFunctionMode):
    """Attributes FlopCounterMode's running total to attention and recurrent calls."""

    def __init__(self, fcm):
        super().__init__()
        self.fcm = fcm
        self.totals = {"attention": 0, "recurrent": 0}
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        family = "attention" if name == "scaled_dot_product_attention" else (
            "recurrent" if name in ("lstm", "gru", "rnn_tanh", "rnn_relu") else None)
        if family is None or self.depth:
            return func(*args, **(kwargs or {}))
        before = self.fcm.get_total_flops()
        self.depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1
            self.totals[family] += self.fcm.get_total_flops() - before


def cross_check(model: nn.Module, example_inputs: Any) -> dict:
    """Forward FLOPs of matrix products, attention and recurrent layers: dlkit vs FlopCounterMode.

    FlopCounterMode counts 2 FLOPs per multiply-add of mm/addmm/bmm/baddbmm/convolution and of
    some fused attention kernels, nothing else; dlkit's comparable number is 2 x its MACs. A
    family is compared where FlopCounterMode counts it (it sees no CPU flash attention and no
    oneDNN LSTM, which dlkit counts): ``both`` holds those families, ``relative_diff`` their gap.
    """
    from torch.utils.flop_counter import FlopCounterMode

    fwd, _ = count_ops(model, example_inputs)
    ours = {"matmul": 0, "attention": 0, "recurrent": 0}
    for op, (macs, _) in fwd.by_op.items():
        if op in MATMUL_OPS:
            ours["matmul"] += 2 * macs
        elif op in ATTENTION_OPS:
            ours["attention"] += 2 * macs
        elif op in RNN_OPS:
            ours["recurrent"] += 2 * macs
    fcm = FlopCounterMode(display=False)
    with torch.no_grad(), fcm:
        regions = _Regions(fcm)
        with regions:
            _call(model, example_inputs)
    total = fcm.get_total_flops()
    theirs = {"matmul": total - regions.totals["attention"] - regions.totals["recurrent"], **regions.totals}
    both = [k for k in ours if theirs[k] > 0 and ours[k] > 0]
    a, b = sum(ours[k] for k in both), sum(theirs[k] for k in both)
    return {"dlkit": ours, "flop_counter_mode": theirs, "both": both,
            "relative_diff": abs(a - b) / b if b else 0.0}
