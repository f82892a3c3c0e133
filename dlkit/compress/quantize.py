"""Quantization: int8 (dynamic, static, QAT) and half-precision storage (fp16, bf16).

This module and ``codec.py`` (the int8 weights codec and ``quiet_ao``) hold every call into
PyTorch's quantization stack, so a later migration (to torchao, say) touches these two only. What runs per mode, chosen on numbers measured on the target machine
(2-core AMD EPYC, torch 2.13 CPU; ``benchmarks/quantize.py``):

- ``dynamic``: ``torch.ao.quantization.quantize_dynamic`` with per-channel int8 weights for every
  ``nn.Linear``, ``nn.LSTM`` and ``nn.GRU`` (the Transformer's q/k/v/proj are plain ``nn.Linear``
  so they are reached too); activations are quantized on the fly, batch by batch.
Which modes a model takes is its family's declaration (``Support.static_int8``): static and QAT
need a chain of modules eager mode can follow; dynamic and half sizes apply to every family.

- ``static``: eager-mode post-training quantization: conv-bn-relu and linear-relu fused, the
  backend's default qconfig (per-channel int8 weights, histogram-calibrated uint8 activations),
  calibrated on N training batches. Eager mode measured faster than FX graph mode (4.5 against
  7.9 ms for a LeNet at batch 256); PT2E now lives in torchao, which is not a dependency and ran
  slower than fp32 uncompiled.
  Then each int8 layer is timed against its float version on this machine (``quantize_static``:
  the float side pays the dequantize/quantize around it) and the layers whose int8 kernel measured
  slower stay fp32 (``FloatLayer``; recorded as the transform's ``fp32_layers``), e.g. a 1-channel
  stem on an AVX2-only CPU, if the model with them in fp32 then also measures faster as a whole.
  The prepared model is op for op what a hand-written torch.ao eager model of the same layers runs
  (benchmarks/quantize.py times both side by side).
- ``qat``: the static recipe with fake quantization during a short fine-tune by the core engine
  (``dlkit.engine.trainer.fit``), then converted to the same int8 modules as ``static``.
- ``fp16`` / ``bf16``: weights stored at half size and widened to fp32 when loaded; compute runs
  in fp32 (or the artifact's own bf16 autocast). Pure half-precision compute measured 3x-30x
  slower than fp32 on this CPU for every family (no native fp16 GEMM, bf16 kernels slower at
  these sizes), so it is not offered.

int8 models run on the CPU only. A quantized artifact stores plain tensors in safetensors (int8
weights, scales, zero points, per-channel axes; ``codec.encode_weights``) and records a
``{"kind": "quantize", ...}`` transform; loading rebuilds the float model from the manifest,
re-applies the same structure without calibration (``rebuild``), then ``codec.decode_weights`` puts the
saved tensors back, so the outputs are bit-identical to the ones measured before saving.

The recommendation (``recommend``): for int8 modes, the int8 paths measured in this run, on this
machine, are compared with fp32 at the largest batch timed: this artifact in PyTorch and, with
``QuantizeOptions.onnxruntime``, ONNX Runtime's int8 of the same float artifact (``dlkit export
--quantize``, exported to a temporary folder and timed in the same alternating rounds). The fastest
path is named only when it measured at least ``MIN_SPEEDUP`` times faster than fp32 at a batch of
``RECOMMEND_BATCH`` or more; otherwise the recommendation is to keep fp32. Nothing is taken from
other machines or earlier runs.

torch.ao warns that it is deprecated on every call; those warnings (and the observer notes that
a rebuild without calibration triggers) are silenced here, narrowly, around our own calls.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlkit import artifacts, output
from dlkit.choices import INT8_MODES, QUANT_BACKENDS, QUANT_MODES
from dlkit.compress.codec import HALF, KIND, decode_weights, encode_weights, quiet_ao  # noqa: F401 (registers the codec)
from dlkit.errors import ArtifactError, DataError, IncompatibleError, UsageError
from dlkit.models.registry import FAMILIES, Support
from dlkit.profiling.measure import Measurement, Subject, measure_models, repeat_to

log = logging.getLogger("dlkit")

MODES, BACKENDS = QUANT_MODES, QUANT_BACKENDS


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'", hint=f"use one of {', '.join(BACKENDS)}")
    available = [b for b in torch.backends.quantized.supported_engines if b != "none"]
    if backend not in available:
        raise UsageError(f"the {backend} int8 backend is not available on this CPU",
                         hint=f"available here: {', '.join(available) or 'none'}")


def supported_modes(support: Support, modality: str) -> tuple[str, ...]:
    """The modes a model of a family declaring ``support`` takes on ``modality`` data."""
    static = support.static_int8 and modality == "image"
    return tuple(m for m in MODES if static or m not in ("static", "qat"))


def check_mode(mode: str, model_name: str, modality: str) -> None:
    from dlkit.models import model_entry

    if mode not in MODES:
        raise UsageError(f"unknown quantization mode '{mode}'", hint=f"use one of {', '.join(MODES)}")
    entry = model_entry(model_name)
    modes = supported_modes(entry.support, modality)
    if mode not in modes:
        static = ", ".join(f for f, s in FAMILIES.items() if s.static_int8)
        why = (f"static int8 follows chains of conv/linear layers ({static} on images); "
               f"'{model_name}' ({entry.family}, {modality}) is not one")
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


class FloatLayer(nn.Module):
    """A layer kept in fp32 inside a static int8 model: dequantize, run the float layer (fused with
    its BatchNorm and ReLU like its int8 twin would be), quantize again for the next int8 layer."""

    def __init__(self, layer: nn.Module):
        from torch.ao import quantization as tq

        super().__init__()
        self.dequant = tq.DeQuantStub()
        self.layer = layer
        self.layer.qconfig = None  # eager mode leaves a module whose qconfig is None in float
        self.quant = tq.QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.layer(self.dequant(x)))


def float_layer_names(model: nn.Module) -> list[str]:
    """The layers of a static int8 model that were kept in fp32 (``FloatLayer``)."""
    return [name for name, m in model.named_modules() if isinstance(m, FloatLayer)]


def _keep_in_fp32(model: nn.Module, names) -> None:
    """Wrap the (fused) layers ``names`` in ``FloatLayer``."""
    from torch.ao.nn.intrinsic import _FusedModule

    layers = dict(model.named_modules())
    fused = {n for n, m in layers.items() if isinstance(m, _FusedModule)}
    weighted = [n for n, m in layers.items()
                if n in fused or (isinstance(m, (nn.Conv2d, nn.Linear)) and n.rpartition(".")[0] not in fused)]
    for name in names:
        if name not in weighted:
            raise UsageError(f"no conv or linear layer named '{name}' to keep in fp32",
                             hint=f"layers of this model: {', '.join(weighted) or 'none'}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FloatLayer(layers[name]))


def prepare_static(model: nn.Module, backend: str, *, qat: bool = False, keep_fp32=()) -> nn.Module:
    """Insert quant/dequant stubs, fuse, attach observers (fake quantizers for ``qat``), in place.
    The (fused) layers named in ``keep_fp32`` stay float, between a dequantize and a quantize."""
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
        _keep_in_fp32(model, keep_fp32)
        model.qconfig = tq.get_default_qat_qconfig(backend)
        tq.prepare_qat(model, inplace=True)
    else:
        model.eval()
        if groups:
            tq.fuse_modules(model, groups, inplace=True)
        _keep_in_fp32(model, keep_fp32)
        model.qconfig = tq.get_default_qconfig(backend)
        tq.prepare(model, inplace=True)
    return model


LAYER_BATCH = 64  # the per-layer choice times each layer at this batch (int8 must not lose at >= 64)
LAYER_REPEATS = 10
# A layer stays fp32 only when its int8 kernel measured this much slower: closer is noise on a shared
# machine, and a tie changes nothing in speed (int8 then keeps its smaller file).
KEEP_MARGIN = 1.05
# Then the whole model with those layers in fp32 is timed against the all-int8 one, alternating, at
# these batches: it is kept only when faster at each by more than MODEL_MARGIN. A tiny layer (a
# 128 -> 10 head) can time slower alone by noise yet cost the model its dequantize/quantize round
# trip: measured 9.34-9.89 ms with the head in fp32 against 9.14-9.83 all int8 (batch 256, 1 thread).
MODEL_BATCHES = (LAYER_BATCH, 4 * LAYER_BATCH)
MODEL_MARGIN = 1.02


def time_layer(name: str, int8_call, float_call, repeats: int = LAYER_REPEATS) -> tuple[float, float]:
    """Median ms of (the int8 layer, its float version) on this machine, runs alternating."""
    from dlkit.profiling import time_round_robin

    with torch.inference_mode():
        t_int8, t_float = time_round_robin([int8_call, float_call], repeats)
    return t_int8, t_float


def slower_int8_layers(float_model: nn.Module, int8_model: nn.Module, x: torch.Tensor,
                       timer=time_layer) -> list[str]:
    """The int8 layers of ``int8_model`` (static, converted from ``float_model``) that ``timer``
    measures slower on ``x`` than their float version (by more than ``KEEP_MARGIN``). The float side pays what keeping the layer
    in fp32 costs inside an int8 model: dequantize its int8 input, the fused float layer (in
    channels_last for a conv, as dlkit runs them), quantize its output with the int8 layer's scale.
    ``timer(name, int8_call, float_call) -> (int8_ms, float_ms)``: ``time_layer`` by default."""
    from torch.ao import quantization as tq

    fused = copy.deepcopy(float_model).eval()
    groups = fusion_groups(fused)
    if groups:
        tq.fuse_modules(fused, groups, inplace=True)
    float_layers = dict(fused.named_modules())
    names = [n for n in quantized_layer_names(int8_model) if n in float_layers]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    int8_layers = dict(int8_model.named_modules())

    def grab(name):
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, (args[0], out))
        return hook

    hooks = [int8_layers[n].register_forward_hook(grab(n)) for n in names]
    try:
        with torch.inference_mode():
            int8_model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    slower = []
    for name in names:
        if name not in seen:  # not on the forward path
            continue
        xq, out = seen[name]
        q_layer = int8_layers[name]
        f_layer = float_layers[name]
        channels_last = xq.ndim == 4
        if channels_last:
            f_layer = f_layer.to(memory_format=torch.channels_last)
        scale, zero_point, dtype = float(q_layer.scale), int(q_layer.zero_point), out.dtype

        def float_call(f_layer=f_layer, xq=xq, scale=scale, zero_point=zero_point, dtype=dtype,
                       channels_last=channels_last):
            xf = xq.dequantize()
            if channels_last:
                xf = xf.contiguous(memory_format=torch.channels_last)
            return torch.quantize_per_tensor(f_layer(xf), scale, zero_point, dtype)

        t_int8, t_float = timer(name, lambda q_layer=q_layer, xq=xq: q_layer(xq), float_call)
        log.debug("static int8 layer %s: int8 %.3f ms, fp32 %.3f ms", name, t_int8, t_float)
        if t_int8 > KEEP_MARGIN * t_float:
            slower.append(name)
    return slower


def time_models(int8_call, candidate_call, repeats: int = LAYER_REPEATS) -> tuple[float, float]:
    """Median ms of (the int8 model, the one with some layers kept in fp32), runs alternating."""
    from dlkit.profiling import time_round_robin

    with torch.inference_mode():
        t_int8, t_candidate = time_round_robin([int8_call, candidate_call], repeats)
    return t_int8, t_candidate


def _model_call(model: nn.Module, x: torch.Tensor):
    """``model`` on ``x`` in the layout dlkit runs it (channels_last where a float conv remains)."""
    from dlkit.device import uses_channels_last

    if uses_channels_last(model, tuple(x.shape)):
        x = x.contiguous(memory_format=torch.channels_last)
    return lambda: model(x)


def faster_as_a_whole(int8: nn.Module, candidate: nn.Module, x: torch.Tensor, model_timer=time_models) -> bool:
    """Whether ``candidate`` (``int8`` with some layers in fp32) measured faster than ``int8`` by
    more than ``MODEL_MARGIN`` at every batch of ``MODEL_BATCHES`` (rows of ``x``, repeated)."""
    for batch in MODEL_BATCHES:
        xb = repeat_to(x, batch)
        t_int8, t_candidate = model_timer(_model_call(int8, xb), _model_call(candidate, xb))
        log.debug("static int8 at batch %d: all int8 %.3f ms, with fp32 layers %.3f ms", batch, t_int8, t_candidate)
        if not t_candidate * MODEL_MARGIN < t_int8:
            return False
    return True


def quantize_static(model: nn.Module, batches: list[torch.Tensor], backend: str, *, keep_fp32=(),
                    choose: bool = True, timer=time_layer, model_timer=time_models) -> nn.Module:
    """Static int8 of ``model`` calibrated on ``batches``; the layers named in ``keep_fp32`` stay
    float. With ``choose``, each int8 layer is then timed against its float version on this machine
    (``slower_int8_layers``, on ``LAYER_BATCH`` calibration samples); if any int8 layer measured
    slower, the model is quantized again with those kept in fp32 too, and that model is kept only
    when it measures faster as a whole (``faster_as_a_whole``, timed by ``model_timer``). Returns
    the int8 model (``model`` itself unless it was redone)."""
    float_model = copy.deepcopy(model) if choose else None

    def convert(target: nn.Module, keep) -> nn.Module:
        prepare_static(target, backend, keep_fp32=keep)
        with torch.no_grad():
            for xb in batches:
                target(xb)
        return convert_static(target)

    keep = tuple(keep_fp32)
    with quiet_ao(backend):
        int8 = convert(model, keep)
        if float_model is None:
            return int8
        example = repeat_to(torch.cat(batches), LAYER_BATCH)
        slower = slower_int8_layers(float_model, int8, example, timer)
        if not slower:
            return int8
        candidate = convert(float_model, keep + tuple(n for n in slower if n not in keep))
        if not faster_as_a_whole(int8, candidate, torch.cat(batches), model_timer):
            log.info("static int8: %s measured slower in int8 alone, but the model with them in fp32 was not "
                     "faster as a whole here: all int8", ", ".join(slower))
            return int8
        log.info("static int8: keeping in fp32 the layers whose int8 kernel measured slower here: %s",
                 ", ".join(slower))
        return candidate


def convert_static(model: nn.Module) -> nn.Module:
    from torch.ao import quantization as tq

    model.eval()
    tq.convert(model, inplace=True)
    return model


def quantize_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao import quantization as tq

    qconfig = tq.per_channel_dynamic_qconfig
    from dlkit.hf.models import conv1d_to_linear, is_hf_model

    if is_hf_model(model):  # GPT-2's Conv1D layers are Linears with a transposed weight: reach them too
        conv1d_to_linear(model)
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
    with quiet_ao(backend):
        if mode == "dynamic":
            return quantize_dynamic(model)
        return convert_static(prepare_static(model, backend, keep_fp32=transform.get("fp32_layers", ())))


# --------------------------------------------------------------------------- the command's library call


@dataclass
class QuantizeSide(Measurement):
    """One model of the quantize report: the shared measurement, and what quantize adds."""

    layer_bytes: int = 0  # the weights and biases of the layers that are quantized
    accuracy: float = 0.0  # test accuracy (a language model's: next-token accuracy)
    loss: float = 0.0
    macro_f1: float | None = 0.0  # None for a language model
    perplexity: float | None = None  # language models: exp(mean next-token loss) on the test text

    @property
    def file_bytes(self) -> int:  # the artifact's weights file: the measurement's size
        return self.size_bytes

    def to_dict(self) -> dict:
        return {**super().to_dict(), "file_bytes": self.file_bytes}


RECOMMEND_BATCH = 64  # int8 pays at throughput batches; smaller ones decide nothing
MIN_SPEEDUP = 1.05  # closer to fp32 than this is within the noise of a shared CPU: keep fp32
KEEP_FP32 = "keep fp32"


@dataclass
class Recommendation:
    path: str  # KEEP_FP32, "this artifact (PyTorch int8)", "ONNX Runtime int8 (dynamic)"
    runtime: str  # torch or onnxruntime
    speedup: float  # fp32 latency / this path's latency at ``batch`` (1.0 for keep fp32)
    command: str | None  # how to get the path, when it is not this artifact or the original
    reason: str
    batch: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Candidate:
    """An int8 path measured beside fp32 in this run."""

    path: str
    runtime: str
    latency_ms: dict[int, float]
    command: str | None = None


def recommend(fp32_ms: dict[int, float], candidates: list[Candidate]) -> Recommendation:
    """The fastest int8 path at the largest batch measured among those that beat fp32 by
    ``MIN_SPEEDUP`` at every measured batch of at least ``RECOMMEND_BATCH``; else keep fp32. A path
    slower than fp32 at any such batch is never named. Pure: the latencies decide, nothing else."""
    batch = max(fp32_ms)
    if batch < RECOMMEND_BATCH:
        return Recommendation(KEEP_FP32, "torch", 1.0, None, f"int8 was timed only up to batch {batch}; "
                              f"a recommendation needs batch >= {RECOMMEND_BATCH}", batch)
    if not candidates:
        return Recommendation(KEEP_FP32, "torch", 1.0, None, "no int8 path was measured", batch)
    big = sorted(b for b in fp32_ms if b >= RECOMMEND_BATCH)

    def worst(c: Candidate) -> tuple[float, int]:  # its lowest speed-up over the big batches, and where
        return min((fp32_ms[b] / c.latency_ms[b], b) for b in big)

    measured = ", ".join(f"{c.path} " + "/".join(f"{fp32_ms[b] / c.latency_ms[b]:.2f}x" for b in big)
                         for c in candidates)
    at = f"batch {'/'.join(map(str, big))}"
    fast = [c for c in candidates if worst(c)[0] >= MIN_SPEEDUP]
    if not fast:
        return Recommendation(KEEP_FP32, "torch", 1.0, None,
                              f"no int8 path measured at least {MIN_SPEEDUP:.2f}x faster than fp32 at every "
                              f"{at} on this machine ({measured})", batch)
    best = min(fast, key=lambda c: c.latency_ms[batch])
    return Recommendation(best.path, best.runtime, fp32_ms[batch] / best.latency_ms[batch], best.command,
                          f"fastest at batch {batch} and at least {MIN_SPEEDUP:.2f}x faster than fp32 at every "
                          f"{at} on this machine ({measured})", batch)


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
    before: QuantizeSide
    after: QuantizeSide
    seconds: float
    verified: bool  # the reloaded artifact gave the same outputs, bit for bit
    qat_history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recommendation: Recommendation | None = None  # int8 modes only
    onnxruntime: QuantizeSide | None = None  # ONNX Runtime int8 of the float artifact, when measured

    def ratios(self) -> dict[str, float]:
        b, a = self.before, self.after
        out = {"size": b.size_bytes / a.size_bytes,
               "layers": b.layer_bytes / a.layer_bytes if a.layer_bytes else float("nan")}
        for n in b.latency_ms:
            out[f"speedup_batch{n}"] = b.latency_ms[n] / a.latency_ms[n]
        out["accuracy_change_points"] = 100 * (a.accuracy - b.accuracy)
        if a.perplexity is not None and b.perplexity:
            out["perplexity_ratio"] = a.perplexity / b.perplexity
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["artifact"], d["source"] = str(self.artifact), str(self.source)
        d["before"], d["after"] = self.before.to_dict(), self.after.to_dict()
        d["onnxruntime"] = self.onnxruntime.to_dict() if self.onnxruntime else None
        d["recommendation"] = self.recommendation.to_dict() if self.recommendation else None
        d["ratios"] = self.ratios()
        return d


def _default_out(source: Path, mode: str) -> Path:
    return source.with_name(f"{source.name}-{mode if mode in HALF else 'int8-' + mode}")


def _outputs(model: nn.Module, x: torch.Tensor, precision: str, channels_last: bool) -> torch.Tensor:
    """The model's fp32 outputs on ``x``, run as it is measured (the reload check)."""
    from dlkit.device import autocast

    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        return model(x).float()


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
    with quiet_ao(backend):
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
    repeats: int = 10  # timed runs per latency (batch 1: 4x as many; measure_models)
    batches: tuple[int, ...] = (1, 64, 256)  # the recommendation needs int8 faster at every batch >= 64
    eval_samples: int | None = None  # the first N test samples; None: all
    seed: int = 0
    # static: time each int8 layer against its float version here and keep the slower ones in fp32
    # (``quantize_static``); ``fp32_layers`` are kept in fp32 whatever the timing says.
    choose_layers: bool = True
    fp32_layers: tuple[str, ...] = ()
    # int8: also time ONNX Runtime int8 of the float artifact for the recommendation (an ONNX export,
    # a few seconds). Off here so library calls stay quick; the command turns it on by default.
    onnxruntime: bool = False

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
    started = time.perf_counter()
    opts.validate()
    art = artifacts.read_artifact(path)
    final = _check(art, opts)
    with output.Destination(final):  # held until the new artifact is in place
        return _quantize(art, final, opts, started)


