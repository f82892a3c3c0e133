"""dlkit predict: PNG files (grey, RGB, other sizes) get the labels evaluate's model gives for the
same samples, with PyTorch and with ONNX Runtime; arrays; text lines on stdin; unreadable files
are named and skipped (exit 1) or stop the run (--strict); an export folder is usable with
onnxruntime, numpy and Pillow alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.cli import app
from dlkit.engine.evaluate import predict_logits
from dlkit.export import ExportOptions, export_artifact

pytest.importorskip("onnxruntime")

runner = CliRunner()
N = 24  # test samples written as files


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def lines(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small mlp trained on digits, its ONNX export, and what evaluate's model says on N test samples
    (an mlp: a convnet trains 5x slower here, and the image path before the model is the same)."""
    root = tmp_path_factory.mktemp("predict")
    res = run("train", "mlp", "--dataset", "digits", "--epochs", "2", "--set", "hidden=32", "--out", root / "mlp",
              "-q")
    assert res.exit_code == 0, res.stderr
    art = artifacts.read_artifact(root / "mlp")
    data = artifacts.load_data(art, why="the test")
    x = data.test[0][:N]
    labels = predict_logits(artifacts.load_model(art), x).argmax(1).tolist()  # as evaluate runs it
    exported = export_artifact(root / "mlp", ExportOptions(out=root / "mlp-onnx")).path
    # the raw test pixels as 8-bit images: digits are 0..16, stored as 0..1
    state = art.manifest["data"]["state"]
    raw = x * torch.tensor(state["std"]).view(1, -1, 1, 1) + torch.tensor(state["mean"]).view(1, -1, 1, 1)
    pixels = (raw.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return root, x, labels, exported, pixels


def write_pngs(folder, pixels, mode):
    folder.mkdir()
    for i, p in enumerate(pixels):
        if mode == "L":
            img = Image.fromarray(p, "L")
        else:  # RGB at twice the size: grey replicated, each pixel a 2x2 block
            img = Image.fromarray(np.stack([p] * 3, -1), "RGB").resize((16, 16), Image.Resampling.NEAREST)
        img.save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("which", ["artifact", "export"])
def test_png_files_get_the_labels_evaluate_gives(tmp_path, trained, mode, which):
    root, _, labels, exported, pixels = trained
    folder = write_pngs(tmp_path / "png", pixels, mode)
    target = root / "mlp" if which == "artifact" else exported
    res = run("predict", target, folder, "--top-k", "2", "--batch-size", "5")
    assert res.exit_code == 0, res.stderr
    got = lines(res)
    assert [g["input"] for g in got] == [str(folder / f"{i:03d}.png") for i in range(N)]
    assert [g["index"] for g in got] == labels
    for g in got:
        assert g["label"] == str(g["index"]) and len(g["top_k"]) == 2
        assert g["top_k"][0]["probability"] == g["probability"] >= g["top_k"][1]["probability"]


def test_arrays_of_normalised_samples_are_taken_as_they_are(tmp_path, trained):
    root, x, labels, exported, pixels = trained
    np.save(tmp_path / "batch.npy", x.numpy())
    np.savez(tmp_path / "pixels.npz", first=pixels[0], rest=pixels[1:4])
    res = run("predict", exported, tmp_path / "batch.npy", tmp_path / "pixels.npz", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["runtime"] == "onnxruntime"
    got = {p["input"]: p["index"] for p in doc["predictions"]}
    assert [got[f"{tmp_path / 'batch.npy'}[{i}]"] for i in range(N)] == labels
    assert got[f"{tmp_path / 'pixels.npz'}:first"] == labels[0]
    assert [got[f"{tmp_path / 'pixels.npz'}:rest[{i}]"] for i in range(3)] == labels[1:4]


def test_a_corrupt_file_is_named_and_skipped_and_strict_stops(tmp_path, trained):
    root, _, labels, exported, pixels = trained
    folder = write_pngs(tmp_path / "png", pixels[:3], "L")
    (folder / "001.png").write_bytes((folder / "001.png").read_bytes()[:40])  # truncated
    res = run("predict", exported, folder)
    assert res.exit_code == 1
    assert [g["input"] for g in lines(res)] == [str(folder / "000.png"), str(folder / "002.png")]
    assert [g["index"] for g in lines(res)] == [labels[0], labels[2]]
    assert f"cannot read {folder / '001.png'}" in res.stderr
    assert "1 input(s) could not be read" in res.stderr and "Traceback" not in res.stderr
    names = f"{folder / '000.png'}\n{folder / 'nothing.png'}\n"  # an image model reads file names on stdin
    piped = run("predict", exported, "-", input=names)
    assert piped.exit_code == 1 and [g["index"] for g in lines(piped)] == [labels[0]]
    assert f"cannot read {folder / 'nothing.png'}: no such file" in piped.stderr
    strict = run("predict", exported, folder, "--strict", "--batch-size", "1")
    assert strict.exit_code == 1 and "drop --strict" in strict.stderr
    assert len(lines(strict)) == 1  # 000.png, then the stop


def test_runtimes_and_targets(trained, tmp_path):
    root, x, labels, exported, _ = trained
    np.save(tmp_path / "x.npy", x.numpy())
    res = run("predict", root / "mlp", tmp_path / "x.npy", "--runtime", "onnxruntime", "--json")
    assert res.exit_code == 0, res.stderr  # the artifact, exported to a temporary ONNX file first
    doc = json.loads(res.stdout)
    assert doc["runtime"] == "onnxruntime" and [p["index"] for p in doc["predictions"]] == labels
    import tempfile
    from pathlib import Path

    assert not list(Path(tempfile.gettempdir()).glob("dlkit-predict-*"))  # the temporary export is gone
    res = run("predict", exported, tmp_path / "x.npy", "--runtime", "torch")
    assert res.exit_code == 2 and "runs with --runtime onnxruntime" in res.stderr
    exp = export_artifact(root / "mlp", ExportOptions(format="torchscript", out=tmp_path / "ts", samples=8)).path
    res = run("predict", exp, tmp_path)
    assert res.exit_code == 2 and "loads only ONNX exports" in res.stderr


def test_text_lines_on_stdin(tmp_path):
    from tests.test_export import make_artifact, write_table

    table = write_table(tmp_path / "reviews.csv")
    art = make_artifact(tmp_path / "mlp", "mlp", {"hidden": [16], "embed_dim": 8}, text_file=table)
    exported = export_artifact(art, ExportOptions(out=tmp_path / "mlp-onnx")).path
    texts = ["A great film, good plot!", "awful... the plot was poor", "words nobody has seen"]
    model = artifacts.load_model(artifacts.read_artifact(art))
    from dlkit.data.tokenizer import Tokenizer

    state = artifacts.read_artifact(art).manifest["data"]["state"]
    ids, _ = Tokenizer.from_state(state["tokenizer"]).encode(texts)
    expected = predict_logits(model, torch.from_numpy(ids)).argmax(1).tolist()
    np.save(tmp_path / "ids.npy", ids)
    for target in (art, exported):
        res = run("predict", target, "-", "--top-k", "1", input="\n".join(texts) + "\n\n")
        assert res.exit_code == 0, res.stderr
        got = lines(res)
        assert [g["input"] for g in got] == ["stdin:1", "stdin:2", "stdin:3"]
        assert [g["index"] for g in got] == expected
        assert all(g["label"] in ("neg", "pos") for g in got)
        res = run("predict", target, tmp_path / "ids.npy")  # token ids as an array
        assert res.exit_code == 0, res.stderr
        assert [g["index"] for g in lines(res)] == expected


STANDALONE = textwrap.dedent('''
    import json, sys
    sys.modules["dlkit"] = None  # any import of dlkit fails
    import numpy as np, onnxruntime as ort
    from PIL import Image

    folder, images = sys.argv[1], sys.argv[2:]
    desc = json.load(open(f"{folder}/export.json"))
    prep = desc["preprocessing"]
    mean = np.array(prep["mean"], np.float32).reshape(-1, 1, 1)
    std = np.array(prep["std"], np.float32).reshape(-1, 1, 1)

    def load(path):
        img = Image.open(path).convert(prep["color"])
        if img.size != (prep["width"], prep["height"]):
            img = img.resize((prep["width"], prep["height"]), Image.Resampling.BOX)
        a = np.asarray(img, np.float32) / prep["pixel_scale"]
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return (a - mean) / std

    session = ort.InferenceSession(f"{folder}/{desc['file']}", providers=["CPUExecutionProvider"])
    batch = np.stack([load(p) for p in images])
    name = desc["inputs"][0]["name"]
    labels = [desc["labels"][i] for i in session.run(None, {name: batch})[0].argmax(1)]
    ones = [desc["labels"][session.run(None, {name: batch[i:i + 1]})[0].argmax()] for i in range(len(batch))]
    assert labels == ones
    print(json.dumps(labels))
''')


def test_the_export_folder_works_without_dlkit(tmp_path, trained):
    root, _, labels, exported, pixels = trained
    folder = write_pngs(tmp_path / "png", pixels[:7], "RGB")
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    done = subprocess.run([sys.executable, str(script), str(exported), *sorted(map(str, folder.iterdir()))],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [str(i) for i in labels[:7]]  # batch 7 and batch 1 agree


def test_compare_times_onnx_runtime_beside_pytorch(tmp_path, trained):
    import shutil

    from dlkit.compare import CompareOptions, compare_artifacts
    from dlkit.errors import ArtifactError

    root, _, _, exported, _ = trained
    res = compare_artifacts([root / "mlp", exported], CompareOptions(batches=(1, 8), rounds=2))
    torch_row, ort_row = res.rows
    assert (torch_row.runtime, ort_row.runtime, ort_row.step) == ("torch", "onnxruntime", "export")
    assert ort_row.accuracy == torch_row.accuracy and ort_row.macs == torch_row.macs > 0
    assert ort_row.size_bytes == (exported / "model.onnx").stat().st_size
    assert all(ms > 0 for ms in ort_row.latency_ms.values()) and ort_row.ratios["speedup_b8"] > 0
    static = export_artifact(root / "mlp", ExportOptions(out=tmp_path / "int8", quantize="static", calib_samples=256))
    assert static.quantization["format"] == "QDQ" and static.tolerance is None and static.agreement >= 0.9
    assert json.loads((static.path / "export.json").read_text())["quantization"]["calibration_samples"] == 256
    res = compare_artifacts([root / "mlp", static.path], CompareOptions(batches=(1,), rounds=1))
    assert res.rows[1].step == "export int8-static" and abs(res.rows[1].accuracy - res.rows[0].accuracy) < 0.03
    predicted = run("predict", static.path, tmp_path / "nothing-here.png")
    assert predicted.exit_code == 1 and "no such file" in predicted.stderr  # the int8 folder loads in predict
    moved = tmp_path / "moved"
    shutil.copytree(exported, moved)
    doc = json.loads((moved / "export.json").read_text())
    doc["source"]["artifact"] = str(tmp_path / "gone")
    (moved / "export.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="compare needs the artifact"):
        compare_artifacts([moved])
