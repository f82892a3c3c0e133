"""VGG: stages of 3x3 convs, each followed by a 2x2 max pool, then a dense classifier.

``vgg11`` and ``vgg16`` stand for the published ImageNet networks (``native="imagenet"``: 3x224x224
input, 7x7 adaptive pooling, classifier 4096-4096-1000; VGG-16 has 138,357,544 parameters, as
torchvision's). ``--dataset`` adapts them: the classes come from the data, and the head from the
input size. Images of 224x224 or more keep the ImageNet head; smaller ones (32x32 CIFAR-10, the
smallest the five pools allow) get the small-input head common for CIFAR (1x1 pooling, one dense
layer of 512): VGG-16 on CIFAR-10 has 14,982,474 parameters. ``dlkit train vgg16`` trains on CIFAR-10.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dlkit.errors import IncompatibleError, UsageError
from dlkit.models.registry import Support, register_model
from dlkit.spec import IMAGE, DataSpec

IMAGENET_SIZE = 224


@dataclass
class VGGConfig:
    """Defaults: VGG-16 (configuration D of the paper)."""

    stages: tuple[int, ...] = (2, 2, 3, 3, 3)  # 3x3 convs per stage; a 2x2 max pool ends each
    channels: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    batch_norm: bool = False
    # None: chosen from the input size, so the same (config, data) always rebuilds the same net.
    # Images of 224x224 or more: 7x7 pooling and 4096-4096 (ImageNet); smaller: 1x1 and 512 (CIFAR).
    pool_size: int | None = None
    classifier: tuple[int, ...] | None = None  # hidden widths of the dense layers
    dropout: float = 0.5


def resolved_head(cfg: VGGConfig, spec: DataSpec) -> tuple[int, tuple[int, ...]]:
    large = min(spec.input_shape[1:]) >= IMAGENET_SIZE
    pool = cfg.pool_size if cfg.pool_size is not None else (7 if large else 1)
    hidden = cfg.classifier if cfg.classifier is not None else ((4096, 4096) if large else (512,))
    return pool, tuple(hidden)


class VGG(nn.Module):
    def __init__(self, cfg: VGGConfig, spec: DataSpec):
        super().__init__()
        if sum(cfg.stages) != len(cfg.channels):
            raise UsageError(
                f"stages={cfg.stages} hold {sum(cfg.stages)} convs but channels has {len(cfg.channels)}",
                hint="give one width per conv",
            )
        c, h, w = spec.input_shape
        need = 2 ** len(cfg.stages)
        if min(h, w) < need:
            raise IncompatibleError(
                f"VGG's {len(cfg.stages)} max pools need images of at least {need}x{need}, not {h}x{w}",
                hint="use cnn or resnet20 for small images",
            )
        layers: list[nn.Module] = []
        widths = iter(cfg.channels)
        for n in cfg.stages:
            for _ in range(n):
                out = next(widths)
                layers.append(nn.Conv2d(c, out, 3, padding=1))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                c = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        pool, hidden = resolved_head(cfg, spec)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.flatten = nn.Flatten()
        dense: list[nn.Module] = []
        width = c * pool * pool
        for hid in hidden:
            dense += [nn.Linear(width, hid), nn.ReLU()]
            if cfg.dropout > 0:
                dense.append(nn.Dropout(cfg.dropout))
            width = hid
        self.classifier = nn.Sequential(*dense)
        self.head = nn.Linear(width, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        if next(self.parameters()).is_meta:  # nothing to draw, and normal_ on meta costs ~2 s of imports
            return
        # As torchvision: He init for convs, N(0, 0.01) for dense layers, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.flatten(self.pool(self.features(x)))))

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (changed by pruning)."""
        return {
            "channels": tuple(m.out_channels for m in self.features if isinstance(m, nn.Conv2d)),
            "classifier": tuple(m.out_features for m in self.classifier if isinstance(m, nn.Linear)),
        }


TRAIN = dict(optimizer="sgd", lr=0.01, weight_decay=5e-4, epochs=30, batch_size=128,
             schedule="cosine", warmup=0.0)


SUPPORT = Support(prune="channels", static_int8=True, widths=VGG.width_overrides)


@register_model(family="vgg", build=VGG, modalities=(IMAGE,), default_dataset="cifar10",
                train_defaults=TRAIN, support=SUPPORT, native="imagenet")
def vgg11() -> VGGConfig:
    """VGG-11 (configuration A): 8 convs in 5 stages."""
    return VGGConfig(stages=(1, 1, 2, 2, 2), channels=(64, 128, 256, 256, 512, 512, 512, 512))


@register_model(family="vgg", build=VGG, modalities=(IMAGE,), default_dataset="cifar10",
                train_defaults=TRAIN, support=SUPPORT, native="imagenet")
def vgg16() -> VGGConfig:
    """VGG-16 (configuration D): 13 convs in 5 stages."""
    return VGGConfig()
