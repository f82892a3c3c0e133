"""dlkit evaluate ARTIFACT"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import SPLITS
from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, err, fmt_pct, handle_errors, show


@handle_errors
def evaluate(
    artifact: Annotated[str, typer.Argument(help="Artifact folder, or - to read its path from stdin.")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Evaluate on another dataset of the "
                                                   "same shape [default: the artifact's own].")] = None,
    split: Annotated[Literal[SPLITS], typer.Option(help="Which split.")] = "test",
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the dataset's files.")] = None,
    data_file: Annotated[Optional[Path], typer.Option(help="Text artifacts: evaluate on every row of this "
                                                      "file (same columns) instead of the training file's "
                                                      "test split.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 1024,
    plot: Annotated[Optional[Path], typer.Option(help="Write the confusion matrix as a PNG here.")] = None,
    device: DeviceOpt = "auto",
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Loss, accuracy, per-class precision/recall/F1 and the confusion matrix of an artifact; for a
    language model, loss, perplexity and bits per character (byte) on its validation or test text
    (--data-file: all of another text, encoded with the artifact's tokenizer).

    Prints the table on stderr; with --json, one JSON document on stdout.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.cli.progress import DownloadProgress
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["evaluate"]
    source, opts = step.build(resolve_path(artifact), dataset=dataset, split=split, data_dir=data_dir,
                              data_file=data_file, batch_size=batch_size, plot=plot, device=device)
    downloads = DownloadProgress(quiet)
    try:
        res = step.run(source, opts, StepHooks(download_progress=downloads))
    finally:
        downloads.close()
    show(res, _report, quiet=quiet, json=json)


def _report(res) -> None:
    from rich.table import Table

    r = res.result
    if hasattr(r, "perplexity"):  # a language model
        bits = f", {r.bits_per_unit:.4f} bits per {r.unit}" if r.bits_per_unit is not None else ""
        err.print(f"[bold]{res.model}[/] on {res.dataset} ({r.split}, {r.tokens:,} tokens in {r.windows:,} windows): "
                  f"loss {r.loss:.4f}, perplexity {r.perplexity:.3f}{bits}, next-token accuracy {fmt_pct(r.accuracy)}",
                  highlight=False)
        return
    err.print(f"[bold]{res.model}[/] on {res.dataset} ({r.split}, {r.samples:,} samples): "
              f"accuracy {fmt_pct(r.accuracy)}, loss {r.loss:.4f}, macro F1 {r.macro_f1:.4f}", highlight=False)
    table = Table(title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in r.per_class:
        table.add_row(c.name, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", str(c.support))
    err.print(table)
    names = [c.name[:6] for c in r.per_class]
    cm = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
    cm.add_column("")
    for n in names:
        cm.add_column(n, justify="right")
    for n, row in zip(names, r.confusion):
        cm.add_row(n, *[str(v) for v in row])
    err.print(cm)
    if res.plot:
        err.print(f"confusion matrix plot: {res.plot}")
