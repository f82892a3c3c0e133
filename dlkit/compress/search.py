"""Choosing how much to prune: the uniform ratio that reaches a MAC/parameter target, and the
per-layer sensitivity analysis (each unit pruned alone) with the per-unit ratios it suggests.

Costs are counted by ``dlkit.profiling`` (one multiply-add = one MAC, attention and recurrent
gates included) on the model in eval mode.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Callable

from torch import nn

from dlkit.compress.structured import list_units, prune_structured
from dlkit.errors import UsageError

MAX_RATIO = 0.95  # the largest uniform ratio a target search tries
SCAN_STEP = 0.05
BISECTIONS = 6


def count_macs(model: nn.Module, example) -> int:
    """MACs of one inference forward on ``example`` (``dlkit.profiling.count_macs``, eval mode)."""
    from dlkit.profiling import count_macs as profile_macs

    was_training = model.training
    model.eval()
    try:
        return profile_macs(model, example).macs
    finally:
        model.train(was_training)


def cost(model: nn.Module, example, kind: str) -> int:
    """MACs for ``target_macs``, parameters for ``target_params``."""
    from dlkit.profiling import count_params

    return count_macs(model, example) if kind == "target_macs" else count_params(model)


def _cost_after(model, example, kind, **prune_kw) -> float:
    trial = copy.deepcopy(model)
    try:
        prune_structured(trial, example, **prune_kw)
    except UsageError:
        return math.inf
    return cost(trial, example, kind)


def _what(kind: str) -> str:
    return "MACs" if kind == "target_macs" else "parameters"


def find_ratio(model, example, kind: str, fraction: float, *, importance: str, global_pruning: bool,
               protect) -> float:
    """The smallest uniform ratio whose pruned model keeps at most ``fraction`` of the cost.

    The cost is not monotone near ratio 1 (a group that would lose every channel is left whole),
    so a coarse scan finds the first ratio that reaches the goal and bisection refines it."""
    base = cost(model, example, kind)
    goal = fraction * base
    imp = "l2" if importance == "taylor" else importance  # counts only: no gradients needed
    kw = dict(importance=imp, global_pruning=global_pruning, protect=protect)
    lo, hi, best = 0.0, None, math.inf
    for step in range(1, int(round(MAX_RATIO / SCAN_STEP)) + 1):
        r = round(step * SCAN_STEP, 2)
        c = _cost_after(model, example, kind, ratio=r, **kw)
        best = min(best, c)
        if c <= goal:
            hi = r
            break
        lo = r
    if hi is None:
        reached = best / base if math.isfinite(best) else 1.0
        raise UsageError(f"cannot reach {fraction:.0%} of the {_what(kind)}: the most any uniform ratio up to "
                         f"{MAX_RATIO} removes leaves {reached:.1%}",
                         hint="the classifier, the input layer and protected layers are never pruned; "
                              "ask for a larger fraction")
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        if _cost_after(model, example, kind, ratio=mid, **kw) <= goal:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


def ratios_from_sensitivity(model, example, table: list[dict], kind: str, fraction: float, *,
                            importance: str, protect) -> dict[str, float]:
    """Per-unit ratios for a target: each unit takes the largest ratio whose measured accuracy
    drop is within a threshold; the smallest threshold that reaches the target wins."""
    goal = fraction * cost(model, example, kind)
    units = sorted({row["layer"] for row in table})
    kw = dict(importance="l2" if importance == "taylor" else importance, protect=protect)
    for t in sorted({row["drop"] for row in table}):
        choice = {}
        for u in units:
            ok = [row["ratio"] for row in table if row["layer"] == u and row["drop"] <= t]
            if ok:
                choice[u] = max(ok)
        if choice and _cost_after(model, example, kind, ratio=0.0, unit_ratios=choice, **kw) <= goal:
            return choice
    raise UsageError(f"cannot reach {fraction:.0%} of the {_what(kind)} with the ratios the sensitivity "
                     f"analysis measured (up to {max(r['ratio'] for r in table)})",
                     hint="ask for a larger fraction, or drop --from-sensitivity")


def sensitivity_analysis(model, example, evaluate: Callable[[nn.Module], float], *, ratios,
                         importance: str, protect) -> list[dict]:
    """Prune each unit alone at each ratio; rows of layer, ratio, val accuracy, drop, MACs kept."""
    base_acc = evaluate(model)
    base_macs = count_macs(model, example)
    imp = "l2" if importance == "taylor" else importance
    rows = []
    for unit in list_units(model, example, protect):
        for r in ratios:
            trial = copy.deepcopy(model)
            try:
                prune_structured(trial, example, ratio=0.0, importance=imp, protect=protect,
                                 unit_ratios={unit.name: r})
            except UsageError:
                continue
            acc = evaluate(trial)
            rows.append({"layer": unit.name, "ratio": r, "val_accuracy": acc, "drop": base_acc - acc,
                         "macs_kept": count_macs(trial, example) / base_macs})
    return rows


def plot_sensitivity(rows: list[dict], title: str) -> bytes:
    """Accuracy drop against ratio, one line per unit, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in dict.fromkeys(r["layer"] for r in rows):
        pts = [(r["ratio"], 100 * r["drop"]) for r in rows if r["layer"] == layer]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=layer)
    ax.set_xlabel("pruning ratio (fraction of the layer's channels removed)")
    ax.set_ylabel("validation accuracy drop (points)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
