"""LoRA fine-tuning (--lora-rank) from an artifact or an hf: model: hand-counted trainable
parameters, a frozen base, a falling loss, adapter artifacts that reload to the same outputs and
refuse a changed base, and --merge giving an ordinary artifact with the same outputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.cli import app
from dlkit.engine import lora
from dlkit.lm.evaluate import token_loss

runner = CliRunner()
DIM, DEPTH, RANK = 32, 2, 4
WORDS = "the cat sat on a mat and the dog ran to its home while birds sing".split()
TINY = ["--set", f"depth={DEPTH}", "--set", f"dim={DIM}", "--set", "heads=2", "--set", "ffn_dim=64"]
FAST = ["--seq-len", "32", "--batch-size", "16", "--precision", "fp32", "--quiet"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(res):
    assert res.exit_code == 0, res.output
    return res


def write_text(path: Path, words: list[str], n: int = 4000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(words) for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return write_text(root / "a.txt", WORDS), write_text(root / "b.txt", WORDS[:8], seed=1)


@pytest.fixture(scope="module")
def base(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "gpt"
    ok(run("train", "gpt-mini", "--data-file", texts[0], *TINY, *FAST, "--max-steps", "30", "--out", out))
    return out


def adapt(base_path, text, out, *extra, steps: int = 30):
    return ok(run("train", base_path, "--data-file", text, "--lora-rank", RANK, "--lr", "1e-2", *FAST,
                  "--max-steps", steps, "--out", out, *extra))


@pytest.fixture(scope="module")
def adapted(base, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted") / "lora"
    adapt(base, texts[1], out)
    return out


def hand_count(layers: int, pairs: list[tuple[int, int]]) -> int:
    """r * (in + out) per adapted Linear."""
    return layers * sum(RANK * (i + o) for i, o in pairs)


def val_loss(model, art) -> float:
    data = artifacts.load_data(art, why="the test")
    x, y = data.val
    return token_loss(model, x, y, batch_size=64, device=torch.device("cpu"), precision="fp32").nll / y.numel()


# ------------------------------------------------------------------------------------ in the library


def test_adapters_train_alone_and_round_trip_through_the_codec(base, texts):
    from dlkit.engine.trainer import TrainConfig, fit
    from dlkit.lm.tokenizer import tokenizer_from_state

    art = artifacts.read_artifact(base)
    model = artifacts.load_model(art).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    torch.manual_seed(0)
    t = lora.attach(model, RANK, 0, "")
    assert t["targets"] == [f"blocks.{i}.attn.{p}" for i in range(DEPTH) for p in "qv"]
    assert t["trainable_params"] == hand_count(DEPTH, [(DIM, DIM), (DIM, DIM)]) == 1024
    assert t["total_params"] == base_params + t["trainable_params"] and t["alpha"] == 2 * RANK

    tok = tokenizer_from_state(art.manifest["data"]["state"]["tokenizer"])
    ids = torch.from_numpy(tok.encode(texts[1].read_text())).long()
    starts = range(0, 32 * 40, 32)
    x, y = torch.stack([ids[i:i + 32] for i in starts]), torch.stack([ids[i + 1:i + 33] for i in starts])

    def loss() -> float:
        s = token_loss(model, x, y, batch_size=64, device=torch.device("cpu"), precision="fp32")
        return s.nll / s.tokens

    start_loss = loss()
    cfg = TrainConfig(batch_size=16, lr=1e-2, weight_decay=0.1, max_steps=30, eval_every=30, precision="fp32")
    _, optimizer = fit(model, (ids, ids[:0]), (x, y), cfg, device=torch.device("cpu"), seed=0, seq_len=32)
    # The optimizer holds the adapters only (weight decay and all).
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == t["trainable_params"]
    assert loss() < start_loss - 0.02
    after = model.state_dict()
    for key, value in before.items():  # the base is frozen: every original tensor is unchanged
        adapted_key = key if key in after else key.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(after[adapted_key], value), key
    assert all(after[k].abs().sum() > 0 for k in after if ".lora_B." in k)  # B started at zero and moved

    transform = {**t, "base": {"artifact": str(base.resolve()), "sha256": art.manifest["weights"]["sha256"]}}
    tensors = lora._encode(model, transform)
    assert sorted(tensors) == sorted(k for k in after if ".lora_" in k)
    fresh = lora._rebuild(artifacts.load_model(art), transform)
    assert lora._decode(fresh, tensors, transform) == ([], [])
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x[:4]), model(x[:4]))
        merged = lora.merge(model)(x[:4])
    torch.testing.assert_close(merged, fresh(x[:4]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ dlkit train


def test_adapter_artifact_records_its_base_and_reloads_the_same(adapted, base):
    m = json.loads((adapted / "manifest.json").read_text())
    (t,) = m["model"]["transforms"]
    assert t["kind"] == "lora" and t["rank"] == RANK
    assert t["trainable_params"] == hand_count(DEPTH, [(DIM, DIM), (DIM, DIM)])
    assert t["base"] == {"artifact": str(base.resolve()), "sha256": artifacts.sha256_file(base / "model.safetensors")}
    options = m["lineage"][0]["options"]
    assert options["lora"]["trainable_params"] == t["trainable_params"] and options["lora"]["merged"] is False
    assert options["lora"]["trainable_share"] == pytest.approx(t["trainable_params"] / t["total_params"])
    keys = sorted(safe_open(str(adapted / "model.safetensors"), "pt").keys())
    assert len(keys) == 2 * 2 * DEPTH and all(".lora_A." in k or ".lora_B." in k for k in keys)

    art = artifacts.read_artifact(adapted)
    model = artifacts.load_model(art)
    base_weights = load_file(str(base / "model.safetensors"))
    assert torch.equal(model.state_dict()["blocks.0.attn.q.base_layer.weight"], base_weights["blocks.0.attn.q.weight"])
    # The loaded model scores exactly what the training run measured on its own model.
    res = ok(run("evaluate", adapted, "--json"))
    assert json.loads(res.stdout)["loss"] == pytest.approx(m["metrics"]["test_loss"], rel=1e-6)
    # The adapters learnt the new text: better than the base they started from.
    base_model = artifacts.load_model(artifacts.read_artifact(base))
    assert val_loss(model, art) < val_loss(base_model, art) - 0.02


def test_merge_writes_an_ordinary_artifact_with_the_same_outputs(adapted, base, texts, tmp_path):
    out = tmp_path / "merged"
    adapt(base, texts[1], out, "--merge")
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["transforms"] == [] and m["lineage"][0]["options"]["lora"]["merged"] is True
    assert sorted(safe_open(str(out / "model.safetensors"), "pt").keys()) == \
        sorted(safe_open(str(base / "model.safetensors"), "pt").keys())
    merged = artifacts.load_model(artifacts.read_artifact(out))
    unmerged = artifacts.load_model(artifacts.read_artifact(adapted))
    x = torch.randint(0, m["data"]["spec"]["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), rtol=1e-4, atol=1e-5)


def test_a_changed_or_missing_base_is_refused(base, texts, tmp_path):
    copy = tmp_path / "base-copy"
    shutil.copytree(base, copy)
    out = tmp_path / "adapters"
    adapt(copy, texts[1], out, steps=3)
    shutil.rmtree(copy)
    res = run("evaluate", out)
    assert res.exit_code != 0 and "the base artifact of these LoRA adapters is missing" in res.output
    shutil.copytree(base, copy)  # the same architecture, other weights: write a different weights file
    weights = load_file(str(copy / "model.safetensors"))
    weights["norm.weight"] = weights["norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(weights, str(copy / "model.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["weights"]["sha256"] = artifacts.sha256_file(copy / "model.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = run("evaluate", out)
    assert res.exit_code != 0
    assert f"the base artifact {copy.resolve()} changed since these LoRA adapters were trained on it" in res.output


def test_bad_requests_fail_in_one_line(base, texts, tmp_path):
    res = run("train", "gpt-mini", "--data-file", texts[1], "--lora-rank", "4", "--out", tmp_path / "a")
    assert res.exit_code != 0 and "LoRA adapts pretrained weights, and 'gpt-mini' starts from random ones" in res.output
    res = run("train", base, "--data-file", texts[1], "--lora-rank", "4", "--lora-targets", "nope",
              "--out", tmp_path / "b")
    assert res.exit_code != 0 and "no Linear layer named nope for LoRA" in res.output and "fc1" in res.output
    res = run("train", base, "--data-file", texts[1], "--set", "depth=3", "--out", tmp_path / "c")
    assert res.exit_code != 0 and "--set changes a registry model's config, not an artifact's" in res.output
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ hf:


def test_hf_causal_lm_adapters(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import VOCAB, save_tokenizer

    src = tmp_path / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      intermediate_size=48, max_position_embeddings=64, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    save_tokenizer(src)
    text = write_text(tmp_path / "t.txt", VOCAB[5:13], n=3000)
    out = tmp_path / "adapters"
    ok(run("train", f"hf:{src}", "--data-file", text, "--lora-rank", RANK, "--lr", "1e-2", "--seq-len", "16",
           "--batch-size", "16", "--precision", "fp32", "--max-steps", "20", "--out", out, "--quiet"))
    m = json.loads((out / "manifest.json").read_text())
    (t,) = m["model"]["transforms"]
    # q_proj: 32 -> 4 heads x 8, v_proj: 32 -> 2 key/value heads x 8
    assert t["trainable_params"] == hand_count(2, [(32, 32), (32, 16)])
    assert t["targets"] == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    assert t["base"]["hf"] == f"hf:{src.resolve()}"
    assert not (out / "config.json").exists()  # adapters alone do not load with from_pretrained
    res = ok(run("evaluate", out, "--json"))
    assert json.loads(res.stdout)["loss"] == pytest.approx(m["metrics"]["test_loss"], rel=1e-6)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["val_loss"] < history[0]["val_loss"] or history[-1]["train_loss"] < history[0]["train_loss"]

    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    res = run("evaluate", out)
    assert res.exit_code != 0 and f"the base model hf:{src.resolve()} changed since" in res.output


def test_hf_parameters_new_to_the_source_are_trained_and_saved(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dlkit.hf import make_config
    from dlkit.hf.models import create
    from dlkit.spec import TEXT, DataSpec

    src = tmp_path / "bert"
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertForMaskedLM(config).save_pretrained(src)  # no pooler, no classifier
    spec = DataSpec(TEXT, (8,), 2, vocab_size=30, class_names=("neg", "pos"))
    model = create(make_config(f"hf:{src}"), spec)
    t = lora.attach(model, RANK, 0, "", f"hf:{src}")
    assert t["trainable"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                              "classifier.weight"]
    assert t["trainable_params"] == hand_count(1, [(16, 16), (16, 16)]) + (16 * 16 + 16) + (16 * 2 + 2)
    assert sorted(lora._encode(model, t)) == sorted(
        [k for k in model.state_dict() if ".lora_" in k] + t["trainable"])
