"""Library entry points for training and evaluation: plain functions returning dataclasses.

The CLI and recipes call these; they never print (progress goes to an Observer, notes to the
``dlkit`` logger) and raise DlkitError subclasses with an actionable message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from dlkit import artifacts, output
from dlkit.device import default_precision, native_bf16, prepare_inference, resolve_device
from dlkit.engine import distributed
from dlkit.engine.distributed import Context, LocalContext, env_world_size
from dlkit.engine.evaluate import EvalResult, evaluate_model
from dlkit.engine.history import CURVES, HistoryWriter, plot_confusion, plot_curves
from dlkit.engine.trainer import Observer, TrainConfig, TrainState, fit, resolve_train_config
from dlkit.errors import IncompatibleError, Interrupted, UsageError
from dlkit.spec import LM

if TYPE_CHECKING:
    from dlkit.data import DataBundle

log = logging.getLogger("dlkit")

LOG_FILE = "train.log"


@dataclass
class TrainRequest:
    model: str
    dataset: str
    overrides: dict[str, str] = field(default_factory=dict)  # model config (--set key=value)
    options: dict = field(default_factory=dict)  # TrainConfig fields the user gave explicitly
    data_dir: str | None = None
    val_fraction: float = 0.1
    # Dataset options (text: data_file, text_column, label_column, vocab_size, max_len).
    data_options: dict = field(default_factory=dict)
    out: Path | None = None
    resume: bool = False
    seed: int = 0
    device: str = "auto"

    def validate(self) -> "TrainRequest":
        """Check what can be checked without loading anything: names, options, split and device."""
        from dlkit.data import DATASETS, check_split_args
        from dlkit.device import check_device_name
        from dlkit.models import model_entry

        model_entry(self.model)
        DATASETS.get(self.dataset)  # unknown names fail before anything is loaded
        check_split_args(self.val_fraction, self.seed)
        check_device_name(self.device)
        self.train_config()
        return self

    def train_config(self) -> TrainConfig:
        """Global defaults, then the model's, then the dataset's, then the options given; without
        ``--precision``, the precision dlkit chooses for the model on this device."""
        cfg = resolve_train_config(self.model, self.options, self.dataset)
        if self.options.get("precision") is None:
            cfg = dataclasses.replace(cfg, precision=self.precision_choice()[0])
        return cfg

    def precision_choice(self) -> tuple[str, str]:
        """(precision, why) when ``--precision`` is not given (dlkit.device.default_precision)."""
        if self.options.get("precision") is not None:
            return self.options["precision"], "--precision given"
        name = artifacts.read_artifact(self.model).model_name if artifacts.is_artifact_folder(self.model) \
            else self.model  # training from an artifact: its model's choice
        return default_precision(name, resolve_device(self.device))


@dataclass
class TrainResult:
    artifact: Path
    manifest: dict
    config: TrainConfig
    history: list[dict]
    val: EvalResult | None
    test: EvalResult
    seconds: float
    device: str
    data_source: str
    distributed: dict | None = None  # world size, global/per-worker batch, backend, threads

    def to_dict(self) -> dict:
        return {
            "artifact": str(self.artifact),
            "model": self.manifest["model"],
            "dataset": self.manifest["data"]["dataset"],
            "train_config": dataclasses.asdict(self.config),
            "metrics": self.manifest["metrics"],
            "history": self.history,
            "test": self.test.to_dict(),
            "seconds": self.seconds,
            "device": self.device,
            "distributed": self.distributed,
        }


def default_out(model: str, dataset: str) -> Path:
    if artifacts.is_artifact_folder(model):  # training from an artifact: named after its folder
        model = Path(model).resolve().name
    return Path("runs") / f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resume_matches(extra: dict, request: TrainRequest, cfg: TrainConfig, work: Path) -> None:
    want = {"model": request.model, "dataset": request.dataset, "seed": request.seed,
            "train_config": dataclasses.asdict(cfg), "overrides": request.overrides,
            "data_options": request.data_options, "world_size": env_world_size()}
    absent = {"world_size": 1, "data_options": {}}
    diffs = [k for k, v in want.items() if extra.get(k, absent.get(k)) != v]
    if diffs:
        raise UsageError(f"the checkpoint in {work} was made with a different {', '.join(diffs)}",
                         hint="resume with the same command line, or remove the folder to start over")


def check_train_request(request: TrainRequest, world_size: int = 1) -> tuple[TrainConfig, Path]:
    """Fail early on what would fail later: names, options, the destination, the resume state."""
    from dlkit.engine.checkpoint import has_checkpoint

    cfg = _train_config(request, world_size)
    final = _destination(request)
    artifacts.check_destination(final, resumable=has_checkpoint, resume=request.resume)
    return cfg, final


def _train_config(request: TrainRequest, world_size: int) -> TrainConfig:
    cfg = request.validate().train_config()
    if cfg.strategy == "fsdp" and world_size < 2:
        raise distributed.fsdp_needs_workers()
    if cfg.batch_size < world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch: it must be at least the "
                         f"{world_size} workers", hint="raise --batch-size")
    return cfg


def _destination(request: TrainRequest) -> Path:
    return Path(request.out) if request.out else default_out(request.model, request.dataset)


def train_model(request: TrainRequest, *, observer: Observer | None = None,
                should_stop: Callable[[], bool] = lambda: False, download_progress=None) -> TrainResult | None:
    """Train ``request.model`` on ``request.dataset`` and save the result as an artifact.

    In a worker of a distributed run (torchrun, or ``dlkit train --nproc``; engine.distributed)
    this joins the process group and trains its shard; rank 0 writes the artifact and returns the
    result, the other ranks return None. The writer holds the destination's lock throughout
    (dlkit.output); its work folder holds a checkpoint from the start, so an interrupted or
    killed run can always be resumed.
    """
    request = dataclasses.replace(request, out=_destination(request))  # one default name, chosen once
    dist, device = distributed.setup(resolve_device(request.device))
    ctx = dist or LocalContext()
    try:
        with output.Destination(request.out) if ctx.is_main else contextlib.nullcontext():
            return _train_model(request, ctx, device, observer=observer, should_stop=should_stop,
                                download_progress=download_progress)
    finally:
        distributed.teardown(dist)


@dataclass
class _Job:
    """One training run under way: what the pieces of ``_train_model`` share."""

    request: TrainRequest
    cfg: TrainConfig
    ctx: Context
    device: torch.device
    final: Path
    data: DataBundle
    model: torch.nn.Module
    model_cfg: object
    origin: object = None  # dlkit.engine.lora.Origin: the starting weights and the LoRA adapters

    @property
    def work(self) -> Path:
        return artifacts.work_folder(self.final)

    def checkpoint_extra(self) -> dict:
        """What a checkpoint records, so that a resume with other settings is refused."""
        r = self.request
        return {"model": r.model, "dataset": r.dataset, "seed": r.seed, "train_config": dataclasses.asdict(self.cfg),
                "overrides": r.overrides, "data_options": r.data_options, "world_size": self.ctx.world_size}

    def fit(self, state: TrainState | None, opt_state: dict | None, **kw) -> tuple[TrainState, torch.optim.Optimizer]:
        from dlkit.data import DATASETS

        return fit(self.model, self.data.train, self.data.val, self.cfg, device=self.device, seed=self.request.seed,
                   augment=DATASETS.get(self.request.dataset).augment, state=state, optimizer_state=opt_state,
                   dist=self.ctx, seq_len=self.seq_len, **kw)

    @property
    def seq_len(self) -> int | None:
        """A language model's window (it trains on random windows of the text); None for classifiers."""
        return self.data.spec.input_shape[0] if self.data.spec.task == LM else None


