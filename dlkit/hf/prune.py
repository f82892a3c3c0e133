"""Structured pruning of Hugging Face models: whole attention heads and FFN width, by slicing.

Every block of the model loses the same number of heads (``ratio`` of them, at least one kept)
and of FFN neurons; which ones, per block, by importance (``l1``/``l2`` norm of the weights that
belong to the head or neuron, or ``random``). The residual width stays. The transformers config
is updated with the new widths, so the result rebuilds from its config alone (``dlkit`` and
``from_pretrained``) and computes exactly what the sliced model computed.

- LLaMA-style blocks (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``: LLaMA, Mistral,
  Qwen2, ...): heads go in whole key/value groups under grouped-query attention (every kept
  group keeps all its query heads, so ``num_attention_heads / num_key_value_heads`` stays); with
  one key/value head (multi-query) query heads go within it. ``head_dim`` is written to the config.
  FFN: ``intermediate_size``.
- BERT-style (``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``: BERT, RoBERTa, ViT, ...) and GPT-2 (``attn.c_attn``,
  ``mlp.c_fc``/``c_proj``): FFN width (``intermediate_size`` / ``n_inner``). Their configs derive
  the head size from ``hidden_size / num_attention_heads`` and transformers 5 dropped
  ``pruned_heads``, so fewer heads could not reload through ``from_pretrained``: heads are kept
  (``--set``-free; the report says so).

Torch-Pruning's dependency graph is not used here: the coupled widths of these blocks are few and
known, and slicing them keeps the transformers classes (and their save/load) intact.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError

log = logging.getLogger("dlkit")

IMPORTANCES = ("l1", "l2", "random")


def config_of(model) -> dict:
    """The model's transformers config as a dict (what the manifest stores)."""
    d = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "id2label", "label2id"):
        d.pop(key, None)
    return d


# ---------------------------------------------------------------------------------- slicing helpers


def _rows(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep output features ``keep`` of a Linear (rows) or a GPT-2 Conv1D (columns)."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(layer.weight[keep].clone())
            layer.out_features = len(keep)
        else:  # transformers.pytorch_utils.Conv1D: weight (in, out)
            layer.weight = nn.Parameter(layer.weight[:, keep].clone())
            layer.nf = len(keep)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[keep].clone())


def _cols(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep input features ``keep`` of a Linear or Conv1D."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(layer.weight[:, keep].clone())
            layer.in_features = len(keep)
        else:
            layer.weight = nn.Parameter(layer.weight[keep].clone())


def _out_w(layer: nn.Module) -> torch.Tensor:
    """Weights as (out, in) whatever the layer type."""
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


def _score(parts: list[torch.Tensor], importance: str) -> torch.Tensor:
    """One score per unit from (units, ...) weight groups."""
    p = 1 if importance == "l1" else 2
    return sum(t.detach().float().reshape(t.shape[0], -1).abs().pow(p).sum(1) for t in parts)


def _pick(scores: torch.Tensor, keep: int, importance: str, gen: torch.Generator) -> torch.Tensor:
    if importance == "random":
        order = torch.randperm(len(scores), generator=gen)
    else:
        order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:keep]).values


def kept(n: int, ratio: float) -> int:
    """How many of ``n`` units a ratio keeps: at least one."""
    return max(1, n - int(math.floor(n * ratio + 1e-9)))


# ---------------------------------------------------------------------------------- families


def _layers(model):
    base = model.base_model
    for path in ("layers", "encoder.layer", "h", "layer"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj):
            return list(obj)
    raise IncompatibleError(f"{type(model).__name__}: no list of blocks found to prune",
                            hint="dlkit prunes LLaMA-, BERT- and GPT-2-style blocks")


