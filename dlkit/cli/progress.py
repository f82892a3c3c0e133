"""Rich progress on stderr for long work: training steps and downloads."""

from __future__ import annotations

import time

from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn, \
    TransferSpeedColumn

from dlkit.cli.common import err


class TrainProgress:
    """A dlkit.engine.trainer.Observer (duck-typed: this module must not import torch)."""

    def __init__(self, quiet: bool, title: str):
        self.quiet = quiet
        self.title = title
        self.progress: Progress | None = None
        self.task = None
        self.epochs = 0
        self._last = 0.0

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_start(self, *, total_steps: int, done_steps: int, epochs: int, steps_per_epoch: int) -> None:
        self.epochs = epochs
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}  {task.fields[sps]:,.0f} samples/s"),
            TimeRemainingColumn(), console=err, transient=False, refresh_per_second=4,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=total_steps, completed=done_steps, loss=float("nan"),
                                           acc=0.0, sps=0.0)

    def on_step(self, *, step: int, epoch: int, loss: float, accuracy: float, samples_per_s: float, lr: float) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self.progress.update(self.task, completed=step, loss=loss, acc=accuracy, sps=samples_per_s,
                             description=f"{self.title} epoch {epoch + 1}/{self.epochs}")

    def on_epoch(self, record: dict) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=record["step"])
        val = ""
        if "val_accuracy" in record:
            val = f"  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.2%}"
        self.progress.console.print(
            f"epoch {record['epoch']}/{self.epochs}  loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}"
            f"{val}  {record['samples_per_s']:,.0f} samples/s  {record['epoch_seconds']:.1f}s", highlight=False)


class StepProgress(TrainProgress):
    """One progress bar per training run, for work that trains several times (iterative pruning
    fine-tunes after every step; a recipe trains in several steps)."""

    def on_start(self, **kw) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        super().on_start(**kw)


class DownloadProgress:
    """Callback for dlkit.data downloads: ``(done_bytes, total_bytes_or_None, file_name)``."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def __call__(self, done: int, total: int | None, description: str) -> None:
        if self.quiet:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self.progress.start()
        if description not in self.tasks:
            self.tasks[description] = self.progress.add_task(description, total=total)
        self.progress.update(self.tasks[description], completed=done, total=total)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
