"""The training engine on real (tiny) computations: loss falls, resume is exact, schedules behave."""

from __future__ import annotations

import math

import pytest
import torch

from dlkit.data import load_dataset
from dlkit.engine.optim import lr_factor
from dlkit.engine.trainer import Observer, TrainConfig, fit
from dlkit.errors import TrainingError, UsageError
from dlkit.models import create_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _model(name, data, seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model(name, data.spec, overrides)[0]


def test_loss_falls_and_accuracy_rises(digits):
    model = _model("mlp", digits)
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=2e-3)
    state, _ = fit(model, digits.train, digits.val, cfg, device=torch.device("cpu"), seed=0)
    losses = [r["train_loss"] for r in state.history]
    assert state.completed and len(losses) == 3
    assert losses[-1] < 0.5 * losses[0]
    assert state.history[-1]["val_accuracy"] > 0.85


def test_interrupted_then_resumed_run_equals_uninterrupted(digits, tmp_path):
    from dlkit.engine.checkpoint import load_checkpoint, save_checkpoint

    cfg = TrainConfig(epochs=2, batch_size=100, optimizer="adamw", lr=3e-3, schedule="cosine", warmup=0.1,
                      weight_decay=0.01)
    cpu = torch.device("cpu")
    ref = _model("cnn", digits, dropout="0.3")
    ref_state, _ = fit(ref, digits.train, digits.val, cfg, device=cpu, seed=3)

    model = _model("cnn", digits, dropout="0.3")
    calls = {"n": 0}

    def stop_after_20():
        calls["n"] += 1
        return calls["n"] >= 20

    state, opt = fit(model, digits.train, digits.val, cfg, device=cpu, seed=3, should_stop=stop_after_20)
    assert not state.completed and state.epoch == 1 and 0 < state.batch < 13  # mid-way through epoch 2
    save_checkpoint(tmp_path, model, opt, state, {})
    torch.manual_seed(12345)  # a fresh process would have another RNG state: the checkpoint must restore it

    resumed = _model("cnn", digits, seed=99, dropout="0.3")
    st, opt_state, _ = load_checkpoint(tmp_path, resumed)
    final, _ = fit(resumed, digits.train, digits.val, cfg, device=cpu, seed=3, state=st, optimizer_state=opt_state)
    assert final.completed
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert final.history == [
        {**r, "samples_per_s": final.history[i]["samples_per_s"], "epoch_seconds": final.history[i]["epoch_seconds"]}
        for i, r in enumerate(ref_state.history)
    ]


def test_nan_loss_stops_with_clear_error(digits):
    model = _model("mlp", digits)
    cfg = TrainConfig(epochs=1, batch_size=64, optimizer="sgd", lr=1e30)
    with pytest.raises(TrainingError, match="loss became"):
        fit(model, digits.train, digits.val, cfg, device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("name", ["cnn", "lstm"])  # lstm: oneDNN has no bf16 LSTM on AVX2 CPUs
def test_bf16_trains(digits, name):
    model = _model(name, digits)
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer="adam", lr=2e-3, precision="bf16")
    state, _ = fit(model, digits.train, digits.val, cfg, device=torch.device("cpu"), seed=0)
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert state.history[-1]["val_accuracy"] > 0.8


def test_observer_sees_every_epoch(digits):
    seen = []

    class Spy(Observer):
        def on_epoch(self, record):
            seen.append(record["epoch"])

    fit(_model("mlp", digits), digits.train, digits.val, TrainConfig(epochs=2, batch_size=256), device=torch.device("cpu"),
        seed=0, observer=Spy())
    assert seen == [1, 2]


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine", "onecycle"])
def test_schedules_shape(schedule):
    total = 100
    f = [lr_factor(schedule, s, total, warmup=0.1) for s in range(total)]
    assert max(f) == pytest.approx(1.0)
    assert f[0] < 0.2  # warm-up starts low
    assert all(v > 0 for v in f)
    if schedule == "constant":
        assert f[-1] == 1.0
    elif schedule == "step":
        assert f[-1] == pytest.approx(0.01)
    else:
        assert f[-1] < 0.01


def test_bad_train_config_names_every_problem():
    with pytest.raises(UsageError) as exc:
        TrainConfig(epochs=0, lr=-1.0, optimizer="lbfgs").validate()
    msg = str(exc.value)
    assert "--epochs" in msg and "--lr" in msg and "lbfgs" in msg
    assert not math.isnan(lr_factor("cosine", 5, 10))


def test_train_request_validates_without_loading():
    from dlkit.api import TrainRequest
    from dlkit.errors import NotFoundError

    ok = TrainRequest(model="mlp", dataset="digits", options={"epochs": 2})
    assert ok.validate() is ok and ok.train_config().epochs == 2
    with pytest.raises(NotFoundError, match="unknown dataset 'digitz'"):
        TrainRequest(model="mlp", dataset="digitz").validate()
    with pytest.raises(UsageError, match="val_fraction"):
        TrainRequest(model="mlp", dataset="digits", val_fraction=1.0).validate()
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        TrainRequest(model="mlp", dataset="digits", device="tpu").validate()
    with pytest.raises(UsageError, match="--lr"):
        TrainRequest(model="mlp", dataset="digits", options={"lr": -1.0}).validate()
