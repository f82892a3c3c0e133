"""``profile_target``: what a model costs, for a registry name, an artifact, or a user's module."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dlkit.errors import DlkitError, IncompatibleError, UsageError
from dlkit.profiling.counting import Counter_, OpCounts
from dlkit.profiling.latency import Latency, measure_latency, measure_onnx_latency
from dlkit.profiling.memory import (LiveTracker, MemoryEstimate, SavedTensors, estimate_memory, measure_peak,
                                    storage_key, tensor_bytes, weight_bytes)
from dlkit.profiling.target import Target, load_module_class, resolve_target  # noqa: F401 (load_module_class: re-exported)

log = logging.getLogger("dlkit")

CONVENTION = ("1 MAC = one multiply-add (matmul, convolution, attention, RNN gates); "
              "FLOPs = 2 x MACs + other FLOPs (norms, activations, softmax, adds, pooling)")
# Counted on the meta device (no weights allocated) above this many parameters.
META_PARAMS = 5_000_000
# Real runs (measured memory, latency) are skipped above this many FLOPs per run unless forced.
MEASURE_FLOPS = 30e9


@dataclass
class ModuleRow:
    name: str
    type: str
    depth: int
    output_shape: list[int] | None
    params: int
    macs: int
    flops: int
    share: float  # of the model's forward MACs (of its FLOPs for a model without MACs)


@dataclass
class ProfileResult:
    target: str
    kind: str  # "registry", "artifact" or "module"
    model: str
    input_shape: list[int]  # with the batch dimension
    batch_size: int
    precision: str
    counted_on: str  # "meta" (no weights allocated) or the device
    convention: str
    params: dict
    forward: dict  # macs/flops per sample and per batch
    by_op: list[dict]
    modules: list[ModuleRow]
    uncounted: dict[str, int]
    zero_cost: dict[str, int]  # listed: embeddings (0 MACs by convention)
    memory: dict
    training: dict | None = None
    latency: list[Latency] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lm: dict | None = None  # language models: per-token MACs, KV-cache bytes, prefill/decode latency (lm_cost)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs"] = self.forward["macs_per_batch"]
        d["flops"] = self.forward["flops_per_batch"]
        return d


# ---- the profile ----------------------------------------------------------------------------------

def _forward(model: nn.Module, x, what: str):
    try:
        return model(*x) if isinstance(x, tuple) else model(x)
    except DlkitError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as exc:
        shape = "x".join(str(s) for s in (x[0] if isinstance(x, tuple) else x).shape)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if any(w in first.lower() for w in ("shape", "size", "mat1", "dimension", "expected", "channels")):
            raise IncompatibleError(f"input shape {shape} does not fit {what}: {first}",
                                    hint="pass the shape the model expects with --input-shape") from None
        raise IncompatibleError(f"{what} failed on input {shape}: {type(exc).__name__}: {first}",
                                hint="check --input-shape and --precision (bf16 needs kernels for every op)") from None


def _loss(out) -> torch.Tensor:
    t = out if isinstance(out, torch.Tensor) else next(o for o in out if isinstance(o, torch.Tensor))
    if t.dim() == 2 and t.dtype.is_floating_point:
        target = torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
        return nn.functional.cross_entropy(t.float(), target)
    return t.float().mean()


def _stored(model: nn.Module) -> tuple[dict, int]:
    """Bytes per dtype of what the state dict stores (packed int8 weights included), and the total."""
    by_dtype: dict[str, int] = {}
    seen: set[int] = set()

    def add(t):
        if isinstance(t, torch.Tensor):
            if id(t) in seen:
                return
            seen.add(id(t))
            dtype = str(t.dtype).replace("torch.", "")
            by_dtype[dtype] = by_dtype.get(dtype, 0) + tensor_bytes(t)
        elif isinstance(t, (tuple, list)):
            for u in t:
                add(u)

    params = {id(p): p for p in model.parameters()}
    for p in params.values():
        add(p)
    for v in model.state_dict(keep_vars=True).values():
        add(v)
    return by_dtype, sum(by_dtype.values())


def _module_rows(model: nn.Module, counts: OpCounts, shapes: dict, depth: int) -> list[ModuleRow]:
    total_macs = counts.macs
    total_flops = counts.flops
    rows = []
    for name, mod in model.named_modules():
        d = 0 if name == "" else name.count(".") + 1
        if d > depth:
            continue
        macs, flops = counts.by_module.get(name, [0, 0])
        share = macs / total_macs if total_macs else (flops / total_flops if total_flops else 0.0)
        shape = shapes.get(name)
        rows.append(ModuleRow(name or "(model)", type(mod).__name__, d, list(shape) if shape else None,
                              sum(p.numel() for p in mod.parameters()), macs, flops, share))
    return rows


def _count_inference(model, x, precision, device) -> tuple[OpCounts, dict, int]:
    from dlkit.device import autocast

    pre = {storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    pre |= {storage_key(t) for t in (x if isinstance(x, tuple) else (x,))}
    tracker = LiveTracker(preexisting=pre)
    model.eval()
    ctx = autocast(device, precision) if device.type != "meta" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx, Counter_(model, on_op=tracker) as c:
        out = _forward(model, x, "the model")
        del out
    return c.forward, c.stack.shapes, tracker.peak


def _count_training(model, x, precision, device) -> tuple[OpCounts, OpCounts, int, int]:
    from dlkit.device import autocast

    params = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
    params |= {storage_key(t) for t in (x if isinstance(x, tuple) else (x,))}
    saved = SavedTensors(exclude=params)
    largest = [0]

    forward = [True]

    def on_op(func, args, out):  # forward: saved so far + 2 x this op's output (see memory.py)
        if forward[0] and isinstance(out, torch.Tensor) and not out.is_quantized:
            largest[0] = max(largest[0], saved.bytes + 2 * tensor_bytes(out))

    model.train()
    ctx = autocast(device, precision) if device.type != "meta" else torch.autocast("cpu", enabled=False)
    try:
        with Counter_(model, on_op=on_op) as c:
            with ctx, saved.hooks():
                loss = _loss(_forward(model, x, "the model"))
            c.phase = "backward"
            forward[0] = False
            loss.backward()
    finally:
        model.eval()
        for p in model.parameters():
            p.grad = None
    return c.forward, c.backward, saved.bytes, largest[0]


def _train_step_fn(model, x, optimizer: str, precision: str, device) -> Callable[[], None]:
    from dlkit.device import autocast
    from dlkit.engine.optim import make_optimizer

    def step():
        model.train()
        opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr=1e-3,
                             weight_decay=0.0) if optimizer != "none" else None
        with autocast(device, precision):
            loss = _loss(model(*x) if isinstance(x, tuple) else model(x))
        loss.backward()
        if opt is not None:
            opt.step()
        for p in model.parameters():
            p.grad = None
        model.eval()

    return step


@dataclass
class ProfileOptions:
    dataset: str | None = None  # size the input like this dataset
    input_shape: str | tuple | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    depth: int = 2  # module table depth
    training: bool = False  # also one training step
    optimizer: str = "adamw"  # whose state the training memory holds (or "none")
    precision: str | None = None  # None: the artifact's, else fp32
    latency: bool = True
    measure: bool | None = None  # None: run the real model only where one run is cheap
    device: str = "auto"
    overrides: dict | None = None  # registry models: config key -> value; file.py:Name: keyword arguments
    runtime: str = "torch"  # what runs the timed passes: "torch" or "onnxruntime" (the model exported to ONNX)
    input_dtype: str | None = None  # file.py:Name: "float" (default) or "long" (token ids)
    vocab_size: int | None = None  # token ids below this (default: the module's first nn.Embedding)

    def validate(self) -> "ProfileOptions":
        from dlkit.choices import PREDICT_RUNTIMES, PROFILE_OPTIMIZERS

        if self.runtime not in PREDICT_RUNTIMES:
            raise UsageError(f"unknown runtime '{self.runtime}'", hint=f"use {' or '.join(PREDICT_RUNTIMES)}")
        if self.runtime == "onnxruntime" and self.device == "cuda":
            raise UsageError("--runtime onnxruntime times the model on the CPU, not with --device cuda",
                             hint="drop --device cuda, or time it with --runtime torch")

        if self.optimizer not in PROFILE_OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{self.optimizer}'", hint=f"use {', '.join(PROFILE_OPTIMIZERS)}")
        if self.depth < 0:
            raise UsageError("--depth must be 0 or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        return self


def profile_target(target: str, opts: ProfileOptions | None = None) -> ProfileResult:
    """Profile ``target`` (a registry name, an artifact folder or ``-``, or ``file.py:ClassName``).

    ``opts.measure``: None runs the real model (measured memory, latency) only where one run costs
    less than ~30 GFLOPs; True always; False never. Large registry models are counted on meta.
    """
    from dlkit.device import resolve_device

    opts = (opts or ProfileOptions()).validate()
    dev = resolve_device("cpu" if opts.runtime == "onnxruntime" else opts.device)
    tgt, precision, batch = _resolve(target, opts)
    if opts.runtime == "onnxruntime" and tgt.kind == "module":
        raise UsageError(f"--runtime onnxruntime exports the model, which needs a registry model or an artifact, "
                         f"not {target}", hint="save the module as a dlkit artifact, or drop --runtime")
    notes: list[str] = []
    model, counted_on = _model_for_counting(tgt, dev)
    count_dev = torch.device("meta") if counted_on == "meta" else dev
    x = tgt.example(batch, str(count_dev))
    fwd, shapes, live_peak = _count_inference(model, x, precision, count_dev)
    train = _training(model, x, precision, count_dev, opts.optimizer, notes) if opts.training else None
    params, memory = _params_and_memory(model, x, live_peak, train, opts.optimizer)
    if counted_on == "meta":
        notes.append("counted on the meta device: no weights were allocated")
        if precision != "fp32":
            notes.append("on meta, activations are estimated at fp32 (autocast does not apply)")
    real = _real_model(tgt, model, counted_on, dev, fwd.flops, batch, opts)
    lat: list[Latency] = []
    if real is not None:
        xr = x if counted_on != "meta" else tgt.example(batch, str(dev))
        _measure_memory(real, xr, dev, precision, fwd.flops, train, opts, memory, notes)
        if opts.latency:
            lat = _measure_latencies(tgt, real, batch, fwd.flops / batch, dev, precision, opts, notes)
    elif opts.measure is not False:
        notes.append(f"measured memory and latency skipped: {fwd.flops / 1e9:.0f} GFLOPs per batch "
                     "(pass --measure to run it anyway)")
    if fwd.uncounted:
        notes.append("uncounted ops: " + ", ".join(f"{k} x{v}" for k, v in fwd.uncounted.items()))
    lm = _lm_cost(model, real, x, fwd, train, precision, dev, opts, notes)
    return ProfileResult(
        target=target, kind=tgt.kind, model=tgt.name, input_shape=[batch, *tgt.input_shape], batch_size=batch,
        precision=precision, counted_on=counted_on, convention=CONVENTION, params=params,
        forward=_forward_doc(fwd, batch), by_op=_by_op(fwd), modules=_module_rows(model, fwd, shapes, opts.depth),
        uncounted=dict(fwd.uncounted), zero_cost=dict(fwd.listed_zero), memory=memory,
        training=train.doc if train else None, latency=lat, notes=notes, lm=lm)


def _resolve(target: str, opts: ProfileOptions) -> tuple[Target, str, int]:
    """(the target, the precision to count in, the batch size)."""
    from dlkit.device import check_precision

    tgt, shape_batch = resolve_target(target, dataset=opts.dataset, input_shape=opts.input_shape,
                                      seq_len=opts.seq_len, overrides=opts.overrides,
                                      input_dtype=opts.input_dtype, vocab_size=opts.vocab_size)
    precision = check_precision(opts.precision or tgt.precision)
    batch = opts.batch_size or shape_batch or tgt.default_batch
    if batch < 1:
        raise UsageError("--batch-size must be at least 1")
    return tgt, precision, batch


def _wanted(measure: bool | None, flops: float) -> bool:
    """Whether to run the real model for ``flops``: --measure always, --no-measure never, else if cheap."""
    return measure is True or (measure is None and flops <= MEASURE_FLOPS)


def _model_for_counting(tgt: Target, dev: torch.device) -> tuple[nn.Module, str]:
    """(the model, where it is counted): on meta when a registry model is large (no weights allocated)."""
    if tgt.real is not None:
        return tgt.real.to(dev), str(dev)
    model = tgt.build("meta")
    if sum(p.numel() for p in model.parameters()) > META_PARAMS:
        return model, "meta"
    return tgt.build(str(dev)), str(dev)


@dataclass
class _Training:
    """One counted training step: the report's ``training`` section and what memory estimates need."""

    doc: dict
    saved: int  # bytes autograd saved for the backward pass
    largest: int  # peak of saved bytes plus one op's output during the forward pass


