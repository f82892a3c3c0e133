"""Pruning: structured (Torch-Pruning's dependency graph, plus dlkit's own RNN hidden-unit pruner)
and unstructured (magnitude), with a before/after report measured in the same run.

Structured pruning removes whole channels, units, attention heads and FFN neurons, so the result
is a smaller dense model whose config records its new widths (``model.width_overrides()``): the
pruned artifact rebuilds from its manifest like any other, with no special loading code.

Conventions:
- ``ratio`` is the fraction of each prunable group's channels removed (Torch-Pruning's
  ``pruning_ratio``); attention heads are removed by the same fraction in every block, FFN width
  likewise; the transformer's residual width (``dim``) is kept.
- ``target_macs`` / ``target_params`` are the fraction of the original MACs / parameters to keep.
- The classifier (``model.head``) keeps all its outputs; its inputs shrink with the layer before.
- MACs: one multiply-add = one MAC, counted by :func:`count_macs` (the one place to swap counters).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dlkit import artifacts
from dlkit.choices import IMPORTANCES
from dlkit.errors import DlkitError, UsageError

log = logging.getLogger("dlkit")

SENSITIVITY_RATIOS = (0.2, 0.4, 0.6, 0.8)
MAX_RATIO = 0.95  # the largest uniform ratio a target search tries


# --------------------------------------------------------------------------------------------
# Options and results


# Fine-tuning after pruning reuses the artifact's own optimizer and schedule, compressed into the
# fine-tune epochs, from this fraction of its learning rate ("learning-rate rewinding", Renda et
# al. 2020, rather than the usual small fixed rate). Measured at ratio 0.5 with 2 fine-tune epochs
# on fashion-mnist, test accuracy change (one run each, baselines trained 2-3 epochs):
#   lstm (adam, lr 1e-3):   x0.1 -2.13 (another baseline)   x0.5 -1.24   x1 -0.58   x2 +0.08 points
#   resnet20 (sgd, lr 0.1): x0.2 -0.59   x0.5 -0.48   x1 -1.58 points
# Adaptive optimizers take the full rate; SGD's large absolute rate is halved.
FINETUNE_LR_SCALE = {"sgd": 0.5}


def default_finetune_lr(train_cfg) -> float:
    return train_cfg.lr * FINETUNE_LR_SCALE.get(train_cfg.optimizer, 1.0)


@dataclass
class PruneOptions:
    ratio: float | None = None
    target_macs: float | None = None  # fraction of the original MACs to keep
    target_params: float | None = None  # fraction of the original parameters to keep
    importance: str = "l2"
    global_pruning: bool = False
    iterative_steps: int = 1
    finetune_epochs: int = 0  # after every pruning step
    finetune_lr: float | None = None  # None: default_finetune_lr(the training config)
    protect: tuple[str, ...] = ()
    unstructured: bool = False
    sensitivity: bool = False
    from_sensitivity: bool = False
    sensitivity_ratios: tuple[float, ...] = SENSITIVITY_RATIOS
    sensitivity_samples: int = 2000  # validation samples per sensitivity measurement
    plot: Path | None = None  # sensitivity plot when no pruned artifact is written
    out: Path | None = None
    data_dir: str | None = None
    device: str = "auto"
    seed: int = 0
    latency_repeats: int = 15  # timed runs at batch 256 (batch 1 runs 4x as many)
    latency_threads: int | None = None  # torch threads while timing; None: as set
    calibration_batches: int = 4  # batches of 128 training samples for taylor gradients

    def target(self) -> tuple[str, float] | None:
        given = [(k, v) for k, v in (("ratio", self.ratio), ("target_macs", self.target_macs),
                                     ("target_params", self.target_params)) if v is not None]
        if len(given) > 1:
            raise UsageError(f"give one of --ratio, --target-macs, --target-params (got {len(given)})")
        return given[0] if given else None

    def validate(self) -> "PruneOptions":
        target = self.target()
        if target is None and not self.sensitivity:
            raise UsageError("nothing to do: give --ratio, --target-macs or --target-params (or --sensitivity)",
                             hint="e.g. dlkit prune ARTIFACT --ratio 0.5")
        if target is not None:
            name, value = target
            if not (0 < value < 1) or not math.isfinite(value):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be between 0 and 1, exclusive (got {value})",
                                 hint="--ratio is the fraction removed; --target-* the fraction kept")
        if self.importance not in IMPORTANCES:
            raise UsageError(f"unknown importance '{self.importance}'", hint=f"choose {', '.join(IMPORTANCES)}")
        if self.iterative_steps < 1:
            raise UsageError(f"--iterative-steps must be >= 1 (got {self.iterative_steps})")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be >= 0 (got {self.finetune_epochs})")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise UsageError(f"--finetune-lr must be positive (got {self.finetune_lr})")
        if self.from_sensitivity and (target is None or target[0] == "ratio"):
            raise UsageError("--from-sensitivity chooses per-layer ratios for a target",
                             hint="use it with --target-macs or --target-params")
        if self.unstructured:
            if self.importance not in ("l1", "l2", "random"):
                raise UsageError(f"--unstructured prunes by magnitude (l1/l2) or at random, not {self.importance}")
            if target is not None and target[0] == "target_macs":
                raise UsageError("--unstructured keeps every MAC of a dense model",
                                 hint="use --ratio (the sparsity) or --target-params")
            if self.from_sensitivity or self.global_pruning:
                pass  # magnitude pruning is global over the prunable weights anyway
        if any(not 0 < r < 1 for r in self.sensitivity_ratios):
            raise UsageError("sensitivity ratios must be between 0 and 1")
        return self


@dataclass
class Measurement:
    """One model measured: cost, speed, accuracy."""

    params: int
    macs: int
    size_bytes: int
    latency_b1_ms: float
    latency_b256_ms: float
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    zeros: int = 0  # parameters that are exactly zero

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PruneResult:
    artifact: Path | None  # None for a sensitivity analysis alone
    source: Path
    model: str
    family: str
    mode: str  # structured | unstructured | sensitivity
    before: Measurement | None = None
    after: Measurement | None = None
    ratio: float | None = None  # the uniform ratio used (found by the search for a target)
    unit_ratios: dict[str, float] = field(default_factory=dict)
    widths_before: dict = field(default_factory=dict)
    widths_after: dict = field(default_factory=dict)
    sparsity: float | None = None  # unstructured: zero fraction of the prunable weights
    sensitivity: list[dict] = field(default_factory=list)
    plot: Path | None = None
    device: str = "cpu"
    seconds: float = 0.0
    finetune_history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict:
        if self.before is None or self.after is None:
            return {}
        b, a = self.before, self.after

        def div(x, y):
            return x / y if y else None

        out = {"params": div(a.params, b.params), "macs": div(a.macs, b.macs),
               "size": div(a.size_bytes, b.size_bytes),
               "speedup_b1": div(b.latency_b1_ms, a.latency_b1_ms),
               "speedup_b256": div(b.latency_b256_ms, a.latency_b256_ms)}
        for split in ("val", "test"):
            x, y = getattr(a, f"{split}_accuracy"), getattr(b, f"{split}_accuracy")
            out[f"{split}_accuracy_delta"] = None if x is None or y is None else x - y
        return out

    def to_dict(self) -> dict:
        return {
            "artifact": str(self.artifact) if self.artifact else None, "source": str(self.source),
            "model": self.model, "family": self.family, "mode": self.mode, "device": self.device,
            "ratio": self.ratio, "unit_ratios": self.unit_ratios,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "ratios": self.ratios(), "widths_before": self.widths_before, "widths_after": self.widths_after,
            "sparsity": self.sparsity, "sensitivity": self.sensitivity,
            "plot": str(self.plot) if self.plot else None, "seconds": self.seconds,
            "finetune_history": self.finetune_history, "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------
# Counting and measuring


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one forward pass on ``example`` (batch included).

    Uses dlkit's profiler (``dlkit.profiling.count_macs``: matmuls, convolutions, attention, RNN
    gates), else Torch-Pruning's counter (conv, linear, norms, RNN cells; it does not see the
    attention matmuls inside ``scaled_dot_product_attention``)."""
    try:
        from dlkit.profiling import count_macs as profiler_macs  # type: ignore[attr-defined]
    except ImportError:
        profiler_macs = None
    if profiler_macs is not None:
        was_training = model.training
        model.eval()
        try:
            counts = profiler_macs(model, example)
            return int(getattr(counts, "macs", counts))
        except (TypeError, AttributeError, ValueError):  # another interface than ours: fall back
            pass
        finally:
            model.train(was_training)
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example)
    finally:
        model.train(was_training)
    return int(macs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's weights as the artifact stores them (safetensors)."""
    from safetensors.torch import save

    return len(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


@torch.inference_mode()
def compare_latency(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds per forward of each model on ``x``; runs alternate between the models so
    machine noise falls on all of them alike."""
    for m in models:
        m.eval()
        for _ in range(2):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m(x)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def example_input(spec, batch: int, data=None) -> torch.Tensor:
    """``batch`` real samples when data is at hand (tokens must be valid ids), else random ones."""
    if data is not None and len(data.test[0]) >= 1:
        x = data.test[0][:batch]
        if len(x) < batch:
            x = x.repeat((math.ceil(batch / len(x)),) + (1,) * (x.ndim - 1))[:batch]
        return x.clone()
    g = torch.Generator().manual_seed(0)
    if spec.modality == "text":
        return torch.randint(1, spec.vocab_size, (batch, *spec.input_shape), generator=g)
    return torch.randn(batch, *spec.input_shape, generator=g)


def sparsity_of(model: nn.Module, protected: set[nn.Module]) -> tuple[float, int]:
    """(zero fraction of the prunable weights, zeros among all parameters)."""
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    total = z = 0
    for _, t in _prunable_weights(model, protected):
        total += t.numel()
        z += int((t == 0).sum())
    return (z / total if total else 0.0), zeros


# --------------------------------------------------------------------------------------------
# Prunable units and structured pruning


@dataclass
class Unit:
    """Something that can be pruned alone: a Torch-Pruning group (named by its root layer), the
    attention heads or FFN of every transformer block, or a recurrent cell's hidden units."""

    name: str
    kind: str  # channels | heads | ffn | rnn
    modules: list[nn.Module]


def _is_transformer(model: nn.Module) -> bool:
    from dlkit.models.transformer import Transformer

    return isinstance(model, Transformer)


def _rnn_of(model: nn.Module) -> nn.RNNBase | None:
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    if not rnns:
        return None
    if len(rnns) > 1 or not isinstance(getattr(model, "rnn", None), nn.RNNBase):
        raise UsageError("dlkit prunes models with one recurrent cell at `model.rnn`")
    return model.rnn


def resolve_protect(model: nn.Module, names) -> list[nn.Module]:
    """Modules named on the command line (``--protect features.0``); unknown names are an error."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules or name == "":
            some = ", ".join(n for n in list(modules)[1:9] if n)
            raise UsageError(f"--protect {name}: the model has no layer of that name",
                             hint=f"layers include {some}, ...")
        out.append(modules[name])
    return out


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[name]()


def _tp_setup(model: nn.Module, protect: list[nn.Module]) -> dict:
    """Keyword arguments for Torch-Pruning's pruner: what to leave alone, and the heads."""
    ignored = [model.head, *protect]
    kwargs: dict = {}
    if _is_transformer(model):
        # Keep the residual width: ignoring the layers that write it leaves that group unpruned.
        ignored += [m for m in (model.patch,) if m is not None]
        ignored += [b.attn.proj for b in model.blocks] + [b.fc2 for b in model.blocks]
        kwargs["num_heads"] = {l: b.attn.num_heads for b in model.blocks for l in (b.attn.q, b.attn.k, b.attn.v)}
        kwargs["prune_num_heads"] = True
        kwargs["prune_head_dims"] = False
        kwargs["unwrapped_parameters"] = [(p, 2) for p in (model.cls, model.pos) if p is not None]
    return dict(ignored_layers=ignored, **kwargs)


def list_units(model: nn.Module, example: torch.Tensor, protect: list[nn.Module] = ()) -> list[Unit]:
    """The prunable units of ``model``, in forward order."""
    rnn = _rnn_of(model)
    if rnn is not None:
        return [] if rnn in protect else [Unit("rnn", "rnn", [rnn])]
    if _is_transformer(model):
        units = []
        heads = [b.attn.q for b in model.blocks if not {b.attn, b.attn.q, b.attn.k, b.attn.v} & set(protect)]
        ffn = [b.fc1 for b in model.blocks if b.fc1 not in protect]
        if heads:
            units.append(Unit("attention heads", "heads", heads))
        if ffn:
            units.append(Unit("ffn", "ffn", ffn))
        return units
    import torch_pruning as tp

    setup = _tp_setup(model, list(protect))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    ignored = [m for layer in setup["ignored_layers"] for m in layer.modules()]
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(model.modules())}
    roots = [g[0][0].target.module for g in dg.get_all_groups(ignored_layers=ignored,
                                                                root_module_types=[nn.Conv2d, nn.Linear])]
    return [Unit(names.get(r, type(r).__name__), "channels", [r]) for r in sorted(roots, key=order.get)]


def _check_widths(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.numel() == 0:
            raise UsageError(f"pruning leaves no channels in {name.rsplit('.', 1)[0]}",
                             hint="use a smaller ratio or target")


def prune_structured(model: nn.Module, example: torch.Tensor, *, ratio: float, importance: str = "l2",
                     global_pruning: bool = False, protect: list[nn.Module] = (), steps: int = 1,
                     unit_ratios: dict[str, float] | None = None,
                     before_step: Callable[[nn.Module], None] | None = None,
                     after_step: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
    """Prune ``model`` in place by ``ratio`` (or per-unit ``unit_ratios``, others by ``ratio``)
    in ``steps`` equal steps. ``before_step(model)`` runs before each step (taylor gradients),
    ``after_step(model, step)`` after it (fine-tuning). Returns the model."""
    rnn = _rnn_of(model)
    if rnn is not None:
        return _prune_rnn_model(model, ratio=ratio, importance=importance, protect=protect, steps=steps,
                                unit_ratios=unit_ratios, before_step=before_step, after_step=after_step)
    import torch_pruning as tp

    if global_pruning and _is_transformer(model):
        raise UsageError("--global is not supported for the transformer: its config holds one width for "
                         "all blocks", hint="drop --global (every block is pruned by the same ratio)")
    setup = _tp_setup(model, list(protect))
    ratio_dict, head_dict = {}, {}
    if unit_ratios:
        units = {u.name: u for u in list_units(model, example, protect)}
        for name, r in unit_ratios.items():
            if name not in units:
                raise UsageError(f"no prunable layer named '{name}'")
            for m in units[name].modules:
                if units[name].kind == "heads":
                    attn = next(b.attn for b in model.blocks if b.attn.q is m)
                    head_dict.update({attn.q: r, attn.k: r, attn.v: r})
                else:
                    ratio_dict[m] = r
    if _is_transformer(model):
        setup.update(head_pruning_ratio=ratio, head_pruning_ratio_dict=head_dict or None)
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=_importance(importance), pruning_ratio=ratio,
                                  pruning_ratio_dict=ratio_dict or None, global_pruning=global_pruning,
                                  iterative_steps=steps, **setup)
    head_dims = {b.attn: b.attn.q.out_features // b.attn.num_heads for b in getattr(model, "blocks", [])
                 if _is_transformer(model)}
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(model)
        model.eval()
        pruner.step()
        model.zero_grad(set_to_none=True)
        for attn, head_dim in head_dims.items():  # whole heads go: head_dim stays
            attn.num_heads = attn.q.out_features // head_dim
        _check_widths(model)
        if after_step is not None:
            after_step(model, step)
    model.train(was_training)
    return model


def _prune_rnn_model(model: nn.Module, *, ratio: float, importance: str, protect, steps: int,
                     unit_ratios: dict[str, float] | None, before_step, after_step) -> nn.Module:
    from dlkit.compress.rnn_prune import keep_top, prune_hidden, unit_importance

    if model.rnn in protect:
        return model
    r = (unit_ratios or {}).get("rnn", ratio)
    h0 = model.rnn.hidden_size
    head = getattr(model, "head", None)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        keep = max(1, int(round(h0 * (1 - r * step / steps))))
        if keep < model.rnn.hidden_size:
            if before_step is not None and importance == "taylor":
                before_step(model)
            scores = unit_importance(model.rnn, head, importance, generator=gen)
            new_rnn, new_head = prune_hidden(model.rnn, keep_top(scores, keep), head)
            model.rnn = new_rnn
            if new_head is not None:
                model.head = head = new_head
            model.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model, step)
    return model


# --------------------------------------------------------------------------------------------
# Targets: find the ratio (or per-unit ratios) that reaches a fraction of the MACs/params


def _cost(model, example, kind: str) -> int:
    return count_macs(model, example) if kind == "target_macs" else count_params(model)


def _cost_after(model, example, kind, **prune_kw) -> float:
    trial = copy.deepcopy(model)
    try:
        prune_structured(trial, example, **prune_kw)
    except UsageError:
        return math.inf
    return _cost(trial, example, kind)


def find_ratio(model, example, kind: str, fraction: float, *, importance: str, global_pruning: bool,
               protect) -> float:
    """The smallest uniform ratio whose pruned model keeps at most ``fraction`` of the cost.

    The cost is not monotone near ratio 1 (a group that would lose every channel is left whole),
    so a coarse scan finds the first ratio that reaches the goal and bisection refines it."""
    base = _cost(model, example, kind)
    goal = fraction * base
    imp = "l2" if importance == "taylor" else importance  # counts only: no gradients needed
    kw = dict(importance=imp, global_pruning=global_pruning, protect=protect)
    lo, hi, best = 0.0, None, math.inf
    for step in range(1, int(round(MAX_RATIO / 0.05)) + 1):
        r = round(step * 0.05, 2)
        cost = _cost_after(model, example, kind, ratio=r, **kw)
        best = min(best, cost)
        if cost <= goal:
            hi = r
            break
        lo = r
    if hi is None:
        what = "MACs" if kind == "target_macs" else "parameters"
        reached = best / base if math.isfinite(best) else 1.0
        raise UsageError(f"cannot reach {fraction:.0%} of the {what}: the most any uniform ratio up to "
                         f"{MAX_RATIO} removes leaves {reached:.1%}",
                         hint="the classifier, the input layer and protected layers are never pruned; "
                              "ask for a larger fraction")
    for _ in range(6):
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
    base = _cost(model, example, kind)
    goal = fraction * base
    units = sorted({row["layer"] for row in table})
    thresholds = sorted({row["drop"] for row in table})
    kw = dict(importance="l2" if importance == "taylor" else importance, protect=protect)
    for t in thresholds:
        choice = {}
        for u in units:
            ok = [row["ratio"] for row in table if row["layer"] == u and row["drop"] <= t]
            if ok:
                choice[u] = max(ok)
        if choice and _cost_after(model, example, kind, ratio=0.0, unit_ratios=choice, **kw) <= goal:
            return choice
    what = "MACs" if kind == "target_macs" else "parameters"
    raise UsageError(f"cannot reach {fraction:.0%} of the {what} with the ratios the sensitivity "
                     f"analysis measured (up to {max(r['ratio'] for r in table)})",
                     hint="ask for a larger fraction, or drop --from-sensitivity")


# --------------------------------------------------------------------------------------------
# Sensitivity


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


# --------------------------------------------------------------------------------------------
# Unstructured


def _prunable_weights(model: nn.Module, protected: set[nn.Module]):
    for mod in model.modules():
        if mod in protected:
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            yield mod, mod.weight
        elif isinstance(mod, nn.RNNBase):
            for name, p in mod.named_parameters(recurse=False):
                if name.startswith("weight"):
                    yield mod, p


def magnitude_masks(model: nn.Module, sparsity: float, protected: set[nn.Module], *, random: bool = False,
                    seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global magnitude pruning: masks zeroing the ``sparsity`` smallest prunable weights."""
    weights = [p for _, p in _prunable_weights(model, protected)]
    if not weights:
        raise UsageError("the model has no prunable weights left (all protected)")
    if random:
        g = torch.Generator().manual_seed(seed)
        scores = [torch.rand(p.shape, generator=g) for p in weights]
    else:
        scores = [p.detach().abs().cpu() for p in weights]
    flat = torch.cat([s.flatten() for s in scores])
    k = int(round(sparsity * flat.numel()))
    masks = []
    if k == 0:
        return [(p, torch.ones_like(p, dtype=torch.bool)) for p in weights]
    threshold = torch.kthvalue(flat, k).values
    taken = 0
    for p, s in zip(weights, scores):
        m = s > threshold
        masks.append((p, m.to(p.device)))
        taken += int((~m).sum())
    return masks


class MaskKeeper:
    """Keeps pruned weights at zero while fine-tuning: re-applies the masks before every forward."""

    def __init__(self, model: nn.Module, masks):
        self.masks = masks
        self.handle = model.register_forward_pre_hook(lambda *_: self.apply())
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.masks:
            p.mul_(m.to(p.device))

    def close(self) -> None:
        self.apply()
        self.handle.remove()


# --------------------------------------------------------------------------------------------
# The artifact-level entry point


def default_out(source: Path, opts: PruneOptions, mode: str) -> Path:
    target = opts.target()
    tag = "sparse" if mode == "unstructured" else "pruned"
    value = f"{target[1]:g}".replace("0.", "") if target else ""
    stem = f"{source.name}-{tag}{value}"
    path = source.parent / stem
    i = 2
    while path.exists() or artifacts.work_folder(path).exists():
        path = source.parent / f"{stem}-{i}"
        i += 1
    return path


def prune_artifact(path: Path | str, opts: PruneOptions, *, observer=None, download_progress=None) -> PruneResult:
    """Prune an artifact and save the result as a new artifact; measure both in the same run."""
    from dlkit.config import from_dict, to_dict
    from dlkit.data import DATASETS
    from dlkit.device import resolve_device
    from dlkit.engine.evaluate import predict_logits
    from dlkit.engine.trainer import fit
    from dlkit.models import MODELS, build_model

    started = time.perf_counter()
    opts.validate()
    art = artifacts.read_artifact(path)
    if art.manifest["model"].get("transforms"):
        kinds = ", ".join(t.get("kind", "?") for t in art.manifest["model"]["transforms"])
        raise UsageError(f"{art.path} is transformed ({kinds}); dlkit prunes float models",
                         hint="prune before quantizing")
    target = opts.target()
    mode = "sensitivity" if target is None else ("unstructured" if opts.unstructured else "structured")
    out = None
    if mode != "sensitivity":
        out = Path(opts.out) if opts.out else default_out(art.path, opts, mode)
        artifacts.check_destination(out)
    dev = resolve_device(opts.device)
    model = artifacts.load_model(art)
    spec = art.spec
    model_name = art.model_name
    family = art.manifest["model"].get("family", MODELS.get(model_name).family)
    protect = resolve_protect(model, opts.protect)

    needs_data = (opts.finetune_epochs > 0 or opts.sensitivity or
                  (opts.importance == "taylor" and not opts.unstructured))
    data = None
    if art.dataset or needs_data:
        why = ("fine-tuning" if opts.finetune_epochs > 0 else "the sensitivity analysis" if opts.sensitivity
               else "taylor importance" if needs_data else "measuring accuracy")
        data = artifacts.load_data(art, why=why, data_dir=opts.data_dir, progress=download_progress)
    example = example_input(spec, 2, data)
    names = list(spec.class_names or range(spec.num_classes)) if data is not None else []
    result = PruneResult(artifact=None, source=art.path, model=model_name, family=family, mode=mode,
                         device=str(dev), widths_before=_widths(model))

    def val_accuracy_subset(m: nn.Module) -> float:
        x, y = data.val if len(data.val[0]) else data.test
        x, y = x[: opts.sensitivity_samples], y[: opts.sensitivity_samples]
        m.to(dev)
        pred = predict_logits(m, x, batch_size=512, device=dev).argmax(1)
        m.to("cpu")
        return float((pred == y).float().mean())

    files: dict[str, bytes] = {}
    if opts.sensitivity:
        if opts.unstructured:
            raise UsageError("--sensitivity measures structured pruning", hint="drop --unstructured")
        rows = sensitivity_analysis(model, example, val_accuracy_subset, ratios=opts.sensitivity_ratios,
                                    importance=opts.importance, protect=protect)
        result.sensitivity = rows
        png = plot_sensitivity(rows, f"{model_name}: pruning sensitivity (val, {art.dataset})")
        if mode == "sensitivity":
            plot = Path(opts.plot) if opts.plot else art.path.parent / f"{art.path.name}-sensitivity.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot.write_bytes(png)
            result.plot = plot
            result.seconds = time.perf_counter() - started
            return result
        files["sensitivity.png"] = png

    # ---- fine-tuning and gradients
    tcfg = None
    if opts.finetune_epochs > 0:
        parent_cfg = artifacts.train_config(art)
        lr = opts.finetune_lr if opts.finetune_lr is not None else default_finetune_lr(parent_cfg)
        tcfg = dataclasses.replace(parent_cfg, epochs=opts.finetune_epochs, lr=lr, warmup=0.0).validate()
    history: list[dict] = []

    def finetune(m: nn.Module, step: int) -> None:
        if tcfg is None:
            return
        log.info("fine-tuning for %d epoch(s) after pruning step %d", tcfg.epochs, step)
        st, _ = fit(m, data.train, data.val, tcfg, device=dev, seed=opts.seed + step,
                    augment=DATASETS.get(art.dataset).augment, observer=observer)
        history.extend({**r, "prune_step": step} for r in st.history)
        m.to("cpu").to(memory_format=torch.contiguous_format)

    def gradients(m: nn.Module) -> None:
        if opts.importance != "taylor":
            return
        m.zero_grad(set_to_none=True)
        m.eval()
        x, y = data.train
        g = torch.Generator().manual_seed(opts.seed)
        idx = torch.randperm(len(x), generator=g)[: 128 * opts.calibration_batches]
        for i in range(0, len(idx), 128):
            loss = nn.functional.cross_entropy(m(x[idx[i:i + 128]]), y[idx[i:i + 128]])
            loss.backward()

    # ---- prune a copy
    pruned = copy.deepcopy(model)
    new_protect = _same_modules(model, pruned, protect)
    if mode == "unstructured":
        kind, value = target
        protected = {pruned.head, *new_protect}
        sparsity = value if kind == "ratio" else _sparsity_for_params(pruned, value, protected)
        masks = magnitude_masks(pruned, sparsity, protected, random=opts.importance == "random", seed=opts.seed)
        keeper = MaskKeeper(pruned, masks)
        try:
            finetune(pruned, 1)
        finally:
            keeper.close()
        result.ratio = sparsity
        result.notes.append("unstructured pruning zeroes weights but keeps dense tensors: MACs, size on disk "
                            "and latency are measured as they are, and no speed-up is expected")
    else:
        kind, value = target
        kw = dict(importance=opts.importance, protect=protect)
        unit_ratios = None
        ratio = value
        if opts.from_sensitivity:
            unit_ratios = ratios_from_sensitivity(model, example, result.sensitivity, kind, value, **kw)
            ratio = 0.0
        elif kind != "ratio":
            ratio = find_ratio(model, example, kind, value, global_pruning=opts.global_pruning, **kw)
            log.info("ratio %.4f reaches the target of %.0f%% %s", ratio, 100 * value,
                     "MACs" if kind == "target_macs" else "parameters")
        prune_structured(pruned, example, ratio=ratio, importance=opts.importance,
                         global_pruning=opts.global_pruning, protect=new_protect, steps=opts.iterative_steps,
                         unit_ratios=unit_ratios, before_step=gradients, after_step=finetune)
        result.ratio, result.unit_ratios = ratio, unit_ratios or {}
    result.finetune_history = history

    # ---- rebuild from the config, as any later command will, and check it computes the same
    entry = MODELS.get(model_name)
    old_cfg = from_dict(entry.config_cls, art.manifest["model"]["config"])
    new_cfg = dataclasses.replace(old_cfg, **pruned.width_overrides())
    rebuilt = build_model(model_name, to_dict(new_cfg), spec)
    try:
        rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    except RuntimeError as exc:
        raise DlkitError(f"the pruned {model_name} does not fit its own config ({str(exc).splitlines()[0]})",
                         hint="this is a dlkit bug; please report it") from None
    rebuilt.eval()
    pruned.eval()
    with torch.no_grad():
        probe = example_input(spec, 4, data)
        if not torch.allclose(rebuilt(probe), pruned(probe), atol=1e-5, rtol=1e-4):
            raise DlkitError(f"the pruned {model_name} computes differently once rebuilt from its config",
                             hint="this is a dlkit bug; please report it")
    result.widths_after = _widths(rebuilt)

    # ---- measure both in this run
    protected_after = {rebuilt.head, *_same_modules(pruned, rebuilt, new_protect)}
    result.before, result.after = measure_pair(model, rebuilt, spec, data, dev, names, art.precision, opts)
    if mode == "unstructured":
        result.sparsity, _ = sparsity_of(rebuilt, protected_after)
    for m in (model, rebuilt):
        m.to("cpu").to(memory_format=torch.contiguous_format)

    # ---- the new artifact
    manifest = copy.deepcopy(art.manifest)
    manifest.pop("weights", None)
    manifest["model"]["config"] = to_dict(new_cfg)
    metrics = {k: v for k, v in {"val_accuracy": result.after.val_accuracy,
                                 "test_accuracy": result.after.test_accuracy}.items() if v is not None}
    metrics.update(params=result.after.params, macs=result.after.macs, size_bytes=result.after.size_bytes,
                   latency_b1_ms=result.after.latency_b1_ms, latency_b256_ms=result.after.latency_b256_ms)
    if result.sparsity is not None:
        metrics["sparsity"] = result.sparsity
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    options.update(mode=mode, ratio_used=result.ratio, unit_ratios=result.unit_ratios, device=str(dev),
                   finetune_lr_used=tcfg.lr if tcfg is not None else None)
    step_metrics = {"before": result.before.to_dict(), "after": result.after.to_dict(), "ratios": result.ratios()}
    manifest["lineage"].append(artifacts.lineage_step("prune", options, step_metrics, parent=str(art.path)))
    manifest["metrics"] = metrics
    result.artifact = artifacts.write_artifact(out, rebuilt, manifest, files=files)
    result.seconds = time.perf_counter() - started
    return result


def _same_modules(src: nn.Module, dst: nn.Module, modules) -> list[nn.Module]:
    """The modules of ``dst`` named as ``modules`` are in ``src`` (for copies and rebuilds)."""
    names = {m: n for n, m in src.named_modules()}
    dst_modules = dict(dst.named_modules())
    return [dst_modules[names[m]] for m in modules if names.get(m) in dst_modules]


def _widths(model: nn.Module) -> dict:
    try:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in model.width_overrides().items()}
    except (AttributeError, UsageError):
        return {}


def _sparsity_for_params(model: nn.Module, fraction: float, protected: set[nn.Module]) -> float:
    total = count_params(model)
    prunable = sum(p.numel() for _, p in _prunable_weights(model, protected))
    remove = (1 - fraction) * total
    if remove > prunable:
        raise UsageError(f"cannot keep only {fraction:.0%} of the parameters: {total - prunable:,} of "
                         f"{total:,} are not prunable (biases, norms, the classifier, protected layers)",
                         hint="ask for a larger fraction")
    return remove / prunable


def measure_pair(before: nn.Module, after: nn.Module, spec, data, dev, names, precision: str,
                 opts: PruneOptions) -> tuple[Measurement, Measurement]:
    """Params, MACs, size, latency (batch 1 and 256, medians, runs alternating) and accuracy of
    both models, measured in this run on the same inputs."""
    from dlkit.device import prepare_inference
    from dlkit.engine.evaluate import evaluate_model

    cpu_example = example_input(spec, 1, data)
    static = [(count_params(m), count_macs(m, cpu_example), serialized_size(m),
               sum(int((p == 0).sum()) for p in m.parameters())) for m in (before, after)]
    channels_last = [prepare_inference(m, dev, spec.input_shape) for m in (before, after)]
    lat = {}
    threads = torch.get_num_threads()
    if opts.latency_threads:
        torch.set_num_threads(opts.latency_threads)
    try:
        for batch, repeats in ((1, 4 * opts.latency_repeats), (256, opts.latency_repeats)):
            x = example_input(spec, batch, data).to(dev)
            if any(channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            lat[batch] = compare_latency([before, after], x, repeats)
    finally:
        torch.set_num_threads(threads)
    acc: list[dict] = [{}, {}]
    if data is not None:
        for i, m in enumerate((before, after)):
            for split in ("val", "test"):
                x, y = getattr(data, split)
                if len(x):
                    r = evaluate_model(m, x, y, class_names=names, split=split, batch_size=1024, device=dev,
                                       precision=precision, channels_last=channels_last[i])
                    acc[i][f"{split}_accuracy"] = r.accuracy
    out = []
    for i in range(2):
        params, macs, size, zeros = static[i]
        out.append(Measurement(params=params, macs=macs, size_bytes=size, latency_b1_ms=1e3 * lat[1][i],
                               latency_b256_ms=1e3 * lat[256][i], zeros=zeros, **acc[i]))
    return out[0], out[1]
