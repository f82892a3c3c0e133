"""Quantization: int8 (dynamic, static, QAT) and half-precision storage (fp16, bf16).

One module holds every call into PyTorch's quantization stack, so a later migration (to torchao,
say) touches this file only. What runs per mode, chosen on numbers measured on the target machine
(2-core AMD EPYC, torch 2.13 CPU; ``benchmarks/quantize.py``):

- ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` with per-channel int8 weights for every
  ``nn.Linear``, ``nn.LSTM`` and ``nn.GRU`` (the Transformer's q/k/v/proj are plain ``nn.Linear``
  so they are reached too); activations are quantized on the fly, batch by batch.
- ``static``: eager-mode post-training quantization: conv-bn-relu and linear-relu fused, the
  backend's default qconfig (per-channel int8 weights, histogram-calibrated uint8 activations),
  calibrated on N training batches. Eager mode measured faster than FX graph mode (4.5 against
  7.9 ms for a LeNet at batch 256); PT2E now lives in torchao, which is not a dependency and ran
  slower than fp32 uncompiled.
- ``qat``: the static recipe with fake quantization during a short fine-tune by the core engine
  (``dlkit.engine.trainer.fit``), then converted to the same int8 modules as ``static``.
- ``fp16`` / ``bf16``: weights stored at half size and widened to fp32 when loaded; compute runs
  in fp32 (or the artifact's own bf16 autocast). Pure half-precision compute measured 3x-30x
  slower than fp32 on this CPU for every family (no native fp16 GEMM, bf16 kernels slower at
  these sizes), so it is not offered.

int8 models run on the CPU only. A quantized artifact stores plain tensors in safetensors (int8
weights, scales, zero points, per-channel axes; ``encode_weights``) and records a
``{"kind": "quantize", ...}`` transform; loading rebuilds the float model from the manifest,
re-applies the same structure without calibration (``rebuild``), then ``decode_weights`` puts the
saved tensors back, so the outputs are bit-identical to the ones measured before saving.

torch.ao warns that it is deprecated on every call; those warnings (and the observer notes that
a rebuild without calibration triggers) are silenced here, narrowly, around our own calls.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import statistics
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dlkit import artifacts
from dlkit.choices import INT8_MODES, QUANT_BACKENDS, QUANT_MODES
from dlkit.errors import ArtifactError, DataError, IncompatibleError, UsageError

log = logging.getLogger("dlkit")

MODES, INT8_MODES, BACKENDS = QUANT_MODES, INT8_MODES, QUANT_BACKENDS
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Families whose forward is a chain of modules eager-mode static int8 can follow (the residual add
# of resnet goes through a FloatFunctional). Their children are registered in data-flow order,
# which the fusion below relies on.
STATIC_FAMILIES = ("cnn", "resnet", "vgg", "mlp")
KIND = "quantize"


# --------------------------------------------------------------------------- torch.ao, quietly


@contextlib.contextmanager
def _ao(backend: str):
    """Select the quantized engine (packing is engine-specific) and mute torch.ao's notices."""
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        # Raised for every CPU, also those with VNNI (this machine's has it).
        warnings.filterwarnings("ignore", message=r"Default qconfig of oneDNN backend with reduce_range of false")
        torch.backends.quantized.engine = backend
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'", hint=f"use one of {', '.join(BACKENDS)}")
    available = [b for b in torch.backends.quantized.supported_engines if b != "none"]
    if backend not in available:
        raise UsageError(f"the {backend} int8 backend is not available on this CPU",
                         hint=f"available here: {', '.join(available) or 'none'}")


def supported_modes(family: str, modality: str) -> tuple[str, ...]:
    """The modes a model of ``family`` on ``modality`` data can take."""
    static = family in STATIC_FAMILIES and modality == "image"
    return tuple(m for m in MODES if static or m not in ("static", "qat"))


def check_mode(mode: str, family: str, modality: str, model_name: str) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown quantization mode '{mode}'", hint=f"use one of {', '.join(MODES)}")
    modes = supported_modes(family, modality)
    if mode not in modes:
        why = (f"static int8 follows chains of conv/linear layers ({', '.join(STATIC_FAMILIES)} on images); "
               f"'{model_name}' ({family}, {modality}) is not one")
        raise IncompatibleError(f"'{model_name}' cannot take --mode {mode}: {why}",
                                hint=f"modes it can take: {', '.join(modes)}")