def _train_model(request: TrainRequest, ctx: Context, device: torch.device, *, observer: Observer | None,
                 should_stop: Callable[[], bool], download_progress) -> TrainResult | None:
    from dlkit.engine import recompute
    from dlkit.engine.lora import Origin

    started = time.perf_counter()
    if ctx.is_main:  # rank 0 writes; the others checking too would race for the destination's lock
        cfg, final = check_train_request(request, ctx.world_size)
        _warn_emulated_bf16(cfg, device)
    else:
        cfg, final = _train_config(request, ctx.world_size), _destination(request)
    origin = Origin.of(request, cfg)  # random, hf: or an artifact's weights; checked before the data loads
    data = _load_data(request, ctx, download_progress, state=origin.data_state(request))
    torch.manual_seed(request.seed)
    model, model_cfg = origin.build(request, data.spec)
    _check_task(request.model, model, data)
    if cfg.lora_rank:
        origin.attach_lora(model, cfg)
    if blocks := recompute.enable(model, cfg.checkpointing):
        log.info("checkpointing: %d blocks recompute their activations in the backward pass", blocks)
    run = _Job(request, cfg, ctx, device, final, data, model, model_cfg, origin)
    state, opt_state = _resume(run) if request.resume else _begin(run)
    if not ctx.is_main:
        return _follow_main(run, state, opt_state, should_stop)
    try:
        return _train_and_save(run, state, opt_state, observer, should_stop, started)
    except BaseException as exc:
        from dlkit.engine.checkpoint import discard_untrained

        if not isinstance(exc, Interrupted):
            discard_untrained(run.work)  # failed before any step: nothing to resume, nothing to block
        raise