def _training(model: nn.Module, x, precision: str, device: torch.device, optimizer: str,
              notes: list[str]) -> _Training | None:
    if not any(p.requires_grad for p in model.parameters()):
        notes.append("no trainable parameters: no training step")
        return None
    try:
        tf, tb, saved, largest = _count_training(model, x, precision, device)
    except (RuntimeError, NotImplementedError) as exc:
        notes.append(f"no training step: {str(exc).splitlines()[0]}")
        return None
    doc = {
        "forward_flops": tf.flops, "backward_flops": tb.flops, "flops": tf.flops + tb.flops,
        "forward_macs": tf.macs, "backward_macs": tb.macs,
        "backward_to_forward": tb.flops / tf.flops if tf.flops else None,
        "uncounted": dict(tf.uncounted + tb.uncounted), "optimizer": optimizer,
        "note": "measured: the ops autograd ran for one step (optimizer update not counted)",
    }
    return _Training(doc, saved, largest)


def _params_and_memory(model: nn.Module, x, live_peak: int, train: _Training | None,
                       optimizer: str) -> tuple[dict, dict]:
    """The report's ``params`` and ``memory`` sections (memory estimated; measured ones filled later)."""
    from dlkit.profiling import count_params

    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    by_dtype, stored = _stored(model)
    params = {"total": count_params(model),  # int8 weights packed in quantized modules included
              "trainable": sum(p.numel() for p in trainable.values()), "bytes": stored, "bytes_by_dtype": by_dtype}
    w_bytes, t_bytes = weight_bytes(model)
    est: MemoryEstimate = estimate_memory(
        # stored: counts the packed int8 weights of quantized modules too
        weights=max(w_bytes, stored), trainable=t_bytes,
        inputs=sum(tensor_bytes(t) for t in (x if isinstance(x, tuple) else (x,))), inference_live_peak=live_peak,
        saved=train.saved if train else None, activation_peak=train.largest if train else 0, optimizer=optimizer)
    memory = {"estimate": asdict(est), "measured": {"inference_peak": None, "training_peak": None},
              "measured_with": None}
    return params, memory


