"""FSDP against DDP on 2 CPU processes (gloo): what each rank holds, its peak, the accuracy reached.

1. Memory, per rank. Both strategies run inside one launch (dlkit.engine.distributed.launch, the
   launcher `dlkit train --nproc` uses) and step through dlkit's own training loop
   (``trainer._start``, ``_Run.step``: the real loss weighting and collectives) at each global
   batch. The peak of a step after the first (the optimizer state exists, as in every later step)
   is read from PyTorch's profiler (``dlkit.profiling.memory.measure_peak``, as benchmarks/plan.py
   does: every CPU allocation and free in order, tensors alive before and used included; see
   ``measured_peak`` for why two steps are profiled, and its fallback). The global batch itself is
   held as the training set and is not part of a step: its bytes are subtracted. Each rank then
   counts what it holds: parameter, gradient and optimizer-state bytes of its local tensors (FSDP's
   shards, DDP's replica). The planner (``dlkit.plan.plan_training``, ``--strategy ddp|fsdp
   --devices 2 --device-memory cpu``, fp32, AdamW, micro-batch = global / 2) predicts the peak of
   that step. Targets: FSDP holds half of DDP's states per rank; |predicted / measured - 1| <= 15%.
2. Accuracy. ``dlkit train MODEL --dataset D --nproc 2 --strategy ddp`` and ``... fsdp`` with the
   same seed and global batch; target: test accuracy within 1 point.

    python benchmarks/fsdp.py            # transformer on fashion-mnist, 1 epoch, global batch 128
    python benchmarks/fsdp.py --quick    # digits, 1 epoch, one batch size: a smoke run (no JSON written)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, run_timed, write_json  # noqa: E402

STRATEGIES = ("ddp", "fsdp")
PEAK_TOLERANCE = 0.15
ACCURACY_POINTS = 1.0


def held_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of this rank's own parameters, gradients and optimizer state (local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    def size(t) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list({id(p): p for p in model.parameters()}.values())
    state = [v for slots in optimizer.state.values() for v in slots.values() if hasattr(v, "ndim") and v.ndim > 0]
    grads = [p.grad for p in params if p.grad is not None]
    return {"parameters": sum(size(p) for p in params), "gradients": sum(size(g) for g in grads),
            "optimizer_state": sum(size(v) for v in state)}


def allocation_peak(fn, baseline: int) -> int:
    """The fallback: ``baseline`` plus the highest running sum of the profiler's raw allocation
    events while ``fn()`` runs (no data-flow analysis, so it cannot fail; it sees only what is
    allocated and freed in ``fn``, so ``baseline`` must hold what lives through it)."""
    from torch._C._profiler import _EventType
    from torch.autograd.profiler import profile

    with profile(use_cpu=True, profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return baseline + peak


def measured_peak(run, step, device, ctx) -> tuple[int, str]:
    """(peak bytes of a training step after the first, how it was measured).

    The profiler cannot see the free of a block allocated before profiling began, and each step
    frees the last step's gradients first: profiled alone, a step would count them twice. So the
    optimizer starts afresh (no gradients, no state) and two steps run under the profiler; the
    second, with the optimizer state the first created, sets the peak. The memory timeline
    (``measure_peak``, as benchmarks/plan.py measures) is a private API that fails on some runs;
    then every rank runs the two steps again (their collectives must match) and a rank without a
    timeline reads the raw allocation events, with the weights and buffers alive before as
    baseline (right for FSDP, whose other states are all made in the steps; DDP's gradient
    buckets, made before, would be missed: marked in the row).
    """
    from dlkit.profiling.memory import measure_peak

    def two_steps():
        step()
        step()

    def fresh():
        run.optimizer.zero_grad(set_to_none=True)
        run.optimizer.state.clear()

    fresh()
    peak = measure_peak(two_steps, device)
    if not ctx.any(peak is None, device):
        return peak, "timeline"
    fresh()
    model = run.model
    baseline = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in _locals(model)}.values())
    raw = allocation_peak(two_steps, baseline)
    return (peak, "timeline") if peak is not None else (raw, "allocations")


def _locals(model) -> list:
    """The local tensors of the model's parameters (their storages: FSDP's padded shards) and buffers."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in list(model.parameters()) + list(model.buffers())]


