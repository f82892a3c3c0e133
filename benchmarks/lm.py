"""Language models: nanoGPT's CPU Shakespeare run, generation with a KV cache, dynamic int8.

Part 1 -- training. nanoGPT's published CPU example (``train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``: validation loss 1.88) against
``dlkit train gpt-mini --dataset tinyshakespeare`` (the same shape, batch, context and steps: its
defaults). The other contender is nanoGPT itself when ``--nanogpt DIR`` names a checkout
(its ``data/shakespeare_char`` is prepared from the same text), else ``plain``: a plain PyTorch loop
written here with nanoGPT's model (fused qkv, no biases, tied head) and its recipe (AdamW betas
0.9/0.99, weight decay 0.1 on matrices, 100 warm-up steps, cosine to 1e-4, clipping at 1, loss
estimated every 250 steps on 20 batches of each split). The contenders run one after another,
alternating which goes first, for ``--rounds`` rounds. Reported per contender: the final
validation loss it reports, training tokens/s (the median step time, evaluation excluded: nanoGPT's
own ``time`` per iteration, dlkit's per-interval training rate) and the wall time of the whole run;
medians over rounds. Targets: dlkit's val loss <= 1.88 and >= 1.3x the contender's tokens/s.

Part 2 -- generation: 256 new tokens after a 16-token prompt at batch 1, with the KV cache and
without it (every token runs the whole sequence), on the gpt-mini shape with 512 positions
(weights at their initialisation: the speed does not depend on them); alternating, medians of
``--gen-rounds``. Target: >= 5x with the cache.

Part 3 -- dynamic int8 on a 512-wide model (gpt-mini with dim 512, 8 heads, FFN 2048) trained for
``--int8-steps`` steps on Tiny Shakespeare with dlkit: decode tokens/s of 256 new tokens (KV cache)
fp32 against ``quantize_dynamic`` int8, alternating, medians; and the validation perplexity of
both over every validation window.

    python benchmarks/lm.py --data-dir ../shared/data [--nanogpt DIR] [--rounds 3]
    python benchmarks/lm.py --data-dir ../shared/data --quick      # tiny settings: proves it runs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0", "--log_interval=10"]


# ---- the plain PyTorch contender: nanoGPT's model and loop, written here ------------------------------

class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.heads = heads

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, 2)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, context: int = 64, d: int = 128, layers: int = 4, heads: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight"))
                                else 0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def plain_run(text: str, steps: int, seed: int) -> dict:
    """nanoGPT's recipe in a plain loop: returns its final estimated val loss, step times, wall time."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    model = PlainGPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    warm, decay_iters, lr0, lr_min = min(100, steps // 10), steps, 1e-3, 1e-4

    def lr_at(it):
        if it < warm:
            return lr0 * (it + 1) / (warm + 1)
        r = (it - warm) / max(decay_iters - warm, 1)
        return lr_min + 0.5 * (1 + math.cos(math.pi * min(r, 1.0))) * (lr0 - lr_min)

    def batch(split):
        d = train if split == "train" else val
        ix = torch.randint(len(d) - 64, (12,))
        return torch.stack([d[i:i + 64] for i in ix]), torch.stack([d[i + 1:i + 65] for i in ix])

    @torch.no_grad()
    def estimate():
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = [F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1)).item()
                      for x, y in (batch(split) for _ in range(20))]
            out[split] = sum(losses) / len(losses)
        model.train()
        return out

    times, last = [], None
    for it in range(steps + 1):
        if it % 250 == 0 or it == steps:
            last = estimate()
        if it == steps:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch("train")
        loss = F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()  # nanoGPT reads the loss on its log steps; a sync costs nothing on the CPU
        times.append(time.perf_counter() - t0)
    return {"val_loss": last["val"], "tokens_per_s": 12 * 64 / median(times), "wall_s": time.perf_counter() - started}


# ---- nanoGPT itself, from a checkout -----------------------------------------------------------------

def prepare_nanogpt(folder: Path, text_file: Path) -> None:
    data = folder / "data" / "shakespeare_char"
    if (data / "train.bin").is_file() and (data / "meta.pkl").is_file():
        return
    shutil.copy(text_file, data / "input.txt")  # prepare.py downloads it only when absent
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def nanogpt_run(folder: Path, steps: int, out_dir: Path) -> dict:
    """nanoGPT's own run (it seeds itself with 1337): its last printed val loss, step times, wall time."""
    started = time.perf_counter()
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_ARGS, f"--max_iters={steps}",
           f"--lr_decay_iters={steps}", f"--out_dir={out_dir}", "--always_save_checkpoint=False"]
    res = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    vals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", res.stdout)
    iters = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", res.stdout) if int(i) > 0]
    return {"val_loss": float(vals[-1][2]), "tokens_per_s": 12 * 64 / (median(iters) / 1000),
            "wall_s": time.perf_counter() - started}


