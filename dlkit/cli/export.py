"""dlkit export ARTIFACT --format onnx|exported-program|torchscript"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import EXPORT_FORMATS, ONNX_QUANT_MODES
from dlkit.cli.common import DebugOpt, JsonOpt, QuietOpt, err, fmt_int, handle_errors, show


@handle_errors
def export(
    artifact: Annotated[str, typer.Argument(help="Artifact folder, or - to read its path from stdin.")],
    format: Annotated[Literal[EXPORT_FORMATS], typer.Option("--format", "-f", help="onnx (ONNX Runtime and other "
                                                            "runtimes), exported-program (torch.export .pt2) or "
                                                            "torchscript.")] = "onnx",
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset [default: the exporter's recommended one].")] = None,
    quantize: Annotated[Optional[Literal[ONNX_QUANT_MODES]], typer.Option(
        help="onnx: int8 through ONNX Runtime's tools; static (QDQ, activations calibrated on training samples) "
             "or dynamic.")] = None,
    calib_samples: Annotated[int, typer.Option(help="--quantize static: training samples to calibrate on.")] = 512,
    samples: Annotated[int, typer.Option(help="Test samples the export is checked on against PyTorch.")] = 32,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the artifact's dataset.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder to create "
                                                "[default: ARTIFACT-FORMAT].")] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export an artifact for other runtimes, checked against PyTorch on real samples; print the folder.

    The folder holds the model file and export.json (inputs, preprocessing, labels, tokenizer), so
    other programs can use it without dlkit. Nothing is written when the check fails.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["export"]
    source, opts = step.build(resolve_path(artifact), format=format, opset=opset, quantize=quantize,
                              calib_samples=calib_samples, samples=samples, data_dir=data_dir, out=out)
    res = step.run(source, opts, StepHooks())
    show(res, _report, quiet=quiet, json=json, path=res.path)


def _report(res) -> None:
    axes = ", ".join(f"{axis}={name}" for axis, name in res.dynamic_axes.items())
    err.print(f"[bold]{res.model}[/] exported as {res.format} ({res.exporter} exporter) to {res.path}: "
              f"{res.file} {fmt_int(res.file_bytes)} bytes, dynamic axes {axes}")
    bound = f"tolerance {res.tolerance:.3g}" if res.tolerance is not None else "int8: measured, not bounded"
    err.print(f"checked on {res.samples} test samples at batch {', '.join(map(str, res.batch_sizes))}: "
              f"max |exported - PyTorch| = {res.max_abs_diff:.3g} ({bound}), top label agrees on "
              f"{100 * res.agreement:.1f}%; {res.seconds:.1f} s")
    for note in res.notes:
        err.print(f"[yellow]note:[/] {note}")
