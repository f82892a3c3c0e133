"""Hugging Face Transformers models as dlkit models.

A model is a transformers class (``BertForSequenceClassification``, ``GPT2LMHeadModel``,
``LlamaModel``, ``ViTForImageClassification``, ...) with one mixin in front of it that gives it
dlkit's calling convention, so its state dict keys and its ``config.json`` stay exactly those of
transformers (an artifact's folder reloads through ``from_pretrained``):

- ``classify`` (text): ``model(ids)`` with token ids ``(N, L)`` -> logits ``(N, classes)``; the
  attention mask is ``ids != pad_token_id``;
- ``classify`` (images): ``model(pixels)`` ``(N, C, H, W)`` -> logits ``(N, classes)``;
- ``lm``: ``model(ids)`` -> next-token logits ``(N, L, V)``, and ``model.decode(ids, cache)``
  -> ``(logits, cache)`` for generation (``cache=None`` starts a sequence; positions continue
  after the cache's length);
- ``base``: ``model(ids)`` -> the last hidden states ``(N, L, H)`` (what ``profile`` counts:
  ``bert-base-uncased`` is 109,482,240 parameters with its pooler, ``gpt2`` 124,439,808).

Called with keyword arguments, every model is the transformers model itself.

The dlkit config (``HFModelConfig``) holds the full transformers config, so ``build_model``
rebuilds from a manifest alone: no network, no source folder. Only ``create`` (training from
``hf:...``) reads the source's safetensors weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.spec import IMAGE, LM, DataSpec

log = logging.getLogger("dlkit")

HEADS = ("auto", "classify", "lm", "base")
ATTENTION = ("sdpa", "eager")


@dataclass
class HFModelConfig:
    source: str = ""  # the hf:... name it was made from (weights read from there when created)
    hf_config: dict = field(default_factory=dict)  # the full transformers config (config.json)
    head: str = "auto"  # auto (classify, or lm for language-model data) | classify | lm | base
    pretrained: bool = True  # start from the source's weights (else random init from the config)
    attn_implementation: str = "sdpa"  # sdpa | eager (both counted by profile)


# --------------------------------------------------------------------------- the calling convention


class _TextClassify:
    def forward(self, input_ids=None, *args, **kwargs):
        if args or kwargs or not isinstance(input_ids, torch.Tensor):
            return super().forward(input_ids, *args, **kwargs)
        return super().forward(input_ids=input_ids, attention_mask=(input_ids != pad_id(self.config)).long()).logits


class _ImageClassify:
    def forward(self, pixel_values=None, *args, **kwargs):
        if args or kwargs or not isinstance(pixel_values, torch.Tensor):
            return super().forward(pixel_values, *args, **kwargs)
        return super().forward(pixel_values=pixel_values).logits


class _CausalLM:
    def forward(self, input_ids=None, *args, **kwargs):
        if args or kwargs or not isinstance(input_ids, torch.Tensor):
            return super().forward(input_ids, *args, **kwargs)
        return super().forward(input_ids=input_ids, use_cache=False).logits

    def decode(self, ids: torch.Tensor, cache=None):
        """Logits of ``ids`` (N, T) continuing the sequence in ``cache`` (None: a new one), and the cache."""
        import inspect

        key = "cache" if "cache" in inspect.signature(super().forward).parameters else "past_key_values"
        out = super().forward(input_ids=ids, use_cache=True, **{key: cache})
        return out.logits, out[key]  # transformers 5.2x names it cache; earlier past_key_values


class _Base:
    def forward(self, input_ids=None, *args, **kwargs):
        if args or kwargs or not isinstance(input_ids, torch.Tensor):
            return super().forward(input_ids, *args, **kwargs)
        key = "pixel_values" if input_ids.is_floating_point() else "input_ids"
        return super().forward(**{key: input_ids}).last_hidden_state


_CLASSES: dict[tuple[type, type], type] = {}


def wrapped_class(mixin: type, base: type) -> type:
    """``base`` with ``mixin`` in front, under the same name (so save_pretrained names ``base``)."""
    key = (mixin, base)
    if key not in _CLASSES:
        cls = type(base.__name__, (mixin, base), {"__module__": __name__, "__qualname__": base.__name__})
        _CLASSES[key] = cls
        from dlkit.hf import register_class

        register_class(cls)
    return _CLASSES[key]


def is_hf_model(model) -> bool:
    return type(model) in _CLASSES.values()


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b``, W (in, out)) by the equal
    ``nn.Linear``, in place, so that dynamic int8 reaches every projection."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], device=child.weight.device)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return model


def pad_id(config) -> int:
    """The padding id the model masks: its own, else its end-of-text token, else 0."""
    for v in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return 0


# --------------------------------------------------------------------------- building


def transformers_config(d: dict):
    """A transformers config object from its dict (no file read, no code run)."""
    from dlkit.extras import require

    require("transformers", "hf: models", "hf")
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise UsageError("the Hugging Face config has no model_type", hint="the model's config.json is damaged")
    for key in ("auto_map", "transformers_version", "_name_or_path"):
        d.pop(key, None)
    return AutoConfig.for_model(model_type, **d)


def _head(cfg: HFModelConfig, spec: DataSpec) -> str:
    if cfg.head not in HEADS:
        raise UsageError(f"head={cfg.head!r} is not one of {', '.join(HEADS)}")
    if cfg.head != "auto":
        return cfg.head
    return "lm" if spec.task == LM else "classify"


def model_class(config, head: str, modality: str, name: str) -> type:
    """The transformers class for ``head`` on ``modality`` data, with its dlkit mixin."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    kind = config.model_type
    table = {"base": (ma.MODEL_MAPPING_NAMES, _Base),
             "lm": (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, _CausalLM),
             "classify": ((ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, _ImageClassify) if modality == IMAGE
                          else (ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, _TextClassify))}
    names, mixin = table[head]
    cls_name = names.get(kind)
    if isinstance(cls_name, (tuple, list)):
        cls_name = cls_name[0]
    if not cls_name or not hasattr(transformers, cls_name):
        what = {"base": "base model", "lm": "causal language model",
                "classify": f"{'image' if modality == IMAGE else 'sequence'} classifier"}[head]
        other = "text data (imdb, text-csv)" if modality == IMAGE else "image data (fashion-mnist, cifar10)"
        raise IncompatibleError(f"{name} ({kind}) has no {what} in transformers, so it cannot take "
                                f"{'language-model' if head == 'lm' else modality} data",
                                hint=f"try {other}" if head == "classify" else "pick another model")
    return wrapped_class(mixin, getattr(transformers, cls_name))


