"""Structured pruning at ratio 0.5 on Fashion-MNIST: how much faster, how much accuracy is lost.

For each model: train a baseline with dlkit.api.train_model (few epochs, to fit the time budget),
prune it with dlkit.compress.prune.prune_artifact (ratio 0.5, fine-tune <= 2 epochs), and take the
report prune measures in the same run: MACs, parameters, CPU latency at batch 1 and 256 (medians,
runs alternating between the unpruned and the pruned model) and test accuracy of both.

    python benchmarks/prune.py [--models cnn,resnet20,lstm,transformer] [--finetune-epochs 2]

Targets (issue 4): cnn and resnet20 >= 2x faster at batch 256 within 1 point; lstm and transformer
>= 1.5x faster within 1.5 points. Latency is timed with --threads torch threads (default 1: on a
shared 2-core machine two OpenMP threads wait on each other and the timings become noise).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import print_table, write_json

TARGETS = {"cnn": (2.0, 1.0), "resnet20": (2.0, 1.0), "lstm": (1.5, 1.5), "transformer": (1.5, 1.5)}
EPOCHS = {"cnn": 3, "resnet20": 2, "lstm": 3, "transformer": 3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="cnn,resnet20,lstm,transformer")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="baseline epochs (default: per model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    from dlkit.api import TrainRequest, train_model
    from dlkit.compress.prune import PruneOptions, prune_artifact

    torch.set_num_threads(args.threads)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            epochs = args.epochs or EPOCHS.get(name, 1)
            t0 = time.perf_counter()
            trained = train_model(TrainRequest(model=name, dataset="fashion-mnist", options={"epochs": epochs},
                                               out=Path(tmp) / name, device="cpu"))
            t1 = time.perf_counter()
            res = prune_artifact(trained.artifact, PruneOptions(
                ratio=args.ratio, finetune_epochs=args.finetune_epochs, latency_repeats=args.repeats,
                latency_threads=args.threads, device="cpu"))
            t2 = time.perf_counter()
            b, a, r = res.before, res.after, res.ratios()
            speed_goal, acc_goal = TARGETS.get(name, (None, None))
            delta = 100 * r["test_accuracy_delta"]
            ok = None if speed_goal is None else (r["speedup_b256"] >= speed_goal and delta >= -acc_goal)
            rows.append([name, f"{b.params:,} -> {a.params:,}", f"{r['macs']:.2f}",
                         f"{b.latency_b1_ms:.2f} -> {a.latency_b1_ms:.2f}", f"{r['speedup_b1']:.2f}x",
                         f"{b.latency_b256_ms:.1f} -> {a.latency_b256_ms:.1f}", f"{r['speedup_b256']:.2f}x",
                         f"{100 * b.test_accuracy:.2f} -> {100 * a.test_accuracy:.2f}", f"{delta:+.2f}",
                         f">={speed_goal}x, >=-{acc_goal}" if speed_goal else "-",
                         {True: "met", False: "MISSED", None: "-"}[ok]])
            results.append({"model": name, "baseline_epochs": epochs, "finetune_epochs": args.finetune_epochs,
                            "train_seconds": t1 - t0, "prune_seconds": t2 - t1, "target": TARGETS.get(name),
                            "met": ok, **res.to_dict()})
            print(f"{name}: trained in {t1 - t0:.0f}s, pruned+fine-tuned+measured in {t2 - t1:.0f}s", flush=True)
            # partial results survive an interrupted run
            write_json("prune", {"ratio": args.ratio, "threads": args.threads, "results": results})
    print_table(f"dlkit prune --ratio {args.ratio} --finetune-epochs {args.finetune_epochs} on fashion-mnist "
                f"(CPU, {args.threads} thread(s), shared noisy machine: ratios matter, absolute ms do not)",
                ["model", "params", "MACs kept", "b1 ms", "b1 speed-up", "b256 ms", "b256 speed-up",
                 "test acc %", "delta pts", "target", "status"], rows)
    write_json("prune", {"ratio": args.ratio, "threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
