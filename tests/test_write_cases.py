"""The cases of a hostile or unlucky user, through the real commands: interrupted and killed runs,
folders that appear or are in the way, recipes that would write outside their folder, user files
that misbehave. Each ends in one line and a next step that works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.api import TrainRequest, train_model
from dlkit.cli import app
from dlkit.engine.checkpoint import has_checkpoint, trained_steps
from dlkit.errors import Interrupted, TrainingError

runner = CliRunner()
MLP = ["mlp", "--dataset", "digits", "--device", "cpu", "--quiet"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _request(out, epochs=2, **options):
    return TrainRequest(model="mlp", dataset="digits", options={"epochs": epochs, "batch_size": 128, **options},
                        out=out, device="cpu")


def _interrupted(out, after_steps=3):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > after_steps

    with pytest.raises(Interrupted):
        train_model(_request(out), should_stop=stop)
    assert has_checkpoint(artifacts.work_folder(out))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_model(_request(tmp_path_factory.mktemp("base") / "base", epochs=1)).artifact


def test_an_interrupted_run_is_not_mixed_into_another_command(base, tmp_path):
    out = tmp_path / "x"
    _interrupted(out)
    before = sorted(p.name for p in artifacts.work_folder(out).iterdir())
    res = cli("quantize", base, "--mode", "fp16", "--out", out)
    assert res.exit_code == 2 and "x.partial is in the way" in res.output and "--resume" in res.output
    assert not out.exists()
    assert sorted(p.name for p in artifacts.work_folder(out).iterdir()) == before
    resumed = _request(out)
    resumed.resume = True
    done = train_model(resumed)
    assert done.artifact == out and not (out / "checkpoint.json").exists()


def test_a_linked_work_folder_is_never_written_through(base, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    (tmp_path / "x.partial").symlink_to(victim)
    for args in (["quantize", base, "--mode", "fp16", "--out", tmp_path / "x"],
                 ["prune", base, "--ratio", "0.5", "--out", tmp_path / "x"],
                 ["train", *MLP, "--epochs", "1", "--out", tmp_path / "x"]):
        res = cli(*args)
        assert res.exit_code == 2 and "symbolic link" in res.output, (args, res.output)
    assert [p.name for p in victim.iterdir()] == ["keep"] and not os.path.lexists(tmp_path / "x")


def test_a_finished_training_survives_its_destination_appearing(tmp_path, monkeypatch):
    out = tmp_path / "y"
    real = artifacts._write_contents

    def meanwhile(work, *a):
        real(work, *a)
        out.mkdir()  # `mkdir y` just before the final rename

    monkeypatch.setattr(artifacts, "_write_contents", meanwhile)
    res = train_model(_request(out, epochs=1))
    assert res.artifact == tmp_path / "y-2" and list(out.iterdir()) == []
    assert artifacts.read_artifact(res.artifact).manifest["metrics"]["test_accuracy"] == res.test.accuracy
    assert not any(p.name.startswith("checkpoint") for p in res.artifact.iterdir())
    assert not artifacts.work_folder(out).exists()


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    ref = train_model(_request(tmp_path / "ref", epochs=3)).artifact
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dlkit", "train", *MLP, "--epochs", "3", "--batch-size", "128", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not artifacts.work_folder(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # as soon as the work folder exists: it already holds a checkpoint
    proc.wait()
    assert not out.exists() and has_checkpoint(artifacts.work_folder(out))
    res = cli("train", *MLP, "--epochs", 3, "--batch-size", 128, "--out", out)  # without --resume
    assert res.exit_code == 2 and "unfinished run" in res.output and "--resume" in res.output
    res = cli("train", *MLP, "--epochs", 3, "--batch-size", 128, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert _same_weights(out, ref)


def test_a_failure_before_any_step_leaves_nothing_in_the_way(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError):
        train_model(_request(out, epochs=2, lr=1e30))
    assert not artifacts.work_folder(out).exists() and not out.exists()
    assert train_model(_request(out, epochs=1)).artifact == out  # the rerun is not blocked


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    import dlkit.engine.checkpoint as ckpt

    out = tmp_path / "full"
    real, calls = ckpt.save_file, {"n": 0}

    def full_at_the_second_epoch_end(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: the start, 2: after epoch 1, 3: after epoch 2
            raise OSError(28, os.strerror(28))
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", full_at_the_second_epoch_end)
    with pytest.raises(ckpt.OutputError, match="No space left on device"):
        train_model(_request(out, epochs=3))
    work = artifacts.work_folder(out)
    steps = trained_steps(work)
    assert steps > 0 and not list(work.glob("*.tmp"))  # epoch 1's checkpoint, whole; no debris
    monkeypatch.undo()
    resumed = _request(out, epochs=3)
    resumed.resume = True
    assert train_model(resumed).artifact == out


def test_recipe_names_and_ids_stay_inside_the_run_folder(tmp_path):
    from dlkit.recipes import RecipeError, load_recipe

    for name, where in (("../../x", "line 1"), ("/abs/path", "line 1"), (".hidden", "line 1")):
        path = tmp_path / "r.yaml"
        path.write_text(f"name: {name}\nsteps:\n  - train: {{model: mlp, dataset: digits}}\n")
        with pytest.raises(RecipeError, match=f"{where}: recipe name '{name}'"):
            load_recipe(path)
    path.write_text("steps:\n  - train: {model: mlp, dataset: digits}\n    id: ../up\n")
    with pytest.raises(RecipeError, match="line 3: step id '../up'"):
        load_recipe(path)


def test_dry_run_checks_values_as_the_run_does(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n"
                    "  - train: {model: mlp, dataset: digits, epochs: -1, lr: -1}\n"
                    "  - prune: {ratio: 1.5}\n")
    res = cli("run", path, "--dry-run")
    assert res.exit_code == 2
    assert "line 2: train: --epochs must be >= 1" in res.output and "--lr must be a positive number" in res.output
    assert "line 3: prune: --ratio must be between 0 and 1" in res.output
    assert not (tmp_path / "runs").exists()


def test_a_failed_recipe_step_is_recorded_with_its_message(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: f\nsteps:\n  - train: {model: mlp, dataset: digits, epochs: 1, lr: 1.0e+30}\n")
    res = cli("run", path, "--out", tmp_path / "f", "--quiet")
    assert res.exit_code == 1 and "Traceback" not in res.output
    record = json.loads((tmp_path / "f" / "run.json").read_text())["steps"]["train"]
    assert record["status"] == "failed" and "loss" in record["error"]


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: x\nsteps:\n  - train: {model: mlp, dataset: caf\xe9}\n")
    res = cli("run", path, "--dry-run")
    assert res.exit_code == 2 and "line 3: not UTF-8 text (byte 0xe9)" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("body,message", [
    ("import sys\nsys.exit(3)\n", "it calls sys.exit(3) when imported"),
    ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
])
def test_a_user_module_that_misbehaves_at_import_is_one_line(tmp_path, body, message):
    net = tmp_path / "net.py"
    net.write_text(body)
    res = cli("profile", f"{net}:Net", "--input-shape", "1,4")
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_a_user_module_that_prints_keeps_stdout_json(tmp_path):
    net = tmp_path / "net.py"
    net.write_text("import torch\nprint('hello from import')\n"
                   "class Net(torch.nn.Module):\n"
                   "    def __init__(self):\n"
                   "        super().__init__()\n"
                   "        print('hello from init')\n"
                   "        self.fc = torch.nn.Linear(4, 2)\n"
                   "    def forward(self, x):\n"
                   "        return self.fc(x)\n")
    proc = subprocess.run([sys.executable, "-m", "dlkit", "profile", f"{net}:Net", "--input-shape", "1,4", "--json",
                           "--no-latency", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"]["total"] == 10
    assert "hello from import" in proc.stderr and "hello from init" in proc.stderr


def test_a_recipe_places_and_replaces_the_folders_its_steps_write(tmp_path):
    from dlkit.recipes import load_recipe, run_recipe

    def recipe(method):
        path = tmp_path / "r.yaml"
        path.write_text("name: folders\ndefaults: {device: cpu}\nsteps:\n"
                        "  - train: {model: mlp, dataset: digits, epochs: 1}\n"
                        f"  - explain: {{method: {method}, samples: 2}}\n"
                        "  - export: {format: onnx, samples: 4}\n")
        return load_recipe(path)

    run = tmp_path / "run"
    first = run_recipe(recipe("saliency"), run)
    assert [s.status for s in first.steps] == ["ran", "ran", "ran"]
    assert (run / "explain").is_dir() and (run / "explain.json").is_file()
    assert (run / "export" / "model.onnx").is_file() and (run / "export.json").is_file()
    again = run_recipe(recipe("ig"), run)  # explain's options changed: its folder is made anew
    assert [s.status for s in again.steps] == ["skipped", "ran", "skipped"]
    assert json.loads((run / "explain.json").read_text())["method"] == "ig"
    assert json.loads((run / "explain" / "explain.json").read_text())["method"] == "ig"
