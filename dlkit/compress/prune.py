"""``dlkit prune``: the options, the report, and ``prune_artifact``, which prunes an artifact into a
new one and measures both in the same run.

The work is done by its neighbours: ``structured`` (channels, heads, recurrent units, as each
family declares), ``unstructured`` (magnitude masks), ``search`` (the ratio for a target, the
sensitivity analysis), and ``dlkit.profiling.measure_models`` (the one before/after measurement).

Conventions:
- ``ratio`` is the fraction of each prunable group's channels removed; attention heads and FFN
  width lose the same fraction in every block; the residual width is kept.
- ``target_macs`` / ``target_params`` are the fraction of the original MACs / parameters to keep.
- The classifier keeps all its outputs; its inputs shrink with the layer before.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlkit import artifacts, output
from dlkit.choices import IMPORTANCES
from dlkit.compress.search import find_ratio, plot_sensitivity, ratios_from_sensitivity, sensitivity_analysis
from dlkit.compress.structured import head_of, prune_structured, resolve_protect, same_modules, widths_of
from dlkit.compress.unstructured import MaskKeeper, magnitude_masks, sparsity_for_params, sparsity_of
from dlkit.errors import DlkitError, IncompatibleError, UsageError
from dlkit.profiling.measure import Measurement, Subject, example_batch, measure_models

log = logging.getLogger("dlkit")

SENSITIVITY_RATIOS = (0.2, 0.4, 0.6, 0.8)
BATCHES = (1, 256)  # latency is timed at these batch sizes


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
    latency_repeats: int = 15  # timed runs at batch 256 (batch 1 runs 4x as many; measure_models)
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
        if any(not 0 < r < 1 for r in self.sensitivity_ratios):
            raise UsageError("sensitivity ratios must be between 0 and 1")
        return self


@dataclass
class PruneSide(Measurement):
    """One model of the prune report: the shared measurement, and its accuracy."""

    val_accuracy: float | None = None
    test_accuracy: float | None = None
    val_perplexity: float | None = None  # language models: exp(mean next-token loss)
    test_perplexity: float | None = None

    @property
    def latency_b1_ms(self) -> float:
        return self.latency_ms[1]

    @property
    def latency_b256_ms(self) -> float:
        return self.latency_ms[256]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "latency_b1_ms": self.latency_b1_ms, "latency_b256_ms": self.latency_b256_ms}


@dataclass
class PruneResult:
    artifact: Path | None  # None for a sensitivity analysis alone
    source: Path
    model: str
    family: str
    mode: str  # structured | unstructured | sensitivity
    before: PruneSide | None = None
    after: PruneSide | None = None
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
            x, y = getattr(a, f"{split}_perplexity"), getattr(b, f"{split}_perplexity")
            if x is not None and y:
                out[f"{split}_perplexity_ratio"] = x / y
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


# --------------------------------------------------------------------------------------------
# The artifact-level entry point, in the order it runs


@dataclass
class _Run:
    """What the steps of one ``prune_artifact`` call share."""

    opts: PruneOptions
    art: artifacts.Artifact
    mode: str
    out: Path | None
    dev: torch.device
    model: nn.Module
    protect: list[nn.Module]
    data: object | None
    example: torch.Tensor
    result: PruneResult
    observer: object | None = None
    train_cfg: object | None = None  # fine-tuning's TrainConfig; None: no fine-tuning
    files: dict[str, bytes] = field(default_factory=dict)

    def val_accuracy(self, m: nn.Module) -> float:
        """Validation accuracy on ``sensitivity_samples`` samples (the sensitivity analysis)."""
        from dlkit.engine.evaluate import predict_logits

        x, y = self.data.val if len(self.data.val[0]) else self.data.test
        x, y = x[: self.opts.sensitivity_samples], y[: self.opts.sensitivity_samples]
        m.to(self.dev)
        pred = predict_logits(m, x, batch_size=512, device=self.dev).argmax(1)
        m.to("cpu")
        return float((pred == y).float().mean())

    def finetune(self, m: nn.Module, step: int) -> None:
        """Fine-tune after pruning step ``step`` (nothing without --finetune-epochs)."""
        from dlkit.data import DATASETS
        from dlkit.engine.trainer import fit

        if self.train_cfg is None:
            return
        log.info("fine-tuning for %d epoch(s) after pruning step %d", self.train_cfg.epochs, step)
        lm = self.art.spec.task == "lm"  # a language model trains on windows of its text
        st, _ = fit(m, self.data.train, self.data.val, self.train_cfg, device=self.dev, seed=self.opts.seed + step,
                    augment=DATASETS.get(self.art.dataset).augment, observer=self.observer,
                    seq_len=self.art.spec.input_shape[0] if lm else None)
        self.result.finetune_history.extend({**r, "prune_step": step} for r in st.history)
        m.to("cpu").to(memory_format=torch.contiguous_format)

    def gradients(self, m: nn.Module) -> None:
        """Taylor importance: accumulate gradients of a few training batches."""
        if self.opts.importance != "taylor":
            return
        m.zero_grad(set_to_none=True)
        m.eval()
        x, y = self.data.train
        g = torch.Generator().manual_seed(self.opts.seed)
        idx = torch.randperm(len(x), generator=g)[: 128 * self.opts.calibration_batches]
        for i in range(0, len(idx), 128):
            nn.functional.cross_entropy(m(x[idx[i:i + 128]]), y[idx[i:i + 128]]).backward()


def prune_artifact(path: Path | str, opts: PruneOptions, *, observer=None, download_progress=None) -> PruneResult:
    """Prune an artifact and save the result as a new artifact; measure both in the same run.
    ``hf:...`` prunes a Hugging Face model directly (dlkit.hf.source_artifact)."""
    if str(path).startswith("hf:"):
        from dlkit.hf import default_out as hf_out
        from dlkit.hf import source_artifact

        target = opts.validate().target()
        out = opts.out or hf_out(str(path), f"pruned{target[1]:g}".replace("0.", "") if target else "pruned")
        artifacts.check_destination(Path(out))
        with source_artifact(str(path)) as source:
            return prune_artifact(source, dataclasses.replace(opts, out=out), observer=observer,
                                  download_progress=download_progress)
    started = time.perf_counter()
    run = _start(path, opts.validate(), observer, download_progress)
    with output.Destination(run.out) if run.out else contextlib.nullcontext():  # held until written
        if run.out:
            artifacts.check_destination(run.out)  # again, now under the lock
        return _prune(run, opts, started)


def _prune(run: _Run, opts: PruneOptions, started: float) -> PruneResult:
    if run.result.family == "hf":
        _check_hf(opts)
    if opts.sensitivity:
        _sensitivity(run)
    if run.mode != "sensitivity":
        pruned = copy.deepcopy(run.model)
        protect = same_modules(run.model, pruned, run.protect)
        if run.mode == "unstructured":
            _prune_unstructured(run, pruned, protect)
        else:
            _prune_structured(run, pruned, protect)
        rebuilt, config = _rebuild(run, pruned)
        _measure(run, rebuilt)
        run.result.artifact = _write(run, rebuilt, config)
    run.result.seconds = time.perf_counter() - started
    return run.result


def _start(path, opts: PruneOptions, observer, download_progress) -> _Run:
    """Read the artifact, check what is asked fits it, load the model and the data it needs."""
    from dlkit.device import resolve_device
    from dlkit.models import model_entry

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
    support = model_entry(art.model_name).support
    if mode != "unstructured" and support.prune == "none":
        raise IncompatibleError(f"'{art.model_name}' cannot be pruned structurally: {support.reason}",
                                hint="--unstructured zeroes weights of any model")
    dev = resolve_device(opts.device)
    model = artifacts.load_model(art)
    protect = resolve_protect(model, opts.protect)
    data = _load_data(art, opts, download_progress)
    family = art.manifest["model"].get("family", model_entry(art.model_name).family)
    result = PruneResult(artifact=None, source=art.path, model=art.model_name, family=family, mode=mode,
                         device=str(dev), widths_before=widths_of(model))
    run = _Run(opts, art, mode, out, dev, model, protect, data, example_batch(art.spec, 2, data), result, observer)
    if opts.finetune_epochs > 0:
        parent = artifacts.train_config(art)
        lr = opts.finetune_lr if opts.finetune_lr is not None else default_finetune_lr(parent)
        run.train_cfg = dataclasses.replace(parent, epochs=opts.finetune_epochs, lr=lr, warmup=0.0).validate()
    return run


def _load_data(art, opts: PruneOptions, progress):
    """The artifact's data when it records a dataset, or when the options need it (else None)."""
    taylor = opts.importance == "taylor" and not opts.unstructured
    if not (art.dataset or opts.finetune_epochs > 0 or opts.sensitivity or taylor):
        return None
    why = ("fine-tuning" if opts.finetune_epochs > 0 else "the sensitivity analysis" if opts.sensitivity
           else "taylor importance" if taylor else "measuring accuracy")
    return artifacts.load_data(art, why=why, data_dir=opts.data_dir, progress=progress)