def _quantize(art, final: Path, opts: QuantizeOptions, started: float) -> QuantizeResult:
    artifacts.check_destination(final)  # again, now under the lock
    data = _load_data(art, opts)
    float_model = artifacts.load_model(art)
    model, history = _quantized_copy(float_model, art, data, opts)
    transform = _transform(opts, model)
    layers = _layers(model, float_model, opts.mode, art.model_name)
    x_test, y_test = data.test
    if opts.eval_samples is not None:  # the first N test samples: quicker, coarser accuracy
        x_test, y_test = x_test[:opts.eval_samples], y_test[:opts.eval_samples]
    int8 = opts.mode in INT8_MODES
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dlkit-quantize-") as tmp:
        onnx = _onnx_int8(art, opts, Path(tmp), notes) if int8 else None
        before, after, ort = _measure(float_model, model, transform, layers, art, (x_test, y_test), opts, onnx)
    final = _write(final, model, transform, art, before, after, history, opts)
    verified = _verify(final, model, art, x_test, after, opts)
    recommendation = _recommendation(art, before, after, ort, opts.mode) if int8 else None
    return QuantizeResult(final, art.path, art.model_name, art.manifest["model"].get("family", ""), opts.mode,
                          transform["backend"],
                          "int8 (CPU only)" if int8 else f"{after.precision} (weights widened from {opts.mode} at load)",
                          layers, len(y_test), before, after, time.perf_counter() - started, verified, history,
                          _notes(model, before, after, opts) + notes, recommendation, ort)


