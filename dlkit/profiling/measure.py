"""The one before/after measurement: counts, size and latency of several models, prepared alike.

``prune``, ``quantize``, ``compare`` and the benchmarks all call :func:`measure_models`, so the same
pair of models gets the same speed-up everywhere. Each model is

- prepared the way ``dlkit evaluate`` runs it (``dlkit.device.prepare_inference``: the device, and
  channels_last where training used it), under its artifact's precision (``dlkit.device.autocast``);
- fed the same inputs: batches cut from ``samples`` (real samples of the data when at hand, so token
  ids are valid; :func:`example_batch` otherwise draws random ones);
- timed in round-robin: every repeat runs each model once, in turn, so load on a shared machine
  falls on all of them alike; the median of the repeats is reported, CUDA synchronised around
  every run;
- checked for a busy machine: the 1-minute load average is read before and after the timing; when
  it exceeds the cores this process may use, ``Measurement.busy`` says so (and a note goes to
  stderr unless --quiet), so whoever reads the numbers knows the absolute milliseconds are inflated (ratios hold
  better: the runs alternated).

Timings assume freed memory is kept in the process (``dlkit.malloc.keep_freed_memory``, which the
``dlkit`` command and the benchmarks call at start-up): without it glibc's page faults depend on
what ran before, and a ratio measures the allocator as much as the models.

Size has one meaning: the bytes of the weights as an artifact stores them, i.e. the length of the
safetensors file holding the state dict, through the artifact's weights codec when the model is
transformed (int8 tensors, scales and zero points; fp16/bf16 halves). For an artifact this equals
the size of its ``model.safetensors``.

A subject may run in another runtime (``Subject.run``: ONNX Runtime running an ONNX export of the
model, for ``dlkit compare``): it is timed in the same rounds on the same samples (as numpy arrays,
on the CPU), counted on its PyTorch model, and its size is its file's bytes (``stored_bytes``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("dlkit")

SMALL_BATCH = 16  # batches below this are short and noisy: they run SMALL_FACTOR times as often
SMALL_FACTOR = 4
WARMUP = 2


@dataclass
class Measurement:
    """One model measured: counts (one MAC = one multiply-add), size, median latencies."""

    params: int
    macs: int
    size_bytes: int  # the safetensors weights as the artifact stores them (codec included)
    zeros: int  # parameters that are exactly zero
    latency_ms: dict[int, float]  # batch -> median milliseconds per forward
    repeats: dict[int, int]  # batch -> timed runs
    device: str
    precision: str
    channels_last: bool
    runtime: str = "torch"
    load_average: float | None = None  # the highest 1-minute load average seen around the timing
    cores: int = 0  # the cores this process may use
    busy: str | None = None  # set when load_average exceeded cores: the latencies ran on a busy machine

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the system does not tell it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note(load: float | None, cores: int) -> str | None:
    """A sentence for the report when ``load`` exceeded ``cores``, else None."""
    if load is None or load <= cores:
        return None
    return (f"busy machine: load average {load:.1f} on {cores} core{'s' if cores != 1 else ''} while timing; "
            f"absolute latencies are inflated (the runs alternated, so ratios are less affected)")


@dataclass
class Subject:
    """A model to measure, and how its artifact runs and stores it."""

    model: nn.Module
    samples: torch.Tensor  # inputs, on the CPU; batches are cut (and repeated) from it
    precision: str = "fp32"
    transform: dict | None = None  # the artifact's last transform with a weights codec (int8, fp16)
    input_shape: tuple[int, ...] | None = None  # per sample; default samples.shape[1:]
    # Another runtime (ONNX Runtime running an export of ``model``): runs a CPU batch as a numpy
    # array instead of ``model``, which is still what is counted; its file's bytes are its size.
    run: Callable[[object], object] | None = None
    runtime: str = "torch"
    stored_bytes: int | None = None


def example_batch(spec, batch: int, data=None) -> torch.Tensor:
    """``batch`` real test samples when ``data`` is at hand (valid token ids), else random ones."""
    if data is not None and len(data.test[0]) >= 1:
        return repeat_to(data.test[0], batch).clone()
    return random_input(batch, spec.input_shape, vocab_size=spec.vocab_size if spec.modality == "text" else None)


def random_input(batch: int, shape: tuple[int, ...], *, vocab_size: int | None = None, low: int = 1) -> torch.Tensor:
    """The same random batch for the same arguments (seed 0): ``batch`` samples of ``shape``, standard
    normal floats, or with ``vocab_size`` token ids (int64) drawn from ``low`` .. ``vocab_size - 1``
    (dlkit's text models keep id 0 for padding; a user's module takes ``low=0``)."""
    g = torch.Generator().manual_seed(0)
    if vocab_size is not None:
        return torch.randint(min(low, vocab_size - 1), vocab_size, (batch, *shape), generator=g)
    return torch.randn(batch, *shape, generator=g)


def repeat_to(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` rows of ``x``, repeated when it has fewer."""
    if len(x) < batch:
        x = x.repeat((math.ceil(batch / len(x)),) + (1,) * (x.ndim - 1))
    return x[:batch]