def _sensitivity(run: _Run) -> None:
    """Each unit pruned alone at each ratio; the table, and its plot (a file, or one of the new artifact's)."""
    opts = run.opts
    if opts.unstructured:
        raise UsageError("--sensitivity measures structured pruning", hint="drop --unstructured")
    rows = sensitivity_analysis(run.model, run.example, run.val_accuracy, ratios=opts.sensitivity_ratios,
                                importance=opts.importance, protect=run.protect)
    run.result.sensitivity = rows
    png = plot_sensitivity(rows, f"{run.art.model_name}: pruning sensitivity (val, {run.art.dataset})")
    if run.mode != "sensitivity":
        run.files["sensitivity.png"] = png
        return
    plot = Path(opts.plot) if opts.plot else run.art.path.parent / f"{run.art.path.name}-sensitivity.png"
    output.write_file(plot, png)
    run.result.plot = plot


def _prune_unstructured(run: _Run, pruned: nn.Module, protect: list[nn.Module]) -> None:
    kind, value = run.opts.target()
    protected = {head_of(pruned), *protect}
    sparsity = value if kind == "ratio" else sparsity_for_params(pruned, value, protected)
    masks = magnitude_masks(pruned, sparsity, protected, random=run.opts.importance == "random", seed=run.opts.seed)
    keeper = MaskKeeper(pruned, masks)
    try:
        run.finetune(pruned, 1)
    finally:
        keeper.close()
    run.result.ratio = sparsity
    run.result.notes.append("unstructured pruning zeroes weights but keeps dense tensors: MACs, size on disk "
                            "and latency are measured as they are, and no speed-up is expected")


