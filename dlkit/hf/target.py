"""``profile hf:...``: the model built from ``config.json`` alone, its inputs sized by ``--seq-len``.

The base model is profiled (``BertModel`` with its pooler, ``GPT2Model``, ``LlamaModel``,
``ViTModel``): the published parameter counts. ``--set head=lm`` (or ``classify``) profiles that
head instead; other ``--set key=value`` change the transformers config (``num_hidden_layers=2``).
No weights are read: large models are counted on the meta device.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.spec import IMAGE, TEXT, DataSpec

DEFAULT_SEQ_LEN = 128


def _overrides(cfg, overrides: dict):
    """dlkit fields (head, attn_implementation) and transformers config keys, typed like their values."""
    from dlkit.config import apply_overrides

    own = {f.name for f in dataclasses.fields(cfg)}
    mine = {k: v for k, v in overrides.items() if k in own}
    cfg = apply_overrides(cfg, mine, what="hf model")
    hf = dict(cfg.hf_config)
    for key, value in overrides.items():
        if key in own:
            continue
        if key not in hf:
            raise UsageError(f"{cfg.source}'s config.json has no key '{key}'",
                             hint="--set takes head=, attn_implementation= or a key of its config.json")
        old = hf[key]
        try:
            hf[key] = (type(old)(value) if isinstance(old, (int, float)) and not isinstance(old, bool)
                       else str(value).lower() in ("1", "true", "yes") if isinstance(old, bool) else value)
        except ValueError:
            raise UsageError(f"{key}={value!r} is not a{'n' if isinstance(old, int) else ''} "
                             f"{type(old).__name__}") from None
    return dataclasses.replace(cfg, hf_config=hf)


def spec_of(hf_config: dict, head: str, seq_len: int) -> DataSpec:
    """The data a config takes: images of its size for vision configs, else token ids."""
    if "image_size" in hf_config and "vocab_size" not in hf_config:
        size = hf_config["image_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        classes = max(2, len(hf_config.get("id2label") or {}))
        return DataSpec(IMAGE, (hf_config.get("num_channels", 3), h, w), classes)
    vocab = hf_config.get("vocab_size")
    if not vocab:
        raise IncompatibleError("the config has neither vocab_size nor image_size",
                                hint="profile a text or vision model")
    if head == "lm":
        return DataSpec(TEXT, (seq_len,), vocab, vocab_size=vocab, task="lm")
    return DataSpec(TEXT, (seq_len,), max(2, len(hf_config.get("id2label") or {})), vocab_size=vocab)


def hf_target(target: str, shape, seq_len, overrides: dict):
    from dlkit.hf import make_config
    from dlkit.hf.models import construct
    from dlkit.profiling.target import Target, _spec_input

    cfg = make_config(target)
    cfg = dataclasses.replace(cfg, head="base" if cfg.head == "auto" else cfg.head)
    cfg = _overrides(cfg, overrides)
    positions = cfg.hf_config.get("max_position_embeddings") or cfg.hf_config.get("n_positions")
    spec = spec_of(cfg.hf_config, cfg.head, min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN))
    spec, batch = _spec_input(spec, shape, seq_len)
    cfg = dataclasses.replace(cfg, pretrained=False)

    def build(device: str) -> nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return construct(cfg, spec, target).eval()

    def example(n: int, device: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        if spec.modality == IMAGE:
            return torch.randn(n, *spec.input_shape, generator=g).to(device)
        return torch.randint(1, spec.vocab_size, (n, *spec.input_shape), generator=g).to(device)

    return Target("registry", target, example, build, input_shape=spec.input_shape, default_batch=1), batch
