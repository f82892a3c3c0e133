"""Names of the choices options accept, each list in one place; kept free of torch so ``--help``
stays fast. The library validates against these and the CLI offers them."""

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adam", "adamw")
PROFILE_OPTIMIZERS = (*OPTIMIZERS, "none")  # whose state a profiled training step holds
INPUT_DTYPES = ("float", "long")  # profile/compare file.py:Name: float tensors or token ids (int64)
SCHEDULES = ("constant", "step", "cosine", "onecycle")
# dlkit train: how several workers hold the model (ddp: a replica each; fsdp: FSDP2 shards of
# parameters, gradients and optimizer state), and activation checkpointing per block
TRAIN_STRATEGIES = ("ddp", "fsdp")
TRAIN_CHECKPOINTING = ("none", "full")
SPLITS = ("train", "val", "test")
# dlkit train --dataset text-lm: char, bpe, or hf (the hf: model's own; hf:NAME names another's)
TOKENIZERS = ("char", "bpe", "hf")
# dlkit prune
IMPORTANCES = ("l1", "l2", "taylor", "lamp", "random")
# dlkit quantize
QUANT_MODES = ("dynamic", "static", "qat", "fp16", "bf16")
INT8_MODES = ("dynamic", "static", "qat")
QUANT_BACKENDS = ("x86", "onednn", "fbgemm", "qnnpack")
# dlkit explain
EXPLAIN_METHODS = ("ig", "saliency", "smoothgrad", "gradient-shap", "occlusion", "lime", "kernel-shap", "grad-cam")
EXPLAIN_GRADIENT_METHODS = ("ig", "saliency", "smoothgrad", "gradient-shap", "grad-cam")  # need a float model
EXPLAIN_BASELINES = ("zero", "mean", "blur", "pad")  # images: zero, mean, blur; text: pad
EXPLAIN_METRICS = ("infidelity", "sensitivity")  # optional, through captum.metrics
# dlkit export / dlkit predict
EXPORT_FORMATS = ("onnx", "exported-program", "torchscript")
PREDICT_RUNTIMES = ("torch", "onnxruntime")
ONNX_QUANT_MODES = ("static", "dynamic")  # dlkit export --format onnx --quantize: ONNX Runtime's int8 tools