def _recommendation(art, before: QuantizeSide, after: QuantizeSide, ort: QuantizeSide | None,
                    mode: str) -> Recommendation:
    """``recommend`` over the int8 paths this run measured."""
    candidates = [Candidate("this artifact (PyTorch int8)", "torch", after.latency_ms)]
    if ort is not None:
        onnx_mode = _onnx_mode(mode)
        candidates.append(Candidate(f"ONNX Runtime int8 ({onnx_mode})", "onnxruntime", ort.latency_ms,
                                    f"dlkit export {art.path} --quantize {onnx_mode}"))
    return recommend(before.latency_ms, candidates)


def _onnx_mode(mode: str) -> str:
    """ONNX Runtime's int8 mode matching ours: QAT's model is static int8."""
    return "dynamic" if mode == "dynamic" else "static"


def _onnx_int8(art, opts: QuantizeOptions, tmp: Path, notes: list[str]) -> Path | None:
    """ONNX Runtime int8 of the float artifact, exported into ``tmp`` (``dlkit export --quantize``);
    None with a note when it is not wanted, not installed, or the family does not export."""
    import importlib.util

    from dlkit.export import ONNX_EXTRA, ExportMismatch, ExportOptions, export_artifact

    if not opts.onnxruntime:
        notes.append("ONNX Runtime int8 not measured (--no-onnxruntime): the recommendation weighs PyTorch int8 only")
        return None
    if art.spec.task == "lm":
        notes.append("ONNX Runtime int8 not measured: language models are compared in PyTorch only")
        return None
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        notes.append(f"ONNX Runtime int8 not measured: {', '.join(missing)} not installed ({ONNX_EXTRA})")
        return None
    try:
        folder = export_artifact(art.path, ExportOptions(format="onnx", quantize=_onnx_mode(opts.mode),
                                                         data_dir=opts.data_dir, out=tmp / "onnx")).path
    except (IncompatibleError, ExportMismatch) as exc:
        notes.append(f"ONNX Runtime int8 not measured: {exc.message}")
        return None
    if opts.mode == "qat":
        notes.append("ONNX Runtime int8 (static) quantizes the float weights after training, not the QAT-tuned "
                     "ones: compare its accuracy")
    return folder


