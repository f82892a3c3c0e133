"""Library entry points for training and evaluation: plain functions returning dataclasses.

The CLI and recipes call these; they never print (progress goes to an Observer, notes to the
``dlkit`` logger) and raise DlkitError subclasses with an actionable message.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dlkit import artifacts
from dlkit.config import apply_overrides
from dlkit.device import native_bf16, prepare_inference, resolve_device
from dlkit.engine import distributed
from dlkit.engine.distributed import env_world_size
from dlkit.engine.evaluate import EvalResult, evaluate_model
from dlkit.engine.history import CURVES, HistoryWriter, plot_confusion, plot_curves
from dlkit.engine.trainer import Observer, TrainConfig, TrainState, fit, resolve_train_config
from dlkit.errors import Interrupted, UsageError

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
    from dlkit.data import DATASETS
    from dlkit.engine.checkpoint import has_checkpoint
    from dlkit.models import MODELS

    MODELS.get(request.model)
    DATASETS.get(request.dataset)  # unknown names fail before anything is loaded
    cfg = resolve_train_config(request.model, request.options, request.dataset)
    if cfg.batch_size < world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch: it must be at least the "
                         f"{world_size} workers", hint="raise --batch-size")
    final = Path(request.out) if request.out else default_out(request.model, request.dataset)
    artifacts.check_destination(final)
    work = artifacts.work_folder(final)
    if request.resume and not has_checkpoint(work):
        raise UsageError(f"nothing to resume: no checkpoint in {work}",
                         hint="drop --resume to start a new run, or pass the --out of the interrupted run")
    if not request.resume and work.exists():
        raise UsageError(f"an unfinished run is in {work}",
                         hint="add --resume to continue it, or remove that folder to start over")
    return cfg, final


def train_model(request: TrainRequest, *, observer: Observer | None = None,
                should_stop: Callable[[], bool] = lambda: False, download_progress=None) -> TrainResult | None:
    """Train ``request.model`` on ``request.dataset`` and save the result as an artifact.

    In a worker of a distributed run (torchrun, or ``dlkit train --nproc``; engine.distributed)
    this joins the process group and trains its shard; rank 0 writes the artifact and returns the
    result, the other ranks return None.
    """
    dist, device = distributed.setup(resolve_device(request.device))
    try:
        return _train_model(request, dist, device, observer=observer, should_stop=should_stop,
                            download_progress=download_progress)
    finally:
        distributed.teardown(dist)


def _train_model(request: TrainRequest, dist: distributed.DistContext | None, device: torch.device, *,
                 observer: Observer | None, should_stop: Callable[[], bool], download_progress) -> TrainResult | None:
    from dlkit.data import DATASETS, load_dataset
    from dlkit.engine.checkpoint import load_checkpoint, save_checkpoint
    from dlkit.models import MODELS, create_model

    started = time.perf_counter()
    entry = MODELS.get(request.model)
    cfg, final = check_train_request(request, dist.world_size if dist else 1)
    work = artifacts.work_folder(final)
    if cfg.precision == "bf16" and not native_bf16(device) and (dist is None or dist.rank == 0):
        log.warning("warning: this %s has no native bf16 (no AVX512-BF16/AMX): bf16 is emulated and runs "
                    "several times slower than fp32 here", device.type.upper())

    if dist is not None and dist.local_rank != 0:
        dist.barrier()  # local rank 0 loads (and downloads) first
    data = load_dataset(request.dataset, data_dir=request.data_dir, val_fraction=request.val_fraction,
                        seed=request.seed, progress=download_progress, options=request.data_options)
    if dist is not None and dist.local_rank == 0:
        dist.barrier()
    torch.manual_seed(request.seed)
    model, model_cfg = create_model(request.model, data.spec, request.overrides)
    extra = {"model": request.model, "dataset": request.dataset, "seed": request.seed,
             "train_config": dataclasses.asdict(cfg), "overrides": request.overrides,
             "data_options": request.data_options, "world_size": dist.world_size if dist else 1}
    state, opt_state = None, None
    if request.resume:
        state, opt_state, saved = load_checkpoint(work, model)
        _check_resume_matches(saved, request, cfg, work)
        log.info("resuming %s at epoch %d, step %d", work, state.epoch + 1, state.step)
    ddp = _describe_distributed(dist, cfg)
    if dist is not None and not dist.is_main:  # train in step with rank 0; it writes everything
        state, _ = fit(model, data.train, data.val, cfg, device=device, seed=request.seed,
                       augment=DATASETS.get(request.dataset).augment, state=state, optimizer_state=opt_state,
                       should_stop=should_stop, dist=dist)
        if not state.completed:
            dist.barrier()  # wait for rank 0's checkpoint
            raise Interrupted(f"stopped at epoch {state.epoch + 1}, step {state.step}")
        dist.parameter_digests(model)
        return None
    work.mkdir(parents=True, exist_ok=True)
    file_log = logging.FileHandler(work / LOG_FILE)
    file_log.setLevel(logging.DEBUG)
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_log)
    try:
        log.info("training %s on %s (from %s) on %s", request.model, request.dataset, data.source, device)
        log.debug("training config: %s; model config: %s", dataclasses.asdict(cfg), model_cfg)
        if ddp:
            log.info("distributed: %d workers (%s), global batch %d = about %d per worker; lr %g is not scaled "
                     "(--batch-size is the global batch, the same as one process); %d threads per worker (%s)",
                     ddp["world_size"], ddp["backend"], cfg.batch_size, ddp["batch_per_worker"], cfg.lr,
                     ddp["threads"], ddp["threads_reason"])
        history = HistoryWriter(work, state.history if state else [])
        user_observer = observer or Observer()

        class _Record(Observer):
            def on_start(self, **kw):
                user_observer.on_start(**kw)

            def on_step(self, **kw):
                user_observer.on_step(**kw)

            def on_epoch(self, record):
                history.append(record)
                log.debug("epoch %d: %s", record["epoch"], record)
                user_observer.on_epoch(record)

        def checkpoint(st: TrainState, optimizer) -> None:
            save_checkpoint(work, model, optimizer, st, extra)

        try:
            state, optimizer = fit(model, data.train, data.val, cfg, device=device, seed=request.seed,
                                   augment=DATASETS.get(request.dataset).augment, observer=_Record(),
                                   state=state, optimizer_state=opt_state, should_stop=should_stop,
                                   on_epoch_end=checkpoint, dist=dist)
        finally:
            history.close()
        if not state.completed:
            checkpoint(state, optimizer)
            if dist is not None:
                dist.barrier()  # the other ranks wait for this checkpoint before they exit
            raise Interrupted(
                f"stopped at epoch {state.epoch + 1}, step {state.step}; a checkpoint is saved in {work}",
                hint=f"continue with: dlkit train {request.model} --dataset {request.dataset} --out {final} --resume",
            )

        if dist is not None:  # every replica must hold the same weights: check and record it
            ddp["parameter_sha256"] = dist.parameter_digests(model)
        channels_last = prepare_inference(model, device, data.spec.input_shape)
        names = list(data.spec.class_names or range(data.spec.num_classes))
        kw = dict(class_names=names, batch_size=cfg.eval_batch_size, device=device, precision=cfg.precision,
                  channels_last=channels_last)
        val = evaluate_model(model, *data.val, split="val", **kw) if len(data.val[0]) else None
        test = evaluate_model(model, *data.test, split="test", **kw)
        metrics = {"test_accuracy": test.accuracy, "test_loss": test.loss, "test_macro_f1": test.macro_f1}
        if val is not None:
            metrics.update(val_accuracy=val.accuracy, val_loss=val.loss)
        metrics["train_seconds"] = sum(r["epoch_seconds"] for r in state.history)
        metrics["samples_per_s"] = state.history[-1]["samples_per_s"]

        manifest = artifacts.new_manifest(
            model_name=request.model, family=entry.family, config=_config_dict(model_cfg), spec=data.spec,
            dataset=request.dataset, data_state=data.state, seed=request.seed, precision=cfg.precision)
        options = {"train_config": dataclasses.asdict(cfg), "overrides": request.overrides,
                   "val_fraction": request.val_fraction, "device": str(device), "distributed": ddp,
                   "data_options": request.data_options}
        manifest["lineage"].append(artifacts.lineage_step("train", options, metrics))
        manifest["metrics"] = metrics
        plot_curves(state.history, work / CURVES, f"{request.model} on {request.dataset}")
        plot_confusion(test.confusion, names, work / "confusion.png", f"{request.model}: test confusion")
        for name in ("checkpoint.safetensors", "checkpoint.json"):
            (work / name).unlink(missing_ok=True)
        model.to("cpu").to(memory_format=torch.contiguous_format)
    finally:
        log.removeHandler(file_log)
        file_log.close()
    artifacts.write_artifact(final, model, manifest, work=work)
    return TrainResult(artifact=final, manifest=manifest, config=cfg, history=state.history, val=val, test=test,
                       seconds=time.perf_counter() - started, device=str(device), data_source=data.source,
                       distributed=ddp)


def _describe_distributed(dist: distributed.DistContext | None, cfg: TrainConfig) -> dict | None:
    if dist is None:
        return None
    return {"world_size": dist.world_size, "backend": dist.backend, "global_batch": cfg.batch_size,
            "batch_per_worker": -(-cfg.batch_size // dist.world_size), "lr_scale": 1.0,
            "threads": dist.threads, "threads_reason": dist.threads_reason}


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


def list_models(pattern: str = "*") -> list[dict]:
    """Every registered model with its parameter count on its default data (built on meta: no memory)."""
    from dlkit.errors import DlkitError
    from dlkit.models import MODELS
    from dlkit.data import spec_for
    from dlkit.models.registry import create_model

    rows = []
    for name in MODELS.names(pattern):
        entry = MODELS.get(name)
        row = {"name": name, "family": entry.family, "modalities": list(entry.modalities),
               "default_dataset": entry.default_dataset, "description": entry.description,
               "train_defaults": entry.train_defaults, "params": None, "error": None}
        try:
            with torch.device("meta"):
                model, _ = create_model(name, spec_for(entry.default_dataset))
            row["params"] = sum(p.numel() for p in model.parameters())
        except DlkitError as exc:
            row["error"] = exc.message
        rows.append(row)
    return rows


def list_datasets(data_dir: Path | None = None) -> list[dict]:
    from dlkit.data import DATASETS

    rows = []
    for name, entry in DATASETS.items():
        rows.append({**entry.spec.to_dict(), "name": name, "description": entry.description,
                     "found": entry.locate(data_dir)})
    return rows
