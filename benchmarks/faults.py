"""Kill `dlkit train` at random moments and resume it until it finishes; compare the result with
an uninterrupted run.

Each of N runs (default 50) starts `dlkit train` (the real command, in a subprocess), sends it
SIGINT, SIGTERM or SIGKILL at a random moment, then does what the error told a user to do: the
same command with --resume while OUT.partial exists, else without. It repeats until a command
exits 0. The final weights are compared with an uninterrupted run's, tensor by tensor.

Counted per run: attempts, the signals sent, whether the artifact is identical to the reference,
and whether a manual step was needed (an attempt that failed in a way the rule above cannot
continue from: any non-zero exit of an attempt that was not killed, or a --resume refused).

    python benchmarks/faults.py --runs 50
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, write_json  # noqa: E402

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


def command(out: Path, args, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dlkit", "train", args.model, "--dataset", args.dataset, "--epochs",
           str(args.epochs), "--seed", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    return cmd + (["--resume"] if resume else [])


def run_once(out: Path, args, rng: random.Random, window: float) -> dict:
    attempts, signals, manual, log = 0, [], 0, []
    while attempts < args.max_attempts and not out.is_dir():  # a kill after the final rename: done
        attempts += 1
        resume = os.path.lexists(str(out) + ".partial")
        proc = subprocess.Popen(command(out, args, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        delay = rng.uniform(0.0, window)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            name = rng.choice(list(SIGNALS))
            proc.send_signal(SIGNALS[name])
            signals.append(name)
            _, err = proc.communicate()
            if proc.returncode == 0:  # it finished before the signal arrived
                break
            log.append(f"{name}: rc {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
            continue
        _, err = proc.communicate()
        if proc.returncode == 0:
            break
        manual += 1  # not killed, and still failed: the user would have to step in
        log.append(f"unkilled rc {proc.returncode}: {err.strip()}")
        shutil.rmtree(str(out) + ".partial", ignore_errors=True)  # the manual step
    return {"attempts": attempts, "signals": signals, "manual_steps": manual, "finished": out.is_dir(),
            "log": log}


def identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-attempts", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="dlkit-faults-"))
    try:
        started = time.perf_counter()
        subprocess.run(command(root / "reference", args, False), check=True, capture_output=True)
        window = 1.2 * (time.perf_counter() - started)  # kill anywhere in a whole run, start-up included
        rows, same, manual, finished = [], 0, 0, 0
        for i in range(args.runs):
            out = root / f"run-{i}"
            r = run_once(out, args, rng, window)
            r["identical"] = r["finished"] and identical(out, root / "reference")
            same += r["identical"]
            manual += r["manual_steps"] > 0
            finished += r["finished"]
            rows.append(r)
            print(f"run {i + 1}/{args.runs}: {r['attempts']} attempts, signals {','.join(r['signals']) or '-'}, "
                  f"identical {r['identical']}, manual steps {r['manual_steps']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    kills = {name: sum(r["signals"].count(name) for r in rows) for name in SIGNALS}
    summary = {"runs": args.runs, "finished": finished, "identical_to_uninterrupted": same,
               "runs_needing_a_manual_step": manual, "kills": kills,
               "attempts_median": sorted(r["attempts"] for r in rows)[len(rows) // 2],
               "kill_window_s": round(window, 2)}
    print_table(f"dlkit train {args.model} --dataset {args.dataset} --epochs {args.epochs}, killed at random "
                f"(within {window:.1f} s) and resumed until done",
                ["runs", "finished", "identical", "needed a manual step", "SIGINT", "SIGTERM", "SIGKILL",
                 "median attempts"],
                [[args.runs, finished, same, manual, kills["SIGINT"], kills["SIGTERM"], kills["SIGKILL"],
                  summary["attempts_median"]]])
    write_json("faults", {"command": f"dlkit train {args.model} --dataset {args.dataset} --epochs {args.epochs}",
                          "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
