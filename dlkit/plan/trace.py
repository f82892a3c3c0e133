"""One training step traced on the meta device: what autograd saves, module by module.

The planner's activations come from the model itself, not from a formula. ``trace_step`` builds
nothing real: the model lives on ``meta`` (shapes and dtypes, no storage), one forward pass runs
under ``torch.autograd.graph.saved_tensors_hooks``, the loss is taken as training takes it
(cross-entropy on fp32 logits), and the backward pass runs too. Three things are recorded:

* **saved tensors**: every tensor autograd packs for the backward pass, counted once per storage
  (a view of a saved tensor, or a tensor two ops save, is not counted twice), parameters and
  inputs excluded, each attributed to the innermost module running when it was packed, to the
  checkpointable block around that module (if any), and flagged when it is an attention matrix
  (``(..., S, S)`` for the run's attention length ``S``: scores, probabilities, dropout masks);
* **each block's input** (what full recomputation keeps) and **each block's weights** (what FSDP
  gathers one block at a time);
* **live bytes**: every storage an op creates, followed until its last tensor dies (including the
  ones autograd holds), over forward and backward. Its peak minus the saved bytes at that moment is
  the step's *transient*: outputs not yet saved, gradients flowing back, gradients accumulated.

Meta runs some ops as the CPU does, which is not what a GPU does; ``kernels`` says which device
to model:

* ``F.scaled_dot_product_attention`` runs on meta as the math fallback (it materialises the
  attention matrix, in fp32 for bf16 inputs); on CUDA, and on the CPU when attention dropout is
  0, PyTorch runs a fused kernel that saves only q, k, v, the output and a log-sum-exp. The trace
  routes the call to that kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, which has
  a meta implementation) where the device would, so it saves what the real kernel saves.
* ``F.dropout`` on the CPU (and meta) keeps its mask in the input's dtype; CUDA's fused kernel
  (``native_dropout``) keeps a bool mask, one byte per element: for ``cuda`` the trace runs that.

Recurrent layers: on meta ``nn.LSTM`` runs as a per-step decomposition; on the CPU, training runs
oneDNN's LSTM, which saves one workspace instead. ``lstm_calls`` records each call (tokens,
batch, sizes, dtype) and the bytes saved inside it, so the planner can swap one for the other
(``dlkit.plan.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dlkit.profiling.counting import Counter_
from dlkit.profiling.memory import LiveTracker, _tensors, storage_bytes, storage_key, tensor_bytes


@dataclass
class BlockTrace:
    """One checkpointable block (a transformer layer, a residual block)."""

    name: str
    input_bytes: int = 0  # the tensor full recomputation keeps
    saved: int = 0  # bytes saved for backward by ops inside the block
    attention_matrix: int = 0  # of which (..., S, S) tensors: what selective recomputation drops
    weights: int = 0  # parameter bytes (FSDP gathers these)
    grads: int = 0  # trainable parameter bytes (FSDP's unsharded gradients before reduce-scatter)
    forward_flops: int = 0


@dataclass
class StepTrace:
    """What one traced training step held and computed (bytes, FLOPs)."""

    batch: int
    saved: int  # all saved tensors
    saved_by_module: dict[str, int]  # innermost module path ("" outside every module: the loss)
    attention_matrix: int  # saved (..., S, S) tensors
    blocks: list[BlockTrace]
    loss_saved: int  # saved by the loss (outside the model)
    logits: int  # the model's output
    peak_live: int  # largest live bytes during forward + backward (parameters and inputs excluded)
    saved_at_peak: int  # saved bytes still held at that moment
    grads_at_peak: int  # gradients accumulated by that moment (part of the transient)
    transient: int  # peak_live - saved_at_peak
    forward_peak: int  # largest live bytes during the forward pass (loss included)
    grads: int  # gradient bytes after backward
    forward_flops: int
    backward_flops: int
    forward_macs: int
    backward_macs: int
    attention_calls: list[dict] = field(default_factory=list)  # q/k shapes, causal flag, per SDPA call
    lstm_calls: list[dict] = field(default_factory=list)  # per nn.LSTM call: sizes and bytes saved inside
    uncounted: dict[str, int] = field(default_factory=dict)


class _Kernels(TorchFunctionMode):
    """Runs attention and dropout on meta as the device's kernels would (see the module doc), and
    records each attention call's shapes (the KV cache and the attention length come from them)."""

    def __init__(self, kernels: str, attention: str | None, seq: list[int]):
        super().__init__()
        self.kernels = kernels  # "cuda" or "cpu"
        self.attention = attention  # None: as the device does; "fused" or "math" to force one
        self.seq = seq  # attention lengths seen (shared with the saved-tensor hook)
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout and self.kernels == "cuda":
            return self._dropout(func, args, kwargs)
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        opts = dict(zip(names, args[3:]))
        opts.update(kwargs)
        self.calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape),
                           "causal": bool(opts.get("is_causal", False)), "bytes": k.element_size()})
        self.seq.extend(n for n in {q.shape[-2], k.shape[-2]} if n not in self.seq)
        dropout = float(opts.get("dropout_p", 0.0))
        fused = self.attention == "fused" or (self.attention is None and (self.kernels == "cuda" or dropout == 0))
        if not fused:
            return func(*args, **kwargs)
        # GQA (fewer key/value heads) goes in as it is: the fused kernels take it without copies
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout, bool(opts.get("is_causal", False)), attn_mask=opts.get("attn_mask"),
            scale=opts.get("scale"))[0]

    @staticmethod
    def _dropout(func, args, kwargs):
        names = ("input", "p", "training", "inplace")
        opts = dict(zip(names, args))
        opts.update(kwargs)
        x, p = opts["input"], float(opts.get("p", 0.5))
        if not opts.get("training", True) or p == 0 or opts.get("inplace"):
            return func(*args, **kwargs)
        return torch.native_dropout(x, p, True)[0]  # CUDA's fused dropout: a bool mask


