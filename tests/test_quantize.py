"""dlkit quantize: int8 and half-size artifacts that reload without pickle to the same outputs."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil

import pytest
import torch
from torch import nn
from safetensors.torch import load_file
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.api import EvaluateOptions, TrainRequest, evaluate_artifact, train_model
from dlkit.cli import app
from dlkit.compress import quantize as q
from dlkit.errors import ArtifactError, DataError, IncompatibleError, UsageError

# Small widths keep the suite fast; a config with smaller widths is also what a pruned artifact is.
MODELS_CFG = {
    "mlp": {},
    "cnn": {"channels": "8,16", "hidden": "32"},
    "resnet20": {"layers": "1,1,1", "widths": "8,8,16"},
    "lstm": {"hidden": "32"},
    "gru": {"hidden": "32", "bidirectional": "true"},
    "transformer": {"dim": "32", "depth": "1", "heads": "2", "ffn_dim": "64", "patch_size": "2"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """mlp and cnn trained briefly (accuracy checks, QAT); the rest written untrained, which is
    all the exactness checks need and keeps the suite fast."""
    from dlkit.data import load_dataset
    from dlkit.models import MODELS, create_model

    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name in ("mlp", "cnn"):
        req = TrainRequest(model=name, dataset="digits", overrides=MODELS_CFG[name], out=root / name,
                           options={"epochs": 2, "batch_size": 64})
        out[name] = train_model(req).artifact
    data = load_dataset("digits")
    for name in ("resnet20", "lstm", "gru", "transformer"):
        torch.manual_seed(0)
        model, cfg = create_model(name, data.spec, MODELS_CFG[name])
        manifest = artifacts.new_manifest(model_name=name, family=MODELS.get(name).family,
                                          config=dataclasses.asdict(cfg), spec=data.spec, dataset="digits",
                                          data_state=data.state, seed=0)
        out[name] = artifacts.write_artifact(root / name, model.eval(), manifest)
    return out


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    """Each (model, mode) quantized once for the whole module."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(name, mode):
        if (name, mode) not in cache:
            cache[name, mode] = _quantize(trained[name], mode, root)
        return cache[name, mode]

    return get


def _quantize(src, mode, tmp_path, **kw):
    kw.setdefault("repeats", 1)
    kw.setdefault("calib_batches", 2)
    kw.setdefault("choose_layers", False)  # timing decides nothing here: the tests below cover the choice
    return q.quantize_artifact(src, q.QuantizeOptions(mode, out=tmp_path / f"{src.name}-{mode}", **kw))


CASES = [("mlp", "dynamic"), ("mlp", "static"), ("mlp", "fp16"), ("cnn", "static"), ("cnn", "bf16"),
         ("resnet20", "static"), ("lstm", "dynamic"), ("gru", "dynamic"), ("transformer", "dynamic")]


@pytest.mark.parametrize("name,mode", CASES)
def test_reload_reproduces_outputs_and_evaluate_agrees(quantized, name, mode):
    res = quantized(name, mode)
    assert res.verified, "the reloaded artifact gave other outputs than the quantized model"
    art = artifacts.read_artifact(res.artifact)
    assert art.manifest["model"]["transforms"][-1]["kind"] == "quantize"
    assert art.manifest["lineage"][-1]["step"] == "quantize"
    a, b = artifacts.load_model(art), artifacts.load_model(art)
    x = torch.randn(32, *art.spec.input_shape)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # evaluate loads the artifact afresh and must see exactly what quantize measured
    ev = evaluate_artifact(res.artifact, EvaluateOptions(device="cpu", batch_size=256))
    assert ev.result.accuracy == res.after.accuracy
    if name in ("mlp", "cnn"):  # trained; the others are random nets
        assert abs(res.after.accuracy - res.before.accuracy) < 0.05
    tensors = load_file(str(res.artifact / "model.safetensors"))
    dtypes = {t.dtype for t in tensors.values()}
    if mode in ("fp16", "bf16"):
        assert q.HALF[mode] in dtypes and torch.float32 not in dtypes
        assert 1.8 < res.ratios()["size"] <= 2.0  # the header and int64 BN counters stay
    else:
        assert torch.int8 in dtypes
        # tiny nets: scales, fp32 biases and the unquantized patch conv/norms weigh in
        assert res.ratios()["size"] > 1.5 and res.ratios()["layers"] > 2.5
        assert res.quantized_layers and art.manifest["precision"] == "fp32"