def _train_and_save(run: _Job, state: TrainState | None, opt_state: dict | None, observer: Observer | None,
                    should_stop: Callable[[], bool], started: float) -> TrainResult:
    from dlkit.engine.checkpoint import remove_checkpoint

    ctx, cfg, final = run.ctx, run.cfg, run.final
    ddp = _describe_distributed(ctx, cfg)
    with _log_to_file(run.work):
        _log_start(run, ddp)
        state = _train_main(run, state, opt_state, observer or Observer(), should_stop)
        if ddp:
            _finish_distributed(run, ddp)
        model = run.model
        val, test, metrics = _final_metrics(run, state)
        manifest = _manifest(run, metrics, ddp)
        if cfg.lora_rank and cfg.merge:  # the adapters go into the weights: an ordinary artifact
            from dlkit.engine.lora import merge

            merge(model)
        _plots(run, state, test)
        model.to("cpu").to(memory_format=torch.contiguous_format)
    landed = artifacts.write_artifact(final, model, manifest, work=run.work)
    remove_checkpoint(landed)  # only now: until the artifact is in place, the checkpoint can resume it
    return TrainResult(artifact=landed, manifest=manifest, config=cfg, history=state.history, val=val, test=test,
                       seconds=time.perf_counter() - started, device=str(run.device), data_source=run.data.source,
                       distributed=ddp)


def _begin(run: _Job) -> tuple[None, None]:
    """Rank 0 creates the work folder with a checkpoint of the untrained model in it (staged, then
    renamed: the folder never exists without one), so that a run killed at any moment resumes."""
    from dlkit.engine.checkpoint import save_checkpoint

    if run.ctx.is_main:
        output.create_work(run.final, lambda folder: save_checkpoint(folder, run.model, None, TrainState(),
                                                                     run.checkpoint_extra()))
    return None, None


def _check_task(name: str, model: torch.nn.Module, data: DataBundle) -> None:
    from dlkit.lm.generate import is_language_model

    if data.spec.task == LM and not is_language_model(model):
        raise IncompatibleError(f"model '{name}' is not a language model, which '{data.name}' data trains",
                                hint="use gpt-mini, gpt2 or an hf: causal language model")


