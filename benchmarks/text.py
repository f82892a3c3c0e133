"""Text pipeline benchmark: tokenizing IMDB-sized data, and sequence models learning a text rule.

Part 1 -- tokenize and index 25,000 synthetic reviews of IMDB-like length (about 230 words on
average, lognormal lengths, words drawn from a Zipf law over a 60,000-word synthetic vocabulary):
``Tokenizer.build`` (vocabulary 10000, counted over all texts) and ``Tokenizer.encode`` (max length
100, right-padded int64 ids). Times are medians of 2 runs with tracemalloc off. Peak memory is
measured in a separate run with ``tracemalloc``: it sees the Python objects the tokenizer makes
(strings, lists, the counter, dicts) and numpy's output array, i.e. everything this pure-Python
step allocates; the input texts themselves are excluded (allocated before tracing starts).

Part 2 -- ``lstm`` and ``transformer`` (dlkit's default configs) trained on a generated task with
a learnable rule: each text has 10 to 30 filler words (from 3000) plus 0 to 3 words from set A
and 0 to 3 from set B (never equally many); the label is whether A words outnumber B words. Chance
is 50%. Sequences are cut at 48 tokens (no text is longer). Models: ``lstm`` with 64 units and
64-wide embeddings, ``transformer`` in its default config (dim 64, 2 blocks); each model's own
training defaults (optimizer, lr, schedule) with batch 64. Reported: test accuracy and training
samples/s (median over the epochs after the first) for fp32 and bf16 autocast, side by side in
one run.

    python benchmarks/text.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, write_json  # noqa: E402

from dlkit.data.text import Tokenizer  # noqa: E402


def synthetic_words(n: int, rng) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out, seen = [], set()
    while len(out) < n:
        w = "".join(rng.choice(letters, size=int(rng.integers(2, 10))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def imdb_like(n: int = 25000, mean_words: float = 230, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = np.array(synthetic_words(60000, rng))
    sigma = 0.7
    lengths = np.maximum(10, rng.lognormal(np.log(mean_words) - sigma ** 2 / 2, sigma, n).astype(int))
    ids = (rng.zipf(1.15, size=int(lengths.sum())) - 1) % len(pool)
    words = pool[ids]
    texts, start = [], 0
    for k in lengths:
        texts.append(" ".join(words[start:start + k]))
        start += k
    return texts


def bench_tokenizer(texts: list[str], repeats: int) -> dict:
    n_words = sum(t.count(" ") + 1 for t in texts)
    build, encode = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        tok = Tokenizer.build(texts, 10000, 100)
        build.append(time.perf_counter() - t)
        t = time.perf_counter()
        ids, truncated = tok.encode(texts)
        encode.append(time.perf_counter() - t)
    gc.collect()
    tracemalloc.start()
    tok = Tokenizer.build(texts, 10000, 100)
    _, peak_build = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    ids, _ = tok.encode(texts)
    _, peak_encode = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"texts": len(texts), "words": n_words, "mean_words": n_words / len(texts),
            "build_s": median(build), "encode_s": median(encode),
            "words_per_s_build": n_words / median(build),
            "texts_per_s_encode": len(texts) / median(encode),
            "peak_mib_build": peak_build / 2**20, "peak_mib_encode": peak_encode / 2**20,
            "ids_mib": ids.nbytes / 2**20, "truncated": truncated, "vocab": len(tok.vocab),
            "runs": repeats}


MAX_LEN = 48
OVERRIDES = {"lstm": {"hidden": "64", "embed_dim": "64"}, "transformer": {}}
A = ["splendid", "brilliant", "moving", "superb", "delightful"]
B = ["dull", "clumsy", "tedious", "awful", "bland"]


def rule_task(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    filler = synthetic_words(3000, rng)
    texts, labels = [], []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, 4, 2))
        while a == b:
            a, b = (int(v) for v in rng.integers(0, 4, 2))
        ws = list(rng.choice(filler, size=int(rng.integers(10, 31))))
        ws += list(rng.choice(A, size=a)) + list(rng.choice(B, size=b))
        rng.shuffle(ws)
        texts.append(" ".join(ws))
        labels.append(int(a > b))
    return texts, np.asarray(labels, dtype=np.int64)


def bench_models(n_train: int, n_test: int, epochs: int) -> list[dict]:
    import torch

    from dlkit.api import resolve_train_config
    from dlkit.engine.evaluate import evaluate_model
    from dlkit.engine.trainer import fit
    from dlkit.models import create_model
    from dlkit.spec import TEXT, DataSpec

    texts, labels = rule_task(n_train + n_test, seed=1)
    tok = Tokenizer.build(texts[:n_train], 4000, MAX_LEN)
    x, _ = tok.encode(texts)
    x, y = torch.from_numpy(x), torch.from_numpy(labels)
    train, test = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    spec = DataSpec(TEXT, (MAX_LEN,), 2, vocab_size=len(tok.vocab))
    rows = []
    for name in ("lstm", "transformer"):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model, _ = create_model(name, spec, OVERRIDES[name])
            cfg = resolve_train_config(name, {"epochs": epochs, "precision": precision, "batch_size": 64})
            t = time.perf_counter()
            state, _ = fit(model, train, (x[:0], y[:0]), cfg, device=torch.device("cpu"), seed=0)
            seconds = time.perf_counter() - t
            res = evaluate_model(model, *test, class_names=["B", "A"], split="test", batch_size=512,
                                 device=torch.device("cpu"), precision=precision)
            speeds = [r["samples_per_s"] for r in state.history]
            rows.append({"model": name, "precision": precision, "epochs": epochs, "lr": cfg.lr,
                         "test_accuracy": res.accuracy, "train_seconds": seconds,
                         "samples_per_s": statistics.median(speeds[1:] or speeds),
                         "params": sum(p.numel() for p in model.parameters())})
            print(f"  {name} {precision}: acc {res.accuracy:.3f}, {rows[-1]['samples_per_s']:.0f} samples/s",
                  file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    n = 2500 if args.quick else 25000
    started = time.perf_counter()
    texts = imdb_like(n)
    tok = bench_tokenizer(texts, repeats=1 if args.quick else 2)
    del texts
    print_table(f"tokenize + index {tok['texts']:,} synthetic reviews ({tok['mean_words']:.0f} words avg), "
                "vocab 10000, max_len 100 (shared, loaded 2-core machine: timings are noisy)",
                ["step", "median s", "rate", "tracemalloc peak MiB"],
                [["build vocabulary", f"{tok['build_s']:.2f}", f"{tok['words_per_s_build'] / 1e6:.2f} M words/s",
                  f"{tok['peak_mib_build']:.1f}"],
                 ["encode to ids", f"{tok['encode_s']:.2f}", f"{tok['texts_per_s_encode']:,.0f} texts/s",
                  f"{tok['peak_mib_encode']:.1f} (ids array {tok['ids_mib']:.1f})"]])
    models = bench_models(1000 if args.quick else 3000, 500 if args.quick else 1000, 1 if args.quick else 4)
    print_table(f"learning 'more A words than B words' (chance 50%), max_len {MAX_LEN} "
                "(loaded machine: samples/s are noisy)",
                ["model", "precision", "epochs", "test acc", "samples/s", "train s"],
                [[r["model"], r["precision"], r["epochs"], f"{r['test_accuracy']:.1%}",
                  f"{r['samples_per_s']:,.0f}", f"{r['train_seconds']:.1f}"] for r in models])
    by = {(r["model"], r["precision"]): r for r in models}
    ratios = {m: by[(m, "bf16")]["samples_per_s"] / by[(m, "fp32")]["samples_per_s"] for m in ("lstm", "transformer")}
    print("\nbf16 / fp32 samples/s: " + ", ".join(f"{m} {v:.2f}x" for m, v in ratios.items()))
    write_json("text" + ("-quick" if args.quick else ""), {
        "tokenizer": tok, "models": models, "bf16_over_fp32": ratios,
        "total_seconds": time.perf_counter() - started,
        "note": "shared 2-core machine under load from other jobs: absolute timings are noisy"})


if __name__ == "__main__":
    main()