def memory_worker(model_name: str, dataset: str, batches: list[int], seed: int,
                  overrides: dict | None = None) -> list[dict] | None:
    """One rank: for each strategy and global batch, a first step, then the measured one
    (``measured_peak``) and what the rank holds after it; every rank's rows, on rank 0."""
    import torch

    from dlkit.data import load_dataset
    from dlkit.engine import distributed
    from dlkit.engine.trainer import TrainConfig, TrainState, _RunningSums, _start
    from dlkit.models import create_model

    ctx, device = distributed.setup(torch.device("cpu"))
    data = load_dataset(dataset, seed=seed)
    rows = []
    for strategy in STRATEGIES:
        for batch in batches:
            torch.manual_seed(seed)
            model, _ = create_model(model_name, data.spec, overrides or {})
            x, y = data.train[0][:batch].clone(), data.train[1][:batch].clone()
            cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="adamw", lr=1e-3, strategy=strategy,
                              augment=False, precision="fp32").validate()
            run = _start(model, (x, y), cfg, device=device, seed=seed, augment=None, optimizer_state=None, ctx=ctx)
            run.net.train()
            state = TrainState()
            perm = torch.arange(batch)

            def step():
                state.batch = 0  # the same global batch every time
                run.step(state, perm, _RunningSums(state, device))

            step()  # lazy initialisations (FSDP's, DDP's buckets) happen in the first step
            ctx.barrier()
            peak, method = measured_peak(run, step, device, ctx)
            rows.append({"strategy": strategy, "global_batch": batch, "rank": ctx.rank, "method": method,
                         "measured_peak": peak - x.nbytes - y.nbytes,
                         "held": held_bytes(run.model, run.optimizer)})
            run = model = None  # free this row's model before the next one is built
            gc.collect()
    gathered: list = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, rows)
    distributed.teardown(ctx)
    return [r for rank_rows in gathered for r in rank_rows]


def predicted_peak(model_name: str, dataset: str, strategy: str, micro_batch: int,
                   overrides: dict | None = None) -> int:
    from dlkit.plan import PlanOptions, plan_training

    plan = plan_training(model_name, PlanOptions(batch_size=micro_batch, precision="fp32", optimizer="adamw",
                                                 strategy=strategy, devices=2, device_memory="cpu", search=False,
                                                 dataset=dataset, overrides=overrides or None))
    return plan.memory.peak


