"""PyTorch and ONNX Runtime side by side: fp32 and int8 of each family, timed alternately in one run.

For cnn, resnet20, mlp, lstm and transformer on Fashion-MNIST (the baselines of
benchmarks/quantize.py, cached in runs/bench-quantize/), four versions of the same model:

- PyTorch fp32: the artifact as `dlkit evaluate` runs it (channels_last for convnets);
- PyTorch int8: `dlkit quantize` (static for cnn, resnet20 and mlp; dynamic for lstm and transformer);
- ONNX Runtime fp32: `dlkit export` (checked against PyTorch);
- ONNX Runtime int8: `dlkit export --quantize` (static QDQ calibrated on training data, or dynamic).

`dlkit compare` measures the four in the same rounds (dlkit.profiling.measure_models: round-robin,
medians, the same real test samples), at batch 1, 64 and 256, with one thread and with all, plus
test accuracy (on every test image).

    python benchmarks/runtimes.py [--models cnn,mlp] [--rounds 10] [--retrain]

Targets (issue 15): ONNX Runtime fp32 at least as fast as PyTorch fp32 for the convnets; the fastest
int8 path per family named (quantize's recommendation should follow it).
"""

from __future__ import annotations

import argparse
import os
import shutil

from common import print_table, write_json
from quantize import BASELINES, CACHE, baseline

INT8 = {"cnn": "static", "resnet20": "static", "mlp": "static", "lstm": "dynamic", "transformer": "dynamic"}
VERSIONS = ("pytorch fp32", "pytorch int8", "onnxruntime fp32", "onnxruntime int8")
BATCHES = (1, 64, 256)


def versions(model: str, retrain: bool) -> list:
    """The four folders of ``model``: artifact, dlkit int8 artifact, ONNX export, ONNX int8 export."""
    from dlkit.compress.quantize import QuantizeOptions, quantize_artifact
    from dlkit.export import ExportOptions, export_artifact

    epochs, samples, _ = BASELINES[model]
    src = baseline(model, epochs, samples, retrain)
    mode = INT8[model]
    out = CACHE / "runtimes"
    folders = [src, out / f"{model}-int8-{mode}", out / f"{model}-onnx", out / f"{model}-onnx-int8-{mode}"]
    for f in folders[1:]:
        shutil.rmtree(f, ignore_errors=True)
    quantize_artifact(src, QuantizeOptions(mode, out=folders[1], repeats=1, eval_samples=256))
    export_artifact(src, ExportOptions(format="onnx", out=folders[2]))
    export_artifact(src, ExportOptions(format="onnx", quantize=mode, out=folders[3]))
    return folders


def main() -> None:
    import torch

    from dlkit.compare import CompareOptions, compare_artifacts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(INT8))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    rows, results = [], []
    for model in args.models.split(","):
        torch.set_num_threads(cores)
        folders = versions(model, args.retrain)
        for threads in sorted({1, cores}):
            res = compare_artifacts(folders, CompareOptions(batches=BATCHES, rounds=args.rounds, threads=threads,
                                                            device="cpu"))
            lat = {name: r.latency_ms for name, r in zip(VERSIONS, res.rows)}
            fastest_int8 = min(VERSIONS[1::2], key=lambda v: lat[v][256])
            for name, r in zip(VERSIONS, res.rows):
                speed = [lat["pytorch fp32"][b] / r.latency_ms[b] for b in BATCHES]
                rows.append([model, threads, name, f"{100 * r.accuracy:.2f}%",
                             *[f"{r.latency_ms[b]:.2f} ({s:.2f}x)" for b, s in zip(BATCHES, speed)],
                             f"{r.size_bytes / 1024:.0f} KiB"])
            convnet = model in ("cnn", "resnet20")
            met = lat["onnxruntime fp32"][256] <= lat["pytorch fp32"][256] if convnet else None
            results.append({"model": model, "threads": threads, "int8_mode": INT8[model],
                            "rows": [{"version": n, **{k: v for k, v in r.__dict__.items() if k != "artifact"}}
                                     for n, r in zip(VERSIONS, res.rows)],
                            "fastest_int8_at_256": fastest_int8,
                            "target_onnx_fp32_not_slower_at_256": met})
            print(f"{model}, {threads} thread(s): fastest int8 at batch 256 is {fastest_int8}"
                  + ("" if met is None else f"; ONNX Runtime fp32 as fast as PyTorch fp32: {met}"), flush=True)
    print_table(f"PyTorch and ONNX Runtime, fp32 and int8, median ms at batch {', '.join(map(str, BATCHES))} "
                "(speed-up over PyTorch fp32), timed alternately", ["model", "threads", "version", "test acc",
                                                                   *[f"batch {b}" for b in BATCHES], "size"], rows)
    write_json("runtimes", {"batches": list(BATCHES),
                            "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
