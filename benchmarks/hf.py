"""Hugging Face models in dlkit (issue 12): profile counts, pruning and int8 speed-ups, fine-tuning.

1. Profile counts of published configs, written here as config.json files (bert-base-uncased,
   gpt2) and counted on the meta device from the config alone (no weights anywhere):
   targets 109,482,240 and 124,439,808 parameters.
2. Pruning a BERT-base-shaped model (12 blocks, hidden 768, 12 heads of 64, FFN 3072) at
   sequence 128, batch 8, timed by dlkit.profiling.measure_models (the two models in alternation,
   as ``dlkit prune`` does): target >= 1.7x for heads 50% + FFN 50%. Two rows:
   - ``llama-bert-base``: a LLaMA-style config of those widths (GQA off: 12 key/value heads,
     SwiGLU, RMSNorm), heads and FFN pruned, reloads through from_pretrained;
   - ``bert-base``: transformers' BERT, whose config derives the head size from
     hidden_size / num_attention_heads (transformers 5 has no pruned_heads): FFN 50% only.
3. Dynamic int8 of every Linear of the BERT-base model (the same measurement): target >= 2.0x on a
   CPU with AVX512-VNNI or AMX; the CPU flags are in the JSON.
4. Fine-tuning a small BERT-style HF model (its own WordPiece tokenizer) on a generated CSV task
   against dlkit's own transformer of similar size (dlkit's word tokenizer): accuracy, samples/s.

    python benchmarks/hf.py [--tiny] [--threads N] [--repeats 10] [--epochs 3]

``--tiny`` shrinks every model (a smoke run that proves the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from common import machine, print_table as _print_table, write_json


def print_table(title: str, rows: list[dict]) -> None:
    cols = [k for k in rows[0] if not isinstance(rows[0][k], dict)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v

    _print_table(title, cols, [[fmt(r.get(c)) for c in cols] for r in rows])

BERT_BASE_UNCASED = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                     "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
                     "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                     "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
                     "type_vocab_size": 2, "vocab_size": 30522}
GPT2 = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "resid_pdrop": 0.1, "vocab_size": 50257}
PUBLISHED = {"bert-base-uncased": (BERT_BASE_UNCASED, 109_482_240), "gpt2": (GPT2, 124_439_808)}


def profile_counts(tmp: Path) -> list[dict]:
    from dlkit.profiling import ProfileOptions, profile_target

    rows = []
    for name, (cfg, want) in PUBLISHED.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps(cfg))
        t = time.perf_counter()
        r = profile_target(f"hf:{tmp / name}", ProfileOptions(seq_len=128, batch_size=1, latency=False, measure=False))
        rows.append({"model": name, "params": r.params["total"], "published": want,
                     "exact": r.params["total"] == want, "counted_on": r.counted_on,
                     "gmacs_seq128": r.forward["macs_per_batch"] / 1e9, "seconds": time.perf_counter() - t})
    return rows


def widths(tiny: bool) -> dict:
    return (dict(hidden=64, layers=2, heads=4, ffn=256, vocab=1000) if tiny else
            dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=30522))


def bert_model(w: dict, seq: int):
    from transformers import BertConfig

    from dlkit.hf.models import HFModelConfig, construct
    from dlkit.spec import TEXT, DataSpec

    cfg = BertConfig(vocab_size=w["vocab"], hidden_size=w["hidden"], num_hidden_layers=w["layers"],
                     num_attention_heads=w["heads"], intermediate_size=w["ffn"], max_position_embeddings=512)
    spec = DataSpec(TEXT, (seq,), 2, vocab_size=w["vocab"])
    torch.manual_seed(0)
    return construct(HFModelConfig(hf_config=cfg.to_dict(), head="classify", pretrained=False), spec).eval(), spec


def llama_model(w: dict, seq: int):
    from transformers import LlamaConfig

    from dlkit.hf.models import HFModelConfig, construct
    from dlkit.spec import TEXT, DataSpec

    cfg = LlamaConfig(vocab_size=w["vocab"], hidden_size=w["hidden"], num_hidden_layers=w["layers"],
                      num_attention_heads=w["heads"], num_key_value_heads=w["heads"],
                      head_dim=w["hidden"] // w["heads"],
                      intermediate_size=w["ffn"], max_position_embeddings=512, pad_token_id=0)
    spec = DataSpec(TEXT, (seq,), 2, vocab_size=w["vocab"])
    torch.manual_seed(0)
    return construct(HFModelConfig(hf_config=cfg.to_dict(), head="classify", pretrained=False), spec).eval(), spec


def timed(pairs: list[tuple[str, torch.nn.Module, dict | None]], samples: torch.Tensor, batch: int, repeats: int):
    from dlkit.profiling.measure import Subject, measure_models

    subjects = [Subject(m, samples, "fp32", transform=t) for _, m, t in pairs]
    return measure_models(subjects, device="cpu", batches=(batch,), repeats=repeats)


def compress_rows(tiny: bool, seq: int, batch: int, repeats: int) -> list[dict]:
    from dlkit.compress.quantize import quantize_dynamic
    from dlkit.hf.prune import prune_model

    w = widths(tiny)
    samples = torch.randint(1, w["vocab"], (batch, seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, make, what in (("llama-bert-base", llama_model, "heads 50% + FFN 50%"),
                             ("bert-base", bert_model, "FFN 50% (heads kept)")):
        model, _ = make(w, seq)
        pruned = copy.deepcopy(model)
        done = prune_model(pruned, 0.5)
        before, after = timed([("fp32", model, None), ("pruned", pruned, None)], samples, batch, repeats)
        rows.append({"model": name, "change": what, "params_before": before.params, "params_after": after.params,
                     "macs_ratio": after.macs / before.macs, "ms_before": before.latency_ms[batch],
                     "ms_after": after.latency_ms[batch], "speedup": before.latency_ms[batch] / after.latency_ms[batch],
                     "widths": {k: v for k, v in done.items() if k != "notes"}})
    model, _ = bert_model(w, seq)
    int8 = quantize_dynamic(copy.deepcopy(model))
    kind = {"kind": "quantize", "mode": "dynamic", "backend": torch.backends.quantized.engine}
    before, after = timed([("fp32", model, None), ("int8", int8, kind)], samples, batch, repeats)
    rows.append({"model": "bert-base", "change": "dynamic int8 (every Linear)", "params_before": before.params,
                 "params_after": after.params, "macs_ratio": 1.0, "ms_before": before.latency_ms[batch],
                 "ms_after": after.latency_ms[batch], "speedup": before.latency_ms[batch] / after.latency_ms[batch],
                 "size_ratio": after.size_bytes / before.size_bytes})
    return rows


# ------------------------------------------------------------------------------------ fine-tuning

POS, NEG = ["good", "great", "fine", "superb", "lovely"], ["bad", "awful", "poor", "dull", "boring"]


def write_task(path: Path, rows: int, fillers: int = 200) -> None:
    """Sentiment by majority with negation: 'not good' counts as negative, 'not bad' as positive."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for _ in range(rows):
            words, score = [f"w{rng.randrange(fillers)}" for _ in range(10)], 0
            for _ in range(rng.choice((1, 3))):
                positive, negated = rng.random() < 0.5, rng.random() < 0.3
                pair = (["not"] if negated else []) + [rng.choice(POS if positive else NEG)]
                score += 1 if positive != negated else -1
                i = rng.randrange(len(words) + 1)
                words[i:i] = pair
            out.writerow([" ".join(words), "pos" if score > 0 else "neg"])


