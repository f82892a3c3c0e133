"""Every registered model: builds, runs forward and backward, counts, rebuilds from its config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dlkit.config import to_dict
from dlkit.engine.trainer import TrainConfig
from dlkit.errors import IncompatibleError, UsageError
from dlkit.models import MODELS, build_model, create_model
from dlkit.spec import IMAGE, STANDARD_SPECS, TEXT, DataSpec

TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
TEXT_SPEC = DataSpec(TEXT, (12,), 4, vocab_size=50)
MNIST = DataSpec(IMAGE, (1, 28, 28), 10)
CIFAR = DataSpec(IMAGE, (3, 32, 32), 10)
CASES = [(name, mod) for name, entry in MODELS.items() for mod in entry.modalities]


def small_spec(name: str, modality: str) -> DataSpec:
    if modality == TEXT:
        return TEXT_SPEC
    return CIFAR if MODELS.get(name).family in ("vgg", "resnet") else MNIST


def batch(spec: DataSpec, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.modality == IMAGE:
        return torch.randn(n, *spec.input_shape, generator=g)
    x = torch.randint(1, spec.vocab_size, (n, *spec.input_shape), generator=g)
    for i in range(n):  # right padding of various lengths, one sequence unpadded
        x[i, spec.input_shape[0] - 3 * i :] = 0
    return x


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,modality", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_forward_backward(name, modality):
    torch.manual_seed(0)
    spec = small_spec(name, modality)
    model, _ = create_model(name, spec)
    model.train()
    out = model(batch(spec))
    assert out.shape == (3, spec.num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", list(MODELS))
def test_entry_metadata(name):
    entry = MODELS.get(name)
    assert entry.description
    assert entry.default_dataset in STANDARD_SPECS
    assert STANDARD_SPECS[entry.default_dataset].modality in entry.modalities
    assert set(entry.train_defaults) <= TRAIN_KEYS
    assert entry.train_defaults["optimizer"] in ("sgd", "adam", "adamw")
    assert entry.train_defaults["schedule"] in ("constant", "step", "cosine", "onecycle")


@pytest.mark.parametrize("name,modality", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_config_round_trip(name, modality):
    spec = STANDARD_SPECS[MODELS.get(name).default_dataset] if modality == IMAGE else TEXT_SPEC
    with torch.device("meta"):
        model, cfg = create_model(name, spec)
        rebuilt = build_model(name, to_dict(cfg), spec)
        # The widths the module reports describe it exactly (what a pruner writes back).
        widened = MODELS.get(name).build(dataclasses.replace(cfg, **model.width_overrides()), spec)
    assert shapes(rebuilt) == shapes(model)
    assert shapes(widened) == shapes(model)


def meta_count(name: str, spec: DataSpec) -> int:
    with torch.device("meta"):
        return n_params(create_model(name, spec)[0])


def test_torchvision_parameter_counts():
    imagenet = STANDARD_SPECS["imagenet"]
    assert meta_count("resnet18", imagenet) == 11_689_512
    assert meta_count("resnet50", imagenet) == 25_557_032
    assert meta_count("vgg16", imagenet) == 138_357_544
    assert meta_count("vgg11", imagenet) == 132_863_336


def test_classic_parameter_counts():
    assert meta_count("mlp", MNIST) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10 == 109_386
    cnn = (
        1 * 32 * 3 * 3 + 2 * 32  # conv (no bias: BN follows) + BN scale and shift
        + 32 * 64 * 3 * 3 + 2 * 64
        + 64 * 7 * 7 * 128 + 128  # 28 -> 14 -> 7 after two pools
        + 128 * 10 + 10
    )
    assert meta_count("cnn", MNIST) == cnn == 421_738
    lenet = 1 * 6 * 25 + 6 + 6 * 16 * 25 + 16 + 16 * 5 * 5 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert meta_count("lenet5", MNIST) == lenet == 61_706
    # Option-B shortcuts: the paper's option-A count (269,722) plus two 1x1 conv + BN projections.
    assert meta_count("resnet20", CIFAR) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)


def test_vgg_head_follows_input_size():
    small, _ = create_model("vgg11", CIFAR)
    assert small.pool.output_size == 1 and small.head.in_features == 512
    with torch.device("meta"):
        large, cfg = create_model("vgg11", STANDARD_SPECS["imagenet"])
    assert large.pool.output_size == 7 and large.head.in_features == 4096
    assert cfg.pool_size is None  # resolved again, identically, on rebuild


def test_cnn_runs_on_8x8_digits():
    spec = STANDARD_SPECS["digits"]
    model, _ = create_model("cnn", spec)
    assert model(batch(spec)).shape == (3, 10)


def test_overrides_from_the_shell():
    model, cfg = create_model("lstm", MNIST, {"hidden": "32", "bidirectional": "true"})
    assert cfg.hidden == 32 and cfg.bidirectional is True
    assert model.rnn.hidden_size == 32 and model.rnn.bidirectional
    assert model(batch(MNIST)).shape == (3, 10)
    _, cfg = create_model("cnn", MNIST, {"channels": "8,16", "hidden": "32"})
    assert cfg.channels == (8, 16) and cfg.hidden == (32,)
    with pytest.raises(UsageError, match="unknown"):
        create_model("lstm", MNIST, {"hiden": "32"})
    with pytest.raises(UsageError, match="cell"):
        create_model("lstm", MNIST, {"cell": "transformer"})


@pytest.mark.parametrize(
    "name,spec,overrides,match",
    [
        ("vgg16", STANDARD_SPECS["fashion-mnist"], {}, "32x32"),
        ("lenet5", STANDARD_SPECS["digits"], {}, "too small"),
        ("transformer", MNIST, {"patch_size": "5"}, "patch_size=5"),
        ("transformer", TEXT_SPEC, {"max_len": "8"}, "max_len"),
        ("cnn", TEXT_SPEC, {}, "text"),
        ("resnet18", TEXT_SPEC, {}, "text"),
    ],
)
def test_mismatches_are_incompatible(name, spec, overrides, match):
    with pytest.raises(IncompatibleError, match=match) as info:
        create_model(name, spec, overrides)
    assert "\n" not in info.value.message and info.value.hint


@pytest.mark.parametrize(
    "name,overrides",
    [("mlp", {}), ("rnn", {}), ("lstm", {"bidirectional": "true", "layers": "2"}), ("gru", {}),
     ("transformer", {}), ("transformer", {"pool": "mean"})],
)
def test_padding_does_not_change_text_logits(name, overrides):
    torch.manual_seed(0)
    model, _ = create_model(name, TEXT_SPEC, overrides)
    model.eval()
    x = batch(DataSpec(TEXT, (8,), 4, vocab_size=50))  # lengths 8, 5, 2
    padded = torch.cat([x, torch.zeros(3, 4, dtype=x.dtype)], dim=1)
    with torch.no_grad():
        short, long = model(x), model(padded)
        alone = model(x[2:, :2])
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short[2:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "lenet5", "mlp", "resnet20", "vgg11", "transformer"])
def test_pruned_model_rebuilds_from_its_config(name):
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    spec = small_spec(name, IMAGE)
    model, cfg = create_model(name, spec)
    model.eval()
    x = batch(spec, n=2)
    heads, unwrapped = {}, None
    if name == "transformer":  # prune whole heads, as Torch-Pruning's ViT example does
        heads = {lin: blk.attn.num_heads for blk in model.blocks
                 for lin in (blk.attn.q, blk.attn.k, blk.attn.v)}
        unwrapped = [(model.cls, 2), (model.pos, 2)]  # (parameter, its width dimension)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[model.head], num_heads=heads,
                                  prune_num_heads=bool(heads), head_pruning_ratio=0.5,
                                  prune_head_dims=False, unwrapped_parameters=unwrapped)
    pruner.step()
    for blk in getattr(model, "blocks", []):
        blk.attn.num_heads = pruner.num_heads[blk.attn.q]
    pruned_cfg = dataclasses.replace(cfg, **model.width_overrides())
    assert n_params(model) < 0.5 * n_params(create_model(name, spec)[0])
    rebuilt = build_model(name, to_dict(pruned_cfg), spec)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
