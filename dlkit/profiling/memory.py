"""Memory: an estimate from tensor sizes (works on the meta device) and a measured peak.

Estimate, for one training step (bytes):
    weights + inputs + gradients + max(activation peak, optimizer state + transient_opt)
where the activation peak is the largest, over the forward ops, of (bytes autograd has saved for
backward so far + 2 x the op's output): the saved tensors are seen through
``torch.autograd.graph.saved_tensors_hooks``, one count per storage, parameters and inputs
excluded; the factor 2 covers an op's output in the forward pass and, in the backward pass, the
gradients in and out of the same op while the tensors saved before it are still held. Optimizer
state is 2 x the trainable weights for Adam/AdamW and 1 x for SGD with momentum; ``transient_opt``
is one more copy of the trainable weights (the foreach optimizer's temporaries). For inference the estimate follows every tensor a
forward pass creates until it is freed (no gradients are kept), so its peak is the largest set of
activations alive at once.

Measured peak: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU, PyTorch's profiler with
``profile_memory=True`` and its memory timeline (allocations and frees in order, tensors alive
before the run included).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("dlkit")

OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # quantized or other exotic tensors
        return tensor_bytes(t)


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters and buffers, bytes of trainable parameters), shared storages once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_bytes(p)
        if p.requires_grad:
            trainable += tensor_bytes(p)
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            total += tensor_bytes(b)
    return total, trainable


class LiveTracker:
    """Follows the storages that ops create (an ``on_op`` callback of the counter) until they die.

    Views share their base's storage; a storage is freed when the last tensor on it is collected.
    Only meaningful where nothing outside Python holds tensors (inference under no_grad)."""

    def __init__(self, preexisting: set[int] | None = None):
        self.preexisting = preexisting or set()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._refs: dict[int, list] = {}  # storage key -> [live tensor count, bytes]

    def __call__(self, func, args, out) -> None:
        for t in _tensors(out):
            if t.is_quantized or t.layout != torch.strided:
                continue
            key = storage_key(t)
            if key in self.preexisting:
                continue
            entry = self._refs.get(key)
            if entry is None:
                nbytes = storage_bytes(t)
                entry = self._refs[key] = [0, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            entry[0] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            self.live -= entry[1]
            del self._refs[key]


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


class SavedTensors:
    """Bytes autograd saves for backward during a forward pass (one count per storage)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.keys: dict[int, int] = {}
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        try:
            key = storage_key(t)
            if key not in self.exclude and key not in self.keys:
                self.keys[key] = storage_bytes(t)
                self.bytes += self.keys[key]
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@dataclass
class MemoryEstimate:
    weights: int
    inputs: int
    gradients: int
    optimizer_state: int
    activations_inference: int  # peak of live forward tensors (no grad)
    activations_training: int  # saved for backward
    transient: int  # activation peak of the training step above the saved tensors
    inference_peak: int
    training_peak: int | None
    optimizer: str


def estimate_memory(*, weights: int, trainable: int, inputs: int, inference_live_peak: int,
                    saved: int | None, activation_peak: int, optimizer: str) -> MemoryEstimate:
    states = OPTIMIZER_STATES.get(optimizer, 2)
    grads = trainable
    opt_state = states * trainable
    peak = max(activation_peak, saved or 0)
    transient = peak - (saved or 0)
    train_peak = None
    if saved is not None:
        train_peak = weights + inputs + grads + max(peak, opt_state + trainable)
    return MemoryEstimate(
        weights=weights, inputs=inputs, gradients=grads, optimizer_state=opt_state,
        activations_inference=inference_live_peak, activations_training=saved or 0,
        transient=transient, inference_peak=weights + inputs + inference_live_peak,
        training_peak=train_peak, optimizer=optimizer)


def measure_peak(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated while ``fn()`` runs, tensors alive before it and used in it included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        return None
    from torch.autograd.profiler import profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    # The autograd profiler records the same allocator events as torch.profiler.profile, whose
    # start() imports torch._inductor (2 s of a 5 s `dlkit profile`); same peak, measured.
    with profile(use_cpu=True, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    try:
        timeline = MemoryProfile(prof.kineto_results).timeline
    except Exception as exc:  # a private API: fail soft, say why
        log.debug("memory timeline unavailable: %s", exc)
        return None
    live = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda e: e[0]):
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return int(peak)
