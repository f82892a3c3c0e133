"""dlkit train MODEL --dataset NAME"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import OPTIMIZERS, PRECISIONS, SCHEDULES, TRAIN_CHECKPOINTING, TRAIN_STRATEGIES
from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, emit_json, emit_path, err, fmt_pct, \
    handle_errors

TRAIN = "Training (defaults depend on the model; `dlkit models` shows them)"
DATA = "Data"
SCALE = "Memory and scale (plan them first: `dlkit plan MODEL`)"


@handle_errors
def train(
    model: Annotated[str, typer.Argument(help="Registered model name (`dlkit models`), e.g. cnn, lstm, resnet20; "
                                         "hf:DIR or hf:ORG/NAME. MODEL may be an artifact folder: training starts "
                                         "from its weights (same architecture; the data must match its spec: text "
                                         "is encoded with the artifact's own tokenizer).")],
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name (`dlkit datasets`); "
                                                   "default: the model's own.", rich_help_panel=DATA)] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the dataset's files (looked in first).",
                                                     rich_help_panel=DATA)] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the training set held out for validation.",
                                                rich_help_panel=DATA)] = 0.1,
    data_file: Annotated[Optional[Path], typer.Option(help="Your own labelled text (.csv, .tsv, .jsonl: implies "
                                                      "--dataset text-csv), or text for a language model (a "
                                                      ".txt file or a folder of them: --dataset text-lm).",
                                                      rich_help_panel=DATA)] = None,
    test_file: Annotated[Optional[Path], typer.Option(help="Language models: a separate test text [default: the "
                                                      "validation text, the last --val-fraction of --data-file].",
                                                      rich_help_panel=DATA)] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Language models: char (the training text's characters), "
                                                     "bpe (byte-level BPE trained to --vocab-size), or hf (an hf: "
                                                     "model's own; hf:NAME for another's) [default: char].",
                                                     rich_help_panel=DATA)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Language models: tokens per training window (at most the "
                                                   "model's context) [default: 64].", rich_help_panel=DATA)] = None,
    text_column: Annotated[Optional[str], typer.Option(help="Column of --data-file holding the text "
                                                       "[default: text].", rich_help_panel=DATA)] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Column of --data-file holding the label "
                                                        "[default: label].", rich_help_panel=DATA)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Text: vocabulary size, padding and unknown "
                                                      "included [default: 10000].", rich_help_panel=DATA)] = None,
    max_len: Annotated[Optional[int], typer.Option(help="Text: tokens kept per text; longer texts are "
                                                   "truncated [default: 100].", rich_help_panel=DATA)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Model config override key=value "
                                                      "(repeatable), e.g. --set hidden=256 --set channels=16,32.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training set.", rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Language models: optimizer steps, each on --batch-size "
                                                     "random windows [default: --epochs passes over the text].",
                                                     rich_help_panel=TRAIN)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Language models: steps between validations and "
                                                      "checkpoints [default: one pass over the text].",
                                                      rich_help_panel=TRAIN)] = None,
    eval_batches: Annotated[Optional[int], typer.Option(help="Language models: validation batches per check, "
                                                        "spread over the validation text [default: all of it].",
                                                        rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per optimizer step over all workers (the global "
                                                      "batch; with --nproc N each worker takes about 1/N of it).",
                                                      rich_help_panel=TRAIN)] = None,
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
    precision: Annotated[Optional[Literal[PRECISIONS]], typer.Option(help="bf16 uses autocast (and channels_last for convnets) [default: fp32; bf16 for "
                                                     "cnn and gpt-mini on CPUs with native bf16 (AVX512-BF16/AMX), where it measured "
                                                     "no accuracy loss: stderr and the manifest say so].",
                                                     rich_help_panel=TRAIN)] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="The dataset's augmentation "
                                                    "(fashion-mnist: horizontal flips).", rich_help_panel=TRAIN)] = None,
    strategy: Annotated[Optional[Literal[TRAIN_STRATEGIES]], typer.Option(
        help="With --nproc N: ddp keeps a full replica per worker; fsdp (FSDP2, ZeRO-3) shards parameters, "
             "gradients and optimizer state across workers [default: ddp].", rich_help_panel=SCALE)] = None,
    checkpointing: Annotated[Optional[Literal[TRAIN_CHECKPOINTING]], typer.Option(
        help="full: keep only each block's input and recompute its activations in the backward pass "
             "(transformer, gpt, bert, vit and hf: models) [default: none].", rich_help_panel=SCALE)] = None,
    lora_rank: Annotated[Optional[int], typer.Option(
        help="Train LoRA adapters of this rank on --lora-targets, the base weights frozen [default: 0, off].",
        rich_help_panel=SCALE)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(
        help="LoRA scale: the update is alpha / rank * B A [default: 2 * rank].", rich_help_panel=SCALE)] = None,
    lora_targets: Annotated[Optional[str], typer.Option(
        help="Comma-separated names of the Linear layers to adapt (matched as name suffixes) "
             "[default: the attention query and value projections].", rich_help_panel=SCALE)] = None,
    merge: Annotated[Optional[bool], typer.Option(
        "--merge/--no-merge", help="LoRA: write the merged weights (an ordinary artifact) instead of the base "
                                   "reference and the adapters.", rich_help_panel=SCALE)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact folder to create "
                                                "[default: runs/MODEL-DATASET-TIME].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run whose --out is given.")] = False,
    nproc: Annotated[int, typer.Option(help="Local worker processes for distributed data parallel (torch.distributed, "
                                       "elastic launcher; gloo on CPU, nccl on CUDA). --batch-size and --lr keep "
                                       "their meaning. Under torchrun, leave it out.", min=1)] = 1,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a model and save it as an artifact; print the artifact's path on stdout.

    Ctrl-C (or SIGTERM) saves a checkpoint; run the same command with --resume to continue.
    """
    from dlkit.steps import STEPS

    _, request = STEPS["train"].build(
        None, model=model, dataset=dataset, data_dir=data_dir, val_fraction=val_fraction, data_file=data_file,
        text_column=text_column, label_column=label_column, vocab_size=vocab_size, max_len=max_len, set_=set_,
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        momentum=momentum, schedule=schedule, warmup=warmup, grad_clip=grad_clip, label_smoothing=label_smoothing,
        precision=precision, augment=augment, out=out, resume=resume, device=device, seed=seed, test_file=test_file,
        tokenizer=tokenizer, seq_len=seq_len, max_steps=max_steps, eval_every=eval_every, eval_batches=eval_batches,
        strategy=strategy, checkpointing=checkpointing, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_targets=lora_targets, merge=merge)
    from dlkit.api import default_out
    from dlkit.errors import Interrupted

    request.out = request.out or default_out(request.model, request.dataset)
    try:
        if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            result = _launch(request, nproc, quiet)
        else:
            result = _run(request, quiet)
    except Interrupted as exc:
        exc.hint = f"continue with: {_resume_command(request.out)}"
        raise
    if result is None:  # a worker other than rank 0 (under torchrun): rank 0 reports
        return
    if not quiet:
        _report(result)
    if json:
        emit_json(result.to_dict())
    else:
        emit_path(result.artifact)


