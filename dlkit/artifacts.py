"""The artifact: the one on-disk format every command reads and writes.

An artifact is a directory:

    manifest.json       format version, model name and config, data spec, dataset, seed, lineage
    model.safetensors   the weights (safetensors: loading never runs code)
    metrics.json        the producing step's metrics
    config.json         Hugging Face models (family hf): their transformers config, so that the
                        folder also loads with ``from_pretrained`` (dlkit itself reads the manifest)
    ...                 history.jsonl, tensorboard/, plots, train.log (written by the step)

It is assembled in a sibling work folder and renamed into place, so a reader never sees a half
written artifact. Loading reads only JSON and safetensors; any other file is ignored.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dlkit import __version__, output
from dlkit.errors import ArtifactError, UsageError
from dlkit.registry import Registry
from dlkit.output import work_folder  # noqa: F401  (re-exported: callers find it here)
from dlkit.spec import DataSpec

FORMAT = "dlkit-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"

# A step that changes a model's structure (pruning, quantization) records a transform in the
# manifest and registers here how to re-apply it to a freshly built model before the weights load.
REBUILDERS: Registry[Callable[[Any, dict], Any]] = Registry("model transform")


def register_rebuilder(kind: str):
    def deco(fn):
        REBUILDERS.add(kind, fn)
        return fn

    return deco


@dataclass(frozen=True)
class WeightsCodec:
    """How a transform stores weights that safetensors cannot hold as they are (int8 packed params):
    ``encode(model, transform)`` returns plain tensors; ``decode(model, tensors, transform)`` loads
    them into the rebuilt model and returns ``(missing, unexpected)`` keys. Only tensors cross it."""

    encode: Callable[[Any, dict], dict]
    decode: Callable[[Any, dict, dict], tuple]


CODECS: Registry[WeightsCodec] = Registry("weights codec")


def register_codec(kind: str, *, encode, decode) -> None:
    CODECS.add(kind, WeightsCodec(encode, decode))


# Transforms registered outside dlkit.compress: kind -> the module that registers it.
TRANSFORM_MODULES = {"lora": "dlkit.engine.lora"}


def _transform_kind(kind: str) -> str:
    """Transform ``K`` is registered by module ``dlkit.compress.K`` (or TRANSFORM_MODULES[K]);
    import it on first use."""
    if kind not in REBUILDERS and isinstance(kind, str) and kind.isidentifier():
        try:
            importlib.import_module(TRANSFORM_MODULES.get(kind, f"dlkit.compress.{kind}"))
        except ModuleNotFoundError:
            pass  # REBUILDERS.get reports the unknown kind
    return kind


def _codec(manifest: dict) -> tuple[WeightsCodec, dict] | None:
    """The codec of the last transform that has one (None: plain safetensors of the state_dict)."""
    for transform in reversed(manifest["model"].get("transforms", [])):
        if _transform_kind(transform["kind"]) in CODECS:
            return CODECS.get(transform["kind"]), transform
    return None


def resolve_path(arg: str, *, stdin=None) -> Path:
    """An artifact path from the command line; ``-`` reads it from stdin (exactly one non-empty line)."""
    if arg != "-":
        return Path(arg)
    stream = stdin or sys.stdin
    if stream is None or stream.isatty():
        raise UsageError("'-' reads an artifact path from stdin, but stdin is a terminal",
                         hint="pipe a command into it, e.g. dlkit train mlp --dataset digits | dlkit evaluate -")
    lines = [ln.strip() for ln in stream.read().splitlines() if ln.strip()]
    if not lines:
        raise UsageError("'-' reads an artifact path from stdin, but stdin was empty",
                         hint="did the command before the pipe fail?")
    if len(lines) > 1:
        shown = ", ".join(lines[:3]) + (", ..." if len(lines) > 3 else "")
        raise UsageError(f"'-' reads one artifact path from stdin, but it held {len(lines)} lines: {shown}",
                         hint="pipe one path (dlkit compare - takes several)")
    return Path(lines[0])


def is_artifact_folder(name: str) -> bool:
    """``name`` is a folder holding a manifest (not a registry or ``hf:`` name)."""
    return not name.startswith("hf:") and (Path(name) / MANIFEST).is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_manifest(*, model_name: str, family: str, config: dict, spec: DataSpec, dataset: str | None,
                 data_state: dict | None, seed: int, precision: str = "fp32") -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dlkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": model_name, "family": family, "config": config, "transforms": []},
        "data": {"dataset": dataset, "spec": spec.to_dict(), "state": data_state or {}},
        "seed": seed,
        "precision": precision,
        "lineage": [],
        "metrics": {},
    }


def lineage_step(step: str, options: dict, metrics: dict, parent: str | None = None) -> dict:
    return {"step": step, "options": options, "metrics": metrics, "parent": parent,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dlkit_version": __version__}


def check_destination(final: Path, *, resumable=None, resume: bool = False) -> bool:
    """Fail early, before any work, when ``final`` cannot be written: it exists, a work folder or
    a link is in the way, or its folder cannot be made (one line naming the path and the cause).
    Returns True when a training run's work folder is to be resumed (see output.check_free)."""
    with output.Destination(final):
        return output.check_free(final, resumable=resumable, resume=resume)


