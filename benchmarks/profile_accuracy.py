"""How dlkit's counts compare with fvcore, FlopCounterMode and Torch-Pruning, and how close the
memory estimate comes to the measured peak.

Counts: every registry model on its default data shape at batch 1 (real weights, CPU), MACs in
millions. fvcore reports multiply-adds under the name "flops"; FlopCounterMode reports 2 FLOPs per
multiply-add (halved here); Torch-Pruning's ``count_ops_and_params`` reports MACs. Each counter's
uncounted ops are its own business: where one shows less, it is because it skips something (an
LSTM, attention matmuls, ...).

Memory: one training step (forward, backward, AdamW update) at batch 128 on the small models, the
estimate (tensor sizes, no run) against the peak measured with PyTorch's profiler.

    python benchmarks/profile_accuracy.py [--only NAME ...] [--skip-memory]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import print_table, write_json  # noqa: E402

MEMORY_MODELS = ["mlp", "cnn", "lenet5", "resnet20", "transformer", "transformer-small", "rnn", "lstm", "gru"]


def _example(name):
    from dlkit.data import spec_for
    from dlkit.models import MODELS
    from dlkit.spec import IMAGE

    entry = MODELS.get(name)
    spec = spec_for(entry.default_dataset)
    if spec.modality == IMAGE:
        return spec, torch.randn(1, *spec.input_shape)
    return spec, torch.randint(1, spec.vocab_size, (1, *spec.input_shape))


def _fvcore(model, x):
    from fvcore.nn import FlopCountAnalysis

    a = FlopCountAnalysis(model, (x,))
    a.unsupported_ops_warnings(False)
    a.uncalled_modules_warnings(False)
    return a.total(), sorted(a.unsupported_ops())


def _fcm(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as m:
        model(x)
    return m.get_total_flops() / 2


def _tp(model, x):
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, x)
    return macs, params


def _try(fn, *args):
    try:
        return fn(*args), None
    except Exception as exc:  # a counter that cannot handle a model is a result, not a crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"


def counts(names):
    from dlkit.models import create_model
    from dlkit.profiling import count_macs, cross_check

    rows, docs = [], []
    for name in names:
        spec, x = _example(name)
        torch.manual_seed(0)
        model, _ = create_model(name, spec)
        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            ours = count_macs(model, x)
            t_ours = time.perf_counter() - t0
            fv, fv_err = _try(_fvcore, model, x)
            fcm, fcm_err = _try(_fcm, model, x)
            tpc, tp_err = _try(_tp, model, x)
            xc = cross_check(model, x)

        def m(v):
            return f"{v / 1e6:,.2f}" if v is not None else "error"

        rows.append([name, "x".join(map(str, x.shape)), f"{ours.params:,}", m(ours.macs),
                     m(fv[0] if fv else None), m(fcm), m(tpc[0] if tpc else None),
                     f"{tpc[1]:,}" if tpc else "error", f"{100 * xc['relative_diff']:.3f}% ({','.join(xc['both'])})",
                     ",".join(sorted(ours.uncounted)) or "-", f"{t_ours:.2f}"])
        docs.append({"model": name, "input": list(x.shape), "params": ours.params, "dlkit_macs": ours.macs,
                     "dlkit_flops": ours.flops, "dlkit_uncounted": ours.uncounted,
                     "fvcore_macs": fv[0] if fv else None, "fvcore_unsupported": fv[1] if fv else fv_err,
                     "flop_counter_mode_macs": fcm, "flop_counter_mode_error": fcm_err,
                     "torch_pruning_macs": tpc[0] if tpc else None, "torch_pruning_params": tpc[1] if tpc else None,
                     "torch_pruning_error": tp_err, "cross_check": xc, "dlkit_seconds": t_ours})
        del model
    print_table("MACs (millions) at batch 1: dlkit vs fvcore vs FlopCounterMode (FLOPs/2) vs Torch-Pruning",
                ["model", "input", "params", "dlkit", "fvcore", "FCM", "T-P", "T-P params", "xcheck vs FCM",
                 "dlkit uncounted", "dlkit s"], rows)
    return docs


def memory(names, batch=128):
    from dlkit.profiling import ProfileOptions, profile_target

    rows, docs = [], []
    for name in names:
        t0 = time.perf_counter()
        r = profile_target(name, ProfileOptions(batch_size=batch, training=True, latency=False, measure=True,
                                                device="cpu"))
        est, meas = r.memory["estimate"], r.memory["measured"]
        ti = est["inference_peak"] / meas["inference_peak"] if meas["inference_peak"] else None
        tt = est["training_peak"] / meas["training_peak"] if meas["training_peak"] else None
        mib = lambda b: f"{b / 2**20:,.1f}" if b else "-"  # noqa: E731
        rows.append([name, "x".join(map(str, r.input_shape)), mib(est["inference_peak"]), mib(meas["inference_peak"]),
                     f"{ti:.3f}" if ti else "-", mib(est["training_peak"]), mib(meas["training_peak"]),
                     f"{tt:.3f}" if tt else "-", f"{time.perf_counter() - t0:.1f}"])
        docs.append({"model": name, "input": r.input_shape, "estimate": est, "measured": meas,
                     "inference_ratio": ti, "training_ratio": tt})
    print_table(f"memory at batch {batch}, MiB: estimate vs measured peak (torch.profiler), AdamW training step",
                ["model", "input", "infer est", "infer meas", "ratio", "train est", "train meas", "ratio", "s"], rows)
    return docs


def main() -> None:
    from dlkit.models import MODELS

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-counts", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    names = args.only or list(MODELS)
    doc = {"note": "shared, loaded 2-core machine: timings are noisy; counts and bytes are exact"}
    if not args.skip_counts:
        doc["counts"] = counts(names)
    if not args.skip_memory:
        doc["memory"] = memory([n for n in MEMORY_MODELS if n in names])
    write_json("profile_accuracy", doc)


if __name__ == "__main__":
    main()
