"""CPU-kind defaults: bf16 chosen only where native and measured harmless, the cnn preset's
VGG-style stages, and latency measurements that say when the machine was busy."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from dlkit import device as dev
from dlkit.profiling import Subject, measure
from dlkit.profiling.measure import busy_note, measure_models


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif(not _cpu_flags(), reason="no /proc/cpuinfo flags here")
def test_native_bf16_follows_the_instruction_sets(monkeypatch):
    """AVX512 alone is not native bf16 (oneDNN emulates it there): AVX512-BF16 or AMX is."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    flags = _cpu_flags()
    assert dev.native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 on any CPU: dlkit must not pick bf16 there."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap in ("AVX2", "avx512_core_vnni", " AVX512_CORE "):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert dev.native_bf16(cpu) is False
        assert dev.default_precision("cnn", cpu)[0] == "fp32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # the old name of the same setting
    assert dev.native_bf16(cpu) is False
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "ALL")  # no cap: the instruction sets decide
    flags = _cpu_flags()
    if flags:
        assert dev.native_bf16(cpu) == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_default_precision_is_bf16_only_where_native_and_measured(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "native_bf16", lambda d: True)
    precision, why = dev.default_precision("cnn", cpu)
    assert precision == "bf16" and "native" in why and "--precision fp32" in why
    assert dev.default_precision("lstm", cpu)[0] == "fp32"  # never measured: fp32
    assert dev.default_precision("cnn", torch.device("cuda"))[0] == "fp32"
    monkeypatch.setattr(dev, "native_bf16", lambda d: False)  # an AVX2-only CPU
    precision, why = dev.default_precision("cnn", cpu)
    assert precision == "fp32" and "no native bf16" in why


def test_busy_note_when_the_load_exceeds_the_cores():
    assert busy_note(1.5, 2) is None and busy_note(None, 2) is None
    note = busy_note(6.4, 2)
    assert "load average 6.4 on 2 cores" in note and "inflated" in note


def test_measurement_reports_the_load_next_to_the_latencies(monkeypatch, caplog):
    lin = nn.Linear(8, 4)
    monkeypatch.setattr(measure, "load_average", lambda: 0.0)
    (quiet,) = measure_models([Subject(lin, torch.randn(4, 8))], batches=(2,), repeats=2)
    assert quiet.busy is None and quiet.load_average == 0.0 and quiet.cores >= 1
    monkeypatch.setattr(measure, "load_average", lambda: 99.0)
    with caplog.at_level(logging.INFO, logger="dlkit"):
        (busy,) = measure_models([Subject(lin, torch.randn(4, 8))], batches=(2,), repeats=2)
    assert busy.busy and "load average 99.0" in busy.busy and busy.to_dict()["busy"] == busy.busy
    assert any("busy machine" in r.getMessage() for r in caplog.records)
    assert busy.latency_ms[2] > 0


def test_measurement_alternates_the_subjects(monkeypatch):
    """Every round runs each call once, never a a b b; every other round goes the other way round
    the cycle, so with three calls each one runs after each of the others, never after itself."""
    order = []
    measure.time_round_robin([lambda: order.append("a"), lambda: order.append("b")], repeats=3)
    assert order[2 * measure.WARMUP:] == ["a", "b"] * 3
    order.clear()
    measure.time_round_robin([lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")],
                             repeats=4)
    timed = order[3 * measure.WARMUP:]
    assert timed == ["a", "b", "c", "a", "c", "b"] * 2
    pairs = [(timed[i - 1], timed[i]) for i in range(1, len(timed))]
    assert all(x != y for x, y in pairs)
    assert {y: {x for x, z in pairs if z == y} for y in "abc"} == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}


def test_cnn_vgg_stages_and_static_int8_fusion():
    from dlkit.compress.quantize import fusion_groups
    from dlkit.models import create_model
    from dlkit.spec import DataSpec

    spec = DataSpec(modality="image", input_shape=(1, 12, 12), num_classes=3)
    model, cfg = create_model("cnn", spec, {"channels": "4,8", "convs": "2", "hidden": "16"})
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 4), (4, 8), (8, 8)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 2
    # 12 -> pool 6 -> pool 3: the dense layer reads 8 * 3 * 3 features
    assert model.classifier[0].in_features == 72 and model(torch.randn(2, 1, 12, 12)).shape == (2, 3)
    assert len(fusion_groups(model)) == 4 + 1  # every conv-bn-relu, and the dense linear-relu
    assert model.width_overrides() == {"channels": (4, 8), "hidden": (16,)}
    for bad in ("0", "1,2,2", "2,0"):  # zero, or a count per stage for a different number of stages
        with pytest.raises(Exception, match="convs must be one number >= 1 or one per stage"):
            create_model("cnn", spec, {"channels": "4,8", "convs": bad})


def test_cnn_convs_per_stage():
    """convs=1,2: one conv at full resolution, two after the first pool; pruning's width readout
    follows the per-stage counts."""
    from dlkit.config import from_dict, to_dict
    from dlkit.models import create_model
    from dlkit.models.cnn import CNNConfig
    from dlkit.spec import DataSpec

    spec = DataSpec(modality="image", input_shape=(1, 12, 12), num_classes=3)
    model, cfg = create_model("cnn", spec, {"channels": "4,8", "convs": "1,2", "hidden": "16"})
    kinds = ["C" if isinstance(m, nn.Conv2d) else "P" if isinstance(m, nn.MaxPool2d) else "" for m in model.features]
    assert "".join(kinds) == "CPCCP"
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8), (8, 8)]
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 3)
    assert model.width_overrides() == {"channels": (4, 8), "hidden": (16,)}
    assert cfg.convs == (1, 2) and from_dict(CNNConfig, to_dict(cfg)) == cfg
    assert from_dict(CNNConfig, {**to_dict(cfg), "convs": 2}).convs == (2,)  # an artifact written before: one int


def test_cnn_vgg_preset_learns_digits():
    """Two convs per stage train: the loss falls on digits within two epochs."""
    from dlkit.data import load_dataset
    from dlkit.engine.trainer import TrainConfig, fit
    from dlkit.models import create_model

    data = load_dataset("digits")
    torch.manual_seed(0)
    model, _ = create_model("cnn", data.spec, {"channels": "8,16", "convs": "2", "hidden": "32"})
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer="adamw", lr=3e-3, schedule="onecycle")
    state, _ = fit(model, data.train, data.val, cfg, device=torch.device("cpu"), seed=0)
    h = state.history
    assert h[-1]["train_loss"] < h[0]["train_loss"] and h[-1]["val_accuracy"] > 0.8


def test_cnn_dropout_draws_a_uniform_mask_and_is_identity_in_eval():
    from dlkit.models.cnn import Dropout

    drop = Dropout(0.25)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = y > 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # the keep rate
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))  # survivors scaled by 1/(1-p)
    y.sum().backward()
    assert torch.equal(x.grad > 0, kept)  # the gradient flows through the kept units only
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global generator: reproducible (and checkpointed by the engine)
    assert drop.eval()(x) is x
    y16 = drop.train()(torch.ones(8, 8, dtype=torch.bfloat16))
    assert y16.dtype == torch.bfloat16
