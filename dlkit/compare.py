"""Compare artifacts side by side: accuracy, parameters, MACs, size on disk, latency.

Everything is measured in this one run by ``dlkit.profiling.measure_models``, the measurement
prune and quantize report too (each model run as ``dlkit evaluate`` runs it, on the same real
samples, in alternating rounds), so the same pair gets the same speed-up in every command. Each
number is also given as a ratio to the first artifact.

An ONNX export folder (``dlkit export``, float or ``--quantize``d) is a row too: ONNX Runtime runs
it in the same rounds, with as many threads as PyTorch gets; its accuracy comes from its own logits
on the test split, its counts from the artifact it was exported from, its size is its file's.

A model that is not an artifact is a row too: the user's ``file.py:Name``, a registry preset (its
native shape, weights freshly initialised) or an ``hf:`` model, resolved as ``dlkit profile``
resolves it (``--input-shape``, ``--input-dtype``, ``--vocab-size``, ``--set``). It has no data, so
no accuracy: it is measured on its random example input, and left out of the Pareto fronts and of
``--fail-under``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dlkit.errors import UsageError

METRICS = ("accuracy", "macro_f1")  # what --fail-under can check (higher is better)


@dataclass
class Row:
    artifact: str  # the artifact's folder, or the model as named (file.py:Name, a preset, hf:...)
    model: str
    dataset: str | None
    step: str  # the last step of its lineage (train, prune, quantize, export), or the kind of model
    accuracy: float | None  # None: a model without data (not an artifact)
    macro_f1: float | None
    params: int
    macs: int
    size_bytes: int
    latency_ms: dict[int, float]  # batch -> median milliseconds
    ratios: dict[str, float] = field(default_factory=dict)  # to the first row
    pareto: dict[str, bool] = field(default_factory=dict)  # on the accuracy/latency and accuracy/size fronts
    runtime: str = "torch"  # onnxruntime for an ONNX export folder (dlkit export)


@dataclass
class CompareResult:
    rows: list[Row]
    batches: tuple[int, ...]
    device: str
    threads: int
    failures: list[str]

    def to_dict(self) -> dict:
        return {"device": self.device, "threads": self.threads, "batches": list(self.batches),
                "rows": [asdict(r) for r in self.rows], "failures": self.failures}


def parse_floors(items: list[str] | None) -> dict[str, float]:
    floors = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in METRICS:
            raise UsageError(f"--fail-under {item!r} is not METRIC=VALUE", hint=f"metrics: {', '.join(METRICS)}; "
                             "e.g. --fail-under accuracy=0.9")
        try:
            floors[key] = float(value)
        except ValueError:
            raise UsageError(f"--fail-under {item!r}: {value!r} is not a number") from None
    return floors


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """points are (cost, accuracy): on the front when no other point is as cheap and as accurate,
    and strictly better in one."""
    out = []
    for i, (c, a) in enumerate(points):
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


@dataclass
class CompareOptions:
    batches: tuple[int, ...] = (1, 256)
    rounds: int = 10  # alternating timing rounds (batch 1: 4x as many); medians reported
    threads: int | None = None  # torch threads while timing; None: as set
    floors: dict[str, float] = field(default_factory=dict)  # metric -> the least value that passes
    data_dir: str | None = None
    device: str = "cpu"
    # Models that are not artifacts (file.py:Name, presets, hf:): their inputs and arguments, as in profile.
    input_shape: str | None = None
    input_dtype: str | None = None
    vocab_size: int | None = None
    overrides: dict | None = None

    def validate(self) -> "CompareOptions":
        if self.rounds < 1:
            raise UsageError(f"--rounds must be >= 1 (got {self.rounds})")
        if not self.batches or min(self.batches) < 1:
            raise UsageError(f"batch sizes must be >= 1 (got {list(self.batches)})")
        unknown = sorted(set(self.floors) - set(METRICS))
        if unknown:
            raise UsageError(f"--fail-under: unknown metric {', '.join(unknown)}", hint=f"metrics: {', '.join(METRICS)}")
        return self


def compare_artifacts(paths: list[Path | str], opts: CompareOptions | None = None) -> CompareResult:
    from dlkit.device import resolve_device

    opts = (opts or CompareOptions()).validate()
    if not paths:
        raise UsageError("compare needs at least one artifact")
    dev = resolve_device(opts.device)
    bare = [str(p) for p in paths if _is_model(str(p))]
    if opts.floors and bare:
        raise UsageError(f"--fail-under checks test metrics, which {bare[0]} has no data for",
                         hint="compare artifacts only (dlkit train makes one), or drop --fail-under")
    if opts.overrides and not bare:
        raise UsageError("--set passes arguments to models that are not artifacts; there are none here",
                         hint="drop --set")
    sources = [_source(str(p), opts) for p in paths]
    rows = _measure(sources, opts, dev)
    first = rows[0]
    for row in rows:
        row.ratios = {
            "accuracy": (row.accuracy / first.accuracy if first.accuracy else float("nan"))
            if row.accuracy is not None and first.accuracy is not None else None,
            "params": row.params / first.params if first.params else float("nan"),
            "macs": row.macs / first.macs if first.macs else float("nan"),
            "size": row.size_bytes / first.size_bytes if first.size_bytes else float("nan"),
            **{f"speedup_b{b}": first.latency_ms[b] / row.latency_ms[b] for b in opts.batches},
        }
    big = max(opts.batches)
    scored = [r for r in rows if r.accuracy is not None]
    for key, costs in (("latency", [r.latency_ms[big] for r in scored]), ("size", [r.size_bytes for r in scored])):
        for row, on in zip(scored, pareto(list(zip(costs, [r.accuracy for r in scored])))):
            row.pareto[key] = on
    for row in rows:
        if row.accuracy is None:
            row.pareto = {"latency": False, "size": False}
    failures = []
    for metric, floor in opts.floors.items():
        for row in rows:
            value = getattr(row, metric)
            if not value >= floor:
                failures.append(f"{row.artifact}: {metric} {value:.4f} < {floor}")
    return CompareResult(rows, tuple(opts.batches), str(dev), opts.threads or torch.get_num_threads(), failures)


def _measure(sources, opts: CompareOptions, dev) -> list[Row]:
    """Accuracy (``evaluate_artifact``) and the one measurement of every artifact, timed together
    on real test samples (each artifact's own data: the same inputs where they share a dataset)."""
    from dlkit import artifacts
    from dlkit.api import EvaluateOptions, evaluate_artifact
    from dlkit.profiling.measure import Subject, example_batch, measure_models

    big = max(opts.batches)
    samples: dict[tuple, object] = {}
    subjects, evals = [], []
    for src in sources:
        art, exported = src.art, src.exported
        if src.target is not None:  # a model without data: its own example input, no accuracy
            tgt = src.target
            model = tgt.real if tgt.real is not None else tgt.build("cpu")
            evals.append(None)
            subjects.append(Subject(model, tgt.example(big, "cpu"), tgt.precision, input_shape=tgt.input_shape))
            continue
        model = artifacts.load_model(art)
        key = (art.dataset, art.spec.input_shape)
        if key not in samples:
            data = artifacts.load_data(art, why="measuring latency", data_dir=opts.data_dir) if art.dataset else None
            samples[key] = example_batch(art.spec, big, data)
        if exported is None:
            evals.append(evaluate_artifact(art.path, EvaluateOptions(data_dir=opts.data_dir, device=str(dev))).result)
            subjects.append(Subject(model, samples[key], art.precision, _codec_transform(art)))
            continue
        run = _onnx_runner(exported, opts.threads or torch.get_num_threads())
        evals.append(_evaluate_onnx(art, run, opts))
        subjects.append(Subject(model, samples[key], "fp32", run=run, runtime="onnxruntime",
                                stored_bytes=(exported / "model.onnx").stat().st_size))
    measured = measure_models(subjects, device=dev, batches=tuple(opts.batches), repeats=opts.rounds,
                              threads=opts.threads)
    rows = []
    for src, ev, m in zip(sources, evals, measured):
        if src.target is not None:
            rows.append(Row(src.label, src.target.name, None, src.step, None, None, m.params, m.macs,
                            m.size_bytes, dict(m.latency_ms), runtime=m.runtime))
            continue
        rows.append(Row(str(src.exported or src.art.path), src.art.model_name, src.art.dataset, src.step,
                        ev.accuracy, ev.macro_f1, m.params, m.macs, m.size_bytes, dict(m.latency_ms),
                        runtime=m.runtime))
    return rows


@dataclass
class _Source:
    """One row to measure: an artifact (``art``; ``exported``: its ONNX export folder) or a model
    without data (``target``: a resolved profile target)."""

    label: str
    step: str
    art: object = None
    exported: Path | None = None
    target: object = None


def _is_model(text: str) -> bool:
    """Whether ``text`` names a model that is not an artifact: file.py:Name, hf:..., a preset."""
    from dlkit.models import MODELS
    from dlkit.profiling.target import target_kind

    kind = target_kind(text)
    return kind in ("module", "hf") or (kind == "registry" and text in MODELS)


def _source(text: str, opts: CompareOptions) -> _Source:
    """An artifact, an ONNX export folder or a model named as ``dlkit profile`` takes it."""
    from dlkit.profiling.target import resolve_target, target_kind

    if _is_model(text):
        kind = target_kind(text)
        tgt, _ = resolve_target(text, input_shape=opts.input_shape, input_dtype=opts.input_dtype,
                                vocab_size=opts.vocab_size, overrides=opts.overrides)
        return _Source(text, kind, target=tgt)
    art, exported, step = _artifact_source(Path(text))
    return _Source(str(exported or art.path), step, art=art, exported=exported)


def _artifact_source(path: Path):
    """(artifact, None, its last step) for an artifact; (the artifact it came from, folder, "export" or
    "export int8-MODE") for an ONNX export folder, whose accuracy and counts need that artifact's data
    and model (the weights must be the same)."""
    from dlkit import artifacts
    from dlkit.errors import ArtifactError
    from dlkit.export import EXPORT_FILE, read_export

    if not (path / EXPORT_FILE).is_file():
        art = artifacts.read_artifact(path)
        return art, None, art.manifest["lineage"][-1]["step"] if art.manifest.get("lineage") else "?"
    doc = read_export(path)
    if doc["model_format"] != "onnx":
        raise UsageError(f"{path} is a {doc['model_format']} export; compare runs ONNX exports (with ONNX Runtime)",
                         hint="compare the artifact, or a folder from dlkit export --format onnx")
    source = Path(doc["source"]["artifact"])
    try:
        art = artifacts.read_artifact(source)
    except ArtifactError:
        raise ArtifactError(f"compare needs the artifact {path} was exported from ({source}), for its test data "
                            "and counts", hint="compare the export where that artifact is at hand") from None
    if art.manifest.get("weights", {}).get("sha256") != doc["source"].get("weights_sha256"):
        raise ArtifactError(f"{source} no longer holds the weights {path} was exported from",
                            hint="export the artifact again")
    quantized = doc.get("quantization")
    return art, path, f"export int8-{quantized['mode']}" if quantized else "export"


def _onnx_runner(folder: Path, threads: int):
    """numpy batch -> logits, through an ONNX Runtime session with ``threads`` threads (as PyTorch gets)."""
    from dlkit.export import INPUT_NAME, onnx_session

    session = onnx_session(folder / "model.onnx", threads)
    return lambda x: session.run(None, {INPUT_NAME: x})[0]


def _evaluate_onnx(art, run, opts: CompareOptions):
    """The test split's metrics from the ONNX model's logits (as ``dlkit evaluate`` computes them)."""
    import numpy as np

    from dlkit import artifacts
    from dlkit.engine.evaluate import metrics_from_logits

    data = artifacts.load_data(art, why="evaluating an ONNX export", data_dir=opts.data_dir)
    x, y = data.test
    logits = [np.asarray(run(x[i : i + 1024].contiguous().numpy())) for i in range(0, len(x), 1024)]
    names = list(data.spec.class_names or range(data.spec.num_classes))
    return metrics_from_logits(torch.from_numpy(np.concatenate(logits)).float(), y, names, "test")


def _codec_transform(art) -> dict | None:
    """The artifact's last transform that stores its weights through a codec (int8, fp16), if any."""
    from dlkit import artifacts

    return next((t for t in reversed(art.manifest["model"].get("transforms", [])) if t["kind"] in artifacts.CODECS),
                None)


def plot_compare(result: CompareResult, path: Path) -> None:
    """Accuracy against latency (largest batch) and against size, the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlkit.output import save_figure

    big = max(result.batches)
    rows = [r for r in result.rows if r.accuracy is not None]  # models without data have no accuracy
    if not rows:
        raise UsageError("--plot draws accuracy against cost, and none of these has test data",
                         hint="compare artifacts (dlkit train makes one), or drop --plot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, xs, label in (
        (axes[0], "latency", [r.latency_ms[big] for r in rows], f"latency at batch {big} (ms, median)"),
        (axes[1], "size", [r.size_bytes / 1e6 for r in rows], "size on disk (MB)"),
    ):
        ys = [100 * r.accuracy for r in rows]
        front = sorted((x, y) for x, y, r in zip(xs, ys, rows) if r.pareto[key])
        ax.scatter(xs, ys, color="tab:gray", zorder=2)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", marker="o", zorder=3,
                label="Pareto front")
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(f"{Path(r.artifact).name} ({r.step})", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def to_csv(result: CompareResult) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    lat = [f"latency_b{b}_ms" for b in result.batches]
    w.writerow(["artifact", "model", "step", "accuracy", "macro_f1", "params", "macs", "size_bytes", *lat,
                *[f"ratio_{k}" for k in result.rows[0].ratios], "runtime"])
    for r in result.rows:
        w.writerow([r.artifact, r.model, r.step, _fmt(r.accuracy, 6), _fmt(r.macro_f1, 6), r.params, r.macs,
                    r.size_bytes, *[f"{r.latency_ms[b]:.4f}" for b in result.batches],
                    *[_fmt(v, 4) for v in r.ratios.values()], r.runtime])
    return buf.getvalue()


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
