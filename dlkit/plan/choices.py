"""The planner's choice lists, free of torch so ``dlkit --help`` stays fast."""

PLAN_PRECISIONS = ("fp32", "bf16-mixed", "bf16")
PLAN_OPTIMIZERS = ("adamw", "sgd", "adamw-8bit", "none")
CHECKPOINTING = ("none", "full", "selective")
STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")
KNOWN_DEVICES = ("a100-40", "a100-80", "h100-80", "h200-141", "rtx4090-24", "cpu")
