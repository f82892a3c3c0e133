"""dlkit prune ARTIFACT (--ratio R | --target-macs F | --target-params F)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import IMPORTANCES
from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, emit_json, emit_path, err, \
    fmt_int, handle_errors

HOW = "How much"
STRATEGY = "Strategy"


@handle_errors
def prune(
    artifact: Annotated[str, typer.Argument(help="Artifact folder, or - to read its path from stdin.")],
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of each layer's channels/units/heads to "
                                                   "remove, in (0, 1); with --unstructured, the sparsity.",
                                                   rich_help_panel=HOW)] = None,
    target_macs: Annotated[Optional[float], typer.Option(help="Fraction of the MACs to keep, in (0, 1); the "
                                                         "ratio that reaches it is searched.", rich_help_panel=HOW)] = None,
    target_params: Annotated[Optional[float], typer.Option(help="Fraction of the parameters to keep, in (0, 1).",
                                                           rich_help_panel=HOW)] = None,
    importance: Annotated[Literal[IMPORTANCES], typer.Option(help="How channels are ranked: weight norms (l1, "
                                                             "l2), |weight x gradient| (taylor), LAMP, or random.",
                                                             rich_help_panel=STRATEGY)] = "l2",
    global_: Annotated[bool, typer.Option("--global", help="Rank channels across layers instead of pruning every "
                                          "layer by the same ratio (not for the transformer).",
                                          rich_help_panel=STRATEGY)] = False,
    iterative_steps: Annotated[int, typer.Option(help="Reach the ratio in this many equal steps, fine-tuning "
                                                 "after each.", rich_help_panel=STRATEGY)] = 1,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after each step, on the artifact's "
                                                 "own dataset.", rich_help_panel=STRATEGY)] = 0,
    finetune_lr: Annotated[Optional[float], typer.Option(help="Fine-tuning peak learning rate, decayed over the "
                                                         "fine-tune epochs [default: the training lr; half of "
                                                         "it for sgd].", rich_help_panel=STRATEGY)] = None,
    protect: Annotated[Optional[list[str]], typer.Option(help="Layer (module name, e.g. features.0) whose "
                                                         "outputs are never pruned; repeatable. The "
                                                         "classifier head is always kept.",
                                                         rich_help_panel=STRATEGY)] = None,
    unstructured: Annotated[bool, typer.Option(help="Zero the smallest weights instead (dense tensors: no "
                                               "speed-up is claimed, sparsity is reported).",
                                               rich_help_panel=STRATEGY)] = False,
    sensitivity: Annotated[bool, typer.Option(help="Prune each layer alone at several ratios and measure the "
                                              "validation accuracy drop (table and PNG plot).",
                                              rich_help_panel=STRATEGY)] = False,
    from_sensitivity: Annotated[bool, typer.Option(help="With --sensitivity and a --target-*: choose per-layer "
                                                   "ratios from the measured drops.", rich_help_panel=STRATEGY)] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Where the sensitivity plot goes when no pruned artifact "
                                                 "is written [default: beside the artifact].")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the dataset's files.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact folder to create "
                                                "[default: ARTIFACT-prunedNN beside the input].")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prune a model: remove channels, hidden units, attention heads and FFN neurons (or single
    weights with --unstructured), optionally fine-tune, and save a new artifact; print its path.

    The report (stderr; --json on stdout) measures before and after in this run: parameters, MACs,
    size on disk, latency at batch 1 and 256 (medians) and validation/test accuracy.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.cli.progress import DownloadProgress, StepProgress
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["prune"]
    artifact, opts = step.build(  # bad options fail here, before anything is read or loaded
        artifact, ratio=ratio, target_macs=target_macs, target_params=target_params, importance=importance,
        global_=global_, iterative_steps=iterative_steps, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
        protect=protect, unstructured=unstructured, sensitivity=sensitivity, from_sensitivity=from_sensitivity,
        plot=plot, data_dir=data_dir, out=out, device=device, seed=seed)
    source = resolve_path(artifact)
    downloads = DownloadProgress(quiet)
    try:
        with StepProgress(quiet or finetune_epochs == 0, f"fine-tune {source.name}") as progress:
            res = step.run(source, opts, StepHooks(observer=progress, download_progress=downloads))
    finally:
        downloads.close()
    if not quiet:
        _report(res)
    if json:
        emit_json(res.to_dict())
    elif res.artifact is not None:
        emit_path(res.artifact)
    elif res.plot is not None:
        emit_path(res.plot)


def _report(res) -> None:
    from rich.table import Table

    if res.sensitivity:
        t = Table(title="sensitivity: each layer pruned alone (validation accuracy)", title_justify="left")
        for col in ("layer", "ratio", "val acc", "drop (pts)", "MACs kept"):
            t.add_column(col, justify="left" if col == "layer" else "right")
        for row in res.sensitivity:
            t.add_row(row["layer"], f"{row['ratio']:.2f}", f"{100 * row['val_accuracy']:.2f}%",
                      f"{100 * row['drop']:+.2f}", f"{100 * row['macs_kept']:.1f}%")
        err.print(t)
        if res.plot:
            err.print(f"sensitivity plot: {res.plot}")
    if res.before is None:
        return
    b, a, r = res.before, res.after, res.ratios()
    how = (f"sparsity {100 * res.sparsity:.1f}% of the prunable weights" if res.mode == "unstructured"
           else f"per-layer ratios {res.unit_ratios}" if res.unit_ratios else f"ratio {res.ratio:g}")
    err.print(f"[bold]{res.model}[/] pruned ({res.mode}, {how}) on {res.device}")
    t = Table(title_justify="left")
    for col in ("", "before", "after", "after / before"):
        t.add_column(col, justify="left" if not col else "right")

    def ratio(x):
        return "-" if x is None else f"{x:.3f}"

    def acc(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    def delta(x):
        return "-" if x is None else f"{100 * x:+.2f} pts"

    t.add_row("parameters", fmt_int(b.params), fmt_int(a.params), ratio(r["params"]))
    if res.mode == "unstructured":
        t.add_row("zero parameters", fmt_int(b.zeros), fmt_int(a.zeros), "")
    t.add_row("MACs / sample", fmt_int(b.macs), fmt_int(a.macs), ratio(r["macs"]))
    t.add_row("size on disk", f"{b.size_bytes / 1024:,.1f} KiB", f"{a.size_bytes / 1024:,.1f} KiB", ratio(r["size"]))
    t.add_row("latency batch 1", f"{b.latency_b1_ms:.3f} ms", f"{a.latency_b1_ms:.3f} ms",
              f"{r['speedup_b1']:.2f}x faster" if r["speedup_b1"] else "-")
    t.add_row("latency batch 256", f"{b.latency_b256_ms:.2f} ms", f"{a.latency_b256_ms:.2f} ms",
              f"{r['speedup_b256']:.2f}x faster" if r["speedup_b256"] else "-")
    t.add_row("val accuracy", acc(b.val_accuracy), acc(a.val_accuracy), delta(r["val_accuracy_delta"]))
    t.add_row("test accuracy", acc(b.test_accuracy), acc(a.test_accuracy), delta(r["test_accuracy_delta"]))
    for split in ("val", "test"):  # language models: perplexity (the accuracies above are next-token)
        pb, pa = getattr(b, f"{split}_perplexity", None), getattr(a, f"{split}_perplexity", None)
        if pb is not None and pa is not None:
            t.add_row(f"{split} perplexity", f"{pb:.3f}", f"{pa:.3f}", f"{pa / pb:.3f}x")
    err.print(t)
    changed = {k: f"{res.widths_before.get(k)} -> {v}" for k, v in res.widths_after.items()
               if res.widths_before.get(k) != v}
    if changed:
        err.print("widths: " + "; ".join(f"{k} {v}" for k, v in changed.items()))
    for note in res.notes:
        err.print(f"[dim]note: {note}[/]")
    err.print("latency: medians, the two models timed alternately in this run; on a busy machine compare the "
              "ratio, not the milliseconds", style="dim")