def _warn_emulated_bf16(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.precision == "bf16" and not native_bf16(device):
        log.warning("warning: this %s has no native bf16 (no AVX512-BF16/AMX): bf16 is emulated and runs "
                    "several times slower than fp32 here", device.type.upper())


def _load_data(request: TrainRequest, ctx: Context, download_progress, state: dict | None = None) -> DataBundle:
    """Load the dataset; with several workers on a machine, local rank 0 loads (and downloads) first.
    ``state``: a data state to reuse (an artifact's tokenizer, when training starts from it)."""
    from dlkit.data import load_dataset

    if ctx.local_rank != 0:
        ctx.barrier()
    data = load_dataset(request.dataset, data_dir=request.data_dir, val_fraction=request.val_fraction,
                        seed=request.seed, state=state, progress=download_progress, options=_data_options(request))
    if ctx.local_rank == 0:
        ctx.barrier()
    return data


def _data_options(request: TrainRequest) -> dict:
    """The dataset's options; text for an hf: model is encoded with the model's own tokenizer."""
    from dlkit.data import DATASETS

    options = dict(request.data_options)
    if request.model.startswith("hf:") and "tokenizer" in (DATASETS.get(request.dataset).options or ()):
        if options.get("tokenizer") in (None, "hf"):
            options["tokenizer"] = request.model
    return options


def _resume(run: _Job) -> tuple[TrainState, dict]:
    from dlkit.engine.checkpoint import load_checkpoint

    state, opt_state, saved = load_checkpoint(run.work, run.model)
    _check_resume_matches(saved, run.request, run.cfg, run.work)
    log.info("resuming %s at epoch %d, step %d", run.work, state.epoch + 1, state.step)
    return state, opt_state


def _follow_main(run: _Job, state: TrainState | None, opt_state: dict | None,
                 should_stop: Callable[[], bool]) -> None:
    """A worker other than rank 0: train in step with it; rank 0 writes everything."""
    from dlkit.engine.checkpoint import take_part

    state, optimizer = run.fit(state, opt_state, should_stop=should_stop,
                               on_epoch_end=lambda st, opt: take_part(run.model, opt))
    if not state.completed:
        take_part(run.model, optimizer)  # rank 0 gathers a sharded model's checkpoint
        run.ctx.barrier()  # wait for rank 0's checkpoint
        raise Interrupted(f"stopped at epoch {state.epoch + 1}, step {state.step}")
    _finish_distributed(run, None)


def _finish_distributed(run: _Job, ddp: dict | None) -> None:
    """Every rank, after training (collectives): DDP's replicas must be equal, which is checked
    and recorded; FSDP's shards are measured, then gathered into one plain model on rank 0, which
    takes the place of the sharded one (``ddp``: rank 0's record, None on the others)."""
    from dlkit.engine import fsdp

    if not fsdp.is_sharded(run.model):
        digests = run.ctx.parameter_digests(run.model)
        if ddp is not None:
            ddp["parameter_sha256"] = digests
        return
    held: list = [None] * run.ctx.world_size
    torch.distributed.all_gather_object(held, fsdp.local_bytes(run.model))
    plain = fsdp.gather_model(run.model, run.ctx.rank)
    if ddp is not None:
        ddp["bytes_per_rank"] = held
        run.model = plain


@contextlib.contextmanager
def _log_to_file(work: Path) -> Iterator[None]:
    """Copy the ``dlkit`` log (debug level included) to LOG_FILE in the work folder meanwhile."""
    work.mkdir(parents=True, exist_ok=True)
    file_log = logging.FileHandler(work / LOG_FILE)
    file_log.setLevel(logging.DEBUG)
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_log)
    try:
        yield
    finally:
        log.removeHandler(file_log)
        file_log.close()


def _log_start(run: _Job, ddp: dict | None) -> None:
    r, cfg = run.request, run.cfg
    log.info("training %s on %s (from %s) on %s", r.model, r.dataset, run.data.source, run.device)
    log.debug("training config: %s; model config: %s", dataclasses.asdict(cfg), run.model_cfg)
    if r.options.get("precision") is None and cfg.precision != "fp32":
        log.info("%s", r.precision_choice()[1])
    if ddp:
        log.info("distributed: %d workers (%s), global batch %d = about %d per worker; lr %g is not scaled "
                 "(--batch-size is the global batch, the same as one process); %d threads per worker (%s)",
                 ddp["world_size"], ddp["backend"], cfg.batch_size, ddp["batch_per_worker"], cfg.lr,
                 ddp["threads"], ddp["threads_reason"])


class _Recorder(Observer):
    """Passes progress on to the caller's observer, and writes each epoch to the history."""

    def __init__(self, history: HistoryWriter, observer: Observer):
        self.history, self.observer = history, observer

    def on_start(self, **kw) -> None:
        self.observer.on_start(**kw)

    def on_step(self, **kw) -> None:
        self.observer.on_step(**kw)

    def on_epoch(self, record: dict) -> None:
        self.history.append(record)
        log.debug("epoch %d: %s", record["epoch"], record)
        self.observer.on_epoch(record)


