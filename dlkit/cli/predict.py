"""dlkit predict TARGET INPUT..."""

from __future__ import annotations

import json as json_module
import sys
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import PREDICT_RUNTIMES
from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, emit_json, err, escape, handle_errors


@handle_errors
def predict(
    target: Annotated[str, typer.Argument(help="Artifact folder, ONNX export folder (dlkit export), or - to read "
                                          "its path from stdin.")],
    inputs: Annotated[list[str], typer.Argument(help="Image files, .npy/.npz arrays, text files (one example a "
                                                "line), folders of them, or - for lines on stdin.")],
    top_k: Annotated[int, typer.Option(help="Most probable labels listed per input.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Inputs per forward pass.")] = 64,
    runtime: Annotated[Optional[Literal[PREDICT_RUNTIMES]], typer.Option(
        help="torch runs an artifact; onnxruntime an ONNX export folder, or an artifact exported (and checked) "
             "to a temporary ONNX file first [default: torch for an artifact].")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first input that cannot be read.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Predict labels of new inputs: one JSON line per input on stdout (input, label, probability, top-k).

    An input that cannot be read is named on stderr and skipped; the exit status is then 1.
    With --json, one JSON document at the end instead of the lines.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.errors import UsageError
    from dlkit.steps import STEPS, StepHooks

    if target == "-" and "-" in inputs:
        raise UsageError("stdin cannot hold both the target's path and the inputs",
                         hint="name the target, or pass the inputs as files")
    step = STEPS["predict"]
    source, opts = step.build(resolve_path(target), inputs=inputs, top_k=top_k, batch_size=batch_size,
                              runtime=runtime, strict=strict)
    with _Watch(lines=not json, quiet=quiet) as watch:
        res = step.run(source, opts, StepHooks(observer=watch))
    if json:
        emit_json(res.to_dict())
    if not quiet:
        err.print(f"{len(res.predictions)} predicted by {res.model} ({res.runtime}) in {res.seconds:.1f} s")
    step.check(res)


def _report(res) -> None:
    """A recipe's predict step: a one-line summary (its report file holds the predictions)."""
    err.print(f"{len(res.predictions)} inputs predicted by {res.model} ({res.runtime}), "
              f"{len(res.failures)} could not be read")


class _Watch:
    """Prints each prediction as a JSON line as it comes, names unreadable inputs on stderr, and
    counts on stderr when there are many."""

    SHOW_AFTER = 100

    def __init__(self, lines: bool, quiet: bool):
        self.lines, self.quiet = lines, quiet
        self.done = 0
        self.progress = None
        self.task = None

    def __enter__(self) -> "_Watch":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_prediction(self, p) -> None:
        if self.lines:
            sys.stdout.write(json_module.dumps(p.to_dict()) + "\n")
            sys.stdout.flush()
        self.done += 1
        if self.quiet:
            return
        if self.progress is None and self.done >= self.SHOW_AFTER:
            from rich.progress import Progress, SpinnerColumn, TextColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("predicted {task.completed:,.0f}"), console=err,
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task("predict", total=None)
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)

    def on_failure(self, name: str, why: str) -> None:
        err.print(f"[red]cannot read[/] {escape(name)}: {escape(why)}", soft_wrap=True)