def _check(art, opts: QuantizeOptions) -> Path:
    """The artifact takes this mode and the destination is free; returns the destination."""
    if any(t.get("kind") == KIND for t in art.manifest["model"].get("transforms", [])):
        raise UsageError(f"{art.path} is already quantized", hint="quantize the float artifact it came from")
    if any(t.get("kind") == "lora" for t in art.manifest["model"].get("transforms", [])):
        raise UsageError(f"{art.path} holds LoRA adapters on a base model, not one set of weights",
                         hint="train it again with --merge and quantize the merged artifact")
    check_mode(opts.mode, art.model_name, art.spec.modality)
    final = Path(opts.out) if opts.out else _default_out(art.path, opts.mode)
    artifacts.check_destination(final)
    return final


def _load_data(art, opts: QuantizeOptions):
    why = {"static": "static int8 calibration", "qat": "quantization-aware training"}.get(opts.mode,
                                                                                         "measuring accuracy")
    data = artifacts.load_data(art, why=why, data_dir=opts.data_dir)
    if opts.mode == "static" and len(data.train[0]) == 0:
        raise DataError(f"static int8 calibration needs training data, but the '{art.dataset}' train split is empty")
    return data


def _quantized_copy(float_model: nn.Module, art, data, opts: QuantizeOptions) -> tuple[nn.Module, list[dict]]:
    """A quantized copy of ``float_model`` in ``opts.mode`` (and QAT's training history)."""
    model = copy.deepcopy(float_model)
    history: list[dict] = []
    if opts.mode in HALF:
        round_to_half(model, opts.mode)
    elif opts.mode == "dynamic":
        with quiet_ao(opts.backend):
            quantize_dynamic(model)
    elif opts.mode == "static":
        model = _calibrate_static(model, data.train[0], opts)
    else:
        history = _qat(model, art, data, opts.backend, opts.epochs, opts.lr, opts.seed)
    return model.eval(), history


