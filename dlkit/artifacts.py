"""The artifact: the one on-disk format every command reads and writes.

An artifact is a directory:

    manifest.json       format version, model name and config, data spec, dataset, seed, lineage
    model.safetensors   the weights (safetensors: loading never runs code)
    metrics.json        the producing step's metrics
    ...                 history.jsonl, tensorboard/, plots, train.log (written by the step)

It is assembled in a sibling work folder and renamed into place, so a reader never sees a half
written artifact. Loading reads only JSON and safetensors; any other file is ignored.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dlkit import __version__
from dlkit.errors import ArtifactError, UsageError
from dlkit.registry import Registry
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


def _transform_kind(kind: str) -> str:
    """Transform ``K`` is registered by module ``dlkit.compress.K``; import it on first use."""
    if kind not in REBUILDERS and isinstance(kind, str) and kind.isidentifier():
        try:
            importlib.import_module(f"dlkit.compress.{kind}")
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
    """An artifact path from the command line; ``-`` reads it from stdin (its last non-empty line)."""
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
    return Path(lines[-1])


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


def work_folder(final: Path) -> Path:
    """Where an artifact is assembled before the rename (also holds a resumable checkpoint)."""
    return final.with_name(final.name + ".partial")


def check_destination(final: Path) -> None:
    if final.exists():
        raise UsageError(f"{final} already exists", hint="choose another --out, or remove it first")
    if not final.parent.exists():
        final.parent.mkdir(parents=True, exist_ok=True)


def write_artifact(final: Path, model, manifest: dict, *, work: Path | None = None,
                   files: dict[str, bytes | str] | None = None) -> Path:
    """Save ``model`` and ``manifest`` (plus ``files``) as an artifact at ``final``, atomically."""
    from safetensors.torch import save_file, save_model

    check_destination(final)
    work = work or work_folder(final)
    work.mkdir(parents=True, exist_ok=True)
    try:
        codec = _codec(manifest)
        if codec is None:
            save_model(model, str(work / WEIGHTS))
        else:
            save_file(codec[0].encode(model, codec[1]), str(work / WEIGHTS))
        manifest = dict(manifest)
        manifest["weights"] = {"file": WEIGHTS, "sha256": sha256_file(work / WEIGHTS)}
        for name, content in (files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(work / name, mode) as f:
                f.write(content)
        (work / METRICS).write_text(json.dumps(manifest.get("metrics", {}), indent=2))
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a dlkit artifact (its manifest has no '{FORMAT}' format)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {version}; this dlkit reads up to {FORMAT_VERSION}",
                            hint="upgrade dlkit")
    for key in ("model", "data", "weights"):
        if key not in manifest:
            raise ArtifactError(f"{path / MANIFEST} lacks '{key}'", hint="the artifact is corrupted")
    return Artifact(path, manifest)


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
