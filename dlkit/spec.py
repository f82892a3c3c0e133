"""What a model needs to know about its data, without loading any of it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)
CLASSIFY = "classify"  # one label per sample
LM = "lm"  # next-token prediction: the targets are the inputs shifted by one
TASKS = (CLASSIFY, LM)


@dataclass(frozen=True)
class DataSpec:
    """Shape of one sample and of the labels.

    ``input_shape`` is per sample: ``(channels, height, width)`` for images, ``(seq_len,)`` for
    text (token ids, 0 is padding). ``vocab_size`` is set for text only.

    ``task`` is ``classify`` (one of ``num_classes`` labels per sample) or ``lm`` (language
    modelling on text: a next-token distribution at every position; ``num_classes`` is the vocab
    size and ``input_shape`` is the context length).
    """

    modality: str
    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int | None = None
    class_names: tuple[str, ...] | None = field(default=None, compare=False)
    task: str = CLASSIFY

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}")
        if self.task == LM and (self.modality != TEXT or self.num_classes != self.vocab_size):
            raise ValueError("language-model specs are text with num_classes == vocab_size")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.modality == IMAGE and len(self.input_shape) != 3:
            raise ValueError("image specs need (channels, height, width)")
        if self.modality == TEXT and (len(self.input_shape) != 1 or not self.vocab_size):
            raise ValueError("text specs need (seq_len,) and a vocab_size")

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        if self.task == LM:
            return f"text {shape} tokens of context, vocab {self.vocab_size}, next-token prediction"
        if self.modality == TEXT:
            return f"text {shape} tokens, vocab {self.vocab_size}, {self.num_classes} classes"
        return f"image {shape}, {self.num_classes} classes"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        if self.class_names is not None:
            d["class_names"] = list(self.class_names)
        if self.task == CLASSIFY:
            del d["task"]  # manifests written before tasks existed read the same
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(
            modality=d["modality"],
            input_shape=tuple(d["input_shape"]),
            num_classes=int(d["num_classes"]),
            vocab_size=d.get("vocab_size"),
            class_names=tuple(d["class_names"]) if d.get("class_names") else None,
            task=d.get("task", CLASSIFY),
        )


# Shapes of well-known data sets, so a model can be sized (and listed, and profiled) without the
# data being on disk. A registered dataset's own spec takes precedence over these.
STANDARD_SPECS: dict[str, DataSpec] = {
    "digits": DataSpec(IMAGE, (1, 8, 8), 10),
    "mnist": DataSpec(IMAGE, (1, 28, 28), 10),
    "fashion-mnist": DataSpec(IMAGE, (1, 28, 28), 10),
    "cifar10": DataSpec(IMAGE, (3, 32, 32), 10),
    "imagenet": DataSpec(IMAGE, (3, 224, 224), 1000),
    "imdb": DataSpec(TEXT, (100,), 2, vocab_size=10000),
    # SST-2 sentences as BERT's WordPiece ids (bert-base) and as GPT-2's BPE ids (gpt2).
    "sst2-bert": DataSpec(TEXT, (128,), 2, vocab_size=30522),
    "sst2-gpt2": DataSpec(TEXT, (128,), 2, vocab_size=50257),
    # Language modelling with GPT-2's BPE: its full context of 1024 tokens (gpt2's native shape).
    "gpt2-lm": DataSpec(TEXT, (1024,), 50257, vocab_size=50257, task=LM),
    # Tiny Shakespeare as characters (65 of them) in windows of 64: nanoGPT's CPU example (gpt-mini).
    "tinyshakespeare": DataSpec(TEXT, (64,), 65, vocab_size=65, task=LM),
    # BERT's own output, as published: the pooled [CLS] features of its full context of 512 WordPiece
    # ids (bert-base's native shape). num_classes 0: no classifier head.
    "bert-pooled": DataSpec(TEXT, (512,), 0, vocab_size=30522),
}
