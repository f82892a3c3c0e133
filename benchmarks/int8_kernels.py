"""How much faster can int8 be on this CPU? Single layers, fp32 against int8, timed side by side.

Whole-model int8 speed-ups (benchmarks/quantize.py) are bounded by what the int8 kernels gain
over fp32 on the CPU at hand. This script measures that bound layer by layer, with the kernels
`dlkit quantize` uses (the x86 quantized engine: FBGEMM/oneDNN):

- linear: fp32 ``nn.Linear`` against static int8 (``quantized::linear``, activations already
  int8) and dynamic int8 (fp32 in and out, activations quantized on the fly);
- conv 3x3: fp32 ``nn.Conv2d`` in channels_last (the layout dlkit runs convolutions in) against
  int8 ``quantized::conv2d`` on channels_last int8 input.

    python benchmarks/int8_kernels.py [--threads 1] [--repeats 30] [--batch 256]

The table also lists the CPU's int8/bf16 instruction-set flags: without AVX512-VNNI (or AVX-VNNI)
int8 multiply-accumulate takes two instructions (vpmaddubsw + vpmaddwd) and saturates at 16 bits.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from common import cpu_flags, print_table, write_json

# The timing loop of dlkit's one measurement (dlkit.profiling.measure_models), on single layers:
# medians, runs alternating. (measure_models itself also counts MACs and serializes weights, which
# bare int8 layers fed int8 tensors do not support.)
from dlkit.profiling import time_round_robin as alternate

LINEAR = [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (3136, 128)]
CONV = [(1, 32, 28), (3, 16, 32), (16, 16, 28), (32, 64, 14), (64, 64, 14), (128, 128, 7)]
def static_int8(float_module: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """Eager post-training int8 of one layer; returns it and the example as int8 input."""
    from torch.ao import quantization as tq

    wrapped = nn.Sequential(tq.QuantStub(), copy.deepcopy(float_module)).eval()
    wrapped.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(wrapped, inplace=True)
    wrapped(example)
    tq.convert(wrapped, inplace=True)
    return wrapped[1], wrapped[0](example)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    rows, results = [], []
    with torch.no_grad():
        for k, n in LINEAR:
            fp = nn.Linear(k, n).eval()
            x = torch.randn(args.batch, k)
            q, xq = static_int8(fp, x)
            # quantize_dynamic swaps submodules, never the module it is given: wrap the layer
            # (per-channel weights, as dlkit quantize --mode dynamic uses)
            qconfig = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
            dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(fp)), qconfig, dtype=torch.qint8)
            assert type(dyn[0]).__module__.startswith("torch.ao.nn.quantized.dynamic"), type(dyn[0])
            t_fp, t_q, t_dyn = alternate([lambda: fp(x), lambda: q(xq), lambda: dyn(x)], args.repeats)
            gmacs = args.batch * k * n / 1e9
            results.append({"layer": "linear", "in": k, "out": n, "batch": args.batch, "fp32_ms": t_fp,
                            "int8_static_ms": t_q, "int8_dynamic_ms": t_dyn})
            rows.append([f"linear {k}->{n}", f"{t_fp:.3f}", f"{gmacs / t_fp * 1e3:.1f}", f"{t_q:.3f}",
                         f"{t_fp / t_q:.2f}x", f"{t_dyn:.3f}", f"{t_fp / t_dyn:.2f}x"])
        for cin, cout, hw in CONV:
            fp = nn.Conv2d(cin, cout, 3, padding=1).eval()
            x = torch.randn(args.batch, cin, hw, hw)
            q, xq = static_int8(fp, x)
            fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            xq_cl = xq.contiguous(memory_format=torch.channels_last)
            t_fp, t_q = alternate([lambda: fp_cl(x_cl), lambda: q(xq_cl)], args.repeats)
            gmacs = args.batch * hw * hw * cout * cin * 9 / 1e9
            results.append({"layer": "conv3x3", "in": cin, "out": cout, "hw": hw, "batch": args.batch,
                            "fp32_channels_last_ms": t_fp, "int8_static_ms": t_q})
            rows.append([f"conv3x3 {cin}->{cout} @{hw}x{hw}", f"{t_fp:.3f}", f"{gmacs / t_fp * 1e3:.1f}",
                         f"{t_q:.3f}", f"{t_fp / t_q:.2f}x", "-", "-"])
    flags = cpu_flags()
    print_table(f"int8 kernels against fp32 at batch {args.batch} ({args.threads} thread(s), median of "
                f"{args.repeats}, timed alternately); CPU flags: "
                + ", ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items()),
                ["layer", "fp32 ms", "fp32 GMAC/s", "int8 ms", "int8 speed-up", "dynamic ms", "dynamic speed-up"],
                rows)
    write_json("int8_kernels", {"threads": args.threads, "batch": args.batch, "repeats": args.repeats,
                                "cpu_flags": flags, "engine": "x86", "results": results})


if __name__ == "__main__":
    main()
