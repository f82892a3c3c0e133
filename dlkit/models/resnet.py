"""Residual networks: CIFAR-style (resnet20/56) and ImageNet-style (resnet18/50, as torchvision)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from dlkit.errors import UsageError
from dlkit.models.registry import Support, register_model
from dlkit.spec import IMAGE, DataSpec

EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass
class ResNetConfig:
    """Defaults: ResNet-20 for CIFAR (3 stages of 3 basic blocks, widths 16/32/64)."""

    block: str = "basic"  # "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, expansion 4)
    layers: tuple[int, ...] = (3, 3, 3)  # blocks per stage; every stage after the first halves H, W
    widths: tuple[int, ...] = (16, 32, 64)  # per stage; a bottleneck's output is 4x this
    stem: str = "cifar"  # "cifar": 3x3 conv; "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max pool
    # Widths that pruning may change; None: derived from `widths` as above.
    stem_width: int | None = None  # stem conv output (default widths[0])
    # Inner conv widths, block after block: one per basic block, two per bottleneck.
    inner: tuple[int, ...] | None = None
    out_widths: tuple[int, ...] | None = None  # output channels of each stage


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    # "Option B" of the ResNet paper: a 1x1 conv + BN projection wherever the shape changes (as
    # torchvision does). The paper's CIFAR nets use option A (a zero-padded identity), so our
    # resnet20 has 272,474 parameters where option A has 269,722 (the paper's "0.27M").
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, mid, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(mid, cout, 3)
        self.shortcut = shortcut(cin, cout, stride)
        self.skip_add = FloatFunctional()  # a plain add, which eager-mode int8 can observe
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.skip_add.add(out, self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, "ResNet v1.5" as torchvision), 1x1 expand."""

    def __init__(self, cin: int, mid1: int, mid2: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, mid1, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(mid1, mid2, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = conv_bn(mid2, cout, 1)
        self.shortcut = shortcut(cin, cout, stride)
        self.skip_add = FloatFunctional()
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.skip_add.add(out, self.shortcut(x)))


def _last_bn(blk: nn.Module) -> nn.BatchNorm2d:
    return blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2


def _check(cfg: ResNetConfig) -> None:
    if cfg.block not in EXPANSION:
        raise UsageError(f"block={cfg.block!r} is not a ResNet block", hint="use basic or bottleneck")
    if cfg.stem not in ("cifar", "imagenet"):
        raise UsageError(f"stem={cfg.stem!r} is not a ResNet stem", hint="use cifar or imagenet")
    if not cfg.layers or len(cfg.widths) != len(cfg.layers):
        raise UsageError(f"layers={cfg.layers} and widths={cfg.widths} need one value per stage")
    per_block = 1 if cfg.block == "basic" else 2
    if cfg.inner is not None and len(cfg.inner) != per_block * sum(cfg.layers):
        raise UsageError(f"inner needs {per_block} width(s) for each of the {sum(cfg.layers)} blocks")
    if cfg.out_widths is not None and len(cfg.out_widths) != len(cfg.layers):
        raise UsageError(f"out_widths needs one width per stage ({len(cfg.layers)})")


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig, spec: DataSpec):
        super().__init__()
        _check(cfg)
        exp = EXPANSION[cfg.block]
        per_block = 1 if cfg.block == "basic" else 2
        inner = list(cfg.inner) if cfg.inner is not None else [
            w for w, n in zip(cfg.widths, cfg.layers) for _ in range(n * per_block)
        ]
        outs = cfg.out_widths or tuple(w * exp for w in cfg.widths)
        width = cfg.stem_width or cfg.widths[0]
        if cfg.stem == "imagenet":
            conv, bn = conv_bn(spec.input_shape[0], width, 7, 2)
            self.stem = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(3, 2, padding=1))
        else:
            self.stem = nn.Sequential(*conv_bn(spec.input_shape[0], width, 3), nn.ReLU())
        stages = []
        for s, (n, cout) in enumerate(zip(cfg.layers, outs)):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                mids = [inner.pop(0) for _ in range(per_block)]
                blocks.append(
                    BasicBlock(width, mids[0], cout, stride) if cfg.block == "basic"
                    else Bottleneck(width, mids[0], mids[1], cout, stride)
                )
                width = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(width, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.stages(self.stem(x)))))

    def width_overrides(self) -> dict[str, Any]:
        """The config fields holding this module's current widths (changed by pruning)."""
        inner: list[int] = []
        for stage in self.stages:
            for blk in stage:
                inner.append(blk.conv1.out_channels)
                if isinstance(blk, Bottleneck):
                    inner.append(blk.conv2.out_channels)
        return {
            "stem_width": self.stem[0].out_channels,
            "inner": tuple(inner),
            "out_widths": tuple(_last_bn(stage[-1]).num_features for stage in self.stages),
        }


CIFAR_TRAIN = dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, epochs=30, batch_size=128,
                   schedule="cosine", warmup=0.0)
IMAGENET_TRAIN = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, epochs=90, batch_size=256,
                      schedule="cosine", warmup=0.0)


# Torch-Pruning follows the residual coupling; the residual add goes through a FloatFunctional,
# so the blocks take eager static int8.
SUPPORT = Support(prune="channels", static_int8=True, widths=ResNet.width_overrides)


def _register(dataset: str, train: dict):
    # Each preset's native shape is its dataset's: CIFAR-10 for resnet20/56, ImageNet (3x224x224,
    # 1000 classes) for resnet18/50, which `dlkit train` takes to another dataset with --dataset
    # (the stem stays ImageNet's; the head takes the data's classes).
    return register_model(family="resnet", build=ResNet, modalities=(IMAGE,), default_dataset=dataset,
                          train_defaults=train, support=SUPPORT, native=dataset)


@_register("cifar10", CIFAR_TRAIN)
def resnet20() -> ResNetConfig:
    """ResNet-20 for 32x32 images (3x3 basic blocks, widths 16/32/64)."""
    return ResNetConfig(layers=(3, 3, 3))


@_register("cifar10", CIFAR_TRAIN)
def resnet56() -> ResNetConfig:
    """ResNet-56 for 32x32 images (9 basic blocks per stage, widths 16/32/64)."""
    return ResNetConfig(layers=(9, 9, 9))


@_register("imagenet", IMAGENET_TRAIN)
def resnet18() -> ResNetConfig:
    """ResNet-18 (ImageNet stem, basic blocks [2,2,2,2], as torchvision: 11.7M params)."""
    return ResNetConfig(block="basic", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem="imagenet")


@_register("imagenet", IMAGENET_TRAIN)
def resnet50() -> ResNetConfig:
    """ResNet-50 (ImageNet stem, bottleneck blocks [3,4,6,3], as torchvision: 25.6M params)."""
    return ResNetConfig(block="bottleneck", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512),
                        stem="imagenet")
