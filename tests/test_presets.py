"""Presets mean what their names say: with no dataset, the published input, head and parameter
count (counted on the meta device: nothing allocated); --dataset adapts the input and the head."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dlkit.cli import app
from dlkit.models import MODELS
from dlkit.profiling.target import resolve_target

runner = CliRunner()

VGG16_CONVS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def native(name: str, **kw) -> nn.Module:
    """The model ``dlkit profile NAME`` counts (no --dataset), built on meta."""
    tgt, _ = resolve_target(name, **kw)
    model = tgt.build("meta")
    assert all(p.is_meta for p in model.parameters())
    return model, tgt


def conv_params(channels, cin: int = 3) -> int:
    total = 0
    for c in channels:
        total += cin * c * 9 + c
        cin = c
    return total


@pytest.mark.parametrize("name,published", [
    ("resnet18", 11_689_512), ("resnet50", 25_557_032), ("vgg16", 138_357_544), ("vgg11", 132_863_336),
    ("vit-b16", 86_567_656)])
def test_image_presets_are_the_published_imagenet_models(name, published):
    model, tgt = native(name)
    assert MODELS.get(name).native_dataset == "imagenet"
    assert tgt.input_shape == (3, 224, 224) and n_params(model) == published
    assert model.head.out_features == 1000
    assert model(tgt.example(2, "meta")).shape == (2, 1000)


def test_vgg16_is_torchvisions_vgg16_by_hand():
    model, _ = native("vgg16")
    assert model.pool.output_size == 7
    dense = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert dense == [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
    assert conv_params(VGG16_CONVS) + 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000 == 138_357_544


def test_bert_base_is_the_encoder_with_pooler():
    model, tgt = native("bert-base")
    assert tgt.input_shape == (512,) and n_params(model) == 109_482_240
    assert isinstance(model.head, nn.Identity)  # no classifier: the pooled [CLS] features come out
    assert model(tgt.example(2, "meta")).shape == (2, 768)
    embeddings = 30522 * 768 + 512 * 768 + 2 * 768 + 2 * 768
    layer = 4 * (768 * 768 + 768) + 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 768
    assert embeddings + 12 * layer + (768 * 768 + 768) == 109_482_240


@pytest.mark.parametrize("name,dataset,expected,out", [
    # vgg16 on 32x32 takes the small-input head: 1x1 pooling, one dense layer of 512.
    ("vgg16", "cifar10", conv_params(VGG16_CONVS) + 512 * 512 + 512 + 512 * 10 + 10, 10),
    # resnet18 keeps its stem and blocks; the head takes the data's classes.
    ("resnet18", "cifar10", 11_689_512 - (512 * 1000 + 1000) + 512 * 10 + 10, 10),
    ("resnet50", "digits", 25_557_032 - 3 * 64 * 49 + 1 * 64 * 49 - (2048 * 1000 + 1000) + 2048 * 10 + 10, 10),
    # ViT: (32/16)^2 = 4 patches + the class token instead of 196 + 1 positions.
    ("vit-b16", "cifar10", 86_567_656 - (197 - 5) * 768 - (768 * 1000 + 1000) + 768 * 10 + 10, 10),
    # BERT on IMDB's shape: its 10,000-word vocabulary and a 2-class head on the pooled token.
    ("bert-base", "imdb", 109_482_240 - (30522 - 10000) * 768 + 768 * 2 + 2, 2),
])
def test_dataset_adapts_shape_and_classes(name, dataset, expected, out):
    model, tgt = native(name, dataset=dataset)
    assert n_params(model) == expected
    assert model(tgt.example(2, "meta")).shape == (2, out)


def test_adapted_preset_runs_for_real():
    """A narrowed vgg16 on CIFAR-10's shape, built with weights: the small head, real outputs and gradients."""
    tgt, _ = resolve_target("vgg16", dataset="cifar10", overrides={"channels": "4,4,8,8,8,8,8,8,8,8,8,8,8",
                                                                    "dropout": "0"})
    model = tgt.build("cpu")
    assert model.pool.output_size == 1 and model.head.in_features == 512
    x = tgt.example(3, "cpu")
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_profile_and_models_report_the_native_counts():
    res = runner.invoke(app, ["profile", "vgg16", "--batch-size", "1", "--no-latency", "--no-measure", "--json",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["params"]["total"] == 138_357_544 and doc["input_shape"] == [1, 3, 224, 224]
    assert doc["counted_on"] == "meta" and abs(doc["forward"]["macs_per_sample"] / 1e9 - 15.5) < 0.1
    res = runner.invoke(app, ["profile", "vgg16", "--dataset", "cifar10", "--batch-size", "1", "--no-latency",
                              "--no-measure", "--json", "--quiet"])
    assert json.loads(res.stdout)["params"]["total"] == 14_982_474
    res = runner.invoke(app, ["models", "--json"])
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    vgg = rows["vgg16"]
    assert vgg["params"] == 138_357_544 and vgg["native_dataset"] == "imagenet"
    assert vgg["native"]["input_shape"] == [3, 224, 224] and vgg["native"]["num_classes"] == 1000
    assert vgg["default_dataset"] == "cifar10" and vgg["trainable_default"] and vgg["default_params"] == 14_982_474
    assert rows["bert-base"]["params"] == 109_482_240 and not rows["bert-base"]["trainable_default"]
    assert rows["resnet50"]["params"] == 25_557_032 and rows["mlp"]["default_params"] == rows["mlp"]["params"]
    table = runner.invoke(app, ["models", "vgg1*"], env={"COLUMNS": "250"})
    assert "138,357,544" in table.stderr and "cifar10: 14,982,474 params" in table.stderr and table.stdout == ""
