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
STARTUP_SHARE = 0.2  # of the kills land while the process starts; the rest while it trains and writes


def command(out: Path, args, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "dlkit", "train", args.model, "--dataset", args.dataset, "--epochs",
           str(args.epochs), "--seed", "0", "--device", "cpu", "--quiet", "--out", str(out)]
    return cmd + (["--resume"] if resume else [])


def run_once(out: Path, args, rng: random.Random, startup: float, window: float) -> dict:
    attempts, signals, late, manual, log = 0, [], 0, 0, []
    while attempts < args.max_attempts and not out.is_dir():  # a kill after the final rename: done
        attempts += 1
        resume = os.path.lexists(str(out) + ".partial")
        started = time.monotonic()
        proc = subprocess.Popen(command(out, args, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if rng.random() < STARTUP_SHARE:  # while Python and torch load, data and model are built
            at = started + rng.uniform(0.0, startup)
        else:  # while it trains, checkpoints, evaluates and writes the artifact
            _wait_for(Path(str(out) + ".partial"), proc, started + 2 * startup + 5)
            at = time.monotonic() + rng.uniform(0.0, window)
        try:
            proc.wait(timeout=max(0.0, at - time.monotonic()))
        except subprocess.TimeoutExpired:
            name = rng.choice(list(SIGNALS))
            proc.send_signal(SIGNALS[name])
            _, err = proc.communicate()
            if proc.returncode == 0:  # it finished before the signal could act
                late += 1
                break
            signals.append(name)
            log.append(f"{name}: rc {proc.returncode}: {_last_line(err, out)}")
            continue
        _, err = proc.communicate()
        if proc.returncode == 0:
            break
        manual += 1  # not killed, and still failed: the user would have to step in
        log.append(f"unkilled rc {proc.returncode}: {_last_line(err, out)}")
        shutil.rmtree(str(out) + ".partial", ignore_errors=True)  # the manual step
    return {"attempts": attempts, "signals": signals, "late_signals": late, "manual_steps": manual,
            "finished": out.is_dir(), "log": log}


def _last_line(err: str, out: Path) -> str:
    """The error's last line, without the temporary folder's path."""
    lines = err.strip().splitlines()
    return lines[-1].replace(str(out.parent) + os.sep, "") if lines else ""


def _wait_for(path: Path, proc: subprocess.Popen, deadline: float) -> None:
    while not os.path.lexists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--model", default="cnn")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-attempts", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="dlkit-faults-"))
    try:
        started = time.monotonic()
        ref = subprocess.Popen(command(root / "reference", args, False), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        _wait_for(root / "reference.partial", ref, started + 120)
        startup = time.monotonic() - started
        if ref.wait() != 0:
            raise SystemExit(f"the uninterrupted run failed: {ref.stderr.read().decode()}")
        window = 1.1 * (time.monotonic() - started - startup)
        rows, same, manual, finished = [], 0, 0, 0
        for i in range(args.runs):
            out = root / f"run-{i}"
            r = run_once(out, args, rng, startup, window)
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
               "late_signals": sum(r["late_signals"] for r in rows),
               "attempts_median": sorted(r["attempts"] for r in rows)[len(rows) // 2],
               "startup_s": round(startup, 2), "kill_window_after_startup_s": round(window, 2)}
    print_table(f"dlkit train {args.model} --dataset {args.dataset} --epochs {args.epochs}, killed at random "
                f"({STARTUP_SHARE:.0%} during the {startup:.1f} s start-up, else within {window:.1f} s of it) "
                "and resumed until done",
                ["runs", "finished", "identical", "needed a manual step", "SIGINT", "SIGTERM", "SIGKILL",
                 "median attempts"],
                [[args.runs, finished, same, manual, kills["SIGINT"], kills["SIGTERM"], kills["SIGKILL"],
                  summary["attempts_median"]]])
    write_json("faults", {"command": f"dlkit train {args.model} --dataset {args.dataset} --epochs {args.epochs}",
                          "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
