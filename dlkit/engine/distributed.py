"""Distributed data parallel through ``torch.distributed``: the worker side and a local launcher.

Two strategies share everything below: ``ddp`` (DistributedDataParallel: a full replica per
worker, gradients all-reduced) and ``fsdp`` (FSDP2: each worker holds a shard of the parameters,
gradients and optimizer state; engine.fsdp).

Workers are started by the standard elastic launcher, either ``torchrun ... -m dlkit train ...``
(any number of machines) or ``dlkit train ... --nproc N`` (N local workers through the same
launcher's Python API, see ``launch``). A worker recognises the variables the launcher sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) and joins the process group
itself: gloo on CPU, nccl on CUDA.

Semantics (the same for both launchers):
- ``--batch-size`` is the global batch: the samples of one optimizer step over all workers. Step
  ``b`` of an epoch uses exactly the samples a single process would use (slice ``b`` of the
  seeded epoch permutation); rank ``r`` takes every ``world``-th of them (``batch[r::world]``).
  So each rank sees its own shard of every epoch, shards never overlap, and every sample is used
  once per epoch: nothing is dropped or padded, except that a rank whose part of a short last
  batch would be empty computes one sample with weight zero (DDP and FSDP need every rank in
  every step).
- The loss is weighted so that the gradient average over ranks (DDP's all-reduce, FSDP's
  reduce-scatter) equals the gradient of the mean over the global batch, even when the ranks'
  parts differ by one sample. The learning rate is therefore not scaled: a run with --nproc N
  follows the same global batches as one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dlkit.errors import DlkitError, TrainingError

log = logging.getLogger("dlkit")

TEST_FAIL_RANK = "DLKIT_TEST_FAIL_RANK"  # test-only: this rank kills itself (SIGKILL) at step 3
TEST_STOP_STEP = "DLKIT_TEST_STOP_STEP"  # test-only: rank 0 sends itself SIGTERM after this step (a stop request)


def env_world_size() -> int:
    """The world size the launcher announced (1 outside torchrun / --nproc workers)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def choose_threads(local_world_size: int) -> tuple[int, str]:
    """Threads per worker and why: the launcher's OMP_NUM_THREADS=1 wastes cores when N < cores.

    DLKIT_NUM_THREADS wins; an OMP_NUM_THREADS other than 1 is the user's and is kept; 1 is what
    torchrun sets by default, so it is replaced by usable cores // local workers.
    """
    if os.environ.get("DLKIT_NUM_THREADS"):
        return max(1, int(os.environ["DLKIT_NUM_THREADS"])), "DLKIT_NUM_THREADS"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 1:
        return int(omp), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size)), f"{cores} cores / {local_world_size} local workers"


@dataclass
class DistContext:
    """Who this worker is, and the few collectives the training loop needs."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    threads: int
    threads_reason: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few numbers over all ranks (float64, one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one: a stop request stops all ranks at one step."""
        return self.all_sum([float(flag)], device)[0] > 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def seed_epoch(self, seed: int, epoch: int, batch: int) -> None:
        """Per-rank random streams (dropout, flips), reproducible on resume from ``batch``."""
        torch.manual_seed(seed * 1_000_003 + epoch * 10_007 + batch * 101 + self.rank)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float, weight: float,
             global_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's mean loss, the objective to differentiate).

        DDP averages gradients over ranks: the per-sample losses are scaled so that this average is
        the gradient of the mean over the global batch of ``global_n`` samples.
        """
        losses = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
        return losses.mean(), losses.sum() * (weight * self.world_size / global_n)

    def shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's part of a global batch of indices, and its loss weight (0 for a stand-in)."""
        part = batch[self.rank :: self.world_size]
        if len(part) == 0:  # a short last batch: compute one sample, weighted 0, to keep DDP in step
            return batch[:1], 0.0
        return part, 1.0

    def wrap(self, model: torch.nn.Module, device: torch.device, strategy: str = "ddp") -> torch.nn.Module:
        """The module the training step calls: DDP's wrapper around a replica, or for ``fsdp`` the
        model itself, sharded in place (engine.fsdp). Build the optimizer after this."""
        if strategy == "fsdp":
            from dlkit.engine.fsdp import shard

            return shard(model, device, self.world_size)
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # The gradients live in the all-reduce buckets (views), not beside a copy of them there:
        # one gradient-sized buffer less per worker, which dlkit.plan assumes.
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def parameter_digests(self, model: torch.nn.Module) -> list[str]:
        """SHA-256 of this rank's parameters, gathered from every rank (a collective).

        DDP keeps replicas equal by construction; this checks it at the end of a run, cheaply.
        Buffers are left out: BatchNorm statistics are each rank's own between broadcasts.
        """
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests: list = [None] * self.world_size
        torch.distributed.all_gather_object(digests, h.hexdigest())
        if len(set(digests)) > 1:
            raise TrainingError(f"the workers' parameters differ at the end of training ({len(set(digests))} "
                                "distinct replicas)", hint="this is a bug in dlkit; please report it")
        return digests

    def test_hook(self, step: int) -> None:
        """Test-only: with DLKIT_TEST_FAIL_RANK=r, rank r is killed at step 3 (a crashed worker); with
        DLKIT_TEST_STOP_STEP=n, rank 0 is asked to stop (SIGTERM) after step n."""
        if os.environ.get(TEST_FAIL_RANK) == str(self.rank) and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.rank == 0 and os.environ.get(TEST_STOP_STEP) == str(step):
            os.kill(os.getpid(), signal.SIGTERM)  # as from outside: every rank stops after this step


