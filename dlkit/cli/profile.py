"""dlkit profile TARGET"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import INPUT_DTYPES, PRECISIONS, PREDICT_RUNTIMES, PROFILE_OPTIMIZERS
from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, err, fmt_int, handle_errors, show

INPUT = "Input"


def fmt_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_count(n: float | int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


@handle_errors
def profile(
    target: Annotated[Optional[str], typer.Argument(
        help="Registry name (`dlkit models`), artifact folder (- reads it from stdin), hf:DIR or hf:ORG/NAME, "
             "or your own path/to/file.py:Name (a class or factory function; with --input-shape).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Registry presets: adapt the model to "
                                                   "this dataset's shape and classes [default: its native shape, "
                                                   "e.g. ImageNet for vgg16].", rich_help_panel=INPUT)] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="Input shape, e.g. 1,3,224,224 (batch first; for a "
                                                       "registry model C,H,W or L also works).",
                                                       rich_help_panel=INPUT)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Text models and token inputs (--input-dtype long): tokens "
                                                   "per sample.", rich_help_panel=INPUT)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per batch [default: the shape's, else the "
                                                      "model's training batch].", rich_help_panel=INPUT)] = None,
    preset: Annotated[Optional[str], typer.Option(help="A registry preset to profile (the same as giving it as "
                                                  "TARGET).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="key=value: a registry model's config "
                                                      "field, or a keyword argument of file.py:Name (typed from "
                                                      "its signature), e.g. --set n_layer=4.")] = None,
    depth: Annotated[int, typer.Option(help="Module table depth (0: the model only).")] = 2,
    training: Annotated[bool, typer.Option("--training", help="Also one training step: forward+backward FLOPs, "
                                           "gradients, optimizer state.")] = False,
    optimizer: Annotated[Literal[PROFILE_OPTIMIZERS], typer.Option(
        help="Optimizer whose state the training memory holds.")] = "adamw",
    precision: Annotated[Optional[Literal[PRECISIONS]], typer.Option(
        help="bf16: autocast [default: the artifact's, else fp32].")] = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time forward passes.")] = True,
    measure: Annotated[Optional[bool], typer.Option("--measure/--no-measure", help="Run the real model for "
                                                    "measured memory and latency [default: when a run costs "
                                                    "under ~30 GFLOPs].")] = None,
    device: DeviceOpt = "auto",
    runtime: Annotated[Literal[PREDICT_RUNTIMES], typer.Option(
        help="What runs the timed passes: torch, or onnxruntime (the model exported to ONNX, checked against "
             "PyTorch, on the CPU; registry models and artifacts). Counts and memory are PyTorch's.")] = "torch",
    input_dtype: Annotated[Optional[Literal[INPUT_DTYPES]], typer.Option(
        help="file.py:Name: feed float tensors or token ids (long) [default: float].",
        rich_help_panel=INPUT)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        help="Token ids are drawn below this [default: the model's first nn.Embedding; a text preset's own].",
        rich_help_panel=INPUT)] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Parameters, MACs/FLOPs, per-module costs, memory and latency of a model.

    Large registry models are counted on the meta device (no weights allocated).
    """
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["profile"]
    target, opts = step.build(target, dataset=dataset, input_shape=input_shape, seq_len=seq_len,
                              batch_size=batch_size, preset=preset, set_=set_, depth=depth, training=training,
                              optimizer=optimizer, precision=precision, latency=latency, measure=measure,
                              device=device, runtime=runtime, input_dtype=input_dtype, vocab_size=vocab_size)
    res = step.run(target, opts, StepHooks())
    show(res, _report, quiet=quiet, json=json)


