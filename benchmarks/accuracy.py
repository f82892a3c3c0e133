"""Accuracy of dlkit's default training recipes, run exactly as a user would run them.

Each case is the CLI in a subprocess (`dlkit train MODEL --dataset D --json --quiet`), timed wall to
wall, so start-up, data loading, evaluation and artifact writing are all included.

    python benchmarks/accuracy.py [--cases cnn:fashion-mnist,mlp:digits,cnn:digits] [--repeats 1]
Targets (issue 2): cnn on fashion-mnist >= 92% test accuracy in <= 180 s; mlp and cnn on digits >= 98%.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, median, print_table, write_json

TARGETS = {("cnn", "fashion-mnist"): (0.92, 180.0), ("mlp", "digits"): (0.98, None), ("cnn", "digits"): (0.98, None)}


def run_case(model: str, dataset: str, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlkit", "train", model, "--dataset", dataset, "--json", "--quiet",
               "--seed", str(seed), "--out", str(Path(tmp) / "run"), *extra]
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    doc = json.loads(out.stdout)
    return {"wall_s": wall, "test_accuracy": doc["metrics"]["test_accuracy"],
            "val_accuracy": doc["metrics"].get("val_accuracy"), "train_s": doc["metrics"]["train_seconds"],
            "epochs": doc["train_config"]["epochs"], "samples_per_s": doc["metrics"]["samples_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="cnn:fashion-mnist,mlp:digits,cnn:digits")
    ap.add_argument("--repeats", type=int, default=1, help="seeds per case")
    ap.add_argument("--extra", default="", help="extra train options, e.g. '--epochs 8'")
    args = ap.parse_args()
    rows, results = [], {}
    for case in args.cases.split(","):
        model, dataset = case.split(":")
        runs = [run_case(model, dataset, seed, args.extra.split()) for seed in range(args.repeats)]
        acc = median([r["test_accuracy"] for r in runs])
        wall = median([r["wall_s"] for r in runs])
        floor, limit = TARGETS.get((model, dataset), (None, None))
        ok = (floor is None or acc >= floor) and (limit is None or wall <= limit)
        results[case] = {"extra": args.extra, "runs": runs, "median_test_accuracy": acc, "median_wall_s": wall,
                         "target_accuracy": floor, "target_wall_s": limit, "met": ok}
        rows.append([case, runs[0]["epochs"], f"{100 * acc:.2f}%", f"{wall:.0f}",
                     f"{median([r['samples_per_s'] for r in runs]):,.0f}",
                     f">= {100 * floor:.0f}%" + (f" in <= {limit:.0f} s" if limit else "") if floor else "-",
                     "yes" if ok else "NO"])
    print_table(f"default recipes, median of {args.repeats} seed(s)",
                ["case", "epochs", "test acc", "wall s", "train samples/s", "target", "met"], rows)
    # Cases accumulate across invocations (one case can take minutes): merge with earlier results.
    previous = RESULTS / "accuracy.json"
    if previous.exists():
        results = {**json.loads(previous.read_text()).get("results", {}), **results}
    write_json("accuracy", {"results": results})


if __name__ == "__main__":
    main()