def _calibrate_static(model: nn.Module, x_train: torch.Tensor, opts: QuantizeOptions) -> nn.Module:
    """Observers, ``calib_batches`` random training batches through them, then int8 modules; the
    per-layer choice (``quantize_static``) unless ``opts.choose_layers`` is off."""
    g = torch.Generator().manual_seed(opts.seed)
    idx = torch.randperm(len(x_train), generator=g)[: opts.calib_batches * opts.calib_batch_size]
    batches = [x_train[idx[i : i + opts.calib_batch_size]] for i in range(0, len(idx), opts.calib_batch_size)]
    return quantize_static(model, batches, opts.backend, keep_fp32=opts.fp32_layers, choose=opts.choose_layers)


def _transform(opts: QuantizeOptions, model: nn.Module | None = None) -> dict:
    """The manifest's record of what was done (what ``rebuild`` and the codec read back)."""
    int8 = opts.mode in INT8_MODES
    transform = {"kind": KIND, "mode": opts.mode, "backend": opts.backend if int8 else None,
                 "storage": "int8" if int8 else opts.mode, "compute": "int8" if int8 else "fp32", "cpu_only": int8}
    if opts.mode == "static":
        transform.update(calib_batches=opts.calib_batches, calib_batch_size=opts.calib_batch_size)
    if opts.mode in ("static", "qat") and model is not None and float_layer_names(model):
        transform["fp32_layers"] = float_layer_names(model)  # kept float: rebuild wraps them again
    if opts.mode == "qat":
        transform.update(epochs=opts.epochs)
    return transform


