"""How faithful an explanation is: deletion and insertion curves (Petsiuk et al., 2018).

The features (image patches, text tokens: ``methods.units``) are ranked by their summed
attribution, highest first. Deletion switches them to the baseline one at a time in that order,
insertion starts from the baseline and puts them back in that order; after each step the target
class's probability is recorded. A faithful explanation makes the deletion curve fall fast (a
small area under it) and the insertion curve rise fast (a large area). The same curves for random
orders of the same features are the yardstick: an explanation whose areas are no better than a
random order's explains nothing.

Areas are trapezoids over the fraction of features moved (0 to 1), so they lie in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANDOM_ORDERS = 4  # random orders averaged for the yardstick
CHUNK = 512  # inputs per forward pass


def feature_scores(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The attribution of each feature: ``scores`` summed over the positions of each id of ``u``
    (leading channel dimensions summed first); positions with id -1 are left out."""
    s = scores.reshape(-1, *u.shape).sum(0) if scores.dim() > u.dim() else scores
    valid = u >= 0
    n = int(u.max()) + 1 if valid.any() else 0
    return torch.zeros(n, dtype=torch.float64, device=u.device).index_add_(0, u[valid], s[valid].double())


@dataclass
class Curves:
    deletion: list[float]  # target probability after moving 0, 1, ..., F features
    insertion: list[float]
    random_deletion: list[float]  # mean over the random orders
    random_insertion: list[float]

    @staticmethod
    def area(points: list[float]) -> float:
        n = len(points) - 1
        if n < 1:
            return float(points[0]) if points else float("nan")
        return float(sum((a + b) / 2 for a, b in zip(points[:-1], points[1:])) / n)

    def aucs(self) -> dict[str, float]:
        return {"deletion_auc": self.area(self.deletion), "insertion_auc": self.area(self.insertion),
                "random_deletion_auc": self.area(self.random_deletion),
                "random_insertion_auc": self.area(self.random_insertion)}


def _probabilities(model, batch: torch.Tensor, target: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(batch), CHUNK):
            out.append(torch.softmax(model(batch[i:i + CHUNK]).float(), dim=-1)[:, target])
    return torch.cat(out)


def _moved(x: torch.Tensor, baseline: torch.Tensor, u: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The deletion then the insertion inputs of one feature ``order`` (feature ids, first moved
    first): 2 (F + 1) inputs, 0 to F features moved."""
    n = len(order)
    rank = torch.empty(n, dtype=torch.long, device=u.device)
    rank[order] = torch.arange(n, device=u.device)
    position_rank = torch.where(u >= 0, rank[u.clamp(min=0)], n)  # padding is never moved
    moved = position_rank[None] < torch.arange(n + 1, device=u.device).view(-1, *[1] * u.dim())
    if x.dim() > u.dim():  # image channels share their pixel's patch
        moved = moved.unsqueeze(1)
    return torch.cat([torch.where(moved, baseline[None], x[None]), torch.where(moved, x[None], baseline[None])])


def curves(model, x: torch.Tensor, baseline: torch.Tensor, u: torch.Tensor, scores: torch.Tensor, target: int,
           *, seed: int = 0) -> Curves:
    """The curves of the attribution order and, for comparison, of random orders (seeded)."""
    per_feature = feature_scores(scores, u)
    n = len(per_feature)
    g = torch.Generator().manual_seed(seed)
    orders = [torch.argsort(per_feature, descending=True, stable=True)]
    orders += [torch.randperm(n, generator=g).to(u.device) for _ in range(RANDOM_ORDERS)]
    probs = _probabilities(model, torch.cat([_moved(x, baseline, u, o) for o in orders]), target)
    rows = probs.view(len(orders), 2, n + 1).tolist()  # order, deletion/insertion, step
    mean = lambda curves: [sum(vals) / len(vals) for vals in zip(*curves)]  # noqa: E731
    return Curves(rows[0][0], rows[0][1], mean([r[0] for r in rows[1:]]), mean([r[1] for r in rows[1:]]))