@dataclass(frozen=True)
class LocalContext:
    """A plain process as a world of one: rank 0 of 1, collectives that return their input.

    It has DistContext's interface, so the training loop has one path for both.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return True

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        return list(values)

    def any(self, flag: bool, device: torch.device) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def seed_epoch(self, seed: int, epoch: int, batch: int) -> None:
        """Nothing: the global generator is the run's one stream, and a checkpoint keeps it."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float, weight: float,
             global_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch's mean loss, the objective to differentiate): the same tensor here."""
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return loss, loss

    def shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        return batch, 1.0

    def wrap(self, model: torch.nn.Module, device: torch.device, strategy: str = "ddp") -> torch.nn.Module:
        if strategy == "fsdp":
            raise fsdp_needs_workers()
        return model

    def test_hook(self, step: int) -> None:
        pass


Context = DistContext | LocalContext


def fsdp_needs_workers() -> DlkitError:
    from dlkit.errors import UsageError

    return UsageError("--strategy fsdp shards the model over several workers, and this is one process",
                      hint="add --nproc 2 (or more), or launch with torchrun; one process trains unsharded "
                           "without --strategy")


def setup(device: torch.device) -> tuple[DistContext | None, torch.device]:
    """Join the process group when launched as a worker; (None, device) in a plain process."""
    world = env_world_size()
    if world <= 1:
        return None, device
    import torch.distributed as dist

    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            from dlkit.errors import UsageError

            raise UsageError(f"{local_world} workers on this machine but {torch.cuda.device_count()} GPU(s)",
                             hint="use one worker per GPU (--nproc / --nproc-per-node), or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    threads, why = choose_threads(local_world)
    torch.set_num_threads(threads)
    ctx = DistContext(rank, world, local_rank, local_world, backend, threads, why)
    log.info("worker %d/%d (local %d/%d): backend %s, %d threads per worker (%s)", rank, world, local_rank,
             local_world, backend, threads, why)
    return ctx, device


def teardown(ctx: DistContext | None) -> None:
    if ctx is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def worker_stop_signals():
    """Like engine.signals.stop_on_signals, for a worker: the first SIGINT/SIGTERM asks to stop.

    Later signals are ignored rather than interrupting at once: Ctrl-C reaches the launcher too,
    which then sends SIGTERM to its workers (and SIGKILL after its shutdown timeout), and the
    checkpoint at the next step must still be written.
    """
    from dlkit.engine.signals import StopFlag

    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signal is None:
            flag.signal = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- the local launcher (dlkit train --nproc N) -------------------------------------------------

_NOISY = ("torch.distributed.elastic", "torch.multiprocessing", "torch.distributed.launcher")


def launch(nproc: int, entrypoint: Callable, *args: Any, shutdown_timeout: float = 30.0) -> Any:
    """Run ``entrypoint(*args)`` in ``nproc`` local workers; return rank 0's result.

    Uses torch.distributed.launcher.api.elastic_launch (the engine behind torchrun) in this
    process rather than a ``python -m torch.distributed.run`` subprocess: a failure arrives as a
    ChildFailedError naming the rank, its exit code or signal and its exception, which becomes
    one DlkitError line here instead of torchrun's log, and rank 0's result (a picklable value)
    comes back without a side channel. The rendezvous is c10d on 127.0.0.1 with a free port.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.agent.server import api as _agent_api  # noqa: F401 (its logger, quieted below)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dlkit-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    if hasattr(config, "shutdown_timeout"):
        config.shutdown_timeout = int(shutdown_timeout)
    # The launcher logs each failure as a traceback wall (its loggers set their own levels): quiet
    # them while it runs; the failure is reported below in one line.
    names = [n for n in logging.root.manager.loggerDict if n.startswith(_NOISY)] + list(_NOISY)
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        raise worker_failure(exc.failures, nproc) from None
    except SignalException as exc:
        from dlkit.errors import Interrupted

        raise Interrupted(f"the launcher received {exc.sigval.name}; workers were asked to stop") from None
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return results[0]


def _failure_text(failure) -> tuple[str, str | None]:
    """(one-line description, the dlkit error class name if the worker raised one)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "")
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return f"killed by {name}", None
    if failure.error_file_data and ":" in message and not message.startswith("To enable traceback"):
        kind, _, text = message.partition(": ")
        return text.splitlines()[0] if text else kind, kind
    return f"exited with code {failure.exitcode}", None


def worker_failure(failures: dict, nproc: int) -> DlkitError:
    """The DlkitError for a failed launch: the root cause first (killed or erring, not a victim)."""
    import dlkit.errors as errors

    def secondary(item):  # ranks that failed because another one went away
        rank, f = item
        text = str(f.message).lower()
        victim = f.exitcode == -signal.SIGTERM or "gloo" in text or "connection" in text or "nccl" in text
        return (victim, f.timestamp, rank)

    rank, failure = min(failures.items(), key=secondary)
    text, kind = _failure_text(failure)
    cls = getattr(errors, kind, None) if kind else None
    if isinstance(cls, type) and issubclass(cls, DlkitError):
        return cls(f"worker rank {rank} of {nproc}: {text}")
    if failure.exitcode < 0:
        hint = "it was killed from outside the run (out of memory? see dmesg)"
    else:
        hint = "the other workers were stopped; run with one process to see the error in full"
        trace = (failure.error_file_data or {}).get("message", {})
        if isinstance(trace, dict) and trace.get("extraInfo", {}).get("py_callstack"):
            log.debug("traceback of worker rank %d:\n%s", rank, trace["extraInfo"]["py_callstack"])
    return TrainingError(f"worker rank {rank} of {nproc} failed: {text}", hint=hint)