def _real_model(tgt: Target, model: nn.Module, counted_on: str, dev: torch.device, flops: float, batch: int,
                opts: ProfileOptions) -> nn.Module | None:
    """The model with real weights for measured runs, or None when no run is wanted."""
    if counted_on != "meta":
        return model
    if _wanted(opts.measure, flops) or (opts.latency and _wanted(opts.measure, flops / batch)):
        return tgt.build(str(dev))
    return None


def _measure_memory(real: nn.Module, x, dev: torch.device, precision: str, flops: float,
                    train: _Training | None, opts: ProfileOptions, memory: dict, notes: list[str]) -> None:
    """Measured peaks of one inference (and one training step) into ``memory``, where wanted."""
    from dlkit.device import autocast

    if not _wanted(opts.measure, flops):
        notes.append(f"measured memory skipped: {flops / 1e9:.0f} GFLOPs per batch (pass --measure)")
        return
    real.eval()

    def infer():
        with torch.no_grad(), autocast(dev, precision):
            real(*x) if isinstance(x, tuple) else real(x)

    memory["measured"]["inference_peak"] = measure_peak(infer, dev)
    memory["measured_with"] = ("torch.cuda.max_memory_allocated" if dev.type == "cuda"
                               else "torch.profiler (profile_memory=True) memory timeline")
    if train is not None and _wanted(opts.measure, 3 * flops):
        memory["measured"]["training_peak"] = measure_peak(_train_step_fn(real, x, opts.optimizer, precision, dev),
                                                           dev)


