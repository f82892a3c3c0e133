"""The commands that make or measure models, as one table the CLI and recipes both use.

Each step is an options builder plus a library function. The builder's keyword parameters are the
command's options, named as on the command line (``batch_size`` is ``--batch-size``, ``global_``
is ``--global``, ``set_`` is ``--set``), with their types and defaults; it turns them into the
options object the library function takes. ``dlkit train`` and the other Typer modules call the
builder with their parameters; a recipe step's keys are checked against the same signature.

    source, opts = STEPS["prune"].build(Path("runs/base"), ratio=0.5)
    result = STEPS["prune"].run(source, opts, StepHooks())  # a PruneResult; result.to_dict() for JSON

Adding a command: an options dataclass and a function in the library; a builder and an entry
here; a Typer module whose parameters match the builder (tests/test_steps.py checks that), added
to the app and to ``dlkit run``'s REPORTS. Recipes take the new step with no change.
Nothing here imports torch until a step is built or run.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from dlkit.choices import DEVICES, IMPORTANCES, OPTIMIZERS, PRECISIONS, PROFILE_OPTIMIZERS, QUANT_BACKENDS, \
    QUANT_MODES, SCHEDULES, SPLITS
from dlkit.choices import INPUT_DTYPES
from dlkit.choices import EXPORT_FORMATS, ONNX_QUANT_MODES, PREDICT_RUNTIMES
from dlkit.choices import EXPLAIN_BASELINES, EXPLAIN_METHODS
from dlkit.choices import TRAIN_CHECKPOINTING, TRAIN_STRATEGIES
from dlkit.errors import DlkitError, UsageError


class FloorNotMet(DlkitError):
    """``compare --fail-under``: some artifacts scored below a floor; ``failures`` says which."""

    def __init__(self, failures: list[str], hint: str = "see the table above"):
        self.failures = failures
        super().__init__(f"{len(failures)} artifact(s) below the floor: " + "; ".join(failures), hint=hint)


@dataclass
class StepHooks:
    """What a caller may watch or steer while a step runs; the CLI passes progress bars here."""

    observer: Any = None  # a dlkit.engine.trainer.Observer for training and fine-tuning
    should_stop: Callable[[], bool] = lambda: False  # polled between batches (training)
    download_progress: Any = None  # (done_bytes, total_bytes_or_None, file_name) -> None


@dataclass(frozen=True)
class StepSpec:
    """One command: how its options are built, what runs it, what it takes and what it makes."""

    build: Callable[..., tuple[Any, Any]]  # (source, **options) -> (source, options object)
    run: Callable[[Any, Any, StepHooks], Any]  # (source, options, hooks) -> result with to_dict()
    makes_artifact: bool  # the result is an artifact folder (else a JSON report)
    takes_input: Literal["one", "many"] | None  # an artifact (or other target), several, or none
    input_key: str | None = None  # the option naming the input outright: artifact, target, artifacts
    interruptible: bool = False  # Ctrl-C asks it to stop at a batch boundary and keep a checkpoint
    check: Callable[[Any], None] | None = None  # raises when the result fails the step (compare floors)
    writes_folder: bool = False  # it also writes a folder of its own (explain, export): the runner places it

    def options(self) -> dict[str, inspect.Parameter]:
        """The builder's options by name (python spelling: ``batch_size``, ``global_``)."""
        params = inspect.signature(self.build).parameters
        return {name: p for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def types(self) -> dict[str, Any]:
        """Each option's annotation, evaluated (``Optional[int]``, ``Literal[...]``, ...)."""
        hints = typing.get_type_hints(self.build)
        return {name: hints[name] for name in self.options()}


def option_key(name: str) -> str:
    """The command-line (and recipe) spelling of a builder parameter: ``global_`` -> ``global``."""
    return name.rstrip("_").replace("_", "-")


def _path_str(path: Optional[Path]) -> Optional[str]:
    return str(path) if path else None


# ----------------------------------------------------------------------------------------------
# Builders: the options of each command, as on the command line


def train_request(source: None, *, model: str, dataset: Optional[str] = None, data_dir: Optional[Path] = None,
                  val_fraction: float = 0.1, data_file: Optional[Path] = None, text_column: Optional[str] = None,
                  label_column: Optional[str] = None, vocab_size: Optional[int] = None,
                  max_len: Optional[int] = None, set_: Optional[list[str]] = None, epochs: Optional[int] = None,
                  batch_size: Optional[int] = None, optimizer: Optional[Literal[OPTIMIZERS]] = None,
                  lr: Optional[float] = None, weight_decay: Optional[float] = None,
                  momentum: Optional[float] = None, schedule: Optional[Literal[SCHEDULES]] = None,
                  warmup: Optional[float] = None, grad_clip: Optional[float] = None,
                  label_smoothing: Optional[float] = None, precision: Optional[Literal[PRECISIONS]] = None,
                  augment: Optional[bool] = None, out: Optional[Path] = None, resume: bool = False,
                  device: Literal[DEVICES] = "auto", seed: int = 0, test_file: Optional[Path] = None,
                  tokenizer: Optional[str] = None, seq_len: Optional[int] = None, max_steps: Optional[int] = None,
                  eval_every: Optional[int] = None, eval_batches: Optional[int] = None,
                  strategy: Optional[Literal[TRAIN_STRATEGIES]] = None,
                  checkpointing: Optional[Literal[TRAIN_CHECKPOINTING]] = None,
                  lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                  lora_targets: Optional[str] = None, merge: Optional[bool] = None):
    """``dlkit train``'s options -> (None, TrainRequest). Train takes no input."""
    from dlkit.api import TrainRequest
    from dlkit.config import parse_assignments

    options = dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                   momentum=momentum, schedule=schedule, warmup=warmup, grad_clip=grad_clip,
                   label_smoothing=label_smoothing, precision=precision, augment=augment, max_steps=max_steps,
                   eval_every=eval_every, eval_batches=eval_batches, strategy=strategy,
                   checkpointing=checkpointing, lora_rank=lora_rank, lora_alpha=lora_alpha,
                   lora_targets=lora_targets, merge=merge)
    if tokenizer == "hf" and model.startswith("hf:"):
        tokenizer = model  # the hf: model's own tokenizer
    data_options = {k: v for k, v in dict(
        data_file=str(data_file.expanduser().resolve()) if data_file else None, text_column=text_column,
        label_column=label_column, vocab_size=vocab_size, max_len=max_len,
        test_file=str(test_file.expanduser().resolve()) if test_file else None, tokenizer=tokenizer,
        seq_len=seq_len).items() if v is not None}
    request = TrainRequest(model=model, dataset=_train_dataset(model, dataset, data_file),
                           overrides=parse_assignments(set_), options=options, data_dir=_path_str(data_dir),
                           val_fraction=val_fraction, out=out, resume=resume, seed=seed, device=device,
                           data_options=data_options)
    return None, request


TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson")


def _train_dataset(model: str, dataset: str | None, data_file: Path | None) -> str:
    """The dataset to train on: --data-file means text-csv for a table (.csv, .tsv, .jsonl) and
    text-lm for text (a .txt file or a folder); none given means the model's own."""
    if data_file is not None:
        implied = "text-csv" if data_file.suffix.lower() in TABLE_SUFFIXES else "text-lm"
        if dataset not in (None, "text-csv", "text-lm"):
            raise UsageError(f"--data-file is for datasets text-csv and text-lm, not '{dataset}'",
                             hint="drop --dataset, or drop --data-file")
        return dataset or implied
    if dataset is not None:
        return dataset
    from dlkit.data import DATASETS
    from dlkit.models import model_entry

    dataset = model_entry(model).default_dataset
    if dataset not in DATASETS:
        raise UsageError(f"model '{model}' has no trainable default dataset", hint="pass --dataset")
    return dataset


def evaluate_options(source: Path | str, *, dataset: Optional[str] = None, split: Literal[SPLITS] = "test",
                     data_dir: Optional[Path] = None, data_file: Optional[Path] = None, batch_size: int = 1024,
                     plot: Optional[Path] = None, device: Literal[DEVICES] = "auto"):
    """``dlkit evaluate``'s options -> (artifact, EvaluateOptions)."""
    from dlkit.api import EvaluateOptions

    return source, EvaluateOptions(dataset=dataset, split=split, data_dir=_path_str(data_dir),
                                   data_file=str(data_file.expanduser().resolve()) if data_file else None,
                                   device=device, batch_size=batch_size, plot=plot)


