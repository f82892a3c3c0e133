"""dlkit models"""

from __future__ import annotations

from typing import Annotated

import typer

from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, emit_json, err, handle_errors


@handle_errors
def models(
    pattern: Annotated[str, typer.Argument(help="Glob on names, e.g. 'resnet*'.")] = "*",
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List registered models: what each name stands for (its native input, head and parameters)
    and how it adapts to data (what `dlkit train` uses without --dataset, and the parameters there)."""
    from dlkit.api import list_models

    rows = list_models(pattern)
    if json:
        emit_json(rows)
        return
    if quiet:
        return
    from rich.table import Table

    table = Table(title="models: the name's native shape and parameters; --dataset adapts the input and head",
                  title_justify="left")
    for col in ("name", "family", "native input and head", "params", "dlkit train (no --dataset)", "description"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] is not None else f"- ({r['error']})"
        table.add_row(r["name"], r["family"], f"{r['native']['describe']} ({r['native_dataset']})", params,
                      _adapt(r), r["description"])
    err.print(table)


def _adapt(r: dict) -> str:
    """What training without --dataset does: the dataset and the parameters there, or that one is needed."""
    if not r["trainable_default"]:
        return "needs --dataset, e.g. " + ("imdb" if r["native"]["modality"] == "text" else "cifar10")
    if r["default_dataset"] == r["native_dataset"]:
        return r["default_dataset"]
    params = f"{r['default_params']:,} params" if r["default_params"] is not None else r["default_error"]
    return f"{r['default_dataset']}: {params}"
