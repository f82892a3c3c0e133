"""dlkit export: every family to ONNX and checked against PyTorch, the other formats, int8 and
pruned artifacts, and a failed check that writes nothing. Models are tiny and untrained (the
check compares two runtimes on the same weights; accuracy plays no part)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dlkit import artifacts, export
from dlkit.cli import app
from dlkit.config import to_dict
from dlkit.data import load_dataset
from dlkit.errors import IncompatibleError, UsageError
from dlkit.export import ExportOptions, export_artifact
from dlkit.models import FAMILIES, MODELS, create_model

pytest.importorskip("onnxruntime")

runner = CliRunner()

TINY_ATTENTION = {"dim": 16, "depth": 1, "heads": 2, "ffn_dim": 16}
# family -> (preset, tiny overrides); every registered family is listed (checked below)
IMAGE_CASES = {
    "mlp": ("mlp", {"hidden": [16]}),
    "cnn": ("cnn", {"channels": [4, 8], "hidden": [16]}),
    "resnet": ("resnet20", {"layers": [1, 1, 1], "widths": [4, 8, 8]}),
    "vgg": ("vgg11", {"stages": [1, 1], "channels": [4, 8], "classifier": [16]}),
    "rnn": ("lstm", {"hidden": 8}),
    "transformer": ("transformer", {**TINY_ATTENTION, "patch_size": 4}),
    "vit": ("vit-b16", {**TINY_ATTENTION, "patch_size": 4}),
}
TEXT_CASES = {
    "mlp": ("mlp", {"hidden": [16], "embed_dim": 8}),
    "rnn": ("gru", {"hidden": 8, "embed_dim": 8}),
    "transformer": ("transformer", TINY_ATTENTION),
    "bert": ("bert-base", {**TINY_ATTENTION, "max_len": 16}),
    "gpt": ("gpt2", {**TINY_ATTENTION, "max_len": 16}),
}
# Families the ONNX exporters cannot take, and why (asserted, so a change is noticed).
ONNX_REFUSED = {("text", "rnn"): "cannot be exported as onnx"}


def write_table(path, n=40):
    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "the", "a"]
    rng = np.random.RandomState(0)
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        picks = rng.choice(words[:3] if label else words[3:6], size=3).tolist() + rng.choice(words[6:], 2).tolist()
        rows.append(f"{' '.join(picks)},{'pos' if label else 'neg'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def make_artifact(path, name, overrides, *, text_file=None):
    """An untrained artifact of ``name`` on digits (or on ``text_file``), as dlkit writes them."""
    options = {"data_file": str(text_file), "max_len": 12} if text_file else None
    data = load_dataset("text-csv" if text_file else "digits", options=options)
    torch.manual_seed(0)
    model, cfg = create_model(name, data.spec, overrides)
    manifest = artifacts.new_manifest(model_name=name, family=MODELS.get(name).family, config=to_dict(cfg),
                                      spec=data.spec, dataset=data.name, data_state=data.state, seed=0)
    manifest["lineage"] = [artifacts.lineage_step("train", {"data_options": options or {}}, {})]
    return artifacts.write_artifact(path, model.eval(), manifest)


def test_every_family_is_covered():
    assert set(IMAGE_CASES) | set(TEXT_CASES) == set(FAMILIES)
    for cases in (IMAGE_CASES, TEXT_CASES):
        assert all(MODELS.get(preset).family == family for family, (preset, _) in cases.items())


CASES = [("image", f, *c) for f, c in IMAGE_CASES.items()] + [("text", f, *c) for f, c in TEXT_CASES.items()]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("text") / "reviews.csv")


@pytest.mark.parametrize("modality,family,preset,overrides", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_family_exports_to_onnx_and_matches_pytorch(tmp_path, text_file, modality, family, preset, overrides):
    art = make_artifact(tmp_path / "a", preset, overrides, text_file=text_file if modality == "text" else None)
    if (modality, family) in ONNX_REFUSED:
        with pytest.raises(IncompatibleError, match=ONNX_REFUSED[modality, family]) as info:
            export_artifact(art, ExportOptions(out=tmp_path / "x"))
        assert "\n" not in str(info.value) and "--format" in str(info.value)
        assert not (tmp_path / "x").exists()
        return
    res = export_artifact(art, ExportOptions(out=tmp_path / "x", samples=8))
    assert res.path == tmp_path / "x" and res.exporter == "dynamo"
    assert res.batch_sizes == [1, 7, 8]  # ONNX Runtime ran each batch size: the batch axis is dynamic
    assert res.max_abs_diff < 1e-4 and res.max_abs_diff <= res.tolerance
    doc = json.loads((tmp_path / "x" / "export.json").read_text())
    assert doc["inputs"][0]["shape"][0] == "batch"
    assert doc["preprocessing"]["modality"] == modality
    if modality == "text":
        assert doc["inputs"][0]["shape"] == ["batch", "seq"] and doc["inputs"][0]["dtype"] == "int64"
        assert doc["preprocessing"]["tokenizer"]["max_len"] == 12
        assert doc["check"]["short_sequence"] == 6  # and a shorter sequence matched PyTorch too
        assert doc["labels"] == ["neg", "pos"]
    else:
        assert doc["inputs"][0]["shape"] == ["batch", 1, 8, 8]
        assert doc["labels"] == [str(i) for i in range(10)]
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["export.json", "model.onnx"]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("cnn") / "cnn", "cnn", IMAGE_CASES["cnn"][1])


@pytest.mark.parametrize("fmt,file", [("exported-program", "model.pt2"), ("torchscript", "model.torchscript.pt")])
def test_the_other_formats_are_checked_too(tmp_path, cnn, fmt, file):
    res = export_artifact(cnn, ExportOptions(format=fmt, out=tmp_path / "x", samples=8))
    assert res.max_abs_diff <= 1e-5 and (res.path / file).is_file()
    assert json.loads((res.path / "export.json").read_text())["model_format"] == fmt


def test_a_failed_check_writes_nothing(tmp_path, cnn, monkeypatch):
    monkeypatch.setattr(export, "FLOAT_TOLERANCE", -1.0)  # no difference can pass
    res = runner.invoke(app, ["export", str(cnn), "--format", "torchscript", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.stdout == ""
    assert "differs from PyTorch by up to" in res.stderr and "nothing was written" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_folder_and_refuses_opset_for_other_formats(tmp_path, cnn):
    res = runner.invoke(app, ["export", str(cnn), "--out", str(tmp_path / "x"), "--opset", "17"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "x") and "max |exported - PyTorch|" in res.stderr
    assert json.loads((tmp_path / "x" / "export.json").read_text())["opset"] == 17
    with pytest.raises(UsageError, match="--opset is for --format onnx"):
        ExportOptions(format="torchscript", opset=17).validate()
    with pytest.raises(UsageError, match="--quantize is for --format onnx"):
        ExportOptions(format="torchscript", quantize="static").validate()


def test_int8_static_exports_through_the_torchscript_exporter_dynamic_is_refused(tmp_path, cnn):
    from dlkit.compress.quantize import QuantizeOptions, quantize_artifact

    fast = dict(repeats=1, eval_samples=16, calib_batches=1, batches=(1,))
    static = quantize_artifact(cnn, QuantizeOptions("static", out=tmp_path / "s", **fast)).artifact
    res = export_artifact(static, ExportOptions(out=tmp_path / "s-onnx", samples=16))
    assert res.exporter == "torchscript" and any("TorchScript-based" in n for n in res.notes)
    assert any("QDQ form" in n for n in res.notes)
    assert res.max_abs_diff <= res.tolerance
    dynamic = quantize_artifact(cnn, QuantizeOptions("dynamic", out=tmp_path / "d", **fast)).artifact
    with pytest.raises(IncompatibleError, match="quantized::linear_dynamic") as info:
        export_artifact(dynamic, ExportOptions(out=tmp_path / "d-onnx"))
    assert "torchscript" in info.value.hint and "float artifact" in info.value.hint
    assert not (tmp_path / "d-onnx").exists()
    with pytest.raises(UsageError, match="is already int8"):
        export_artifact(static, ExportOptions(out=tmp_path / "again", quantize="dynamic"))


def test_a_pruned_artifact_exports_like_a_float_one(tmp_path, cnn):
    from dlkit.compress.prune import PruneOptions, prune_artifact

    pruned = prune_artifact(cnn, PruneOptions(ratio=0.5, out=tmp_path / "p", device="cpu", latency_repeats=1)).artifact
    res = export_artifact(pruned, ExportOptions(out=tmp_path / "p-onnx", samples=8))
    assert res.exporter == "dynamo" and res.max_abs_diff <= res.tolerance
