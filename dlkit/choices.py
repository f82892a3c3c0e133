"""Names of the choices options accept; kept free of torch so ``--help`` stays fast."""

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
SPLITS = ("train", "val", "test")
