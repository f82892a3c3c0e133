"""Finding a Hugging Face model's files, and refusing the ones dlkit will not read.

``hf:DIR`` is a local ``save_pretrained`` folder; ``hf:ORG/NAME`` is fetched through the
``huggingface_hub`` cache (only the files asked for: ``config.json`` alone for ``profile``, the
tokenizer and safetensors weights for ``train``). With ``DLKIT_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``)
only the cache is read; either way a failure is one line naming what was tried.

Safety, checked before anything else reads the folder:
- a config with ``auto_map`` (or a model type transformers does not know) needs code from the
  model's folder (``trust_remote_code``): refused;
- weights are read from ``*.safetensors`` only; a folder with only pickles (``pytorch_model.bin``,
  ``*.pt``, ``*.ckpt``) is refused with how to convert it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dlkit.errors import DataError, NotFoundError, UsageError

CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt", "tf_model.h5")
_REPO = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # ORG/NAME, or a legacy NAME (gpt2)

CONVERT_HINT = ("convert it once, in an environment you trust: python -c \"from transformers import AutoModel; "
                "AutoModel.from_pretrained('DIR').save_pretrained('DIR-safetensors')\" (save_pretrained writes "
                "safetensors), then use hf:DIR-safetensors")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("DLKIT_OFFLINE", "HF_HUB_OFFLINE"))


def split_name(name: str) -> str:
    """``hf:X`` -> ``X`` (the folder or repository id)."""
    if not name.startswith("hf:") or not name[3:].strip():
        raise UsageError(f"'{name}' is not a Hugging Face model name",
                         hint="give hf:DIR (a save_pretrained folder) or hf:ORG/NAME")
    return name[3:]


def is_local(name: str) -> bool:
    """A folder (one exists there, or the name reads as a path), else a Hub repository id."""
    where = split_name(name)
    return Path(where).expanduser().is_dir() or where.startswith((".", "/", "~")) or not _REPO.match(where)


def folder(name: str, *, want: str = "config") -> Path:
    """The local folder holding ``name``'s files. ``want``: ``config`` (config.json only) or
    ``all`` (config, tokenizer and safetensors weights)."""
    where = split_name(name)
    if is_local(name):
        path = Path(where).expanduser()
        if not path.is_dir():
            raise NotFoundError(f"no folder {where} (from {name})",
                                hint="give hf:DIR with a save_pretrained folder, or hf:ORG/NAME from the Hub")
        if not (path / CONFIG).is_file():
            raise NotFoundError(f"{path} has no {CONFIG}, so it is not a Hugging Face model folder",
                                hint="give the folder save_pretrained wrote")
        return path
    return _from_hub(where, name, want)


def _from_hub(repo: str, name: str, want: str) -> Path:
    from dlkit.extras import require

    hub = require("huggingface_hub", "hf:ORG/NAME models", "hf")
    patterns = [CONFIG] if want == "config" else [CONFIG, *TOKENIZER_FILES, *WEIGHT_PATTERNS]
    local_only = offline()
    tried = "the Hugging Face cache" + ("" if local_only else f" and https://huggingface.co/{repo}")
    try:
        path = Path(hub.snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))
    except Exception as exc:  # noqa: BLE001  (the hub raises many kinds: offline, 404, gated, HTTP)
        why = ("DLKIT_OFFLINE=1 allows the cache only" if local_only else
               f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}")
        raise DataError(f"cannot get {name}: tried {tried} ({why})",
                        hint="fetch it where there is a network (huggingface-cli download " + repo +
                        "), or give hf:DIR, a local save_pretrained folder") from None
    if not (path / CONFIG).is_file():
        raise DataError(f"cannot get {name}: {CONFIG} is not in {tried}",
                        hint="check the repository name, or give hf:DIR")
    if want != "config" and not list(path.glob("*.safetensors")):
        _refuse_pickles_on_hub(hub, repo, name, local_only)
    return path


def _refuse_pickles_on_hub(hub, repo: str, name: str, local_only: bool) -> None:
    files = []
    if not local_only:
        try:
            files = hub.list_repo_files(repo)
        except Exception:  # noqa: BLE001
            files = []
    pickles = [f for f in files if Path(f).name in PICKLES or f.endswith((".bin", ".pt", ".ckpt"))]
    if pickles:
        raise UsageError(f"{name} has weights only as pickles ({', '.join(pickles[:2])}); dlkit reads "
                         "safetensors only, because loading a pickle can run code", hint=CONVERT_HINT)
    raise DataError(f"{name} has no safetensors weights in the cache"
                    + (" (DLKIT_OFFLINE=1 allows the cache only)" if local_only else ""),
                    hint="fetch them with huggingface-cli download " + repo)


def read_config(path: Path, name: str) -> dict:
    """``config.json`` as a dict, refused when it needs code from the folder or names no known type."""
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path / CONFIG}: {exc}", hint="the model folder is damaged") from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path / CONFIG} is not a JSON object", hint="the model folder is damaged")
    check_config(cfg, name)
    return cfg


def check_config(cfg: dict, name: str) -> None:
    """Refuse configs that need ``trust_remote_code``: nothing from the folder is ever run."""
    from dlkit.extras import require

    if cfg.get("auto_map"):
        code = ", ".join(sorted({str(v).split(".")[0] + ".py" for v in _flat(cfg["auto_map"])}))
        raise UsageError(f"{name} needs its own Python code ({code}, named by auto_map in {CONFIG}): "
                         "dlkit never runs code from a model folder (no trust_remote_code)",
                         hint="use a model whose architecture is built into transformers")
    model_type = cfg.get("model_type")
    transformers = require("transformers", "hf: models", "hf")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if not model_type or model_type not in CONFIG_MAPPING_NAMES:
        raise UsageError(f"{name}: model_type {model_type!r} is not built into transformers "
                         f"{transformers.__version__}", hint="it would need trust_remote_code, which dlkit refuses; "
                         "or upgrade transformers")


def _flat(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if v:
                yield from _flat(v)
    elif value:
        yield value.split("--")[-1]


def weight_files(path: Path, name: str) -> list[Path]:
    """The safetensors weight files of a model folder; pickles alone are refused."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in path.iterdir() if p.name in PICKLES or p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    if pickles:
        raise UsageError(f"{name} has weights only as pickles ({', '.join(sorted(pickles)[:2])}); dlkit reads "
                         "safetensors only, because loading a pickle can run code",
                         hint=CONVERT_HINT.replace("DIR", str(path)))
    raise NotFoundError(f"{name} has no weights ({path} holds no *.safetensors)",
                        hint="profile needs only config.json; train needs the weights (or --set pretrained=false)")


def check_tokenizer_config(path: Path, name: str) -> None:
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            d = json.loads(tc.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {tc}: {exc}", hint="the model folder is damaged") from None
        if isinstance(d, dict) and d.get("auto_map"):
            raise UsageError(f"{name}'s tokenizer needs its own Python code (auto_map in tokenizer_config.json): "
                             "dlkit never runs code from a model folder", hint="use a built-in tokenizer")