def write_artifact(final: Path, model, manifest: dict, *, work: Path | None = None,
                   files: dict[str, bytes | str] | None = None) -> Path:
    """Save ``model`` and ``manifest`` (plus ``files``) as an artifact at ``final``, atomically.

    Without ``work`` the artifact is built in a fresh folder of this process's own, removed again
    on failure. With ``work`` (a training run's folder, holding its checkpoint) that folder is kept
    on failure, so nothing finished is lost. Returns where the artifact landed: ``final``, or
    ``final-N`` when ``final`` appeared meanwhile (see dlkit.output.commit). Callers check the
    destination before their work begins (check_destination) and hold its lock throughout."""
    final = Path(final)
    with output.Destination(final):
        own = work is None
        if own:
            work = output.staging_folder(final)
        try:
            _write_contents(Path(work), model, manifest, files or {})
        except BaseException as exc:
            if own:
                shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, OSError):
                raise output.os_error(exc) from None
            raise
        return output.commit(Path(work), final)


def _write_contents(work: Path, model, manifest: dict, files: dict[str, bytes | str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file, save_model

    codec = _codec(manifest)
    try:
        if codec is None:
            save_model(model, str(work / WEIGHTS))
        else:
            save_file(codec[0].encode(model, codec[1]), str(work / WEIGHTS))
    except SafetensorError as exc:  # its I/O errors carry no errno: keep the system's words
        raise output.OutputError(f"cannot write {work / WEIGHTS}: {str(exc).splitlines()[0]}",
                                 hint="free some space or choose another --out") from None
    manifest = dict(manifest)
    manifest["weights"] = {"file": WEIGHTS, "sha256": sha256_file(work / WEIGHTS)}
    if manifest["model"].get("family") == "hf" and codec is None:  # the folder loads with from_pretrained too
        from dlkit.hf import hf_files

        files = {**hf_files(model, manifest), **files}
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(work / name, mode) as f:
            f.write(content)
    (work / METRICS).write_text(json.dumps(manifest.get("metrics", {}), indent=2))
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2))


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def spec(self) -> DataSpec:
        return DataSpec.from_dict(self.manifest["data"]["spec"])

    @property
    def dataset(self) -> str | None:
        return self.manifest["data"].get("dataset")

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")

    def trained_with(self) -> dict:
        """The options of the lineage's train step ({} when the model was not trained by dlkit)."""
        step = next((s for s in self.manifest.get("lineage", []) if s.get("step") == "train"), None)
        return step.get("options") or {} if step else {}


def train_config(artifact: Artifact):
    """The TrainConfig that trained ``artifact`` (the model's defaults when none is recorded)."""
    import dataclasses

    from dlkit.engine.trainer import TrainConfig, resolve_train_config

    recorded = artifact.trained_with().get("train_config")
    if isinstance(recorded, dict):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in recorded.items() if k in known})
    return resolve_train_config(artifact.model_name, {})


