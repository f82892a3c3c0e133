"""Distributed data parallel on CPU (gloo) through the real elastic launcher: 2 workers on digits.

The launcher starts fresh Python processes (torch import, rendezvous), so the two launches here
cost most of this file's time; everything else is checked on their outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlkit.engine.distributed import DistContext, choose_threads, worker_failure

# No dropout, no augmentation: the 2-worker run follows the same global batches as one process.
ARGS = ["mlp", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--optimizer", "adam", "--lr", "3e-3",
        "--seed", "1"]


def _train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlkit", "train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _train(*ARGS, "--nproc", "2", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout), proc.stderr


def test_two_workers_finish_in_sync(two_workers):
    out, doc, stderr = two_workers
    ddp = doc["distributed"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert ddp["global_batch"] == 64 and ddp["batch_per_worker"] == 32 and ddp["lr_scale"] == 1.0
    assert ddp["threads"] >= 1 and "threads per worker" in stderr
    digests = ddp["parameter_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # Only rank 0 reports: one line per epoch, one artifact, history of every epoch.
    assert sum(line.startswith("epoch 3/3 ") for line in stderr.splitlines()) == 1
    assert len(doc["history"]) == 3 and doc["history"][-1]["train_loss"] < doc["history"][0]["train_loss"]
    assert [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not Path(str(out) + ".partial").exists()


def test_artifact_loads_without_distributed_and_matches_one_process(two_workers, tmp_path):
    from dlkit import artifacts
    from dlkit.api import EvaluateOptions, TrainRequest, evaluate_artifact, train_model

    out, doc, _ = two_workers
    assert not torch.distributed.is_initialized()
    art = artifacts.read_artifact(out)
    model = artifacts.load_model(art)
    assert not any(k.startswith("module.") for k in model.state_dict())  # DDP's wrapper was not saved
    again = evaluate_artifact(out, EvaluateOptions(device="cpu"))
    assert again.result.accuracy == pytest.approx(doc["test"]["accuracy"])

    # One process, same seed, same global batch and lr: the same global batches in the same order.
    options = dict(epochs=3, batch_size=64, optimizer="adam", lr=3e-3)
    one = train_model(TrainRequest(model="mlp", dataset="digits", options=options, seed=1, device="cpu",
                                   out=tmp_path / "one"))
    assert abs(one.test.accuracy - doc["test"]["accuracy"]) <= 0.01
    assert one.test.accuracy > 0.9
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in out.iterdir())
    assert art.manifest.keys() == artifacts.read_artifact(tmp_path / "one").manifest.keys()


def test_killed_worker_fails_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = _train(*ARGS, "--nproc", "2", "--out", str(out), env={"DLKIT_TEST_FAIL_RANK": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "worker rank 1 of 2 failed: killed by SIGKILL" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def _ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, backend="gloo",
                       threads=1, threads_reason="test")


@pytest.mark.parametrize("n,batch,world", [(1000, 64, 2), (1000, 64, 3), (97, 10, 4), (9, 4, 3)])
def test_shards_are_disjoint_and_cover_the_epoch(n, batch, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    seen = []
    for b in range(0, n, batch):
        parts = [_ctx(r, world).shard(perm[b : b + batch]) for r in range(world)]
        real = [p for p, w in parts if w > 0]
        assert sum(len(p) for p in real) == len(perm[b : b + batch])
        assert max(len(p) for p in real) - min(len(p) for p in real) <= 1
        seen += [int(i) for p in real for i in p]
    assert sorted(seen) == list(range(n))  # every sample once per epoch: nothing dropped, nothing doubled


def test_threads_per_worker(monkeypatch):
    monkeypatch.delenv("DLKIT_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets: replaced
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(2)[0] == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's: kept
    assert choose_threads(2) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("DLKIT_NUM_THREADS", "1")
    assert choose_threads(2) == (1, "DLKIT_NUM_THREADS")


def test_worker_failure_names_the_root_cause():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank, exitcode, ts):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="<N/A>")
        f.timestamp = ts
        return f

    # rank 0 was terminated by the launcher after rank 1 crashed: rank 1 is the one to name
    err = worker_failure({0: failure(0, -15, 10), 1: failure(1, -9, 10)}, 2)
    assert str(err).startswith("worker rank 1 of 2 failed: killed by SIGKILL")