def _check_hf(opts: PruneOptions) -> None:
    """Hugging Face models are pruned by a ratio of heads and FFN width (dlkit.hf.prune)."""
    kind = opts.target()[0] if opts.target() else None
    extra = [flag for flag, on in (("--sensitivity", opts.sensitivity), ("--from-sensitivity", opts.from_sensitivity),
                                   ("--global-pruning", opts.global_pruning), ("--protect", bool(opts.protect)),
                                   ("--iterative-steps", opts.iterative_steps > 1)) if on]
    if kind in ("target_macs", "target_params") and not opts.unstructured:
        extra.append("--" + kind.replace("_", "-"))
    if extra:
        raise UsageError(f"Hugging Face models are pruned by --ratio (heads and FFN width, the same in every block); "
                         f"{', '.join(extra)} is not available for them", hint="e.g. dlkit prune ARTIFACT --ratio 0.5")


def _prune_hf(run: _Run, pruned: nn.Module) -> None:
    from dlkit.hf.prune import prune_model

    done = prune_model(pruned, run.opts.ratio, importance=run.opts.importance, seed=run.opts.seed)
    run.result.notes.extend(done["notes"])
    run.result.ratio = run.opts.ratio
    run.finetune(pruned, 1)


def _prune_structured(run: _Run, pruned: nn.Module, protect: list[nn.Module]) -> None:
    if run.result.family == "hf":
        return _prune_hf(run, pruned)
    opts, (kind, value) = run.opts, run.opts.target()
    kw = dict(importance=opts.importance, protect=run.protect)
    unit_ratios, ratio = None, value
    if opts.from_sensitivity:
        unit_ratios = ratios_from_sensitivity(run.model, run.example, run.result.sensitivity, kind, value, **kw)
        ratio = 0.0
    elif kind != "ratio":
        ratio = find_ratio(run.model, run.example, kind, value, global_pruning=opts.global_pruning, **kw)
        log.info("ratio %.4f reaches the target of %.0f%% %s", ratio, 100 * value,
                 "MACs" if kind == "target_macs" else "parameters")
    prune_structured(pruned, run.example, ratio=ratio, importance=opts.importance,
                     global_pruning=opts.global_pruning, protect=protect, steps=opts.iterative_steps,
                     unit_ratios=unit_ratios, before_step=run.gradients, after_step=run.finetune)
    run.result.ratio, run.result.unit_ratios = ratio, unit_ratios or {}


