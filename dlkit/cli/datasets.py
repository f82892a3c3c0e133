"""dlkit datasets"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, emit_json, err, escape, handle_errors


@handle_errors
def datasets(
    data_dir: Annotated[Optional[Path], typer.Option(help="Also look in this folder.")] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List datasets: modality, sample shape, classes, and where each was found (if anywhere)."""
    from dlkit.api import list_datasets

    rows = list_datasets(data_dir)
    if json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table(title="datasets", title_justify="left")
    for col in ("name", "modality", "shape", "classes", "found at", "description"):
        table.add_column(col)
    for r in rows:
        found = escape(r["found"]) if r["found"] else "[yellow]not here: downloaded on first use[/]"
        table.add_row(r["name"], r["modality"], "x".join(map(str, r["input_shape"])), str(r["num_classes"]), found,
                      r["description"])
    err.print(table)