def _measure_latencies(tgt: Target, real: nn.Module, batch: int, per_sample_flops: float, dev: torch.device,
                       precision: str, opts: ProfileOptions, notes: list[str]) -> list[Latency]:
    """Latency at batch 1 and at ``batch``, each where one run is cheap enough (or forced), run by
    ``opts.runtime``."""
    batches = []
    for b in [1] + ([batch] if batch != 1 else []):
        if _wanted(opts.measure, per_sample_flops * b):
            batches.append(b)
        else:
            notes.append(f"latency at batch {b} skipped: {per_sample_flops * b / 1e9:.0f} GFLOPs "
                         "per run (pass --measure)")
    if opts.runtime == "onnxruntime":
        return _onnx_latencies(tgt, real, batches, precision, notes) if batches else []
    real.eval()
    return [measure_latency(real, tgt.example(b, str(dev)), precision=precision) for b in batches]


@contextlib.contextmanager
def _profile_hint():
    """A failed export check says what to do in ``dlkit profile`` (not ``dlkit export``'s options)."""
    from dlkit.export import ExportMismatch

    try:
        yield
    except ExportMismatch as exc:
        raise ExportMismatch(exc.message, hint="time it with --runtime torch") from None


def _onnx_latencies(tgt: Target, real: nn.Module, batches: list[int], precision: str,
                    notes: list[str]) -> list[Latency]:
    """Latency of the model exported to ONNX and run by ONNX Runtime on the CPU, at each of ``batches``.

    The export is checked against PyTorch first, as ``dlkit export`` does (a mismatch fails): an
    artifact is exported as ``dlkit export`` would (checked on its data's samples), a registry
    model on random inputs; the temporary file is removed once ONNX Runtime has read it."""
    import tempfile

    from dlkit import export

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="dlkit-profile-") as tmp, _profile_hint():
        if tgt.kind == "artifact":
            res = export.export_artifact(tgt.path, export.ExportOptions(out=Path(tmp) / "export", samples=8))
            file, how = res.path / res.file, res.notes
            diff, samples = res.max_abs_diff, f"{res.samples} samples of its data"
        else:
            x = tgt.example(8, "cpu")
            file = Path(tmp) / export.MODEL_FILES["onnx"]
            check = export.export_onnx_checked(real.to("cpu"), x, file, text=not x.is_floating_point(),
                                               name=tgt.name)
            diff, samples, how = check["max_abs_diff"], f"{check['samples']} random inputs", check["notes"]
        session = export.onnx_session(file, threads=threads)
    notes.append(f"latency: the model exported to ONNX and run by ONNX Runtime (CPU, {threads} threads), checked "
                 f"against PyTorch on {samples} (max |diff| {diff:.2g}); counts and memory are PyTorch's")
    notes.extend(f"ONNX export: {n}" for n in how)
    if precision != "fp32" and tgt.kind != "artifact":  # an artifact's export notes this itself
        notes.append(f"ONNX Runtime computes in fp32, not {precision}")
    return [measure_onnx_latency(session, {export.INPUT_NAME: tgt.example(b, "cpu").numpy()}, threads=threads)
            for b in batches]