def configure(cfg: HFModelConfig, spec: DataSpec, name: str):
    """(the transformers config fitted to ``spec``, the head, the class)."""
    if cfg.attn_implementation not in ATTENTION:
        raise UsageError(f"attn_implementation={cfg.attn_implementation!r} is not one of {', '.join(ATTENTION)}")
    config = transformers_config(cfg.hf_config)
    head = _head(cfg, spec)
    cls = model_class(config, head, spec.modality, name)
    if head == "classify":
        labels = list(spec.class_names or range(spec.num_classes))
        config.id2label = {i: str(n) for i, n in enumerate(labels)}
        config.label2id = {str(n): i for i, n in enumerate(labels)}
        if spec.modality != IMAGE and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = pad_id(config)
    _check_fits(config, spec, head, name)
    return config, head, cls


def _check_fits(config, spec: DataSpec, head: str, name: str) -> None:
    if spec.modality == IMAGE:
        size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
        c, h, w = spec.input_shape
        if size is not None and (tuple(size) if isinstance(size, (list, tuple)) else (size, size)) != (h, w):
            raise IncompatibleError(f"{name} takes {size}x{size} images, the data has {h}x{w}",
                                    hint="pick data of its size, or a model configured for it")
        if channels is not None and channels != c:
            raise IncompatibleError(f"{name} takes {channels}-channel images, the data has {c}",
                                    hint="pick data with as many channels")
        return
    vocab = getattr(config, "vocab_size", None)
    if spec.vocab_size and vocab and spec.vocab_size > vocab:
        raise IncompatibleError(f"the data's vocabulary ({spec.vocab_size} ids) is larger than {name}'s "
                                f"embedding ({vocab})", hint="encode the text with the model's own tokenizer")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and spec.input_shape[0] > positions:
        raise IncompatibleError(f"sequences of {spec.input_shape[0]} tokens exceed {name}'s "
                                f"{positions} positions", hint=f"use at most {positions} tokens (--max-len, --seq-len)")


def construct(cfg: HFModelConfig, spec: DataSpec, name: str = "the model") -> nn.Module:
    """The model from its config alone, randomly initialised (on the current default device)."""
    config, _, cls = configure(cfg, spec, name)
    return cls._from_config(config, attn_implementation=cfg.attn_implementation)


def rebuild(cfg: HFModelConfig, spec: DataSpec) -> nn.Module:
    """``build_model``: from the saved config only (the weights come from the artifact)."""
    model = construct(cfg, spec, cfg.source or "the model")
    return model.eval()


def create(cfg: HFModelConfig, spec: DataSpec) -> nn.Module:
    """``create_model``: the config's model, with the source's safetensors weights when ``pretrained``."""
    if not (cfg.pretrained and cfg.source):
        return construct(cfg, spec, cfg.source or "the model")
    from dlkit.hf import load

    path = load.folder(cfg.source, want="all")
    load.weight_files(path, cfg.source)  # refuses pickles before transformers looks
    config, _, cls = configure(cfg, spec, cfg.source)
    with _quiet_transformers():
        model = cls.from_pretrained(str(path), config=config, attn_implementation=cfg.attn_implementation,
                                    use_safetensors=True, local_files_only=True, trust_remote_code=False,
                                    ignore_mismatched_sizes=True)
    return model


class _quiet_transformers:
    """transformers logs "newly initialized" heads at warning level: keep it to dlkit's debug log."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self.level, self.bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()  # "Loading weights" bars would break --quiet

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self.level)
        if self.bars:
            tlog.enable_progress_bar()