class _Live(LiveTracker):
    """``dlkit.profiling.memory.LiveTracker`` (every storage an op creates, followed until its last
    tensor dies), also noting the saved bytes still held when the peak is reached."""

    def __init__(self, preexisting: set[int], saved: "_Saved"):
        super().__init__(preexisting)
        self.saved = saved
        self.saved_at_peak = 0
        self.grads = 0  # gradient bytes accumulated into .grad so far
        self.grads_at_peak = 0

    def __call__(self, func, args, out) -> None:
        before = self.peak
        super().__call__(func, args, out)
        if self.peak > before:
            self.saved_at_peak, self.grads_at_peak = self.saved.held, self.grads

    def accumulated(self, p: torch.Tensor) -> None:  # a parameter's gradient is complete
        self.grads += tensor_bytes(p.grad)

    def _release(self, key: int) -> None:
        super()._release(key)
        if key not in self._refs:
            self.saved.release(key)


class _Saved:
    """Saved tensors, one count per storage, attributed to module and block."""

    def __init__(self, exclude: set[int], stack, block_of: dict[str, int], seq: list[int]):
        self.exclude = exclude
        self.stack = stack
        self.block_of = block_of
        self.seq = seq  # attention lengths seen so far (a tensor (..., S, S) for one of them)
        self.keys: dict[int, int] = {}
        self.by_module: dict[str, int] = {}
        self.block_saved: dict[int, int] = {}
        self.block_attn: dict[int, int] = {}
        self.attention = 0
        self.total = 0
        self.held = 0  # saved bytes whose storages are still alive

    def pack(self, t: torch.Tensor):
        try:
            key = storage_key(t)
        except (RuntimeError, NotImplementedError):
            return t
        if key in self.exclude or key in self.keys:
            return t
        n = storage_bytes(t)
        self.keys[key] = n
        self.total += n
        self.held += n
        path = self.stack.stack[-1] if self.stack.stack else ""
        self.by_module[path] = self.by_module.get(path, 0) + n
        attn = t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] in self.seq
        if attn:
            self.attention += n
        block = self._block(path)
        if block is not None:
            self.block_saved[block] = self.block_saved.get(block, 0) + n
            if attn:
                self.block_attn[block] = self.block_attn.get(block, 0) + n
        return t

    def _block(self, path: str) -> int | None:
        while True:
            if path in self.block_of:
                return self.block_of[path]
            if not path:
                return None
            path = path.rpartition(".")[0]

    def release(self, key: int) -> None:
        n = self.keys.get(key)
        if n is not None and n > 0:
            self.held -= n
            self.keys[key] = -1  # counted once; no longer held

    @staticmethod
    def unpack(t):
        return t


def training_loss(out) -> torch.Tensor:
    """The loss dlkit trains with: cross-entropy on fp32 logits (classes, or next tokens for
    ``(N, L, vocab)`` outputs); a Hugging Face output's ``logits``; else the mean."""
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        out = out.logits
    elif isinstance(out, dict):
        out = next(v for v in out.values() if isinstance(v, torch.Tensor))
    elif isinstance(out, (tuple, list)):
        out = next(o for o in out if isinstance(o, torch.Tensor))
    if out.dtype.is_floating_point and out.dim() in (2, 3):
        logits = out.float().reshape(-1, out.shape[-1])
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=out.device)
        return F.cross_entropy(logits, target)
    return out.float().mean()


def output_tensor(out) -> torch.Tensor:
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)):
        return next(o for o in out if isinstance(o, torch.Tensor))
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out


