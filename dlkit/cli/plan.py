"""dlkit plan TARGET"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import INPUT_DTYPES
from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, err, fmt_int, handle_errors, show
from dlkit.plan.choices import CHECKPOINTING, KNOWN_DEVICES, PLAN_OPTIMIZERS, PLAN_PRECISIONS, STRATEGIES

INPUT = "Input"
RUN = "Training run"
HW = "Devices"


@handle_errors
def plan(
    target: Annotated[Optional[str], typer.Argument(
        help="Registry name (`dlkit models`), artifact folder (- reads it from stdin), hf:DIR or hf:ORG/NAME, "
             "or your own path/to/file.py:Name (with --input-shape).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Micro-batch per device [default: the model's "
                                                      "training batch].", rich_help_panel=RUN)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Text models: tokens per sample.",
                                                   rich_help_panel=INPUT)] = None,
    precision: Annotated[Literal[PLAN_PRECISIONS], typer.Option(
        help="fp32; bf16-mixed (bf16 weights and gradients, fp32 master weights and optimizer state, as ZeRO "
             "and Megatron); bf16 (everything bf16).", rich_help_panel=RUN)] = "bf16-mixed",
    optimizer: Annotated[Literal[PLAN_OPTIMIZERS], typer.Option(
        help="Whose state is held (adamw-8bit: bitsandbytes' 8-bit Adam).", rich_help_panel=RUN)] = "adamw",
    checkpointing: Annotated[Literal[CHECKPOINTING], typer.Option(
        help="Activation checkpointing per block: full (keep block inputs, recompute), selective (recompute "
             "attention matrices only, Korthikanti et al. 2022).", rich_help_panel=RUN)] = "none",
    lora_rank: Annotated[Optional[int], typer.Option(help="Plan LoRA fine-tuning of rank R (base frozen).",
                                                     rich_help_panel=RUN)] = None,
    lora_targets: Annotated[Optional[list[str]], typer.Option(
        help="Linear layer names for LoRA, comma-separated or repeated [default: q,v and their Hugging Face "
             "names].", rich_help_panel=RUN)] = None,
    strategy: Annotated[Literal[STRATEGIES], typer.Option(
        help="ddp (replicate), zero1 (shard optimizer state), zero2 (+ gradients), fsdp (+ weights; ZeRO-3).",
        rich_help_panel=HW)] = "ddp",
    devices: Annotated[int, typer.Option(help="Data-parallel devices.", rich_help_panel=HW)] = 1,
    device_memory: Annotated[str, typer.Option(
        help=f"Memory per device: a size (80GiB, 40GB) or a device: {', '.join(KNOWN_DEVICES)} "
             "(cpu: this machine's RAM and measured peak).", rich_help_panel=HW)] = "h100-80",
    mfu: Annotated[float, typer.Option(help="Share of the device's peak FLOP/s the run reaches (model FLOPs "
                                       "utilisation).", rich_help_panel=HW)] = 0.4,
    tokens: Annotated[Optional[str], typer.Option(help="Text: tokens to train on, e.g. 300B (time estimate).",
                                                  rich_help_panel=RUN)] = None,
    samples: Annotated[Optional[str], typer.Option(help="Samples per epoch, e.g. 1.28M (time estimate).",
                                                   rich_help_panel=RUN)] = None,
    epochs: Annotated[float, typer.Option(help="Epochs over --samples.", rich_help_panel=RUN)] = 1.0,
    search: Annotated[bool, typer.Option("--search/--no-search", help="Find the largest micro-batch that "
                                         "fits.")] = True,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Registry presets: size the model "
                                                   "for this dataset.", rich_help_panel=INPUT)] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="Input shape, e.g. 1,3,224,224 (batch first).",
                                                       rich_help_panel=INPUT)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="key=value: a registry model's config "
                                                      "field, or a keyword argument of file.py:Name.")] = None,
    input_dtype: Annotated[Optional[Literal[INPUT_DTYPES]], typer.Option(
        help="file.py:Name: float tensors or token ids (long).", rich_help_panel=INPUT)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="file.py:Name: token ids below this.",
                                                      rich_help_panel=INPUT)] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plan a training run: memory per device, whether it fits, the largest micro-batch, and time.

    Counted on the meta device from one traced training step (no weights allocated).
    """
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["plan"]
    target, opts = step.build(target, batch_size=batch_size, seq_len=seq_len, precision=precision,
                              optimizer=optimizer, checkpointing=checkpointing, lora_rank=lora_rank,
                              lora_targets=lora_targets, strategy=strategy, devices=devices,
                              device_memory=device_memory, mfu=mfu, tokens=tokens, samples=samples, epochs=epochs,
                              search=search, dataset=dataset, input_shape=input_shape, set_=set_,
                              input_dtype=input_dtype, vocab_size=vocab_size)
    res = step.run(target, opts, StepHooks())
    show(res, _report, quiet=quiet, json=json)


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.3g} {unit}"
    return f"{n:,.3g} "