def test_static_fuses_and_quantizes_every_conv_and_linear(quantized):
    res = quantized("resnet20", "static")
    model = artifacts.load_model(artifacts.read_artifact(res.artifact))
    floats = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear)]
    assert not floats, f"left in float: {floats}"
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"ConvReLU2d", "QFunctional", "Quantize", "DeQuantize"} <= kinds
    assert type(model.stages[0][0].conv1).__module__.startswith("torch.ao.nn.intrinsic.quantized")


def test_fusion_groups_follow_the_layers():
    from dlkit.models import create_model
    from dlkit.spec import DataSpec

    spec = DataSpec(modality="image", input_shape=(1, 8, 8), num_classes=3)
    cnn, _ = create_model("cnn", spec)
    assert q.fusion_groups(cnn) == [["features.0", "features.1", "features.2"],
                                    ["features.4", "features.5", "features.6"], ["classifier.0", "classifier.1"]]
    net, _ = create_model("resnet20", spec, {"layers": "1,1", "widths": "4,8"})
    groups = q.fusion_groups(net)
    assert ["stages.1.0.conv1", "stages.1.0.bn1", "stages.1.0.relu1"] in groups
    assert ["stages.1.0.conv2", "stages.1.0.bn2"] in groups
    assert ["stages.1.0.shortcut.0", "stages.1.0.shortcut.1"] in groups


def test_dynamic_reaches_attention_projections(quantized):
    res = quantized("transformer", "dynamic")
    for proj in ("q", "k", "v", "proj"):
        assert f"blocks.0.attn.{proj}" in res.quantized_layers
    assert "blocks.0.fc1" in res.quantized_layers and "head" in res.quantized_layers


def test_qat_fine_tunes_then_converts(trained, tmp_path):
    res = _quantize(trained["cnn"], "qat", tmp_path, epochs=1)
    assert res.verified and len(res.qat_history) == 1
    assert (res.artifact / "history.jsonl").is_file()
    assert res.after.accuracy > 0.5
    model = artifacts.load_model(artifacts.read_artifact(res.artifact))
    assert "ConvReLU2d" in {type(m).__name__ for m in model.modules()}
    assert not [m for m in model.modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear)]


def test_mode_a_model_cannot_take_names_the_ones_it_can(trained, tmp_path):
    with pytest.raises(IncompatibleError, match="modes it can take: dynamic, fp16, bf16"):
        try:
            _quantize(trained["lstm"], "static", tmp_path)
        except IncompatibleError as exc:
            raise IncompatibleError(f"{exc.message} ({exc.hint})") from None
    assert not list(tmp_path.iterdir())


