"""Artifacts: atomic writes, exact round trips, and refusal of anything that is not safe to load."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from dlkit import artifacts
from dlkit.api import EvaluateOptions, TrainRequest, evaluate_artifact, train_model
from dlkit.errors import ArtifactError, Interrupted, UsageError


def _train(tmp_path, name="run", **kw):
    opts = {"epochs": 2, "batch_size": 128}
    opts.update(kw.pop("options", {}))
    req = TrainRequest(model=kw.pop("model", "mlp"), dataset="digits", options=opts, out=tmp_path / name, **kw)
    return train_model(req)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("art"))


def test_artifact_layout_and_manifest(trained):
    path = trained.artifact
    for name in ("manifest.json", "model.safetensors", "metrics.json", "history.jsonl", "curves.png",
                 "confusion.png", "train.log"):
        assert (path / name).is_file(), name
    assert list((path / "tensorboard").iterdir()), "no TensorBoard event file"
    assert not artifacts.work_folder(path).exists()
    assert not (path / "checkpoint.json").exists()
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "dlkit-artifact" and m["format_version"] == 1
    assert m["model"]["name"] == "mlp" and m["model"]["config"]["hidden"] == [128, 64]
    assert m["data"]["dataset"] == "digits" and m["data"]["spec"]["input_shape"] == [1, 8, 8]
    assert m["seed"] == 0 and m["lineage"][0]["step"] == "train"
    assert m["lineage"][0]["options"]["train_config"]["epochs"] == 2
    assert len((path / "history.jsonl").read_text().splitlines()) == 2


def test_round_trip_gives_identical_outputs(trained, tmp_path):
    art = artifacts.read_artifact(trained.artifact)
    model = artifacts.load_model(art)
    again = artifacts.load_model(art)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # and the same numbers `train` reported
    res = evaluate_artifact(trained.artifact, EvaluateOptions(device="cpu"))
    assert res.result.accuracy == trained.test.accuracy
    assert res.result.loss == pytest.approx(trained.test.loss, abs=1e-6)
    assert res.result.confusion == trained.test.confusion


def test_hidden_pickle_is_refused_and_not_executed(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained.artifact, bad)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"weight": Evil()})
    (bad / "model.safetensors").write_bytes(payload)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["weights"]["sha256"] = artifacts.sha256_file(bad / "model.safetensors")  # a careful attacker
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="cannot be loaded"):
        artifacts.load_model(artifacts.read_artifact(bad))
    assert not marker.exists()


def test_corrupted_weights_and_foreign_folders(trained, tmp_path):
    import shutil

    bad = tmp_path / "flipped"
    shutil.copytree(trained.artifact, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        artifacts.load_model(artifacts.read_artifact(bad))
    with pytest.raises(ArtifactError, match="not a dlkit artifact"):
        artifacts.read_artifact(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(ArtifactError, match="not a dlkit artifact"):
        artifacts.read_artifact(foreign)
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifacts.read_artifact(foreign)
    with pytest.raises(ArtifactError, match="no artifact"):
        artifacts.read_artifact(tmp_path / "missing")


def test_existing_destination_is_not_touched(trained):
    before = (trained.artifact / "manifest.json").read_text()
    with pytest.raises(UsageError, match="already exists"):
        _train(trained.artifact.parent, name=trained.artifact.name)
    assert (trained.artifact / "manifest.json").read_text() == before


def test_interrupt_leaves_no_artifact_and_resume_matches(tmp_path):
    ref = _train(tmp_path, name="ref", model="cnn", options={"epochs": 2, "batch_size": 100})
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 7

    req = TrainRequest(model="cnn", dataset="digits", options={"epochs": 2, "batch_size": 100}, out=tmp_path / "cut")
    with pytest.raises(Interrupted, match="checkpoint"):
        train_model(req, should_stop=stop)
    assert not (tmp_path / "cut").exists()
    assert (tmp_path / "cut.partial" / "checkpoint.json").is_file()
    with pytest.raises(UsageError, match="unfinished run"):
        train_model(req)
    req.resume = True
    done = train_model(req)
    assert not (tmp_path / "cut.partial").exists()
    assert done.test.accuracy == ref.test.accuracy
    a = artifacts.load_model(artifacts.read_artifact(ref.artifact)).state_dict()
    b = artifacts.load_model(artifacts.read_artifact(done.artifact)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    req = TrainRequest(model="mlp", dataset="digits", out=tmp_path / "x", resume=True)
    with pytest.raises(UsageError, match="nothing to resume"):
        train_model(req)