def load_data(artifact: Artifact, *, why: str, dataset: str | None = None, data_dir: str | None = None,
              options: dict | None = None, progress=None):
    """The data ``artifact`` was trained on, split and normalised the same way (its recorded data
    state and options), or another dataset of the same shape. ``why`` names the need in errors."""
    from dlkit.data import load_dataset
    from dlkit.errors import DataError

    name = dataset or artifact.dataset
    if not name:
        raise UsageError(f"{artifact.path} records no dataset, which {why} needs",
                         hint="pass --dataset, or use an artifact trained by dlkit")
    state = artifact.manifest["data"].get("state") or {}
    own = name == artifact.dataset
    if options is None and own:
        options = artifact.trained_with().get("data_options") or None
    try:
        return load_dataset(name, data_dir=data_dir, val_fraction=state.get("val_fraction", 0.1),
                            seed=state.get("seed", artifact.manifest.get("seed", 0)),
                            state=state if own or artifact.spec.modality == "text" else None,
                            progress=progress, options=options)
    except DataError as exc:
        raise DataError(f"{why} needs the '{name}' data, which cannot be loaded: {exc.message}",
                        hint=exc.hint or "pass --data-dir") from None


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)  # JSON true is not a number


def manifest_problems(m: dict) -> list[str]:
    """Everything wrong with a manifest's fields (types, ranges, required keys), all at once."""
    from dlkit.choices import PRECISIONS

    problems = []
    version = m.get("format_version")
    if not _is(version, int):
        problems.append(f"format_version must be an integer from 1 to {FORMAT_VERSION}, not {json.dumps(version)}")
    elif not 1 <= version <= FORMAT_VERSION:
        problems.append(f"format_version {version} is not one (1 to {FORMAT_VERSION})")

    def need(parent: dict, key: str, kind, what: str, where: str, optional: bool = False):
        value = parent.get(key)
        if value is None and optional:
            return None
        if not _is(value, kind):
            problems.append(f"'{where}{key}' must be {what}" + ("" if key in parent else " (missing)"))
            return None
        return value

    model = need(m, "model", dict, "an object", "")
    if model is not None:
        name = need(model, "name", str, "a model name", "model.")
        if name == "":
            problems.append("'model.name' is empty")
        need(model, "config", dict, "an object", "model.")
        need(model, "family", str, "a string", "model.", optional=True)
        transforms = need(model, "transforms", list, "a list", "model.", optional=True)
        for i, t in enumerate(transforms or []):
            if not isinstance(t, dict) or not _is(t.get("kind"), str):
                problems.append(f"'model.transforms[{i}]' must be an object with a 'kind'")
    data = need(m, "data", dict, "an object", "")
    if data is not None:
        spec = need(data, "spec", dict, "an object", "data.")
        if spec is not None:
            try:
                DataSpec.from_dict(spec)
            except (KeyError, TypeError, ValueError) as exc:
                problems.append(f"'data.spec' is not a data spec ({type(exc).__name__}: {exc})")
        need(data, "dataset", str, "a dataset name or null", "data.", optional=True)
        need(data, "state", dict, "an object", "data.", optional=True)
    weights = need(m, "weights", dict, "an object with 'file' and 'sha256'", "")
    if weights is not None:
        file = need(weights, "file", str, "a file name", "weights.")
        if file is not None and Path(file).name != file:
            problems.append("'weights.file' names a file outside the artifact")
        need(weights, "sha256", str, "a hex digest", "weights.", optional=True)
    seed = m.get("seed")
    if seed is not None and not _is(seed, int):
        problems.append("'seed' must be an integer")
    if m.get("precision") is not None and m.get("precision") not in PRECISIONS:
        problems.append(f"'precision' must be one of {', '.join(PRECISIONS)}")
    lineage = need(m, "lineage", list, "a list", "", optional=True)
    for i, step in enumerate(lineage or []):
        if not isinstance(step, dict) or not _is(step.get("step"), str):
            problems.append(f"'lineage[{i}]' must be an object with a 'step'")
        elif step.get("options") is not None and not isinstance(step["options"], dict):
            problems.append(f"'lineage[{i}].options' must be an object")
    need(m, "metrics", dict, "an object", "", optional=True)
    return problems


