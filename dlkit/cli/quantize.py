"""dlkit quantize ARTIFACT --mode dynamic|static|qat|fp16|bf16"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import QUANT_BACKENDS, QUANT_MODES
from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, SeedOpt, err, fmt_int, fmt_pct, handle_errors, show


@handle_errors
def quantize(
    artifact: Annotated[str, typer.Argument(help="Artifact folder, or - to read its path from stdin.")],
    mode: Annotated[Literal[QUANT_MODES], typer.Option("--mode", "-m", help="dynamic: int8 weights of Linear/LSTM/GRU; "
                                                 "static: int8 weights and activations, calibrated; qat: static "
                                                 "after quantization-aware fine-tuning; fp16/bf16: half-size "
                                                 "weights, fp32 compute.")] = "dynamic",
    calib_batches: Annotated[int, typer.Option(help="static: training batches (of 128) to calibrate on.")] = 8,
    epochs: Annotated[int, typer.Option(help="qat: fine-tuning epochs.")] = 1,
    lr: Annotated[Optional[float], typer.Option(help="qat: learning rate [default: 5% of the training lr].")] = None,
    backend: Annotated[Literal[QUANT_BACKENDS], typer.Option(help="int8 kernels to pack for.")] = "x86",
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the artifact's dataset.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per latency (batch 1: 5x as many); medians reported.")] = 10,
    eval_samples: Annotated[Optional[int], typer.Option(help="Measure accuracy on the first N test samples "
                                                        "[default: all].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact folder to create "
                                                "[default: ARTIFACT-int8-MODE or ARTIFACT-fp16/bf16].")] = None,
    seed: SeedOpt = 0,
    onnxruntime: Annotated[bool, typer.Option(help="int8: also time ONNX Runtime int8 of the artifact (an ONNX "
                                              "export, a few seconds) for the recommendation; skipped with a "
                                              "note when onnxruntime is not installed.")] = True,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Quantize an artifact; report size, latency and accuracy before and after; print the new path.

    int8 models run on the CPU. The new artifact holds plain tensors (no pickle) and reloads to
    the same outputs.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["quantize"]
    source, opts = step.build(resolve_path(artifact), mode=mode, calib_batches=calib_batches, epochs=epochs, lr=lr,
                              backend=backend, data_dir=data_dir, repeats=repeats, eval_samples=eval_samples,
                              out=out, seed=seed, onnxruntime=onnxruntime)
    res = step.run(source, opts, StepHooks())
    show(res, _report, quiet=quiet, json=json, path=res.artifact)


def _latency(before_ms: float, after_ms: float) -> tuple[str, str, str, str]:
    speed = before_ms / after_ms
    return (f"{before_ms:.3f}", f"{after_ms:.3f}", f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower",
            "" if speed >= 1 else "[yellow]slower[/]")


def _report(res) -> None:
    from rich.table import Table

    from dlkit.compress.quantize import KEEP_FP32

    b, a, r = res.before, res.after, res.ratios()
    table = Table(title=f"{res.model}: {res.mode}" + (f" ({res.backend})" if res.backend else "")
                  + f", compute {res.compute}", title_justify="left")
    for col in ("", "before", "after", "ratio", ""):
        table.add_column(col, justify="left" if col == "" else "right")
    table.add_row("size on disk (bytes)", fmt_int(b.file_bytes), fmt_int(a.file_bytes), f"{r['size']:.2f}x smaller", "")
    table.add_row(f"quantized layers ({len(res.quantized_layers)})", fmt_int(b.layer_bytes), fmt_int(a.layer_bytes),
                  f"{r['layers']:.2f}x smaller", "")
    for n in b.latency_ms:
        table.add_row(f"latency batch {n} (ms, median)", *_latency(b.latency_ms[n], a.latency_ms[n]))
    table.add_row(f"test accuracy ({res.test_samples:,} samples)", fmt_pct(b.accuracy), fmt_pct(a.accuracy),
                  f"{r['accuracy_change_points']:+.2f} points", "")
    if a.perplexity is not None and b.perplexity:  # a language model (the accuracy above is next-token)
        table.add_row("test perplexity", f"{b.perplexity:.3f}", f"{a.perplexity:.3f}",
                      f"{100 * (a.perplexity / b.perplexity - 1):+.2f}%", "")
    if res.onnxruntime is not None:
        o = res.onnxruntime
        for n in b.latency_ms:
            table.add_row(f"ONNX Runtime int8, batch {n} (ms)", *_latency(b.latency_ms[n], o.latency_ms[n]))
        table.add_row("ONNX Runtime int8, test accuracy", fmt_pct(b.accuracy), fmt_pct(o.accuracy),
                      f"{100 * (o.accuracy - b.accuracy):+.2f} points", "")
    err.print(table)
    for note in res.notes:
        err.print(f"[yellow]note:[/] {note}")
    rec = res.recommendation
    if rec is not None:
        head = (f"[bold]recommended:[/] {rec.path}" + (f", {rec.speedup:.2f}x faster than fp32 at batch {rec.batch}"
                                                      if rec.path != KEEP_FP32 else ""))
        err.print(head + (f": [cyan]{rec.command}[/]" if rec.command else ""))
        err.print(f"[dim]  {rec.reason}[/]")
    if not res.verified:
        err.print("[red]warning:[/] the saved artifact did not reproduce the measured outputs")
    err.print(f"[dim]timings on this machine as it is now (shared CPUs: absolute numbers are noisy, "
              f"ratios were timed side by side); {res.seconds:.1f} s in all[/]")
