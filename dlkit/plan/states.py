"""Model states per device: weights, gradients and optimizer state, by precision, optimizer and
sharding strategy. Pure arithmetic on parameter counts, so published figures can be checked.

Bytes per parameter (trainable; frozen parameters hold only their weights):

=============  =======  =========  =====================================================
precision      weights  gradients  optimizer state (adamw / sgd / adamw-8bit / none)
=============  =======  =========  =====================================================
fp32           4        4          8 / 4 / 2 / 0    (Adam m and v; SGD momentum)
bf16           2        2          4 / 2 / 2 / 0    (states in the parameters' dtype)
bf16-mixed     2        2          12 / 8 / 6 / 0   (fp32 master weights + fp32 states)
=============  =======  =========  =====================================================

``bf16-mixed`` is the layout of the ZeRO paper (Rajbhandari et al. 2020, section 3.1: 16-bit
weights and gradients, K = 12 bytes of fp32 master weights, momentum and variance for Adam),
Megatron-LM and FSDP with a bf16 compute dtype. PyTorch autocast on one device keeps fp32
weights and gradients instead (4 + 4 + 8): the same 16 bytes per parameter, split differently.
``adamw-8bit`` is bitsandbytes' blockwise 8-bit Adam (int8 m and v; its per-block scales, 4
bytes per 2,048 values, are neglected).

Sharding over N devices (ZeRO stages; FSDP is stage 3):
``ddp`` replicates everything; ``zero1`` shards the optimizer state; ``zero2`` also the
gradients; ``fsdp`` also the weights. Frozen weights are sharded by ``fsdp`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISION_BYTES = {"fp32": (4, 4), "bf16": (2, 2), "bf16-mixed": (2, 2)}  # (weights, gradients)
OPTIMIZER_BYTES = {
    "fp32": {"adamw": 8, "sgd": 4, "adamw-8bit": 2, "none": 0},
    "bf16": {"adamw": 4, "sgd": 2, "adamw-8bit": 2, "none": 0},
    "bf16-mixed": {"adamw": 12, "sgd": 8, "adamw-8bit": 6, "none": 0},
}
SHARDED = {"ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "gradients"),
           "fsdp": ("optimizer", "gradients", "weights")}


@dataclass(frozen=True)
class ModelStates:
    """Bytes per device."""

    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(trainable: int, frozen: int = 0, *, precision: str = "bf16-mixed", optimizer: str = "adamw",
                 strategy: str = "ddp", devices: int = 1) -> ModelStates:
    """Per-device weights, gradients and optimizer state for ``trainable`` and ``frozen`` parameters."""
    w, g = PRECISION_BYTES[precision]
    k = OPTIMIZER_BYTES[precision][optimizer]
    shard = SHARDED[strategy]
    n = max(devices, 1)

    def part(nbytes: float, what: str) -> float:
        return nbytes / n if what in shard else nbytes

    weights = part((trainable + frozen) * w, "weights")
    return ModelStates(weights=weights, gradients=part(trainable * g, "gradients"),
                       optimizer=part(trainable * k, "optimizer"))
