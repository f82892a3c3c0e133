"""``plan_training``: will a training run fit, and how long will it take?

The model is built on the meta device (no weights), set to the plan's dtype, given LoRA adapters
if asked, and one training step is traced (``dlkit.plan.trace``). From that trace and the
arithmetic of ``dlkit.plan.states`` the plan computes, per device:

    peak = inputs + weights + optimizer state + gathered (FSDP)
           + max(activation phase, gradients + optimizer step temporaries)

* **activation phase**: the trace's largest live bytes over forward and backward (what autograd
  saved, outputs not yet saved, gradients flowing back and accumulating). Checkpointing changes
  it by calculation from the per-block trace: ``full`` keeps only each block's input and, in the
  backward pass, holds one block's saved tensors again while that block is recomputed (by then
  the gradients of the blocks after it are complete);
  ``selective`` (Korthikanti et al. 2022) drops the attention matrices (scores, probabilities,
  dropout masks: the ``5as/h`` term) and recomputes one layer's at a time. Where gradients are
  sharded (zero2, fsdp), those complete by the peak are held as a shard plus one block's in flight.
* **optimizer step**: all gradients, plus the update's temporaries (on CUDA PyTorch's foreach
  optimizers make one trainable-sized temporary; on the CPU the per-tensor loop makes two of the
  largest tensor).
* **gathered (FSDP)**: the unsharded weights of the parts outside the blocks (FSDP2 keeps the
  root's parameters gathered for the step) and of two blocks (the current and the prefetched).

``total`` adds a stated allowance for the framework (CUDA context, allocator fragmentation).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dlkit.errors import DlkitError, IncompatibleError, UsageError
from dlkit.plan.choices import CHECKPOINTING, PLAN_OPTIMIZERS, PLAN_PRECISIONS, STRATEGIES
from dlkit.plan.devices import GIB, Device, resolve_device
from dlkit.plan.kernels import onednn_lstm_backward, onednn_lstm_saved
from dlkit.plan.lora import apply_lora
from dlkit.plan.states import OPTIMIZER_BYTES, PRECISION_BYTES, SHARDED, ModelStates, model_states
from dlkit.plan.trace import StepTrace, trace_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}
CUDA_OVERHEAD = (1 * GIB, 0.05)  # CUDA context and kernels; allocator fragmentation as a share of the peak
CPU_OVERHEAD = (GIB // 2, 0.0)  # the Python process with torch loaded
MAX_SEARCH = 1 << 20


@dataclass
class PlanOptions:
    batch_size: int | None = None  # micro-batch per device (default: the model's training batch)
    seq_len: int | None = None  # text: tokens per sample
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    checkpointing: str = "none"
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] | None = None
    strategy: str = "ddp"
    devices: int = 1
    device_memory: str | None = None  # a known device, cpu, or a size (default h100-80)
    mfu: float = 0.4  # share of the device's peak FLOP/s reached
    tokens: float | None = None  # tokens to train on (text)
    samples: float | None = None  # samples per epoch
    epochs: float = 1.0
    search: bool = True  # find the largest micro-batch that fits
    dataset: str | None = None
    input_shape: str | None = None
    overrides: dict | None = None
    input_dtype: str | None = None
    vocab_size: int | None = None

    def validate(self) -> "PlanOptions":
        checks = (("--precision", self.precision, PLAN_PRECISIONS), ("--optimizer", self.optimizer, PLAN_OPTIMIZERS),
                  ("--checkpointing", self.checkpointing, CHECKPOINTING), ("--strategy", self.strategy, STRATEGIES))
        for opt, value, allowed in checks:
            if value not in allowed:
                raise UsageError(f"unknown {opt} {value!r}", hint="use " + ", ".join(allowed))
        if self.devices < 1:
            raise UsageError(f"--devices {self.devices} must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if not 0 < self.mfu <= 1:
            raise UsageError(f"--mfu {self.mfu} must be in (0, 1]", hint="e.g. 0.4 for 40% of the peak")
        if self.lora_targets and not self.lora_rank:
            raise UsageError("--lora-targets needs --lora-rank", hint="e.g. --lora-rank 8")
        for opt, value in (("--tokens", self.tokens), ("--samples", self.samples), ("--epochs", self.epochs)):
            if value is not None and value <= 0:
                raise UsageError(f"{opt} {value} must be positive")
        return self


@dataclass
class Memory:
    """Bytes per device for one training step at one micro-batch."""

    inputs: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward (after checkpointing), loss excluded
    logits_loss: int  # the model's output and what the loss saves
    transient: int  # the rest of the activation phase's peak (gradients in flight, a recomputed block)
    optimizer_step: int  # the step's temporaries
    gathered: int  # FSDP: unsharded weights held during the step
    peak: int
    overhead: int
    total: int
    fits: bool
    phase: str  # which phase sets the peak: "activations" or "optimizer step"


@dataclass
class Plan:
    target: str
    model: str
    kind: str
    input_shape: list[int]  # per micro-batch, batch first
    batch_size: int
    seq_len: int | None
    precision: str
    optimizer: str
    checkpointing: str
    strategy: str
    devices: int
    params: dict
    lora: dict | None
    device: dict
    memory: Memory
    model_states: dict  # ModelStates per device, and the bytes-per-parameter rule
    max_micro_batch: int | None  # None: not even 1 fits, or not searched
    searched: bool
    activations: dict  # per block, per module, attention matrices
    inference: dict
    compute: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- building and tracing ---------------------------------------------------------------------------

def find_blocks(model: nn.Module, declared: str | None = None) -> list[str]:
    """Paths of the checkpointable blocks: the family's declared container's children, else the
    children of the outermost containers (ModuleList/Sequential) holding two or more modules of
    one class with parameters (descending into containers of containers, e.g. ResNet stages)."""
    if declared and isinstance(getattr(model, declared, None), (nn.ModuleList, nn.Sequential)):
        return [f"{declared}.{n}" for n, _ in getattr(model, declared).named_children()]
    found: list[str] = []

    def visit(path: str, mod: nn.Module) -> None:
        kids = list(mod.named_children())
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(kids) >= 2:
            classes = {type(k) for _, k in kids}
            if all(isinstance(k, (nn.ModuleList, nn.Sequential)) for _, k in kids):
                for n, k in kids:
                    visit(f"{path}.{n}" if path else n, k)
                return
            if len(classes) == 1 and all(any(True for _ in k.parameters()) and list(k.children()) for _, k in kids):
                found.extend(f"{path}.{n}" if path else n for n, _ in kids)
                return
        for n, k in kids:
            visit(f"{path}.{n}" if path else n, k)

    visit("", model)
    return found


@dataclass
class _Built:
    model: nn.Module
    blocks: list[str]
    lora: dict | None
    frozen: int
    trainable: int
    text: bool
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    tgt: object
    largest_trainable: int = 0  # elements of the largest trainable tensor


def _build(target: str, opts: PlanOptions) -> _Built:
    from dlkit.models.registry import support_of
    from dlkit.profiling.target import resolve_target

    tgt, shape_batch = resolve_target(target, dataset=opts.dataset, input_shape=opts.input_shape,
                                      seq_len=opts.seq_len, overrides=opts.overrides,
                                      input_dtype=opts.input_dtype, vocab_size=opts.vocab_size)
    if opts.batch_size is None and shape_batch:
        opts.batch_size = shape_batch
    if tgt.real is not None:  # an artifact or the user's module: a weightless copy to plan with
        model = copy.deepcopy(tgt.real).to("meta")
    else:
        model = tgt.build("meta")
    dtype = DTYPES[opts.precision]
    if not any(p.is_floating_point() for p in model.parameters()):
        raise IncompatibleError(f"{target} has no float parameters to train", hint="plan the float model it came from")
    model = model.to(dtype)
    lora = None
    if opts.lora_rank:
        trainable, targets = apply_lora(model, opts.lora_rank, opts.lora_targets)
        lora = {"rank": opts.lora_rank, "targets": targets, "trainable_params": trainable}
    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    blocks = find_blocks(model, support_of(model).blocks)
    sample = tgt.example(1, "cpu")
    if isinstance(sample, tuple):
        raise IncompatibleError(f"{target} takes several inputs; the planner feeds one tensor",
                                hint="wrap the model so that it takes one input")
    text = not sample.is_floating_point()
    largest = max((p.numel() for p in params.values() if p.requires_grad), default=0)
    return _Built(model, blocks, lora, frozen, trainable, text, tuple(tgt.input_shape),
                  sample.dtype if text else dtype, tgt, largest)


def _inputs(b: _Built, batch: int) -> torch.Tensor:
    if b.text:
        return torch.ones((batch, *b.input_shape), dtype=b.input_dtype, device="meta")
    return torch.empty((batch, *b.input_shape), dtype=b.input_dtype, device="meta")


def _trace(b: _Built, batch: int, device: Device) -> StepTrace:
    x = _inputs(b, batch)
    try:
        tr = trace_step(b.model, x, b.blocks, kernels=device.kind,
                        seq_hint=b.input_shape[0] if b.text else None)
    except DlkitError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IncompatibleError(f"one training step of the model could not be traced on the meta device: {first}",
                                hint="the planner needs a forward pass that works without data (no .item(), "
                                     ".cpu() or data-dependent shapes)") from None
    if device.kind == "cpu" and tr.lstm_calls:
        backward = 0
        for call in tr.lstm_calls:
            delta = onednn_lstm_saved(call, batch) - call["saved"]
            tr.saved += delta
            tr.saved_at_peak += delta
            tr.saved_by_module[call["module"]] = tr.saved_by_module.get(call["module"], 0) + delta
            backward = max(backward, onednn_lstm_backward(call, batch))
        tr.transient = max(tr.transient, backward + tr.grads)
        tr.peak_live = tr.saved_at_peak + tr.transient
    return tr


# ---- memory -----------------------------------------------------------------------------------------

def _activation_phase(tr: StepTrace, checkpointing: str, notes: list[str]) -> tuple[int, int]:
    """(peak of the activation phase, bytes saved for backward) after checkpointing."""
    if checkpointing == "none":
        return tr.peak_live, tr.saved
    if not tr.blocks:
        notes.append(f"--checkpointing {checkpointing}: no repeated blocks found, so nothing is recomputed")
        return tr.peak_live, tr.saved
    if checkpointing == "full":
        drop = sum(b.saved for b in tr.blocks) - sum(b.input_bytes for b in tr.blocks)
        # block j is recomputed once the blocks after it are done, their gradients complete; it
        # saves its input again (the kept tensor itself, not a second copy)
        after = [sum(b.grads for b in tr.blocks[j + 1:]) for j in range(len(tr.blocks))]
        again = max(max(b.saved - b.input_bytes, 0) + g for b, g in zip(tr.blocks, after))
    else:
        if not tr.attention_matrix:
            notes.append("--checkpointing selective: no attention matrices are saved (a fused attention kernel, or "
                         "no attention), so nothing is recomputed")
        drop = tr.attention_matrix
        again = max((b.attention_matrix for b in tr.blocks), default=0)
    return tr.peak_live - drop + again, tr.saved - drop


def _gathered(b: _Built, tr: StepTrace, strategy: str, devices: int) -> int:
    if strategy != "fsdp" or devices == 1:
        return 0
    in_blocks = sum(t.weights for t in tr.blocks)
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in b.model.parameters()}.values())
    largest = max((t.weights for t in tr.blocks), default=0)
    return int(total - in_blocks + 2 * largest)  # beside the shards, which ``weights`` counts


def _memory(b: _Built, tr: StepTrace, opts: PlanOptions, device: Device, notes: list[str] | None = None) -> Memory:
    notes = notes if notes is not None else []
    states = _states(b, opts)
    act_peak, saved = _activation_phase(tr, opts.checkpointing, notes)
    if opts.devices > 1 and "gradients" in SHARDED[opts.strategy]:
        # gradients reduce-scattered as they complete: a shard of those done by the peak, plus
        # one block's (or bucket's) unsharded gradients in flight
        held = tr.grads_at_peak / opts.devices + max((t.grads for t in tr.blocks), default=0)
        act_peak -= max(tr.grads_at_peak - held, 0)
    if opts.devices > 1 and opts.strategy == "ddp":
        # DDP's all-reduce buckets hold every gradient from the first step on (dlkit keeps the
        # gradients as views of them), so all gradients are resident from the forward pass on
        act_peak += max(states.gradients - tr.grads_at_peak, 0)
    inputs = math.prod(_inputs(b, tr.batch).shape) * _inputs(b, 1).element_size()
    logits_loss = tr.logits + tr.loss_saved
    activations = saved - tr.loss_saved
    transient = max(act_peak - saved - tr.logits, 0)
    grad_bytes = states.gradients
    step_tmp = _optimizer_step(b, opts, device)
    gathered = _gathered(b, tr, opts.strategy, opts.devices)
    step_phase = grad_bytes + step_tmp
    peak = inputs + states.weights + states.optimizer + gathered + max(act_peak, step_phase)
    base, share = CPU_OVERHEAD if device.kind == "cpu" else CUDA_OVERHEAD
    overhead = int(base + share * peak)
    total = int(peak + overhead)
    return Memory(inputs=int(inputs), weights=int(states.weights), gradients=int(states.gradients),
                  optimizer=int(states.optimizer), activations=int(activations), logits_loss=int(logits_loss),
                  transient=int(transient), optimizer_step=int(step_tmp), gathered=int(gathered), peak=int(peak),
                  overhead=overhead, total=total, fits=total <= device.memory,
                  phase="activations" if act_peak >= step_phase else "optimizer step")


def _optimizer_step(b: _Built, opts: PlanOptions, device: Device) -> int:
    """Temporaries of the optimizer step: PyTorch's default on CUDA is the foreach implementation
    (Adam's square-root of the second moment for every tensor at once: one trainable-sized copy);
    on the CPU it is the per-tensor loop (two temporaries of the largest tensor, measured)."""
    if opts.optimizer == "none":
        return 0
    shard = opts.devices if opts.strategy != "ddp" else 1
    gbytes = 4 if opts.precision == "bf16-mixed" else PRECISION_BYTES[opts.precision][1]  # the update is fp32
    if device.kind == "cpu":
        return int(2 * b.largest_trainable * gbytes / shard)
    return int(b.trainable * gbytes / shard)


def _states(b: _Built, opts: PlanOptions) -> ModelStates:
    return model_states(b.trainable, b.frozen, precision=opts.precision, optimizer=opts.optimizer,
                        strategy=opts.strategy, devices=opts.devices)


def _max_batch(b: _Built, opts: PlanOptions, device: Device, at: dict[int, Memory]) -> int | None:
    """The largest micro-batch whose total fits: a line through the totals at batches 1 and 2
    gives a guess, traced to check, then a bisection between a batch that fits and one that does not."""

    def fits(n: int) -> bool:
        if n not in at:
            at[n] = _memory(b, _trace(b, n, device), opts, device)
        return at[n].fits

    if not fits(1):
        return None
    fits(2)
    slope = max(at[2].total - at[1].total, 1)
    guess = int(min(max(1 + (device.memory - at[1].total) // slope, 1), MAX_SEARCH))
    lo, hi = 1, guess
    if fits(guess):
        lo, step = guess, max(1, guess // 64)
        while lo < MAX_SEARCH and fits(min(lo + step, MAX_SEARCH)):
            lo, step = min(lo + step, MAX_SEARCH), step * 2
        if lo >= MAX_SEARCH:
            return lo
        hi = min(lo + step, MAX_SEARCH)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---- compute ----------------------------------------------------------------------------------------

def _compute(b: _Built, tr: StepTrace, opts: PlanOptions, device: Device, batch: int, notes: list[str]) -> dict:
    model_flops = tr.forward_flops + tr.backward_flops
    if opts.checkpointing == "full" and tr.blocks:
        recompute = sum(t.forward_flops for t in tr.blocks)
    elif opts.checkpointing == "selective":
        recompute = sum(4 * math.prod(c["q"][:-1]) * c["k"][-2] * c["q"][-1] for c in tr.attention_calls)
    else:
        recompute = 0
    peak = device.peak(opts.precision)
    step_s = (model_flops + recompute) / (peak * opts.mfu)
    tokens_per_sample = b.input_shape[0] if b.text else None
    unit = "tokens" if b.text else "samples"
    per_step = batch * (tokens_per_sample or 1)
    out = {
        "model_flops_per_step": model_flops, "model_macs_per_step": tr.forward_macs + tr.backward_macs,
        "recompute_flops_per_step": recompute,
        "hardware_flops_per_step": model_flops + recompute,
        f"model_flops_per_{unit[:-1]}": model_flops / per_step,
        "peak_flops": peak, "mfu": opts.mfu, "step_seconds": step_s, "unit": unit,
        f"{unit}_per_second_per_device": per_step / step_s,
        f"{unit}_per_second": per_step * opts.devices / step_s,
        "uncounted_ops": tr.uncounted,
        "convention": "FLOPs = 2 x multiply-adds + other arithmetic (dlkit.profiling); forward and backward as "
                      "autograd ran them; the optimizer update is not counted",
    }
    if opts.tokens and not b.text:
        raise UsageError("--tokens is for text models", hint="give --samples (per epoch) and --epochs")
    amount = None
    if opts.tokens:
        amount, what = opts.tokens, f"{opts.tokens:.3g} tokens"
    elif opts.samples:
        amount = opts.samples * opts.epochs * (tokens_per_sample or 1)
        what = f"{opts.samples:.3g} samples x {opts.epochs:g} epochs"
    if amount:
        seconds = amount / out[f"{unit}_per_second"]
        out["train"] = {"amount": what, "seconds": seconds, "hours": seconds / 3600,
                        "steps": amount / (per_step * opts.devices)}
    return out


def _inference(b: _Built, tr: StepTrace, opts: PlanOptions, batch: int) -> dict:
    """Weights and, for causal attention, the KV cache at the plan's sequence length (no gradients)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in b.model.parameters()}.values())
    causal = [c for c in tr.attention_calls if c["causal"]]
    kv = sum(2 * math.prod(c["k"]) * c["bytes"] for c in causal)
    out = {"weights": weights, "kv_cache": kv, "kv_cache_per_token": kv / (batch * b.input_shape[0]) if kv else 0,
           "note": "KV cache: keys and values of every causal attention layer at --seq-len for the micro-batch"
           if kv else "no causal attention: no KV cache"}
    return out


# ---- the plan ---------------------------------------------------------------------------------------

def plan_training(target: str, opts: PlanOptions | None = None) -> Plan:
    """Plan a training run of ``target`` (a registry name, artifact, ``hf:`` config or ``file.py:Name``)."""
    opts = copy.copy(opts or PlanOptions()).validate()
    notes: list[str] = []
    device = resolve_device(opts.device_memory, opts.precision)
    b = _build(target, opts)
    batch = opts.batch_size or b.tgt.default_batch
    tr = _trace(b, batch, device)
    mem = _memory(b, tr, opts, device, notes)
    at = {batch: mem}
    best = _max_batch(b, opts, device, at) if opts.search else None
    if best == MAX_SEARCH:
        notes.append(f"the micro-batch search stops at {MAX_SEARCH:,}: even that fits")
    if opts.devices == 1 and opts.strategy != "ddp":
        notes.append(f"--strategy {opts.strategy} on one device shards nothing")
    if device.kind == "cpu":
        notes.append("attention and LSTM memory modelled on PyTorch's CPU kernels (fused attention only without "
                     "dropout; oneDNN LSTM workspace)")
    else:
        notes.append("CUDA kernels modelled: fused attention (flash / memory-efficient: no attention matrix saved), "
                     "fused dropout (bool masks)")
    if opts.strategy == "ddp" and opts.devices > 1:
        notes.append("DDP: the all-reduce buckets hold every gradient for the whole step (dlkit trains with "
                     "gradient_as_bucket_view=True, so there is no second copy)")
    if opts.strategy == "zero1" and opts.devices > 1:
        notes.append("not counted: the gradient all-reduce's bucket buffers")
    states = _states(b, opts)
    params = {"total": b.trainable + b.frozen, "trainable": b.trainable, "frozen": b.frozen}
    k = OPTIMIZER_BYTES[opts.precision][opts.optimizer]
    per_block = [{"name": t.name, "input": t.input_bytes, "saved": t.saved, "attention_matrix": t.attention_matrix,
                  "weights": t.weights} for t in tr.blocks]
    top = sorted(tr.saved_by_module.items(), key=lambda kv: -kv[1])[:15]
    return Plan(
        target=target, model=b.tgt.name, kind=b.tgt.kind, input_shape=[batch, *b.input_shape], batch_size=batch,
        seq_len=b.input_shape[0] if b.text else None, precision=opts.precision, optimizer=opts.optimizer,
        checkpointing=opts.checkpointing, strategy=opts.strategy, devices=opts.devices, params=params, lora=b.lora,
        device={"name": device.name, "memory": device.memory, "peak_flops": device.peak(opts.precision),
                "source": device.source, "kind": device.kind},
        memory=mem,
        model_states={"weights": states.weights, "gradients": states.gradients, "optimizer": states.optimizer,
                      "total": states.total, "optimizer_bytes_per_param": k,
                      "sharded": list(SHARDED[opts.strategy]) if opts.devices > 1 else []},
        max_micro_batch=best, searched=opts.search,
        activations={"saved_no_checkpointing": tr.saved, "attention_matrix": tr.attention_matrix,
                     "peak_live_no_checkpointing": tr.peak_live, "blocks": per_block,
                     "by_module": dict(top)},
        inference=_inference(b, tr, opts, batch), compute=_compute(b, tr, opts, device, batch, notes), notes=notes)
