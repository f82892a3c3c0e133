"""The training planner: memory per device and time, for any model dlkit can build, counted on meta.

    plan_training(target, PlanOptions(batch_size=8, seq_len=1024, precision="bf16-mixed",
                  checkpointing="full", strategy="fsdp", devices=8, device_memory="h100-80")) -> Plan
        ``Plan.memory``: per-device weights, gradients, optimizer state, activations, logits/loss,
        transient, FSDP-gathered weights, peak, overhead allowance, total, fits;
        ``Plan.max_micro_batch``; ``Plan.compute``: FLOPs per step, throughput, time.

    model_states(trainable, frozen, precision=, optimizer=, strategy=, devices=) -> ModelStates
        The arithmetic alone (ZeRO's model-state memory), for checking published figures.

    trace_step(model_on_meta, inputs_on_meta, blocks) -> StepTrace
        What one training step saves per module and block, and its live peak.

Importing this package does not import torch (the CLI's ``--help`` stays fast); the names above
load their modules on first use.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Memory": "plan", "Plan": "plan", "PlanOptions": "plan", "find_blocks": "plan", "plan_training": "plan",
    "ModelStates": "states", "model_states": "states", "StepTrace": "trace", "trace_step": "trace",
    "CHECKPOINTING": "choices", "PLAN_OPTIMIZERS": "choices", "PLAN_PRECISIONS": "choices", "STRATEGIES": "choices",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'dlkit.plan' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dlkit.plan.{_WHERE[name]}"), name)
