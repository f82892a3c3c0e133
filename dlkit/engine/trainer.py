"""The training loop: in-memory tensors batched by slicing, one optimizer step per batch.

Everything random is derived from the seed (the shuffle of epoch ``e`` from ``seed`` and ``e``;
dropout and augmentation from torch's global generator, whose state a checkpoint keeps), so a run
stopped at any batch and resumed reaches the same weights an uninterrupted run reaches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from dlkit.choices import TRAIN_CHECKPOINTING, TRAIN_STRATEGIES
from dlkit.device import autocast, check_precision, uses_channels_last
from dlkit.engine.distributed import Context, LocalContext
from dlkit.engine.evaluate import predict_logits
from dlkit.engine.optim import OPTIMIZERS, SCHEDULES, lr_factor, make_optimizer, param_groups
from dlkit.errors import TrainingError, UsageError


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    beta2: float = 0.999  # adam/adamw: the second-moment decay
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off
    precision: str = "fp32"
    label_smoothing: float = 0.0
    augment: bool = True  # the dataset's own augmentation, if it has one
    eval_batch_size: int = 1024
    # Language models (text-lm data) train by steps: random windows of the text, validated every
    # eval_every steps on eval_batches batches of validation windows (0: all of them).
    max_steps: int = 0  # optimizer steps of the run; 0: --epochs passes over the training text
    eval_every: int = 0  # steps between validations (and checkpoints); 0: once per pass over the text
    eval_batches: int = 0  # validation batches (of --batch-size windows) per check; 0: every window
    # Past one device and past full fine-tuning (issue 16).
    strategy: str = "ddp"  # with several workers: ddp (a replica each) or fsdp (FSDP2 shards)
    checkpointing: str = "none"  # none, or full: each block's activations recomputed in the backward pass
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on lora_targets, the base frozen
    lora_alpha: float = 0.0  # LoRA scale numerator (the update is alpha / rank * B A); 0: 2 * rank
    lora_targets: str = ""  # comma-separated Linear names (suffixes) to adapt; "": the family's attention q, v
    merge: bool = False  # LoRA: write the merged weights instead of base reference + adapters

    def validate(self) -> "TrainConfig":
        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1 (got {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr must be a positive number (got {self.lr})")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not 0 < self.beta2 < 1:
            problems.append(f"beta2 must be in (0, 1) (got {self.beta2})")
        if not 0 <= self.warmup < 1:
            problems.append(f"--warmup is a fraction of the run in [0, 1) (got {self.warmup})")
        if self.grad_clip < 0:
            problems.append(f"--grad-clip must be >= 0 (got {self.grad_clip})")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        for name in ("max_steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.strategy not in TRAIN_STRATEGIES:
            problems.append(f"unknown strategy '{self.strategy}' (choose {', '.join(TRAIN_STRATEGIES)})")
        if self.checkpointing not in TRAIN_CHECKPOINTING:
            problems.append(f"unknown checkpointing '{self.checkpointing}' (choose {', '.join(TRAIN_CHECKPOINTING)})")
        if self.lora_rank < 0:
            problems.append(f"--lora-rank must be >= 0 (got {self.lora_rank})")
        if self.lora_alpha < 0:
            problems.append(f"lora_alpha must be >= 0 (got {self.lora_alpha})")
        if not self.lora_rank and (self.lora_targets or self.merge):
            problems.append("--lora-targets and --merge need --lora-rank")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer '{self.optimizer}' (choose {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule '{self.schedule}' (choose {', '.join(SCHEDULES)})")
        if problems:
            raise UsageError("; ".join(problems))
        check_precision(self.precision)
        return self


def resolve_train_config(model: str, options: dict, dataset: str | None = None) -> TrainConfig:
    """Global defaults, then the model's own, then the dataset's, then what the user gave."""
    from dlkit.config import apply_overrides
    from dlkit.data import DATASETS
    from dlkit.models import model_entry

    cfg = apply_overrides(TrainConfig(), model_entry(model).train_defaults, what="training defaults")
    if dataset is not None:
        cfg = apply_overrides(cfg, DATASETS.get(dataset).train_defaults, what="training defaults")
    cfg = apply_overrides(cfg, {k: v for k, v in options.items() if v is not None}, what="training option")
    return cfg.validate()


class Observer:
    """Receives progress; the CLI renders it, library callers may ignore it. Methods are no-ops."""

    def on_start(self, *, total_steps: int, done_steps: int, epochs: int, steps_per_epoch: int) -> None: ...

    def on_step(self, *, step: int, epoch: int, loss: float, accuracy: float, samples_per_s: float, lr: float) -> None: ...

    def on_epoch(self, record: dict) -> None: ...


@dataclass
class TrainState:
    """Where a run is: restored from a checkpoint to resume exactly."""

    epoch: int = 0  # the epoch under way (0-based)
    batch: int = 0  # batches finished in that epoch
    step: int = 0  # optimizer steps finished in the whole run
    history: list[dict] = field(default_factory=list)
    # Running sums for the epoch under way, so a resumed epoch reports the same numbers.
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    elapsed: float = 0.0  # training seconds in the epoch under way
    completed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (global generator: checkpointed)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"hflip": hflip}


class _RunningSums:
    """The epoch's loss and correct predictions so far: Python numbers on the CPU (a sync per step
    costs nothing there), device tensors elsewhere (read every ``sync_every`` steps only)."""

    def __init__(self, state: TrainState, device: torch.device):
        self.on_cpu = device.type == "cpu"
        if self.on_cpu:
            self.loss, self.correct = state.loss_sum, state.correct
        else:
            self.loss = torch.tensor(state.loss_sum, device=device, dtype=torch.float64)
            self.correct = torch.tensor(state.correct, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        hits = (logits.detach().argmax(1) == y).sum()
        if self.on_cpu:
            self.loss += loss.item() * len(y)
            self.correct += int(hits)
        else:
            self.loss += loss.detach().double() * len(y)
            self.correct += hits


@dataclass
class _Run:
    """What stays fixed while ``fit`` runs, and the steps it is made of."""

    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    cfg: TrainConfig
    device: torch.device
    seed: int
    ctx: Context
    aug: Callable[[torch.Tensor], torch.Tensor] | None
    channels_last: bool
    steps_per_epoch: int
    total_steps: int
    sync_every: int
    epochs: int  # epochs, or for a language model the validation intervals of the run
    seq_len: int | None = None  # a language model's window: the training set is one token stream

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (a language model's last interval may be shorter)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order; for a language model, the start of each window it draws."""
        if self.seq_len is None:
            return epoch_permutation(len(self.x), self.seed, epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randint(0, len(self.x) - self.seq_len, (self.steps_per_epoch * self.cfg.batch_size,), generator=g)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seq_len is not None:  # windows of the stream; the targets are the next tokens
            w = self.x[idx[:, None] + torch.arange(self.seq_len + 1)].to(self.device, non_blocking=True)
            return w[:, :-1], w[:, 1:]
        # index_select, not x[idx]: the same rows, gathered in 26 against 60 us (128 x 784 floats)
        xb = self.x.index_select(0, idx).to(self.device, non_blocking=True)
        yb = self.y.index_select(0, idx).to(self.device, non_blocking=True)
        if self.aug is not None:
            xb = self.aug(xb)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb

    def set_lr(self, step: int) -> float:
        lr = self.cfg.lr * lr_factor(self.cfg.schedule, step, self.total_steps, self.cfg.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, state: TrainState, perm: torch.Tensor, sums: _RunningSums) -> torch.Tensor:
        """One optimizer step on batch ``state.batch`` of the epoch; returns this rank's loss."""
        b, cfg = state.batch, self.cfg
        idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        global_n = len(idx)
        idx, weight = self.ctx.shard(idx)
        xb, yb = self.batch(idx)
        self.optimizer.zero_grad(set_to_none=True)  # before the forward: old gradients not held with activations
        with autocast(self.device, cfg.precision):
            logits = self.net(xb)
        if self.seq_len is not None:  # every position predicts its next token
            logits, yb, global_n = logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), global_n * self.seq_len
        loss, objective = self.ctx.loss(logits, yb, cfg.label_smoothing, weight, global_n)
        if weight == 0:  # a stand-in sample (distributed, short last batch): computed, not counted
            logits, yb = logits[:0], yb[:0]
        objective.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        sums.add(loss, logits, yb)
        state.seen += len(yb)
        state.batch = b + 1
        state.step += 1
        self.ctx.test_hook(state.step)
        return loss

    def report(self, state: TrainState, sums: _RunningSums, loss: torch.Tensor, lr: float, t0: float,
               observer: Observer) -> None:
        """Check the loss and tell the observer; every rank reduces here (same steps), so all agree."""
        value = loss.item()
        seen, total_loss, total_correct, bad = self.ctx.all_sum(
            [state.seen, float(sums.loss), int(sums.correct), float(not math.isfinite(value))], self.device)
        if bad:
            value = value if not math.isfinite(value) else float("nan")  # another rank's loss
            raise TrainingError(
                f"the loss became {value} at epoch {state.epoch + 1}, step {state.step}",
                hint=f"lower --lr (it was {lr:.3g}), add --grad-clip 1.0, or train in fp32",
            )
        elapsed = time.perf_counter() - t0
        observer.on_step(step=state.step, epoch=state.epoch, loss=total_loss / seen, accuracy=total_correct / seen,
                         samples_per_s=seen / max(elapsed, 1e-9), lr=lr)

    def keep_sums(self, state: TrainState, sums: _RunningSums, t0: float) -> None:
        """Store the sums over all ranks in the state, for a checkpoint taken mid-epoch."""
        state.elapsed = time.perf_counter() - t0
        seen, loss_sum, correct = self.ctx.all_sum([state.seen, float(sums.loss), int(sums.correct)], self.device)
        state.seen, state.loss_sum, state.correct = int(seen), loss_sum, int(correct)

    def train_epoch(self, state: TrainState, observer: Observer, should_stop: Callable[[], bool]) -> float | None:
        """Run the epoch under way from ``state.batch``; its last lr, or None when stopped mid-way."""
        self.net.train()
        perm = self.order(state.epoch)
        steps = self.steps_in(state.epoch)
        self.ctx.seed_epoch(self.seed, state.epoch, state.batch)
        if not self.ctx.is_main:  # the checkpoint holds the sums over all ranks: count them once
            state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        sums = _RunningSums(state, self.device)
        t0 = time.perf_counter() - state.elapsed
        while state.batch < steps:
            lr = self.set_lr(state.step)
            loss = self.step(state, perm, sums)
            if state.step % self.sync_every == 0 or state.batch == steps:
                self.report(state, sums, loss, lr, t0, observer)
            if self.ctx.any(should_stop(), self.device) and state.batch < steps:
                self.keep_sums(state, sums, t0)
                return None
        self.keep_sums(state, sums, t0)
        return lr

    def validate(self, val: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Validation loss and accuracy; each rank scores its share and the sums are reduced."""
        if not len(val[0]):
            return {}
        ctx = self.ctx
        if self.seq_len is not None:
            return self.validate_lm(val)
        xv, yv = val[0][ctx.rank :: ctx.world_size], val[1][ctx.rank :: ctx.world_size]
        logits = predict_logits(self.model, xv, batch_size=self.cfg.eval_batch_size, device=self.device,
                                precision=self.cfg.precision, channels_last=self.channels_last)
        loss = F.cross_entropy(logits, yv, reduction="sum").item()
        correct = (logits.argmax(1) == yv).sum().item()
        loss, correct = ctx.all_sum([loss, correct], self.device)
        return {"val_loss": loss / len(val[0]), "val_accuracy": correct / len(val[0])}

    def validate_lm(self, val: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """Mean next-token loss on ``eval_batches`` batches of validation windows spread evenly over
        the text (all windows when 0); each rank scores its share."""
        from dlkit.lm.evaluate import token_loss

        ctx, cfg = self.ctx, self.cfg
        x, y = val
        if cfg.eval_batches and cfg.eval_batches * cfg.batch_size < len(x):
            pick = torch.linspace(0, len(x) - 1, cfg.eval_batches * cfg.batch_size).round().long()
            x, y = x[pick], y[pick]
        s = token_loss(self.model, x[ctx.rank :: ctx.world_size], y[ctx.rank :: ctx.world_size],
                       batch_size=cfg.eval_batch_size, device=self.device, precision=cfg.precision)
        nll, correct, tokens = ctx.all_sum([s.nll, s.correct, s.tokens], self.device)
        loss = nll / max(tokens, 1)
        return {"val_loss": loss, "val_accuracy": correct / max(tokens, 1), "val_perplexity": math.exp(min(loss, 700))}

    def end_epoch(self, state: TrainState, lr: float, val: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """The epoch's record, added to the history; the state moves to the next epoch."""
        record = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "lr": lr,
            "train_loss": state.loss_sum / state.seen,
            "train_accuracy": state.correct / state.seen,
            "samples_per_s": state.seen / max(state.elapsed, 1e-9),  # tokens for a language model
            "epoch_seconds": state.elapsed,
            **self.validate(val),
        }
        state.history.append(record)
        state.epoch += 1
        state.batch, state.seen, state.loss_sum, state.correct, state.elapsed = 0, 0, 0.0, 0, 0.0
        return record