def _layers(model: nn.Module, float_model: nn.Module, mode: str, model_name: str) -> list[str]:
    """The layers whose weights changed storage: int8 modules, or every float leaf with weights."""
    if mode not in INT8_MODES:
        return [n for n, m in float_model.named_modules() if not list(m.children()) and list(m.parameters())]
    layers = quantized_layer_names(model)
    if not layers:
        raise IncompatibleError(f"'{model_name}' has no layer that {mode} int8 quantizes",
                                hint="use --mode fp16 or bf16")
    return layers


def _measure(float_model, model, transform: dict, layers: list[str], art, test, opts: QuantizeOptions,
             onnx: Path | None = None):
    """Both models through the one measurement (the way `dlkit evaluate` runs them), then accuracy;
    with ``onnx`` (an int8 export folder), ONNX Runtime timed in the same rounds as a third side."""
    from dlkit.engine.evaluate import evaluate_model

    x_test, y_test = test
    int8 = opts.mode in INT8_MODES
    samples = repeat_to(x_test, max(opts.batches))
    subjects = [Subject(float_model, samples, art.precision), Subject(model, samples, "fp32" if int8 else art.precision,
                                                                       transform)]
    if onnx is not None:
        run = _onnx_runner(onnx, torch.get_num_threads())
        subjects.append(Subject(float_model, samples, "fp32", run=run, runtime="onnxruntime",
                                stored_bytes=(onnx / "model.onnx").stat().st_size))
    with quiet_ao(opts.backend if int8 else torch.backends.quantized.engine):
        measured = measure_models(subjects, device="cpu", batches=tuple(opts.batches), repeats=opts.repeats)
    ort = None
    if onnx is not None:
        ev = _evaluate_run(subjects[2].run, x_test, y_test, art)
        fields = {f.name: getattr(measured[2], f.name) for f in dataclasses.fields(measured[2])}
        ort = QuantizeSide(**fields, accuracy=ev.accuracy, loss=ev.loss, macro_f1=ev.macro_f1)
    encoded = encode_weights(model, transform)
    layer_bytes = (_tensor_bytes(v for k, v in float_model.state_dict().items()
                                 if any(k.startswith(f"{n}.") for n in layers)),
                   _tensor_bytes(v for k, v in encoded.items()
                                 if any(k.startswith((f"{n}.", f"{n}#")) for n in layers)))
    names = list(art.spec.class_names or range(art.spec.num_classes))
    sides = []
    for s, meas, lb in zip(subjects, measured, layer_bytes):
        fields = {f.name: getattr(meas, f.name) for f in dataclasses.fields(meas)}
        if art.spec.task == "lm":  # a language model: perplexity on the test text
            from dlkit.lm.evaluate import evaluate_lm

            with quiet_ao(opts.backend if int8 else torch.backends.quantized.engine):
                ev = evaluate_lm(s.model, x_test, y_test, split="test", batch_size=64, precision=s.precision)
            sides.append(QuantizeSide(**fields, layer_bytes=lb, accuracy=ev.accuracy, loss=ev.loss, macro_f1=None,
                                      perplexity=ev.perplexity))
            continue
        with quiet_ao(opts.backend if int8 else torch.backends.quantized.engine):
            ev = evaluate_model(s.model, x_test, y_test, class_names=names, split="test", batch_size=256,
                                device=torch.device("cpu"), precision=s.precision, channels_last=meas.channels_last)
        sides.append(QuantizeSide(**fields, layer_bytes=lb, accuracy=ev.accuracy, loss=ev.loss,
                                  macro_f1=ev.macro_f1))
    return sides[0], sides[1], ort


