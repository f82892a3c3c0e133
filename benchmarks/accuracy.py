"""Accuracy of dlkit's default training recipes, run exactly as a user would run them, beside the
classic example they must match.

Each case is the CLI in a subprocess (`dlkit train MODEL --dataset D --json --quiet`), timed wall to
wall, so start-up, data loading, evaluation and artifact writing are all included. The reference is
the documents' classic example, also in a subprocess and timed the same way: conv32-pool-conv64-
pool-dense128 (3x3 "valid" convs, no BatchNorm), Adam lr 1e-3, batch 32, 5 epochs, a plain fp32
PyTorch loop on the whole training set, tested on the test set. Cases and the reference alternate
per seed, so load on a shared machine falls on both.

    python benchmarks/accuracy.py [--cases cnn:fashion-mnist,mlp:digits,cnn:digits] [--repeats 1]
                                  [--precisions default,fp32,bf16] [--classic-epochs 5] [--no-classic]
                                  [--recipes cnn-fashion-mnist-94]
Targets (issue 18): cnn on fashion-mnist >= 92.5% test accuracy, wall time <= the classic example's
(run with --precisions default: dlkit's own choice); mlp and cnn on digits >= 98%; the recipe
cnn-fashion-mnist-94 (`dlkit run`, train and evaluate steps, wall to wall) >= 94.0% in <= 180 s. ``--precisions
fp32,bf16`` trains each case in both, the check behind dlkit.device.BF16_BY_DEFAULT (bf16 is picked
by itself only for models that lose no accuracy in it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import median, print_table, results_path, run_timed, write_json

TARGETS = {("cnn", "fashion-mnist"): (0.925, "classic"), ("mlp", "digits"): (0.98, None),
           ("cnn", "digits"): (0.98, None), ("recipe", "cnn-fashion-mnist-94"): (0.94, 180.0)}
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CLASSIC = "classic:fashion-mnist"


def run_case(model: str, dataset: str, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlkit", "train", model, "--dataset", dataset, "--json", "--quiet",
               "--seed", str(seed), "--out", str(Path(tmp) / "run"), *extra]
        stdout, wall = run_timed(cmd, " ".join(cmd))
    doc = json.loads(stdout)
    return {"wall_s": wall, "test_accuracy": doc["metrics"]["test_accuracy"],
            "val_accuracy": doc["metrics"].get("val_accuracy"), "train_s": doc["metrics"]["train_seconds"],
            "epochs": doc["train_config"]["epochs"], "precision": doc["train_config"]["precision"],
            "samples_per_s": doc["metrics"]["samples_per_s"]}


def run_recipe(name: str, seed: int) -> dict:
    """`dlkit run recipes/NAME.yaml` with its train step's seed set, timed wall to wall; the test
    accuracy is its evaluate step's."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlkit", "run", str(RECIPES / f"{name}.yaml"), "--set", f"train.seed={seed}",
               "--quiet", "--out", str(Path(tmp) / "run")]
        _, wall = run_timed(cmd, " ".join(cmd))
        evaluated = json.loads((Path(tmp) / "run" / "evaluate.json").read_text())
        train = json.loads((Path(tmp) / "run" / "train" / "manifest.json").read_text())
    config = train["lineage"][-1]["options"]["train_config"]
    return {"wall_s": wall, "test_accuracy": evaluated["accuracy"], "train_s": train["metrics"]["train_seconds"],
            "epochs": config["epochs"], "precision": config["precision"], "samples_per_s": train["metrics"]["samples_per_s"]}


def run_classic(seed: int, epochs: int, samples: int) -> dict:
    """The classic example in a fresh interpreter (this file with --classic-run), timed wall to wall."""
    cmd = [sys.executable, __file__, "--classic-run", str(seed), "--classic-epochs", str(epochs),
           "--classic-samples", str(samples)]
    stdout, wall = run_timed(cmd, "the classic example")
    return {"wall_s": wall, **json.loads(stdout), "epochs": epochs, "precision": "fp32"}


