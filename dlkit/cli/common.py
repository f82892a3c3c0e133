"""What every command shares: the output contract, common options, and the one error path.

stdout carries machine output only (an artifact path, or one JSON document with --json);
everything meant for people goes to stderr. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Annotated, Literal, Any, Callable

import typer
from rich.console import Console

from dlkit.choices import DEVICES
from dlkit.errors import DlkitError

err = Console(stderr=True, highlight=False)

# Common options, declared once.
DeviceOpt = Annotated[Literal[DEVICES], typer.Option("--device", help="Where to compute: auto picks CUDA when present.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for initialization, shuffling and splits.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a path/table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables on stderr (errors still show).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors (or set DLKIT_DEBUG=1).")]


def setup_logging(quiet: bool) -> None:
    """dlkit's notes go to stderr; --quiet keeps only warnings and errors."""
    logger = logging.getLogger("dlkit")
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        if getattr(h, "_dlkit_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler._dlkit_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    """Print one red line (with the hint on it) and return the Exit to raise."""
    line = f"[bold red]error:[/] {escape(message)}"
    if hint:
        line += f" [dim]({escape(hint)})[/]"
    err.print(line, soft_wrap=True)
    return typer.Exit(code)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def handle_errors(fn: Callable) -> Callable:
    """Turn DlkitError into one red line and a non-zero exit; --debug re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug") or os.environ.get("DLKIT_DEBUG", "") not in ("", "0")
        setup_logging(bool(kwargs.get("quiet")))
        try:
            return fn(*args, **kwargs)
        except DlkitError as exc:
            if debug:
                raise
            raise fail(exc.message, exc.hint, exc.exit_code) from None
        except KeyboardInterrupt:
            if debug:
                raise
            raise fail("interrupted", code=130) from None

    return wrapper


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def emit_path(path: Any) -> None:
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


def show(result: Any, report: Callable[[Any], None], *, quiet: bool, json: bool, path: Any = None) -> None:
    """Render a command's result: its table on stderr (unless --quiet), then on stdout one JSON
    document (--json) or the path it wrote (if any)."""
    if not quiet:
        report(result)
    if json:
        emit_json(result.to_dict())
    elif path is not None:
        emit_path(path)


def fmt_int(n: float | int) -> str:
    return f"{int(n):,}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.2f}%"