def test_unavailable_backend_and_missing_data_write_nothing(trained, tmp_path, monkeypatch):
    engine = type(torch.backends.quantized)
    monkeypatch.setattr(engine, "supported_engines", ["x86", "none"])
    with pytest.raises(UsageError, match="qnnpack int8 backend is not available on this CPU"):
        _quantize(trained["cnn"], "static", tmp_path, backend="qnnpack")
    monkeypatch.undo()

    orphan = tmp_path / "orphan"
    shutil.copytree(trained["cnn"], orphan)
    manifest = json.loads((orphan / "manifest.json").read_text())
    manifest["data"]["dataset"] = manifest["data"]["state"]["dataset"] = "mnist"  # absent; downloads are off
    (orphan / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    with pytest.raises(DataError, match="static int8 calibration needs the 'mnist' data"):
        _quantize(orphan, "static", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orphan"]


def test_quantized_artifact_refuses_hidden_pickle(quantized, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(quantized("mlp", "dynamic").artifact, bad)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (bad / "model.safetensors").write_bytes(pickle.dumps({"w": Evil()}))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["weights"]["sha256"] = artifacts.sha256_file(bad / "model.safetensors")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="cannot be loaded"):
        artifacts.load_model(artifacts.read_artifact(bad))
    assert not marker.exists()
    with pytest.raises(UsageError, match="already quantized"):
        q.quantize_artifact(bad, q.QuantizeOptions("dynamic", out=tmp_path / "again"))


def test_cli_json_table_and_errors(trained, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(app, ["quantize", str(trained["mlp"]), "--mode", "dynamic", "--repeats", "1",
                            "--out", str(out), "--json", "--no-onnxruntime"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["artifact"] == str(out) and doc["mode"] == "dynamic" and doc["verified"] is True
    assert set(doc["before"]["latency_ms"]) == {"1", "64", "256"} and doc["ratios"]["size"] > 2.5
    assert "size on disk" in r.stderr and "latency batch 256" in r.stderr
    # ONNX Runtime skipped: said so, and the recommendation weighs the PyTorch int8 model alone
    assert doc["onnxruntime"] is None and any("--no-onnxruntime" in n for n in doc["notes"])
    rec = doc["recommendation"]
    assert set(rec) >= {"path", "runtime", "speedup", "command", "reason"} and rec["runtime"] == "torch"
    assert "recommended:" in r.stderr
    r = runner.invoke(app, ["quantize", "-", "--mode", "fp16", "--repeats", "1"], input=f"{trained['cnn']}\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{trained['cnn']}-fp16"
    r = runner.invoke(app, ["quantize", str(trained["gru"]), "--mode", "static"])
    assert r.exit_code == 2 and r.stdout == ""
    assert "error:" in r.stderr and "dynamic, fp16, bf16" in r.stderr
    assert "Warning" not in r.stderr


def test_a_pruned_artifact_quantizes(trained, tmp_path):
    runner = CliRunner()
    pruned = tmp_path / "pruned"
    r = runner.invoke(app, ["prune", str(trained["cnn"]), "--ratio", "0.5", "--out", str(pruned), "-q"])
    assert r.exit_code == 0, r.output
    widths = json.loads((pruned / "manifest.json").read_text())["model"]["config"]["channels"]
    assert widths == [4, 8]
    res = _quantize(pruned, "static", tmp_path)
    assert res.verified
    model = artifacts.load_model(artifacts.read_artifact(res.artifact))
    assert model.features[0].out_channels == 4


def test_recommendation_is_the_fastest_path_measured_in_this_run(trained, tmp_path):
    """Dynamic int8 of the mlp beside ONNX Runtime's int8 of the same artifact, timed in the same
    rounds: the recommendation is one of those measured, with the speed-up measured here."""
    res = _quantize(trained["mlp"], "dynamic", tmp_path, onnxruntime=True, batches=(1, 64))
    ort, rec = res.onnxruntime, res.recommendation
    assert ort is not None and ort.runtime == "onnxruntime" and set(ort.latency_ms) == {1, 64}
    assert ort.size_bytes > 0 and abs(ort.accuracy - res.before.accuracy) < 0.05  # it runs the same model
    measured = {"torch": res.after.latency_ms[64], "onnxruntime": ort.latency_ms[64]}
    fp32 = res.before.latency_ms[64]
    best = min(measured, key=measured.get)
    if fp32 / measured[best] >= q.MIN_SPEEDUP:
        assert rec.runtime == best and rec.speedup == pytest.approx(fp32 / measured[best], rel=1e-9)
        assert rec.path != q.KEEP_FP32 and rec.batch == 64
        if best == "onnxruntime":
            assert rec.command == f"dlkit export {trained['mlp']} --quantize dynamic"
    else:  # nothing measured faster here: never recommend a slower path
        assert rec.path == q.KEEP_FP32 and rec.speedup == 1.0
    assert res.to_dict()["recommendation"]["runtime"] == rec.runtime


def test_recommend_never_names_a_path_that_measured_slower():
    fp32 = {1: 1.0, 256: 10.0}
    torch_int8 = q.Candidate("this artifact (PyTorch int8)", "torch", {1: 0.5, 256: 12.0})
    ort_int8 = q.Candidate("ONNX Runtime int8 (dynamic)", "onnxruntime", {1: 0.4, 256: 9.9}, "dlkit export a")
    rec = q.recommend(fp32, [torch_int8, ort_int8])  # faster at batch 1 only, 1% at 256: noise
    assert rec.path == q.KEEP_FP32 and rec.speedup == 1.0 and rec.command is None and "batch 256" in rec.reason
    ort_int8.latency_ms[256] = 4.0
    rec = q.recommend(fp32, [torch_int8, ort_int8])
    assert (rec.runtime, rec.speedup, rec.command) == ("onnxruntime", 2.5, "dlkit export a")
    rec = q.recommend({1: 1.0, 16: 10.0}, [q.Candidate("x", "torch", {1: 0.1, 16: 1.0})])
    assert rec.path == q.KEEP_FP32 and "batch >= 64" in rec.reason  # small batches decide nothing
    assert q.recommend(fp32, []).path == q.KEEP_FP32


def test_a_family_onnx_cannot_take_is_skipped_with_a_note(tmp_path):
    """Text RNNs do not export to ONNX: quantize still succeeds, says why ONNX Runtime was not
    measured, and recommends from the PyTorch int8 model alone."""
    from tests.test_export import make_artifact, write_table

    src = make_artifact(tmp_path / "gru", "gru", {"hidden": 8, "embed_dim": 8},
                        text_file=write_table(tmp_path / "reviews.csv"))
    res = _quantize(src, "dynamic", tmp_path, onnxruntime=True, batches=(1, 64))
    assert res.verified and res.onnxruntime is None
    assert any(n.startswith("ONNX Runtime int8 not measured") and "onnx" in n for n in res.notes)
    assert res.recommendation.runtime == "torch"


# --------------------------------------------------------------------------- static int8: the per-layer choice


def _digits_cnn():
    from dlkit.data import load_dataset
    from dlkit.models import create_model

    data = load_dataset("digits")
    torch.manual_seed(0)
    model, _ = create_model("cnn", data.spec, MODELS_CFG["cnn"])
    x = data.train[0][:256]
    return model.eval(), x


def test_static_keeps_in_fp32_the_layers_whose_int8_kernel_measured_slower():
    """The timer is injected: it runs both sides (they compute the same layer) and reports the
    stem's int8 kernel slower; that layer alone stays float, the rest is int8, outputs stay close."""
    model, x = _digits_cnn()
    timed = []

    def timer(name, int8_call, float_call):
        a, b = int8_call(), float_call()
        assert a.shape == b.shape and a.is_quantized and b.is_quantized
        assert (a.dequantize() - b.dequantize()).abs().max() <= 4 * a.q_scale() + 1e-6  # the same layer
        timed.append(name)
        return (3.0, 1.0) if name == "features.0" else (1.0, 3.0)

    compared = []

    def model_timer(int8_call, candidate_call):  # the whole models, as the per-layer choice left them
        a, b = int8_call(), candidate_call()
        compared.append(len(a))
        assert a.shape == b.shape and (a - b).abs().max() < 0.1
        return 2.0, 1.0

    int8 = q.quantize_static(model, [x[:128], x[128:]], "x86", timer=timer, model_timer=model_timer)
    assert timed == ["features.0", "features.4", "classifier.0", "head"]  # every int8 layer, in order
    assert compared == list(q.MODEL_BATCHES)
    assert q.float_layer_names(int8) == ["features.0"]
    assert type(int8.features[0].layer[0]) is nn.Conv2d  # fused conv-bn-relu, in float
    assert q.quantized_layer_names(int8) == ["features.4", "classifier.0", "head"]
    ref, _ = _digits_cnn()
    with torch.no_grad(), q.quiet_ao("x86"):
        diff = (int8(x[:64]) - ref(x[:64])).abs().max()
    assert diff < 0.05
    # a timer finding every int8 kernel faster keeps nothing in fp32
    model, x = _digits_cnn()
    int8 = q.quantize_static(model, [x[:128]], "x86", timer=lambda name, a, b: (1.0, 2.0))
    assert q.float_layer_names(int8) == []


def test_layers_slower_alone_stay_int8_when_the_model_is_not_faster_without_them():
    """The stem times slower in int8 alone, but the model with it in fp32 is not faster as a whole
    (by more than the margin) at one of the batches: everything stays int8."""
    model, x = _digits_cnn()
    seen = []

    def model_timer(int8_call, candidate_call):
        seen.append(len(int8_call()))
        return (2.0, 1.0) if len(seen) == 1 else (1.0, 0.99)  # 1% faster at 256: within the margin

    int8 = q.quantize_static(model, [x[:128]], "x86", timer=lambda name, a, b: (3.0, 1.0) if name == "features.0"
                             else (1.0, 3.0), model_timer=model_timer)
    assert seen == list(q.MODEL_BATCHES)
    assert q.float_layer_names(int8) == [] and "features.0" in q.quantized_layer_names(int8)


def test_a_layer_kept_in_fp32_is_recorded_and_reloads_exactly(trained, tmp_path):
    res = _quantize(trained["cnn"], "static", tmp_path, fp32_layers=("features.0",))
    assert res.verified
    transform = artifacts.read_artifact(res.artifact).manifest["model"]["transforms"][-1]
    assert transform["fp32_layers"] == ["features.0"]
    model = artifacts.load_model(artifacts.read_artifact(res.artifact))
    assert q.float_layer_names(model) == ["features.0"] and "features.0" not in res.quantized_layers
    assert any("kept in fp32" in n and "features.0" in n for n in res.notes)
    assert abs(res.after.accuracy - res.before.accuracy) < 0.05


def test_static_with_the_measured_choice_reloads_to_what_was_measured(trained, tmp_path):
    """The real timer on this machine: whatever it keeps, the artifact records it and reloads exactly."""
    res = _quantize(trained["cnn"], "static", tmp_path, choose_layers=True)
    assert res.verified
    model = artifacts.load_model(artifacts.read_artifact(res.artifact))
    kept = q.float_layer_names(model)
    transform = artifacts.read_artifact(res.artifact).manifest["model"]["transforms"][-1]
    assert transform.get("fp32_layers", []) == kept
    assert set(kept) | set(res.quantized_layers) == {"features.0", "features.4", "classifier.0", "head"}


def test_keeping_an_unknown_layer_says_which_exist(trained, tmp_path):
    with pytest.raises(UsageError, match="no conv or linear layer named 'features.9'") as err:
        _quantize(trained["cnn"], "static", tmp_path, fp32_layers=("features.9",))
    assert "features.0" in err.value.hint


def test_recommend_needs_int8_faster_at_every_big_batch():
    """Faster at 256 but slower at 64: int8 is not recommended (it measured slower somewhere)."""
    fp32 = {1: 1.0, 64: 4.0, 256: 16.0}
    c = q.Candidate("this artifact (PyTorch int8)", "torch", {1: 0.5, 64: 4.4, 256: 8.0})
    rec = q.recommend(fp32, [c])
    assert rec.path == q.KEEP_FP32 and "0.91x" in rec.reason and "batch 64/256" in rec.reason
    c.latency_ms[64] = 2.0
    rec = q.recommend(fp32, [c])
    assert rec.path == c.path and rec.speedup == 2.0 and rec.batch == 256
