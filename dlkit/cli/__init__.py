"""The ``dlkit`` command: one Typer app, one module per subcommand."""

from __future__ import annotations

import typer

from dlkit import __version__
from dlkit.cli import compare, datasets, evaluate, models, prune, run, train
from dlkit.cli import profile
from dlkit.cli import quantize
from dlkit.cli import explain
from dlkit.cli import export, predict
from dlkit.cli import generate

app = typer.Typer(
    name="dlkit",
    help="Train, evaluate, profile and compress neural networks.\n\n"
    "stdout carries machine output only (an artifact path, or JSON with --json); progress and "
    "tables go to stderr. Pass - instead of an artifact path to read it from stdin.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("models")(models.models)
app.command("datasets")(datasets.datasets)
app.command("profile")(profile.profile)
app.command("prune")(prune.prune)
app.command("quantize")(quantize.quantize)
app.command("compare")(compare.compare)
app.command("explain")(explain.explain)
app.command("export")(export.export)
app.command("predict")(predict.predict)
app.command("generate")(generate.generate)
from dlkit.cli import plan  # noqa: E402

app.command("plan")(plan.plan)
app.command("run")(run.run)


def main() -> None:
    from dlkit.malloc import keep_freed_memory

    keep_freed_memory()
    app()
