"""Training history: JSON lines, TensorBoard event files, and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path

HISTORY = "history.jsonl"
TENSORBOARD = "tensorboard"
CURVES = "curves.png"


class HistoryWriter:
    """Appends one JSON line and one set of TensorBoard scalars per epoch."""

    def __init__(self, folder: Path, previous: list[dict]):
        self.folder = folder
        # The history in the checkpoint is the truth: rewrite the file from it on resume.
        with open(folder / HISTORY, "w") as f:
            for record in previous:
                f.write(json.dumps(record) + "\n")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(folder / TENSORBOARD))
        except ImportError:  # tensorboard is a declared dependency; tolerate its absence anyway
            self._tb = None

    def append(self, record: dict) -> None:
        with open(self.folder / HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["epoch"]
            for key, value in record.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    group = "val" if key.startswith("val_") else "train"
                    self._tb.add_scalar(f"{group}/{key.removeprefix('val_').removeprefix('train_')}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train and validation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlkit.output import save_figure

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], marker="o", label="train")
        if all(f"val_{metric}" in r for r in history):
            ax.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlkit.output import save_figure

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in confusion) or 1
    for i in range(n):
        for j in range(n):
            v = confusion[i][j]
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
