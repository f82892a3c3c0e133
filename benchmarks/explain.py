"""dlkit explain: how faithful each attribution method is, and what it costs (issue 14).

Two models: ``cnn`` (dlkit's default config and training recipe) on Fashion-MNIST, and ``lstm``
(64 units, 64-wide embeddings, 4 epochs) on the generated text rule of ``benchmarks/text.py``
(whether words of set A outnumber words of set B among 10 to 30 filler words). For every method
that applies, ``explain_artifact`` runs on the first N test samples (default 200) and reports,
as means over the samples: deletion and insertion AUC beside a random order's (4 random orders per
sample), the share of samples better than random on both curves, integrated gradients'
completeness error, and seconds per explanation (the attribution call alone, 2 threads).

    python benchmarks/explain.py [--samples 200] [--quick] [--cnn ARTIFACT] [--lstm ARTIFACT]

``--quick`` trains small models on ``digits`` and a small text task and explains 8 samples (a
smoke run; its numbers mean little). Targets: the best method's deletion AUC <= 0.7x random's on
both models; IG completeness error < 5% at the default 50 steps; IG on the cnn < 0.2 s per sample.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402
from text import rule_task  # noqa: E402


def train_cnn(root: Path, quick: bool) -> Path:
    from dlkit.api import TrainRequest, train_model

    if quick:
        req = TrainRequest(model="cnn", dataset="digits", overrides={"channels": "8,16", "hidden": "32"},
                           device="cpu", out=root / "cnn", options={"epochs": 2, "batch_size": 64})
    else:
        req = TrainRequest(model="cnn", dataset="fashion-mnist", device="cpu", out=root / "cnn")
    return train_model(req).artifact


def train_lstm(root: Path, quick: bool) -> Path:
    import csv

    from dlkit.api import TrainRequest, train_model

    texts, labels = rule_task(600 if quick else 6000, seed=1)
    data = root / "rule.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([t, "A" if y else "B"] for t, y in zip(texts, labels))
    req = TrainRequest(model="lstm", dataset="text-csv", overrides={"hidden": "64", "embed_dim": "64"}, seed=0,
                       device="cpu", out=root / "lstm", options={"epochs": 4, "batch_size": 64},
                       data_options={"data_file": str(data), "text_column": "text", "label_column": "label",
                                     "max_len": 48, "vocab_size": 4000})
    return train_model(req).artifact


def bench(artifact: Path, name: str, samples: int, root: Path) -> list[dict]:
    from dlkit.choices import EXPLAIN_METHODS
    from dlkit.errors import IncompatibleError
    from dlkit.explain import ExplainOptions, explain_artifact

    rows = []
    for method in EXPLAIN_METHODS:
        try:
            res = explain_artifact(artifact, ExplainOptions(method=method, samples=samples, device="cpu",
                                                            out=root / f"{name}-{method}"))
        except IncompatibleError as exc:
            print(f"  {name} {method}: skipped ({exc.message})", file=sys.stderr, flush=True)
            continue
        s = res.summary()
        rows.append({"model": name, "method": method, "samples": len(res.samples), **s,
                     "deletion_ratio": s["deletion_auc"] / s["random_deletion_auc"]})
        print(f"  {name} {method}: deletion {s['deletion_auc']:.3f} (random {s['random_deletion_auc']:.3f}), "
              f"{s['seconds_per_sample']:.3f} s/sample", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="small models on small data, 8 samples: a smoke run")
    ap.add_argument("--cnn", type=Path, help="an artifact to use instead of training the cnn")
    ap.add_argument("--lstm", type=Path, help="an artifact to use instead of training the lstm")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    samples = 8 if args.quick else args.samples
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cnn = args.cnn or train_cnn(root, args.quick)
        lstm = args.lstm or train_lstm(root, args.quick)
        rows = bench(cnn, "cnn", samples, root) + bench(lstm, "lstm", samples, root)
    table = []
    for r in rows:
        ig = r.get("completeness_relative_error")
        table.append([r["model"], r["method"], f"{r['deletion_auc']:.3f}", f"{r['random_deletion_auc']:.3f}",
                      f"{r['deletion_ratio']:.2f}x", f"{r['insertion_auc']:.3f}", f"{r['random_insertion_auc']:.3f}",
                      f"{r['better_than_random']}/{r['samples']}", "" if ig is None else f"{100 * ig:.2f}%",
                      f"{r['seconds_per_sample']:.3f}"])
    print_table(f"dlkit explain, mean over {samples} test samples per model",
                ["model", "method", "deletion", "random", "ratio", "insertion", "random", "better", "IG error",
                 "s/sample"], table)
    targets = {}
    for model in ("cnn", "lstm"):
        mine = [r for r in rows if r["model"] == model]
        best = min(mine, key=lambda r: r["deletion_ratio"])
        ig = next(r for r in mine if r["method"] == "ig")
        targets[model] = {"best_method": best["method"], "best_deletion_ratio": best["deletion_ratio"],
                          "best_deletion_ratio_met": best["deletion_ratio"] <= 0.7,
                          "ig_completeness_met": ig["completeness_relative_error"] < 0.05,
                          "ig_seconds_per_sample": ig["seconds_per_sample"]}
    targets["cnn"]["ig_seconds_met"] = targets["cnn"]["ig_seconds_per_sample"] < 0.2
    for model, t in targets.items():
        print(f"{model}: best {t['best_method']} at {t['best_deletion_ratio']:.2f}x random's deletion AUC "
              f"({'met' if t['best_deletion_ratio_met'] else 'NOT met'}); IG completeness "
              f"{'met' if t['ig_completeness_met'] else 'NOT met'}; IG {t['ig_seconds_per_sample']:.3f} s/sample")
    write_json("explain-quick" if args.quick else "explain", {"samples": samples, "quick": args.quick, "rows": rows,
                                                               "targets": targets})


if __name__ == "__main__":
    main()
