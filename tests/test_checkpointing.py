"""--checkpointing full: the same loss and gradients, less activation memory, the same artifact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from dlkit.cli import app
from dlkit.engine import recompute
from dlkit.models import create_model
from dlkit.profiling.memory import measure_peak
from dlkit.spec import IMAGE, LM, TEXT, DataSpec

runner = CliRunner()


def gpt(depth: int, seq: int = 32, dim: int = 32, vocab: int = 40, dropout: float = 0.0):
    spec = DataSpec(TEXT, (seq,), vocab, vocab_size=vocab, task=LM)
    torch.manual_seed(0)
    model, _ = create_model("gpt-mini", spec, {"depth": depth, "dim": dim, "heads": 2, "ffn_dim": 2 * dim,
                                               "dropout": dropout})
    return model.train(), torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # dropout draws the same masks in both runs
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_loss_and_gradients_on_gpt(dropout):
    model, x = gpt(depth=3, dropout=dropout)
    plain_loss, plain = loss_and_grads(model, x)
    keys = list(model.state_dict())
    assert recompute.enable(model) == 3
    assert list(model.state_dict()) == keys  # nothing wrapped: the artifact's keys stay
    loss, grads = loss_and_grads(model, x)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    recompute.disable(model)
    assert "forward" not in model.blocks[0].__dict__


def test_same_gradients_on_the_image_transformer():
    spec = DataSpec(IMAGE, (1, 8, 8), 3)
    torch.manual_seed(0)
    model, _ = create_model("transformer", spec)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert recompute.enable(model) == len(model.blocks)
    for name, g in grads().items():
        torch.testing.assert_close(g, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def step_peak(model, x) -> int:
    def step():
        loss_and_grads(model, x)

    step()
    return measure_peak(step, torch.device("cpu"))


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps for the backward pass after the forward (what checkpointing removes)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_deeper_model_keeps_less_activation_memory():
    model, x = gpt(depth=8, seq=64, dim=64)
    x = x.repeat(4, 1)  # batch 16
    plain_peak, plain_saved = step_peak(model, x), saved_bytes(model, x)
    recompute.enable(model)
    peak, saved = step_peak(model, x), saved_bytes(model, x)
    weights = sum(p.numel() * 4 for p in model.parameters())
    # Saved for backward outside the blocks: the embeddings, the head and each block's input only.
    assert saved < plain_saved / 4, (saved, plain_saved)
    # The measured step (weights and gradients included) peaks lower by most of the activations.
    assert plain_peak - peak > 0.5 * (plain_peak - 2 * weights), (plain_peak, peak, weights)


def test_hf_models_use_transformers_checkpointing():
    transformers = pytest.importorskip("transformers")
    from dlkit.hf.models import wrapped_class, _CausalLM

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = wrapped_class(_CausalLM, transformers.LlamaForCausalLM)._from_config(cfg).train()
    x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    plain_loss, plain = loss_and_grads(model, x)
    assert recompute.enable(model) == 3
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # transformers 5.2x renamed it
    assert getattr(model, flag)
    loss, grads = loss_and_grads(model, x)
    torch.testing.assert_close(loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    saved = saved_bytes(model, x)
    recompute.disable(model)
    assert not getattr(model, flag)
    assert saved < saved_bytes(model, x) / 2


def test_train_cli_writes_the_same_artifact_format(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    common = ["train", "gpt-mini", "--data-file", str(text), "--set", "depth=2", "--set", "dim=32", "--set", "heads=2",
              "--set", "ffn_dim=64", "--seq-len", "32", "--max-steps", "6", "--batch-size", "8", "--precision", "fp32",
              "--quiet"]
    for name, extra in (("plain", []), ("ckpt", ["--checkpointing", "full"])):
        res = runner.invoke(app, [*common, *extra, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    keys = [sorted(safe_open(str(tmp_path / n / "model.safetensors"), "pt").keys()) for n in ("plain", "ckpt")]
    assert keys[0] == keys[1]
    # Same seed, same steps, same arithmetic: the same model.
    m = [json.loads((tmp_path / n / "manifest.json").read_text())["metrics"]["test_loss"] for n in ("plain", "ckpt")]
    assert m[0] == pytest.approx(m[1], rel=1e-5)
    train = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["lineage"][0]["options"]["train_config"]
    assert train["checkpointing"] == "full"


def test_other_families_are_refused_in_one_line(tmp_path):
    res = runner.invoke(app, ["train", "cnn", "--dataset", "digits", "--checkpointing", "full", "--epochs", "1",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "--checkpointing full recomputes blocks, which the cnn family does not declare" in res.output
    assert "drop --checkpointing" in res.output
    assert not (tmp_path / "x").exists()
