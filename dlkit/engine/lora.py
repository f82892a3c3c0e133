"""Training that starts from pretrained weights, and LoRA adapters on them (Hu et al. 2021).

``dlkit train MODEL`` starts from random weights for a registry name, from the source's weights
for ``hf:...``, and from an artifact's weights when MODEL is an artifact folder (same
architecture; text is encoded with the artifact's own tokenizer, and the data must have its
shape and classes). ``Origin`` is that starting point.

With ``--lora-rank R`` the chosen Linear layers (``--lora-targets``, by their last name; the
planner's ``dlkit.plan.lora`` names them the same way) gain a rank-R update ``B A x * alpha / R``
through the PEFT library (``inject_adapter_in_model``: the model keeps its class, only the
adapted layers become PEFT layers), every other parameter frozen. A Hugging Face classifier's new
head, which the source does not have, is trained along.

The artifact: with ``--merge``, the adapters are merged into the base weights and it is an
ordinary artifact. Without, ``model.safetensors`` holds only the trained tensors (the adapters)
and the manifest a ``lora`` transform naming the base (an artifact folder, or an ``hf:`` source)
with the sha256 of its weights. Loading rebuilds base + adapters (the ``lora`` rebuilder loads
the base and checks its digest; the codec loads the adapters), so every command reads it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from dlkit import artifacts
from dlkit.errors import ArtifactError, DlkitError, IncompatibleError, UsageError
from dlkit.spec import LM

log = logging.getLogger("dlkit")

KIND = "lora"
ADAPTER_KEYS = (".lora_A.", ".lora_B.")  # PEFT's parameter names in an adapted layer


# ------------------------------------------------------------------------------------ the base


def _hf_digest(name: str) -> str:
    """sha256 of an hf: source's safetensors weights (of the file, or of its files' digests)."""
    from dlkit.hf import load

    files = load.weight_files(load.folder(name, want="all"), name)
    digests = [artifacts.sha256_file(f) for f in files]
    if len(files) == 1:
        return digests[0]
    return hashlib.sha256("".join(f"{f.name} {d}\n" for f, d in zip(files, digests)).encode()).hexdigest()


def _absolute_hf(name: str) -> str:
    from dlkit.hf import load

    where = load.split_name(name)
    return f"hf:{Path(where).expanduser().resolve()}" if load.is_local(name) else name


def _base_reference(model_name: str, base: artifacts.Artifact | None) -> dict:
    """What a LoRA artifact records to find its base again and to see that it did not change."""
    if base is not None:
        return {"artifact": str(base.path.resolve()), "sha256": base.manifest["weights"].get("sha256")}
    if model_name.startswith("hf:"):
        return {"hf": _absolute_hf(model_name), "sha256": _hf_digest(model_name)}
    raise UsageError(f"LoRA adapts pretrained weights, and '{model_name}' starts from random ones",
                     hint=f"train {model_name} first and give its artifact folder as MODEL, or give an hf: model")


_RESTORE = "put the base back as it was, or train again (with --merge for an artifact that stands alone)"


def _load_base(ref: dict, model: nn.Module) -> nn.Module:
    """The base a LoRA artifact was trained on, after checking it is the same; ``model`` (rebuilt
    from the manifest, random weights) gives an hf: source its configured class."""
    if "artifact" in ref:
        path = Path(ref["artifact"])
        if not (path / artifacts.MANIFEST).is_file():
            raise ArtifactError(f"the base artifact of these LoRA adapters is missing: {path}", hint=_RESTORE)
        base = artifacts.read_artifact(path)
        if base.manifest["weights"].get("sha256") != ref["sha256"]:
            raise ArtifactError(f"the base artifact {path} changed since these LoRA adapters were trained on it "
                                f"(weights sha256 {str(base.manifest['weights'].get('sha256'))[:12]}..., expected "
                                f"{ref['sha256'][:12]}...)", hint=_RESTORE)
        return artifacts.load_model(base)  # verifies the weights file against its manifest
    source = ref["hf"]
    try:
        digest = _hf_digest(source)
    except DlkitError as exc:
        raise ArtifactError(f"the base model of these LoRA adapters cannot be read: {exc.message}",
                            hint=_RESTORE) from None
    if digest != ref["sha256"]:
        raise ArtifactError(f"the base model {source} changed since these LoRA adapters were trained on it "
                            f"(weights sha256 {digest[:12]}..., expected {ref['sha256'][:12]}...)", hint=_RESTORE)
    return _hf_pretrained(model, source)


def _hf_pretrained(model: nn.Module, source: str) -> nn.Module:
    """``model``'s class and configuration with ``source``'s weights (what dlkit.hf.models.create loads)."""
    from dlkit.hf import load
    from dlkit.hf.models import _quiet_transformers

    path = load.folder(source, want="all")
    with _quiet_transformers():
        return type(model).from_pretrained(str(path), config=model.config,
                                           attn_implementation=model.config._attn_implementation,
                                           use_safetensors=True, local_files_only=True, trust_remote_code=False,
                                           ignore_mismatched_sizes=True).eval()


# ------------------------------------------------------------------------------------ adapters


def new_parameters(model: nn.Module, source: str) -> list[str]:
    """Parameters of an hf: model that ``source``'s weights do not hold (a classifier's head, BERT's
    pooler): initialised at random, so they are trained and saved with the adapters. A parameter
    counts as held under its own name, without or with the base model's prefix, or through a name
    it is tied to."""
    from safetensors import safe_open

    from dlkit.hf import load

    held: set[str] = set()
    for file in load.weight_files(load.folder(source, want="all"), source):
        with safe_open(str(file), framework="pt") as f:
            held.update(f.keys())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def known(name: str) -> bool:
        return name in held or name.removeprefix(prefix) in held or prefix + name in held

    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(ns[0] for ns in names.values() if not any(known(n) for n in ns))


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: list[str], extra: list[str]) -> None:
    """Put PEFT LoRA layers on the Linear layers at paths ``targets``; freeze all else but the
    parameters named in ``extra``."""
    from peft import LoraConfig, inject_adapter_in_model

    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)  # GPT-2's (in, out) weights
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=conv1d)
    inject_adapter_in_model(config, model)
    for name in extra:
        model.get_parameter(name).requires_grad_(True)


def attach(model: nn.Module, rank: int, alpha: float, names: str, source: str | None = None) -> dict:
    """LoRA on ``model`` as ``--lora-rank/--lora-alpha/--lora-targets`` ask (``source``: the hf:
    name it was loaded from); returns the transform to record (without its base), trainable and
    total parameter counts included."""
    from dlkit.plan.lora import lora_targets

    wanted = tuple(n.strip() for n in names.split(",") if n.strip()) or None
    targets = lora_targets(model, wanted)
    alpha = alpha or 2 * rank
    extra = new_parameters(model, source) if source else []
    if any(n.rpartition(".")[0] in targets for n in extra):
        raise IncompatibleError(f"{', '.join(t for t in targets if any(n.startswith(t + '.') for n in extra))} "
                                f"is not in {source}'s weights, so there is no pretrained layer to adapt",
                                hint="choose other --lora-targets")
    add_adapters(model, rank, alpha, targets, extra)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"kind": KIND, "rank": rank, "alpha": alpha, "targets": targets, "trainable": extra,
            "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}


def _is_trained(key: str, transform: dict) -> bool:
    return any(k in key for k in ADAPTER_KEYS) or key in transform.get("trainable", ())


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + B A * alpha / R) and put the plain layer back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())
    return model


# ------------------------------------------------------------------------------------ the artifact


@artifacts.register_rebuilder(KIND)
def _rebuild(model: nn.Module, transform: dict) -> nn.Module:
    base = _load_base(transform["base"], model)
    add_adapters(base, transform["rank"], transform["alpha"], transform["targets"], transform.get("trainable", []))
    return base


def _encode(model: nn.Module, transform: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if _is_trained(k, transform)}


def _decode(model: nn.Module, tensors: dict, transform: dict) -> tuple[list, list]:
    own = model.state_dict()
    wanted = {k for k in own if _is_trained(k, transform)}
    for k, v in tensors.items():
        if k in own and own[k].shape != v.shape:
            raise ArtifactError(f"adapter tensor '{k}' has shape {list(v.shape)}, the model expects "
                                f"{list(own[k].shape)}", hint="the artifact is corrupted")
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return sorted(wanted - set(tensors)), sorted(set(tensors) - set(own))


artifacts.register_codec(KIND, encode=_encode, decode=_decode)


# ------------------------------------------------------------------------------------ a training run


@dataclass
class Origin:
    """Where a training run's weights start (random, an hf: source, an artifact), and its LoRA."""

    model_name: str  # the registry or hf: name of the architecture
    base: artifacts.Artifact | None = None  # MODEL was an artifact folder
    reference: dict | None = None  # what a LoRA artifact records of its base
    lora: dict | None = None  # the transform, once attached

    @classmethod
    def of(cls, request, cfg) -> "Origin":
        """Read and check the starting point before any data is loaded."""
        from dlkit.engine import recompute

        base = None
        if artifacts.is_artifact_folder(request.model):
            base = artifacts.read_artifact(request.model)
            coded = [t["kind"] for t in base.manifest["model"].get("transforms", [])
                     if artifacts._transform_kind(t["kind"]) in artifacts.CODECS]
            if coded:
                raise UsageError(f"{base.path} stores its weights as {', '.join(coded)}; training starts from plain "
                                 "float weights", hint="start from the artifact it was made from"
                                 + (", or from one trained with --merge" if KIND in coded else ""))
            if request.overrides:
                raise UsageError("--set changes a registry model's config, not an artifact's",
                                 hint="drop --set: training from an artifact keeps its architecture")
        origin = cls(base.model_name if base else request.model, base)
        recompute.check_supported(origin.model_name, cfg.checkpointing)
        if cfg.lora_rank:
            origin.reference = _base_reference(request.model, base)
        return origin

    def data_state(self, request) -> dict | None:
        """Text for an artifact is encoded with its own tokenizer (its vocabulary, its ids)."""
        if self.base is None:
            return None
        state = self.base.manifest["data"].get("state") or {}
        if self.base.spec.modality != "text" or "tokenizer" not in state:
            return None
        keep = {"val_fraction": request.val_fraction, "seed": request.seed, "tokenizer": state["tokenizer"]}
        if self.base.spec.task == LM and "seq_len" in state and "seq_len" not in request.data_options:
            keep["seq_len"] = state["seq_len"]
        return keep

    def build(self, request, spec) -> tuple[nn.Module, object]:
        """(model, its config): the registry's or hf: model, or the artifact's with its weights."""
        from dlkit.config import from_dict
        from dlkit.models import create_model, model_entry

        if self.base is None:
            return create_model(request.model, spec, request.overrides)
        mine = self.base.spec
        fits = replace(mine, input_shape=spec.input_shape) if mine.task == LM == spec.task else mine
        if fits != spec or (spec.task != LM and tuple(mine.class_names or ()) != tuple(spec.class_names or ())):
            raise IncompatibleError(f"the data ({spec.describe()}) does not fit {self.base.path} "
                                    f"({mine.describe()})", hint="train on data of its shape and classes")
        config = from_dict(model_entry(self.model_name).config_cls, self.base.manifest["model"]["config"])
        return artifacts.load_model(self.base).train(), config

    def attach_lora(self, model: nn.Module, cfg) -> None:
        source = self.model_name if self.base is None and self.model_name.startswith("hf:") else None
        self.lora = {**attach(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, source), "base": self.reference}
        t = self.lora
        names = sorted({p.rpartition(".")[2] for p in t["targets"]})
        new = sorted({n.rpartition(".")[0] for n in t["trainable"]})
        log.info("LoRA rank %d (alpha %g) on %d Linear layers (%s)%s: %s trainable parameters of %s (%.2f%%), "
                 "the rest frozen", t["rank"], t["alpha"], len(t["targets"]), ", ".join(names),
                 f", and {', '.join(new)} (not in {source})" if new else "", f"{t['trainable_params']:,}",
                 f"{t['total_params']:,}", 100 * t["trainable_share"])

    def record(self, manifest: dict, options: dict, merged: bool) -> None:
        """Fill in what the manifest says of the start and the adapters (``merged``: the adapters
        are merged into the weights before writing, so the manifest names no base)."""
        if self.base is not None:
            manifest["model"]["transforms"] = list(self.base.manifest["model"].get("transforms", []))
            options["start"] = {"artifact": str(self.base.path.resolve()),
                                "sha256": self.base.manifest["weights"].get("sha256")}
        if self.lora is None:
            return
        summary = {k: v for k, v in self.lora.items() if k not in ("kind", "targets")}
        options["lora"] = {**summary, "layers": len(self.lora["targets"]), "merged": merged}
        if not merged:
            manifest["model"]["transforms"].append(self.lora)
