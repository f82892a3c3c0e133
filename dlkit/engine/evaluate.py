"""Evaluation: loss, accuracy, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dlkit.device import autocast


@dataclass
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvalResult:
    split: str
    loss: float
    accuracy: float
    samples: int
    macro_f1: float
    per_class: list[ClassMetrics]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "macro_f1": self.macro_f1, "samples": self.samples}


@torch.no_grad()
def predict_logits(model, x: torch.Tensor, *, batch_size: int = 1024, device=None, precision: str = "fp32",
                   channels_last: bool = False) -> torch.Tensor:
    """Logits for all of ``x`` in batches of ``batch_size`` (float32, on the CPU)."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out.append(model(xb).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, class_names, split: str) -> EvalResult:
    n_classes = len(class_names)
    if len(y) == 0:
        return EvalResult(split, float("nan"), float("nan"), 0, float("nan"), [], [[0] * n_classes for _ in range(n_classes)])
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(1)
    confusion = torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    per_class = [
        ClassMetrics(str(class_names[i]), precision[i].item(), recall[i].item(), f1[i].item(), int(actual[i].item()))
        for i in range(n_classes)
    ]
    present = actual > 0
    macro_f1 = f1[present].mean().item() if present.any() else float("nan")
    return EvalResult(
        split=split,
        loss=loss,
        accuracy=(pred == y).double().mean().item(),
        samples=len(y),
        macro_f1=macro_f1,
        per_class=per_class,
        confusion=confusion.tolist(),
    )


def evaluate_model(model, x, y, *, class_names, split: str, batch_size: int = 1024, device=None,
                   precision: str = "fp32", channels_last: bool = False) -> EvalResult:
    logits = predict_logits(model, x, batch_size=batch_size, device=device, precision=precision,
                            channels_last=channels_last)
    return metrics_from_logits(logits, y, class_names, split)