def classic_example(seed: int, epochs: int, samples: int = 0) -> dict:
    """conv32-pool-conv64-pool-dense128, Adam, batch 32, plain fp32 loop: the tutorial network."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from dlkit.data import load_dataset

    torch.manual_seed(seed)
    data = load_dataset("fashion-mnist", val_fraction=0.0, download=False)
    (x, y), (xt, yt) = data.train, data.test
    if samples:  # a quick check of the script only: the first training images
        x, y = x[:samples], y[:samples]
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xt[i : i + 1000]).argmax(1) == yt[i : i + 1000]).sum()) for i in range(0, len(xt), 1000))
    return {"test_accuracy": correct / len(xt), "train_s": train_s, "samples_per_s": epochs * len(x) / train_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="cnn:fashion-mnist,mlp:digits,cnn:digits")
    ap.add_argument("--repeats", type=int, default=1, help="seeds per case")
    ap.add_argument("--extra", default="", help="extra train options, e.g. '--epochs 8'")
    ap.add_argument("--precisions", default="default",
                    help="comma list of default (no --precision: dlkit's choice), fp32, bf16")
    ap.add_argument("--classic-epochs", type=int, default=5)
    ap.add_argument("--classic-samples", type=int, default=0, help="0: all training images (else a quick check)")
    ap.add_argument("--no-classic", action="store_true", help="skip the classic example (no wall-time target)")
    ap.add_argument("--recipes", default="", help="comma list of recipes/ names to run (`dlkit run`) per seed")
    ap.add_argument("--classic-run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.classic_run is not None:  # the child process of run_classic
        print(json.dumps(classic_example(args.classic_run, args.classic_epochs, args.classic_samples)))
        return
    cases = [(c.split(":")[0], c.split(":")[1], p) for c in args.cases.split(",") if c
             for p in args.precisions.split(",")]
    recipes = [r for r in args.recipes.split(",") if r]
    if not cases and not recipes and args.no_classic:
        raise SystemExit("nothing to run: give --cases, --recipes or leave out --no-classic")
    runs: dict[str, list[dict]] = {}
    for seed in range(args.repeats):  # alternate: every case, then the reference, per seed
        for model, dataset, precision in cases:
            extra = args.extra.split() + ([] if precision == "default" else ["--precision", precision])
            runs.setdefault(f"{model}:{dataset}:{precision}", []).append(run_case(model, dataset, seed, extra))
            print(f"{model}:{dataset}:{precision} seed {seed}: {runs[f'{model}:{dataset}:{precision}'][-1]}",
                  flush=True)
        for name in recipes:
            runs.setdefault(f"recipe:{name}", []).append(run_recipe(name, seed))
            print(f"recipe:{name} seed {seed}: {runs[f'recipe:{name}'][-1]}", flush=True)
        if not args.no_classic:
            runs.setdefault(CLASSIC, []).append(run_classic(seed, args.classic_epochs, args.classic_samples))
            print(f"{CLASSIC} seed {seed}: {runs[CLASSIC][-1]}", flush=True)
    classic_wall = median([r["wall_s"] for r in runs[CLASSIC]]) if CLASSIC in runs else None
    rows, results = [], {}
    for key, rs in runs.items():
        model, dataset = key.split(":")[:2]
        acc, wall = median([r["test_accuracy"] for r in rs]), median([r["wall_s"] for r in rs])
        floor, limit = TARGETS.get((model, dataset), (None, None)) if key != CLASSIC else (None, None)
        limit_s = classic_wall if limit == "classic" else limit
        ok = None if floor is None else (acc >= floor and (limit_s is None or wall <= limit_s))
        results[key] = {"extra": args.extra, "runs": rs, "median_test_accuracy": acc, "median_wall_s": wall,
                        "target_accuracy": floor, "target_wall_s": limit_s, "met": ok}
        goal = "-" if floor is None else f">= {100 * floor:.1f}%" + (
            f" in <= {limit_s:.0f} s" + (" (classic)" if limit == "classic" else "") if limit_s else "")
        rows.append([key, rs[0]["epochs"], rs[0]["precision"], f"{100 * acc:.2f}%", f"{wall:.0f}",
                     f"{median([r['samples_per_s'] for r in rs]):,.0f}", goal,
                     "-" if ok is None else ("yes" if ok else "NO")])
    print_table(f"default recipes against the classic example, median of {args.repeats} seed(s)",
                ["case", "epochs", "precision", "test acc", "wall s", "train samples/s", "target", "met"], rows)
    # Cases accumulate across invocations (one case can take minutes): merge with earlier results.
    previous = results_path("accuracy")
    if previous.exists():
        results = {**json.loads(previous.read_text()).get("results", {}), **results}
    write_json("accuracy", {"results": results})


if __name__ == "__main__":
    main()
