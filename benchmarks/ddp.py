"""Distributed data parallel on this machine: samples/s for 1 and 2 processes, and the share of a
step spent in DDP's gradient all-reduce.

Each configuration is launched through the same elastic launcher `dlkit train --nproc` uses
(dlkit.engine.distributed.launch), and trains with dlkit's own fit() on the same data, model and
global batch. One process gets all usable cores as threads; N processes get cores // N each (what
dlkit chooses). The communication share is measured inside the 2-process run: the same batches
are timed with gradient synchronisation (normal DDP steps) and under DDP's ``no_sync()`` (no
all-reduce), in alternating blocks; share = 1 - t(no_sync) / t(sync).

    python benchmarks/ddp.py [--samples 8192] [--rounds 3] [--model cnn] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, write_json  # noqa: E402


def _data(samples: int):
    from dlkit.data import load_dataset

    try:
        data = load_dataset("fashion-mnist", val_fraction=0.0, download=False)
    except Exception:  # noqa: BLE001 - the benchmark still runs without the Debian package
        data = load_dataset("digits", val_fraction=0.0)
    return data, data.train[0][:samples], data.train[1][:samples]


def worker(model_name: str, samples: int, batch_size: int, epochs: int, comm_steps: int, threads: int) -> dict:
    """One worker: dlkit's fit() for ``epochs``, then (if distributed) the sync / no_sync timing."""
    import torch
    import torch.nn.functional as F

    from dlkit.engine import distributed
    from dlkit.engine.trainer import TrainConfig, fit
    from dlkit.models import create_model

    dist, device = distributed.setup(torch.device("cpu"))
    if dist is None:
        torch.set_num_threads(threads)
    data, x, y = _data(samples)
    torch.manual_seed(0)
    model = create_model(model_name, data.spec)[0]
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=1e-3, augment=False)
    empty = (x[:0], y[:0])
    state, _ = fit(model, (x, y), empty, cfg, device=device, seed=0, dist=dist)
    out = {"samples_per_s": [r["samples_per_s"] for r in state.history], "threads": torch.get_num_threads(),
           "world_size": dist.world_size if dist else 1, "dataset": data.name,
           "params": sum(p.numel() for p in model.parameters())}
    if dist is not None:
        net = dist.wrap(model, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        local = batch_size // dist.world_size
        xb, yb = x[dist.rank * local : (dist.rank + 1) * local], y[dist.rank * local : (dist.rank + 1) * local]

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()

        times = {"sync": [], "no_sync": []}
        for _ in range(3):
            step()
        for block in range(comm_steps // 10):
            for mode in ("sync", "no_sync"):
                torch.distributed.barrier()
                t = time.perf_counter()
                for _ in range(10):
                    if mode == "sync":
                        step()
                    else:
                        with net.no_sync():
                            step()
                times[mode].append((time.perf_counter() - t) / 10)
        out["step_seconds"] = times
        grad = torch.zeros(out["params"])  # the gradient's all-reduce alone (one flat bucket)
        reduce_times = []
        for _ in range(comm_steps):
            torch.distributed.barrier()
            t = time.perf_counter()
            torch.distributed.all_reduce(grad)
            reduce_times.append(time.perf_counter() - t)
        out["allreduce_seconds"] = reduce_times
        distributed.teardown(dist)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--comm-steps", type=int, default=60)
    args = ap.parse_args()

    from dlkit.engine.distributed import launch

    cores = len(os.sched_getaffinity(0))
    configs = [(1, cores), (1, 1), (2, max(1, cores // 2))]  # (processes, threads each)
    speeds = {c: [] for c in configs}
    comm, results = [], {}
    for r in range(args.rounds):  # alternate the configurations so machine noise hits all alike
        for n, threads in configs:
            t = time.perf_counter()
            res = launch(n, worker, args.model, args.samples, args.batch_size, args.epochs, args.comm_steps, threads)
            results.setdefault((n, threads), []).append({**res, "launch_seconds": time.perf_counter() - t})
            speeds[(n, threads)].append(res["samples_per_s"][-1])  # the last epoch: warmed up
            if n == 2:
                sync, nosync = median(res["step_seconds"]["sync"]), median(res["step_seconds"]["no_sync"])
                comm.append({"sync_step_s": sync, "no_sync_step_s": nosync, "share": max(0.0, 1 - nosync / sync),
                             "allreduce_s": median(res["allreduce_seconds"])})
    first = results[configs[0]][0]
    med = {c: median(v) for c, v in speeds.items()}
    base = med[configs[0]]
    rows = [[n, th, f"{med[(n, th)]:,.0f}", f"{med[(n, th)] / base:.2f}x",
             f"{median([x['launch_seconds'] for x in results[(n, th)]]):.1f}"] for n, th in configs]
    print_table(f"{args.model} on {first['dataset']}, global batch {args.batch_size}, {args.samples} samples/epoch, "
                f"dlkit fit(), last of {args.epochs} epochs, median of {args.rounds} alternating rounds "
                f"(machine shared with other jobs, load average {os.getloadavg()[0]:.1f}: absolute numbers are noisy)",
                ["processes", "threads/process", "samples/s", f"vs 1 process x {cores} threads", "launch+run s"], rows)
    share = median([c["share"] for c in comm])
    sync_ms = 1e3 * median([c["sync_step_s"] for c in comm])
    reduce_ms = 1e3 * median([c["allreduce_s"] for c in comm])
    print_table(f"DDP step on 2 processes, local batch {args.batch_size // 2}, {first['params']:,} parameters "
                f"({4 * first['params'] / 1e6:.2f} MB of fp32 gradient)",
                ["sync step ms", "no_sync step ms", "share (sync - no_sync)", "all-reduce alone ms",
                 "share (all-reduce / step)"],
                [[f"{sync_ms:.2f}", f"{1e3 * median([c['no_sync_step_s'] for c in comm]):.2f}", f"{100 * share:.1f}%",
                  f"{reduce_ms:.2f}", f"{100 * reduce_ms / sync_ms:.1f}%"]])
    write_json("ddp", {"model": args.model, "dataset": first["dataset"], "params": first["params"],
                       "batch_size": args.batch_size, "samples": args.samples, "rounds": args.rounds,
                       "samples_per_s": {f"{n}x{th}": v for (n, th), v in speeds.items()},
                       "median_samples_per_s": {f"{n}x{th}": v for (n, th), v in med.items()},
                       "speedup_2_vs_1": med[configs[2]] / base, "communication": comm,
                       "communication_share_no_sync": share, "allreduce_share": reduce_ms / sync_ms,
                       "load_average": os.getloadavg(),
                       "note": "2 cores shared with other jobs running at the same time"})


if __name__ == "__main__":
    main()
