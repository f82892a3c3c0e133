"""Datasets: the IDX format, the lookup order, and load_dataset on small real-format files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlkit.data import DATASETS, DataBundle, dataset_names, load_dataset, locate_dataset, sources
from dlkit.data.idx import read_idx, write_idx
from dlkit.data.vision import IDX_NAMES
from dlkit.errors import DataError, NotFoundError, UsageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test away from the real cache and system folders."""
    monkeypatch.setenv("DLKIT_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("DLKIT_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])


def write_mnist(folder: Path, n_train: int = 50, n_test: int = 20, *, gz: bool = True,
                seed: int = 0, skip: str | None = None) -> Path:
    """Write the four MNIST IDX files with random 28x28 images and labels 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        if name != skip:
            write_idx(folder / (name + (".gz" if gz else "")), arr)
    return folder


# --- IDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    path = write_idx(tmp_path / f"a-idx3{suffix}", arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    t = read_idx(path)
    assert t.shape == (2, 3, 4)
    assert t.dtype == torch.from_numpy(arr).dtype
    assert np.array_equal(t.numpy(), arr)


def test_idx_header_layout(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([7, 1], dtype=np.uint8))
    assert path.read_bytes() == b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02" + b"\x07\x01"


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="bad-idx1-ubyte.*not an IDX file"):
        read_idx(path)


def test_idx_bad_type_code(tmp_path):
    path = tmp_path / "code"
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="type code 0x07"):
        read_idx(path)


def test_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "imgs-idx3-ubyte", np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"imgs-idx3-ubyte is truncated: shape 4x5x5 needs 100"):
        read_idx(path)


def test_idx_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "imgs.gz", np.arange(1000, dtype=np.uint8).reshape(10, 100))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"imgs.gz is a truncated gzip file"):
        read_idx(path)


def test_idx_corrupted_gzip(tmp_path):
    raw = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x03abc")
    path = tmp_path / "c.gz"
    path.write_bytes(raw[:-8] + b"\x00\x00\x00\x00" + raw[-4:])  # wrong CRC
    with pytest.raises(DataError, match="c.gz is not a valid gzip file"):
        read_idx(path)


# --- lookup order ------------------------------------------------------------------------------


def test_lookup_order(tmp_path):
    entry = DATASETS.get("mnist")
    data_dir = tmp_path / "mine"
    cache, system = tmp_path / "cache" / "mnist", tmp_path / "system" / "mnist"
    assert entry.locate(data_dir) is None

    write_mnist(system)
    assert entry.locate(data_dir) == f"{system} (system)"
    write_mnist(cache, gz=False)
    assert entry.locate(data_dir) == f"{cache} (cache)"
    write_mnist(data_dir / "mnist")
    assert entry.locate(data_dir) == f"{data_dir / 'mnist'} (data-dir)"
    write_mnist(data_dir)  # the files directly in --data-dir come first
    assert locate_dataset("mnist", data_dir) == f"{data_dir} (data-dir)"
    # Without --data-dir the cache wins.
    assert locate_dataset("mnist") == f"{cache} (cache)"


def test_incomplete_folders_are_skipped(tmp_path):
    write_mnist(tmp_path / "mine", skip=IDX_NAMES[3])
    write_mnist(tmp_path / "cache" / "mnist", skip=IDX_NAMES[0])
    write_mnist(tmp_path / "system" / "mnist")
    found = sources.locate(sources_fileset(), tmp_path / "mine")
    assert found.kind == "system" and set(found.paths) == set(IDX_NAMES)


def test_gzipped_and_raw_files_mix(tmp_path):
    folder = write_mnist(tmp_path / "mine", skip=IDX_NAMES[1])
    write_idx(folder / IDX_NAMES[1], (np.arange(50) % 10).astype(np.uint8))  # raw, not .gz
    found = sources.locate(sources_fileset(), folder)
    assert found.kind == "data-dir"
    assert found.paths[IDX_NAMES[1]].name == IDX_NAMES[1]
    assert found.paths[IDX_NAMES[0]].name == IDX_NAMES[0] + ".gz"


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DLKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_dir("mnist") == tmp_path / "xdg" / "dlkit" / "data" / "mnist"


def test_not_found_offline_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    write_mnist(tmp_path / "mine", skip=IDX_NAMES[2])
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path / "mine")
    err = info.value
    msg = str(err)
    assert "\n" not in err.message
    assert f"{tmp_path / 'mine'} (data-dir: missing t10k-images-idx3-ubyte[.gz])" in msg
    assert f"{tmp_path / 'cache' / 'mnist'} (cache: no such folder)" in msg
    assert f"{tmp_path / 'system' / 'mnist'} (system: no such folder)" in msg
    assert "download disabled (DLKIT_OFFLINE=1)" in msg
    assert "--data-dir" in err.hint and "DLKIT_OFFLINE" in err.hint
    assert len(err.tried) == 5


def test_fashion_hint_names_the_debian_package(monkeypatch):
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", download=False)
    assert "apt install dataset-fashion-mnist" in info.value.hint
    assert "download disabled (download=False)" in info.value.message


def test_corrupted_file_names_the_file(tmp_path):
    folder = write_mnist(tmp_path / "mine")
    path = folder / (IDX_NAMES[2] + ".gz")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=str(path)):
        load_dataset("mnist", data_dir=folder)


def test_labels_out_of_range(tmp_path):
    folder = write_mnist(tmp_path / "mine")
    write_idx(folder / (IDX_NAMES[3] + ".gz"), np.full(20, 12, np.uint8))
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_dataset("mnist", data_dir=folder)


def sources_fileset():
    from dlkit.data import vision

    return vision.MNIST


# --- load_dataset ------------------------------------------------------------------------------


def test_load_mnist_from_data_dir(tmp_path):
    folder = write_mnist(tmp_path / "mine", n_train=50, n_test=20)
    b = load_dataset("mnist", data_dir=folder, val_fraction=0.2, seed=3)
    assert isinstance(b, DataBundle) and b.name == "mnist"
    assert b.spec.input_shape == (1, 28, 28) and b.spec.class_names == tuple("0123456789")
    assert b.train[0].shape == (40, 1, 28, 28) and b.val[0].shape == (10, 1, 28, 28)
    assert b.test[0].shape == (20, 1, 28, 28)
    for x, y in (b.train, b.val, b.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y)
    assert b.source == f"{folder} (data-dir)"

    # Normalized with the statistics of the whole training split.
    full = torch.cat([b.train[0], b.val[0]])
    assert abs(full.mean().item()) < 1e-4 and abs(full.std(unbiased=False).item() - 1) < 1e-4
    raw = read_idx(folder / (IDX_NAMES[0] + ".gz")).float() / 255
    assert b.state["mean"][0] == pytest.approx(raw.mean().item(), rel=1e-5)
    assert b.state["std"][0] == pytest.approx(raw.std(unbiased=False).item(), rel=1e-5)

    # The test split is untouched: same order, same labels.
    assert torch.equal(b.test[1], torch.arange(20) % 10)
    # Train and val partition the training set, each in the original order.
    labels = torch.cat([b.train[1], b.val[1]]).sort().values
    assert torch.equal(labels, (torch.arange(50) % 10).sort().values)


def test_val_split_depends_on_seed_only(tmp_path):
    folder = write_mnist(tmp_path / "mine")
    a = load_dataset("mnist", data_dir=folder, seed=1)
    b = load_dataset("mnist", data_dir=folder, seed=1)
    c = load_dataset("mnist", data_dir=folder, seed=2)
    assert len(a.val[0]) == 5 and len(a.train[0]) == 45
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.val[0], c.val[0])


def test_state_round_trip_is_exact(tmp_path):
    folder = write_mnist(tmp_path / "mine")
    a = load_dataset("mnist", data_dir=folder, val_fraction=0.3, seed=7)
    state = json.loads(json.dumps(a.state))  # what an artifact stores
    b = load_dataset("mnist", data_dir=folder, state=state)  # defaults overridden by the state
    assert b.state == a.state
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa[0], sb[0]) and torch.equal(sa[1], sb[1])
    # Different data normalized with the saved statistics, not its own.
    other = write_mnist(tmp_path / "other", seed=5)
    c = load_dataset("mnist", data_dir=other, state=state)
    assert c.state["mean"] == a.state["mean"]


def test_state_for_another_dataset_is_refused(tmp_path):
    folder = write_mnist(tmp_path / "mine")
    state = load_dataset("mnist", data_dir=folder).state
    with pytest.raises(UsageError, match="'mnist', not 'digits'"):
        load_dataset("digits", state=state)
    with pytest.raises(DataError, match="malformed"):
        load_dataset("mnist", data_dir=folder, state={"dataset": "mnist", "mean": [0.1]})


def test_val_fraction_zero_and_invalid(tmp_path):
    folder = write_mnist(tmp_path / "mine")
    b = load_dataset("mnist", data_dir=folder, val_fraction=0)
    assert b.val[0].shape == (0, 1, 28, 28) and b.val[1].shape == (0,)
    assert len(b.train[0]) == 50
    for bad in (1.0, -0.1, 1.5, "0.1", True):
        with pytest.raises(UsageError, match="val_fraction"):
            load_dataset("mnist", data_dir=folder, val_fraction=bad)


def test_unknown_dataset():
    with pytest.raises(NotFoundError, match="unknown dataset 'mnsit'") as info:
        load_dataset("mnsit")
    assert "'mnist'" in info.value.hint


def test_registry_entries():
    assert {"digits", "mnist", "fashion-mnist"} <= set(dataset_names())
    fm = DATASETS.get("fashion-mnist")
    assert fm.augment == "hflip" and fm.spec.class_names[0] == "T-shirt/top"
    assert fm.spec.class_names[-1] == "Ankle boot" and len(fm.spec.class_names) == 10


def test_digits_loads_offline(monkeypatch):
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    b = load_dataset("digits", val_fraction=0.1, seed=0)
    assert b.spec.input_shape == (1, 8, 8) and b.spec.num_classes == 10
    assert b.train[0].shape[1:] == (1, 8, 8)
    assert len(b.train[0]) + len(b.val[0]) == 1438 and len(b.test[0]) == 359
    assert b.source == "scikit-learn (bundled)"
    assert set(b.test[1].tolist()) == set(range(10))
    counts = torch.bincount(b.test[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~20% of each class
    again = load_dataset("digits", val_fraction=0.1, seed=0)
    assert torch.equal(again.test[0], b.test[0]) and torch.equal(again.train[0], b.train[0])


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason=f"{FASHION_DIR} absent (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_from_system_folder(monkeypatch, caplog):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [FASHION_DIR.parent])
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    b = load_dataset("fashion-mnist", val_fraction=0.1)
    assert b.source == f"{FASHION_DIR} (system)"
    assert len(b.train[0]) == 54000 and len(b.val[0]) == 6000
    assert b.test[0].shape == (10000, 1, 28, 28) and b.test[1].shape == (10000,)
    assert b.state["mean"][0] == pytest.approx(0.2860, abs=1e-4)  # the well-known statistics
    assert b.state["std"][0] == pytest.approx(0.3530, abs=1e-4)
    assert torch.equal(torch.bincount(b.test[1]), torch.full((10,), 1000))
    assert "differs from the published" not in caplog.text  # content matches the known SHA-256


def test_data_dir_without_the_files_falls_back_with_a_warning(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    cache = write_mnist(tmp_path / "cache" / "mnist")
    with caplog.at_level("WARNING", logger="dlkit"):
        b = load_dataset("mnist", data_dir=tmp_path / "empty")
    assert b.source == f"{cache} (cache)"
    assert f"mnist is not in --data-dir {tmp_path / 'empty'}; using {cache}" in caplog.text


def test_content_differing_from_the_published_set_is_logged(tmp_path, caplog):
    folder = write_mnist(tmp_path / "fake-fashion")
    with caplog.at_level("WARNING", logger="dlkit"):
        b = load_dataset("fashion-mnist", data_dir=folder)
    assert len(b.test[0]) == 20
    assert "differs from the published fashion-mnist file train-images-idx3-ubyte" in caplog.text


def test_digits_csv_matches_scikit_learn():
    import numpy as np
    from sklearn.datasets import load_digits

    from dlkit.data.splits import stratified_test_mask
    from dlkit.data.vision import _fetch_digits

    raw = _fetch_digits()
    bunch = load_digits()
    test = stratified_test_mask(bunch.target)
    assert torch.equal(raw.x_train, torch.from_numpy(bunch.images[~test].astype(np.float32) / 16.0).unsqueeze(1))
    assert torch.equal(raw.y_test, torch.from_numpy(bunch.target[test].astype(np.int64)))