def train(model_name: str, dataset: str, strategy: str, epochs: int, batch: int, seed: int) -> dict:
    """`dlkit train ... --nproc 2 --strategy S --json` in a subprocess: its result and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dlkit", "train", model_name, "--dataset", dataset, "--epochs", str(epochs),
               "--batch-size", str(batch), "--seed", str(seed), "--nproc", "2", "--strategy", strategy,
               "--device", "cpu", "--quiet", "--json", "--out", str(Path(tmp) / "run")]
        stdout, seconds = run_timed(cmd, f"dlkit train --strategy {strategy}")
    doc = json.loads(stdout)
    return {"strategy": strategy, "test_accuracy": doc["test"]["accuracy"], "test_loss": doc["test"]["loss"],
            "train_loss": [h["train_loss"] for h in doc["history"]], "seconds": seconds,
            "distributed": {k: v for k, v in doc["distributed"].items() if k != "parameter_sha256"}}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


# Memory rows: the training task's model, and a wider one whose states outweigh its activations
# at small batches (where sharding shows in the peak): (label, --set overrides, global batches).
MEMORY_CONFIGS = [("as trained", {}, (32, 128, 512)),
                  ("wide", {"dim": "384", "depth": "6", "heads": "6", "ffn_dim": "1536"}, (8, 32))]


def _memory_rows(args) -> list[dict]:
    from dlkit.engine.distributed import launch

    configs = [("as trained", {}, (64,))] if args.quick else MEMORY_CONFIGS
    rows = []
    for label, overrides, batches in configs:
        for r in launch(2, memory_worker, args.model, args.dataset, list(batches), args.seed, overrides):
            r.update(config=label, overrides=overrides)
            r["predicted_peak"] = predicted_peak(args.model, args.dataset, r["strategy"], r["global_batch"] // 2,
                                                 overrides)
            r["error"] = r["predicted_peak"] / r["measured_peak"] - 1
            rows.append(r)
    ddp = {(r["config"], r["global_batch"], r["rank"]): r["held"] for r in rows if r["strategy"] == "ddp"}
    for r in rows:
        base = ddp[(r["config"], r["global_batch"], r["rank"])]
        r["held_vs_ddp"] = {k: v / base[k] if base[k] else None for k, v in r["held"].items()}
        r["states_vs_ddp"] = sum(r["held"].values()) / sum(base.values())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="transformer")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch of the training runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="digits, one memory row per strategy: a smoke run, no JSON")
    args = ap.parse_args()
    if args.quick:
        args.dataset = "digits"

    rows = _memory_rows(args)
    print_table(f"{args.model} on {args.dataset}, 2 processes (gloo), fp32, AdamW: per rank, one training step (MiB)",
                ["config", "strategy", "global batch", "rank", "params", "grads", "optim state", "states vs ddp",
                 "measured peak", "measured by", "predicted peak", "error", f"within {PEAK_TOLERANCE:.0%}"],
                [[r["config"], r["strategy"], r["global_batch"], r["rank"], _mib(r["held"]["parameters"]),
                  _mib(r["held"]["gradients"]), _mib(r["held"]["optimizer_state"]), f"{r['states_vs_ddp']:.3f}",
                  _mib(r["measured_peak"]), r["method"], _mib(r["predicted_peak"]),
                  f"{100 * r['error']:+.1f}%", "ok" if abs(r["error"]) <= PEAK_TOLERANCE else "MISS"]
                 for r in sorted(rows, key=lambda r: (r["config"], r["strategy"], r["global_batch"], r["rank"]))])

    runs = [train(args.model, args.dataset, s, args.epochs, args.batch_size, args.seed) for s in STRATEGIES]
    gap = 100 * (runs[1]["test_accuracy"] - runs[0]["test_accuracy"])
    print_table(f"dlkit train {args.model} --dataset {args.dataset} --epochs {args.epochs} --batch-size "
                f"{args.batch_size} --nproc 2 (load average {os.getloadavg()[0]:.1f})",
                ["strategy", "test accuracy", "test loss", "last train loss", "wall s"],
                [[r["strategy"], f"{100 * r['test_accuracy']:.2f}%", f"{r['test_loss']:.4f}",
                  f"{r['train_loss'][-1]:.4f}", f"{r['seconds']:.1f}"] for r in runs])
    fsdp_rows = [r for r in rows if r["strategy"] == "fsdp"]
    half = all(0.45 <= v <= 0.55 for r in fsdp_rows for v in r["held_vs_ddp"].values() if v is not None)
    within = sum(abs(r["error"]) <= PEAK_TOLERANCE for r in fsdp_rows)
    print(f"\nfsdp states per rank half of ddp's: {'yes' if half else 'NO'}; fsdp peaks within {PEAK_TOLERANCE:.0%} "
          f"of the plan: {within}/{len(fsdp_rows)}; accuracy fsdp - ddp: {gap:+.2f} points (target within "
          f"{ACCURACY_POINTS:g}: {'yes' if abs(gap) <= ACCURACY_POINTS else 'NO'})")
    if not args.quick:
        write_json("fsdp", {"model": args.model, "dataset": args.dataset, "epochs": args.epochs,
                            "global_batch": args.batch_size, "seed": args.seed, "memory": rows, "training": runs,
                            "accuracy_gap_points": gap, "peak_tolerance": PEAK_TOLERANCE,
                            "states_half_of_ddp": half, "fsdp_peaks_within": [within, len(fsdp_rows)]})


if __name__ == "__main__":
    main()