# ---- dlkit ---------------------------------------------------------------------------------------------

def dlkit_train(data_dir: Path, out: Path, steps: int, seed: int, extra: list[str] = ()) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "dlkit", "train", "gpt-mini", "--dataset", "tinyshakespeare", "--data-dir",
           str(data_dir), "--max-steps", str(steps), "--out", str(out), "--seed", str(seed), "--json", "-q",
           "--device", "cpu", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dlkit train failed: {res.stderr[-2000:]}")
    doc = json.loads(res.stdout)
    rates = [r["samples_per_s"] for r in doc["history"]]
    return {"val_loss": doc["metrics"]["val_loss"], "tokens_per_s": median(rates),
            "precision": doc["train_config"]["precision"],
            "wall_s": time.perf_counter() - started, "artifact": doc["artifact"]}


def part1(args, text_file: Path, tmp: Path) -> dict:
    extra = args.dlkit_args.split()
    contenders = {"dlkit": lambda r: dlkit_train(args.data_dir, tmp / f"dlkit-{r}", args.steps, r, extra)}
    if "--precision" not in extra:  # dlkit's own choice of precision, and fp32 beside it
        contenders["dlkit-fp32"] = lambda r: dlkit_train(args.data_dir, tmp / f"dlkit-fp32-{r}", args.steps, r,
                                                         [*extra, "--precision", "fp32"])
    if args.nanogpt:
        prepare_nanogpt(args.nanogpt, text_file)
        contenders["nanogpt"] = lambda r: nanogpt_run(args.nanogpt, args.steps, tmp / f"nanogpt-{r}")
    else:
        text = text_file.read_text()
        contenders["plain"] = lambda r: plain_run(text, args.steps, r)
    runs = {k: [] for k in contenders}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            runs[name].append(contenders[name](r))
            print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    other = "nanogpt" if args.nanogpt else "plain"
    summary = {k: {m: median([x[m] for x in v]) for m in ("val_loss", "tokens_per_s", "wall_s")} for k, v in runs.items()}
    for k, v in runs.items():
        summary[k]["precision"] = v[0].get("precision", "fp32")
        summary[k]["vs_" + other] = summary[k]["tokens_per_s"] / summary[other]["tokens_per_s"]
    speed = summary["dlkit"]["vs_" + other]
    print_table(f"Part 1: {args.steps} steps, batch 12 x 64 tokens, medians of {args.rounds} round(s)",
                ["contender", "precision", "val loss", "tokens/s", f"vs {other}", "wall s"],
                [[k, v["precision"], f"{v['val_loss']:.4f}", f"{v['tokens_per_s']:,.0f}", f"{v['vs_' + other]:.2f}x",
                  f"{v['wall_s']:.1f}"] for k, v in summary.items()])
    print(f"dlkit ({summary['dlkit']['precision']}, its own choice here) / {other} tokens/s: {speed:.2f}x "
          f"(target >= 1.3x); dlkit val loss {summary['dlkit']['val_loss']:.4f} (target <= 1.88)")
    return {"steps": args.steps, "rounds": args.rounds, "against": other, "dlkit_args": extra, "runs": runs,
            "summary": summary,
            "speedup": speed, "targets": {"val_loss_max": 1.88, "speedup_min": 1.3}}


def _gen_rate(model, prompt: list[int], n: int, use_cache: bool) -> float:
    from dlkit.lm.generate import sample

    new, t = sample(model, prompt, max_new_tokens=n, temperature=1.0, generator=torch.Generator().manual_seed(0),
                    use_cache=use_cache)
    return len(new) / (t.prefill_seconds + t.decode_seconds)