def _train_main(run: _Job, state: TrainState | None, opt_state: dict | None, observer: Observer,
                should_stop: Callable[[], bool]) -> TrainState:
    """Rank 0's training: history, a checkpoint every epoch, and one when stopped (then Interrupted)."""
    from dlkit.engine.checkpoint import save_checkpoint

    extra = run.checkpoint_extra()

    def checkpoint(st: TrainState, optimizer) -> None:
        save_checkpoint(run.work, run.model, optimizer, st, extra)

    history = HistoryWriter(run.work, state.history if state else [])
    try:
        state, optimizer = run.fit(state, opt_state, observer=_Recorder(history, observer), should_stop=should_stop,
                                   on_epoch_end=checkpoint)
    finally:
        history.close()
    if not state.completed:
        checkpoint(state, optimizer)
        run.ctx.barrier()  # the other ranks wait for this checkpoint before they exit
        raise Interrupted(
            f"stopped at epoch {state.epoch + 1}, step {state.step}; a checkpoint is saved in {run.work}",
            hint=f"run the same command again with --resume (and --out {run.final})",
        )
    return state


def _class_names(data: DataBundle) -> list:
    return list(data.spec.class_names or range(data.spec.num_classes))


def _final_metrics(run: _Job, state: TrainState) -> tuple[EvalResult | None, EvalResult, dict]:
    """Evaluate the trained model on validation (if any) and test: (val, test, metrics)."""
    data, cfg = run.data, run.cfg
    if data.spec.task == LM:
        return _final_lm_metrics(run, state)
    channels_last = prepare_inference(run.model, run.device, data.spec.input_shape)
    kw = dict(class_names=_class_names(data), batch_size=cfg.eval_batch_size, device=run.device,
              precision=cfg.precision, channels_last=channels_last)
    val = evaluate_model(run.model, *data.val, split="val", **kw) if len(data.val[0]) else None
    test = evaluate_model(run.model, *data.test, split="test", **kw)
    metrics = {"test_accuracy": test.accuracy, "test_loss": test.loss, "test_macro_f1": test.macro_f1}
    if val is not None:
        metrics.update(val_accuracy=val.accuracy, val_loss=val.loss)
    metrics["train_seconds"] = sum(r["epoch_seconds"] for r in state.history)
    metrics["samples_per_s"] = state.history[-1]["samples_per_s"]
    return val, test, metrics


def _lm_results(model, data: DataBundle, splits: tuple[str, ...], *, batch_size: int, device, precision: str) -> dict:
    """LMResult per split (skipping empty ones), bits per the data's unit."""
    from dlkit.lm.evaluate import evaluate_lm

    out: dict = {}
    seen: dict = {}  # the test split is often the validation text itself: scored once
    for split in splits:
        x, y = getattr(data, split)
        if id(x) in seen:
            out[split] = dataclasses.replace(seen[id(x)], split=split)
        elif len(x):
            out[split] = seen[id(x)] = evaluate_lm(
                model, x, y, split=split, counts=data.state.get("splits", {}).get(split),
                unit=data.state.get("unit", "char"), batch_size=batch_size, device=device, precision=precision)
    return out


def _final_lm_metrics(run: _Job, state: TrainState):
    """A language model's loss, perplexity and bits per character (or byte) on validation and test."""
    run.model.to(run.device)
    res = _lm_results(run.model, run.data, ("val", "test"), batch_size=max(1, min(run.cfg.eval_batch_size, 256)),
                      device=run.device, precision=run.cfg.precision)
    val, test = res.get("val"), res["test"]
    metrics = {f"test_{k}": v for k, v in test.summary().items()}
    metrics["test_accuracy"] = test.accuracy
    if val is not None:
        metrics.update({f"val_{k}": v for k, v in val.summary().items()})
    metrics["train_seconds"] = sum(r["epoch_seconds"] for r in state.history)
    metrics["tokens_per_s"] = sum(r["samples_per_s"] * r["epoch_seconds"] for r in state.history) / max(
        metrics["train_seconds"], 1e-9)
    metrics["steps"] = state.step
    return val, test, metrics


