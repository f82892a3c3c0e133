"""Sequence models on text: padding is masked, and rnn/lstm/gru/transformer learn a user CSV."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dlkit.api import EvaluateOptions, TrainRequest, evaluate_artifact, train_model
from dlkit.cli import app
from dlkit.models import create_model
from dlkit.spec import TEXT, DataSpec
from tests.test_text import reviews, write_table

SMALL = {"rnn": {"hidden": "24", "embed_dim": "16"}, "lstm": {"hidden": "16", "embed_dim": "16"},
         "gru": {"hidden": "16", "embed_dim": "16", "bidirectional": "true"},
         "transformer": {"dim": "32", "ffn_dim": "64", "depth": "1", "dropout": "0.0"}}


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru", "transformer", "mlp"])
def test_padding_does_not_change_the_output(name):
    torch.manual_seed(0)
    overrides = dict(SMALL.get(name, {}), **({"bidirectional": "true"} if name == "lstm" else {}))
    model, _ = create_model(name, DataSpec(TEXT, (16,), 2, vocab_size=30), overrides)
    model.eval()
    x = torch.randint(2, 30, (4, 10))
    x[1, 6:] = 0  # right-padded rows of different lengths
    x[2, 3:] = 0
    longer = torch.cat([x, torch.zeros(4, 6, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(longer), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    texts, labels = reviews(256, seed=1, words=(2, 7))
    return write_table(tmp_path_factory.mktemp("text") / "reviews.csv", texts, labels,
                       text_col="review", label_col="sentiment")


@pytest.mark.parametrize("name", ["rnn", "gru", "transformer"])  # lstm: through the CLI below
def test_models_learn_a_csv_and_evaluate_the_same(name, data_file, tmp_path):
    request = TrainRequest(
        model=name, dataset="text-csv", overrides=SMALL[name], seed=0, device="cpu", out=tmp_path / name,
        options={"epochs": 4, "batch_size": 16, "lr": 2e-2},
        data_options={"data_file": str(data_file), "text_column": "review", "label_column": "sentiment",
                      "max_len": 10, "vocab_size": 40})
    result = train_model(request)
    assert result.test.accuracy >= 0.9, (name, result.test.accuracy)  # chance is 0.5
    manifest = json.loads((result.artifact / "manifest.json").read_text())
    state = manifest["data"]["state"]
    assert state["labels"] == ["neg", "pos"] and state["tokenizer"]["vocab_size"] == 40  # as asked
    assert manifest["data"]["spec"]["vocab_size"] == len(state["tokenizer"]["vocab"]) == 23  # what the data has
    again = evaluate_artifact(result.artifact, EvaluateOptions(device="cpu"))
    assert again.result.accuracy == pytest.approx(result.test.accuracy)
    assert again.result.confusion == result.test.confusion


def test_cli_data_file_implies_text_csv_and_evaluate_another_file(data_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "art"
    res = runner.invoke(app, ["train", "lstm", "--data-file", str(data_file), "--text-column", "review",
                              "--label-column", "sentiment", "--max-len", "10", "--vocab-size", "40",
                              "--epochs", "4", "--batch-size", "16", "--lr", "0.02", "--set", "hidden=16", "--set", "embed_dim=16",
                              "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["dataset"] == "text-csv"
    assert manifest["data"]["state"]["file"] == str(data_file.resolve())
    texts, labels = reviews(40, seed=7, words=(2, 7))
    other = write_table(tmp_path / "other.jsonl", texts, labels, text_col="review", label_col="sentiment")
    res = runner.invoke(app, ["evaluate", str(out), "--data-file", str(other), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["samples"] == 40 and doc["accuracy"] >= 0.9 and doc["dataset"] == "text-csv"
    bad = runner.invoke(app, ["train", "lstm", "--dataset", "mnist", "--data-file", str(data_file)])
    assert bad.exit_code == 2 and "--data-file is for datasets text-csv and text-lm" in bad.output
