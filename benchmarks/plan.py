"""The planner's predicted peak against a measured one: one training step on this CPU.

For each model, batch size, precision (fp32; bf16 weights and activations) and checkpointing
(none; full, every block recomputed with ``torch.utils.checkpoint``), ``dlkit.plan`` predicts the
step's peak from the meta trace (``--device-memory cpu``: PyTorch's CPU kernels), and the real
model then runs the step: AdamW, one warm-up step first (so the optimizer state exists, as in any
step after the first), then the measured step under PyTorch's profiler with ``profile_memory``
(``dlkit.profiling.memory.measure_peak``: every allocation and free in order, the tensors alive
before the step and used in it included). Target: |predicted / measured - 1| <= 10% per row.

    python benchmarks/plan.py [--models transformer,gpt-mini,resnet20,lstm] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402

BATCHES = {"transformer": (16, 64, 256), "gpt-mini": (4, 16, 64), "resnet20": (16, 64, 256), "lstm": (16, 64, 256)}
TINY = {"transformer": (4,), "gpt-mini": (2,), "resnet20": (4,), "lstm": (4,)}
TOLERANCE = 0.10


def _checkpointed(model, blocks: list[str]) -> None:
    """Wrap each block's forward in ``torch.utils.checkpoint`` (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for name in blocks:
        mod = model.get_submodule(name)
        forward = mod.forward
        mod.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def measure(name: str, batch: int, precision: str, checkpointing: str) -> int:
    import torch

    from dlkit.models.registry import support_of
    from dlkit.plan import find_blocks
    from dlkit.plan.trace import training_loss
    from dlkit.profiling.memory import measure_peak
    from dlkit.profiling.target import resolve_target

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    tgt, _ = resolve_target(name)
    model = tgt.build("cpu").to(dtype)
    if checkpointing == "full":
        _checkpointed(model, find_blocks(model, support_of(model).blocks))
    x = tgt.example(batch, "cpu")
    if x.is_floating_point():
        x = x.to(dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = training_loss(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return measure_peak(step, torch.device("cpu"))


def predict(name: str, batch: int, precision: str, checkpointing: str) -> int:
    from dlkit.plan import PlanOptions, plan_training

    plan = plan_training(name, PlanOptions(batch_size=batch, precision=precision, checkpointing=checkpointing,
                                           device_memory="cpu", search=False))
    return plan.memory.peak


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BATCHES))
    ap.add_argument("--tiny", action="store_true", help="one small batch per model (a smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, docs = [], []
    for name in args.models.split(","):
        for precision in ("fp32", "bf16"):
            for ckpt in ("none", "full"):
                for batch in (TINY if args.tiny else BATCHES)[name]:
                    start = time.perf_counter()
                    pred = predict(name, batch, precision, ckpt)
                    meas = measure(name, batch, precision, ckpt)
                    err = pred / meas - 1 if meas else None
                    docs.append({"model": name, "batch": batch, "precision": precision, "checkpointing": ckpt,
                                 "predicted": pred, "measured": meas, "error": err,
                                 "seconds": time.perf_counter() - start})
                    rows.append([name, batch, precision, ckpt, f"{pred / 2**20:.2f}", f"{meas / 2**20:.2f}",
                                 f"{100 * err:+.1f}%" if err is not None else "-",
                                 "ok" if err is not None and abs(err) <= TOLERANCE else "MISS"])
    print_table("predicted vs measured training-step peak (MiB), CPU", ["model", "batch", "precision",
                "checkpointing", "predicted", "measured", "error", f"within {TOLERANCE:.0%}"], rows)
    misses = [d for d in docs if d["error"] is None or abs(d["error"]) > TOLERANCE]
    print(f"\n{len(docs) - len(misses)}/{len(docs)} rows within {TOLERANCE:.0%}")
    if not args.tiny:
        write_json("plan", {"rows": docs, "tolerance": TOLERANCE})


if __name__ == "__main__":
    main()