def _onnx_runner(folder: Path, threads: int):
    """numpy batch -> logits through ONNX Runtime with ``threads`` threads (as PyTorch gets)."""
    from dlkit.export import INPUT_NAME, onnx_session

    session = onnx_session(folder / "model.onnx", threads)
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def _evaluate_run(run, x_test: torch.Tensor, y_test: torch.Tensor, art):
    """Test metrics from another runtime's logits (as ``dlkit evaluate`` computes them)."""
    import numpy as np

    from dlkit.engine.evaluate import metrics_from_logits

    logits = [np.asarray(run(x_test[i : i + 1024].contiguous().numpy())) for i in range(0, len(x_test), 1024)]
    names = list(art.spec.class_names or range(art.spec.num_classes))
    return metrics_from_logits(torch.from_numpy(np.concatenate(logits)).float(), y_test, names, "test")


def _write(final: Path, model, transform: dict, art, before: QuantizeSide, after: QuantizeSide,
           history: list[dict], opts: QuantizeOptions) -> Path:
    manifest = copy.deepcopy(art.manifest)
    manifest["model"].setdefault("transforms", []).append(transform)
    manifest["precision"] = after.precision
    metrics = {"test_accuracy": after.accuracy, "test_loss": after.loss, "test_macro_f1": after.macro_f1,
               **{f"latency_ms_batch{n}": after.latency_ms[n] for n in opts.batches},
               "test_accuracy_before": before.accuracy}
    if after.perplexity is not None:  # a language model
        metrics.update(test_perplexity=after.perplexity, test_perplexity_before=before.perplexity)
        del metrics["test_macro_f1"]
    options = {"mode": opts.mode, "backend": transform["backend"],
               "calib_batches": opts.calib_batches if opts.mode == "static" else None,
               "epochs": opts.epochs if opts.mode == "qat" else None, "seed": opts.seed}
    manifest["lineage"].append(artifacts.lineage_step("quantize", options, metrics, parent=str(art.path)))
    manifest["metrics"] = metrics
    files = {"history.jsonl": "".join(json.dumps(r) + "\n" for r in history)} if history else {}
    return artifacts.write_artifact(final, model, manifest, files=files)