def _manifest(run: _Job, metrics: dict, ddp: dict | None) -> dict:
    from dlkit.models import model_entry

    r, cfg = run.request, run.cfg
    name = run.origin.model_name if run.origin else r.model  # an artifact's model, when it was the start
    manifest = artifacts.new_manifest(
        model_name=name, family=model_entry(name).family, config=_config_dict(run.model_cfg),
        spec=run.data.spec, dataset=r.dataset, data_state=run.data.state, seed=r.seed, precision=cfg.precision)
    options = {"train_config": dataclasses.asdict(cfg), "overrides": r.overrides, "val_fraction": r.val_fraction,
               "device": str(run.device), "distributed": ddp, "data_options": r.data_options,
               "precision_reason": r.precision_choice()[1]}
    if run.origin:
        run.origin.record(manifest, options, merged=bool(cfg.lora_rank and cfg.merge))
    manifest["lineage"].append(artifacts.lineage_step("train", options, metrics))
    manifest["metrics"] = metrics
    return manifest


def _plots(run: _Job, state: TrainState, test: EvalResult) -> None:
    name = run.request.model
    plot_curves(state.history, run.work / CURVES, f"{name} on {run.request.dataset}")
    if run.data.spec.task == LM:
        return  # no classes, no confusion matrix
    plot_confusion(test.confusion, _class_names(run.data), run.work / "confusion.png", f"{name}: test confusion")


def _describe_distributed(ctx: Context, cfg: TrainConfig) -> dict | None:
    """The run's distributed settings for the result and the manifest; None for one process."""
    if ctx.world_size == 1:
        return None
    return {"world_size": ctx.world_size, "strategy": cfg.strategy, "backend": ctx.backend,
            "global_batch": cfg.batch_size, "batch_per_worker": -(-cfg.batch_size // ctx.world_size), "lr_scale": 1.0,
            "threads": ctx.threads, "threads_reason": ctx.threads_reason}


def _config_dict(cfg) -> dict:
    from dlkit.config import to_dict

    return to_dict(cfg)


@dataclass
class EvaluateResult:
    artifact: Path
    model: str
    dataset: str
    result: EvalResult
    device: str
    plot: Path | None = None

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), "model": self.model, "dataset": self.dataset,
                "device": self.device, **self.result.to_dict(), "plot": str(self.plot) if self.plot else None}


