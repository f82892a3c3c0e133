"""dlkit explain ARTIFACT [--index I,J | --input FILE...]
--method ig|saliency|smoothgrad|gradient-shap|occlusion|lime|kernel-shap|grad-cam"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import DEVICES, EXPLAIN_BASELINES, EXPLAIN_METHODS
from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, err, escape, handle_errors, show


@handle_errors
def explain(
    artifact: Annotated[str, typer.Argument(help="Artifact folder, or - to read its path from stdin.")],
    method: Annotated[Literal[EXPLAIN_METHODS], typer.Option("--method", "-m", help="ig: integrated gradients; "
                                                   "saliency/smoothgrad: |gradient| (smoothgrad: over noisy "
                                                   "copies); gradient-shap; occlusion, lime, kernel-shap: patches "
                                                   "or tokens switched to the baseline; grad-cam: the last "
                                                   "convolutional feature map (image models).")] = "ig",
    samples: Annotated[int, typer.Option(help="Explain the first N test samples (not with --input).")] = 8,
    index: Annotated[Optional[str], typer.Option(help="Explain these test samples instead, e.g. 3,17.")] = None,
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="Explain your own inputs instead, read as dlkit predict reads them (repeatable): "
        "image files, .npy/.npz arrays, text files (one example per line), folders, or - for lines on stdin. "
        "They have no true label; one that cannot be read stops the run.")] = None,
    target: Annotated[str, typer.Option(help="The class explained: pred, true (test samples only), a class name or "
                                     "number.")] = "pred",
    baseline: Annotated[Optional[Literal[EXPLAIN_BASELINES]], typer.Option(
        help="The reference input: zero (black), mean or blur for images; pad (padding tokens) for text "
             "[default: zero for images, pad for text].")] = None,
    steps: Annotated[int, typer.Option(help="Integrated gradients' steps (raise it when completeness is off).")] = 50,
    perturbations: Annotated[int, typer.Option(help="lime/kernel-shap samples, smoothgrad's noisy copies, "
                                               "gradient-shap's points.")] = 200,
    patch: Annotated[Optional[int], typer.Option(help="Images: side of the square feature patches (perturbation "
                                                 "methods, deletion curves) [default: a grid of at most 8x8].")] = None,
    top_k: Annotated[int, typer.Option(help="Top features listed per sample.")] = 5,
    metrics: Annotated[Optional[str], typer.Option(help="Also measure infidelity and/or sensitivity "
                                                   "(comma-separated; sensitivity re-explains 8 moved copies of "
                                                   "each sample).")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the artifact's dataset.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder to create "
                                                "[default: ARTIFACT-explain-METHOD beside the artifact].")] = None,
    device: Annotated[Literal[DEVICES], typer.Option("--device", help="Where to compute (int8 models: cpu).")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random draws (noise, samples, random "
                                      "orders): the same seed gives the same attributions.")] = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Explain a model's decisions on test samples or your own files; measure how faithful the explanation is.

    Writes heatmaps (images) or a coloured HTML page (text), attributions (.npz), a per-class
    summary and explain.json into a new folder; prints its path (or the JSON with --json).
    Deletion/insertion areas are reported beside a random order's.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.errors import UsageError
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["explain"]
    if artifact == "-" and inputs and "-" in inputs:
        raise UsageError("stdin can hold the artifact's path or --input lines, not both",
                         hint="pass the artifact's path as an argument")
    source, opts = step.build(resolve_path(artifact), method=method, samples=samples, index=index, inputs=inputs,
                              target=target,
                              baseline=baseline, steps=steps, perturbations=perturbations, patch=patch, top_k=top_k,
                              metrics=metrics, data_dir=data_dir, out=out, device=device, seed=seed)
    res = step.run(source, opts, StepHooks())
    show(res, _report, quiet=quiet, json=json, path=res.folder)


def _feature(f: dict) -> str:
    """A token, or a patch as the rows and columns it spans (numpy slices)."""
    if "token" in f:
        return f["token"]
    return f"[{f['rows'][0]}:{f['rows'][1]},{f['cols'][0]}:{f['cols'][1]}]"


def _report(res) -> None:
    from rich.table import Table

    table = Table(title=f"{res.model}: {res.method}, baseline {res.baseline}, target {res.target}",
                  title_justify="left")
    files = any(s.input is not None for s in res.samples)
    columns = ["input" if files else "#", "predicted" if files else "true -> predicted",
               *(["explained"] if res.target != "pred" else []), "top features",
               "deletion (random)", "insertion (random)", *(["IG error"] if res.method == "ig" else []), *res.metrics]
    for c in columns:
        table.add_column(c, justify="left" if c in ("input", "predicted", "true -> predicted", "explained",
                                                    "top features") else "right")
    for s in res.samples:
        good_del = s.deletion_auc < s.random_deletion_auc
        good_ins = s.insertion_auc > s.random_insertion_auc
        label = escape(s.prediction) if files else f"{escape(s.true)} -> {escape(s.prediction)}"
        row = [escape(Path(s.input).name or s.input) if files else str(s.index), f"{label} ({s.probability:.0%})"]
        if res.target != "pred":
            row.append(f"{escape(s.target)} ({s.target_probability:.0%})")
        row += [escape(" ".join(_feature(f) for f in s.top_features[:2])),
                f"{'' if good_del else '[yellow]'}{s.deletion_auc:.3f}{'' if good_del else '[/]'} "
                f"({s.random_deletion_auc:.3f})",
                f"{'' if good_ins else '[yellow]'}{s.insertion_auc:.3f}{'' if good_ins else '[/]'} "
                f"({s.random_insertion_auc:.3f})"]
        if res.method == "ig":
            rel = s.completeness["relative_error"] if s.completeness else None
            row.append("n/a" if rel is None else f"{rel:.2%}")
        for name in res.metrics:
            value = getattr(s, name)
            row.append("n/a" if value is None else f"{value:.3g}")
        table.add_row(*row)
    err.print(table)
    summary = res.summary()
    err.print(f"mean deletion AUC {summary['deletion_auc']:.3f} (random {summary['random_deletion_auc']:.3f}), "
              f"insertion AUC {summary['insertion_auc']:.3f} (random {summary['random_insertion_auc']:.3f}); "
              f"better than random on {summary['better_than_random']} of {len(res.samples)} samples")
    for note in res.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")
    err.print(f"[dim]{len(res.files)} files in {escape(str(res.folder))}; {res.seconds:.1f} s[/]")
