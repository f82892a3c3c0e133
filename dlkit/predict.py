"""Predictions on new inputs (``dlkit predict``): image files, arrays, text lines.

TARGET is an artifact (run by PyTorch, or with ``runtime="onnxruntime"`` exported to a temporary
ONNX file first) or an ONNX export folder written by ``dlkit export`` (run by ONNX Runtime). Both are prepared from the same description (``dlkit.export.preprocessing``,
kept in ``export.json``), so one input gets the same tensor either way:

- image files (PNG, JPEG, ... anything Pillow decodes): turned upright by their EXIF orientation,
  converted to the model's channels (Pillow ``L`` or ``RGB``), resized to its size with Pillow's
  box filter (area averaging: exact for whole-number reductions) when the size differs, then
  normalised as training data was (``dlkit.data.normalize`` with scale 255 and the training
  split's mean and std);
- ``.npy`` / ``.npz`` arrays, one sample (``(C, H, W)``, ``(H, W)`` for one channel, ``(L,)``
  for text) or a batch of them: uint8 arrays are 8-bit pixels (normalised as above, no resizing),
  float arrays are taken as the model's input as they are (already normalised), integer arrays
  of a text model are token ids;
- text (a text model): every non-empty line of a file is one example; ``-`` reads lines on
  stdin (for an image model, ``-`` reads file names, one a line);
- a folder: its files (not recursive) with a known suffix, in name order.

An input that cannot be read or decoded is reported through ``observer.on_failure`` and skipped
(or, with ``strict``, stops the run with a ``DataError``); the result lists the failures.

``read_inputs`` is the one reader of these inputs; ``dlkit explain --input`` uses it too.
"""

from __future__ import annotations

import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dlkit.choices import PREDICT_RUNTIMES
from dlkit.errors import ArtifactError, DataError, DlkitError, UsageError

log = logging.getLogger("dlkit")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ARRAY_SUFFIXES = (".npy", ".npz")
TEXT_SUFFIXES = (".txt",)


class InputsFailed(DlkitError):
    """Some inputs could not be read; the others were predicted."""


@dataclass
class PredictOptions:
    top_k: int = 3
    batch_size: int = 64
    runtime: str | None = None  # None: torch for an artifact, onnxruntime for an export folder
    strict: bool = False

    def validate(self) -> "PredictOptions":
        if self.top_k < 1:
            raise UsageError(f"--top-k must be >= 1 (got {self.top_k})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.runtime is not None and self.runtime not in PREDICT_RUNTIMES:
            raise UsageError(f"unknown runtime '{self.runtime}'", hint=f"use one of {', '.join(PREDICT_RUNTIMES)}")
        return self


@dataclass
class Prediction:
    input: str
    label: str
    index: int
    probability: float
    top_k: list[dict]

    def to_dict(self) -> dict:
        return {"input": self.input, "label": self.label, "index": self.index, "probability": self.probability,
                "top_k": self.top_k}


@dataclass
class PredictResult:
    target: Path
    runtime: str
    model: str
    predictions: list[Prediction] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"input", "error"}
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"target": str(self.target), "runtime": self.runtime, "model": self.model,
                "predictions": [p.to_dict() for p in self.predictions], "failures": self.failures,
                "seconds": self.seconds}


# ------------------------------------------------------------------------------------ the target