def profile_options(source: Optional[str], *, dataset: Optional[str] = None, input_shape: Optional[str] = None,
                    seq_len: Optional[int] = None, batch_size: Optional[int] = None, preset: Optional[str] = None,
                    set_: Optional[list[str]] = None, depth: int = 2, training: bool = False,
                    optimizer: Literal[PROFILE_OPTIMIZERS] = "adamw",
                    precision: Optional[Literal[PRECISIONS]] = None, latency: bool = True,
                    measure: Optional[bool] = None, device: Literal[DEVICES] = "auto",
                    runtime: Literal[PREDICT_RUNTIMES] = "torch", input_dtype: Optional[Literal[INPUT_DTYPES]] = None,
                    vocab_size: Optional[int] = None):
    """``dlkit profile``'s options -> (target, ProfileOptions); ``preset`` is another way to name the target."""
    from dlkit.config import parse_assignments
    from dlkit.profiling import ProfileOptions

    if preset and source and preset != str(source):
        raise UsageError(f"TARGET {source!r} and --preset {preset!r} disagree", hint="give one of them")
    target = source or preset
    if not target:
        raise UsageError("nothing to profile", hint="give a registry name, an artifact or file.py:ClassName")
    return target, ProfileOptions(dataset=dataset, input_shape=input_shape, seq_len=seq_len, batch_size=batch_size,
                                  depth=depth, training=training, optimizer=optimizer, precision=precision,
                                  latency=latency, measure=measure, device=device,
                                  overrides=parse_assignments(set_) or None, runtime=runtime,
                                  input_dtype=input_dtype, vocab_size=vocab_size)


def prune_options(source: Path | str, *, ratio: Optional[float] = None, target_macs: Optional[float] = None,
                  target_params: Optional[float] = None, importance: Literal[IMPORTANCES] = "l2",
                  global_: bool = False, iterative_steps: int = 1, finetune_epochs: int = 0,
                  finetune_lr: Optional[float] = None, protect: Optional[list[str]] = None,
                  unstructured: bool = False, sensitivity: bool = False, from_sensitivity: bool = False,
                  plot: Optional[Path] = None, data_dir: Optional[Path] = None, out: Optional[Path] = None,
                  device: Literal[DEVICES] = "auto", seed: int = 0):
    """``dlkit prune``'s options -> (artifact, PruneOptions), validated: bad ones fail before any loading."""
    from dlkit.compress.prune import PruneOptions

    opts = PruneOptions(ratio=ratio, target_macs=target_macs, target_params=target_params, importance=importance,
                        global_pruning=global_, iterative_steps=iterative_steps, finetune_epochs=finetune_epochs,
                        finetune_lr=finetune_lr, protect=tuple(protect or ()), unstructured=unstructured,
                        sensitivity=sensitivity, from_sensitivity=from_sensitivity, plot=plot, out=out,
                        data_dir=_path_str(data_dir), device=device, seed=seed)
    return source, opts.validate()


def quantize_options(source: Path | str, *, mode: Literal[QUANT_MODES] = "dynamic", calib_batches: int = 8,
                     epochs: int = 1, lr: Optional[float] = None, backend: Literal[QUANT_BACKENDS] = "x86",
                     data_dir: Optional[Path] = None, repeats: int = 10, eval_samples: Optional[int] = None,
                     out: Optional[Path] = None, seed: int = 0, onnxruntime: bool = True):
    """``dlkit quantize``'s options -> (artifact, QuantizeOptions); ONNX Runtime int8 is timed for the
    recommendation unless ``onnxruntime`` is off (the library's own default is off: quick calls)."""
    from dlkit.compress.quantize import QuantizeOptions

    return source, QuantizeOptions(mode=mode, backend=backend, calib_batches=calib_batches, epochs=epochs, lr=lr,
                                   out=out, data_dir=_path_str(data_dir), repeats=repeats,
                                   eval_samples=eval_samples, seed=seed, onnxruntime=onnxruntime)


