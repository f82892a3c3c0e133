"""Language models on tiny corpora written here: training, exact generation, the KV cache,
perplexity by hand, tokenizers, resume, and the one-line errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dlkit import artifacts
from dlkit.cli import app
from dlkit.data import load_dataset
from dlkit.device import autocast
from dlkit.engine.trainer import TrainConfig, fit
from dlkit.models import create_model
from dlkit.spec import LM, TEXT, DataSpec

runner = CliRunner()
TINY = ["--set", "dim=32", "--set", "depth=2", "--set", "heads=2", "--set", "ffn_dim=64", "--set", "max_len=32"]
TINY_CFG = {"dim": 32, "depth": 2, "heads": 2, "ffn_dim": 64, "max_len": 32}
PERIOD = "the quick brown fox.\n"


def run(*args, input=None, env=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def sentences(n: int, seed: int = 0) -> str:
    """Text with structure a small model learns fast: random sentences from a few words."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sat", "ran", "on", "the", "mat", "log", "and", "a"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) + ".\n" for _ in range(n))


@pytest.fixture(scope="module")
def periodic(tmp_path_factory):
    """gpt-mini (tiny) trained on a periodic text, through the CLI."""
    folder = tmp_path_factory.mktemp("lm")
    corpus = folder / "corpus.txt"
    corpus.write_text(PERIOD * 120)
    out = folder / "art"
    res = run("train", "gpt-mini", "--data-file", corpus, *TINY, "--seq-len", "24", "--batch-size", "16",
              "--max-steps", "150", "--eval-every", "50", "--lr", "3e-3", "--warmup", "0.05", "--out", out,
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    return out, corpus


def test_training_on_periodic_text_learns_it(periodic):
    out, _ = periodic
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [50, 100, 150]
    assert history[0]["train_loss"] > history[-1]["train_loss"]
    assert history[-1]["val_loss"] < 0.1  # the text is fully predictable after its first period
    m = artifacts.read_artifact(out).manifest
    assert m["data"]["dataset"] == "text-lm" and m["data"]["spec"]["task"] == LM
    assert m["data"]["state"]["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(PERIOD)))}


def test_greedy_generation_continues_the_period_exactly(periodic):
    out, _ = periodic
    res = run("generate", out, "--prompt", "the quick", "--temperature", "0", "--max-new-tokens", "60",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    expected = (PERIOD * 5)[: len("the quick") + 60]
    assert res.stdout == expected + "\n"  # stdout: the text only; rates go to stderr
    assert "decode" in res.stderr and "tokens/s" in res.stderr


def test_generate_json_and_sampling_is_seeded(periodic):
    out, _ = periodic
    docs = []
    for seed in (1, 1, 2):
        res = run("generate", out, "--prompt", "the", "--max-new-tokens", "30", "--num-samples", "2", "--top-k",
                  "3", "--temperature", "2.0", "--seed", seed, "--json", "--device", "cpu")
        assert res.exit_code == 0, res.output
        docs.append(json.loads(res.stdout))
    assert docs[0]["samples"] == docs[1]["samples"] and docs[0]["samples"] != docs[2]["samples"]
    assert [s["new_tokens"] for s in docs[0]["samples"]] == [30, 30]
    assert docs[0]["prompt"] == "the" and all(len(s["text"]) == 30 for s in docs[0]["samples"])  # new text only


def test_prompt_from_stdin_and_without_cache_gives_the_same_text(periodic):
    out, _ = periodic
    a = run("generate", out, "-", "--temperature", "0", "--max-new-tokens", "40", "--json", input="brown")
    b = run("generate", out, "--prompt", "brown", "--temperature", "0", "--max-new-tokens", "40",
            "--no-kv-cache", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert json.loads(a.stdout)["samples"] == json.loads(b.stdout)["samples"]


def test_kv_cache_decoding_matches_the_full_forward():
    spec = DataSpec(TEXT, (32,), 50, vocab_size=50, task=LM)
    torch.manual_seed(0)
    model, _ = create_model("gpt-mini", spec, TINY_CFG)
    model.eval()
    x = torch.randint(0, 50, (3, 32))
    with torch.no_grad():
        full = model(x)
        parts, cache = [], None
        for a, b in [(0, 5), (5, 6), (6, 13)] + [(i, i + 1) for i in range(13, 32)]:
            logits, cache = model.decode(x[:, a:b], cache)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0][0].shape == (3, 2, 32, 16)  # (N, heads, positions, head_dim) per block


def test_perplexity_is_exp_of_the_mean_token_loss_by_hand(periodic, tmp_path):
    out, corpus = periodic
    other = tmp_path / "other.txt"
    other.write_text("the quick brown fox.\nthe fox quick brown.\n" * 3)
    res = run("evaluate", out, "--data-file", other, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    art = artifacts.read_artifact(out)
    model = artifacts.load_model(art)
    chars = art.manifest["data"]["state"]["tokenizer"]["chars"]
    ids = torch.tensor([chars.index(c) for c in other.read_text()])
    n = (len(ids) - 1) // 24
    x, y = ids[: n * 24].view(n, 24), ids[1 : n * 24 + 1].view(n, 24)
    with torch.no_grad(), autocast(torch.device("cpu"), art.precision):  # evaluated as it was trained
        logp = torch.log_softmax(model(x).float(), -1)
    by_hand = -logp.gather(-1, y[..., None]).mean().item()
    assert doc["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert doc["perplexity"] == pytest.approx(math.exp(by_hand), rel=1e-5)
    assert doc["bits_per_char"] == pytest.approx(by_hand / math.log(2), rel=1e-5)  # char: one token per char
    assert doc["tokens"] == n * 24 and doc["windows"] == n


def test_bpe_tokenizer_round_trips_and_is_saved(tmp_path):
    pytest.importorskip("tokenizers")
    from dlkit.lm.tokenizer import BPETokenizer, tokenizer_from_state

    text = sentences(300) + "Ünïcödé — and emoji 🙂 too.\n"
    tok = BPETokenizer.build(text, 300)
    assert tok.vocab_size == 300
    unseen = "A text it never saw: naïve café, 3.14 ≠ π 🚀\n\n  spaces  kept "
    for t in (text, unseen):
        ids = tok.encode(t)
        assert tok.decode(ids.tolist()) == t
    assert len(tok.encode(text)) < 0.6 * len(text.encode())  # merges learned on the training text
    again = tokenizer_from_state(json.loads(json.dumps(tok.to_state())))
    assert again.encode(unseen).tolist() == tok.encode(unseen).tolist()


def test_bpe_dataset_caches_token_ids_and_reports_bits_per_byte(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "c.txt"
    corpus.write_text(sentences(400))
    opts = {"data_file": str(corpus), "tokenizer": "bpe", "vocab_size": 300, "seq_len": 16}
    a = load_dataset("text-lm", options=opts)
    b = load_dataset("text-lm", options=opts)  # from the token cache
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.val[0], b.val[0])
    assert 256 < a.spec.vocab_size <= 300 and a.state["unit"] == "byte"  # merges stop when the text runs out
    assert a.val[0].shape[1] == 16 and torch.equal(a.val[0][:, 1:], a.val[1][:, :-1])
    splits = a.state["splits"]
    assert splits["val"]["chars"] == round(0.1 * len(corpus.read_text()))
    assert splits["val"]["tokens"] < splits["val"]["bytes"] == splits["val"]["chars"]


def test_validation_is_the_contiguous_tail(tmp_path):
    corpus = tmp_path / "c.txt"
    text = sentences(200)
    corpus.write_text(text)
    data = load_dataset("text-lm", options={"data_file": str(corpus), "seq_len": 8})
    chars = data.state["tokenizer"]["chars"]
    n_val = round(0.1 * len(text))
    train_text = "".join(chars[i] for i in data.train[0].tolist())
    assert train_text == text[: len(text) - n_val]
    first_val = "".join(chars[i] for i in data.val[0][0].tolist())
    assert first_val == text[len(text) - n_val :][:8]


def test_resume_mid_run_equals_an_uninterrupted_run(tmp_path):
    from dlkit.engine.checkpoint import load_checkpoint, save_checkpoint

    corpus = tmp_path / "c.txt"
    corpus.write_text(sentences(300))
    data = load_dataset("text-lm", options={"data_file": str(corpus), "seq_len": 16})
    cfg = TrainConfig(batch_size=8, lr=3e-3, schedule="cosine", warmup=0.1, weight_decay=0.1, grad_clip=1.0,
                      max_steps=40, eval_every=15, eval_batches=2)
    cpu = torch.device("cpu")

    def model(seed=0):
        torch.manual_seed(seed)
        return create_model("gpt-mini", data.spec, {**TINY_CFG, "dropout": 0.1})[0]

    ref = model()
    ref_state, _ = fit(ref, data.train, data.val, cfg, device=cpu, seed=3, seq_len=16)
    assert ref_state.step == 40 and [r["step"] for r in ref_state.history] == [15, 30, 40]
    calls = {"n": 0}

    def stop_after_20():
        calls["n"] += 1
        return calls["n"] >= 20

    m = model()
    state, opt = fit(m, data.train, data.val, cfg, device=cpu, seed=3, seq_len=16, should_stop=stop_after_20)
    assert not state.completed and state.step == 19 and state.epoch == 1  # mid-way through the 2nd interval
    save_checkpoint(tmp_path, m, opt, state, {})
    torch.manual_seed(12345)
    resumed = model(seed=99)
    st, opt_state, _ = load_checkpoint(tmp_path, resumed)
    assert resumed.head.weight is resumed.wte.weight  # the tied weight survives the checkpoint
    final, _ = fit(resumed, data.train, data.val, cfg, device=cpu, seed=3, seq_len=16, state=st,
                   optimizer_state=opt_state)
    assert final.completed
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["val_loss"] for r in final.history] == [r["val_loss"] for r in ref_state.history]


def test_gpt2_is_a_language_model_by_default():
    from dlkit.data import spec_for
    from dlkit.models import MODELS

    with torch.device("meta"):
        model, _ = create_model("gpt2", spec_for(MODELS.get("gpt2").native_dataset))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.head.weight is model.wte.weight


# ---- errors: one line, a hint, nothing written -------------------------------------------------------

def _fails(res, *words):
    assert res.exit_code != 0
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error:"), res.stderr
    for w in words:
        assert w in line, line
    assert res.stdout == ""


@pytest.mark.parametrize("content,words", [
    (b"", ("is empty",)),
    (b"  \n\n", ("is empty",)),
    (b"caf\xe9 au lait " * 20, ("not UTF-8", "line 1")),
    (b"short text.\n", ("shorter than one window",)),
])
def test_bad_corpora_fail_in_one_line_and_write_nothing(tmp_path, content, words):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(content)
    out = tmp_path / "art"
    _fails(run("train", "gpt-mini", "--data-file", corpus, *TINY, "--seq-len", "16", "--max-steps", "2",
               "--out", out), *words)
    assert not out.exists() and not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".art*"))


def test_seq_len_beyond_the_context_fails_in_one_line(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(sentences(100))
    out = tmp_path / "art"
    _fails(run("train", "gpt-mini", "--data-file", corpus, *TINY, "--seq-len", "48", "--out", out),
           "48 tokens", "max_len=32")
    assert not out.exists()


def test_prompt_outside_the_char_vocabulary_names_the_characters(periodic):
    out, _ = periodic
    _fails(run("generate", out, "--prompt", "the QUICK?", "--temperature", "0"), "'?'", "'Q'", "'U'")


def test_classifier_artifact_is_refused_by_generate(tmp_path):
    res = run("train", "mlp", "--dataset", "digits", "--epochs", "1", "--out", tmp_path / "mlp")
    assert res.exit_code == 0, res.output
    _fails(run("generate", tmp_path / "mlp", "--prompt", "x"), "not a language model")


def test_tinyshakespeare_is_found_in_data_dir_and_checked(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    from dlkit.errors import DataError

    with pytest.raises(DataError, match="download disabled"):
        load_dataset("tinyshakespeare", data_dir=tmp_path)
    (tmp_path / "tinyshakespeare.txt").write_text(sentences(200))
    data = load_dataset("tinyshakespeare", data_dir=tmp_path, options={"seq_len": 32})
    assert "tinyshakespeare.txt (data-dir)" in data.source and data.spec.task == LM
    assert any("not the published md5:6fb458f1232090904fb40fe944165e91" in r.getMessage() for r in caplog.records)


def test_hf_causal_lm_generates_alike_with_and_without_cache(tmp_path):
    """An hf: LLaMA-style model (built here, random weights) through the same generate: greedy text
    with the KV cache equals the text without it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from dlkit.lm.tokenizer import BPETokenizer

    bpe = BPETokenizer.build(sentences(200), 300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tok)
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    docs = []
    for cache in ("--kv-cache", "--no-kv-cache"):
        res = run("generate", f"hf:{folder}", "--prompt", "the cat sat", "--temperature", "0", "--max-new-tokens",
                  "12", cache, "--json", env={"HF_HUB_OFFLINE": "1"})
        assert res.exit_code == 0, res.output
        docs.append(json.loads(res.stdout))
    assert docs[0]["samples"] == docs[1]["samples"] and docs[0]["samples"][0]["new_tokens"] == 12


def test_profile_reports_lm_cost_by_hand(periodic):
    """Per-token MACs (weights + attention over the window), KV-cache bytes, measured latencies."""
    out, _ = periodic
    res = run("profile", out, "--json", "--training", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    lm = doc["lm"]
    d, depth, ffn, seq = 32, 2, 64, 24
    art = artifacts.read_artifact(out)
    vocab, element = art.spec.vocab_size, 4 if art.precision == "fp32" else 2  # bf16 where dlkit chose it
    per_token = depth * (4 * d * d + 2 * d * ffn + 2 * seq * d) + d * vocab  # q k v proj, fc1 fc2, qk^T and pv, head
    assert lm["seq_len"] == seq and lm["macs_per_token"] == per_token
    assert 2.5 * per_token < lm["training_macs_per_token"] < 3.5 * per_token  # backward about twice the forward
    assert lm["kv_cache_bytes_per_token"] == depth * 2 * d * element  # keys and values
    assert lm["kv_cache_bytes_per_sequence"] == seq * lm["kv_cache_bytes_per_token"]
    assert lm["prefill"]["median_ms"] > 0 and lm["decode"]["tokens_per_s"] > 0
    classifier = json.loads(run("profile", "mlp", "--dataset", "digits", "--json", "--no-latency").stdout)
    assert classifier["lm"] is None


def test_prune_and_quantize_report_perplexity_and_still_generate(periodic, tmp_path):
    out, _ = periodic
    pruned, int8 = tmp_path / "pruned", tmp_path / "int8"
    p = run("prune", out, "--ratio", "0.5", "--out", pruned, "--json")
    assert p.exit_code == 0, p.output
    pd = json.loads(p.stdout)
    assert pd["after"]["test_perplexity"] >= 1 and pd["before"]["test_perplexity"] >= 1
    assert pd["ratios"]["test_perplexity_ratio"] == pytest.approx(pd["after"]["test_perplexity"]
                                                                  / pd["before"]["test_perplexity"])
    assert pd["ratios"]["params"] < 0.8
    q = run("quantize", out, "--mode", "dynamic", "--out", int8, "--repeats", "1", "--no-onnxruntime", "--json")
    assert q.exit_code == 0, q.output
    qd = json.loads(q.stdout)
    assert qd["verified"] and qd["after"]["perplexity"] == pytest.approx(qd["before"]["perplexity"], rel=0.05)
    assert artifacts.read_artifact(int8).manifest["metrics"]["test_perplexity"] == qd["after"]["perplexity"]
    for art in (pruned, int8):
        g = run("generate", art, "--prompt", "the", "--max-new-tokens", "20", "--json")
        assert g.exit_code == 0, g.output
        assert json.loads(g.stdout)["samples"][0]["new_tokens"] == 20
    e = run("evaluate", int8, "--json")
    assert e.exit_code == 0 and json.loads(e.stdout)["perplexity"] == pytest.approx(qd["after"]["perplexity"])