def weights_bytes(model: nn.Module, transform: dict | None = None) -> int:
    """Bytes of the safetensors file an artifact writes for ``model`` (see the module docstring)."""
    from safetensors.torch import save

    if transform is not None:
        from dlkit import artifacts

        tensors = artifacts.CODECS.get(transform["kind"]).encode(model, transform)
        return len(save(tensors))
    # As safetensors' save_model writes an artifact: a tensor shared by several names (a tied LM
    # head) is stored once, under one name, the others recorded in the metadata.
    from safetensors.torch import _remove_duplicate_names

    state = model.state_dict()
    metadata: dict[str, str] | None = None
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata = metadata or {}
            metadata.setdefault(name, kept)
            del state[name]
    return len(save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=metadata))


def count_zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


def measure_models(subjects: list[Subject], *, device: torch.device | str = "cpu",
                   batches: tuple[int, ...] = (1, 256), repeats: int = 10,
                   threads: int | None = None) -> list[Measurement]:
    """Measure every subject (see the module docstring). The models come on the CPU (counted there)
    and are moved to ``device``; int8 models run on the CPU only."""
    from dlkit.device import prepare_inference
    from dlkit.profiling import count_macs, count_params

    dev = torch.device(device)
    counts = []
    for s in subjects:
        s.model.eval()
        size = weights_bytes(s.model, s.transform) if s.stored_bytes is None else s.stored_bytes
        counts.append((count_params(s.model), count_macs(s.model, s.samples[:1]).macs, size, count_zeros(s.model)))
    if dev.type != "cpu" and any(s.run is not None for s in subjects):
        from dlkit.errors import UsageError

        raise UsageError("ONNX Runtime is measured on the CPU only", hint="use --device cpu")
    layouts = [False if s.run is not None  # another runtime: nothing to prepare
               else prepare_inference(s.model, dev, tuple(s.input_shape or s.samples.shape[1:])) for s in subjects]
    runs = {b: repeats * (SMALL_FACTOR if b < SMALL_BATCH else 1) for b in batches}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    loads = [load_average()]
    try:
        latency = {b: _round_robin(subjects, layouts, dev, b, runs[b]) for b in batches}
    finally:
        torch.set_num_threads(previous)
    loads.append(load_average())
    load = max((v for v in loads if v is not None), default=None)
    cores = usable_cores()
    busy = busy_note(load, cores)
    if busy:  # on stderr beside every command's numbers (not under --quiet: a note, not a problem)
        log.info(busy)
    return [Measurement(params=p, macs=m, size_bytes=size, zeros=z,
                        latency_ms={b: latency[b][i] for b in batches}, repeats=dict(runs), device=str(dev),
                        precision=s.precision, channels_last=cl, runtime=s.runtime, load_average=load, cores=cores,
                        busy=busy)
            for i, (s, cl, (p, m, size, z)) in enumerate(zip(subjects, layouts, counts))]


def _round_robin(subjects: list[Subject], layouts: list[bool], dev: torch.device, batch: int,
                 repeats: int) -> list[float]:
    """Median milliseconds per forward of each subject at ``batch``, runs alternating."""
    return time_round_robin([_call(s, cl, dev, batch) for s, cl in zip(subjects, layouts)], repeats, dev)


def time_round_robin(calls: list[Callable[[], object]], repeats: int,
                     device: torch.device | str = "cpu") -> list[float]:
    """Median milliseconds of each call: ``WARMUP`` untimed runs each, then ``repeats`` rounds that
    run every call once, in turn (CUDA synchronised around each run on a CUDA ``device``). Every
    other round goes round the cycle the other way (a b c, a c b, ...): with three or more calls,
    none always runs right after the same one (whose cache footprint it would inherit), and no call
    ever runs twice in a row."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for call in calls:
        for _ in range(WARMUP):
            call()
    times: list[list[float]] = [[] for _ in calls]
    forward = list(range(len(calls)))
    backward = forward[:1] + forward[:0:-1]
    for r in range(repeats):
        for i in forward if r % 2 == 0 else backward:
            call = calls[i]
            sync()
            t = time.perf_counter()
            call()
            sync()
            times[i].append(1000 * (time.perf_counter() - t))
    return [statistics.median(ts) for ts in times]


def _call(s: Subject, channels_last: bool, dev: torch.device, batch: int) -> Callable[[], None]:
    """One inference forward of ``s`` on its batch, prepared once (layout, device), outside timing."""
    from dlkit.device import autocast

    if s.run is not None:  # another runtime, on the CPU
        array = repeat_to(s.samples, batch).contiguous().numpy()
        return lambda: s.run(array)
    x = repeat_to(s.samples, batch).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def call() -> None:
        with torch.inference_mode(), autocast(dev, s.precision):
            s.model(x)

    return call
