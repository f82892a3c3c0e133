"""``dlkit plan`` as a step (CLI and recipes): the options builder and the library call.
Torch-free until the step runs."""

from __future__ import annotations

import re
from typing import Literal, Optional

from dlkit.choices import INPUT_DTYPES
from dlkit.errors import UsageError
from dlkit.plan.choices import CHECKPOINTING, PLAN_OPTIMIZERS, PLAN_PRECISIONS, STRATEGIES

_SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: Optional[str], option: str) -> Optional[float]:
    """``300B``, ``1.5M``, ``2e9``, ``50000`` -> a number (K, M, B/G, T: thousands to trillions)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgtKMBGT]?)\s*", str(text))
    if m is None:
        raise UsageError(f"{option} {text!r} is not a count", hint=f"e.g. {option} 300B, 1.5M or 2e9")
    value = float(m.group(1)) * _SCALE[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"{option} {text} must be positive")
    return value


def plan_options(source: Optional[str], *, batch_size: Optional[int] = None, seq_len: Optional[int] = None,
                 precision: Literal[PLAN_PRECISIONS] = "bf16-mixed", optimizer: Literal[PLAN_OPTIMIZERS] = "adamw",
                 checkpointing: Literal[CHECKPOINTING] = "none", lora_rank: Optional[int] = None,
                 lora_targets: Optional[list[str]] = None, strategy: Literal[STRATEGIES] = "ddp", devices: int = 1,
                 device_memory: str = "h100-80", mfu: float = 0.4, tokens: Optional[str] = None,
                 samples: Optional[str] = None, epochs: float = 1.0, search: bool = True,
                 dataset: Optional[str] = None, input_shape: Optional[str] = None,
                 set_: Optional[list[str]] = None, input_dtype: Optional[Literal[INPUT_DTYPES]] = None,
                 vocab_size: Optional[int] = None):
    """``dlkit plan``'s options -> (target, PlanOptions), validated."""
    from dlkit.config import parse_assignments
    from dlkit.plan.plan import PlanOptions

    if not source:
        raise UsageError("nothing to plan", hint="give a registry name, an artifact, hf:NAME or file.py:Name")
    targets = tuple(t.strip() for item in (lora_targets or ()) for t in item.split(",") if t.strip()) or None
    opts = PlanOptions(batch_size=batch_size, seq_len=seq_len, precision=precision, optimizer=optimizer,
                       checkpointing=checkpointing, lora_rank=lora_rank, lora_targets=targets, strategy=strategy,
                       devices=devices, device_memory=device_memory, mfu=mfu,
                       tokens=parse_count(tokens, "--tokens"), samples=parse_count(samples, "--samples"),
                       epochs=epochs, search=search, dataset=dataset, input_shape=input_shape,
                       overrides=parse_assignments(set_) or None, input_dtype=input_dtype, vocab_size=vocab_size)
    return str(source), opts.validate()


def run_plan(source, opts, hooks=None):
    from dlkit.plan.plan import plan_training

    return plan_training(str(source), opts)
