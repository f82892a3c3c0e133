"""``dlkit explain``: why an artifact's model decided what it did, on samples of its test split or
on the user's own files (read and prepared exactly as ``dlkit predict`` reads them:
``dlkit.predict.read_inputs``; such samples have no true label).

Each chosen sample is attributed with one method (``methods``), its explanation measured
(integrated gradients' completeness; deletion and insertion curves against random orders,
``quality``), and everything is written to one folder (``render``) through the one write path
(``dlkit.output``): locked, built in a staging folder, renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dlkit import artifacts, output
from dlkit.choices import EXPLAIN_BASELINES, EXPLAIN_METHODS, EXPLAIN_METRICS, INT8_MODES
from dlkit.errors import DataError, IncompatibleError, UsageError
from dlkit.device import check_device_name, resolve_device
from dlkit.explain import methods, metrics, quality, render
from dlkit.spec import IMAGE, TEXT

COMPLETENESS_WARN = 0.05  # relative completeness error above which IG's --steps is too low


@dataclass
class ExplainOptions:
    method: str = "ig"
    samples: int = 8  # the first N test samples (when no index is given)
    index: tuple[int, ...] | None = None  # these test samples instead
    inputs: tuple[str, ...] | None = None  # the user's files instead (dlkit.predict.read_inputs; - for stdin)
    target: str = "pred"  # pred, true, a class name or a class index
    baseline: str | None = None  # None: zero for images, pad for text
    steps: int = 50  # integrated gradients' steps
    perturbations: int = 200  # lime/kernel-shap samples, smoothgrad's noisy copies, gradient-shap's points
    patch: int | None = None  # images: the side of a feature patch; None: a grid of at most 8 x 8
    top_k: int = 5
    metrics: tuple[str, ...] = ()  # infidelity, sensitivity (dlkit.explain.metrics)
    out: Path | None = None
    data_dir: str | None = None
    device: str = "auto"
    seed: int = 0

    def validate(self) -> "ExplainOptions":
        if self.method not in EXPLAIN_METHODS:
            raise UsageError(f"unknown method '{self.method}'", hint=f"use one of {', '.join(EXPLAIN_METHODS)}")
        if self.baseline is not None and self.baseline not in EXPLAIN_BASELINES:
            raise UsageError(f"unknown baseline '{self.baseline}'", hint=f"use one of {', '.join(EXPLAIN_BASELINES)}")
        for name in ("samples", "steps", "perturbations", "top_k"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        unknown = [x for x in self.metrics if x not in EXPLAIN_METRICS]
        if unknown:
            raise UsageError(f"unknown metric '{unknown[0]}'", hint=f"use {' and/or '.join(EXPLAIN_METRICS)}")
        if self.patch is not None and self.patch < 1:
            raise UsageError(f"--patch must be >= 1 (got {self.patch})")
        if self.index is not None and (not self.index or min(self.index) < 0):
            raise UsageError("--index takes test sample numbers >= 0, e.g. --index 3,17")
        if not self.target:
            raise UsageError("--target is empty", hint="use pred, true, a class name or a class number")
        if self.inputs is not None:
            if not self.inputs:
                raise UsageError("--input is empty", hint="pass image, .npy/.npz or text files, folders, or -")
            if self.index is not None:
                raise UsageError("--input and --index both choose the samples; pass one of them")
            if self.target == "true":
                raise UsageError("--target true needs a true label, which samples from --input files do not have",
                                 hint="use --target pred, a class name or a class number")
        check_device_name(self.device)
        return self


def parse_metrics(text: str | None) -> tuple[str, ...]:
    """``"infidelity,sensitivity"`` -> ``("infidelity", "sensitivity")``."""
    return tuple(dict.fromkeys(p.strip() for p in (text or "").split(",") if p.strip()))


def parse_index(text: str | None) -> tuple[int, ...] | None:
    """``"3,17"`` -> ``(3, 17)``."""
    if text is None:
        return None
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UsageError(f"--index takes comma-separated test sample numbers, not {text!r}",
                         hint="e.g. --index 3,17") from None
    if not values:
        raise UsageError("--index is empty", hint="e.g. --index 3,17")
    return tuple(dict.fromkeys(values))  # each sample once, in the order given


@dataclass
class SampleExplanation:
    index: int  # in the test split; for --input samples, the position among them
    true: str | None  # None for --input samples
    prediction: str
    probability: float  # of the prediction
    target: str  # the class explained
    target_probability: float
    top_features: list[dict]
    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    completeness: dict | None = None  # ig only (methods.Completeness.to_dict)
    seconds: float = 0.0  # the attribution alone (not the curves)
    infidelity: float | None = None  # --metrics infidelity (dlkit.explain.metrics)
    sensitivity: float | None = None  # --metrics sensitivity
    input: str | None = None  # --input samples: the name read_inputs gives (file, file:LINE, stdin:LINE, ...)

    @property
    def better_than_random(self) -> bool:
        return self.deletion_auc < self.random_deletion_auc and self.insertion_auc > self.random_insertion_auc

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "better_than_random": self.better_than_random}


@dataclass
class ExplainResult:
    folder: Path
    artifact: Path
    model: str
    modality: str
    method: str
    baseline: str
    target: str  # the rule: pred, true or a class
    steps: int
    perturbations: int
    patch: int | None  # images: the feature patch side
    metrics: tuple[str, ...]
    int8: bool
    device: str
    seed: int
    seconds: float
    samples: list[SampleExplanation]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        s = self.samples
        out = {"deletion_auc": mean(x.deletion_auc for x in s), "insertion_auc": mean(x.insertion_auc for x in s),
               "random_deletion_auc": mean(x.random_deletion_auc for x in s),
               "random_insertion_auc": mean(x.random_insertion_auc for x in s),
               "better_than_random": sum(x.better_than_random for x in s),
               "seconds_per_sample": mean(x.seconds for x in s)}
        if self.method == "ig":
            out["completeness_relative_error"] = mean(
                x.completeness["relative_error"] for x in s if x.completeness)
        for name in self.metrics:
            out[name] = mean(getattr(x, name) for x in s)
        return out

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["folder"], d["artifact"] = str(self.folder), str(self.artifact)
        d["samples"] = [x.to_dict() for x in self.samples]
        d["summary"] = self.summary()
        return d


def default_out(source: Path, method: str) -> Path:
    return source.with_name(f"{source.name}-explain-{method}")


def is_int8(art) -> bool:
    return any(t.get("kind") == "quantize" and t.get("mode") in INT8_MODES
               for t in art.manifest["model"].get("transforms", []))


def explain_artifact(path: Path | str, opts: ExplainOptions, *, stdin=None) -> ExplainResult:
    """Explain the decisions of an artifact's model on test samples (or on ``opts.inputs``, with
    ``stdin`` for ``-``, by default ``sys.stdin``); write the folder."""
    started = time.perf_counter()
    opts.validate()
    methods.captum_attr()  # missing Captum: say so before any loading
    art = artifacts.read_artifact(path)
    modality = art.spec.modality
    baseline = opts.baseline or ("pad" if modality == TEXT else "zero")
    if (modality == TEXT) != (baseline == "pad"):
        raise UsageError(f"{modality} models take --baseline " + ("pad" if modality == TEXT else "zero, mean or blur")
                         + f", not {baseline}")
    final = Path(opts.out) if opts.out else default_out(art.path, opts.method)
    with output.Destination(final):
        output.check_free(final)
        return _explain(art, final, baseline, opts, started, stdin)


def _explain(art, final: Path, baseline_kind: str, opts: ExplainOptions, started: float, stdin) -> ExplainResult:
    int8 = is_int8(art)
    model = artifacts.load_model(art)
    subject = methods.Subject.of(model, art.spec, int8=int8)
    subject.check(opts.method, f"'{art.model_name}' ({art.path})")
    device = resolve_device(opts.device)
    if int8 and device.type != "cpu":
        raise IncompatibleError(f"{art.path} holds int8 kernels, which run on the CPU only", hint="use --device cpu")
    notes = []
    if opts.inputs is not None:  # no dataset needed: the manifest's data state prepares the files
        chosen, state = _file_samples(art, opts.inputs, stdin), art.manifest["data"].get("state") or {}
    else:
        data = artifacts.load_data(art, why="explaining its decisions", data_dir=opts.data_dir)
        chosen, state = _test_samples(data.test, opts, notes), data.state or {}
    model.to(device)
    names = [str(c) for c in (art.spec.class_names or range(art.spec.num_classes))]
    patch = (opts.patch or methods.default_patch(art.spec.input_shape)) if art.spec.modality == IMAGE else None
    context = _int8_context(art) if int8 else contextlib.nullcontext()
    records, samples = [], []
    with context:
        for index, x, y, name in chosen:
            record = _one(subject, x.to(device), y, index, name, names, baseline_kind, patch, state, opts)
            records.append(record)
            samples.append(record["explanation"])
    notes += _notes(art, opts, samples, int8)
    result = ExplainResult(final, art.path, art.model_name, art.spec.modality, opts.method, baseline_kind,
                           opts.target, opts.steps, opts.perturbations, patch, opts.metrics, int8, str(device),
                           opts.seed, 0.0,
                           samples, notes=notes)
    work = output.staging_folder(final)
    try:
        result.files = render.write_all(work, result, records, art.spec, state)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise output.os_error(exc) from None
        raise
    result.seconds = time.perf_counter() - started
    result.folder = output.commit(work, final)
    return result


def _int8_context(art):
    from dlkit.compress.codec import quiet_ao

    transform = next(t for t in art.manifest["model"]["transforms"] if t.get("kind") == "quantize")
    return quiet_ao(transform.get("backend") or "x86")


Chosen = list[tuple[int, torch.Tensor, int | None, str | None]]  # (index, input, true class, input name)


def _test_samples(test, opts: ExplainOptions, notes: list[str]) -> Chosen:
    x_test, y_test = test
    n = len(y_test)
    if n == 0:
        raise UsageError("the artifact's test split is empty: there is nothing to explain")
    if opts.index is None:
        if opts.samples > n:
            notes.append(f"the test split has {n} samples, fewer than the {opts.samples} asked for")
        chosen = list(range(min(opts.samples, n)))
    else:
        past = [i for i in opts.index if i >= n]
        if past:
            raise UsageError(f"--index {past[0]} is past the end of the test split ({n} samples)",
                             hint=f"use numbers from 0 to {n - 1}")
        chosen = list(opts.index)
    return [(i, x_test[i], int(y_test[i]), None) for i in chosen]


def _file_samples(art, inputs: tuple[str, ...], stdin) -> Chosen:
    """Every sample the inputs hold, as ``dlkit predict`` reads them. An input that cannot be read
    stops the run (nothing is explained): an explanation of the others would hide the gap."""
    from dlkit.export import preprocessing
    from dlkit.predict import read_inputs

    chosen = []
    for name, sample, why in read_inputs(list(inputs), preprocessing(art), stdin):
        if sample is None:
            raise DataError(f"cannot read {name}: {why}", hint="fix or drop that --input")
        chosen.append((len(chosen), torch.from_numpy(sample), None, name))
    if not chosen:
        raise UsageError("the --input files hold no samples to explain",
                         hint="pass image, .npy/.npz or text files (one example per line), folders, or -")
    return chosen


def resolve_target(rule: str, prediction: int, true: int | None, names: list[str]) -> int:
    """The class to explain: the prediction, the true label, or a class given by name or number."""
    if rule == "pred":
        return prediction
    if rule == "true":
        if true is None:
            raise UsageError("--target true needs a true label, which samples from --input files do not have",
                             hint="use --target pred, a class name or a class number")
        return true
    if rule in names:
        return names.index(rule)
    if rule.isdigit() and int(rule) < len(names):
        return int(rule)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    raise UsageError(f"--target {rule!r} is not pred, true or a class of this model",
                     hint=f"classes: {shown} (or 0 to {len(names) - 1})")


def sample_seed(seed: int, x: torch.Tensor) -> int:
    """The random stream of one sample, from ``--seed`` and the sample's content: a sample gets the
    same draws (noise, LIME samples, random orders) whatever else is explained with it and however
    it came (a test index or a file holding the same values)."""
    canonical = x.detach().cpu().to(torch.float32 if x.is_floating_point() else torch.int64).contiguous()
    digest = hashlib.sha256(canonical.numpy().tobytes()).digest()
    return (seed * 1_000_003 + int.from_bytes(digest[:6], "little")) % 2**63


def _one(subject, x, y: int | None, index: int, name: str | None, names: list[str], baseline_kind: str,
         patch: int | None, state: dict, opts: ExplainOptions) -> dict:
    """Attribute and measure one sample; returns what rendering needs, with its SampleExplanation."""
    probs = torch.softmax(methods.logits(subject, x[None])[0], dim=-1)
    pred = int(probs.argmax())
    target = resolve_target(opts.target, pred, y, names)
    if subject.modality == IMAGE:
        baseline = methods.image_baseline(baseline_kind, x, state.get("mean"), state.get("std"))
    else:
        baseline = torch.zeros_like(x)
    seed = sample_seed(opts.seed, x)
    started = time.perf_counter()
    attribution = methods.attribute(subject, x, target, opts.method, baseline, steps=opts.steps,
                                    perturbations=opts.perturbations, patch=patch or 1, seed=seed)
    seconds = time.perf_counter() - started
    u = methods.units(x, subject.modality, patch or 1)
    curves = quality.curves(subject.model, x, baseline, u, attribution.scores, target, seed=seed)
    measured = {}
    if "infidelity" in opts.metrics:
        measured["infidelity"] = metrics.infidelity(subject, x, baseline, attribution.scores, target, opts.method, u,
                                                    seed=seed)
    if "sensitivity" in opts.metrics:
        measured["sensitivity"] = metrics.sensitivity(subject, x, baseline, target, opts.method, steps=opts.steps,
                                                      perturbations=opts.perturbations, patch=patch or 1, seed=seed)
    per_feature = quality.feature_scores(attribution.scores, u)
    explanation = SampleExplanation(
        index=index, true=None if y is None else names[y], prediction=names[pred], probability=float(probs[pred]),
        target=names[target], target_probability=float(probs[target]),
        top_features=_top(per_feature, x, u, subject.modality, patch, state, opts.top_k),
        completeness=attribution.completeness.to_dict() if attribution.completeness else None, seconds=seconds,
        **curves.aucs(), **measured, input=name)
    return {"x": x.cpu(), "scores": attribution.scores.cpu(), "target": target, "pred": pred, "y": y,
            "units": u.cpu(), "curves": curves, "explanation": explanation}


def _top(per_feature: torch.Tensor, x, u, modality: str, patch: int | None, state: dict, k: int) -> list[dict]:
    """The k features with the largest attributions (positive first: what supports the target)."""
    order = torch.argsort(per_feature, descending=True, stable=True)[:k].tolist()
    if modality == TEXT:
        vocab = (state.get("tokenizer") or {}).get("vocab") or []
        positions = {int(f): p for p, f in enumerate(u.tolist()) if f >= 0}
        out = []
        for f in order:
            p = positions[f]
            tok = int(x[p])
            out.append({"position": p, "token": vocab[tok] if tok < len(vocab) else str(tok),
                        "score": float(per_feature[f])})
        return out
    cols = math.ceil(x.shape[-1] / patch)
    return [{"patch": [f // cols, f % cols], "rows": [(f // cols) * patch, min(x.shape[-2], (f // cols + 1) * patch)],
             "cols": [(f % cols) * patch, min(x.shape[-1], (f % cols + 1) * patch)], "score": float(per_feature[f])}
            for f in order]


def _notes(art, opts: ExplainOptions, samples: list[SampleExplanation], int8: bool) -> list[str]:
    notes = []
    errors = [s.completeness["relative_error"] for s in samples
              if s.completeness and s.completeness["relative_error"] is not None]
    high = [e for e in errors if e > COMPLETENESS_WARN]
    if high:
        notes.append(f"integrated gradients' completeness error is above {COMPLETENESS_WARN:.0%} on {len(high)} of "
                     f"{len(samples)} samples (worst {max(high):.1%}): raise --steps (now {opts.steps})")
    n = len(samples)
    worse_del = sum(s.deletion_auc >= s.random_deletion_auc for s in samples)
    worse_ins = sum(s.insertion_auc <= s.random_insertion_auc for s in samples)
    mean = lambda vals: sum(vals) / n  # noqa: E731
    d, rd = mean([s.deletion_auc for s in samples]), mean([s.random_deletion_auc for s in samples])
    ins, ri = mean([s.insertion_auc for s in samples]), mean([s.random_insertion_auc for s in samples])
    if d >= rd:
        notes.append(f"on deletion this explanation is no better than a random order (AUC {d:.3f} against "
                     f"random's {rd:.3f}; worse on {worse_del} of {n} samples)")
    if ins <= ri:
        notes.append(f"on insertion this explanation is no better than a random order (AUC {ins:.3f} against "
                     f"random's {ri:.3f}; worse on {worse_ins} of {n} samples)")
    text = art.spec.modality == TEXT
    if "infidelity" in opts.metrics and text and opts.method in metrics.LOCAL_METHODS:
        notes.append(f"infidelity is not measured for {opts.method} on text: its token scores are norms over an "
                     "embedding, which no change of a token multiplies")
    if "sensitivity" in opts.metrics and text:
        notes.append("sensitivity is not measured on text: token ids do not move continuously")
    if art.precision != "fp32" and not int8:
        notes.append(f"attributed in fp32 (the artifact runs in {art.precision})")
    return notes
