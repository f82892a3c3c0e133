"""Image datasets: the bundled 8x8 digits, MNIST and Fashion-MNIST.

digits
    scikit-learn's bundled copy of the UCI 8x8 handwritten digits (1797 images, values 0..16,
    scaled here to 0..1 floats). It has no official split, so dlkit makes one: for each class,
    ``numpy.random.RandomState(0)`` permutes that class's indices (in dataset order) and the first
    ``round(0.2 * n_class)`` go to test, the rest to train. The result is a stratified 80/20 split
    (1438 train, 359 test) that is the same on every machine and numpy version.

mnist, fashion-mnist
    The four IDX files (gzipped or not) found through ``dlkit.data.sources``. Downloads are
    verified against the MD5s of the files the mirrors publish (the ones torchvision checks).
    For Fashion-MNIST the SHA-256 of each file's decompressed content is also known; a local copy
    whose content differs is used but logged as a warning. Debian's ``dataset-fashion-mnist``
    package ships the same content with rewritten gzip headers (no file name, another mtime), so
    its ``.gz`` files have other MD5s than the published ones while the content is identical:
    putting the file name and the original mtime (2017-08-31) back into the Debian files' headers
    reproduces the four published MD5s exactly.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

from dlkit.data import sources
from dlkit.data.registry import DatasetEntry, RawData, register_dataset
from dlkit.data.sources import FileSet, RemoteFile
from dlkit.data.splits import stratified_test_mask
from dlkit.errors import DataError
from dlkit.spec import IMAGE, DataSpec

log = logging.getLogger("dlkit")

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

MNIST = FileSet(
    name="mnist",
    files=(
        RemoteFile(IDX_NAMES[0], "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        RemoteFile(IDX_NAMES[1], "md5:d53e105ee54ea40749a09fcbcd1e9432"),
        RemoteFile(IDX_NAMES[2], "md5:9fb629c4189551a2d022fa330f9573f3"),
        RemoteFile(IDX_NAMES[3], "md5:ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
)

FASHION_MNIST = FileSet(
    name="fashion-mnist",
    files=(
        RemoteFile(IDX_NAMES[0], "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                   content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        RemoteFile(IDX_NAMES[1], "md5:25c81989df183df01b3e8a0aad5dffbe",
                   content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        RemoteFile(IDX_NAMES[2], "md5:bef4ecab320f06d8554ea6380940ec79",
                   content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        RemoteFile(IDX_NAMES[3], "md5:bb300cfdad3c16e7a12a480ee83cd310",
                   content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    hint="on Debian/Ubuntu `apt install dataset-fashion-mnist`",
)

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# ---------------------------------------------------------------------------------------------
# digits


def _fetch_digits(data_dir=None, *, download: bool = True, progress=None) -> RawData:
    import numpy as np
    import torch

    # scikit-learn ships the set as a CSV (64 pixel columns, then the label). Reading that file
    # directly gives exactly what sklearn.datasets.load_digits returns, without importing
    # scikit-learn (3 s here); tests/test_data.py checks the two agree.
    table = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 8, 8) / 16.0  # (1797, 8, 8), 0..1
    labels = table[:, -1].astype(np.int64)
    test = stratified_test_mask(labels)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    t = torch.from_numpy(test)
    return RawData(x[~t], y[~t], x[t], y[t], source="scikit-learn (bundled)")


def _digits_csv() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    raise DataError("the digits set comes with scikit-learn, which is not installed",
                    hint="pip install scikit-learn")


def _locate_digits(data_dir: Path | None = None) -> str | None:
    try:
        _digits_csv()
    except Exception:  # noqa: BLE001 - not installed means not found
        return None
    return "scikit-learn (bundled)"


# ---------------------------------------------------------------------------------------------
# IDX datasets


def _read(path: Path, rf: RemoteFile, dataset: str):
    from dlkit.data.idx import parse_idx, read_idx_bytes

    data = read_idx_bytes(path)
    if rf.content_sha256 and hashlib.sha256(data).hexdigest() != rf.content_sha256:
        log.warning("%s differs from the published %s file %s; using it anyway",
                    path, dataset, rf.name)
    return parse_idx(data, str(path))


def load_idx_dataset(fileset: FileSet, spec: DataSpec, data_dir=None, *, download: bool = True,
                     progress=None) -> RawData:
    """Find (or download) an MNIST-like set's four IDX files and check them against ``spec``."""
    import torch

    found = sources.fetch(fileset, data_dir, download=download, progress=progress)
    arrays = {rf.name: _read(found.paths[rf.name], rf, fileset.name) for rf in fileset.files}
    x_train, y_train, x_test, y_test = (arrays[n] for n in IDX_NAMES)
    c, h, w = spec.input_shape
    for xn, yn in ((IDX_NAMES[0], IDX_NAMES[1]), (IDX_NAMES[2], IDX_NAMES[3])):
        x, y = arrays[xn], arrays[yn]
        where = found.paths[xn].parent
        if x.ndim != 3 or x.shape[1:] != (h, w):
            raise DataError(f"{found.paths[xn]} holds images of shape {x.shape[1:]}, "
                            f"expected {h}x{w}", hint="is this the right dataset?")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{where}: {len(x)} images but labels of shape {tuple(y.shape)}",
                            hint="the image and label files do not belong together")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(f"{found.paths[yn]} has labels outside 0..{spec.num_classes - 1}",
                            hint="is this the right dataset?")

    def images(a):
        return torch.from_numpy(a).unsqueeze(1)  # (N, 1, H, W), dtype as stored (uint8)

    def labels(a):
        return torch.from_numpy(a).to(torch.int64)

    return RawData(images(x_train), labels(y_train), images(x_test), labels(y_test),
                   source=found.describe())


def _idx_entry(name: str, fileset: Callable[[], FileSet], spec: DataSpec, description: str,
               augment: str | None = None) -> DatasetEntry:
    # ``fileset`` is called each time, so tests can monkeypatch the module's MNIST and its mirrors.
    def fetch(data_dir=None, *, download: bool = True, progress=None) -> RawData:
        return load_idx_dataset(fileset(), spec, data_dir, download=download, progress=progress)

    def locate(data_dir: Path | None = None) -> str | None:
        found = sources.locate(fileset(), data_dir)
        return found.describe() if found else None

    return DatasetEntry(name=name, spec=spec, description=description, fetch=fetch,
                        locate=locate, augment=augment)


DIGITS_SPEC = DataSpec(IMAGE, (1, 8, 8), 10, class_names=tuple(str(i) for i in range(10)))
MNIST_SPEC = DataSpec(IMAGE, (1, 28, 28), 10, class_names=tuple(str(i) for i in range(10)))
FASHION_SPEC = DataSpec(IMAGE, (1, 28, 28), 10, class_names=FASHION_CLASSES)

register_dataset(DatasetEntry(
    name="digits", spec=DIGITS_SPEC,
    description="8x8 handwritten digits bundled with scikit-learn (1438 train / 359 test)",
    fetch=_fetch_digits, locate=_locate_digits,
    # 1294 training samples: batches of 128 would give ~10 steps an epoch.
    train_defaults={"batch_size": 32, "epochs": 30},
))
register_dataset(_idx_entry(
    "mnist", lambda: MNIST, MNIST_SPEC, "28x28 handwritten digits (60000 train / 10000 test)",
))
register_dataset(_idx_entry(
    "fashion-mnist", lambda: FASHION_MNIST, FASHION_SPEC,
    "28x28 Zalando clothing images (60000 train / 10000 test)", augment="hflip",
))
