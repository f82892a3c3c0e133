"""dlkit's training engine against a hand-written PyTorch loop, side by side in one run.

Same model, data (Fashion-MNIST, or digits upscaled if absent), batch size and optimizer; the plain
loop is the textbook one (shuffle, slice, forward, cross-entropy, backward, step, loss.item()), in
fp32 (as written, and with model and batches in channels_last as dlkit runs convolutional models)
and in bf16 (autocast + channels_last: the best a hand-written bf16 loop does). The two channels_last
plain loops give the bf16/fp32 ratio a hand-written loop reaches with the same layout, the ceiling
for dlkit's own bf16/fp32 ratio on this machine. Rounds alternate between the contenders so machine noise hits all of
them alike; medians reported. bf16 is emulated (slow) without AVX512-BF16/AMX: the result file
records the CPU's flags, and dlkit bf16 rows are skipped there unless --bf16 is given.

    python benchmarks/train_speed.py [--samples 8192] [--rounds 3] [--models cnn,resnet20]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/train_speed.py --bf16 ...
        (an AVX2-only CPU emulated on this one; results in train_speed-capped-avx2.json)
Targets (issue 18): dlkit fp32 >= 1.0x the plain fp32 loop; on a native-bf16 CPU, dlkit bf16 >= 2.0x
dlkit fp32 for cnn and resnet20 (and the plain bf16 loop shows what a hand-written loop reaches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from common import median, print_table, results_path, write_json


def plain_loop(model, x, y, batch_size, lr, seed, bf16=False, channels_last=None):
    """``channels_last``: None puts convolutional models in channels_last for bf16 only."""
    conv = (bf16 if channels_last is None else channels_last) and x.ndim == 4 and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if conv:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t = time.perf_counter()
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        xb = x[idx].contiguous(memory_format=torch.channels_last) if conv else x[idx]
        opt.zero_grad()
        with cast:
            loss = F.cross_entropy(model(xb), y[idx])
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
    ap.add_argument("--bf16", action="store_true", help="time bf16 even where it is emulated")
    args = ap.parse_args()

    from dlkit.data import load_dataset
    from dlkit.device import native_bf16
    from dlkit.models import create_model

    bf16 = args.bf16 or native_bf16(torch.device("cpu"))

    try:
        data = load_dataset("fashion-mnist", val_fraction=0.0, download=False)
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs without the Debian package
        print(f"fashion-mnist unavailable ({exc}); using digits")
        data = load_dataset("digits", val_fraction=0.0)
    x, y = data.train[0][: args.samples], data.train[1][: args.samples]
    rows, results = [], {}
    for name in args.models.split(","):
        keys = ["plain fp32", "plain fp32 cl", "dlkit fp32"] + (["plain bf16", "dlkit bf16"] if bf16 else [])
        speeds = {k: [] for k in keys}
        for r in range(args.rounds):
            for key in speeds:
                torch.manual_seed(0)
                model = create_model(name, data.spec)[0]
                if key.startswith("plain"):
                    speeds[key].append(plain_loop(model, x, y, args.batch_size, 1e-3, r, bf16="bf16" in key,
                                                  channels_last=True if key.endswith("cl") else None))
                else:
                    speeds[key].append(dlkit_loop(model, x, y, args.batch_size, 1e-3, r, key.split()[1]))
        med = {k: median(v) for k, v in speeds.items()}
        ratio = (lambda a, b: med[a] / med[b] if a in med and b in med else None)
        results[name] = {"samples_per_s": speeds, "median": med,
                         "dlkit_fp32_vs_plain": ratio("dlkit fp32", "plain fp32"),
                         "dlkit_bf16_vs_dlkit_fp32": ratio("dlkit bf16", "dlkit fp32"),
                         "plain_bf16_vs_plain_fp32": ratio("plain bf16", "plain fp32"),
                         "plain_bf16_vs_plain_fp32_cl": ratio("plain bf16", "plain fp32 cl"),
                         "dlkit_bf16_vs_plain_bf16": ratio("dlkit bf16", "plain bf16"),
                         "target_bf16_2x": None if "dlkit bf16" not in med else ratio("dlkit bf16", "dlkit fp32") >= 2.0}
        show = (lambda v: "-" if v is None else f"{v:.2f}x")
        rows.append([name, *[f"{med[k]:,.0f}" if k in med else "-" for k in
                             ("plain fp32", "plain fp32 cl", "dlkit fp32", "plain bf16", "dlkit bf16")],
                     show(results[name]["dlkit_fp32_vs_plain"]), show(results[name]["dlkit_bf16_vs_dlkit_fp32"]),
                     show(results[name]["plain_bf16_vs_plain_fp32"]), show(results[name]["plain_bf16_vs_plain_fp32_cl"])])
        print(" ".join(rows[-1]), flush=True)  # a slow model (bf16 is emulated on AVX2) keeps what came before
        previous = results_path("train_speed")  # models accumulate across invocations
        merged = {**(json.loads(previous.read_text()).get("results", {}) if previous.exists() else {}), **results}
        write_json("train_speed", {"dataset": data.name, "batch_size": args.batch_size, "samples": len(x),
                                   "rounds": args.rounds, "results": merged})
    print_table(f"training samples/s on {data.name}, batch {args.batch_size}, {len(x)} samples/epoch, "
                f"median of {args.rounds} alternating rounds" + ("" if bf16 else " (no native bf16 here: bf16 not timed)"),
                ["model", "plain fp32", "plain fp32 cl", "dlkit fp32", "plain bf16 cl", "dlkit bf16", "dlkit fp32/plain",
                 "dlkit bf16/fp32", "plain bf16 cl/fp32", "plain bf16 cl/fp32 cl"], rows)
    # the result file was written after each model (merged with earlier invocations' models)


if __name__ == "__main__":
    main()