def _schedule(n: int, cfg: TrainConfig, seq_len: int | None) -> tuple[int, int, int]:
    """(steps per epoch or validation interval, total steps, epochs or intervals) for ``n`` training
    samples, or for a language model ``n`` tokens drawn as windows of ``seq_len``."""
    if seq_len is None:
        given = [f"--{k.replace('_', '-')}" for k in ("max_steps", "eval_every", "eval_batches") if getattr(cfg, k)]
        if given:
            raise UsageError(f"{', '.join(given)} are for language models (text-lm data)",
                             hint="train classifiers by --epochs")
        per = math.ceil(n / cfg.batch_size)
        return per, per * cfg.epochs, cfg.epochs
    if n < seq_len + 1:
        raise UsageError(f"the training text ({n} tokens) is shorter than one window of {seq_len} tokens",
                         hint="give more text or a smaller --seq-len")
    pass_steps = max(1, n // (cfg.batch_size * seq_len))  # one pass over the text, in windows
    total = cfg.max_steps or pass_steps * cfg.epochs
    per = min(cfg.eval_every or pass_steps, total)
    return per, total, math.ceil(total / per)


def _start(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, *,
           device: torch.device, seed: int, augment: str | None, optimizer_state: dict | None, ctx: Context,
           seq_len: int | None = None) -> _Run:
    """Move the model to the device, wrap it for DDP or shard it for FSDP, then build the optimizer
    over what the wrapper holds (FSDP's shards), restored when resuming."""
    x, y = train
    if len(x) == 0:
        raise UsageError("the training split is empty")
    channels_last = uses_channels_last(model, tuple(x.shape))
    model.to(device)
    if channels_last and cfg.strategy != "fsdp":  # FSDP2 shards contiguous parameters only (the inputs stay NHWC)
        model.to(memory_format=torch.channels_last)
    net = ctx.wrap(model, device, cfg.strategy)
    optimizer = make_optimizer(cfg.optimizer, param_groups(model, cfg.weight_decay), lr=cfg.lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum, beta2=cfg.beta2)
    if cfg.strategy == "fsdp":
        from dlkit.engine import fsdp

        fsdp.track_optimizer(model, optimizer)
        if optimizer_state is not None:  # a checkpoint holds the full state: each rank takes its shard
            fsdp.load_optimizer_state(optimizer, optimizer_state)
    elif optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    steps_per_epoch, total_steps, epochs = _schedule(len(x), cfg, seq_len)
    return _Run(model=model, net=net, optimizer=optimizer, x=x, y=y, cfg=cfg, device=device,
                seed=seed, ctx=ctx, aug=AUGMENTATIONS[augment] if (cfg.augment and augment) else None,
                channels_last=channels_last, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                sync_every=1 if device.type == "cpu" else 25, epochs=epochs, seq_len=seq_len)


def fit(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    augment: str | None = None,
    observer: Observer | None = None,
    state: TrainState | None = None,
    optimizer_state: dict | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_epoch_end: Callable[[TrainState, torch.optim.Optimizer], None] | None = None,
    dist: Context | None = None,
    seq_len: int | None = None,
) -> tuple[TrainState, torch.optim.Optimizer]:
    """Train ``model`` in place. Returns the final state (``completed`` False if stopped early).

    With ``dist`` (a worker of a distributed run, see engine.distributed) the model is wrapped in
    DistributedDataParallel, each rank trains on its part of every global batch, and the numbers
    in the state and the records are summed over ranks; without it the run is a world of one.

    With ``seq_len`` the model is a language model: ``train`` is ``(token stream (T,), unused)``,
    each step draws ``batch_size`` random windows of ``seq_len`` tokens (seeded by the seed and the
    interval, so a resumed run draws the same), and an "epoch" is an interval of ``eval_every``
    steps ending in a validation and a checkpoint; ``val`` holds ``(x, y)`` windows.
    """
    cfg.validate()
    observer = observer or Observer()
    state = state or TrainState()
    run = _start(model, train, cfg, device=device, seed=seed, augment=augment, optimizer_state=optimizer_state,
                 ctx=dist or LocalContext(), seq_len=seq_len)
    observer.on_start(total_steps=run.total_steps, done_steps=state.step, epochs=run.epochs,
                      steps_per_epoch=run.steps_per_epoch)
    while state.epoch < run.epochs:
        lr = run.train_epoch(state, observer, should_stop)
        if lr is None:
            return state, run.optimizer
        observer.on_epoch(run.end_epoch(state, lr, val))
        if on_epoch_end is not None and state.epoch < run.epochs:
            on_epoch_end(state, run.optimizer)
        if run.ctx.any(should_stop(), device) and state.epoch < run.epochs:
            return state, run.optimizer
    state.completed = True
    return state, run.optimizer
