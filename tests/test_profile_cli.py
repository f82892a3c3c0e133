"""`dlkit profile` end to end: registry names, artifacts, user modules, meta presets, errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.cli import app
from dlkit.models import create_model
from dlkit.spec import STANDARD_SPECS

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def profile_json(*args, input=None) -> dict:
    res = run("profile", *args, "--json", "--quiet", input=input)
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    return json.loads(res.stdout)


def test_registry_model_report():
    res = run("profile", "cnn", "--batch-size", "8", "--no-latency", "--training", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "MACs" in res.stderr and "estimated peak" in res.stderr  # tables on stderr, JSON on stdout
    assert doc["params"]["total"] == doc["params"]["trainable"] == 421_738
    assert doc["params"]["bytes"] == 4 * 421_738 + 8 * 2 + 4 * 2 * (32 + 64)  # + BN running stats, counters
    conv1 = 28 * 28 * 32 * 9
    conv2 = 14 * 14 * 64 * 32 * 9
    dense = 64 * 7 * 7 * 128 + 128 * 10
    assert doc["forward"]["macs_per_sample"] == conv1 + conv2 + dense
    assert doc["forward"]["macs_per_batch"] == 8 * (conv1 + conv2 + dense) == doc["macs"]
    rows = {r["name"]: r for r in doc["modules"]}
    assert rows["(model)"]["share"] == 1.0 and rows["head"]["output_shape"] == [8, 10]
    assert rows["features.0"]["macs"] == 8 * conv1 and rows["features.0"]["output_shape"] == [8, 32, 28, 28]
    tr = doc["training"]
    assert tr["forward_macs"] == doc["forward"]["macs_per_batch"]
    assert 1.5 < tr["backward_macs"] / tr["forward_macs"] <= 2.0  # the first conv needs no dX
    est, meas = doc["memory"]["estimate"], doc["memory"]["measured"]
    assert est["gradients"] == 4 * 421_738 and est["optimizer_state"] == 2 * 4 * 421_738
    assert meas["inference_peak"] > 0 and meas["training_peak"] > meas["inference_peak"]
    assert 0.5 < est["training_peak"] / meas["training_peak"] < 2.0
    assert doc["counted_on"] == "cpu" and not doc["uncounted"]


def test_latency_and_depth():
    doc = profile_json("mlp", "--batch-size", "4", "--depth", "0")
    assert [r["name"] for r in doc["modules"]] == ["(model)"]
    batches = [lat["batch"] for lat in doc["latency"]]
    assert batches == [1, 4]
    for lat in doc["latency"]:
        assert lat["runs"] >= 10 and 0 < lat["median_ms"] <= lat["p90_ms"]
        assert lat["threads"] == torch.get_num_threads() and lat["device"] == "cpu"


def test_large_preset_on_meta_gives_a_memory_breakdown():
    doc = profile_json("gpt2", "--training", "--batch-size", "2", "--seq-len", "256", "--set", "lm_head=true")
    assert doc["counted_on"] == "meta" and doc["params"]["total"] == 124_439_808
    est = doc["memory"]["estimate"]
    assert est["weights"] == 4 * (124_439_808 + 0)  # no buffers
    assert est["optimizer_state"] == 2 * est["gradients"] == 2 * est["weights"]
    assert est["activations_training"] > est["activations_inference"] > 0
    assert doc["memory"]["measured"]["training_peak"] is None and not doc["latency"]
    assert any("meta" in n for n in doc["notes"])
    assert doc["training"]["backward_flops"] > 1.5 * doc["training"]["forward_flops"]
    assert doc["input_shape"] == [2, 256]


def test_text_model_and_dataset_option():
    doc = profile_json("lstm", "--dataset", "imdb", "--seq-len", "20", "--batch-size", "2", "--no-latency")
    assert doc["input_shape"] == [2, 20]
    assert doc["forward"]["macs_per_sample"] >= 20 * 4 * 128 * (128 + 128)
    assert doc["zero_cost"]  # the embedding lookup is listed


def test_artifact_and_stdin(tmp_path):
    spec = STANDARD_SPECS["digits"]
    model, cfg = create_model("mlp", spec)
    from dlkit.config import to_dict

    manifest = artifacts.new_manifest(model_name="mlp", family="mlp", config=to_dict(cfg), spec=spec,
                                      dataset="digits", data_state={}, seed=0)
    out = artifacts.write_artifact(tmp_path / "art", model, manifest)
    doc = profile_json("-", "--batch-size", "2", "--no-latency", input=f"{out}\n")
    assert doc["kind"] == "artifact" and doc["model"] == "mlp"
    assert doc["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert doc["input_shape"] == [2, 1, 8, 8]


USER = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))

class NotAModule:
    pass
'''


def test_user_module(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(USER)
    doc = profile_json(f"{f}:Net", "--input-shape", "2,3,8,8", "--no-latency")
    assert doc["kind"] == "module" and doc["batch_size"] == 2
    assert doc["forward"]["macs_per_sample"] == 8 * 8 * 4 * 3 * 9 + 4 * 8 * 8 * 5


@pytest.mark.parametrize("make,args,match", [
    (lambda p: p.write_text(USER), ["--input-shape", "2,3,9,9"], "does not fit"),
    (lambda p: p.write_text("def broken(:\n"), ["--input-shape", "1,3,8,8"], "cannot load"),
    (lambda p: p.write_text(USER), ["--input-shape", "1,3,8,8", "CLASS=NotAModule"], "is not a torch.nn.Module"),
    (lambda p: p.write_text(USER), ["--input-shape", "1,3,8,8", "CLASS=Missing"], "has no class Missing"),
    (lambda p: p.write_text(USER), [], "needs --input-shape"),
])
def test_user_module_errors_are_one_line(tmp_path, make, args, match):
    f = tmp_path / "net.py"
    make(f)
    cls = next((a.split("=")[1] for a in args if a.startswith("CLASS=")), "Net")
    args = [a for a in args if not a.startswith("CLASS=")]
    res = run("profile", f"{f}:{cls}", *args, "--no-latency")
    assert res.exit_code != 0 and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], res.stderr


def test_registry_shape_errors():
    res = run("profile", "cnn", "--input-shape", "1,2,3,4,5", "--no-latency")
    assert res.exit_code == 2 and "does not fit" in res.stderr
    res = run("profile", "cnn", "--seq-len", "10")
    assert res.exit_code == 2 and "--seq-len is for text" in res.stderr
    res = run("profile", "resnet-18")
    assert res.exit_code == 2 and "did you mean" in res.stderr


def test_profile_does_not_import_the_compiler_stack():
    """torch._dynamo/_inductor cost 2 s to import, 40% of a `dlkit profile`: counting and the
    measured memory peak must not pull them in."""
    import subprocess
    import sys

    code = ("import sys\nfrom dlkit.cli import main\nsys.argv = ['dlkit', 'profile', 'cnn', '--json', '--quiet']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean', file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["memory"]["measured"]["inference_peak"] > 0
    assert res.stderr.strip().endswith("clean")


def _digits_artifact(path):
    """An untrained mlp artifact on digits, with the data state an export describes."""
    from dlkit.config import to_dict
    from dlkit.data import load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    model, cfg = create_model("mlp", data.spec)
    manifest = artifacts.new_manifest(model_name="mlp", family="mlp", config=to_dict(cfg), spec=data.spec,
                                      dataset=data.name, data_state=data.state, seed=0)
    return artifacts.write_artifact(path, model.eval(), manifest)


def test_onnxruntime_latency_of_an_artifact(tmp_path):
    pytest.importorskip("onnxruntime")
    art = _digits_artifact(tmp_path / "art")
    ort = profile_json(art, "--batch-size", "4", "--runtime", "onnxruntime")
    pt = profile_json(art, "--batch-size", "4")
    assert [lat["batch"] for lat in ort["latency"]] == [1, 4]
    for lat in ort["latency"]:
        assert lat["runtime"] == "onnxruntime" and lat["device"] == "cpu" and lat["median_ms"] > 0
        assert lat["runs"] >= 10 and lat["median_ms"] <= lat["p90_ms"]
    assert all(lat["runtime"] == "torch" for lat in pt["latency"])
    for key in ("params", "forward", "by_op", "macs", "flops"):
        assert ort[key] == pt[key]
    assert any("ONNX Runtime" in n and "counts and memory are PyTorch's" in n for n in ort["notes"])
    assert not list(tmp_path.glob("art-*"))  # the export went to a temporary folder


def test_onnxruntime_runtime_errors_are_one_line(tmp_path):
    res = run("profile", "mlp", "--runtime", "onnxruntime", "--device", "cuda")
    assert res.exit_code != 0 and "--device cuda" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "net.py").write_text(USER)
    res = run("profile", f"{tmp_path / 'net.py'}:Net", "--input-shape", "1,3,8,8", "--runtime", "onnxruntime")
    assert res.exit_code != 0 and "registry model or an artifact" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_onnxruntime_latency_of_a_registry_model_and_a_failed_check(monkeypatch):
    pytest.importorskip("onnxruntime")
    doc = profile_json("mlp", "--batch-size", "2", "--runtime", "onnxruntime", "--depth", "0")
    assert [(lat["batch"], lat["runtime"]) for lat in doc["latency"]] == [(1, "onnxruntime"), (2, "onnxruntime")]
    assert any("8 random inputs" in n for n in doc["notes"])
    from dlkit import export

    monkeypatch.setattr(export, "FLOAT_TOLERANCE", -1.0)  # any difference, even 0, is beyond it
    res = run("profile", "mlp", "--runtime", "onnxruntime", "--depth", "0")
    assert res.exit_code != 0 and "differs from PyTorch" in res.stderr and "--runtime torch" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