# --------------------------------------------------------------------------- building the models


def _quant_input(module: nn.Module, args: tuple) -> tuple:
    return (module.quant(args[0]), *args[1:])


def _dequant_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.dequant(output)


FUSIONS = (
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv2d, nn.ReLU),
    (nn.Linear, nn.ReLU),
)


def fusion_groups(model: nn.Module) -> list[list[str]]:
    """Consecutive children matching conv-bn-relu, conv-bn, conv-relu or linear-relu."""
    groups = []
    for prefix, parent in model.named_modules():
        children = list(parent.named_children())
        i = 0
        while i < len(children):
            for pattern in FUSIONS:
                window = children[i : i + len(pattern)]
                if len(window) == len(pattern) and all(type(m) is t for (_, m), t in zip(window, pattern)):
                    groups.append([f"{prefix}.{n}" if prefix else n for n, _ in window])
                    i += len(pattern) - 1
                    break
            i += 1
    return groups


def prepare_static(model: nn.Module, backend: str, *, qat: bool = False) -> nn.Module:
    """Insert quant/dequant stubs, fuse, attach observers (fake quantizers for ``qat``), in place."""
    from torch.ao import quantization as tq

    model.quant = tq.QuantStub()
    model.dequant = tq.DeQuantStub()
    model.register_forward_pre_hook(_quant_input)
    model.register_forward_hook(_dequant_output)
    groups = fusion_groups(model)
    if qat:
        model.train()
        if groups:
            tq.fuse_modules_qat(model, groups, inplace=True)
        model.qconfig = tq.get_default_qat_qconfig(backend)
        tq.prepare_qat(model, inplace=True)
    else:
        model.eval()
        if groups:
            tq.fuse_modules(model, groups, inplace=True)
        model.qconfig = tq.get_default_qconfig(backend)
        tq.prepare(model, inplace=True)
    return model


def convert_static(model: nn.Module) -> nn.Module:
    from torch.ao import quantization as tq

    model.eval()
    tq.convert(model, inplace=True)
    return model


def quantize_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao import quantization as tq

    qconfig = tq.per_channel_dynamic_qconfig
    return tq.quantize_dynamic(model.eval(), {nn.Linear: qconfig, nn.LSTM: qconfig, nn.GRU: qconfig},
                               dtype=torch.qint8, inplace=True)


def round_to_half(model: nn.Module, mode: str) -> nn.Module:
    """Round every floating tensor to fp16/bf16 and back: what the artifact stores and reloads."""
    dtype = HALF[mode]
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return model