def _report(res) -> None:
    from rich.table import Table

    m, d, c = res.memory, res.device, res.compute
    shape = "x".join(map(str, res.input_shape))
    err.print(f"[bold]{res.model}[/] ({res.kind}), micro-batch {shape}, {res.precision}, {res.optimizer}, "
              f"checkpointing {res.checkpointing}, {res.strategy} on {res.devices} x {d['name']} "
              f"({_gib(d['memory'])})")
    p = res.params
    lora = f"; LoRA rank {res.lora['rank']} on {len(res.lora['targets'])} layers" if res.lora else ""
    err.print(f"parameters: {fmt_int(p['total'])} ({fmt_int(p['trainable'])} trainable){lora}")
    t = Table(title="memory per device (estimate; one training step)", title_justify="left")
    t.add_column("")
    t.add_column("bytes", justify="right")
    rows = [("weights", m.weights), ("gradients", m.gradients), ("optimizer state", m.optimizer),
            ("activations (saved for backward)", m.activations), ("logits / loss buffers", m.logits_loss),
            ("transient (gradients in flight, recompute)", m.transient), ("optimizer step temporaries",
                                                                           m.optimizer_step),
            ("inputs", m.inputs)]
    if m.gathered:
        rows.append(("FSDP gathered weights", m.gathered))
    for name, v in rows:
        t.add_row(name, _gib(v))
    t.add_row(f"[bold]peak[/] (set by the {m.phase} phase)", f"[bold]{_gib(m.peak)}[/]")
    t.add_row("framework allowance", _gib(m.overhead))
    t.add_row("[bold]total[/]", f"[bold]{_gib(m.total)}[/]")
    err.print(t)
    verdict = "[green]fits[/]" if m.fits else "[red]does not fit[/]"
    if not res.searched:
        best = "not searched (--no-search)"
    else:
        best = res.max_micro_batch if res.max_micro_batch is not None else "none: not even 1"
    err.print(f"{verdict} in {_gib(d['memory'])}; largest micro-batch that fits: {best}")
    inf = res.inference
    if inf["kv_cache"]:
        err.print(f"inference: weights {_gib(inf['weights'])}, KV cache {_gib(inf['kv_cache'])} at this micro-batch "
                  f"and length ({_gib(inf['kv_cache_per_token'])} per token)")
    unit = c["unit"]
    err.print(f"compute: {_count(c['model_flops_per_step'])}FLOPs per step (model), "
              f"{_count(c['hardware_flops_per_step'])}FLOPs with recomputation; "
              f"{_count(c[f'model_flops_per_{unit[:-1]}'])}FLOPs per {unit[:-1]}")
    err.print(f"at {100 * c['mfu']:.0f}% of {_count(c['peak_flops'])}FLOP/s: {c['step_seconds'] * 1e3:,.3g} ms "
              f"per step, {c[f'{unit}_per_second']:,.0f} {unit}/s over {res.devices} device(s)")
    if "train" in c:
        tr = c["train"]
        err.print(f"training on {tr['amount']}: {tr['hours']:,.2f} h ({fmt_int(tr['steps'])} steps)")
    err.print(f"[dim]peak FLOP/s: {d['source']}[/]", soft_wrap=True)
    for note in res.notes:
        err.print(f"[yellow]note:[/] {note}", soft_wrap=True)
