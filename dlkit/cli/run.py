"""dlkit run RECIPE.yaml"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from dlkit.cli import compare, evaluate, profile, prune, quantize, train
from dlkit.cli import explain
from dlkit.cli import export, predict
from dlkit.cli import generate
from dlkit.cli import plan as plan_cli
from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, emit_json, emit_path, err, handle_errors

# how each step's result is shown on stderr: the table its own command prints
REPORTS = {"train": train._report, "evaluate": evaluate._report, "profile": profile._report,
           "prune": prune._report, "quantize": quantize._report, "compare": compare.render}
REPORTS["explain"] = explain._report
REPORTS.update({"export": export._report, "predict": predict._report})
REPORTS["generate"] = generate._report
REPORTS["plan"] = plan_cli._report


@handle_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe file (see recipes/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a step's option: "
                                                      "STEP.OPTION=VALUE, e.g. --set train.epochs=1.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and print the plan; run nothing.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder: every step's artifact goes "
                                                "under it [default: runs/RECIPE-NAME].")] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a recipe's steps in order; rerunning skips the steps that are already done.

    Prints the run folder on stdout (or one JSON document with --json).
    """
    from dlkit.recipes import load_recipe, run_recipe

    rec = load_recipe(recipe, set_)
    folder = out or Path("runs") / rec.name
    if dry_run:
        if json:
            emit_json({"recipe": rec.name, "folder": str(folder), "steps": rec.plan()})
        else:
            _plan(rec, folder, current=None)
        return
    total = len(rec.steps)

    def on_step(index, step):
        if not quiet:
            _plan(rec, folder, current=index)

    def on_result(step, result):
        if not quiet:
            REPORTS[step.command](result)

    result = run_recipe(rec, folder, on_step=on_step, hooks=lambda step: _watch(step, quiet), on_result=on_result)
    if not quiet:
        from rich.table import Table

        table = Table(title=f"{rec.name}: {total} steps in {folder}", title_justify="left")
        for c in ("step", "command", "status", "seconds", "test accuracy", "output"):
            table.add_column(c, justify="right" if c in ("seconds", "test accuracy") else "left")
        for s in result.steps:
            acc = s.result.get("test_accuracy", s.result.get("accuracy"))
            table.add_row(s.id, s.command, s.status, f"{s.seconds:.1f}",
                          f"{100 * acc:.2f}%" if isinstance(acc, float) else "", s.output)
        err.print(table)
    if json:
        emit_json(result.to_dict())
    else:
        emit_path(folder)


@contextlib.contextmanager
def _watch(step, quiet: bool):
    """Progress bars for a step (training, fine-tuning, downloads); Ctrl-C stops a training step politely."""
    from dlkit.cli.progress import DownloadProgress, StepProgress
    from dlkit.engine.signals import stop_on_signals
    from dlkit.steps import STEPS, StepHooks

    signals = stop_on_signals() if STEPS[step.command].interruptible else contextlib.nullcontext(lambda: False)
    downloads = DownloadProgress(quiet)
    try:
        with StepProgress(quiet, f"{step.id}: {step.command}") as progress, signals as stop:
            yield StepHooks(observer=progress, should_stop=stop, download_progress=downloads)
    finally:
        downloads.close()


def _plan(rec, folder, current) -> None:
    """The whole plan (dry run), or the line of the step starting now."""
    if current is None:
        err.print(f"[bold]{rec.name}[/]: {len(rec.steps)} steps, run folder {folder}", highlight=False)
    for i, step in enumerate(rec.steps):
        if current is not None and i != current:
            continue
        opts = " ".join(f"{k}={v}" for k, v in step.options.items())
        src = f" (input: {step.input})" if step.input else ""
        prefix = f"[bold cyan]step {i + 1}/{len(rec.steps)}[/]" if current is not None else f"  {i + 1}."
        err.print(f"{prefix} {step.id}: {step.command} {opts}{src}", highlight=False)
