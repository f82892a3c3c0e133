"""dlkit compare ARTIFACT ..."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from dlkit.choices import INPUT_DTYPES
from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, err, handle_errors


MODELS = "Models without data (file.py:Name)"


@handle_errors
def compare(
    artifacts: Annotated[list[str], typer.Argument(help="Artifact folders, or ONNX export folders (dlkit export: "
                                                   "run by ONNX Runtime); - reads one path per line from stdin. "
                                                   "Models without data (no accuracy) too: your file.py:Name, a "
                                                   "registry preset, hf:DIR.")],
    plot: Annotated[Optional[Path], typer.Option(help="Write accuracy against latency and size (Pareto front "
                                                 "marked) as a PNG here.")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option(help="Exit non-zero when an artifact misses a floor, "
                                                            "e.g. accuracy=0.9 (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(help="The large batch for latency (batch 1 is always timed).")] = 256,
    rounds: Annotated[int, typer.Option(help="Alternating timing rounds (batch 1: 4x as many); medians are "
                                        "reported.", min=1)] = 10,
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding the datasets' files.")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV on stdout.")] = False,
    device: DeviceOpt = "cpu",
    input_shape: Annotated[Optional[str], typer.Option(help="file.py:Name: its input, batch first (e.g. 1,3,32,32).",
                                                       rich_help_panel=MODELS)] = None,
    input_dtype: Annotated[Optional[Literal[INPUT_DTYPES]], typer.Option(
        help="file.py:Name: float tensors or token ids (long) [default: float].", rich_help_panel=MODELS)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        help="Token ids are drawn below this [default: the model's first nn.Embedding].",
        rich_help_panel=MODELS)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="key=value: a keyword argument of "
                                                      "file.py:Name, or a preset's config field.",
                                                      rich_help_panel=MODELS)] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One row per artifact (or model): accuracy, parameters, MACs, size on disk, latency at batch 1 and 256.

    Every number is measured in this run and also given as a ratio to the first row. A model that is
    not an artifact (file.py:Name, a preset, hf:) has no accuracy: it runs on a random example input.
    """
    from dlkit.compare import plot_compare, to_csv
    from dlkit.errors import UsageError
    from dlkit.steps import STEPS, StepHooks

    if json and csv:
        raise UsageError("--json and --csv are exclusive", hint="pick one")
    paths = []
    for a in artifacts:
        if a == "-":
            paths += [ln.strip() for ln in sys.stdin.read().splitlines() if ln.strip()]
        else:
            paths.append(a)
    if plot is not None and paths and not any(Path(p).is_dir() for p in paths):
        raise UsageError("--plot draws accuracy against cost, and none of these has test data",
                         hint="compare artifacts (dlkit train makes one), or drop --plot")
    step = STEPS["compare"]
    paths, opts = step.build(paths, fail_under=fail_under, batch_size=batch_size, rounds=rounds, data_dir=data_dir,
                             device=device, input_shape=input_shape, input_dtype=input_dtype, vocab_size=vocab_size,
                             set_=set_)
    if not quiet:
        err.print(f"measuring {len(paths)} model(s): accuracy, MACs, latency at batch "
                  f"{', '.join(map(str, opts.batches))}...")
    result = step.run(paths, opts, StepHooks())
    if plot is not None:
        plot_compare(result, plot)
    if not quiet:
        render(result)
        if plot is not None:
            err.print(f"plot: {plot}")
    if json:
        emit_json(result.to_dict())
    elif csv:
        sys.stdout.write(to_csv(result))
    step.check(result)  # a missed --fail-under floor: one red line, exit 1


def render(result) -> None:
    from rich.table import Table

    table = Table(title=f"compare ({result.device}, {result.threads} threads; ratios to the first row; "
                  "* on the accuracy/latency Pareto front)", title_justify="left")
    cols = ["artifact", "step", "test acc", "params", "MACs", "size", *[f"latency b{b}" for b in result.batches]]
    for c in cols:
        table.add_column(c, justify="left" if c in ("artifact", "step") else "right")
    for r in result.rows:
        q = r.ratios
        table.add_row(
            ("* " if r.pareto.get("latency") else "  ") + (r.artifact if r.accuracy is None else Path(r.artifact).name),
            r.step if r.runtime == "torch" else f"{r.step} ({r.runtime})",
            _accuracy(r), f"{r.params:,} ({q['params']:.2f}x)",
            f"{r.macs / 1e6:,.2f}M ({q['macs']:.2f}x)", f"{r.size_bytes / 1e6:.2f} MB ({q['size']:.2f}x)",
            *[f"{r.latency_ms[b]:.2f} ms ({q[f'speedup_b{b}']:.2f}x faster)" for b in result.batches])
    err.print(table)


def _accuracy(r) -> str:
    """Test accuracy and its ratio to the first row; "-" for a model without data."""
    if r.accuracy is None:
        return "-"
    ratio = r.ratios["accuracy"]
    return f"{100 * r.accuracy:.2f}%" + (f" ({ratio:.3f}x)" if ratio is not None else "")
