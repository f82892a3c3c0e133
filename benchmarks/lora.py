"""LoRA against full fine-tuning: the measured peak memory of one training step (issue 16).

Each model trains one AdamW step (dlkit's parameter groups, weight decay 0.01, fp32) twice on the
same batch: every parameter trainable (full fine-tuning), and LoRA of rank R on the attention
query and value projections through ``dlkit.engine.lora.attach`` (PEFT; the base frozen), as
``dlkit train ARTIFACT --lora-rank R`` does. One warm-up step first, so the optimizer state exists
and the last step's gradients exist, as in every later step of dlkit's loop (forward, then
``zero_grad(set_to_none=True)``, backward, step); then the measured step under PyTorch's profiler
(``dlkit.profiling.memory.measure_peak``: every allocation and free, the tensors alive before the
step included). The trainable parameters are checked against a hand count, r * (in + out) per
adapted Linear. ``saved`` is what LoRA must save at least: the gradients and the two AdamW moments
of the parameters it freezes, (full trainable - LoRA trainable) x 4 bytes x 3. Target: full peak -
LoRA peak >= saved in every row (LoRA also keeps fewer activations: a frozen Linear's input is not
needed for a weight gradient).

Where the target can fall short: the two runs peak at different moments of the step, and where
both peaks are dominated by what LoRA leaves as it is (GPT-2's 50,257-word logits and their
gradient at a small batch), the difference is the frozen parameters' gradient and AdamW bytes
less what LoRA adds at its own peak (its adapters' state, the adapted layers' temporaries). Seen
on a loaded 2-core machine: gpt2 at 2 x 256, 1,382.0 MiB against 1,420.7 MiB (97%); gpt-mini at
12 x 64, 14.0 MiB against 9.0 MiB. The table says so per row.

    python benchmarks/lora.py [--quick] [--rank 8] [--models gpt-mini,gpt2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402

# (model, batch, sequence length)
FULL = [("gpt-mini", 12, 64), ("gpt-mini", 48, 64), ("gpt2", 2, 256), ("gpt2", 4, 256)]
QUICK = [("gpt-mini", 12, 64)]


def build(name: str, batch: int, seq_len: int):
    import torch

    from dlkit.profiling.target import resolve_target

    tgt, _ = resolve_target(name, seq_len=seq_len)
    torch.manual_seed(0)
    return tgt.build("cpu").train(), tgt.example(batch, "cpu")


def hand_count(model, targets: list[str], rank: int) -> int:
    total = 0
    for path in targets:
        w = model.get_submodule(path).weight
        total += rank * (w.shape[0] + w.shape[1])
    return total


def measure(model, x) -> tuple[int, float]:
    """(peak bytes of the measured step, its seconds) after one warm-up step."""
    import torch

    from dlkit.engine.optim import make_optimizer, param_groups
    from dlkit.plan.trace import training_loss
    from dlkit.profiling.memory import measure_peak

    opt = make_optimizer("adamw", param_groups(model, 0.01), lr=1e-4, weight_decay=0.01)

    def step():  # in dlkit.engine.trainer's order: the last step's gradients live through the forward
        loss = training_loss(model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    step()
    seconds = time.perf_counter() - t
    return measure_peak(step, torch.device("cpu")), seconds


def run(name: str, batch: int, seq_len: int, rank: int) -> dict:
    from dlkit.engine.lora import attach

    model, x = build(name, batch, seq_len)
    params = sum(p.numel() for p in model.parameters())
    full_peak, full_s = measure(model, x)
    del model
    model, x = build(name, batch, seq_len)
    t = attach(model, rank, 0, "")
    lora_peak, lora_s = measure(model, x)
    hand = hand_count(model, [f"{p}.base_layer" for p in t["targets"]], rank)
    saved = (params - t["trainable_params"]) * 4 * 3
    return {"model": name, "batch": batch, "seq_len": seq_len, "rank": rank, "params": params,
            "lora_trainable": t["trainable_params"], "hand_count": hand, "adapted_layers": len(t["targets"]),
            "full_peak": full_peak, "lora_peak": lora_peak, "difference": full_peak - lora_peak,
            "grads_and_adamw_saved": saved, "ok": full_peak - lora_peak >= saved and hand == t["trainable_params"],
            "full_step_seconds": full_s, "lora_step_seconds": lora_s}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated: gpt-mini, gpt2 (default: both)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="gpt-mini only (a smoke run, no JSON)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = QUICK if args.quick else FULL
    if args.models:
        rows = [r for r in rows if r[0] in args.models.split(",")]
    docs = [run(*r, args.rank) for r in rows]
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    print_table(f"one AdamW training step, fp32, CPU: full fine-tuning against LoRA rank {args.rank} on q, v "
                "(peak MiB, measured)",
                ["model", "batch x seq", "params", "LoRA trainable (hand)", "full peak", "LoRA peak", "difference",
                 "grads+AdamW saved", "difference >= saved"],
                [[d["model"], f"{d['batch']} x {d['seq_len']}", f"{d['params']:,}",
                  f"{d['lora_trainable']:,} ({d['hand_count']:,})", mib(d["full_peak"]), mib(d["lora_peak"]),
                  mib(d["difference"]), mib(d["grads_and_adamw_saved"]), "yes" if d["ok"] else "NO"] for d in docs])
    print(f"\n{sum(d['ok'] for d in docs)}/{len(docs)} rows: LoRA's peak is below full fine-tuning's by at least "
          "the gradient and AdamW bytes of the frozen parameters")
    if not args.quick:
        write_json("lora", {"rows": docs, "precision": "fp32", "optimizer": "adamw", "rank": args.rank})


if __name__ == "__main__":
    main()