def _resume_command(out: Path) -> str:
    """The command line as typed, with the --out it wrote to and --resume."""
    import shlex

    args = sys.argv[1:]
    if not any(a in ("--out", "-o") or a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["dlkit", *args])


def _run(request, quiet: bool):
    """Train in this process: a plain run, or one worker of a distributed run (rank 0 shows progress)."""
    from dlkit.cli.common import setup_logging
    from dlkit.cli.progress import DownloadProgress, TrainProgress
    from dlkit.engine.signals import stop_on_signals
    from dlkit.steps import STEPS, StepHooks

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dlkit.engine.distributed import worker_stop_signals as stop_on_signals  # noqa: F811

        if int(os.environ.get("RANK", "0")) != 0:
            quiet = True
            setup_logging(True)
    downloads = DownloadProgress(quiet)
    with TrainProgress(quiet, f"{request.model}/{request.dataset}") as progress, stop_on_signals() as stop:
        try:
            return STEPS["train"].run(None, request, StepHooks(observer=progress, should_stop=stop,
                                                               download_progress=downloads))
        finally:
            downloads.close()


def _worker(request, quiet: bool):
    """The entry point of a --nproc worker (a fresh process started by the elastic launcher)."""
    from dlkit.cli.common import setup_logging

    setup_logging(quiet)
    return _run(request, quiet)


