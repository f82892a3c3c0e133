"""Hugging Face models (``hf:DIR``, ``hf:ORG/NAME``) in every dlkit command.

``model_entry(name)`` is what ``dlkit.models.model_entry`` returns for ``hf:`` names: it reads no
file. Its ``make_config`` reads ``config.json`` (refusing ``trust_remote_code`` configs), its
``build`` loads the source's safetensors weights, and its ``rebuild`` makes the model from the
saved config alone (artifacts reload with no network and without the source folder).
``load_tokenizer(name)`` is the model's own fast tokenizer. transformers is the ``hf`` extra,
imported on first use.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

from dlkit.hf.load import split_name
from dlkit.hf.models import HFModelConfig, create, rebuild

TRAIN_DEFAULTS = dict(optimizer="adamw", lr=2e-5, weight_decay=0.01, epochs=3, batch_size=16,
                      schedule="cosine", warmup=0.1, eval_batch_size=64)


def _widths(model) -> dict:
    from dlkit.hf.prune import config_of

    return {"hf_config": config_of(model)}


WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "n_head")


def _width_summary(model) -> dict:
    """The config fields pruning changes (what ``prune`` reports before -> after)."""
    d = model.config.to_dict()
    return {k: d[k] for k in WIDTH_KEYS if d.get(k) is not None}


def _support(widths=_widths):
    from dlkit.models.registry import Support

    return Support(prune="hf", widths=widths, head="classifier")


def register_class(cls) -> None:
    """Make ``dlkit.models.support_of`` answer for a wrapped transformers class (its head attribute)."""
    from dlkit.models import registry

    registry._BY_CLASS.setdefault(cls, replace(_support(_width_summary), head=_head_attribute(cls)))


def _head_attribute(cls) -> str:
    """``score`` (GPT-2, LLaMA, ...) or ``classifier`` (BERT, ViT, ...): read from its __init__'s source."""
    import inspect

    try:
        src = inspect.getsource(cls.__mro__[2].__init__)  # cls, the mixin, the transformers class
    except (OSError, TypeError, IndexError):
        return "classifier"
    return "score" if "self.score" in src else "classifier"


def model_entry(name: str):
    """The registry entry for ``hf:...`` (reads no file)."""
    from dlkit.models.registry import ModelEntry
    from dlkit.spec import IMAGE, TEXT

    split_name(name)
    return ModelEntry(name=name, family="hf", make_config=lambda: make_config(name), build=create,
                      modalities=(TEXT, IMAGE), default_dataset="imdb",
                      description="a Hugging Face Transformers model (config.json + safetensors)",
                      train_defaults=dict(TRAIN_DEFAULTS), support=_support(), config_type=HFModelConfig,
                      rebuild=rebuild)


def make_config(name: str) -> HFModelConfig:
    """The dlkit config of ``hf:...``: its full config.json (read, checked), nothing executed."""
    from dlkit.hf import load

    path = load.folder(name, want="config")
    config = load.read_config(path, name)
    if config.get("pad_token_id") is None and (pad := _tokenizer_pad_id(path)) is not None:
        config["pad_token_id"] = pad  # the id the data is padded with is the one the model masks
    return HFModelConfig(source=name, hf_config=config)


def _tokenizer_pad_id(path) -> int | None:
    """The padding id of the folder's tokenizer (None without one, or without a padding token)."""
    try:
        pad = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if not isinstance(pad, str) or not (path / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(pad)
    except (OSError, ValueError, ImportError, Exception):  # noqa: BLE001  (no usable tokenizer: no padding id)
        return None


def load_tokenizer(name: str):
    """The model's own fast tokenizer (``transformers.PreTrainedTokenizerFast``); no code is run."""
    from dlkit.errors import DataError
    from dlkit.extras import require
    from dlkit.hf import load

    require("transformers", "hf: tokenizers", "hf")
    from transformers import AutoTokenizer

    path = load.folder(name, want="all")
    load.read_config(path, name)
    load.check_tokenizer_config(path, name)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot load the tokenizer of {name}: {(str(exc).strip().splitlines() or [''])[0][:200]}",
                        hint="the folder needs tokenizer.json (or the vocabulary files) that save_pretrained writes")
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{name}'s tokenizer has no fast (Rust) version", hint="save it with a tokenizer.json")
    return tok


def hf_files(model, manifest: dict) -> dict[str, str]:
    """Files that make an artifact folder loadable by ``from_pretrained`` (its config.json)."""
    from dlkit.hf.models import is_hf_model

    if not is_hf_model(model):
        return {}
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True)}
    tok = ((manifest.get("data") or {}).get("state") or {}).get("tokenizer") or {}
    if tok.get("name") == "hf" and isinstance(tok.get("tokenizer_json"), str):  # the same bytes the manifest holds
        from tokenizers import Tokenizer

        pad = Tokenizer.from_str(tok["tokenizer_json"]).id_to_token(int(tok.get("pad_id", 0)))
        files["tokenizer.json"] = tok["tokenizer_json"]
        files["tokenizer_config.json"] = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad,
                                                     "model_max_length": tok.get("max_len")}, indent=2)
    return files


HEAD_OF_ARCHITECTURE = (("ForCausalLM", "lm"), ("LMHeadModel", "lm"), ("ForSequenceClassification", "classify"),
                        ("ForImageClassification", "classify"))


def source_spec(hf_config: dict, head: str, seq_len: int = 128):
    from dlkit.hf.target import spec_of

    positions = hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or seq_len
    return spec_of(hf_config, head, min(seq_len, positions))


@contextlib.contextmanager
def source_artifact(name: str):
    """``hf:...`` as a temporary dlkit artifact (its safetensors weights, the head its config's
    architecture names: a causal LM keeps its LM head, a classifier its classifier, others are the
    base model), so that ``prune`` takes a Hugging Face model directly."""
    import tempfile

    from dlkit import artifacts
    from dlkit.config import to_dict

    cfg = make_config(name)
    arch = " ".join(cfg.hf_config.get("architectures") or [])
    head = next((h for suffix, h in HEAD_OF_ARCHITECTURE if suffix in arch), "base")
    cfg = replace(cfg, head=head)
    spec = source_spec(cfg.hf_config, head)
    model = create(cfg, spec).eval()
    manifest = artifacts.new_manifest(model_name=name, family="hf", config=to_dict(replace(cfg, pretrained=False)),
                                      spec=spec, dataset=None, data_state=None, seed=0)
    manifest["lineage"].append(artifacts.lineage_step("import", {"source": name, "head": head}, {}))
    with tempfile.TemporaryDirectory(prefix="dlkit-hf-") as tmp:
        yield artifacts.write_artifact(Path(tmp) / "source", model, manifest)


def default_out(name: str, suffix: str) -> Path:
    """Where a step on ``hf:...`` writes by default: ``NAME-SUFFIX`` in the current folder."""
    stem = Path(split_name(name).rstrip("/")).name or "hf-model"
    return Path(f"{stem}-{suffix}")