def compare_options(source: list[Path | str], *, fail_under: Optional[list[str]] = None, batch_size: int = 256,
                    rounds: int = 10, data_dir: Optional[Path] = None, device: Literal[DEVICES] = "cpu",
                    input_shape: Optional[str] = None, input_dtype: Optional[Literal[INPUT_DTYPES]] = None,
                    vocab_size: Optional[int] = None, set_: Optional[list[str]] = None):
    """``dlkit compare``'s options -> (artifacts or models, CompareOptions); batch 1 is always timed.
    ``input_shape``, ``input_dtype``, ``vocab_size`` and ``set_`` are for models that are not artifacts.

    ``--plot`` and ``--csv`` are renderings the CLI makes of the result (``dlkit.compare``)."""
    from dlkit.compare import CompareOptions, parse_floors
    from dlkit.config import parse_assignments

    if not source:
        raise UsageError("no artifacts to compare", hint="pass folders, or pipe paths into -")
    return [Path(p) for p in source], CompareOptions(batches=tuple(sorted({1, batch_size})), rounds=rounds,
                                                     floors=parse_floors(fail_under), data_dir=_path_str(data_dir),
                                                     device=device, input_shape=input_shape, input_dtype=input_dtype,
                                                     vocab_size=vocab_size, overrides=parse_assignments(set_) or None)


def explain_options(source: Path | str, *, method: Literal[EXPLAIN_METHODS] = "ig", samples: int = 8,
                    index: Optional[str] = None, inputs: Optional[list[str]] = None, target: str = "pred",
                    baseline: Optional[Literal[EXPLAIN_BASELINES]] = None, steps: int = 50, perturbations: int = 200,
                    patch: Optional[int] = None, top_k: int = 5, metrics: Optional[str] = None,
                    data_dir: Optional[Path] = None, out: Optional[Path] = None, device: Literal[DEVICES] = "auto",
                    seed: int = 0):
    """``dlkit explain``'s options -> (artifact, ExplainOptions), validated: bad ones fail before any loading."""
    from dlkit.explain import ExplainOptions, parse_index, parse_metrics

    return source, ExplainOptions(method=method, samples=samples, index=parse_index(index),
                                  inputs=None if inputs is None else tuple(inputs), target=target,
                                  baseline=baseline, steps=steps, perturbations=perturbations, patch=patch,
                                  top_k=top_k, metrics=parse_metrics(metrics), out=out, data_dir=_path_str(data_dir),
                                  device=device, seed=seed).validate()


# ----------------------------------------------------------------------------------------------
# Library functions, called the same way


def _train(source, request, hooks: StepHooks):
    from dlkit.api import train_model

    return train_model(request, observer=hooks.observer, should_stop=hooks.should_stop,
                       download_progress=hooks.download_progress)


def _evaluate(source, opts, hooks: StepHooks):
    from dlkit.api import evaluate_artifact

    return evaluate_artifact(source, opts, download_progress=hooks.download_progress)


def _profile(source, opts, hooks: StepHooks):
    from dlkit.profiling import profile_target

    return profile_target(str(source), opts)


def _prune(source, opts, hooks: StepHooks):
    from dlkit.compress.prune import prune_artifact

    return prune_artifact(source, opts, observer=hooks.observer, download_progress=hooks.download_progress)


def _quantize(source, opts, hooks: StepHooks):
    from dlkit.compress.quantize import quantize_artifact

    return quantize_artifact(source, opts)


def _compare(source, opts, hooks: StepHooks):
    from dlkit.compare import compare_artifacts

    return compare_artifacts(source, opts)


def _explain(source, opts, hooks: StepHooks):
    from dlkit.explain import explain_artifact

    return explain_artifact(source, opts)


def check_floors(result) -> None:
    """Raise FloorNotMet when a compared artifact missed a ``--fail-under`` floor."""
    if result.failures:
        raise FloorNotMet(list(result.failures))


def export_options(source: Path | str, *, format: Literal[EXPORT_FORMATS] = "onnx", opset: Optional[int] = None,
                   quantize: Optional[Literal[ONNX_QUANT_MODES]] = None, calib_samples: int = 512,
                   samples: int = 32, data_dir: Optional[Path] = None, out: Optional[Path] = None):
    """``dlkit export``'s options -> (artifact, ExportOptions), validated."""
    from dlkit.export import ExportOptions

    return source, ExportOptions(format=format, opset=opset, quantize=quantize, calib_samples=calib_samples,
                                 samples=samples, data_dir=_path_str(data_dir), out=out).validate()