def save_small_bert(folder: Path, fillers: int, tiny: bool) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", *POS, *NEG] + [f"w{i}" for i in range(fillers)]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    dim = 32 if tiny else 64
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=2 * dim, max_position_embeddings=64)).save_pretrained(folder)


def finetune_rows(tmp: Path, tiny: bool, epochs: int) -> list[dict]:
    from dlkit import artifacts
    from dlkit.api import TrainRequest, train_model

    fillers = 200
    write_task(tmp / "task.csv", 400 if tiny else 4000, fillers)
    save_small_bert(tmp / "small-bert", fillers, tiny)
    dim = "32" if tiny else "64"
    runs = {"hf small BERT (own WordPiece)": (f"hf:{tmp / 'small-bert'}", {}),
            "dlkit transformer (word tokenizer)": ("transformer", {"dim": dim, "ffn_dim": str(2 * int(dim)),
                                                                    "heads": "4", "depth": "2"})}
    rows = []
    for label, (model, overrides) in runs.items():
        req = TrainRequest(model=model, dataset="text-csv", overrides=overrides, out=tmp / label.split()[0],
                           options={"epochs": epochs, "lr": 1e-3, "batch_size": 32, "schedule": "cosine",
                                    "warmup": 0.1},
                           data_options={"data_file": str(tmp / "task.csv"), "max_len": 24})
        t = time.perf_counter()
        res = train_model(req)
        params = sum(p.numel() for p in artifacts.load_model(artifacts.read_artifact(res.artifact)).parameters())
        rows.append({"model": label, "params": params, "test_accuracy": res.test.accuracy,
                     "samples_per_s": res.manifest["metrics"]["samples_per_s"], "seconds": time.perf_counter() - t})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models: a smoke run, not a measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = {"machine": machine(), "tiny": args.tiny, "seq": args.seq, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="dlkit-bench-hf-") as tmp:
        tmp = Path(tmp)
        doc["profile"] = profile_counts(tmp)
        print_table("profile counts from config.json, on meta", doc["profile"])
        doc["compress"] = compress_rows(args.tiny, args.seq, args.batch, args.repeats)
        print_table(f"CPU latency at batch {args.batch}, sequence {args.seq} (target: pruning >= 1.7x, int8 >= 2.0x "
                    "with AVX512-VNNI/AMX)", doc["compress"])
        doc["finetune"] = finetune_rows(tmp, args.tiny, 1 if args.tiny else args.epochs)
        print_table("fine-tuning on a generated CSV task", doc["finetune"])
    write_json("hf-tiny" if args.tiny else "hf", doc)


if __name__ == "__main__":
    main()
