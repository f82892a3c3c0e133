"""CIFAR-10 from the official binary version (``cifar-10-binary.tar.gz``), never the pickled one.

The archive holds ``cifar-10-batches-bin/`` with ``data_batch_1.bin`` .. ``data_batch_5.bin``
(training), ``test_batch.bin`` and ``batches.meta.txt`` (the class names, one per line). Each
``.bin`` file is a sequence of 3073-byte records: one label byte (0..9), then the 32x32 image
as 1024 red, 1024 green and 1024 blue bytes, each plane row-major. So a whole file decodes with
one ``np.frombuffer(...).reshape(-1, 3073)``: column 0 is the label, the rest reshapes to
``(3, 32, 32)`` directly.

Looked up in the usual order (``--data-dir``, the cache, system folders; see
``dlkit.data.sources``). In each folder, the six ``.bin`` files count (directly there or in a
``cifar-10-batches-bin/`` subfolder), and so does the archive itself, which is read in place
without extracting anything. When nothing is found, the archive is downloaded into the cache
(resumable, MD5 verified: ``c32a1d4ab5d03f1284b67883e8d87530``, the sum the dataset's page
publishes). A local archive with another MD5 is used with a logged warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dlkit.data import sources
from dlkit.data.archive import read_members
from dlkit.data.download import verify
from dlkit.data.registry import DatasetEntry, RawData, register_dataset
from dlkit.data.sources import FileSet, RemoteFile
from dlkit.errors import DataError
from dlkit.spec import IMAGE, DataSpec

log = logging.getLogger("dlkit")

ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
BIN_FILES = TRAIN_FILES + (TEST_FILE,)
RECORD = 1 + 3 * 32 * 32
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10 = FileSet(
    name="cifar10",
    files=(RemoteFile(ARCHIVE, "md5:c32a1d4ab5d03f1284b67883e8d87530", remote=ARCHIVE),),
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    hint=f"or pass --data-dir with the extracted {FOLDER}/ folder",
)

SPEC = DataSpec(IMAGE, (3, 32, 32), 10, class_names=CLASSES)
_HINT = "the file is damaged or not from the binary CIFAR-10 version; delete it to fetch it again"


def parse_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``.bin`` file's bytes -> uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    if len(data) == 0 or len(data) % RECORD:
        raise DataError(f"{name} holds {len(data)} bytes, not a whole number of {RECORD}-byte "
                        "CIFAR-10 records", hint=_HINT)
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        bad = int(np.argmax(labels >= len(CLASSES)))
        raise DataError(f"{name}: record {bad} has label {labels[bad]}, outside 0..9", hint=_HINT)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _folder_files(folder: Path) -> dict[str, Path] | None:
    """The six ``.bin`` files in ``folder`` or ``folder/cifar-10-batches-bin``; None if incomplete."""
    for d in (folder, folder / FOLDER):
        paths = {n: d / n for n in BIN_FILES}
        if all(p.is_file() for p in paths.values()):
            return paths
    return None


def find(data_dir: Path | None = None) -> tuple[str, Path, dict[str, Path] | None] | None:
    """The first place holding CIFAR-10: ``(kind, archive_or_folder, bin_paths_or_None)``."""
    for kind, folder in sources.candidates(CIFAR10.name, data_dir):
        if not folder.is_dir():
            continue
        files = _folder_files(folder)
        if files is not None:
            return kind, files[TEST_FILE].parent, files
        if (folder / ARCHIVE).is_file():
            return kind, folder / ARCHIVE, None
    return None


def _locate(data_dir: Path | None = None) -> str | None:
    hit = find(Path(data_dir) if data_dir is not None else None)
    return f"{hit[1]} ({hit[0]})" if hit else None


def _read_archive(path: Path) -> dict[str, bytes]:
    ok, actual = verify(path, CIFAR10.files[0].checksum)
    if not ok:
        log.warning("%s has %s, not the published %s; using it anyway",
                    path, actual, CIFAR10.files[0].checksum)
    return read_members(path, {f"{FOLDER}/{n}": n for n in BIN_FILES})


def _read_files(paths: dict[str, Path]) -> dict[str, bytes]:
    out = {}
    for name, p in paths.items():
        try:
            out[name] = p.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read {p}: {err.strerror or err}") from None
    return out


def fetch(data_dir=None, *, download: bool = True, progress=None) -> RawData:
    import torch

    data_dir = Path(data_dir) if data_dir is not None else None
    hit = find(data_dir)
    if hit is None:  # not anywhere: download the archive into the cache (or explain why not)
        found = sources.fetch(CIFAR10, data_dir, download=download, progress=progress)
        hit = (found.kind, found.paths[ARCHIVE], None)
    kind, where, files = hit
    if data_dir is not None and kind not in ("data-dir", "download"):
        log.warning("cifar10 is not in --data-dir %s; using %s", data_dir, where)
    blobs = _read_files(files) if files is not None else _read_archive(where)
    xs, ys = [], []
    for name in TRAIN_FILES:
        x, y = parse_batch(blobs[name], str(files[name] if files else f"{where}:{name}"))
        xs.append(x)
        ys.append(y)
    x_test, y_test = parse_batch(blobs[TEST_FILE], str(files[TEST_FILE] if files else f"{where}:{TEST_FILE}"))
    source = f"{where} ({'downloaded' if kind == 'download' else kind})"
    return RawData(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                   torch.from_numpy(x_test.copy()), torch.from_numpy(y_test), source=source)


def write_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write uint8 images ``(N, 3, 32, 32)`` and labels as a binary CIFAR-10 batch file."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1, 1)
    path = Path(path)
    path.write_bytes(np.concatenate([labels, images], axis=1).tobytes())
    return path


register_dataset(DatasetEntry(
    name="cifar10", spec=SPEC,
    description="32x32 colour images of 10 classes, official binary version (50000 train / 10000 test)",
    fetch=fetch, locate=_locate, augment="hflip",
))
