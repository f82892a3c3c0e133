"""`dlkit plan`: the traced activations against Korthikanti et al.'s formula and against measured
CPU peaks, checkpointing, sharding, LoRA, the micro-batch search, FLOPs against PaLM's count,
the ZeRO paper's model-state figures, and the command's output and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from dlkit.cli import app
from dlkit.plan import PlanOptions, find_blocks, model_states, plan_training, trace_step
from dlkit.profiling.memory import measure_peak
from dlkit.profiling.target import resolve_target

runner = CliRunner()
CPU = dict(device_memory="cpu", search=False)


# ---- published reference points ----------------------------------------------------------------------

@pytest.mark.parametrize("strategy, gb", [("ddp", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("fsdp", 1.9)])
def test_zero_paper_model_states_for_7_5b_parameters_on_64_devices(strategy, gb):
    """Rajbhandari et al. 2020, figure 1: Psi = 7.5B, K = 12 (mixed-precision Adam), Nd = 64."""
    states = model_states(int(7.5e9), precision="bf16-mixed", optimizer="adamw", strategy=strategy, devices=64)
    assert round(states.total / 1e9, 1) == gb


def _gpt(seq: int, dropout: float, dim=64, heads=4, depth=2, dtype=torch.bfloat16):
    tgt, _ = resolve_target("gpt2", seq_len=seq, overrides={"dim": dim, "heads": heads, "depth": depth,
                                                            "ffn_dim": 4 * dim, "max_len": seq, "dropout": dropout})
    model = tgt.build("meta").to(dtype)
    return model, torch.ones(2, seq, dtype=torch.long, device="meta")


class EagerBlock(nn.Module):
    """A GPT-2 block with attention written out (Megatron's and Hugging Face's "eager" attention)."""

    def __init__(self, h: int, a: int, p: float):
        super().__init__()
        self.a, self.p = a, p
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.proj = (nn.Linear(h, h) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        n, s, h = x.shape
        y = self.ln1(x)
        q, k, v = (f(y).view(n, s, self.a, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = F.dropout(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(h // self.a), -1), self.p, self.training)
        x = x + F.dropout(self.proj((att @ v).transpose(1, 2).reshape(n, s, h)), self.p, self.training)
        return x + F.dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh")), self.p, self.training)


class EagerStack(nn.Module):
    def __init__(self, h: int, a: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(EagerBlock(h, a, 0.1) for _ in range(depth))
        self.head = nn.Linear(h, 10)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


def test_activations_per_layer_match_korthikanti_at_16_bit():
    """Korthikanti et al. 2022, eq. 2: s*b*h*(34 + 5*a*s/h) bytes per layer at 16 bits without
    recomputation. Term by term for a GPT block, traced with CUDA's kernels (bool dropout masks):
    LayerNorm inputs 2+2, QKV input 2, Q and K for QK^T 4, V 2, projection input 2, two residual
    dropout masks 1+1, fc1 input 2, GELU input 8, fc2 input 8 (= 34 sbh); softmax output 2as^2b,
    its dropout mask as^2b and output 2as^2b (= 5as^2b). Besides, PyTorch's LayerNorm keeps an fp32
    mean and reciprocal std per token: 16*s*b bytes per layer, which the paper omits. The first
    block's input is the model's input, which is not an activation: 2sbh less there."""
    s, b, h, a = 32, 2, 64, 4
    with torch.device("meta"):
        model = EagerStack(h, a, depth=3).to(torch.bfloat16)
    x = torch.empty(b, s, h, dtype=torch.bfloat16, device="meta")
    tr = trace_step(model, x, find_blocks(model), kernels="cuda", seq_hint=s)
    per_layer = s * b * h * (34 + 5 * a * s / h) + 16 * s * b
    assert [blk.saved for blk in tr.blocks] == [per_layer - 2 * s * b * h, per_layer, per_layer]
    assert all(blk.attention_matrix == 5 * a * s * s * b for blk in tr.blocks)


def test_fused_attention_and_cpu_kernels_change_the_terms_as_expected():
    """dlkit's GPT (registry, ``F.scaled_dot_product_attention``). With CUDA's flash kernel no
    attention matrix is kept: the 5as/h term becomes a fp32 log-sum-exp per query and head (4asb);
    the kernel's output (laid out N, L, H, D) is the projection's input, not a second copy. On the
    CPU with attention dropout the math path runs, in fp32 here: every 2-byte term doubles and
    dropout masks take the input's dtype (4 bytes): (34 - 2) * 2 + 2 * 4 = 72 sbh, and softmax
    output, mask and dropout output 4 + 4 + 4 = 12as^2b."""
    s, b, h, a = 32, 2, 64, 4
    model, x = _gpt(s, 0.1, dim=h, heads=a)
    flash = trace_step(model, x, find_blocks(model, "blocks"), kernels="cuda")
    for blk in flash.blocks:
        assert (blk.saved, blk.attention_matrix) == (34 * s * b * h + 4 * a * s * b + 16 * s * b, 0)
    model, x = _gpt(s, 0.1, dim=h, heads=a, dtype=torch.float32)
    cpu = trace_step(model, x, find_blocks(model, "blocks"), kernels="cpu")
    for blk in cpu.blocks:
        assert (blk.saved, blk.attention_matrix) == (72 * s * b * h + 12 * a * s * s * b + 16 * s * b,
                                                     12 * a * s * s * b)


def test_gpt2_training_flops_per_token_match_palm():
    """PaLM (Chowdhery et al. 2022), appendix B: 6N + 12*L*H*Q*T matmul FLOPs per training token.
    Two differences, both counted: GPT-2's position table (0.8M parameters) is a lookup, not a
    matmul; and the flash attention backward recomputes Q K^T (2*L*H*Q*T more). With those,
    2 x multiply-adds match to 0.2%; against PaLM's figure itself they are within 2%, and dlkit's
    FLOPs (2 x MACs + elementwise work: norms, GELU, softmax, adds) within 3%."""
    tgt, _ = resolve_target("gpt2", seq_len=1024)
    model = tgt.build("meta")
    n = sum(p.numel() for p in model.parameters())
    lookup = model.wpe.weight.numel()
    layers, heads, q, t = 12, 12, 64, 1024
    palm = 6 * n + 12 * layers * heads * q * t
    plan = plan_training("gpt2", PlanOptions(batch_size=1, seq_len=1024, search=False))
    flops = 2 * plan.compute["model_macs_per_step"] / t
    assert abs(flops / (6 * (n - lookup) + 14 * layers * heads * q * t) - 1) < 0.002
    assert abs(flops / palm - 1) < 0.02
    assert 1.0 < plan.compute["model_flops_per_token"] / palm < 1.03


# ---- predictions against measured peaks on this CPU -------------------------------------------------

def _measured_step_peak(name: str, batch: int, checkpoint: bool = False, **target) -> int:
    from torch.utils.checkpoint import checkpoint as ckpt

    from dlkit.plan.trace import training_loss

    tgt, _ = resolve_target(name, **target)
    model = tgt.build("cpu")
    if checkpoint:
        for path in find_blocks(model, "blocks"):
            mod = model.get_submodule(path)
            mod.forward = lambda *a, _f=mod.forward, **k: ckpt(_f, *a, use_reentrant=False, **k)
    x = tgt.example(batch, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        training_loss(model(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return measure_peak(step, torch.device("cpu"))


@pytest.mark.parametrize("name, batch, checkpointing", [("transformer", 8, "none"), ("transformer", 8, "full"),
                                                         ("resnet20", 4, "none")])
def test_predicted_peak_is_within_10_percent_of_the_measured_step(name, batch, checkpointing):
    plan = plan_training(name, PlanOptions(batch_size=batch, precision="fp32", checkpointing=checkpointing, **CPU))
    measured = _measured_step_peak(name, batch, checkpoint=checkpointing == "full")
    assert abs(plan.memory.peak / measured - 1) <= 0.10, (plan.memory, measured)


# ---- checkpointing, sharding, LoRA, search ----------------------------------------------------------

def test_checkpointing_keeps_block_inputs_or_drops_attention_matrices():
    opts = dict(batch_size=4, precision="bf16", device_memory="cpu", search=False)
    none = plan_training("transformer", PlanOptions(**opts))  # dropout 0.1: the CPU runs math attention
    full = plan_training("transformer", PlanOptions(checkpointing="full", **opts))
    sel = plan_training("transformer", PlanOptions(checkpointing="selective", **opts))
    blocks = none.activations["blocks"]
    assert len(blocks) == 2 and all(b["attention_matrix"] > 0 for b in blocks)
    kept = sum(b["saved"] for b in blocks) - sum(b["input"] for b in blocks)
    assert full.memory.activations == none.memory.activations - kept
    assert sel.memory.activations == none.memory.activations - none.activations["attention_matrix"]
    assert full.memory.peak < sel.memory.peak < none.memory.peak
    recompute = sum(1 for _ in blocks)
    assert full.compute["recompute_flops_per_step"] > 0 and recompute == 2
    assert none.compute["recompute_flops_per_step"] == 0


def test_sharding_divides_model_states_and_fsdp_gathers_blocks():
    base = dict(batch_size=2, precision="bf16-mixed", search=False)
    ddp = plan_training("gpt-mini", PlanOptions(**base)).memory
    z1 = plan_training("gpt-mini", PlanOptions(strategy="zero1", devices=4, **base)).memory
    z2 = plan_training("gpt-mini", PlanOptions(strategy="zero2", devices=4, **base)).memory
    fsdp = plan_training("gpt-mini", PlanOptions(strategy="fsdp", devices=4, **base)).memory
    assert (z1.weights, z1.gradients, z1.optimizer) == (ddp.weights, ddp.gradients, ddp.optimizer // 4)
    assert (z2.weights, z2.gradients) == (ddp.weights, ddp.gradients // 4)
    assert fsdp.weights == ddp.weights // 4 and fsdp.optimizer == ddp.optimizer // 4
    assert ddp.gathered == z2.gathered == 0 < fsdp.gathered < ddp.weights
    assert ddp.optimizer == 12 * ddp.weights // 2  # bf16 weights, fp32 master + Adam moments


def test_lora_trains_only_the_adapters():
    """gpt-mini: 4 blocks, q and v are 128 -> 128: rank 4 adds 4 * (128 + 128) per layer."""
    full = plan_training("gpt-mini", PlanOptions(batch_size=4, precision="fp32", **CPU))
    lora = plan_training("gpt-mini", PlanOptions(batch_size=4, precision="fp32", lora_rank=4, **CPU))
    assert lora.params["trainable"] == lora.lora["trainable_params"] == 4 * 2 * 4 * (128 + 128)
    assert lora.params["frozen"] == full.params["total"]
    assert lora.memory.gradients == 4 * lora.params["trainable"]
    assert lora.memory.optimizer == 8 * lora.params["trainable"]
    assert lora.memory.activations < full.memory.activations  # frozen Linears keep no inputs
    assert sorted(lora.lora["targets"])[:2] == ["blocks.0.attn.q", "blocks.0.attn.v"]


def test_largest_micro_batch_is_the_boundary():
    opts = dict(precision="bf16", device_memory="1.1GiB")
    plan = plan_training("gpt-mini", PlanOptions(batch_size=1, **opts))
    best = plan.max_micro_batch
    assert best and best > 1
    assert plan_training("gpt-mini", PlanOptions(batch_size=best, search=False, **opts)).memory.fits
    assert not plan_training("gpt-mini", PlanOptions(batch_size=best + 1, search=False, **opts)).memory.fits


def test_kv_cache_and_training_time():
    plan = plan_training("gpt-mini", PlanOptions(batch_size=4, precision="bf16", tokens=1e9, search=False))
    assert plan.inference["kv_cache"] == 2 * 4 * 4 * 64 * 128 * 2  # k and v, 4 blocks, 4 x 64 tokens, dim 128
    c = plan.compute
    assert c["train"]["seconds"] == pytest.approx(1e9 / c["tokens_per_second"])
    assert c["step_seconds"] == pytest.approx(c["hardware_flops_per_step"] / (989e12 * 0.4))


# ---- the command ------------------------------------------------------------------------------------

def test_cli_json_on_stdout_table_on_stderr():
    res = runner.invoke(app, ["plan", "gpt-mini", "--batch-size", "2", "--strategy", "fsdp", "--devices", "2",
                              "--checkpointing", "full", "--no-search", "--tokens", "2M", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["memory"]["fits"] is True and doc["strategy"] == "fsdp" and doc["devices"] == 2
    assert doc["compute"]["train"]["amount"] == "2e+06 tokens"
    assert "memory per device" in res.stderr and "peak" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--device-memory", "80XB"], "cannot read '80XB' as a memory size"),
    (["--lora-targets", "q"], "--lora-targets needs --lora-rank"),
    (["--lora-rank", "4", "--lora-targets", "nope"], "no Linear layer named nope"),
    (["--devices", "0"], "--devices 0 must be at least 1"),
    (["--tokens", "lots"], "--tokens 'lots' is not a count"),
])
def test_cli_errors_are_one_line_with_a_hint(args, message):
    res = runner.invoke(app, ["plan", "gpt-mini", "--no-search", *args])
    assert res.exit_code == 2
    assert message in res.stderr and res.stdout == ""


def test_hf_llama_config_gqa_kv_cache_and_lora_by_construction(tmp_path):
    """A LLaMA-style config (GQA: 4 query heads, 2 key/value heads of 8; SwiGLU; RMSNorm), config.json
    only: the KV cache holds the 2 key/value heads, and LoRA on q_proj (32 -> 32) and v_proj
    (32 -> 16) adds rank * (in + out) per layer."""
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                             bos_token_id=2, eos_token_id=3).save_pretrained(tmp_path)
    opts = dict(seq_len=16, batch_size=2, precision="bf16", search=False)
    plan = plan_training(f"hf:{tmp_path}", PlanOptions(**opts))
    assert [b["name"] for b in plan.activations["blocks"]] == ["layers.0", "layers.1"]
    assert plan.inference["kv_cache"] == 2 * 2 * 2 * 2 * 16 * 8 * 2  # k and v, layers, batch, kv heads, tokens, dim
    lora = plan_training(f"hf:{tmp_path}", PlanOptions(lora_rank=4, **opts))
    assert lora.params["trainable"] == 2 * 4 * ((32 + 32) + (32 + 16))
    assert lora.memory.optimizer < plan.memory.optimizer / 10
