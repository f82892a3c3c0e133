"""dlkit train MODEL --dataset NAME"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import OPTIMIZERS, PRECISIONS, SCHEDULES
from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, emit_json, emit_path, err, fmt_pct, \
    handle_errors

TRAIN = "Training (defaults depend on the model; `dlkit models` shows them)"
DATA = "Data"


@handle_errors
def train(
    model: Annotated[str, typer.Argument(help="Registered model name (`dlkit models`), e.g. cnn, lstm, resnet20.")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name (`dlkit datasets`); "
                                                   "default: the model's own.", rich_help_panel=DATA)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the dataset's files (looked in first).",
                                                     rich_help_panel=DATA)] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the training set held out for validation.",
                                                rich_help_panel=DATA)] = 0.1,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Model config override key=value "
                                                      "(repeatable), e.g. --set hidden=256 --set channels=16,32.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set.", rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per step.", rich_help_panel=TRAIN)] = None,
    optimizer: Annotated[Optional[Literal[OPTIMIZERS]], typer.Option(help="sgd uses momentum 0.9 (Nesterov).",
                                                     rich_help_panel=TRAIN)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.", rich_help_panel=TRAIN)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Decoupled for adamw; L2 for sgd/adam. Not applied "
                                                          "to biases and norms.", rich_help_panel=TRAIN)] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum.", rich_help_panel=TRAIN)] = None,
    schedule: Annotated[Optional[Literal[SCHEDULES]], typer.Option(help="Learning-rate schedule over the whole run.",
                                                    rich_help_panel=TRAIN)] = None,
    warmup: Annotated[Optional[float], typer.Option(help="Linear warm-up, as a fraction of all steps.",
                                                    rich_help_panel=TRAIN)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the gradient norm to this (0: off).",
                                                       rich_help_panel=TRAIN)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Cross-entropy label smoothing.",
                                                             rich_help_panel=TRAIN)] = None,
    precision: Annotated[Optional[Literal[PRECISIONS]], typer.Option(help="bf16 uses autocast (and channels_last for convnets).",
                                                     rich_help_panel=TRAIN)] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="The dataset's augmentation "
                                                    "(fashion-mnist: horizontal flips).", rich_help_panel=TRAIN)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact folder to create "
                                                "[default: runs/MODEL-DATASET-TIME].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run whose --out is given.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a model and save it as an artifact; print the artifact's path on stdout.

    Ctrl-C (or SIGTERM) saves a checkpoint; run the same command with --resume to continue.
    """
    from dlkit.api import TrainRequest, train_model
    from dlkit.cli.progress import DownloadProgress, TrainProgress
    from dlkit.config import parse_assignments
    from dlkit.engine.signals import stop_on_signals
    from dlkit.errors import UsageError
    from dlkit.models import MODELS

    if dataset is None:
        dataset = MODELS.get(model).default_dataset
        from dlkit.data import DATASETS

        if dataset not in DATASETS:
            raise UsageError(f"model '{model}' has no trainable default dataset", hint="pass --dataset")
    options = dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                   momentum=momentum, schedule=schedule, warmup=warmup, grad_clip=grad_clip,
                   label_smoothing=label_smoothing, precision=precision, augment=augment)
    request = TrainRequest(model=model, dataset=dataset, overrides=parse_assignments(set_), options=options,
                           data_dir=str(data_dir) if data_dir else None, val_fraction=val_fraction, out=out,
                           resume=resume, seed=seed, device=device)
    downloads = DownloadProgress(quiet)
    with TrainProgress(quiet, f"{model}/{dataset}") as progress, stop_on_signals() as stop:
        try:
            result = train_model(request, observer=progress, should_stop=stop, download_progress=downloads)
        finally:
            downloads.close()
    if not quiet:
        _report(result)
    if json:
        emit_json(result.to_dict())
    else:
        emit_path(result.artifact)


def _report(result) -> None:
    from rich.table import Table

    cfg = result.config
    table = Table(title=f"{result.manifest['model']['name']} on {result.manifest['data']['dataset']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result.val is not None:
        table.add_row("val accuracy", fmt_pct(result.val.accuracy))
    table.add_row("test accuracy", fmt_pct(result.test.accuracy))
    table.add_row("test loss", f"{result.test.loss:.4f}")
    table.add_row("test macro F1", f"{result.test.macro_f1:.4f}")
    table.add_row("epochs", str(cfg.epochs))
    table.add_row("train time", f"{result.manifest['metrics']['train_seconds']:.1f} s")
    table.add_row("samples/s (last epoch)", f"{result.manifest['metrics']['samples_per_s']:,.0f}")
    table.add_row("setup", f"{cfg.optimizer} lr {cfg.lr:g}, {cfg.schedule}, batch {cfg.batch_size}, {cfg.precision}, "
                  f"{result.device}")
    table.add_row("artifact", str(result.artifact))
    err.print(table)
