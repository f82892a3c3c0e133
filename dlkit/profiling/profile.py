"""``profile_target``: what a model costs, for a registry name, an artifact, or a user's module."""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dlkit.errors import DlkitError, IncompatibleError, NotFoundError, UsageError
from dlkit.profiling.counting import Counter_, OpCounts
from dlkit.profiling.latency import Latency, measure_latency
from dlkit.profiling.memory import (LiveTracker, MemoryEstimate, SavedTensors, estimate_memory, measure_peak,
                                    storage_key, tensor_bytes, weight_bytes)

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs"] = self.forward["macs_per_batch"]
        d["flops"] = self.forward["flops_per_batch"]
        return d


# ---- targets --------------------------------------------------------------------------------------

@dataclass
class _Target:
    kind: str
    name: str
    example: Callable[[int, str], Any]  # (batch, device) -> inputs
    build: Callable[[str], nn.Module]  # device ("meta" or real) -> model
    real: nn.Module | None = None  # already built with weights (artifacts, user modules)
    precision: str = "fp32"
    input_shape: tuple[int, ...] = ()  # per sample
    default_batch: int = 1


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", hint="e.g. 1,3,224,224") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} needs positive sizes", hint="e.g. 1,3,224,224")
    return shape


def _spec_input(spec, shape: tuple[int, ...] | None, seq_len: int | None):
    """The data spec with the per-sample shape replaced; returns (spec, batch from the shape or None)."""
    from dlkit.spec import IMAGE, TEXT, DataSpec

    batch = None
    if seq_len is not None:
        if spec.modality != TEXT:
            raise UsageError("--seq-len is for text models", hint="use --input-shape C,H,W for images")
        shape = (seq_len,)
    if shape is not None:
        want = 3 if spec.modality == IMAGE else 1
        if len(shape) == want + 1:
            batch, shape = shape[0], shape[1:]
        if len(shape) != want:
            form = "C,H,W (or N,C,H,W)" if spec.modality == IMAGE else "L (or N,L)"
            raise IncompatibleError(f"input shape {','.join(map(str, shape))} does not fit {spec.modality} "
                                    f"data", hint=f"give {form}")
        spec = DataSpec(spec.modality, shape, spec.num_classes, spec.vocab_size, spec.class_names)
    return spec, batch


