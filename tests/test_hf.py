"""Hugging Face models (hf:DIR): tiny BERT, GPT-2 and LLaMA-style models are built from configs in
the test (from_config + save_pretrained into a temporary folder; no network)."""

from __future__ import annotations

import csv
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402

from dlkit.cli import app  # noqa: E402

runner = CliRunner()

WORDS = ["good", "great", "fine", "bad", "awful", "poor"] + [f"w{i}" for i in range(40)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
H, LAYERS, HEADS, FFN, POS = 32, 2, 4, 64, 64


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(res):
    assert res.exit_code == 0, res.output
    return res


def save_tokenizer(folder: Path) -> None:
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)


def write_task(path: Path, rows: int = 240) -> Path:
    """Two classes: a positive or a negative word among six filler words."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            key = rng.choice(["good", "great", "fine"] if i % 2 else ["bad", "awful", "poor"])
            fill = [f"w{rng.randrange(40)}" for _ in range(6)]
            fill.insert(rng.randrange(7), key)
            w.writerow([" ".join(fill), "pos" if i % 2 else "neg"])
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=H, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=POS)
    transformers.BertForMaskedLM(bert).save_pretrained(root / "bert")
    save_tokenizer(root / "bert")
    gpt2 = transformers.GPT2Config(vocab_size=len(VOCAB), n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=POS,
                                   bos_token_id=3, eos_token_id=3)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    llama = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=H, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                     max_position_embeddings=POS, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    save_tokenizer(root / "llama")
    write_task(root / "task.csv")
    return root


# ---------------------------------------------------------------------------------- profile


def profile(target, *args):
    res = ok(run("profile", target, "--json", *args))
    return json.loads(res.stdout)


def bert_count(v, h, layers, ffn, pos):
    emb = v * h + pos * h + 2 * h + 2 * h  # words, positions, token types, LayerNorm
    block = 4 * (h * h + h) + 2 * h + (h * ffn + ffn) + (ffn * h + h) + 2 * h
    return emb + layers * block + h * h + h  # + the pooler


def test_profile_counts_match_a_hand_count(folders):
    L = 16
    d = profile(f"hf:{folders / 'bert'}", "--seq-len", L)
    assert d["params"]["total"] == bert_count(len(VOCAB), H, LAYERS, FFN, POS)
    linear = L * (4 * H * H + 2 * H * FFN)  # q, k, v, out; the two FFN matmuls
    attention = 2 * HEADS * L * L * (H // HEADS)  # q k^T and p v
    assert d["macs"] == LAYERS * (linear + attention) + H * H  # + the pooler on the first token
    assert d["uncounted"] == {}

    g = profile(f"hf:{folders / 'gpt2'}", "--seq-len", L)
    emb = len(VOCAB) * H + POS * H
    block = 2 * 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + (H * 4 * H + 4 * H) + (4 * H * H + H)
    assert g["params"]["total"] == emb + LAYERS * block + 2 * H
    assert g["macs"] == LAYERS * (L * (3 * H * H + H * H + 8 * H * H) + 2 * HEADS * L * L * (H // HEADS))

    # LLaMA-style: grouped-query attention (4 query heads, 2 key/value heads of 8), SwiGLU, RMSNorm
    ll = profile(f"hf:{folders / 'llama'}", "--seq-len", L)
    block = H * 32 + 2 * H * 16 + 32 * H + 3 * H * 48 + 2 * H
    assert ll["params"]["total"] == len(VOCAB) * H + LAYERS * block + H
    attention = 2 * HEADS * L * L * 8
    assert ll["macs"] == LAYERS * (L * (H * 32 + 2 * H * 16 + 32 * H + 3 * H * 48) + attention)


def test_profile_published_configs_on_meta(tmp_path):
    bert = {"model_type": "bert", "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 512,
            "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522}
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}
    for name, cfg, params in (("bert-base-uncased", bert, 109_482_240), ("gpt2", gpt2, 124_439_808)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        d = profile(f"hf:{tmp_path / name}", "--seq-len", "8", "--no-measure")  # counts: any length
        assert d["params"]["total"] == params and d["counted_on"] == "meta"
        assert d["input_shape"] == [1, 8] and d["uncounted"] == {}


def test_profile_lm_head_is_tied_and_set_changes_the_config(folders):
    base = profile(f"hf:{folders / 'gpt2'}", "--seq-len", "8")
    lm = profile(f"hf:{folders / 'gpt2'}", "--seq-len", "8", "--set", "head=lm")
    assert lm["params"]["total"] == base["params"]["total"]  # the LM head shares the embedding
    one = profile(f"hf:{folders / 'gpt2'}", "--seq-len", "8", "--set", "n_layer=1")
    assert one["params"]["total"] < base["params"]["total"]


# ---------------------------------------------------------------------------------- safety


def test_remote_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for args in (("profile", f"hf:{folder}"), ("train", f"hf:{folder}", "--dataset", "text-csv", "--data-file",
                                                  write_task(tmp_path / "t.csv"), "--out", tmp_path / "o")):
        res = run(*args)
        assert res.exit_code == 2, res.output
        assert "own Python code" in res.stderr and "trust_remote_code" in res.stderr
        assert len(res.stderr.strip().splitlines()) <= 2 and "Traceback" not in res.output
    assert not marker.exists() and not (tmp_path / "o").exists()


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_weights_are_refused_with_how_to_convert(folders, tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickled"
    shutil.copytree(folders / "bert", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    ok(run("profile", f"hf:{folder}", "--seq-len", "8"))  # profile needs config.json only
    res = run("train", f"hf:{folder}", "--dataset", "text-csv", "--data-file", folders / "task.csv",
              "--out", tmp_path / "o", "--epochs", "1")
    assert res.exit_code == 2, res.output
    assert "pytorch_model.bin" in res.stderr and "safetensors" in res.stderr and "save_pretrained" in res.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_offline_hub_name_says_what_was_tried(tmp_path):
    res = run("profile", "hf:nobody-here/no-such-model", env={"DLKIT_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert res.exit_code != 0
    assert "Hugging Face cache" in res.stderr and "DLKIT_OFFLINE" in res.stderr and "Traceback" not in res.output


# ---------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def tuned(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "bert"
    res = ok(run("train", f"hf:{folders / 'bert'}", "--dataset", "text-csv", "--data-file", folders / "task.csv",
                 "--max-len", "16", "--lr", "3e-3", "--epochs", "5", "--out", out, "--seed", "0", "--quiet"))
    assert res.stdout.strip() == str(out)
    return out


def test_finetune_reaches_high_accuracy_and_is_an_ordinary_artifact(tuned, folders):
    m = json.loads((tuned / "manifest.json").read_text())
    assert m["metrics"]["test_accuracy"] >= 0.9
    assert m["model"]["family"] == "hf" and m["model"]["config"]["hf_config"]["num_hidden_layers"] == LAYERS
    assert m["model"]["config"]["hf_config"]["model_type"] == "bert"
    tok = m["data"]["state"]["tokenizer"]
    assert tok["name"] == "hf" and json.loads(tok["tokenizer_json"])["model"]["type"] == "WordPiece"
    assert m["data"]["spec"]["input_shape"] == [16] and m["data"]["spec"]["class_names"] == ["neg", "pos"]
    assert (tuned / "model.safetensors").is_file() and not list(tuned.glob("*.bin"))
    # The folder is also a transformers folder: same logits from from_pretrained
    from dlkit import artifacts

    model = artifacts.load_model(artifacts.read_artifact(tuned))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tuned).eval()
    x = torch.tensor([[2, 5, 12, 20, 3, 0, 0, 0], [2, 10, 30, 3, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(model(x), hf(input_ids=x, attention_mask=(x != 0).long()).logits, atol=1e-6)
    assert transformers.AutoTokenizer.from_pretrained(tuned)("good w1")["input_ids"] == [2, 5, 12, 3]


def test_evaluate_reloads_without_the_source_or_network(tuned, folders, tmp_path):
    csv_copy = shutil.copy(folders / "task.csv", tmp_path / "task.csv")
    moved = tmp_path / "gone"
    shutil.move(folders / "bert", moved)
    try:
        res = ok(run("evaluate", tuned, "--data-file", csv_copy, "--json", env={"DLKIT_OFFLINE": "1"}))
    finally:
        shutil.move(moved, folders / "bert")
    doc = json.loads(res.stdout)
    assert doc["accuracy"] >= 0.9 and doc["model"] == f"hf:{folders / 'bert'}"


def test_load_tokenizer_and_text_options(folders):
    from dlkit.data import load_dataset
    from dlkit.errors import UsageError
    from dlkit.hf import load_tokenizer

    tok = load_tokenizer(f"hf:{folders / 'bert'}")
    assert tok("bad w3")["input_ids"] == [2, 8, 14, 3]
    b = load_dataset("text-csv", options={"data_file": str(folders / "task.csv"), "tokenizer": f"hf:{folders / 'bert'}",
                                          "max_len": 6})
    assert b.spec.vocab_size == len(VOCAB) and b.train[0].shape[1] == 6
    assert (b.train[0][:, 0] == 2).all()  # [CLS] first; long texts truncated with [SEP] kept
    assert ((b.train[0] == 3).sum(1) == 1).all()
    with pytest.raises(UsageError, match="vocab-size"):
        load_dataset("text-csv", options={"data_file": str(folders / "task.csv"), "tokenizer": f"hf:{folders / 'bert'}",
                                          "vocab_size": 100})


# ---------------------------------------------------------------------------------- prune and quantize


def _logits(path, x):
    from dlkit import artifacts

    with torch.no_grad():
        return artifacts.load_model(artifacts.read_artifact(path))(x)


def prune(source, out) -> dict:
    """The library call the CLI makes, timed briefly (one latency repeat)."""
    from dlkit.compress.prune import PruneOptions, prune_artifact

    return prune_artifact(source, PruneOptions(ratio=0.5, out=out, latency_repeats=1)).to_dict()


def test_prune_bert_ffn_reloads_both_ways_with_the_same_outputs(tuned, tmp_path):
    from dlkit import artifacts
    from dlkit.hf.prune import prune_model

    out = tmp_path / "pruned"
    res = ok(run("prune", tuned, "--ratio", "0.5", "--out", out, "--json"))
    doc = json.loads(res.stdout)
    assert doc["widths_before"]["intermediate_size"] == FFN and doc["widths_after"]["intermediate_size"] == FFN // 2
    assert any("heads kept" in n for n in doc["notes"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == FFN // 2
    x = torch.tensor([[2, 5, 12, 20, 3, 0, 0, 0], [2, 10, 30, 3, 0, 0, 0, 0]])
    expected = artifacts.load_model(artifacts.read_artifact(tuned))
    prune_model(expected, 0.5)  # the same slicing, in memory, before anything is saved
    with torch.no_grad():
        want = expected(x)
    assert torch.allclose(_logits(out, x), want, atol=1e-6)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x, attention_mask=(x != 0).long()).logits, want, atol=1e-6)


def test_prune_llama_heads_keeps_gqa_consistent(folders, tmp_path):
    art = tmp_path / "llama"
    ok(run("train", f"hf:{folders / 'llama'}", "--dataset", "text-csv", "--data-file", folders / "task.csv",
           "--max-len", "12", "--epochs", "1", "--out", art, "--quiet"))
    out = tmp_path / "llama-pruned"
    doc = prune(art, out)
    assert doc["widths_after"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                                   "intermediate_size": 24}
    assert doc["after"]["params"] < doc["before"]["params"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 8)
    x = torch.tensor([[2, 5, 12, 20, 3, 0, 0, 0], [2, 10, 30, 3, 0, 0, 0, 0]])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.model.layers[0].self_attn.k_proj.out_features == 8
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x, attention_mask=(x != 0).long()).logits, _logits(out, x), atol=1e-6)


def test_quantize_dynamic_reaches_every_linear(tuned, tmp_path):
    out = tmp_path / "int8"
    doc = json.loads(ok(run("quantize", tuned, "--mode", "dynamic", "--out", out, "--json", "--no-onnxruntime",
                            "--repeats", "1")).stdout)
    linears = LAYERS * 6 + 2  # q, k, v, out, FFN in and out per block; pooler; classifier
    assert len(doc["quantized_layers"]) == linears
    assert doc["verified"] and doc["after"]["size_bytes"] < doc["before"]["size_bytes"]
    from dlkit import artifacts

    model = artifacts.load_model(artifacts.read_artifact(out))
    assert sum(isinstance(m, torch.nn.Linear) and not hasattr(m, "_packed_params") for m in model.modules()) == 0


# ---------------------------------------------------------------------------------- causal LM protocol


def test_causal_lm_decode_continues_the_forward(folders):
    from dlkit.hf import make_config
    from dlkit.hf.models import create
    from dlkit.spec import TEXT, DataSpec

    spec = DataSpec(TEXT, (16,), len(VOCAB), vocab_size=len(VOCAB), task="lm")
    model = create(make_config(f"hf:{folders / 'gpt2'}"), spec).eval()
    ids = torch.randint(4, len(VOCAB), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        assert full.shape == (2, 9, len(VOCAB))
        logits, cache = model.decode(ids[:, :6], None)
        steps = [logits]
        for t in range(6, 9):
            logits, cache = model.decode(ids[:, t:t + 1], cache)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_quantize_dynamic_reaches_gpt2_conv1d_projections(folders, tmp_path):
    art, out = tmp_path / "gpt2", tmp_path / "gpt2-int8"
    shutil.copytree(folders / "gpt2", tmp_path / "src")
    save_tokenizer(tmp_path / "src")
    ok(run("train", f"hf:{tmp_path / 'src'}", "--dataset", "text-csv", "--data-file", folders / "task.csv",
           "--max-len", "12", "--epochs", "1", "--out", art, "--quiet"))
    doc = json.loads(ok(run("quantize", art, "--mode", "dynamic", "--out", out, "--json", "--no-onnxruntime",
                            "--repeats", "1")).stdout)
    assert len(doc["quantized_layers"]) == LAYERS * 4 + 1  # c_attn, attn c_proj, c_fc, mlp c_proj; score
    assert doc["verified"]
    x = torch.tensor([[2, 5, 12, 20, 3, 0, 0, 0], [2, 10, 30, 3, 0, 0, 0, 0]])
    before, after = _logits(art, x), _logits(out, x)
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=0.05)


def test_vision_config_trains_on_images_and_text_models_refuse_them(tmp_path):
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        num_channels=1)).save_pretrained(folder)
    res = ok(run("train", f"hf:{folder}", "--dataset", "digits", "--epochs", "2", "--lr", "1e-3", "--json",
                 "--out", tmp_path / "a", "--quiet"))
    history = json.loads(res.stdout)["history"]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    res = run("train", f"hf:{bert}", "--dataset", "digits", "--epochs", "1", "--out", tmp_path / "b")
    assert res.exit_code == 2 and "has no image classifier" in res.stderr and not (tmp_path / "b").exists()


def test_imdb_with_the_model_tokenizer_reloads_from_its_state(folders, tmp_path):
    from dlkit.data import load_dataset

    for split in ("train", "test"):
        for lab, word in (("neg", "bad"), ("pos", "good")):
            d = tmp_path / "aclImdb" / split / lab
            d.mkdir(parents=True)
            for i in range(6):
                (d / f"{i}_1.txt").write_text(f"w{i} {word} w{i + 1}<br />w{i + 2} w3 w4 w5 w6 w7")
    name = f"hf:{folders / 'bert'}"
    b = load_dataset("imdb", data_dir=tmp_path, options={"tokenizer": name, "max_len": 8})
    assert b.spec.vocab_size == len(VOCAB) and b.test[0].shape == (12, 8)
    assert (b.test[0][:, 0] == 2).all() and (b.test[0][:, -1] == 3).all()  # truncated, [SEP] kept
    again = load_dataset("imdb", data_dir=tmp_path, state=json.loads(json.dumps(b.state)))
    assert torch.equal(again.test[0], b.test[0]) and torch.equal(again.train[0], b.train[0])


def test_prune_an_hf_causal_lm_directly(folders, tmp_path):
    out = tmp_path / "llama-lm-pruned"
    doc = prune(f"hf:{folders / 'llama'}", out)
    assert doc["widths_after"]["num_attention_heads"] == 2 and doc["widths_after"]["intermediate_size"] == 24
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["config"]["head"] == "lm" and m["data"]["spec"]["task"] == "lm"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(4, len(VOCAB), (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, _logits(out, x), atol=1e-5)