def _lm_cost(model: nn.Module, real: nn.Module | None, x, fwd: OpCounts, train: "_Training | None", precision: str,
             dev: torch.device, opts: ProfileOptions, notes: list[str]) -> dict | None:
    """A language model's cost per token (dlkit.lm: ``decode(ids, cache)``); None for other models."""
    from dlkit.lm.cost import lm_cost

    try:
        return lm_cost(model, real, x, fwd_macs=fwd.macs, train_macs=(train.doc["forward_macs"] + train.doc[
            "backward_macs"]) if train else None, precision=precision, device=dev,
            latency=opts.latency and real is not None, notes=notes)
    except (RuntimeError, NotImplementedError) as exc:  # a module whose decode cannot run here
        notes.append(f"language-model cost skipped: {str(exc).splitlines()[0]}")
        return None


def _forward_doc(fwd: OpCounts, batch: int) -> dict:
    return {"macs_per_sample": fwd.macs / batch, "flops_per_sample": fwd.flops / batch,
            "macs_per_batch": fwd.macs, "flops_per_batch": fwd.flops}


def _by_op(fwd: OpCounts) -> list[dict]:
    rows = ({"op": k, "macs": v[0], "flops": v[1], "calls": fwd.calls[k]} for k, v in fwd.by_op.items())
    return sorted(rows, key=lambda r: -r["flops"])