def _report(res) -> None:
    from rich.table import Table

    shape = "x".join(map(str, res.input_shape))
    p = res.params
    err.print(f"[bold]{res.model}[/] ({res.kind}), input {shape}, {res.precision}, counted on {res.counted_on}")
    err.print(f"[dim]{res.convention}[/]")
    dtypes = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p["bytes_by_dtype"].items())
    err.print(f"parameters: {fmt_int(p['total'])} ({fmt_int(p['trainable'])} trainable), "
              f"{fmt_bytes(p['bytes'])} stored ({dtypes})")
    f = res.forward
    t = Table(title="forward cost", title_justify="left")
    for col in ("", "MACs", "FLOPs"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("per sample", fmt_count(f["macs_per_sample"]), fmt_count(f["flops_per_sample"]))
    t.add_row(f"per batch of {res.batch_size}", fmt_count(f["macs_per_batch"]), fmt_count(f["flops_per_batch"]))
    if res.training:
        tr = res.training
        t.add_row("training step: forward", fmt_count(tr["forward_macs"]), fmt_count(tr["forward_flops"]))
        t.add_row("training step: backward", fmt_count(tr["backward_macs"]), fmt_count(tr["backward_flops"]))
        t.add_row("training step: total", fmt_count(tr["forward_macs"] + tr["backward_macs"]), fmt_count(tr["flops"]))
    err.print(t)

    m = Table(title="modules (forward, per batch)", title_justify="left")
    for col in ("module", "type", "output", "params", "MACs", "share"):
        m.add_column(col, justify="right" if col in ("params", "MACs", "share") else "left")
    for r in res.modules:
        out = "x".join(map(str, r.output_shape)) if r.output_shape else "-"
        m.add_row("  " * r.depth + r.name, r.type, out, fmt_int(r.params), fmt_count(r.macs), f"{100 * r.share:.1f}%")
    err.print(m)

    ops = Table(title="ops (forward)", title_justify="left")
    for col in ("op", "calls", "MACs", "FLOPs"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    for o in res.by_op[:12]:
        ops.add_row(o["op"], str(o["calls"]), fmt_count(o["macs"]), fmt_count(o["flops"]))
    for op, calls in res.zero_cost.items():
        ops.add_row(op + " (0 by convention)", str(calls), "0", "0")
    for op, calls in res.uncounted.items():
        ops.add_row(f"[red]{op} (uncounted)[/]", str(calls), "?", "?")
    err.print(ops)

    est, meas = res.memory["estimate"], res.memory["measured"]
    mem = Table(title="memory (estimate from tensor sizes; measured peak where the model ran)", title_justify="left")
    mem.add_column("")
    mem.add_column("inference", justify="right")
    mem.add_column("training step" + (f" ({est['optimizer']})" if res.training else ""), justify="right")
    train = res.training is not None
    rows = [("weights", est["weights"], est["weights"]), ("input", est["inputs"], est["inputs"]),
            ("gradients", None, est["gradients"] if train else None),
            ("optimizer state", None, est["optimizer_state"] if train else None),
            ("activations", est["activations_inference"], est["activations_training"] if train else None),
            ("estimated peak", est["inference_peak"], est["training_peak"]),
            ("measured peak", meas["inference_peak"], meas["training_peak"])]
    for name, a, b in rows:
        mem.add_row(name, fmt_bytes(a), fmt_bytes(b))
    err.print(mem)
    if res.memory.get("measured_with"):
        err.print(f"[dim]measured with {res.memory['measured_with']}[/]")

    if res.latency:
        lt = Table(title=f"latency ({res.latency[0].runtime}, {res.latency[0].device}, {res.latency[0].threads} threads, "
                         f"{res.latency[0].precision})", title_justify="left")
        for col in ("batch", "median ms", "p90 ms", "samples/s", "runs"):
            lt.add_column(col, justify="right")
        for r in res.latency:
            lt.add_row(str(r.batch), f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.samples_per_s:,.1f}", str(r.runs))
        err.print(lt)
    if res.lm:
        _lm_report(res.lm)
    for note in res.notes:
        err.print(f"[yellow]note:[/] {note}", soft_wrap=True)


def _lm_report(lm: dict) -> None:
    """A language model's cost per token: MACs, KV cache, prefill and decode speed."""
    train = lm["training_macs_per_token"]
    err.print(f"language model: {fmt_count(lm['macs_per_token'])} MACs per token forward"
              + (f", {fmt_count(train)} per token trained" if train else "")
              + f"; KV cache {fmt_bytes(lm['kv_cache_bytes_per_token'])} per token ({lm['kv_cache_dtype']}), "
              f"{fmt_bytes(lm['kv_cache_bytes_per_sequence'])} for {lm['seq_len']} tokens", highlight=False)
    if lm["prefill"] and lm["decode"]:
        err.print(f"prefill {lm['seq_len']} tokens: {lm['prefill']['median_ms']:.2f} ms "
                  f"({lm['prefill']['tokens_per_s']:,.0f} tokens/s); decode one token: "
                  f"{lm['decode']['median_ms']:.2f} ms ({lm['decode']['tokens_per_s']:,.0f} tokens/s)", highlight=False)
