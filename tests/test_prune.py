"""dlkit prune: real tiny models pruned for real; shapes, costs, reloads and errors."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.api import EvaluateOptions, TrainRequest, evaluate_artifact, train_model
from dlkit.cli import app
from dlkit.compress.prune import PruneOptions, prune_artifact
from dlkit.compress.search import count_macs
from dlkit.compress.structured import list_units, prune_structured
from dlkit.compress.rnn_prune import keep_top, prune_hidden, unit_importance
from dlkit.config import to_dict
from dlkit.errors import UsageError
from dlkit.models import build_model, create_model
from dlkit.spec import STANDARD_SPECS

DIGITS = STANDARD_SPECS["digits"]
CIFAR = STANDARD_SPECS["cifar10"]
FAST = dict(latency_repeats=2)
runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "cnn"
    train_model(TrainRequest(model="cnn", dataset="digits", options={"epochs": 1}, out=out, device="cpu"))
    return out


def rebuild_same(model: nn.Module, name: str, cfg, spec, x: torch.Tensor) -> nn.Module:
    """Rebuild ``model`` from its config with its width overrides, load its weights strictly, and
    check both compute the same."""
    new_cfg = dataclasses.replace(cfg, **model.width_overrides())
    rebuilt = build_model(name, to_dict(new_cfg), spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=1e-5, rtol=1e-4)
    return rebuilt


FAMILIES = [
    ("mlp", DIGITS, {}),
    ("cnn", DIGITS, {}),
    ("resnet20", DIGITS, {}),
    ("vgg11", CIFAR, {"channels": "8,8,16,16,16,16,16,16", "classifier": "32"}),
    ("transformer", DIGITS, {}),
    ("lstm", DIGITS, {"layers": "2", "bidirectional": "true", "hidden": "24"}),
    ("gru", DIGITS, {"layers": "2", "bidirectional": "true", "hidden": "24"}),
    ("rnn", DIGITS, {"layers": "2", "hidden": "24"}),
]


@pytest.mark.parametrize("name,spec,overrides", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_structured_pruning_shrinks_every_family_and_rebuilds_from_config(name, spec, overrides):
    torch.manual_seed(0)
    model, cfg = create_model(name, spec, overrides)
    x = torch.randn(3, *spec.input_shape)
    before_params, before_macs = sum(p.numel() for p in model.parameters()), count_macs(model, x[:1])
    head_out = model.head.out_features
    prune_structured(model, x[:2], ratio=0.5)
    out = model.eval()(x)
    assert out.shape == (3, spec.num_classes) and torch.isfinite(out).all()
    assert model.head.out_features == head_out
    assert sum(p.numel() for p in model.parameters()) < 0.7 * before_params
    assert count_macs(model, x[:1]) < 0.7 * before_macs
    rebuild_same(model, name, cfg, spec, x)


def test_transformer_loses_whole_heads_and_half_its_ffn():
    model, cfg = create_model("transformer", DIGITS)
    prune_structured(model, torch.randn(2, *DIGITS.input_shape), ratio=0.5)
    for b in model.blocks:
        assert b.attn.num_heads == 2
        for lin in (b.attn.q, b.attn.k, b.attn.v):
            assert lin.out_features == 2 * 16  # head_dim kept
        assert b.attn.proj.in_features == 32 and b.fc1.out_features == 64
    assert model.width_overrides() == {"dim": 64, "heads": 2, "head_dim": 16, "ffn_dim": 64}


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_pruner_is_exact_when_the_removed_units_are_silent(cell):
    """Units whose own weights are zero output exactly 0 (LSTM: c stays 0; GRU: h = z*h_prev = 0;
    tanh RNN: tanh(0)), so removing them must not change the result at all."""
    torch.manual_seed(0)
    h, gates = 10, {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
    rnn = cell(6, h, num_layers=2, batch_first=True, bidirectional=True)
    head = nn.Linear(2 * h, 5)
    drop = torch.tensor([1, 4, 7])
    keep = torch.tensor([i for i in range(h) if i not in drop])
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            rows = torch.cat([drop + g * h for g in range(gates)])
            p[rows] = 0  # weights and biases feeding the dropped units
    x = torch.randn(4, 7, 6)

    def run_model(r, lin):
        _, state = r(x)
        hn = state[0] if isinstance(state, tuple) else state
        return lin(hn[-2:].transpose(0, 1).reshape(4, -1)), hn

    ref, _ = run_model(rnn, head)
    new_rnn, new_head = prune_hidden(rnn, [[keep, keep], [keep, keep]], head)
    assert new_rnn.hidden_size == 7 and new_rnn.num_layers == 2 and new_rnn.bidirectional
    assert new_rnn.weight_ih_l1.shape == (gates * 7, 14) and new_rnn.weight_hh_l1_reverse.shape == (gates * 7, 7)
    assert new_head.in_features == 14 and new_head.out_features == 5
    out, hn = run_model(new_rnn, new_head)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_rnn_importance_keeps_the_strongest_units_per_layer_and_direction():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(0.01)
        lstm.weight_hh_l0_reverse[[3, 3 + 6, 3 + 12, 3 + 18]] = 5.0  # unit 3 of layer 0, backward
    keep = keep_top(unit_importance(lstm, None, "l2"), 1)
    assert keep[0][1].tolist() == [3]
    new, _ = prune_hidden(lstm, keep)
    assert new.hidden_size == 1
    assert torch.isfinite(new(torch.randn(2, 5, 4))[0]).all()


def test_prune_artifact_measures_both_and_reloads_identically(cnn_artifact, tmp_path):
    out = tmp_path / "pruned"
    res = prune_artifact(cnn_artifact, PruneOptions(ratio=0.5, finetune_epochs=1, out=out, device="cpu", **FAST))
    assert res.artifact == out and out.is_dir()
    b, a = res.before, res.after
    assert a.params < 0.4 * b.params and a.macs < 0.4 * b.macs and a.size_bytes < 0.4 * b.size_bytes
    assert a.latency_b1_ms > 0 and a.latency_b256_ms > 0 and 0 < a.test_accuracy <= 1
    assert res.widths_after == {"channels": [16, 32], "hidden": [64]}
    assert len(res.finetune_history) == 1
    art = artifacts.read_artifact(out)
    assert art.manifest["model"]["config"]["channels"] == [16, 32]
    step = art.manifest["lineage"][-1]
    assert step["step"] == "prune" and step["parent"] == str(cnn_artifact)
    trained_lr = art.manifest["lineage"][0]["options"]["train_config"]["lr"]  # adamw: fine-tunes at the same
    assert step["options"]["finetune_lr_used"] == trained_lr
    assert art.manifest["lineage"][0]["step"] == "train"
    model = artifacts.load_model(art)
    assert model.head.out_features == 10
    # the reloaded artifact gives the accuracy prune measured
    assert evaluate_artifact(out, EvaluateOptions(device="cpu")).result.accuracy == pytest.approx(a.test_accuracy)
    # and it can be pruned again
    again = prune_artifact(out, PruneOptions(target_macs=0.6, out=tmp_path / "again", device="cpu", **FAST))
    assert again.after.macs <= 0.6 * again.before.macs


def test_iterative_taylor_pruning_fine_tunes_between_steps(cnn_artifact, tmp_path):
    res = prune_artifact(cnn_artifact, PruneOptions(ratio=0.5, importance="taylor", iterative_steps=2,
                                                    finetune_epochs=1, out=tmp_path / "it", device="cpu", **FAST))
    assert [r["prune_step"] for r in res.finetune_history] == [1, 2]
    assert res.widths_after["channels"] == [16, 32]


def test_protected_layer_keeps_its_channels(cnn_artifact, tmp_path):
    res = prune_artifact(cnn_artifact, PruneOptions(ratio=0.5, protect=("features.0",), out=tmp_path / "p",
                                                    device="cpu", **FAST))
    assert res.widths_after["channels"] == [32, 32]


def test_target_params_is_reached(cnn_artifact, tmp_path):
    res = prune_artifact(cnn_artifact, PruneOptions(target_params=0.5, out=tmp_path / "t", device="cpu", **FAST))
    assert 0.35 < res.after.params / res.before.params <= 0.5


def test_unstructured_reports_sparsity_and_keeps_shapes(cnn_artifact, tmp_path):
    res = prune_artifact(cnn_artifact, PruneOptions(ratio=0.6, unstructured=True, finetune_epochs=1,
                                                    out=tmp_path / "u", device="cpu", **FAST))
    assert res.sparsity == pytest.approx(0.6, abs=0.01)
    assert res.after.params == res.before.params and res.after.macs == res.before.macs
    assert res.after.zeros > 0.5 * res.after.params
    model = artifacts.load_model(artifacts.read_artifact(tmp_path / "u"))
    assert (model.classifier[0].weight == 0).float().mean() > 0.5  # global magnitude: the big layer
    assert (model.head.weight != 0).all()  # the classifier is not pruned


def test_sensitivity_table_plot_and_per_layer_ratios(cnn_artifact, tmp_path):
    plot = tmp_path / "sens.png"
    res = prune_artifact(cnn_artifact, PruneOptions(sensitivity=True, sensitivity_ratios=(0.25, 0.75),
                                                    plot=plot, sensitivity_samples=300, device="cpu"))
    assert res.artifact is None and plot.read_bytes()[:4] == b"\x89PNG"
    layers = {r["layer"] for r in res.sensitivity}
    assert layers == {"features.0", "features.4", "classifier.0"}
    assert all(0 < r["macs_kept"] < 1 for r in res.sensitivity)
    res = prune_artifact(cnn_artifact, PruneOptions(sensitivity=True, from_sensitivity=True, target_macs=0.6,
                                                    sensitivity_ratios=(0.25, 0.75), sensitivity_samples=300,
                                                    out=tmp_path / "fs", device="cpu", **FAST))
    assert res.unit_ratios and res.after.macs <= 0.6 * res.before.macs
    assert (tmp_path / "fs" / "sensitivity.png").is_file()


def test_list_units_follows_protect():
    model, _ = create_model("cnn", DIGITS)
    x = torch.randn(2, *DIGITS.input_shape)
    assert [u.name for u in list_units(model, x)] == ["features.0", "features.4", "classifier.0"]
    assert [u.name for u in list_units(model, x, [model.features[4]])] == ["features.0", "classifier.0"]


def test_global_is_refused_for_the_transformer():
    model, _ = create_model("transformer", DIGITS)
    with pytest.raises(UsageError, match="--global"):
        prune_structured(model, torch.randn(2, *DIGITS.input_shape), ratio=0.5, global_pruning=True)


# ---- the command line


def test_cli_prints_the_path_then_json(cnn_artifact, tmp_path):
    out = tmp_path / "cli"
    res = run("prune", "-", "--ratio", "0.5", "--out", out, "--device", "cpu", input=f"{cnn_artifact}\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    assert "latency batch 256" in res.stderr and "MACs" in res.stderr
    res = run("evaluate", out, "--json", "--device", "cpu")
    assert res.exit_code == 0 and json.loads(res.stdout)["accuracy"] > 0
    res = run("prune", out, "--ratio", "0.3", "--json", "--quiet", "--out", tmp_path / "cli2", "--device", "cpu")
    doc = json.loads(res.stdout)
    assert doc["after"]["params"] < doc["before"]["params"] and doc["ratios"]["speedup_b256"] > 0


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "between 0 and 1"),
    (["--ratio", "0"], "between 0 and 1"),
    (["--target-macs", "0.0001"], "cannot reach"),
    (["--ratio", "0.5", "--protect", "nosuchlayer"], "no layer of that name"),
    (["--ratio", "0.5", "--target-macs", "0.5"], "one of"),
    (["--target-macs", "0.5", "--unstructured"], "unstructured"),
])
def test_cli_errors_are_one_line_and_write_nothing(cnn_artifact, tmp_path, args, message):
    out = tmp_path / "never"
    res = run("prune", cnn_artifact, *args, "--out", out, "--device", "cpu")
    assert res.exit_code != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and not artifacts.work_folder(out).exists()


def test_fine_tuning_needs_the_artifacts_dataset(cnn_artifact, tmp_path):
    art = artifacts.read_artifact(cnn_artifact)
    manifest = copy.deepcopy(art.manifest)
    manifest["data"]["dataset"] = None
    manifest.pop("weights")
    orphan = artifacts.write_artifact(tmp_path / "orphan", artifacts.load_model(art), manifest)
    res = run("prune", orphan, "--ratio", "0.5", "--finetune-epochs", "1", "--out", tmp_path / "x")
    assert res.exit_code != 0 and "records no dataset" in res.stderr
    assert not (tmp_path / "x").exists()
    # without fine-tuning it prunes, with no accuracy to report
    res = prune_artifact(orphan, PruneOptions(ratio=0.5, out=tmp_path / "y", device="cpu", **FAST))
    assert res.after.test_accuracy is None and res.after.params < res.before.params


def test_fine_tuning_rewinds_to_the_training_rate_halved_for_sgd():
    from dlkit.compress.prune import default_finetune_lr
    from dlkit.engine.trainer import TrainConfig

    assert default_finetune_lr(TrainConfig(optimizer="adamw", lr=3e-3)) == 3e-3
    assert default_finetune_lr(TrainConfig(optimizer="sgd", lr=0.1)) == 0.05