def _param_bytes(mod: nn.Module, trainable: bool = False) -> int:
    return sum(tensor_bytes(p) for p in mod.parameters() if p.requires_grad or not trainable)


def trace_step(model: nn.Module, x, blocks: list[str], *, kernels: str = "cuda", attention: str | None = None,
               seq_hint: int | None = None) -> StepTrace:
    """Trace one training step of ``model`` (on meta, in its own dtype) on inputs ``x``.

    ``blocks``: module paths of the checkpointable blocks (``[]``: none). ``kernels``: whose
    kernels to model, ``cuda`` or ``cpu``; ``attention``: force ``fused`` or ``math`` attention.
    ``seq_hint``: an attention length known in advance (the SDPA calls add theirs as they run)."""
    inputs = x if isinstance(x, tuple) else (x,)
    pre = {storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    pre |= {storage_key(t) for t in inputs}
    block_of = {name: i for i, name in enumerate(blocks)}
    modules = dict(model.named_modules())
    traces = [BlockTrace(name, weights=_param_bytes(modules[name]), grads=_param_bytes(modules[name], True))
              for name in blocks]
    seq: list[int] = [seq_hint] if seq_hint else []
    attn_mode = _Kernels(kernels, attention, seq)

    def block_input(i):
        def hook(mod, args):
            t = next((a for a in _tensors(args)), None)
            if t is not None and not traces[i].input_bytes:
                traces[i].input_bytes = storage_bytes(t)
        return hook

    handles = [modules[name].register_forward_pre_hook(block_input(i)) for i, name in enumerate(blocks)]
    lstm_calls: list[dict] = []
    for name, mod in modules.items():
        if isinstance(mod, nn.LSTM):
            handles.append(mod.register_forward_pre_hook(_lstm_hook(name, mod, lstm_calls)))
    model.train()
    was = [p.grad for p in model.parameters()]
    try:
        with attn_mode:
            with Counter_(model) as c:
                saved = _Saved(pre, c.stack, block_of, seq)
                live = _Live(pre, saved)
                c.on_op = live
                handles += [p.register_post_accumulate_grad_hook(live.accumulated)
                            for p in {id(p): p for p in model.parameters() if p.requires_grad}.values()]
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                    out = model(*inputs)
                    logits = output_tensor(out)
                    logits_bytes = tensor_bytes(logits)
                    in_model = dict(saved.by_module)
                    loss = training_loss(out)
                forward_peak = live.peak
                del out, logits
                c.phase = "backward"
                loss.backward()
                del loss
        grads = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), was):
            p.grad = g
        model.eval()
    for call in lstm_calls:
        call["saved"] = saved.by_module.get(call["module"], 0)
    for i, t in enumerate(traces):
        t.saved = saved.block_saved.get(i, 0)
        t.attention_matrix = saved.block_attn.get(i, 0)
        t.forward_flops = c.forward.by_module.get(t.name, [0, 0])[1]
    loss_saved = saved.by_module.get("", 0) - in_model.get("", 0)
    by_module = dict(in_model)
    if loss_saved:
        by_module["(loss)"] = loss_saved
    return StepTrace(
        batch=inputs[0].shape[0], saved=saved.total, saved_by_module=by_module, attention_matrix=saved.attention,
        blocks=traces, loss_saved=loss_saved, logits=logits_bytes, peak_live=live.peak,
        saved_at_peak=live.saved_at_peak, grads_at_peak=live.grads_at_peak, transient=live.peak - live.saved_at_peak,
        forward_peak=forward_peak, grads=grads, forward_flops=c.forward.flops, backward_flops=c.backward.flops,
        forward_macs=c.forward.macs, backward_macs=c.backward.macs,
        attention_calls=attn_mode.calls, lstm_calls=lstm_calls,
        uncounted=dict(c.forward.uncounted + c.backward.uncounted))


def _lstm_hook(name: str, mod: nn.LSTM, calls: list[dict]):
    def hook(m, args):
        x = args[0]
        data = x.data if hasattr(x, "batch_sizes") and x.batch_sizes is not None else x
        packed = data is not x
        if packed:
            tokens, batch = data.shape[0], int(x.batch_sizes[0]) if x.batch_sizes.device.type != "meta" else None
        else:
            tokens = data.shape[0] * data.shape[1]
            batch = data.shape[0] if mod.batch_first else data.shape[1]
        calls.append({"module": name, "tokens": int(tokens), "batch": batch, "input": mod.input_size,
                      "hidden": mod.hidden_size, "layers": mod.num_layers, "directions": 2 if mod.bidirectional else 1,
                      "bytes": data.element_size(), "weights": _param_bytes(mod)})
    return hook
