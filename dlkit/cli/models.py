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
    """List registered models: family, modalities, default dataset and parameters on it."""
    from dlkit.api import list_models

    rows = list_models(pattern)
    if json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table(title="models (parameters counted on each model's default dataset)", title_justify="left")
    for col in ("name", "family", "modalities", "default data", "params", "description"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] is not None else f"- ({r['error']})"
        table.add_row(r["name"], r["family"], ",".join(r["modalities"]), r["default_dataset"], params, r["description"])
    err.print(table)