def _verify(final: Path, model, art, x_test: torch.Tensor, after: QuantizeSide, opts: QuantizeOptions) -> bool:
    """The artifact must give back exactly what was measured."""
    from dlkit.device import prepare_inference

    int8 = opts.mode in INT8_MODES
    reloaded = artifacts.load_model(artifacts.read_artifact(final))
    # prepared as the measurement prepared it: float convs left in an int8 model (dynamic int8 of a
    # cnn, a layer kept in fp32) run in channels_last there, and their weights' layout picks the kernel
    prepare_inference(reloaded, torch.device("cpu"), art.spec.input_shape)
    probe = x_test[:64]
    with quiet_ao(opts.backend if int8 else torch.backends.quantized.engine):
        verified = torch.equal(_outputs(model, probe, after.precision, after.channels_last),
                               _outputs(reloaded, probe, after.precision, after.channels_last))
    if not verified:
        log.warning("the reloaded %s gives other outputs than the model measured", final)
    return verified


def _notes(model, before: QuantizeSide, after: QuantizeSide, opts: QuantizeOptions) -> list[str]:
    notes = [f"slower than the original at batch {n} ({after.latency_ms[n]:.2f} ms against "
             f"{before.latency_ms[n]:.2f} ms)" for n in opts.batches if after.latency_ms[n] > before.latency_ms[n]]
    kept = float_layer_names(model)
    if kept:
        notes.append(f"kept in fp32 (their int8 kernels measured slower on this CPU, or --fp32-layers): "
                     f"{', '.join(kept)}")
    if opts.mode == "dynamic" and any(type(m) is nn.RNN for m in model.modules()):
        notes.append("nn.RNN (tanh) has no dynamic int8 kernel: it stays fp32, only the head is int8")
    return notes