def read_artifact(path: Path | str) -> Artifact:
    """Read and validate an artifact's manifest (no weights are loaded)."""
    path = Path(path)
    if not path.exists():
        hint = "is it still being written?" if work_folder(path).exists() else "check the path"
        raise ArtifactError(f"no artifact at {path}", hint=hint)
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not a dlkit artifact (no {MANIFEST})",
                            hint="pass the folder that `dlkit train` printed")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON ({exc})", hint="the artifact is corrupted") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path / MANIFEST}: {exc.strerror}", hint="check its permissions") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a dlkit artifact (its manifest has no '{FORMAT}' format)")
    version = manifest.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {version}; this dlkit reads up to {FORMAT_VERSION}",
                            hint="upgrade dlkit")
    problems = manifest_problems(manifest)
    if problems:
        raise ArtifactError(f"{path / MANIFEST} is malformed: " + "; ".join(problems),
                            hint="the artifact is corrupted or was not written by dlkit")
    return Artifact(path, manifest)


def _check_tensors(weights: Path, model, model_name: str) -> None:
    """Every stored tensor has the shape and dtype the rebuilt model expects (names the first that
    does not); read from the safetensors header alone."""
    import torch
    from safetensors import safe_open

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    expected = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key not in expected:
                continue
            sl = f.get_slice(key)
            shape, want = list(sl.get_shape()), list(expected[key].shape)
            if shape != want:
                raise ArtifactError(f"{weights}: tensor '{key}' has shape {shape}, but model '{model_name}' as its "
                                    f"manifest configures it expects {want}", hint="the artifact is corrupted")
            dtype = str(sl.get_dtype())
            want_dtype = names.get(expected[key].dtype)
            if want_dtype is not None and dtype != want_dtype:
                raise ArtifactError(f"{weights}: tensor '{key}' is {dtype}, but model '{model_name}' expects "
                                    f"{want_dtype}", hint="the artifact is corrupted")


def load_model(artifact: Artifact, *, verify: bool = True):
    """Rebuild the artifact's model and load its weights. Only JSON and safetensors are read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors.torch import load_model as st_load_model

    from dlkit.models import build_model

    weights = artifact.path / artifact.manifest["weights"]["file"]
    if Path(artifact.manifest["weights"]["file"]).name != artifact.manifest["weights"]["file"]:
        raise ArtifactError(f"{artifact.path / MANIFEST} names a weights file outside the artifact")
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing", hint="the artifact is incomplete")
    if verify:
        expected = artifact.manifest["weights"].get("sha256")
        if expected and sha256_file(weights) != expected:
            raise ArtifactError(f"{weights} does not match the checksum in its manifest",
                                hint="the artifact is corrupted; train or export it again")
    model_doc = artifact.manifest["model"]
    model = build_model(model_doc["name"], model_doc["config"], artifact.spec)
    for transform in model_doc.get("transforms", []):
        model = REBUILDERS.get(_transform_kind(transform["kind"]))(model, transform)
    codec = _codec(artifact.manifest)
    try:
        if codec is None:
            _check_tensors(weights, model, model_doc["name"])
            missing, unexpected = st_load_model(model, str(weights), strict=False)
        else:
            missing, unexpected = codec[0].decode(model, load_file(str(weights)), codec[1])
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ArtifactError(f"{weights} cannot be loaded: {str(exc).splitlines()[0]}",
                            hint="the artifact is corrupted or was written by an incompatible dlkit") from None
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not fit model '{model_doc['name']}' "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                            hint="the artifact is corrupted")
    model.eval()
    return model
