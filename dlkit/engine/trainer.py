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

from dlkit.device import autocast, check_precision, uses_channels_last
from dlkit.engine.distributed import DistContext
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
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 turns clipping off
    precision: str = "fp32"
    label_smoothing: float = 0.0
    augment: bool = True  # the dataset's own augmentation, if it has one
    eval_batch_size: int = 1024

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
        if not 0 <= self.warmup < 1:
            problems.append(f"--warmup is a fraction of the run in [0, 1) (got {self.warmup})")
        if self.grad_clip < 0:
            problems.append(f"--grad-clip must be >= 0 (got {self.grad_clip})")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
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
    from dlkit.models import MODELS

    cfg = apply_overrides(TrainConfig(), MODELS.get(model).train_defaults, what="training defaults")
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
    dist: DistContext | None = None,
) -> tuple[TrainState, torch.optim.Optimizer]:
    """Train ``model`` in place. Returns the final state (``completed`` False if stopped early).

    With ``dist`` (a worker of a distributed run, see engine.distributed) the model is wrapped in
    DistributedDataParallel, each rank trains on its part of every global batch, and the numbers
    in the state and the records are summed over ranks; without it nothing changes.
    """
    cfg.validate()
    observer = observer or Observer()
    state = state or TrainState()
    x_train, y_train = train
    n = len(x_train)
    if n == 0:
        raise UsageError("the training split is empty")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    aug = AUGMENTATIONS[augment] if (cfg.augment and augment) else None
    channels_last = uses_channels_last(model, tuple(x_train.shape))

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, param_groups(model, cfg.weight_decay), lr=cfg.lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    net = dist.wrap(model, device) if dist else model
    observer.on_start(total_steps=total_steps, done_steps=state.step, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    sync_every = 1 if device.type == "cpu" else 25

    while state.epoch < cfg.epochs:
        net.train()
        perm = epoch_permutation(n, seed, state.epoch)
        if dist is not None:  # per-rank random streams (dropout, flips), reproducible on resume
            torch.manual_seed(seed * 1_000_003 + state.epoch * 10_007 + state.batch * 101 + dist.rank)
            if not dist.is_main:  # the checkpoint holds the sums over all ranks: count them once
                state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        # Running sums: Python numbers on the CPU (a sync per step costs nothing there), device
        # tensors elsewhere (synced every ``sync_every`` steps only).
        on_cpu = device.type == "cpu"
        loss_sum = state.loss_sum if on_cpu else torch.tensor(state.loss_sum, device=device, dtype=torch.float64)
        correct = state.correct if on_cpu else torch.tensor(state.correct, device=device)
        t0 = time.perf_counter() - state.elapsed
        for b in range(state.batch, steps_per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            if dist is not None:
                global_n = len(idx)
                idx, weight = dist.shard(idx)
            xb = x_train[idx].to(device, non_blocking=True)
            yb = y_train[idx].to(device, non_blocking=True)
            if aug is not None:
                xb = aug(xb)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lr = cfg.lr * lr_factor(cfg.schedule, state.step, total_steps, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, cfg.precision):
                logits = net(xb)
            if dist is None:
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                objective = loss
            else:  # DDP averages over ranks: scale so the result is the mean over the global batch
                losses = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing, reduction="none")
                loss = losses.mean()
                objective = losses.sum() * (weight * dist.world_size / global_n)
                if weight == 0:
                    idx = idx[:0]
                    logits, yb = logits[:0], yb[:0]
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if on_cpu:
                loss_sum += loss.item() * len(idx)
                correct += int((logits.detach().argmax(1) == yb).sum())
            else:
                loss_sum += loss.detach().double() * len(idx)
                correct += (logits.detach().argmax(1) == yb).sum()
            state.seen += len(idx)
            state.batch = b + 1
            state.step += 1
            if dist is not None:
                dist.test_hook(state.step)
            if state.step % sync_every == 0 or b + 1 == steps_per_epoch:
                value = loss.item()
                seen, total_loss, total_correct = state.seen, float(loss_sum), int(correct)
                if dist is not None:  # every rank reduces here (same steps), so all see the same
                    seen, total_loss, total_correct, bad = dist.all_sum(
                        [seen, total_loss, total_correct, float(not math.isfinite(value))], device)
                    value = value if bad == 0 else float("nan")
                if not math.isfinite(value):
                    raise TrainingError(
                        f"the loss became {value} at epoch {state.epoch + 1}, step {state.step}",
                        hint=f"lower --lr (it was {lr:.3g}), add --grad-clip 1.0, or train in fp32",
                    )
                elapsed = time.perf_counter() - t0
                observer.on_step(step=state.step, epoch=state.epoch, loss=total_loss / seen,
                                 accuracy=total_correct / seen, samples_per_s=seen / max(elapsed, 1e-9), lr=lr)
            stop = should_stop() if dist is None else dist.any(should_stop(), device)
            if stop and state.batch < steps_per_epoch:
                state.loss_sum, state.correct = float(loss_sum), int(correct)
                if dist is not None:  # the checkpoint keeps the sums over all ranks
                    seen, state.loss_sum, total_correct = dist.all_sum([state.seen, state.loss_sum, state.correct], device)
                    state.seen, state.correct = int(seen), int(total_correct)
                state.elapsed = time.perf_counter() - t0
                return state, optimizer
        elapsed = time.perf_counter() - t0
        if dist is not None:
            seen, loss_total, correct_total = dist.all_sum([state.seen, float(loss_sum), int(correct)], device)
            state.seen = int(seen)
        else:
            loss_total, correct_total = float(loss_sum), int(correct)
        record = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "lr": lr,
            "train_loss": loss_total / state.seen,
            "train_accuracy": correct_total / state.seen,
            "samples_per_s": state.seen / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
        }
        if len(val[0]) and dist is None:
            logits = predict_logits(model, val[0], batch_size=cfg.eval_batch_size, device=device,
                                    precision=cfg.precision, channels_last=channels_last)
            record["val_loss"] = F.cross_entropy(logits, val[1]).item()
            record["val_accuracy"] = (logits.argmax(1) == val[1]).double().mean().item()
        elif len(val[0]):  # each rank scores its share of the validation set; the sums are reduced
            xv, yv = val[0][dist.rank :: dist.world_size], val[1][dist.rank :: dist.world_size]
            logits = predict_logits(model, xv, batch_size=cfg.eval_batch_size, device=device,
                                    precision=cfg.precision, channels_last=channels_last)
            loss_v, correct_v = F.cross_entropy(logits, yv, reduction="sum").item(), (logits.argmax(1) == yv).sum().item()
            loss_v, correct_v = dist.all_sum([loss_v, correct_v], device)
            record["val_loss"], record["val_accuracy"] = loss_v / len(val[0]), correct_v / len(val[0])
        state.history.append(record)
        state.epoch += 1
        state.batch, state.seen, state.loss_sum, state.correct, state.elapsed = 0, 0, 0.0, 0, 0.0
        observer.on_epoch(record)
        if on_epoch_end is not None and state.epoch < cfg.epochs:
            on_epoch_end(state, optimizer)
        stop = should_stop() if dist is None else dist.any(should_stop(), device)
        if stop and state.epoch < cfg.epochs:
            return state, optimizer
    state.completed = True
    return state, optimizer