def _int8_layer_types() -> tuple[type, ...]:
    from torch.ao.nn import quantized as nnq
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase
    from torch.ao.nn.quantized.modules.conv import _ConvNd

    return nnq.Linear, _ConvNd, RNNBase


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Modules holding int8 weights (a fused conv-bn-relu counts once, under the conv's name)."""
    types = _int8_layer_types()
    return [name for name, m in model.named_modules() if isinstance(m, types)]


@artifacts.register_rebuilder(KIND)
def rebuild(model: nn.Module, transform: dict) -> nn.Module:
    """The quantized structure of ``transform`` on a freshly built float model, uncalibrated:
    the scales, zero points and int8 weights come from the artifact (``decode_weights``)."""
    mode = transform.get("mode")
    if mode in HALF:
        return model
    if mode not in INT8_MODES:
        raise ArtifactError(f"unknown quantization mode {mode!r} in the manifest", hint="upgrade dlkit")
    backend = transform.get("backend", "x86")
    if backend not in torch.backends.quantized.supported_engines:
        raise ArtifactError(f"this artifact was quantized for the {backend} backend, which this CPU lacks")
    model.eval()
    with _ao(backend):
        if mode == "dynamic":
            return quantize_dynamic(model)
        return convert_static(prepare_static(model, backend))




# --------------------------------------------------------------------------- the artifact codec
#
# Quantized modules keep their weights in packed params (and an RNN in TorchScript cell objects)
# that safetensors cannot hold. Their state_dict is flattened into plain tensors under keys that
# say how to rebuild each value; "#" never occurs in a module path, so it separates the parts:
#   KEY#q.int, #q.scale, #q.zp [, #q.axis]  a quantized tensor (int repr, per-tensor or per-channel)
#   KEY#len, KEY#0, KEY#1 ...               a tuple (a linear layer's packed (weight, bias))
#   KEY#none                                None (a layer without bias)
#   KEY#dtype                               a dtype, as an index into DTYPES
#   MODULE#rnn.weight_ih_l0 ...             the weights and biases of a dynamic int8 LSTM/GRU
# Scales and zero points are stored in the narrowest dtype that holds them exactly.

DTYPES = (torch.qint8, torch.quint8, torch.qint32, torch.float16, torch.float32)
QDTYPE = {torch.int8: torch.qint8, torch.uint8: torch.quint8, torch.int32: torch.qint32}
RNN = "#rnn."


def _narrow(t: torch.Tensor) -> torch.Tensor:
    for dtype in ((torch.float32,) if t.is_floating_point() else (torch.int8, torch.int32)):
        small = t.to(dtype)
        if torch.equal(small.to(t.dtype), t):
            return small
    return t


def _put(out: dict, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        out[f"{key}#q.int"] = value.int_repr().contiguous()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{key}#q.scale"] = _narrow(value.q_per_channel_scales())
            out[f"{key}#q.zp"] = _narrow(value.q_per_channel_zero_points())
            out[f"{key}#q.axis"] = torch.tensor(value.q_per_channel_axis())
        else:
            out[f"{key}#q.scale"] = _narrow(torch.tensor(value.q_scale(), dtype=torch.float64))
            out[f"{key}#q.zp"] = _narrow(torch.tensor(value.q_zero_point()))
    elif isinstance(value, torch.Tensor):
        out[key] = value.detach().clone().contiguous()
    elif isinstance(value, (tuple, list)):
        out[f"{key}#len"] = torch.tensor(len(value))
        for i, item in enumerate(value):
            _put(out, f"{key}#{i}", item)
    elif value is None:
        out[f"{key}#none"] = torch.zeros(0)
    elif isinstance(value, torch.dtype) and value in DTYPES:
        out[f"{key}#dtype"] = torch.tensor(DTYPES.index(value))
    else:
        raise TypeError(f"cannot store {key} ({type(value).__name__}) as plain tensors")


def _get(tensors: dict, key: str) -> Any:
    if key in tensors:
        return tensors[key]
    if f"{key}#q.int" in tensors:
        ints, scale, zp = tensors[f"{key}#q.int"], tensors[f"{key}#q.scale"], tensors[f"{key}#q.zp"]
        if ints.dtype not in QDTYPE:
            raise ArtifactError(f"{key} holds {ints.dtype}, not an int8/uint8/int32 representation")
        if f"{key}#q.axis" in tensors:
            return torch._make_per_channel_quantized_tensor(ints, scale.double(), zp.long(),
                                                            int(tensors[f"{key}#q.axis"]))
        return torch._make_per_tensor_quantized_tensor(ints, float(scale.double()), int(zp))
    if f"{key}#len" in tensors:
        return tuple(_get(tensors, f"{key}#{i}") for i in range(int(tensors[f"{key}#len"])))
    if f"{key}#none" in tensors:
        return None
    if f"{key}#dtype" in tensors:
        index = int(tensors[f"{key}#dtype"])
        if not 0 <= index < len(DTYPES):
            raise ArtifactError(f"{key} names an unknown dtype")
        return DTYPES[index]
    raise KeyError(key)


def _rnn_modules(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase

    return {name: m for name, m in model.named_modules() if isinstance(m, RNNBase)}


def encode_weights(model: nn.Module, transform: dict) -> dict[str, torch.Tensor]:
    """The model's state as plain tensors that safetensors can store (see the key scheme above)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if transform.get("mode") in HALF:
        dtype = HALF[transform["mode"]]
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    with _ao(transform.get("backend", "x86")):
        rnns = _rnn_modules(model)
        for name, m in rnns.items():
            for k, v in {**m.get_weight(), **m.get_bias()}.items():
                _put(out, f"{name}{RNN}{k}", v)
        for key, value in state.items():
            if not any(key.startswith(f"{name}.") for name in rnns):
                _put(out, key, value)
    return out


def decode_weights(model: nn.Module, tensors: dict[str, torch.Tensor], transform: dict) -> tuple[list, list]:
    """Load ``encode_weights``' tensors into the rebuilt ``model``; returns (missing, unexpected)."""
    if transform.get("mode") in HALF:
        return model.load_state_dict(tensors, strict=False)  # copy_ widens fp16/bf16 to fp32 exactly
    with _ao(transform.get("backend", "x86")):
        rnns = _rnn_modules(model)
        missing: list[str] = []
        for name, m in rnns.items():
            wanted = {**m.get_weight(), **m.get_bias()}
            try:
                m.set_weight_bias({k: _get(tensors, f"{name}{RNN}{k}") for k in wanted})
            except KeyError as exc:
                missing.append(f"{name}{RNN}{exc.args[0]}")
        bases = {k.split("#")[0] for k in tensors if RNN not in k}
        state = OrderedDict((base, _get(tensors, base)) for base in sorted(bases))
        # Quantized modules read their format version from the metadata (without it they expect
        # an older layout); the rebuilt model is of this torch's version by construction.
        own = model.state_dict()
        state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
        # An RNN's cell objects were set above; hand them back so its children load unchanged.
        state.update((k, v) for k, v in own.items() if any(k.startswith(f"{n}.") for n in rnns))
        result = model.load_state_dict(state, strict=False)
        missing += [k for k in result.missing_keys if not any(k.startswith(f"{n}.") for n in rnns)]
        return missing, list(result.unexpected_keys)


artifacts.register_codec(KIND, encode=encode_weights, decode=decode_weights)


# --------------------------------------------------------------------------- the command's library call


@dataclass
class Side:
    """One model's measurements: bytes on disk, median latencies (ms), test accuracy."""

    file_bytes: int
    layer_bytes: int  # the weights and biases of the layers that are quantized
    latency_ms: dict[int, float]
    accuracy: float
    loss: float


@dataclass
class QuantizeResult:
    artifact: Path
    source: Path
    model: str
    family: str
    mode: str
    backend: str | None
    compute: str
    quantized_layers: list[str]
    test_samples: int
    before: Side
    after: Side
    seconds: float
    verified: bool  # the reloaded artifact gave the same outputs, bit for bit
    qat_history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        b, a = self.before, self.after
        out = {"size": b.file_bytes / a.file_bytes,
               "layers": b.layer_bytes / a.layer_bytes if a.layer_bytes else float("nan")}
        for n in b.latency_ms:
            out[f"speedup_batch{n}"] = b.latency_ms[n] / a.latency_ms[n]
        out["accuracy_change_points"] = 100 * (a.accuracy - b.accuracy)
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["artifact"], d["source"] = str(self.artifact), str(self.source)
        d["ratios"] = self.ratios()
        return d


def _default_out(source: Path, mode: str) -> Path:
    return source.with_name(f"{source.name}-{mode if mode in HALF else 'int8-' + mode}")


def _run(model: nn.Module, x: torch.Tensor, precision: str, channels_last: bool) -> torch.Tensor:
    from dlkit.device import autocast

    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        return model(x).float()


def measure_latency(runs: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median milliseconds of each callable, timed in alternation so load on a shared machine
    hits all of them alike."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            t = time.perf_counter()
            run()
            times[i].append(1000 * (time.perf_counter() - t))
    return [statistics.median(ts) for ts in times]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _qat(model: nn.Module, art, data, backend: str, epochs: int, lr: float | None, seed: int) -> list[dict]:
    """Fake-quantized fine-tuning with the core engine; converts ``model`` in place."""
    from dlkit.data import DATASETS
    from dlkit.engine.trainer import TrainConfig, fit

    trained = artifacts.train_config(art)
    cfg = TrainConfig(epochs=epochs, batch_size=trained.batch_size, optimizer=trained.optimizer,
                      lr=lr or trained.lr * 0.05, weight_decay=trained.weight_decay, schedule="cosine",
                      precision="fp32", augment=trained.augment)
    with _ao(backend):
        prepare_static(model, backend, qat=True)
        torch.manual_seed(seed)
        state, _ = fit(model, data.train, data.val, cfg, device=torch.device("cpu"), seed=seed,
                       augment=DATASETS.get(art.dataset).augment)
        model.to(memory_format=torch.contiguous_format)
        convert_static(model)
    return state.history


@dataclass
class QuantizeOptions:
    mode: str = "dynamic"
    backend: str = "x86"
    calib_batches: int = 8  # static: training batches to calibrate on
    calib_batch_size: int = 128
    epochs: int = 1  # qat: fine-tuning epochs
    lr: float | None = None  # qat: None = 5% of the training lr
    out: Path | None = None
    data_dir: str | None = None
    repeats: int = 10  # timed runs per latency (batch 1: 5x as many)
    batches: tuple[int, ...] = (1, 256)
    eval_samples: int | None = None  # the first N test samples; None: all
    seed: int = 0

    def validate(self) -> "QuantizeOptions":
        if self.mode not in MODES:
            raise UsageError(f"unknown quantization mode '{self.mode}'", hint=f"use one of {', '.join(MODES)}")
        if self.mode in INT8_MODES:
            check_backend(self.backend)
        if self.mode == "static" and self.calib_batches < 1:
            raise UsageError(f"--calib-batches must be >= 1 (got {self.calib_batches})")
        if self.mode == "qat" and self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1 (got {self.epochs})")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be positive (got {self.lr})")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise UsageError(f"--eval-samples must be >= 1 (got {self.eval_samples})")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be >= 1 (got {self.repeats})")
        return self


def quantize_artifact(path: Path | str, opts: QuantizeOptions) -> QuantizeResult:
    """Quantize an artifact, measure it against the original in the same run, save it."""
    from dlkit.device import prepare_inference
    from dlkit.engine.evaluate import evaluate_model

    opts.validate()
    mode, backend, seed = opts.mode, opts.backend, opts.seed
    calib_batches, calib_batch_size, epochs = opts.calib_batches, opts.calib_batch_size, opts.epochs
    repeats, batches, eval_samples = opts.repeats, opts.batches, opts.eval_samples
    started = time.perf_counter()
    art = artifacts.read_artifact(path)
    model_doc = art.manifest["model"]
    if any(t.get("kind") == KIND for t in model_doc.get("transforms", [])):
        raise UsageError(f"{art.path} is already quantized", hint="quantize the float artifact it came from")
    family = model_doc.get("family", "")
    check_mode(mode, family, art.spec.modality, art.model_name)
    final = Path(opts.out) if opts.out else _default_out(art.path, mode)
    artifacts.check_destination(final)

    why = {"static": "static int8 calibration", "qat": "quantization-aware training"}.get(mode, "measuring accuracy")
    data = artifacts.load_data(art, why=why, data_dir=opts.data_dir)
    if mode == "static" and len(data.train[0]) == 0:
        raise DataError(f"static int8 calibration needs training data, but the '{art.dataset}' train split is empty")
    float_model = artifacts.load_model(art)
    model = copy.deepcopy(float_model)
    history: list[dict] = []
    if mode in HALF:
        round_to_half(model, mode)
    elif mode == "dynamic":
        with _ao(backend):
            quantize_dynamic(model)
    elif mode == "static":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.train[0]), generator=g)[: calib_batches * calib_batch_size]
        with _ao(backend):
            prepare_static(model, backend)
            with torch.no_grad():
                for i in range(0, len(idx), calib_batch_size):
                    model(data.train[0][idx[i : i + calib_batch_size]])
            convert_static(model)
    else:
        history = _qat(model, art, data, backend, epochs, opts.lr, seed)
    model.eval()
    int8 = mode in INT8_MODES
    transform = {"kind": KIND, "mode": mode, "backend": backend if int8 else None,
                 "storage": "int8" if int8 else mode, "compute": "int8" if int8 else "fp32",
                 "cpu_only": int8}
    if mode == "static":
        transform.update(calib_batches=calib_batches, calib_batch_size=calib_batch_size)
    if mode == "qat":
        transform.update(epochs=epochs)
    layers = quantized_layer_names(model) if int8 else [n for n, m in float_model.named_modules()
                                                          if not list(m.children()) and list(m.parameters())]
    if int8 and not layers:
        raise IncompatibleError(f"'{art.model_name}' has no layer that {mode} int8 quantizes",
                                hint="use --mode fp16 or bf16")

    # Measure both, the way `dlkit evaluate` runs them.
    precision_before = art.precision
    precision_after = "fp32" if int8 else art.precision
    cl_before = prepare_inference(float_model, torch.device("cpu"), art.spec.input_shape)
    cl_after = False if int8 else prepare_inference(model, torch.device("cpu"), art.spec.input_shape)
    names = list(data.spec.class_names or range(data.spec.num_classes))
    x_test, y_test = data.test
    if eval_samples is not None:  # the first N test samples: quicker, coarser accuracy
        x_test, y_test = x_test[:eval_samples], y_test[:eval_samples]
    kw = dict(class_names=names, split="test", batch_size=256, device=torch.device("cpu"))
    ev_before = evaluate_model(float_model, x_test, y_test, precision=precision_before, channels_last=cl_before, **kw)
    with _ao(backend if int8 else torch.backends.quantized.engine):
        ev_after = evaluate_model(model, x_test, y_test, precision=precision_after, channels_last=cl_after, **kw)
    latency: dict[str, dict[int, float]] = {"before": {}, "after": {}}
    for n in batches:
        x = x_test[:n] if len(x_test) >= n else x_test[torch.arange(n) % len(x_test)]
        b, a = measure_latency([lambda: _run(float_model, x, precision_before, cl_before),
                                lambda: _run(model, x, precision_after, cl_after)],
                               repeats * (5 if n == 1 else 1))
        latency["before"][n], latency["after"][n] = b, a

    encoded = encode_weights(model, transform)
    float_state = float_model.state_dict()
    layer_before = _tensor_bytes(v for k, v in float_state.items()
                                 if any(k.startswith(f"{n}.") for n in layers))
    layer_after = _tensor_bytes(v for k, v in encoded.items()
                                if any(k.startswith((f"{n}.", f"{n}#")) for n in layers))

    manifest = copy.deepcopy(art.manifest)
    manifest["model"].setdefault("transforms", []).append(transform)
    manifest["precision"] = precision_after
    metrics = {"test_accuracy": ev_after.accuracy, "test_loss": ev_after.loss, "test_macro_f1": ev_after.macro_f1,
               **{f"latency_ms_batch{n}": latency["after"][n] for n in batches},
               "test_accuracy_before": ev_before.accuracy}
    options = {"mode": mode, "backend": transform["backend"], "calib_batches": calib_batches if mode == "static" else None,
               "epochs": epochs if mode == "qat" else None, "seed": seed}
    manifest["lineage"].append(artifacts.lineage_step("quantize", options, metrics, parent=str(art.path)))
    manifest["metrics"] = metrics
    files = {}
    if history:
        import json

        files["history.jsonl"] = "".join(json.dumps(r) + "\n" for r in history)
    artifacts.write_artifact(final, model, manifest, files=files)

    # The artifact must give back exactly what was measured.
    reloaded = artifacts.load_model(artifacts.read_artifact(final))
    if not int8:
        prepare_inference(reloaded, torch.device("cpu"), art.spec.input_shape)  # same memory format
    probe = x_test[:64]
    with _ao(backend if int8 else torch.backends.quantized.engine):
        verified = torch.equal(_run(model, probe, precision_after, cl_after),
                               _run(reloaded, probe, precision_after, cl_after))
    if not verified:
        log.warning("the reloaded %s gives other outputs than the model measured", final)

    before = Side(art.path.joinpath(art.manifest["weights"]["file"]).stat().st_size, layer_before,
                  latency["before"], ev_before.accuracy, ev_before.loss)
    after = Side((final / artifacts.WEIGHTS).stat().st_size, layer_after, latency["after"], ev_after.accuracy,
                 ev_after.loss)
    notes = [f"slower than the original at batch {n} ({after.latency_ms[n]:.2f} ms against "
             f"{before.latency_ms[n]:.2f} ms)" for n in batches if after.latency_ms[n] > before.latency_ms[n]]
    if mode == "dynamic" and any(type(m) is nn.RNN for m in model.modules()):
        notes.append("nn.RNN (tanh) has no dynamic int8 kernel: it stays fp32, only the head is int8")
    return QuantizeResult(final, art.path, art.model_name, family, mode, transform["backend"],
                          "int8 (CPU only)" if int8 else f"{precision_after} (weights widened from {mode} at load)",
                          layers, len(y_test), before, after, time.perf_counter() - started, verified, history, notes)
