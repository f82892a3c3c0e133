"""FSDP2 (--strategy fsdp) on CPU (gloo) through the real launcher: 2 workers on digits.

Three launches (they cost most of this file's time): a DDP run, an FSDP run stopped after step 30
(rank 0 sent SIGTERM by the test hook DLKIT_TEST_STOP_STEP, as from outside), and its --resume.
Both strategies are the same optimisation of the same global batches, so the resumed FSDP run
must reach DDP's losses and weights (measured: equal within 1e-7 relative for this mlp, to the
last bit without clipping; tolerance 1e-6 on losses, 1e-5 on weights). Everything else is checked
on their outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dlkit import artifacts

# --grad-clip: the norm of FSDP's sharded (DTensor) gradients is the norm over all ranks.
ARGS = ["mlp", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--optimizer", "adam", "--lr", "3e-3",
        "--grad-clip", "0.5", "--seed", "1", "--nproc", "2"]
STOP = 30  # of 63 steps: in the middle of epoch 2


def _train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlkit", "train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    ddp = _train(*ARGS, "--out", str(root / "ddp"), "--json")
    assert ddp.returncode == 0, ddp.stderr
    out = root / "fsdp"
    stopped = _train(*ARGS, "--strategy", "fsdp", "--out", str(out), env={"DLKIT_TEST_STOP_STEP": str(STOP)})
    checkpoint = json.loads((artifacts.work_folder(out) / "checkpoint.json").read_text())
    resumed = _train(*ARGS, "--strategy", "fsdp", "--out", str(out), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    return {"ddp": (root / "ddp", json.loads(ddp.stdout)), "fsdp": (out, json.loads(resumed.stdout)),
            "stopped": stopped, "checkpoint": checkpoint}


def test_a_stopped_run_checkpoints_and_resumes_to_ddps_result(runs):
    stopped = runs["stopped"]
    assert stopped.returncode != 0 and stopped.stdout == ""
    errors = [line for line in stopped.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"step {STOP}" in errors[0] and "--resume" in errors[0], stopped.stderr
    assert runs["checkpoint"]["state"]["step"] == STOP and runs["checkpoint"]["optimizer"] is not None

    (ddp_out, ddp), (out, fsdp) = runs["ddp"], runs["fsdp"]
    losses = [h["train_loss"] for h in fsdp["history"]]
    assert losses[-1] < 0.5 * losses[0]  # it learns
    for key in ("train_loss", "val_loss"):
        assert [h[key] for h in fsdp["history"]] == pytest.approx([h[key] for h in ddp["history"]], rel=1e-6)
    assert fsdp["test"]["accuracy"] > 0.9 and abs(fsdp["test"]["accuracy"] - ddp["test"]["accuracy"]) <= 0.003
    a = artifacts.load_model(artifacts.read_artifact(ddp_out)).state_dict()
    b = artifacts.load_model(artifacts.read_artifact(out)).state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_each_rank_holds_half_of_the_parameters_gradients_and_optimizer_state(runs):
    out, doc = runs["fsdp"]
    dist = doc["distributed"]
    assert dist["strategy"] == "fsdp" and dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert runs["ddp"][1]["distributed"]["strategy"] == "ddp"
    model = artifacts.load_model(artifacts.read_artifact(out))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    ranks = dist["bytes_per_rank"]  # measured in each worker: the local shards' bytes
    assert len(ranks) == 2 and sum(r["parameters"] for r in ranks) == total
    for r in ranks:
        assert 0.45 * total <= r["parameters"] <= 0.55 * total
        assert r["gradients"] == r["parameters"]
        assert r["optimizer_state"] == 2 * r["parameters"]  # Adam: two moments per element, sharded alike
    manifest = artifacts.read_artifact(out).manifest
    assert manifest["lineage"][-1]["options"]["distributed"]["strategy"] == "fsdp"


def test_the_artifact_is_plain_and_evaluates_as_reported_in_one_process(runs):
    from torch.distributed.tensor import DTensor

    from dlkit.api import EvaluateOptions, evaluate_artifact

    (ddp_out, _), (out, doc) = runs["ddp"], runs["fsdp"]
    assert not torch.distributed.is_initialized()
    art = artifacts.read_artifact(out)
    model = artifacts.load_model(art)
    assert type(model).__name__ == "MLP" and not any(isinstance(p, DTensor) for p in model.parameters())
    again = evaluate_artifact(out, EvaluateOptions(device="cpu"))
    assert again.result.accuracy == pytest.approx(doc["test"]["accuracy"])
    assert again.result.loss == pytest.approx(doc["test"]["loss"], rel=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ddp_out.iterdir())
    assert art.manifest.keys() == artifacts.read_artifact(ddp_out).manifest.keys()
    assert not artifacts.work_folder(out).exists()


def test_fsdp_in_one_process_is_one_clear_line(tmp_path):
    from dlkit.cli import app

    res = CliRunner().invoke(app, ["train", "mlp", "--dataset", "digits", "--strategy", "fsdp",
                                   "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--strategy fsdp" in lines[0] and "--nproc 2" in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_units_are_the_blocks_and_tied_weights_stay_with_the_root():
    from dlkit.data import load_dataset
    from dlkit.engine.fsdp import units_of
    from dlkit.models import create_model
    from dlkit.spec import LM, DataSpec

    spec = DataSpec(modality="text", input_shape=(16,), num_classes=50, vocab_size=50, task=LM)
    gpt, _ = create_model("gpt-mini", spec, {"depth": "2"})
    assert gpt.head.weight is gpt.wte.weight  # tied: neither the head nor the embedding is a unit
    assert units_of(gpt) == ["blocks.0", "blocks.1"]
    digits = load_dataset("digits").spec
    mlp, _ = create_model("mlp", digits, {})
    units = units_of(mlp)  # no blocks: each top-level child that holds parameters
    assert units and all(any(True for _ in mlp.get_submodule(u).parameters()) for u in units)
    assert {id(p) for u in units for p in mlp.get_submodule(u).parameters()} == {id(p) for p in mlp.parameters()}


def test_models_fsdp_cannot_take_are_refused_in_one_line():
    from dlkit.engine.fsdp import check_shardable
    from dlkit.errors import IncompatibleError

    with pytest.raises(IncompatibleError, match="no parameters"):
        check_shardable(nn.ReLU(), 2)
    scaled = nn.Linear(4, 2)
    scaled.scale = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(IncompatibleError, match="scalar parameters \\(scale\\)"):
        check_shardable(scaled, 2)
