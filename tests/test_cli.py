"""The CLI contract, driven through Typer's CliRunner: stdout for machines, stderr for people."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dlkit.cli import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mlp"
    res = run("train", "mlp", "--dataset", "digits", "--epochs", "2", "--out", out, "--seed", "1")
    assert res.exit_code == 0, res.output
    return out, res


def test_train_prints_only_the_path_on_stdout(artifact):
    out, res = artifact
    assert res.stdout.strip() == str(out)
    assert "test accuracy" in res.stderr


def test_pipe_train_into_evaluate_json(artifact):
    out, _ = artifact
    res = run("evaluate", "-", "--json", "--device", "cpu", input=f"{out}\n")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model"] == "mlp" and doc["split"] == "test" and doc["accuracy"] > 0.8
    assert len(doc["confusion"]) == 10 and len(doc["per_class"]) == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert doc["accuracy"] == manifest["metrics"]["test_accuracy"]


def test_evaluate_plot_and_table(artifact, tmp_path):
    out, _ = artifact
    res = run("evaluate", out, "--plot", tmp_path / "cm.png", "--split", "val")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cm.png").stat().st_size > 1000
    assert res.stdout == "" and "precision" in res.stderr


def test_train_json_is_one_document(tmp_path):
    res = run("train", "mlp", "-d", "digits", "--epochs", "1", "--out", tmp_path / "a", "--json", "--quiet",
              "--set", "hidden=32")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model"]["config"]["hidden"] == [32]
    assert res.stderr == ""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "cnnn", "-d", "digits"], "did you mean 'cnn'"),
        (["train", "cnn", "-d", "digitz"], "unknown dataset 'digitz'"),
        (["train", "mlp", "-d", "digits", "--set", "hiden=3"], "unknown 'mlp' config key"),
        (["train", "mlp", "-d", "digits", "--epochs", "0"], "--epochs must be >= 1"),
        (["train", "mlp", "-d", "digits", "--set", "hidden"], "not key=value"),
        (["evaluate", "/nonexistent/artifact"], "no artifact at"),
    ],
)
def test_errors_are_one_line_without_traceback(args, needle, tmp_path):
    res = run(*args, "--out", tmp_path / "x") if args[0] == "train" else run(*args)
    assert res.exit_code != 0
    assert needle in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_evaluate_from_empty_stdin_is_an_error():
    res = run("evaluate", "-", input="")
    assert res.exit_code == 2 and "stdin was empty" in res.stderr


def test_models_and_datasets_list(tmp_path):
    res = run("models", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["mlp"]["params"] == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    for name in ("cnn", "lenet5", "resnet20", "resnet56", "resnet18", "resnet50", "vgg11", "vgg16", "rnn", "lstm",
                 "gru", "transformer", "bert-base"):
        assert name in rows, name
    res = run("datasets", "--json")
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["digits"]["found"] and rows["mnist"]["input_shape"] == [1, 28, 28]


def test_help_does_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom dlkit.cli import app\n"
            "r = CliRunner().invoke(app, ['train', '--help'])\nassert r.exit_code == 0, r.output\n"
            "assert '--epochs' in r.output\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "dlkit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip()


def test_a_missing_optional_package_is_one_line_naming_its_extra():
    import pytest

    from dlkit.errors import UsageError
    from dlkit.extras import require

    with pytest.raises(UsageError, match="ONNX export needs the 'no_such_module_xyz' package") as info:
        require("no_such_module_xyz", "ONNX export", "onnx")
    assert info.value.hint == 'pip install "dlkit[onnx]"'
    assert require("json", "reading", "explain").dumps([1]) == "[1]"
