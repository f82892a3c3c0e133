"""Export an artifact to a self-contained folder other runtimes can load (``dlkit export``).

Formats:

- ``onnx``: ``torch.onnx.export`` with the dynamo exporter (``dynamo=True``), the batch axis
  dynamic and, for text, the sequence axis too (up to the trained length) where the model allows.
  When the dynamo exporter cannot take a model (statically quantized int8 modules, say), the
  TorchScript-based exporter is tried (batch axis dynamic) and a note says so. Models neither
  exporter takes get one ``IncompatibleError`` line naming what else to do.
- ``exported-program``: ``torch.export.export`` + ``torch.export.save`` (``model.pt2``).
- ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save`` (``model.torchscript.pt``).
- ``onnx --quantize static|dynamic``: the float ONNX model, once checked, replaced by ONNX Runtime's
  int8 version (``onnxruntime.quantization``: static QDQ with per-channel int8 weights and uint8
  activations calibrated on training samples, or dynamic). An int8 model is not held to a bound:
  its difference from PyTorch and the share of top labels it keeps are reported, and ``dlkit
  compare`` measures its accuracy and latency beside the artifact. (It is an export folder, not
  an artifact, which is why it lives here and not under ``dlkit quantize``.)

Every export is checked before anything is written: the exported model and the PyTorch model run
real samples of the artifact's data (its test split) at batch 1, 7 and all samples; the largest
absolute difference of the logits is reported, and one beyond the tolerance fails the export
(``ExportMismatch``). The folder holds the model file and ``export.json``
(:func:`describe`): inputs and outputs with a symbolic batch, the preprocessing (normalisation,
image size and channels; for text the tokenizer with its vocabulary), the label names and the
check's numbers, so ``dlkit predict`` or any other program can use it without dlkit's artifact.
It is written through ``dlkit.output`` like an artifact (locked, staged, renamed into place).

Only ``onnx`` folders are read back by ``dlkit predict`` and ``dlkit compare``: an ONNX file holds
a graph and tensors, no code. A TorchScript file holds code that loading runs, and a ``.pt2``
archive is read by ``torch.export.load``, which dlkit does not vouch for on files from elsewhere;
the check here loads them only right after writing them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dlkit import artifacts, extras, output
from dlkit.choices import EXPORT_FORMATS, ONNX_QUANT_MODES
from dlkit.errors import ArtifactError, DlkitError, IncompatibleError, UsageError

log = logging.getLogger("dlkit")

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "dlkit-export"
EXPORT_VERSION = 1
MODEL_FILES = {"onnx": "model.onnx", "exported-program": "model.pt2", "torchscript": "model.torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
CHECK_BATCHES = (1, 7)  # batch sizes every export is checked at (besides all samples at once)
# Largest |exported - PyTorch| allowed, relative to the largest |logit| (at least 1): float kernels
# of two runtimes sum in other orders; int8 kernels may round an activation one step apart.
FLOAT_TOLERANCE = 1e-3
INT8_TOLERANCE = 5e-2
ONNX_EXTRA = extras.INSTALL["onnx"]


class ExportMismatch(DlkitError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""


@dataclass
class ExportOptions:
    format: str = "onnx"
    opset: int | None = None  # ONNX opset; None: the exporter's recommended one
    samples: int = 32  # test samples the check runs
    quantize: str | None = None  # onnx: int8 through ONNX Runtime's tools (static or dynamic)
    calib_samples: int = 512  # static: training samples to calibrate activation ranges on
    data_dir: str | None = None
    out: Path | None = None

    def validate(self) -> "ExportOptions":
        if self.format not in EXPORT_FORMATS:
            raise UsageError(f"unknown export format '{self.format}'", hint=f"use one of {', '.join(EXPORT_FORMATS)}")
        if self.opset is not None and self.format != "onnx":
            raise UsageError(f"--opset is for --format onnx, not {self.format}", hint="drop --opset")
        if self.opset is not None and not 7 <= self.opset <= 25:
            raise UsageError(f"--opset must be an ONNX opset from 7 to 25 (got {self.opset})")
        if self.samples < 1:
            raise UsageError(f"--samples must be >= 1 (got {self.samples})")
        if self.quantize is not None and self.quantize not in ONNX_QUANT_MODES:
            raise UsageError(f"unknown --quantize mode '{self.quantize}'", hint=f"use {' or '.join(ONNX_QUANT_MODES)}")
        if self.quantize is not None and self.format != "onnx":
            raise UsageError(f"--quantize is for --format onnx, not {self.format}", hint="drop --quantize")
        if self.calib_samples < 1:
            raise UsageError(f"--calib-samples must be >= 1 (got {self.calib_samples})")
        return self


@dataclass
class ExportResult:
    path: Path
    artifact: Path
    model: str
    format: str
    exporter: str  # dynamo, torchscript (the ONNX exporter used), torch.export or jit.trace
    file: str
    file_bytes: int
    dynamic_axes: dict  # input axis -> symbolic name
    max_abs_diff: float
    tolerance: float | None  # None for an int8 model: it is measured (agreement), not held to a bound
    samples: int
    batch_sizes: list[int]
    agreement: float = 1.0  # share of the checked samples whose top label is PyTorch's
    quantization: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"], d["artifact"] = str(self.path), str(self.artifact)
        return d


def require(module: str, what: str):
    """Import an optional dependency of the ``onnx`` extra, or fail with the line that installs it."""
    return extras.require(module, what, "onnx")


def require_onnx_export() -> None:
    """What an ONNX export and its check need: onnx, onnxscript (the dynamo exporter), onnxruntime."""
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    require("onnxruntime", "checking an ONNX export")


def onnx_session(file: Path, threads: int | None = None):
    """An ONNX Runtime CPU session for ``file``. With ``threads`` (timing beside PyTorch), that many
    intra-op threads, which sleep between runs instead of spinning (spinning threads would steal
    the CPU from the model timed next)."""
    ort = require("onnxruntime", "running an ONNX model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


def default_out(source: Path, fmt: str, quantize: str | None = None) -> Path:
    return source.with_name(f"{source.name}-{fmt}" + (f"-int8-{quantize}" if quantize else ""))


# ------------------------------------------------------------------------------- export.json


def preprocessing(art: artifacts.Artifact) -> dict:
    """How raw inputs become the model's input, from the artifact's data state (see dlkit.data).

    Images: an 8-bit pixel ``p`` of channel ``c`` becomes ``(p / 255 - mean[c]) / std[c]``; the
    statistics were taken on the training split scaled to 0..1, so this is exactly how uint8
    datasets (MNIST, CIFAR) were prepared for training; ``digits`` (values 0..16, stored as 0..1)
    is matched to within half an 8-bit step. Text: the ``words-v1`` tokenizer (dlkit.data.tokenizer)."""
    from dlkit.data.tokenizer import _BREAK, _WORD, Tokenizer

    spec = art.spec
    state = art.manifest["data"].get("state") or {}
    if spec.modality == "text":
        if not state.get("tokenizer"):
            raise ArtifactError(f"{art.path} records no tokenizer", hint="export an artifact trained by dlkit")
        tok = Tokenizer.from_state(state["tokenizer"])
        return {"modality": "text", "dtype": "int64", "tokenizer": {
            "name": state["tokenizer"]["name"], "lowercase": True, "line_breaks": _BREAK.pattern,
            "word_pattern": _WORD.pattern, "pad_id": 0, "unk_id": 1, "padding": "right", "max_len": tok.max_len,
            "vocab": tok.vocab,
            "rule": "lower-case; replace matches of line_breaks by a space; words are the matches of word_pattern "
                    "(Python re); id = vocab.index(word) if found at 2 or later, else unk_id; first max_len ids, "
                    "right-padded with pad_id"}}
    channels, height, width = spec.input_shape
    if "mean" not in state or "std" not in state:
        raise ArtifactError(f"{art.path} records no normalisation (data state mean/std)",
                            hint="export an artifact trained by dlkit")
    return {"modality": "image", "dtype": "float32", "layout": "NCHW", "channels": channels, "height": height,
            "width": width, "color": "L" if channels == 1 else "RGB", "resize": "box", "pixel_scale": 255.0,
            "mean": [float(v) for v in state["mean"]], "std": [float(v) for v in state["std"]],
            "rule": "turn upright by its EXIF orientation, convert to color (Pillow), resize to width x height "
                    "with resize (Pillow) if the size differs, then (pixel / pixel_scale - mean[c]) / std[c] per "
                    "channel"}


def labels(art: artifacts.Artifact) -> list[str]:
    spec = art.spec
    return [str(n) for n in (spec.class_names or range(spec.num_classes))]


def describe(art: artifacts.Artifact, fmt: str, exporter: str, dynamic: dict, check: dict, opset) -> dict:
    """The contents of ``export.json``."""
    spec = art.spec
    prep = preprocessing(art)
    shape = [dynamic.get(i, s) for i, s in enumerate(["batch", *spec.input_shape])]
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "model_format": fmt, "file": MODEL_FILES[fmt],
        "exporter": exporter, "opset": opset,
        "model": {"name": art.model_name, "family": art.manifest["model"].get("family"),
                  "transforms": [t.get("kind") for t in art.manifest["model"].get("transforms", [])]},
        "source": {"artifact": str(art.path), "dataset": art.dataset,
                   "weights_sha256": art.manifest.get("weights", {}).get("sha256")},
        "inputs": [{"name": INPUT_NAME, "shape": shape, "dtype": prep["dtype"]}],
        "outputs": [{"name": OUTPUT_NAME, "shape": ["batch", spec.num_classes], "dtype": "float32",
                     "meaning": "logits; softmax gives the class probabilities"}],
        "preprocessing": prep,
        "labels": labels(art),
        "check": check,
    }


PREP_KEYS = {"image": ("channels", "color", "width", "height", "pixel_scale", "mean", "std"), "text": ("tokenizer",)}


def read_export(path: Path | str) -> dict:
    """A folder's ``export.json``, checked enough to use it (the model file is not opened)."""
    path = Path(path)
    try:
        doc = json.loads((path / EXPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path / EXPORT_FILE} ({type(exc).__name__})",
                            hint="pass a folder written by dlkit export") from None
    problems = []
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"{path / EXPORT_FILE} is not a dlkit export description")
    if doc.get("format_version") != EXPORT_VERSION:
        problems.append(f"format_version {doc.get('format_version')!r} is not {EXPORT_VERSION}")
    if doc.get("model_format") not in MODEL_FILES:
        problems.append(f"model_format must be one of {', '.join(MODEL_FILES)}")
    elif doc.get("file") != MODEL_FILES[doc["model_format"]]:
        problems.append(f"file must be {MODEL_FILES[doc['model_format']]}")
    if not isinstance(doc.get("labels"), list) or not doc["labels"]:
        problems.append("labels must be a non-empty list")
    prep = doc.get("preprocessing")
    if not isinstance(prep, dict) or prep.get("modality") not in PREP_KEYS:
        problems.append("preprocessing must say its modality (image or text)")
    else:
        missing = [k for k in PREP_KEYS[prep["modality"]] if k not in prep]
        tok = prep.get("tokenizer")
        if prep["modality"] == "text" and (not isinstance(tok, dict) or not {"name", "vocab", "max_len"} <= set(tok)):
            missing.append("tokenizer name/vocab/max_len")
        if missing:
            problems.append(f"preprocessing lacks {', '.join(missing)}")
    if not isinstance(doc.get("inputs"), list) or not doc["inputs"] or "name" not in doc["inputs"][0]:
        problems.append("inputs must name the model's input")
    if problems:
        raise ArtifactError(f"{path / EXPORT_FILE} is malformed: {'; '.join(problems)}",
                            hint="export the artifact again")
    return doc