@dataclass
class EvaluateOptions:
    dataset: str | None = None  # another dataset of the same shape; None: the artifact's own
    split: str = "test"
    data_dir: str | None = None
    data_file: str | None = None  # text artifacts: every row of this file (same columns)
    device: str = "auto"
    batch_size: int = 1024
    plot: Path | None = None  # the confusion matrix as a PNG

    def validate(self) -> "EvaluateOptions":
        from dlkit.choices import SPLITS

        if self.split not in SPLITS:
            raise UsageError(f"unknown split '{self.split}'", hint=f"use {', '.join(SPLITS)}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        return self


def evaluate_artifact(path: Path | str, opts: EvaluateOptions | None = None, *,
                      download_progress=None) -> EvaluateResult:
    """Evaluate an artifact on a split of its own dataset (or another dataset of the same shape).

    Text artifacts always encode with their saved vocabulary; ``opts.data_file`` evaluates a text
    artifact on every row of another file with the same columns."""
    opts = (opts or EvaluateOptions()).validate()
    art = artifacts.read_artifact(path)
    if art.spec.task == LM:
        return _evaluate_lm(art, opts, download_progress)
    name = opts.dataset or ("text-csv" if opts.data_file else None)
    dev = resolve_device(opts.device)
    if any(t.get("cpu_only") for t in art.manifest["model"].get("transforms", [])):
        dev = torch.device("cpu")  # int8 kernels exist for the CPU only (dlkit quantize)
    model = artifacts.load_model(art)
    data = artifacts.load_data(art, why="evaluation", dataset=name, data_dir=opts.data_dir,
                               options={"data_file": opts.data_file} if opts.data_file else None,
                               progress=download_progress)
    name = data.name
    if data.spec != art.spec:
        raise UsageError(f"dataset '{name}' ({data.spec.describe()}) does not fit {art.path} "
                         f"({art.spec.describe()})", hint="evaluate on data of the same shape and classes")
    channels_last = prepare_inference(model, dev, data.spec.input_shape)
    x, y = getattr(data, opts.split)
    if len(x) == 0:
        raise UsageError(f"the {opts.split} split of '{name}' is empty", hint="choose another --split")
    names = list(data.spec.class_names or range(data.spec.num_classes))
    result = evaluate_model(model, x, y, class_names=names, split=opts.split, batch_size=opts.batch_size,
                            device=dev, precision=art.precision, channels_last=channels_last)
    if opts.plot is not None:
        plot_confusion(result.confusion, names, opts.plot, f"{art.model_name} on {name} ({opts.split})")
    return EvaluateResult(art.path, art.model_name, name, result, str(dev), opts.plot)


def _evaluate_lm(art: artifacts.Artifact, opts: EvaluateOptions, download_progress) -> EvaluateResult:
    """A language model: loss, perplexity and bits per character (byte) on its validation or test
    text, or on all of ``opts.data_file`` encoded with its own tokenizer."""
    from dlkit.data.textlm import text_as_test

    if opts.plot is not None:
        raise UsageError("--plot draws a confusion matrix, which a language model has not",
                         hint="drop --plot")
    dev = resolve_device(opts.device)
    if any(t.get("cpu_only") for t in art.manifest["model"].get("transforms", [])):
        dev = torch.device("cpu")
    model = artifacts.load_model(art)
    if opts.data_file:
        data = text_as_test(opts.data_file, art.manifest["data"].get("state") or {})
    else:
        data = artifacts.load_data(art, why="evaluation", dataset=opts.dataset, data_dir=opts.data_dir,
                                   progress=download_progress)
    if data.spec.vocab_size != art.spec.vocab_size:
        raise UsageError(f"'{data.name}' is tokenized into {data.spec.vocab_size} ids, {art.path} predicts "
                         f"{art.spec.vocab_size}", hint="evaluate on text the artifact's tokenizer encodes")
    if opts.split == "train":
        raise UsageError("a language model's training split is one stream of text, not windows to evaluate",
                         hint="use --split val or test")
    model.to(dev)
    res = _lm_results(model, data, (opts.split,), batch_size=opts.batch_size, device=dev, precision=art.precision)
    if opts.split not in res:
        raise UsageError(f"the {opts.split} split of '{data.name}' is empty", hint="choose another --split")
    return EvaluateResult(art.path, art.model_name, data.name, res[opts.split], str(dev))


def list_models(pattern: str = "*") -> list[dict]:
    """Every registered model: what its name stands for (``native_dataset``: the shape and head it
    has with no dataset, and ``params`` there) and how it adapts (``default_dataset``: what ``dlkit
    train`` uses without --dataset, and ``default_params`` on it). Built on meta: no memory."""
    from dlkit.data import DATASETS, spec_for
    from dlkit.errors import DlkitError
    from dlkit.models import MODELS
    from dlkit.models.registry import create_model

    def count(name: str, dataset: str) -> tuple[int | None, str | None]:
        try:
            with torch.device("meta"):
                model, _ = create_model(name, spec_for(dataset))
        except DlkitError as exc:
            return None, exc.message
        return sum(p.numel() for p in model.parameters()), None  # tied weights counted once

    rows = []
    for name in MODELS.names(pattern):
        entry = MODELS.get(name)
        native = spec_for(entry.native_dataset)
        shape = "x".join(map(str, native.input_shape))
        describe = native.describe() if native.num_classes else \
            f"{native.modality} {shape} tokens, vocab {native.vocab_size}, its features (no classifier)"
        params, error = count(name, entry.native_dataset)
        trained, train_error = (params, error) if entry.default_dataset == entry.native_dataset \
            else count(name, entry.default_dataset)
        rows.append({"name": name, "family": entry.family, "modalities": list(entry.modalities),
                     "description": entry.description, "native_dataset": entry.native_dataset,
                     "native": {**native.to_dict(), "describe": describe}, "params": params, "error": error,
                     "default_dataset": entry.default_dataset, "trainable_default": entry.default_dataset in DATASETS,
                     "default_params": trained, "default_error": train_error, "train_defaults": entry.train_defaults})
    return rows


def list_datasets(data_dir: Path | None = None) -> list[dict]:
    from dlkit.data import DATASETS

    rows = []
    for name, entry in DATASETS.items():
        rows.append({**entry.spec.to_dict(), "name": name, "description": entry.description,
                     "found": entry.locate(data_dir)})
    return rows
