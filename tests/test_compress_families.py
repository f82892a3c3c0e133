"""Every registered model, pruned and quantized as its family declares (tiny configs, real math)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dlkit.choices import INT8_MODES, QUANT_MODES
from dlkit.compress import quantize as q
from dlkit.compress.codec import decode_weights, encode_weights
from dlkit.compress.structured import prune_structured
from dlkit.config import to_dict
from dlkit.errors import IncompatibleError
from dlkit.models import MODELS, Support, build_model, create_model, register_model
from dlkit.spec import IMAGE, TEXT, DataSpec

IMAGE_SPEC = DataSpec(IMAGE, (3, 16, 16), 5)
TEXT_SPEC = DataSpec(TEXT, (12,), 4, vocab_size=50)
ATTENTION = {"dim": "16", "depth": "2", "heads": "4", "ffn_dim": "32"}
TINY = {  # per family: overrides that keep the published presets to a few thousand parameters
    "mlp": {"hidden": "32,16"},
    "cnn": {"channels": "8,16", "hidden": "32"},
    "resnet": {"layers": "1,1", "widths": "8,16", "stem": "cifar"},
    "vgg": {"stages": "1,1", "channels": "8,16", "classifier": "32"},
    "rnn": {"hidden": "16", "embed_dim": "8"},
    "transformer": {**ATTENTION, "patch_size": "4"},
    "vit": {**ATTENTION, "patch_size": "4"},
    "bert": {**ATTENTION, "max_len": "16"},
    "gpt": {**ATTENTION, "max_len": "16"},
}
NAMES = list(MODELS)


def tiny(name: str) -> tuple[torch.nn.Module, object, DataSpec, torch.Tensor]:
    entry = MODELS.get(name)
    spec = IMAGE_SPEC if IMAGE in entry.modalities else TEXT_SPEC
    torch.manual_seed(0)
    model, cfg = create_model(name, spec, TINY[entry.family])
    g = torch.Generator().manual_seed(1)
    if spec.modality == TEXT:
        x = torch.randint(1, spec.vocab_size, (6, *spec.input_shape), generator=g)
    else:
        x = torch.randn(6, *spec.input_shape, generator=g)
    return model.eval(), cfg, spec, x


def test_every_family_declares_its_support():
    assert {e.family for _, e in MODELS.items()} >= {"mlp", "cnn", "resnet", "vgg", "rnn", "transformer",
                                                       "vit", "bert", "gpt"}
    for name, entry in MODELS.items():
        assert entry.support.prune in ("channels", "heads", "rnn", "none"), name


@pytest.mark.parametrize("name", NAMES)
def test_prune_every_family_as_declared(name):
    """Prunable families shrink and rebuild from their config to the same outputs; the others
    refuse in one line."""
    model, cfg, spec, x = tiny(name)
    support = MODELS.get(name).support
    if support.prune == "none":
        with pytest.raises(IncompatibleError, match="cannot be pruned"):
            prune_structured(model, x[:2], ratio=0.5)
        return
    before = sum(p.numel() for p in model.parameters())
    prune_structured(model, x[:2], ratio=0.5)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    new_cfg = dataclasses.replace(cfg, **support.widths(model))
    rebuilt = build_model(name, to_dict(new_cfg), spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        out = rebuilt.eval()(x)
        torch.testing.assert_close(out, model.eval()(x), atol=1e-5, rtol=1e-4)
    assert out.shape == (len(x), spec.num_classes) and torch.isfinite(out).all()


def _quantize(model: torch.nn.Module, mode: str, x: torch.Tensor) -> torch.nn.Module:
    """The model-level steps quantize_artifact takes for ``mode`` (QAT without its training)."""
    if mode in q.HALF:
        return q.round_to_half(model, mode)
    with q.quiet_ao("x86"):
        if mode == "dynamic":
            return q.quantize_dynamic(model)
        q.prepare_static(model, "x86", qat=mode == "qat")
        model.eval()
        with torch.no_grad():
            model(x)
        return q.convert_static(model)


@pytest.mark.parametrize("name", NAMES)
def test_quantize_every_family_as_declared(name):
    """Each mode the family takes quantizes and survives the artifact codec bit for bit; each
    mode it does not take is refused in one line naming the ones it can."""
    float_model, cfg, spec, x = tiny(name)
    modes = q.supported_modes(MODELS.get(name).support, spec.modality)
    for mode in QUANT_MODES:
        if mode not in modes:
            with pytest.raises(IncompatibleError, match=f"cannot take --mode {mode}") as exc:
                q.check_mode(mode, name, spec.modality)
            assert exc.value.hint == f"modes it can take: {', '.join(modes)}"
            continue
        q.check_mode(mode, name, spec.modality)
        model = _quantize(copy.deepcopy(float_model), mode, x)
        transform = {"kind": "quantize", "mode": mode, "backend": "x86" if mode in INT8_MODES else None}
        tensors = encode_weights(model, transform)
        fresh = q.rebuild(build_model(name, to_dict(cfg), spec).eval(), transform)
        missing, unexpected = decode_weights(fresh, tensors, transform)
        assert not missing and not unexpected, (mode, missing, unexpected)
        with torch.no_grad(), q.quiet_ao("x86"):
            out = model(x)
            assert torch.equal(fresh(x), out), mode
        assert out.shape == (len(x), spec.num_classes) and torch.isfinite(out).all(), mode


def test_an_inconsistent_declaration_fails_at_registration():
    with pytest.raises(TypeError, match="needs widths="):
        register_model("never-a-model", family="broken", build=torch.nn.Linear, modalities=(IMAGE,),
                       default_dataset="digits", support=Support(prune="channels"))(lambda: None)
    with pytest.raises(TypeError, match="needs a reason="):
        Support(prune="none").check("broken", (IMAGE,))
    with pytest.raises(TypeError, match="static_int8=True needs image data"):
        Support(prune="none", reason="x", static_int8=True).check("broken", (TEXT,))
    assert "never-a-model" not in MODELS


def test_an_undeclared_model_is_refused_in_one_line():
    with pytest.raises(IncompatibleError, match="Sequential cannot be pruned structurally: its family declares"):
        prune_structured(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4), ratio=0.5)