def predict_options(source: Path | str, *, inputs: list[str], top_k: int = 3, batch_size: int = 64,
                    runtime: Optional[Literal[PREDICT_RUNTIMES]] = None, strict: bool = False):
    """``dlkit predict``'s options -> ((target, inputs), PredictOptions), validated."""
    from dlkit.predict import PredictOptions

    if not inputs:
        raise UsageError("no inputs to predict", hint="pass image, .npy/.npz or text files, folders, or - for stdin")
    opts = PredictOptions(top_k=top_k, batch_size=batch_size, runtime=runtime, strict=strict).validate()
    return (source, list(inputs)), opts


def generate_options(source: Path | str, *, prompt_from: Optional[str] = None, prompt: Optional[str] = None,
                     prompt_file: Optional[Path] = None, max_new_tokens: int = 256, temperature: float = 1.0,
                     top_k: Optional[int] = None, top_p: float = 1.0, num_samples: int = 1, kv_cache: bool = True,
                     device: Literal[DEVICES] = "auto", seed: int = 0):
    """``dlkit generate``'s options -> (artifact, GenerateOptions), validated; ``prompt_from`` ``-``
    reads the prompt from stdin (UTF-8)."""
    import sys

    from dlkit.lm.generate import GenerateOptions

    if prompt_from is not None:
        if prompt_from != "-":
            raise UsageError(f"unexpected argument {prompt_from!r}", hint="give the prompt with --prompt, "
                             "--prompt-file, or - to read it from stdin")
        if prompt is not None or prompt_file is not None:
            raise UsageError("give one prompt: --prompt, --prompt-file or - (stdin)")
        from dlkit.data.text import decode_utf8

        prompt = decode_utf8(sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode(),
                             Path("<stdin>"))
    return source, GenerateOptions(prompt=prompt, prompt_file=_path_str(prompt_file), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                   num_samples=num_samples, kv_cache=kv_cache, device=device).validate()


def _generate(source, opts, hooks: StepHooks):
    """``hooks.observer``, when it is callable, receives the text as it is produced (the CLI streams it)."""
    from dlkit.lm.generate import generate_artifact

    return generate_artifact(source, opts, write=hooks.observer if callable(hooks.observer) else None)


def _export(source, opts, hooks: StepHooks):
    from dlkit.export import export_artifact

    return export_artifact(source, opts)


def _predict(source, opts, hooks: StepHooks):
    """``hooks.observer`` may watch predictions (on_prediction, on_failure: see dlkit.predict)."""
    from dlkit.predict import predict_inputs

    target, inputs = source
    return predict_inputs(target, inputs, opts, observer=hooks.observer)


def _check_inputs(result) -> None:
    from dlkit.predict import check_failures

    check_failures(result)


STEPS: dict[str, StepSpec] = {
    "train": StepSpec(train_request, _train, makes_artifact=True, takes_input=None, interruptible=True),
    "evaluate": StepSpec(evaluate_options, _evaluate, makes_artifact=False, takes_input="one",
                         input_key="artifact"),
    "profile": StepSpec(profile_options, _profile, makes_artifact=False, takes_input="one", input_key="target"),
    "prune": StepSpec(prune_options, _prune, makes_artifact=True, takes_input="one", input_key="artifact"),
    "quantize": StepSpec(quantize_options, _quantize, makes_artifact=True, takes_input="one",
                         input_key="artifact"),
    "compare": StepSpec(compare_options, _compare, makes_artifact=False, takes_input="many",
                        input_key="artifacts", check=check_floors),
    # explain and export write a folder that is not an artifact (a recipe keeps it as RUN/ID, its
    # report beside it as RUN/ID.json); predict takes an export folder as its target.
    "explain": StepSpec(explain_options, _explain, makes_artifact=False, takes_input="one", input_key="artifact",
                        writes_folder=True),
    "export": StepSpec(export_options, _export, makes_artifact=False, takes_input="one", input_key="artifact",
                       writes_folder=True),
    "predict": StepSpec(predict_options, _predict, makes_artifact=False, takes_input="one", input_key="target",
                        check=_check_inputs),
    "generate": StepSpec(generate_options, _generate, makes_artifact=False, takes_input="one", input_key="artifact"),
}

from dlkit.plan.step import plan_options, run_plan  # noqa: E402 (torch-free)

STEPS["plan"] = StepSpec(plan_options, run_plan, makes_artifact=False, takes_input="one", input_key="target")