def _launch(request, nproc: int, quiet: bool):
    """--nproc N: check what can be checked here, run N workers, return rank 0's result."""
    import logging
    import shutil

    from dlkit import artifacts
    from dlkit.api import check_train_request
    from dlkit.engine.checkpoint import discard_untrained, has_checkpoint
    from dlkit.engine.distributed import launch
    from dlkit.errors import DlkitError, Interrupted

    cfg, request.out = check_train_request(request, nproc)  # every worker uses the same --out
    work = artifacts.work_folder(request.out)
    logging.getLogger("dlkit").info("launching %d workers: global batch %d, about %d per worker", nproc,
                                    cfg.batch_size, -(-cfg.batch_size // nproc))
    try:
        return launch(nproc, _worker, request, quiet)
    except DlkitError as exc:
        resume = f"dlkit train {request.model} --dataset {request.dataset} --out {request.out} --nproc {nproc} --resume"
        if has_checkpoint(work) and not discard_untrained(work):
            exc.hint = f"a checkpoint is kept in {work}; continue with: {resume}"
        elif not request.resume:
            shutil.rmtree(work, ignore_errors=True)  # nothing worth keeping: leave no half-written run
        if isinstance(exc, Interrupted) and not exc.message.startswith("stopped"):
            exc.message = f"interrupted ({exc.message})"
        raise


def _lm_rows(table, result) -> None:
    """A language model's validation and test loss, perplexity and bits per character (byte)."""
    for r in (result.val, result.test):
        if r is None:
            continue
        bits = f", {r.bits_per_unit:.3f} bits/{r.unit}" if r.bits_per_unit is not None else ""
        table.add_row(f"{r.split} loss", f"{r.loss:.4f} (perplexity {r.perplexity:.2f}{bits})")
    m = result.manifest["metrics"]
    table.add_row("steps", f"{m['steps']:,}")
    table.add_row("tokens/s", f"{m['tokens_per_s']:,.0f}")


def _report(result) -> None:
    from rich.table import Table

    cfg = result.config
    table = Table(title=f"{result.manifest['model']['name']} on {result.manifest['data']['dataset']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if hasattr(result.test, "perplexity"):  # a language model
        _lm_rows(table, result)
    elif result.val is not None:
        table.add_row("val accuracy", fmt_pct(result.val.accuracy))
    if not hasattr(result.test, "perplexity"):
        table.add_row("test accuracy", fmt_pct(result.test.accuracy))
        table.add_row("test loss", f"{result.test.loss:.4f}")
        table.add_row("test macro F1", f"{result.test.macro_f1:.4f}")
        table.add_row("epochs", str(cfg.epochs))
    table.add_row("train time", f"{result.manifest['metrics']['train_seconds']:.1f} s")
    if "samples_per_s" in result.manifest["metrics"]:
        table.add_row("samples/s (last epoch)", f"{result.manifest['metrics']['samples_per_s']:,.0f}")
    table.add_row("setup", f"{cfg.optimizer} lr {cfg.lr:g}, {cfg.schedule}, batch {cfg.batch_size}, {cfg.precision}, "
                  f"{result.device}")
    ddp = result.distributed
    if ddp:
        table.add_row("distributed", f"{ddp['world_size']} workers ({ddp['backend']}), global batch "
                      f"{ddp['global_batch']} = {ddp['world_size']} x ~{ddp['batch_per_worker']}, lr not scaled, "
                      f"{ddp['threads']} threads/worker")
    table.add_row("artifact", str(result.artifact))
    err.print(table)
