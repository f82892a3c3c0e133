"""dlkit's training engine against a hand-written PyTorch loop, side by side in one run.

Same model, data (Fashion-MNIST, or digits upscaled if absent), batch size and optimizer; the plain
loop is the textbook one (shuffle, slice, forward, cross-entropy, backward, step, loss.item()).
Rounds alternate between the contenders so machine noise hits all of them alike; medians reported.

    python benchmarks/train_speed.py [--samples 8192] [--rounds 3]
Targets (issue 2): dlkit fp32 >= 1.0x the plain loop; CNN bf16 >= 1.8x the plain fp32 loop.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import RESULTS, median, print_table, write_json


def plain_loop(model, x, y, batch_size, lr, seed):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    t = time.perf_counter()
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        loss.item()
    return len(x) / (time.perf_counter() - t)


def dlkit_loop(model, x, y, batch_size, lr, seed, precision):
    from dlkit.engine.trainer import TrainConfig, fit

    cfg = TrainConfig(epochs=1, batch_size=batch_size, optimizer="adam", lr=lr, precision=precision, augment=False)
    empty = (x[:0], y[:0])
    state, _ = fit(model, (x, y), empty, cfg, device=torch.device("cpu"), seed=seed)
    return state.history[-1]["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="mlp,cnn,resnet20,lstm")
    args = ap.parse_args()

    from dlkit.data import load_dataset
    from dlkit.models import create_model

    try:
        data = load_dataset("fashion-mnist", val_fraction=0.0, download=False)
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs without the Debian package
        print(f"fashion-mnist unavailable ({exc}); using digits")
        data = load_dataset("digits", val_fraction=0.0)
    x, y = data.train[0][: args.samples], data.train[1][: args.samples]
    rows, results = [], {}
    for name in args.models.split(","):
        speeds = {"plain fp32": [], "dlkit fp32": [], "dlkit bf16": []}
        for r in range(args.rounds):
            for key in speeds:
                torch.manual_seed(0)
                model = create_model(name, data.spec)[0]
                if key == "plain fp32":
                    speeds[key].append(plain_loop(model, x, y, args.batch_size, 1e-3, r))
                else:
                    speeds[key].append(dlkit_loop(model, x, y, args.batch_size, 1e-3, r, key.split()[1]))
        med = {k: median(v) for k, v in speeds.items()}
        results[name] = {"samples_per_s": speeds, "median": med,
                         "dlkit_fp32_vs_plain": med["dlkit fp32"] / med["plain fp32"],
                         "dlkit_bf16_vs_plain_fp32": med["dlkit bf16"] / med["plain fp32"]}
        rows.append([name, f"{med['plain fp32']:,.0f}", f"{med['dlkit fp32']:,.0f}", f"{med['dlkit bf16']:,.0f}",
                     f"{results[name]['dlkit_fp32_vs_plain']:.2f}x", f"{results[name]['dlkit_bf16_vs_plain_fp32']:.2f}x"])
        print(" ".join(rows[-1]), flush=True)  # a slow model (bf16 is emulated on AVX2) keeps what came before
        previous = RESULTS / "train_speed.json"  # models accumulate across invocations
        merged = {**(json.loads(previous.read_text()).get("results", {}) if previous.exists() else {}), **results}
        write_json("train_speed", {"dataset": data.name, "batch_size": args.batch_size, "samples": len(x),
                                   "rounds": args.rounds, "results": merged})
    print_table(f"training samples/s on {data.name}, batch {args.batch_size}, {len(x)} samples/epoch, "
                f"median of {args.rounds} alternating rounds",
                ["model", "plain fp32", "dlkit fp32", "dlkit bf16", "dlkit fp32/plain", "dlkit bf16/plain fp32"], rows)
    write_json("train_speed", {"dataset": data.name, "batch_size": args.batch_size, "samples": len(x),
                               "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