# ------------------------------------------------------------------------------- the exporters


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters print progress on stdout (ours is for machine output) and warn about
    optional packages; keep both out of the user's streams."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


@contextlib.contextmanager
def _native_output_dropped():
    """The TorchScript-based exporter prints its whole graph from C++ (on stdout, which is for
    machine output) when it fails; drop what file descriptors 1 and 2 get meanwhile (the error it
    raises is reported instead)."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _first_line(exc: BaseException) -> str:
    """The first line of what went wrong (the dynamo exporter wraps the cause in a long how-to)."""
    import re

    exc = exc.__cause__ or exc
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _dims(example, text: bool, seq: bool):
    """torch.export dynamic shapes for the one input: batch, and for text the sequence up to its length."""
    import torch

    dims = {0: torch.export.Dim("batch", min=1, max=1 << 20)}
    if text and seq:
        dims[1] = torch.export.Dim("seq", min=1, max=int(example.shape[1]))
    return (dims,)


def _onnx(model, example, file: Path, text: bool, opset: int | None, notes: list[str], who):
    """Write ``file``; returns (exporter, dynamic axes). Tries dynamo (batch+seq, then batch), then TorchScript."""
    import torch

    failures = []
    for seq in ((True, False) if text else (False,)):
        try:
            with _quiet_exporters():
                program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_dims(example, text, seq),
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            opset_version=opset, external_data=False, verbose=False)
                program.save(str(file), external_data=False)
            if text and not seq:
                notes.append("the sequence axis is fixed at the trained length (the exporter could not make it "
                             f"dynamic: {failures[-1]})")
            return "dynamo", ({0: "batch", 1: "seq"} if text and seq else {0: "batch"})
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next way, keep why
            failures.append(_first_line(exc))
    try:
        with _quiet_exporters(), _native_output_dropped():
            torch.onnx.export(model, (example,), str(file), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset or 17,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:  # noqa: BLE001
        raise _cannot("onnx", f"dynamo exporter: {failures[-1]}; TorchScript exporter: {_first_line(exc)}",
                      who) from None
    notes.append(f"the dynamo exporter failed ({failures[-1]}); used the TorchScript-based exporter")
    return "torchscript", {0: "batch"}


def _exported_program(model, example, file: Path, text: bool, notes: list[str], who):
    """Write ``file`` (batch dynamic; for text the sequence too where torch.export allows)."""
    import torch

    failures = []
    for seq in ((True, False) if text else (False,)):
        try:
            with _quiet_exporters():
                program = torch.export.export(model, (example,), dynamic_shapes=_dims(example, text, seq))
                torch.export.save(program, str(file))
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next way, keep why
            failures.append(_first_line(exc))
            continue
        if text and not seq:
            notes.append(f"the sequence axis is fixed at the trained length (torch.export: {failures[-1]})")
        return "torch.export", ({0: "batch", 1: "seq"} if text and seq else {0: "batch"})
    raise _cannot("exported-program", failures[-1], who)


def _torchscript(model, example, file: Path, who):
    import torch

    try:
        with _quiet_exporters():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            torch.jit.save(traced, str(file))
    except Exception as exc:  # noqa: BLE001
        raise _cannot("torchscript", _first_line(exc), who) from None
    return "jit.trace", {0: "batch"}


def _cannot(fmt: str, why: str, who: tuple[str, bool]) -> IncompatibleError:
    """One line for a model an exporter cannot take; ``who`` is (model name, int8)."""
    name, int8 = who
    if int8:
        hint = ("int8 artifacts export as torchscript (any mode) or onnx (static and qat modes); "
                "or export the float artifact it was quantized from")
    else:  # exported-program goes through torch.export as the dynamo exporter does: no help after it fails
        hint = "try --format onnx" if fmt == "torchscript" else "try --format torchscript"
    return IncompatibleError(f"'{name}' cannot be exported as {fmt}: {why}", hint=hint)


def _runner(fmt: str, file: Path):
    """A function running the exported file: numpy/torch batch -> logits as a float64 numpy array."""
    import numpy as np
    import torch

    if fmt == "onnx":
        session = onnx_session(file)
        return lambda x: np.asarray(session.run(None, {INPUT_NAME: x.numpy()})[0], dtype=np.float64)
    with _quiet_exporters():
        loaded = torch.export.load(str(file)).module() if fmt == "exported-program" else torch.jit.load(str(file))

    def run(x):
        with torch.no_grad():
            return loaded(x).double().numpy()

    return run


def _check(model, run, x, split: str, relative: float | None, seq: bool) -> dict:
    """Compare the exported model with ``model`` on ``x`` at batch 1, 7 and all (and, where the
    sequence axis is dynamic, on the first half of each sequence). With ``relative``, a difference
    beyond ``relative`` x the largest |logit| (at least 1) raises; without (ONNX Runtime's int8
    models), the difference and the top-label agreement are only measured."""
    import numpy as np
    import torch

    batches = sorted({b for b in CHECK_BATCHES if b <= len(x)} | {len(x)})
    inputs = [x[:b] for b in batches]
    if seq:
        inputs.append(x[:7, : max(1, x.shape[1] // 2)])
    worst, scale, agreement = 0.0, 1.0, None
    for xb in inputs:
        with torch.no_grad():
            ref = model(xb).double().numpy()
        try:
            got = run(xb)
        except Exception as exc:  # noqa: BLE001 - a runtime refusing the exported model is a failed check
            raise ExportMismatch(f"the exported model fails on input {tuple(xb.shape)}: {_first_line(exc)}",
                                 hint="nothing was written") from None
        if got.shape != ref.shape:
            raise ExportMismatch(f"the exported model gives shape {got.shape} for input {tuple(xb.shape)}, "
                                 f"PyTorch {ref.shape}", hint="nothing was written")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        if agreement is None and len(xb) == len(x) and xb.shape == x.shape:
            agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    tolerance = None if relative is None else relative * scale
    if tolerance is not None and not worst <= tolerance:
        raise ExportMismatch(f"the exported model differs from PyTorch by up to {worst:.3g} "
                             f"(tolerance {tolerance:.3g})", hint="nothing was written; try another --format or --opset")
    return {"split": split, "samples": len(x), "batch_sizes": batches,
            "short_sequence": int(inputs[-1].shape[1]) if seq else None, "max_abs_diff": worst,
            "tolerance": tolerance, "agreement": agreement}


def _quantize_onnx(file: Path, mode: str, calibration, notes: list[str]) -> dict:
    """Replace the float ONNX model ``file`` by ONNX Runtime's int8 version of it.

    static: QDQ format, per-channel int8 weights, uint8 activations whose ranges are calibrated
    (MinMax) on ``calibration`` (training samples, in batches of 64); dynamic: per-channel int8
    weights, activations quantized on the fly. The model is pre-processed first (shape inference,
    graph optimisation) as ONNX Runtime recommends; where that fails, the float model is used as it is."""
    require("onnxruntime.quantization", "ONNX Runtime int8 quantization")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: calibration[i: i + 64].numpy()} for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self.batches, None)

    float_file = file.with_name("float.onnx")
    prepared = file.with_name("prepared.onnx")
    file.rename(float_file)
    try:
        with _quiet_exporters():
            try:
                quant_pre_process(str(float_file), str(prepared))
                source = prepared
            except Exception as exc:  # noqa: BLE001 - an optional step: quantize what the exporter wrote
                notes.append(f"ONNX Runtime's pre-processing failed ({_first_line(exc)}); quantized the model as "
                             "exported")
                source = float_file
            if mode == "static":
                quantize_static(str(source), str(file), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            else:
                quantize_dynamic(str(source), str(file), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001
        raise IncompatibleError(f"ONNX Runtime cannot quantize this model ({mode}): {_first_line(exc)}",
                                hint="export it without --quantize") from None
    finally:
        float_file.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
    info = {"tool": "onnxruntime.quantization", "mode": mode, "weights": "int8, per channel"}
    if mode == "static":
        info.update(format="QDQ", activations="uint8, MinMax-calibrated", calibration_samples=len(calibration))
    else:
        info.update(activations="quantized on the fly")
    return info


def _onnx_facts(file: Path) -> tuple[int | None, dict[str, int]]:
    """The default-domain opset an ONNX file declares, and how many nodes of each op type it holds."""
    from collections import Counter

    onnx = require("onnx", "ONNX export")
    model = onnx.load(str(file), load_external_data=False)
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return opset, dict(Counter(node.op_type for node in model.graph.node))


def _is_int8(art: artifacts.Artifact) -> bool:
    return any(t.get("kind") == "quantize" and t.get("compute") == "int8"
               for t in art.manifest["model"].get("transforms", []))


def export_onnx_checked(model, example, file: Path, *, text: bool = False, name: str = "model") -> dict:
    """Write the float CPU ``model`` to the ONNX ``file`` and check it against PyTorch on ``example``
    (a batch of inputs; at batch 1, 7 and all of it) within the float tolerance, as
    :func:`export_artifact` does; returns the check (its ``notes``: how it was exported). For a
    model without an artifact (``dlkit profile`` of a registry model): no data, no ``export.json``."""
    require_onnx_export()
    notes: list[str] = []
    model = model.eval()
    _, dynamic = _onnx(model, example[:7], file, text, None, notes, (name, False))
    check = _check(model, _runner("onnx", file), example, "random inputs", FLOAT_TOLERANCE, seq=1 in dynamic)
    check["notes"] = notes
    return check


def _samples(art: artifacts.Artifact, opts: ExportOptions):
    """(check samples, their split, calibration samples): the first ``opts.samples`` of the test split
    (else validation, else training); ``opts.calib_samples`` training samples drawn with seed 0."""
    import torch

    data = artifacts.load_data(art, why="checking the export", data_dir=opts.data_dir)
    x_train = data.train[0]
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[: opts.calib_samples]
    calibration = x_train[pick.sort().values].contiguous()
    for split in ("test", "val", "train"):
        x = getattr(data, split)[0]
        if len(x):
            return x[: opts.samples].contiguous(), split, calibration
    raise UsageError(f"the '{data.name}' data of {art.path} is empty", hint="nothing to check the export on")


def export_artifact(path: Path | str, opts: ExportOptions | None = None) -> ExportResult:
    """Export ``path`` as ``opts.format`` into a new folder, checked against PyTorch first."""
    import torch

    opts = (opts or ExportOptions()).validate()
    started = time.perf_counter()
    if opts.format == "onnx":
        require_onnx_export()
    art = artifacts.read_artifact(path)
    final = Path(opts.out) if opts.out else default_out(Path(path), opts.format, opts.quantize)
    with output.Destination(final):
        output.check_free(final)
        preprocessing(art)  # an artifact without a data state cannot be described: fail before the work
        int8 = _is_int8(art)
        who = (art.model_name, int8)
        model = artifacts.load_model(art).to("cpu").eval()
        if int8 and opts.quantize:
            raise UsageError(f"{art.path} is already int8", hint="export it without --quantize, or quantize the "
                             "float artifact it came from")
        x, split, calibration = _samples(art, opts)
        text = art.spec.modality == "text"
        example = torch.cat([x] * (1 + 7 // len(x)))[:7] if len(x) < 7 else x[:7]  # batch > 1: not specialised
        notes = []
        if art.precision != "fp32":
            notes.append(f"the artifact computes in {art.precision}; the export computes in fp32")
        work = output.staging_folder(final)
        try:
            file = work / MODEL_FILES[opts.format]
            if opts.format == "onnx":
                exporter, dynamic = _onnx(model, example, file, text, opts.opset, notes, who)
            elif opts.format == "exported-program":
                exporter, dynamic = _exported_program(model, example, file, text, notes, who)
            else:
                exporter, dynamic = _torchscript(model, example, file, who)
            check = _check(model, _runner(opts.format, file), x, split, INT8_TOLERANCE if int8 else FLOAT_TOLERANCE,
                           seq=1 in dynamic)
            quantization = None
            if opts.quantize:
                quantization = _quantize_onnx(file, opts.quantize, calibration, notes)
                float_check = check
                check = _check(model, _runner(opts.format, file), x, split, None, seq=1 in dynamic)
                check["float_max_abs_diff"] = float_check["max_abs_diff"]
                notes.append(f"int8 ({opts.quantize}): {100 * check['agreement']:.1f}% of the {len(x)} checked "
                             f"samples keep PyTorch's top label (the float export matched within "
                             f"{float_check['max_abs_diff']:.2g}); dlkit compare measures accuracy and latency")
            opset, ops = _onnx_facts(file) if opts.format == "onnx" else (None, {})
            if int8 and ops.get("QuantizeLinear"):
                notes.append(f"int8 layers are exported in QDQ form ({ops['QuantizeLinear']} QuantizeLinear, "
                             f"{ops.get('DequantizeLinear', 0)} DequantizeLinear nodes around float ops)")
            doc = describe(art, opts.format, exporter, dynamic, check, opset)
            doc["quantization"] = quantization
            doc["notes"] = notes
            (work / EXPORT_FILE).write_text(json.dumps(doc, indent=2))
            size = file.stat().st_size
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, OSError):
                raise output.os_error(exc) from None
            raise
        landed = output.commit(work, final)
    return ExportResult(path=landed, artifact=art.path, model=art.model_name, format=opts.format, exporter=exporter,
                        file=MODEL_FILES[opts.format], file_bytes=size,
                        dynamic_axes={str(i): n for i, n in dynamic.items()}, max_abs_diff=check["max_abs_diff"],
                        tolerance=check["tolerance"], samples=check["samples"], batch_sizes=check["batch_sizes"],
                        agreement=check["agreement"], quantization=quantization, notes=notes,
                        seconds=time.perf_counter() - started)
