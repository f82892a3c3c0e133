"""Counting rules: hand-derived exact counts on tiny modules, published presets, cross-checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from dlkit.models import MODELS, create_model
from dlkit.models.transformer import Attention
from dlkit.profiling import count_macs, count_ops, cross_check
from dlkit.profiling.counting import SOFTMAX_FLOPS
from dlkit.spec import IMAGE, STANDARD_SPECS, TEXT, DataSpec

N, T, I, H = 3, 4, 5, 7  # batch, steps, input features, hidden units


def rnn_counts(mod: nn.Module, x, device="cpu"):
    fwd, _ = count_ops(mod.to(device), x.to(device) if isinstance(x, torch.Tensor) else x)
    return fwd


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_one_layer_lstm_exact(device):
    fwd = rnn_counts(nn.LSTM(I, H, batch_first=True), torch.randn(N, T, I), device)
    # 4 gates: x @ W_ih^T (4H x I) and h @ W_hh^T (4H x H) per token.
    macs = N * T * 4 * H * (I + H)
    # per token and unit: add the two products 4, 3 sigmoids + tanh 4, c = f*c + i*g 3, tanh(c) 1,
    # o * tanh(c) 1, and the two biases 8.
    other = N * T * H * (4 + 4 + 3 + 1 + 1 + 8)
    assert fwd.by_op["aten::lstm"] == [macs, 2 * macs + other] == [4032, 9828]
    assert not fwd.uncounted


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_one_layer_gru_exact(device):
    fwd = rnn_counts(nn.GRU(I, H), torch.randn(T, N, I), device)
    macs = N * T * 3 * H * (I + H)
    # r: add + sigmoid 2, z: 2, n = tanh(x_n + r * h_n) 3, h = n + z * (h - n) 3, biases 6.
    other = N * T * H * (2 + 2 + 3 + 3 + 6)
    assert fwd.by_op["aten::gru"] == [macs, 2 * macs + other]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_one_layer_rnn_exact(nonlinearity):
    fwd = rnn_counts(nn.RNN(I, H, nonlinearity=nonlinearity, bias=False), torch.randn(T, N, I))
    macs = N * T * H * (I + H)
    other = N * T * H * 2  # add the two products, the nonlinearity (no biases)
    assert fwd.by_op[f"aten::rnn_{nonlinearity}"] == [macs, 2 * macs + other]


def test_stacked_bidirectional_lstm_counts_every_layer_and_direction():
    fwd = rnn_counts(nn.LSTM(I, H, num_layers=2, bidirectional=True), torch.randn(T, N, I))
    per_token = 2 * 4 * H * (I + H) + 2 * 4 * H * (2 * H + H)  # layer 2 reads both directions
    assert fwd.by_op["aten::lstm"][0] == N * T * per_token


def test_packed_sequence_counts_only_real_tokens():
    lengths = torch.tensor([4, 2, 1])
    packed = pack_padded_sequence(torch.randn(N, T, I), lengths, batch_first=True, enforce_sorted=False)
    fwd = rnn_counts(nn.GRU(I, H, batch_first=True), packed)
    assert fwd.by_op["aten::gru"][0] == int(lengths.sum()) * 3 * H * (I + H)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_block_exact(masked):
    dim, heads, head_dim, n, length = 16, 4, 4, 2, 5
    block = Attention(dim, heads, head_dim, dropout=0.0).eval()
    mask = torch.ones(n, 1, 1, length, dtype=torch.bool) if masked else None
    fwd, _ = count_ops(block, (torch.randn(n, length, dim), mask))
    proj = 4 * n * length * dim * dim  # q, k, v and the output projection
    scores = n * heads * length * length
    attn = scores * (head_dim + head_dim)  # q k^T and p v
    assert fwd.macs == proj + attn == 11_840
    bias_adds = 4 * n * length * dim
    other = scores * (1 + SOFTMAX_FLOPS + masked)  # scale, softmax, mask
    assert fwd.flops == 2 * (proj + attn) + bias_adds + other
    assert fwd.by_op["aten::scaled_dot_product_attention"][0] == attn


def test_torch_transformer_layer_fast_path_is_not_hidden():
    d, ff, heads, n, length = 16, 32, 4, 2, 5
    layer = nn.TransformerEncoderLayer(d, heads, ff, batch_first=True).eval()
    macs, _, params, uncounted = count_macs(layer, torch.randn(n, length, d))
    tokens = n * length
    expected = tokens * (3 * d * d + d * d + 2 * d * ff) + 2 * n * heads * length * length * (d // heads)
    assert macs == expected and not uncounted
    assert params == sum(p.numel() for p in layer.parameters())


def test_training_flops_are_measured_not_guessed():
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fwd, bwd = count_ops(mlp, torch.randn(4, 6), backward=True)
    assert fwd.macs == 4 * (6 * 8 + 8 * 3)
    # The first layer's input needs no gradient: only dW there; the second needs dW and dX.
    assert bwd.macs == 4 * 6 * 8 + 2 * 4 * 8 * 3
    conv = nn.Conv2d(2, 4, 3)
    fwd, bwd = count_ops(conv, torch.randn(1, 2, 6, 6), backward=True)
    assert fwd.macs == 4 * 4 * 4 * 2 * 9 and bwd.macs == fwd.macs  # dW only


def test_embeddings_are_listed_and_unknown_ops_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.fft.rfft(self.fc(self.embed(x)), dim=-1).abs()

    fwd, _ = count_ops(Odd(), torch.tensor([[1, 2, 3]]))
    assert fwd.listed_zero["aten::embedding"] == 1
    assert fwd.macs == 3 * 4 * 4
    assert any("fft" in op for op in fwd.uncounted)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamic_int8_linear_is_counted():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    macs, _, _, uncounted = count_macs(q, torch.randn(3, 8))
    assert macs == 3 * (8 * 16 + 16 * 4) and not uncounted


def _meta(name: str, spec: DataSpec, overrides=None):
    with torch.device("meta"):
        model, _ = create_model(name, spec, overrides)
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,params,gmacs", [
    ("resnet18", 11_689_512, 1.8), ("resnet50", 25_557_032, 4.1), ("vgg16", 138_357_544, 15.5),
    ("vit-b16", 86_567_656, 17.6)])
def test_image_presets_match_published_counts(name, params, gmacs):
    model = _meta(name, STANDARD_SPECS["imagenet"])
    macs, _, counted, uncounted = count_macs(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert counted == params
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.02
    assert not uncounted


def test_bert_base_and_gpt2_parameter_counts():
    bert = _meta("bert-base", STANDARD_SPECS["sst2-bert"])
    assert n_params(bert) - n_params(bert.head) == 109_482_240  # the bare BertModel, pooler included
    gpt_lm = _meta("gpt2", STANDARD_SPECS["sst2-gpt2"], {"lm_head": "true"})
    assert n_params(gpt_lm) == 124_439_808  # tied LM head: no extra parameters
    assert gpt_lm.head.weight is gpt_lm.wte.weight
    gpt = _meta("gpt2", STANDARD_SPECS["sst2-gpt2"])
    assert n_params(gpt) == 124_439_808 + 768 * 2 + 2


def test_gpt2_lm_macs_follow_the_formula():
    model = _meta("gpt2", STANDARD_SPECS["sst2-gpt2"], {"lm_head": "true"})
    length, d, layers, vocab = 128, 768, 12, 50257
    macs, *_ = count_macs(model, torch.ones(1, length, dtype=torch.long, device="meta"))
    per_layer = length * 12 * d * d + 2 * length * length * d  # weights, plus q k^T and p v
    assert macs == layers * per_layer + length * d * vocab


def _example(name: str, modality: str):
    entry = MODELS.get(name)
    if modality == TEXT:
        spec = DataSpec(TEXT, (16,), 2, vocab_size=100)
        return spec, torch.randint(1, 100, (2, 16))
    spec = STANDARD_SPECS[entry.default_dataset]
    if spec.modality != IMAGE:
        spec = STANDARD_SPECS["mnist"]
    return spec, torch.randn(2, *spec.input_shape)


CASES = [(n, m) for n, e in MODELS.items() for m in e.modalities]


@pytest.mark.parametrize("name,modality", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_cross_check_with_flop_counter_mode(name, modality):
    """Every registry model: matmul/conv/attention/recurrent FLOPs within 1% of FlopCounterMode's
    on the families both count (on meta, so large presets cost nothing to build)."""
    spec, x = _example(name, modality)
    meta = True
    try:
        model = _meta(name, spec)
        res = cross_check(model, x.to("meta"))
    except (NotImplementedError, RuntimeError):  # data-dependent text paths (packing) need real tensors
        meta = False
        torch.manual_seed(0)
        model, _ = create_model(name, spec)
        res = cross_check(model.eval(), x)
    assert res["both"], res
    assert res["relative_diff"] < 0.01, res
    if meta:
        assert res["dlkit"]["matmul"] + res["dlkit"]["attention"] + res["dlkit"]["recurrent"] > 0