def family(block) -> str:
    if hasattr(block, "self_attn") and hasattr(block.self_attn, "q_proj") and hasattr(block, "mlp"):
        return "llama"
    if hasattr(block, "attention") and hasattr(block, "intermediate") and hasattr(block, "output"):
        return "bert"
    if hasattr(block, "attn") and hasattr(block.attn, "c_attn") and hasattr(block, "mlp"):
        return "gpt2"
    raise IncompatibleError(f"{type(block).__name__} blocks are not a layout dlkit can prune",
                            hint="dlkit prunes LLaMA-, BERT- and GPT-2-style blocks")


def _ffn(block, kind: str):
    """(layers whose outputs are the FFN neurons, the layer that reads them)."""
    if kind == "llama":
        mlp = block.mlp
        outs = [m for m in (getattr(mlp, "gate_proj", None), mlp.up_proj) if m is not None]
        return outs, mlp.down_proj
    if kind == "bert":
        return [block.intermediate.dense], block.output.dense
    return [block.mlp.c_fc], block.mlp.c_proj


def _prune_ffn(block, kind: str, ratio: float, importance: str, gen) -> int:
    outs, down = _ffn(block, kind)
    n = _out_w(outs[0]).shape[0]
    keep_n = kept(n, ratio)
    scores = _score([_out_w(m) for m in outs] + [_out_w(down).t()], importance)
    keep = _pick(scores, keep_n, importance, gen)
    for m in outs:
        _rows(m, keep)
    _cols(down, keep)
    return keep_n


def _prune_llama_heads(block, config, ratio: float, importance: str, gen) -> tuple[int, int]:
    attn = block.self_attn
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    if kv > 1:  # whole key/value groups, each with its query heads
        scores = _score([q.weight.view(kv, group * d, -1), k.weight.view(kv, d, -1), v.weight.view(kv, d, -1),
                         o.weight.t().reshape(kv, group * d, -1)], importance)
        groups = _pick(scores, kept(kv, ratio), importance, gen)
        q_heads = (groups[:, None] * group + torch.arange(group)).reshape(-1)
        kv_heads = groups
    else:  # multi-query: the query heads of the one group
        scores = _score([q.weight.view(heads, d, -1), o.weight.t().reshape(heads, d, -1)], importance)
        q_heads = _pick(scores, kept(heads, ratio), importance, gen)
        kv_heads = torch.arange(1)
    q_idx = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
    kv_idx = (kv_heads[:, None] * d + torch.arange(d)).reshape(-1)
    _rows(q, q_idx)
    _rows(k, kv_idx)
    _rows(v, kv_idx)
    _cols(o, q_idx)
    for attr, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(kv_heads))):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = len(q_heads) // len(kv_heads)
    return len(q_heads), len(kv_heads)


def prune_model(model, ratio: float, *, importance: str = "l2", heads: bool = True, ffn: bool = True,
                seed: int = 0) -> dict:
    """Prune ``model`` in place; update its config; return what changed (for the report)."""
    if importance not in IMPORTANCES:
        raise UsageError(f"--importance {importance} is not available for Hugging Face models",
                         hint=f"use {', '.join(IMPORTANCES)}")
    if not 0 < ratio < 1:
        raise UsageError(f"the ratio must be between 0 and 1 (got {ratio})")
    blocks = _layers(model)
    kind = family(blocks[0])
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    notes = []
    if heads and kind != "llama":
        notes.append(f"attention heads kept: {config.model_type} derives its head size from hidden_size / "
                     "num_attention_heads, so fewer heads would not reload through from_pretrained")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    new_heads = new_kv = new_ffn = None
    for block in blocks:
        if ffn:
            new_ffn = _prune_ffn(block, kind, ratio, importance, gen)
        if heads and kind == "llama":
            new_heads, new_kv = _prune_llama_heads(block, config, ratio, importance, gen)
    if new_ffn is not None:
        key = "n_inner" if kind == "gpt2" else "intermediate_size"
        setattr(config, key, new_ffn)
    if new_heads is not None:
        config.head_dim = head_dim
        config.num_attention_heads = new_heads
        config.num_key_value_heads = new_kv
    return {"family": kind, "heads": new_heads, "kv_heads": new_kv, "ffn": new_ffn, "notes": notes}