@dataclass
class Target:
    """A model ready to run on prepared inputs: ``run(batch) -> logits`` (numpy in, numpy out)."""

    path: Path
    model: str
    runtime: str
    prep: dict  # dlkit.export.preprocessing: how raw inputs become the model's input
    labels: list[str]
    run: Callable[[np.ndarray], np.ndarray]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample as the model takes it: (C, H, W), or (max_len,) token ids."""
        return _input_shape(self.prep)


def _input_shape(prep: dict) -> tuple[int, ...]:
    if prep["modality"] == "text":
        return (int(prep["tokenizer"]["max_len"]),)
    return (int(prep["channels"]), int(prep["height"]), int(prep["width"]))


def load_target(path: Path | str, runtime: str | None) -> Target:
    from dlkit import export

    path = Path(path)
    if (path / export.EXPORT_FILE).is_file():
        return _export_target(path, export.read_export(path), runtime)
    if runtime == "onnxruntime":
        return _exported_now(path)
    return _artifact_target(path)


def _exported_now(path: Path) -> Target:
    """An artifact run by ONNX Runtime: exported (and checked, as ``dlkit export`` does) to a
    temporary folder, which is removed once ONNX Runtime has read the model into memory."""
    import tempfile

    from dlkit import export

    with tempfile.TemporaryDirectory(prefix="dlkit-predict-") as tmp:
        folder = export.export_artifact(path, export.ExportOptions(out=Path(tmp) / "export", samples=8)).path
        target = _export_target(folder, export.read_export(folder), "onnxruntime")
    target.path = path
    return target


def _export_target(path: Path, doc: dict, runtime: str | None) -> Target:
    from dlkit.export import onnx_session

    if doc["model_format"] != "onnx":
        raise UsageError(f"{path} holds a {doc['model_format']} export; dlkit predict loads only ONNX exports "
                         "(a graph and tensors, no code)",
                         hint="predict on the artifact, or on a folder from dlkit export --format onnx")
    if runtime == "torch":
        raise UsageError(f"{path} is an ONNX export, which runs with --runtime onnxruntime",
                         hint="drop --runtime, or pass the artifact to run it with PyTorch")
    file = path / doc["file"]
    try:
        session = onnx_session(file)
    except DlkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for unreadable models
        raise ArtifactError(f"{file} cannot be loaded by ONNX Runtime: {str(exc).splitlines()[0][:200]}",
                            hint="export the artifact again") from None
    name = doc["inputs"][0]["name"]
    return Target(path, doc["model"]["name"], "onnxruntime", doc["preprocessing"], [str(x) for x in doc["labels"]],
                  lambda x: np.asarray(session.run(None, {name: x})[0]))


def _artifact_target(path: Path) -> Target:
    import torch

    from dlkit import artifacts
    from dlkit.device import prepare_inference
    from dlkit.engine.evaluate import predict_logits
    from dlkit.export import labels, preprocessing

    art = artifacts.read_artifact(path)
    model = artifacts.load_model(art)
    cpu = torch.device("cpu")  # predictions on a few files: the CPU, where every artifact runs (int8 too)
    channels_last = prepare_inference(model, cpu, art.spec.input_shape)

    def run(x: np.ndarray) -> np.ndarray:
        return predict_logits(model, torch.from_numpy(x), batch_size=len(x), device=cpu, precision=art.precision,
                              channels_last=channels_last).numpy()

    return Target(path, art.model_name, "torch", preprocessing(art), labels(art), run)


# ------------------------------------------------------------------------------------ the inputs


class _Unreadable(Exception):
    """An input that cannot be read or decoded (its name and why)."""


def _read_image(path: Path, prep: dict) -> np.ndarray:
    """8-bit pixels ``(C, H, W)`` in the model's channels and size."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img).convert(prep["color"])  # photos: upright as their camera says
            size = (prep["width"], prep["height"])
            if img.size != size:
                img = img.resize(size, Image.Resampling.BOX)
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise _Unreadable(f"not an image Pillow can decode ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged files
        raise _Unreadable(f"cannot decode the image ({str(exc).splitlines()[0][:120] or type(exc).__name__})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _prepare_pixels(pixels: np.ndarray, prep: dict) -> np.ndarray:
    """8-bit pixels ``(C, H, W)`` -> the model's input, exactly as training normalised uint8 data."""
    import torch

    from dlkit.data import normalize

    x = torch.from_numpy(np.array(pixels, dtype=np.uint8))[None]
    return normalize(x, prep["pixel_scale"], prep["mean"], prep["std"])[0].numpy()


def _array_samples(name: str, arr: np.ndarray, prep: dict) -> Iterator[tuple[str, np.ndarray]]:
    """One sample or a batch of them from an array, prepared for the model."""
    shape = _input_shape(prep)
    text = prep["modality"] == "text"
    if text:
        if not np.issubdtype(arr.dtype, np.integer):
            raise _Unreadable(f"a text model takes integer token ids, not {arr.dtype} values")
    elif arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise _Unreadable(f"an image model takes uint8 pixels or float (normalised) values, not {arr.dtype}")
    sample_ndim = len(shape)
    if not text and shape[0] == 1 and arr.ndim in (2, 3) and tuple(arr.shape[-2:]) == tuple(shape[1:]):
        arr = arr[None] if arr.ndim == 2 else arr[:, None]  # (H, W): one image; (N, H, W): N of one channel
    if tuple(arr.shape[-sample_ndim:]) != tuple(shape) or arr.ndim not in (sample_ndim, sample_ndim + 1):
        want = "x".join(map(str, shape))
        raise _Unreadable(f"holds an array of shape {tuple(arr.shape)}; the model takes {want} (or N x {want})")
    batch = arr[None] if arr.ndim == sample_ndim else arr
    for i, sample in enumerate(batch):
        sample_name = name if arr.ndim == sample_ndim else f"{name}[{i}]"
        if text:
            ids = sample.astype(np.int64)
            if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(prep["tokenizer"]["vocab"]):
                raise _Unreadable(f"{sample_name} holds token ids outside the vocabulary")
            yield sample_name, ids
        elif sample.dtype == np.uint8:
            yield sample_name, _prepare_pixels(sample, prep)
        else:
            yield sample_name, sample.astype(np.float32)


def _read_arrays(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return [(f"{path}:{key}", archive[key]) for key in archive.files]
        return [(str(path), np.load(path, allow_pickle=False))]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _Unreadable(f"not a readable numpy file ({str(exc).splitlines()[0][:120] or type(exc).__name__})") \
            from None


def _text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise _Unreadable("is not UTF-8 text") from None


def _tokenize(texts: list[str], prep: dict) -> np.ndarray:
    """Token ids as training made them (dlkit.data.tokenizer); a note says how many texts were cut."""
    from dlkit.data.tokenizer import Tokenizer, note_truncated

    tok = prep["tokenizer"]
    ids, truncated = Tokenizer.from_state({"name": tok["name"], "vocab": tok["vocab"],
                                           "max_len": tok["max_len"]}).encode(texts)
    note_truncated(truncated, len(texts), tok["max_len"])
    return ids


def _file_samples(path: Path, prep: dict) -> Iterator[tuple[str, np.ndarray]]:
    if not path.is_file():
        raise _Unreadable("no such file" if not path.exists() else "not a file")
    suffix = path.suffix.lower()
    try:
        if suffix in ARRAY_SUFFIXES:
            for name, arr in _read_arrays(path):
                yield from _array_samples(name, arr, prep)
        elif prep["modality"] == "text":
            numbered = [(i, line) for i, line in enumerate(_text_lines(path), 1) if line.strip()]
            ids = _tokenize([line for _, line in numbered], prep)
            for (i, _), row in zip(numbered, ids):
                yield f"{path}:{i}", row
        else:
            yield str(path), _prepare_pixels(_read_image(path, prep), prep)
    except OSError as exc:  # missing, unreadable, a folder where a file was expected
        raise _Unreadable(exc.strerror or type(exc).__name__) from None


def _files(arg: str, prep: dict) -> list[Path]:
    """The files an INPUT names: itself, or a folder's files with a known suffix."""
    path = Path(arg)
    if not path.is_dir():
        return [path]
    known = ARRAY_SUFFIXES + (TEXT_SUFFIXES if prep["modality"] == "text" else IMAGE_SUFFIXES)
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in known)


Item = tuple[str, np.ndarray | None, str | None]  # (name, prepared sample, or None and why not)


def read_inputs(inputs: list[str], prep: dict, stdin=None) -> Iterator[Item]:
    """Every sample the INPUTs hold, prepared by ``prep`` (``dlkit.export.preprocessing``) as the
    module docstring says, in order: ``(name, sample, None)``, or ``(name, None, why)`` for an input
    that cannot be read. Names are the file (``file:LINE`` for text lines, ``file[i]`` or
    ``file.npz:key`` for arrays, ``stdin:LINE``). Lazy: each input is read when it is reached."""
    import sys

    for arg in inputs:
        if arg == "-":
            stream = stdin or sys.stdin
            numbered = [(i, ln) for i, ln in enumerate(stream.read().splitlines(), 1) if ln.strip()]
            if prep["modality"] == "text":
                for (i, _), row in zip(numbered, _tokenize([ln for _, ln in numbered], prep)):
                    yield f"stdin:{i}", row, None
                continue
            names = [ln.strip() for _, ln in numbered]
        else:
            names = [arg]
        for name in names:
            for path in _files(name, prep):
                try:
                    for sample_name, sample in _file_samples(path, prep):
                        yield sample_name, sample, None
                except _Unreadable as exc:
                    yield str(path), None, str(exc)


def _predictions(names: list[str], logits: np.ndarray, labels: list[str], top_k: int) -> list[Prediction]:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    out = []
    for name, p in zip(names, probs):
        order = np.argsort(-p, kind="stable")[:top_k]
        top = [{"label": labels[i], "index": int(i), "probability": float(p[i])} for i in order]
        out.append(Prediction(name, top[0]["label"], top[0]["index"], top[0]["probability"], top))
    return out


def predict_inputs(target: Path | str, inputs: list[str], opts: PredictOptions | None = None, *,
                   observer: Any = None, stdin=None) -> PredictResult:
    """Predict every input; ``observer`` (optional) gets ``on_prediction(Prediction)`` as each batch
    finishes and ``on_failure(name, why)`` for each input that cannot be read."""
    opts = (opts or PredictOptions()).validate()
    if not inputs:
        raise UsageError("no inputs to predict", hint="pass image, .npy/.npz or text files, folders, or - for stdin")
    started = time.perf_counter()
    model = load_target(target, opts.runtime)
    result = PredictResult(Path(target), model.runtime, model.model)
    on_prediction = getattr(observer, "on_prediction", None)  # a recipe's progress bar watches training only
    on_failure = getattr(observer, "on_failure", None)
    names: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if not batch:
            return
        logits = model.run(np.stack(batch))
        for p in _predictions(names, logits, model.labels, opts.top_k):
            result.predictions.append(p)
            if on_prediction is not None:
                on_prediction(p)
        names.clear()
        batch.clear()

    for name, sample, why in read_inputs(inputs, model.prep, stdin):
        if sample is None:
            if opts.strict:
                raise DataError(f"cannot read {name}: {why}", hint="drop --strict to skip unreadable inputs")
            result.failures.append({"input": name, "error": why})
            if on_failure is not None:
                on_failure(name, why)
            continue
        names.append(name)
        batch.append(sample)
        if len(batch) >= opts.batch_size:
            flush()
    flush()
    result.seconds = time.perf_counter() - started
    return result


def check_failures(result: PredictResult) -> None:
    """Raise InputsFailed when some inputs could not be read (the exit status of ``dlkit predict``)."""
    if result.failures:
        first = result.failures[0]["input"]
        raise InputsFailed(f"{len(result.failures)} input(s) could not be read (first: {first}); "
                           f"{len(result.predictions)} predicted", hint="see the lines above")
