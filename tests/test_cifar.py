"""CIFAR-10 in its official binary format: folders, the archive read in place, downloads."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dlkit.data import cifar, load_dataset, sources
from dlkit.data.cifar import BIN_FILES, CLASSES, FOLDER, RECORD, parse_batch, write_batch
from dlkit.data.sources import RemoteFile
from dlkit.errors import DataError
from tests.test_download import Server


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("DLKIT_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])


def write_cifar(folder: Path, per_batch: int = 10, seed: int = 0) -> Path:
    """``cifar-10-batches-bin/`` with five training batches, the test batch and the meta file."""
    d = folder / FOLDER
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(BIN_FILES):
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        write_batch(d / name, images, (np.arange(per_batch) + i) % 10)
    (d / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return d


def archive_bytes(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder / FOLDER, arcname=FOLDER)
    return buf.getvalue()


def test_record_layout():
    # one record: label 3, then the red plane, the green plane, the blue plane (row-major each)
    pixels = np.arange(3 * 1024, dtype=np.int64) % 251
    record = bytes([3]) + pixels.astype(np.uint8).tobytes()
    x, y = parse_batch(record * 2, "mem")
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [3, 3]
    assert x[0, 0, 0, 1] == pixels[1] and x[0, 0, 1, 0] == pixels[32]
    assert x[0, 1, 0, 0] == pixels[1024] and x[0, 2, 31, 31] == pixels[3071]


def test_bad_batches():
    with pytest.raises(DataError, match=f"not a whole number of {RECORD}-byte"):
        parse_batch(b"\x00" * (RECORD + 5), "x.bin")
    with pytest.raises(DataError, match="record 1 has label 12"):
        parse_batch(bytes([1]) + b"\x00" * 3072 + bytes([12]) + b"\x00" * 3072, "x.bin")


def test_load_from_folder_and_from_archive_in_place(tmp_path):
    write_cifar(tmp_path / "d1")
    b = load_dataset("cifar10", data_dir=tmp_path / "d1", val_fraction=0.2)
    assert b.spec.input_shape == (3, 32, 32) and b.spec.class_names[0] == "airplane"
    assert len(b.train[0]) + len(b.val[0]) == 50 and len(b.test[0]) == 10 and len(b.val[0]) == 10
    assert b.test[1].tolist() == [(i + 5) % 10 for i in range(10)]
    assert "data-dir" in b.source
    # the same data as the archive, read without extracting anything
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "cifar-10-binary.tar.gz").write_bytes(archive_bytes(tmp_path / "d1"))
    a = load_dataset("cifar10", data_dir=tmp_path / "d2", val_fraction=0.2)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[0], b.test[0])
    assert a.state == b.state and list((tmp_path / "d2").iterdir()) == [tmp_path / "d2" / "cifar-10-binary.tar.gz"]
    # normalized per channel with the training split's statistics
    raw = np.fromfile(tmp_path / "d1" / FOLDER / "test_batch.bin", dtype=np.uint8).reshape(-1, RECORD)
    first = torch.from_numpy(raw[0, 1:].reshape(3, 32, 32).astype(np.float32))
    mean = torch.tensor(b.state["mean"]).view(3, 1, 1)
    std = torch.tensor(b.state["std"]).view(3, 1, 1)
    torch.testing.assert_close(b.test[0][0], (first / 255 - mean) / std, atol=1e-5, rtol=1e-5)


def test_download_verify_and_offline_reuse(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src", per_batch=4)
    blob = archive_bytes(tmp_path / "src")
    good = replace(cifar.CIFAR10, files=(RemoteFile(cifar.ARCHIVE, "md5:" + hashlib.md5(blob).hexdigest(),
                                                    remote=cifar.ARCHIVE),))
    with Server({"/kriz/cifar-10-binary.tar.gz": blob}) as srv:
        monkeypatch.setattr(cifar, "CIFAR10", replace(cifar.CIFAR10, mirrors=(f"{srv.url}/kriz/",)))
        with pytest.raises(DataError, match="checksum mismatch") as info:  # the real MD5 does not match
            load_dataset("cifar10")
        assert "c32a1d4ab5d03f1284b67883e8d87530" in info.value.message
        assert not list((tmp_path / "cache" / "cifar10").iterdir())
        monkeypatch.setattr(cifar, "CIFAR10", replace(good, mirrors=(f"{srv.url}/kriz/",)))
        b = load_dataset("cifar10", val_fraction=0)
    assert len(b.train[0]) == 20 and len(b.test[0]) == 4 and "downloaded" in b.source
    assert (tmp_path / "cache" / "cifar10" / "cifar-10-binary.tar.gz").read_bytes() == blob
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    again = load_dataset("cifar10", val_fraction=0)
    assert torch.equal(again.train[0], b.train[0]) and "cache" in again.source


def test_not_found_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    with pytest.raises(DataError, match="dataset 'cifar10' not found") as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "cifar-10-batches-bin" in info.value.hint and "DLKIT_OFFLINE" in info.value.hint


def test_train_cnn_on_cifar_files(tmp_path):
    from dlkit.api import EvaluateOptions, TrainRequest, evaluate_artifact, train_model

    write_cifar(tmp_path / "d", per_batch=8)
    res = train_model(TrainRequest(model="cnn", dataset="cifar10", data_dir=str(tmp_path / "d"), device="cpu",
                                   out=tmp_path / "art", options={"epochs": 1, "batch_size": 16}))
    assert res.manifest["data"]["spec"]["input_shape"] == [3, 32, 32] and res.test.samples == 8
    ev = evaluate_artifact(res.artifact, EvaluateOptions(data_dir=str(tmp_path / "d"), device="cpu"))
    assert ev.result.accuracy == pytest.approx(res.test.accuracy)