def _spec_example(spec) -> Callable[[int, str], torch.Tensor]:
    from dlkit.spec import IMAGE

    def make(batch: int, device: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        if spec.modality == IMAGE:
            x = torch.randn(batch, *spec.input_shape, generator=g)
        else:
            x = torch.randint(1, spec.vocab_size, (batch, *spec.input_shape), generator=g)
        return x.to(device)

    return make


def _registry_target(name: str, dataset: str | None, shape, seq_len, overrides: dict) -> tuple[_Target, int | None]:
    from dlkit.data import spec_for
    from dlkit.models import MODELS, create_model

    entry = MODELS.get(name)
    spec, batch = _spec_input(spec_for(dataset or entry.default_dataset), shape, seq_len)

    def build(device: str) -> nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return create_model(name, spec, overrides)[0]

    return _Target("registry", name, _spec_example(spec), build, input_shape=spec.input_shape,
                   default_batch=entry.train_defaults.get("batch_size", 32)), batch


def _artifact_target(path: Path, shape, seq_len) -> tuple[_Target, int | None]:
    from dlkit import artifacts

    art = artifacts.read_artifact(path)
    model = artifacts.load_model(art)
    spec, batch = _spec_input(art.spec, shape, seq_len)
    t = _Target("artifact", art.model_name, _spec_example(spec), lambda device: model, real=model,
                precision=art.manifest.get("precision", "fp32"), input_shape=spec.input_shape)
    return t, batch


def load_module_class(spec: str) -> type:
    """``path/to/file.py:ClassName`` -> the class, with one clear error per way it can fail."""
    file, _, cls_name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise NotFoundError(f"no module file {file}", hint="give path/to/file.py:ClassName")
    mod_name = f"dlkit_user_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any error is theirs to see, in one line
        sys.modules.pop(mod_name, None)
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        raise UsageError(f"cannot load {file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         f"{where}", hint="fix the file so that `python " + file + "` imports") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)]
        raise NotFoundError(f"{file} has no class {cls_name}",
                            hint="nn.Module classes there: " + (", ".join(names) or "none"))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UsageError(f"{cls_name} in {file} is not a torch.nn.Module (it is a {type(cls).__name__})",
                         hint="point at a class that subclasses torch.nn.Module")
    return cls


def _module_target(target: str, shape) -> tuple[_Target, int | None]:
    if shape is None:
        raise UsageError(f"{target} needs --input-shape", hint="e.g. --input-shape 1,3,224,224 (batch first)")
    cls = load_module_class(target)
    try:
        torch.manual_seed(0)
        model = cls()
    except Exception as exc:
        raise UsageError(f"{cls.__name__}() failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="profile needs a class that builds with no arguments") from None

    def make(batch: int, device: str) -> torch.Tensor:
        return torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(0)).to(device)

    t = _Target("module", cls.__name__, make, lambda device: model, real=model, input_shape=tuple(shape[1:]))
    return t, shape[0]


def resolve_target(target: str, *, dataset=None, input_shape=None, seq_len=None, overrides=None):
    shape = _parse_shape(input_shape) if isinstance(input_shape, str) else input_shape
    if target == "-" or Path(target).is_dir():
        from dlkit.artifacts import resolve_path

        return _artifact_target(resolve_path(target), shape, seq_len)
    if ":" in target and target.rpartition(":")[0].endswith(".py"):
        return _module_target(target, shape)
    from dlkit.models import MODELS

    if target not in MODELS and ("/" in target or target.endswith(".py")):
        raise NotFoundError(f"no artifact folder or module file at {target}",
                            hint="give a registry name, an artifact folder, or path/to/file.py:ClassName")
    return _registry_target(target, dataset, shape, seq_len, overrides or {})


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
            by_dtype[str(t.dtype).replace("torch.", "")] = by_dtype.get(str(t.dtype).replace("torch.", ""), 0) + tensor_bytes(t)
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
    overrides: dict | None = None  # registry models: config key -> value

    def validate(self) -> "ProfileOptions":
        from dlkit.choices import PROFILE_OPTIMIZERS

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
    from dlkit.device import check_precision, resolve_device

    opts = (opts or ProfileOptions()).validate()
    optimizer, latency, measure, overrides = opts.optimizer, opts.latency, opts.measure, opts.overrides
    dev = resolve_device(opts.device)
    tgt, shape_batch = resolve_target(target, dataset=opts.dataset, input_shape=opts.input_shape,
                                      seq_len=opts.seq_len, overrides=overrides)
    if overrides and tgt.kind != "registry":
        raise UsageError("--set applies to registry models only")
    precision = check_precision(opts.precision or tgt.precision)
    batch = opts.batch_size or shape_batch or tgt.default_batch
    if batch < 1:
        raise UsageError("--batch-size must be at least 1")
    notes: list[str] = []

    # Count on meta when a registry model is large (no weights allocated), else on the real device.
    model = tgt.real
    counted_on = str(dev)
    if model is None:
        model = tgt.build("meta")
        if sum(p.numel() for p in model.parameters()) > META_PARAMS:
            counted_on = "meta"
        else:
            model = tgt.build(str(dev))
    else:
        model.to(dev)
    count_dev = torch.device("meta") if counted_on == "meta" else dev
    x = tgt.example(batch, str(count_dev))
    fwd, shapes, live_peak = _count_inference(model, x, precision, count_dev)

    trainable = [p for p in model.parameters() if p.requires_grad]
    from dlkit.profiling import count_params

    total_params = count_params(model)  # int8 weights packed in quantized modules included
    by_dtype, stored = _stored(model)
    w_bytes, t_bytes = weight_bytes(model)
    in_bytes = sum(tensor_bytes(t) for t in (x if isinstance(x, tuple) else (x,)))
    params = {"total": total_params, "trainable": sum(p.numel() for p in {id(p): p for p in trainable}.values()),
              "bytes": stored, "bytes_by_dtype": by_dtype}

    train_doc = None
    saved = largest = None
    if opts.training:
        if not trainable:
            notes.append("no trainable parameters: no training step")
        else:
            try:
                tf, tb, saved, largest = _count_training(model, x, precision, count_dev)
                train_doc = {
                    "forward_flops": tf.flops, "backward_flops": tb.flops, "flops": tf.flops + tb.flops,
                    "forward_macs": tf.macs, "backward_macs": tb.macs,
                    "backward_to_forward": tb.flops / tf.flops if tf.flops else None,
                    "uncounted": dict(tf.uncounted + tb.uncounted), "optimizer": optimizer,
                    "note": "measured: the ops autograd ran for one step (optimizer update not counted)",
                }
            except (RuntimeError, NotImplementedError) as exc:
                notes.append(f"no training step: {str(exc).splitlines()[0]}")
    est: MemoryEstimate = estimate_memory(
        # stored: counts the packed int8 weights of quantized modules too
        weights=max(w_bytes, stored), trainable=t_bytes, inputs=in_bytes, inference_live_peak=live_peak,
        saved=saved if train_doc else None, activation_peak=largest or 0, optimizer=optimizer)
    memory = {"estimate": asdict(est), "measured": {"inference_peak": None, "training_peak": None},
              "measured_with": None}
    if counted_on == "meta":
        notes.append("counted on the meta device: no weights were allocated")
        if precision != "fp32":
            notes.append("on meta, activations are estimated at fp32 (autocast does not apply)")

    # Real runs: measured memory and latency.
    per_sample_flops = fwd.flops / batch
    want = (lambda flops: measure is True or (measure is None and flops <= MEASURE_FLOPS)) \
        if measure is not False else (lambda flops: False)
    real = None
    if counted_on != "meta":
        real = model
    elif want(fwd.flops) or (latency and want(per_sample_flops)):
        real = tgt.build(str(dev))
    lat: list[Latency] = []
    if real is not None:
        xr = x if counted_on != "meta" else tgt.example(batch, str(dev))
        if want(fwd.flops):
            real.eval()

            def infer():
                with torch.no_grad():
                    from dlkit.device import autocast
                    with autocast(dev, precision):
                        real(*xr) if isinstance(xr, tuple) else real(xr)

            memory["measured"]["inference_peak"] = measure_peak(infer, dev)
            memory["measured_with"] = ("torch.cuda.max_memory_allocated" if dev.type == "cuda"
                                       else "torch.profiler (profile_memory=True) memory timeline")
            if train_doc is not None and want(3 * fwd.flops):
                memory["measured"]["training_peak"] = measure_peak(
                    _train_step_fn(real, xr, optimizer, precision, dev), dev)
        else:
            notes.append(f"measured memory skipped: {fwd.flops / 1e9:.0f} GFLOPs per batch (pass --measure)")
        if latency:
            batches = [1] + ([batch] if batch != 1 else [])
            for b in batches:
                if not want(per_sample_flops * b):
                    notes.append(f"latency at batch {b} skipped: {per_sample_flops * b / 1e9:.0f} GFLOPs "
                                 "per run (pass --measure)")
                    continue
                xb = tgt.example(b, str(dev))
                real.eval()
                lat.append(measure_latency(real, xb, precision=precision))
    elif measure is not False:
        notes.append(f"measured memory and latency skipped: {fwd.flops / 1e9:.0f} GFLOPs per batch "
                     "(pass --measure to run it anyway)")

    by_op = sorted(({"op": k, "macs": v[0], "flops": v[1], "calls": fwd.calls[k]} for k, v in fwd.by_op.items()),
                   key=lambda r: -r["flops"])
    forward = {"macs_per_sample": fwd.macs / batch, "flops_per_sample": fwd.flops / batch,
               "macs_per_batch": fwd.macs, "flops_per_batch": fwd.flops}
    if fwd.uncounted:
        notes.append("uncounted ops: " + ", ".join(f"{k} x{v}" for k, v in fwd.uncounted.items()))
    return ProfileResult(
        target=target, kind=tgt.kind, model=tgt.name, input_shape=[batch, *tgt.input_shape], batch_size=batch,
        precision=precision, counted_on=counted_on, convention=CONVENTION, params=params, forward=forward,
        by_op=by_op, modules=_module_rows(model, fwd, shapes, opts.depth), uncounted=dict(fwd.uncounted),
        zero_cost=dict(fwd.listed_zero), memory=memory, training=train_doc, latency=lat, notes=notes)