def _rebuild(run: _Run, pruned: nn.Module) -> tuple[nn.Module, object]:
    """Rebuild the pruned model from its config, as any later command will; check it computes the same."""
    from dlkit.config import from_dict, to_dict
    from dlkit.models import build_model, model_entry

    name, entry = run.art.model_name, model_entry(run.art.model_name)
    old_cfg = from_dict(entry.config_cls, run.art.manifest["model"]["config"])
    config = dataclasses.replace(old_cfg, **entry.support.widths(pruned))
    rebuilt = build_model(name, to_dict(config), run.art.spec)
    try:
        rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    except RuntimeError as exc:
        raise DlkitError(f"the pruned {name} does not fit its own config ({str(exc).splitlines()[0]})",
                         hint="this is a dlkit bug; please report it") from None
    rebuilt.eval()
    pruned.eval()
    with torch.no_grad():
        probe = example_batch(run.art.spec, 4, run.data)
        if not torch.allclose(rebuilt(probe), pruned(probe), atol=1e-5, rtol=1e-4):
            raise DlkitError(f"the pruned {name} computes differently once rebuilt from its config",
                             hint="this is a dlkit bug; please report it")
    run.result.widths_after = widths_of(rebuilt)
    if run.mode == "unstructured":
        protected = {head_of(rebuilt), *same_modules(run.model, rebuilt, run.protect)}
        run.result.sparsity = sparsity_of(rebuilt, protected)
    return rebuilt, config


def _measure(run: _Run, rebuilt: nn.Module) -> None:
    """Counts, size and latency of both models (one measurement), then their accuracy."""
    from dlkit.engine.evaluate import evaluate_model

    samples = example_batch(run.art.spec, max(BATCHES), run.data)
    subjects = [Subject(m, samples, run.art.precision) for m in (run.model, rebuilt)]
    measured = measure_models(subjects, device=run.dev, batches=BATCHES, repeats=run.opts.latency_repeats,
                              threads=run.opts.latency_threads)
    sides = []
    for m, meas in zip((run.model, rebuilt), measured):
        acc = {}
        for split in ("val", "test") if run.data is not None else ():
            x, y = getattr(run.data, split)
            if len(x) and run.art.spec.task == "lm":  # a language model: perplexity, next-token accuracy
                from dlkit.lm.evaluate import evaluate_lm

                ev = evaluate_lm(m, x, y, split=split, batch_size=64, device=run.dev, precision=run.art.precision)
                acc.update({f"{split}_accuracy": ev.accuracy, f"{split}_perplexity": ev.perplexity})
            elif len(x):
                names = list(run.art.spec.class_names or range(run.art.spec.num_classes))
                acc[f"{split}_accuracy"] = evaluate_model(
                    m, x, y, class_names=names, split=split, batch_size=1024, device=run.dev,
                    precision=run.art.precision, channels_last=meas.channels_last).accuracy
        sides.append(PruneSide(**{f.name: getattr(meas, f.name) for f in dataclasses.fields(meas)}, **acc))
        m.to("cpu").to(memory_format=torch.contiguous_format)
    run.result.before, run.result.after = sides


def _write(run: _Run, rebuilt: nn.Module, config) -> Path:
    """The new artifact: the parent's manifest with the new widths, a lineage step, the metrics."""
    from dlkit.config import to_dict

    res, opts = run.result, run.opts
    manifest = copy.deepcopy(run.art.manifest)
    manifest.pop("weights", None)
    manifest["model"]["config"] = to_dict(config)
    a = res.after
    metrics = {k: v for k, v in {"val_accuracy": a.val_accuracy, "test_accuracy": a.test_accuracy,
                                 "val_perplexity": a.val_perplexity, "test_perplexity": a.test_perplexity}.items()
               if v is not None}
    metrics.update(params=a.params, macs=a.macs, size_bytes=a.size_bytes, latency_b1_ms=a.latency_b1_ms,
                   latency_b256_ms=a.latency_b256_ms)
    if res.sparsity is not None:
        metrics["sparsity"] = res.sparsity
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    options.update(mode=run.mode, ratio_used=res.ratio, unit_ratios=res.unit_ratios, device=str(run.dev),
                   finetune_lr_used=run.train_cfg.lr if run.train_cfg is not None else None)
    step_metrics = {"before": res.before.to_dict(), "after": a.to_dict(), "ratios": res.ratios()}
    manifest["lineage"].append(artifacts.lineage_step("prune", options, step_metrics, parent=str(run.art.path)))
    manifest["metrics"] = metrics
    return artifacts.write_artifact(run.out, rebuilt, manifest, files=run.files)