def part2(args) -> dict:
    from dlkit.models import create_model
    from dlkit.spec import LM, TEXT, DataSpec

    torch.manual_seed(0)
    spec = DataSpec(TEXT, (512,), 65, vocab_size=65, task=LM)
    model, _ = create_model("gpt-mini", spec, {"max_len": 512})
    model.eval()
    prompt = torch.randint(0, 65, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    rates = {"kv_cache": [], "no_cache": []}
    _gen_rate(model, prompt, 8, True)
    for r in range(args.gen_rounds):
        for name in (["kv_cache", "no_cache"] if r % 2 == 0 else ["no_cache", "kv_cache"]):
            rates[name].append(_gen_rate(model, prompt, args.new_tokens, name == "kv_cache"))
    med = {k: median(v) for k, v in rates.items()}
    ratio = med["kv_cache"] / med["no_cache"]
    print_table(f"Part 2: generation, {args.new_tokens} new tokens after 16, batch 1, gpt-mini shape with 512 "
                f"positions, medians of {args.gen_rounds}", ["path", "tokens/s"],
                [[k, f"{v:,.0f}"] for k, v in med.items()])
    print(f"KV cache speed-up: {ratio:.1f}x (target >= 5x)")
    return {"new_tokens": args.new_tokens, "prompt_tokens": 16, "rates": rates, "median": med, "speedup": ratio,
            "target_min": 5.0}


def part3(args, tmp: Path) -> dict:
    import copy

    from dlkit import artifacts
    from dlkit.compress.quantize import quantize_dynamic
    from dlkit.lm.evaluate import evaluate_lm

    wide = ["--set", "dim=512", "--set", "heads=8", "--set", "ffn_dim=2048"]
    trained = dlkit_train(args.data_dir, tmp / "wide", args.int8_steps, 0, ["--eval-every", str(args.int8_steps)] + wide)
    art = artifacts.read_artifact(trained["artifact"])
    fp32 = artifacts.load_model(art).eval()
    int8 = quantize_dynamic(copy.deepcopy(fp32)).eval()
    from dlkit.data import load_dataset

    data = load_dataset("tinyshakespeare", data_dir=args.data_dir)
    x, y = data.val
    if args.quick:
        x, y = x[:64], y[:64]
    ppl = {k: evaluate_lm(m, x, y, split="val").perplexity for k, m in (("fp32", fp32), ("int8", int8))}
    prompt = data.val[0][0, :16].tolist()
    rates = {"fp32": [], "int8": []}
    for m in (fp32, int8):
        _gen_rate(m, prompt, 8, True)
    for r in range(args.gen_rounds):
        for name in (["fp32", "int8"] if r % 2 == 0 else ["int8", "fp32"]):
            rates[name].append(_gen_rate(fp32 if name == "fp32" else int8, prompt, args.new_tokens, True))
    med = {k: median(v) for k, v in rates.items()}
    params = sum(p.numel() for p in fp32.parameters())
    print_table(f"Part 3: dynamic int8, 512-wide gpt ({params / 1e6:.1f}M params, {args.int8_steps} training steps), "
                f"{args.new_tokens} new tokens with the KV cache", ["model", "decode tokens/s", "val perplexity"],
                [[k, f"{med[k]:,.0f}", f"{ppl[k]:.3f}"] for k in ("fp32", "int8")])
    print(f"int8 decode speed-up {med['int8'] / med['fp32']:.2f}x; perplexity {ppl['fp32']:.3f} -> {ppl['int8']:.3f} "
          f"({100 * (ppl['int8'] / ppl['fp32'] - 1):+.2f}%)")
    return {"params": params, "train_steps": args.int8_steps, "val_loss_fp32": trained["val_loss"], "rates": rates,
            "median": med, "speedup": med["int8"] / med["fp32"], "perplexity": ppl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="folder holding tinyshakespeare.txt (or input.txt)")
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout to run side by side")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gen-rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--int8-steps", type=int, default=300)
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--dlkit-args", default="", help='more options for dlkit train in part 1, e.g. "--precision bf16"')
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    if args.quick:
        args.steps, args.rounds, args.gen_rounds, args.new_tokens, args.int8_steps = 30, 1, 1, 32, 10
    text_file = next((args.data_dir / n for n in ("tinyshakespeare.txt", "input.txt") if (args.data_dir / n).is_file()),
                     None)
    if text_file is None:
        raise SystemExit(f"no tinyshakespeare.txt or input.txt in {args.data_dir}")
    parts = {int(s) for s in args.parts.split(",")}
    doc = {"quick": args.quick, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="dlkit-lm-bench-") as tmp:
        if 1 in parts:
            doc["training"] = part1(args, text_file, Path(tmp))
        if 2 in parts:
            doc["generation"] = part2(args)
        if 3 in parts:
            doc["int8"] = part3(args, Path(tmp))
    write_json("lm-quick" if args.quick else "lm", doc)


if __name__ == "__main__":
    main()
