"""Counting MACs and FLOPs: a table of small pure handles, op name -> ``(args, kwargs, out) -> Cost``.

The table starts from fvcore's (``flop_count._DEFAULT_SUPPORTED_OPS``: addmm, bmm, convolution,
einsum, matmul, mm, linear, batch/group/layer/instance norm, upsampling, adaptive average pooling)
and adds what fvcore misses or counts as zero. Two layers see the ops:

* a ``TorchFunctionMode`` catches the fused high-level calls whose insides differ by device
  (``aten::lstm``/``gru``/``rnn_tanh``/``rnn_relu``: oneDNN on CPU, a decomposition on meta;
  ``scaled_dot_product_attention``: a flash kernel on CPU, batched matmuls elsewhere), counts them
  with one exact handle each (all layers, directions and gates) and hides their insides;
* a ``TorchDispatchMode`` sees every other aten op after autograd, forward and backward, on real
  tensors or on the meta device (so large presets are counted without allocating weights).

Convention, stated once: **one MAC is one multiply-add** in a matrix product, convolution or
attention matmul; **FLOPs = 2 x MACs + the other FLOPs**, where normalization, activations,
softmax, bias and residual adds, pooling and other elementwise work are counted as FLOPs (one per
element per arithmetic step; constants below), never as MACs. Embedding lookups and data movement
cost 0 and are listed. Any op with no handle is reported under ``uncounted`` with its call count:
never a silent zero. The Transformer fast paths (fused MHA / encoder layer) are disabled while
counting, so their matmuls are seen.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class Cost(NamedTuple):
    macs: int = 0
    flops: int = 0  # FLOPs that are not multiply-adds (elementwise, norms, softmax, pooling)


Handle = Callable[[tuple, dict, Any], Cost]

# Per-element FLOP constants for the non-MAC work.
NORM_FLOPS = 5  # layer/group/instance norm with affine: mean, variance, normalize, scale, shift
NORM_FLOPS_NO_AFFINE = 4
BN_EVAL_FLOPS = 2  # inference batch norm: x * scale + shift
SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide
LSTM_ELEMENTWISE = 13  # per hidden unit and step, without biases (see rnn_cost)
GRU_ELEMENTWISE = 10
RNN_ELEMENTWISE = 2


def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (tuple, list)):
        return sum(_numel(t) for t in x)
    return 0


def _first(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for t in x:
            f = _first(t)
            if f is not None:
                return f
    return None


# ---- matrix products and convolutions -------------------------------------------------------------

def mm_cost(args, kwargs, out) -> Cost:
    a, b = args[0], args[1]
    return Cost(a.shape[0] * a.shape[1] * b.shape[1])


def addmm_cost(args, kwargs, out) -> Cost:  # bias + a @ b: the bias add is elementwise
    a, b = args[1], args[2]
    return Cost(a.shape[0] * a.shape[1] * b.shape[1], out.numel())


def bmm_cost(args, kwargs, out) -> Cost:
    a, b = args[0], args[1]
    return Cost(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])


def baddbmm_cost(args, kwargs, out) -> Cost:
    a, b = args[1], args[2]
    return Cost(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], out.numel())


def _conv_macs(x_shape, w_shape, out_shape, transposed: bool, groups: int) -> int:
    kernel = math.prod(w_shape[2:])
    if transposed:  # every input element meets C_out/groups kernels
        return math.prod(x_shape) * (w_shape[1]) * kernel
    return math.prod(out_shape) * (w_shape[1]) * kernel  # w: (C_out, C_in/groups, *k)


def conv_cost(args, kwargs, out) -> Cost:
    x, w, bias = args[0], args[1], args[2]
    transposed = bool(args[6]) if len(args) > 6 else False
    groups = int(args[8]) if len(args) > 8 else 1
    macs = _conv_macs(x.shape, w.shape, out.shape, transposed, groups)
    return Cost(macs, out.numel() if bias is not None else 0)


def conv_backward_cost(args, kwargs, out) -> Cost:
    # (grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
    #  groups, output_mask)
    grad_out, x, w = args[0], args[1], args[2]
    transposed = bool(args[7])
    mask = args[10]
    fwd = _conv_macs(x.shape, w.shape, grad_out.shape, transposed, int(args[9]))
    macs = fwd * (int(bool(mask[0])) + int(bool(mask[1])))
    return Cost(macs, grad_out.numel() if mask[2] else 0)


# ---- attention ------------------------------------------------------------------------------------

def _sdpa_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    batch = max(math.prod(q.shape[:-2]), math.prod(k.shape[:-2]))
    return batch, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]


def sdpa_cost(args, kwargs, out) -> Cost:
    """softmax(q k^T * scale + mask) v: two matmuls (MACs); scale, mask, softmax, dropout (FLOPs)."""
    q, k, v = args[0], args[1], args[2]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    b, lq, lk, d, dv = _sdpa_shapes(q, k, v)
    scores = b * lq * lk
    flops = scores * (1 + SOFTMAX_FLOPS + (mask is not None or bool(causal)) + 2 * (dropout > 0))
    return Cost(scores * (d + dv), flops)


def sdpa_fused_forward_cost(args, kwargs, out) -> Cost:  # aten's fused kernels, if called directly
    return sdpa_cost(args[:3], {}, out)


def sdpa_fused_backward_cost(args, kwargs, out) -> Cost:
    """Flash/efficient backward: recompute q k^T, then dP = dO v^T, dV = P^T dO, dQ = dS k, dK = dS^T q."""
    q, k, v = args[1], args[2], args[3]
    b, lq, lk, d, dv = _sdpa_shapes(q, k, v)
    scores = b * lq * lk
    return Cost(scores * (3 * d + 2 * dv), scores * (SOFTMAX_FLOPS + 2))


# ---- recurrent layers -----------------------------------------------------------------------------

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
ELEMENTWISE = {"lstm": LSTM_ELEMENTWISE, "gru": GRU_ELEMENTWISE, "rnn_tanh": RNN_ELEMENTWISE,
               "rnn_relu": RNN_ELEMENTWISE}


def rnn_cost(kind: str, args: tuple) -> Cost:
    """``torch._VF.<kind>``: every layer and direction runs every token through its gates.

    MACs per token and (layer, direction) = numel(W_ih) + numel(W_hh) (+ numel(W_hr) for an LSTM
    with projections). Elementwise FLOPs per token, hidden unit and (layer, direction):
    LSTM 13 (add the two products 4, 3 sigmoids + 1 tanh 4, c = f*c + i*g 3, tanh(c) 1, o*tanh(c) 1),
    GRU 10 (r: add + sigmoid 2, z: 2, n = tanh(x_n + r*h_n) 3, h = n + z*(h - n) 3),
    RNN 2 (add, tanh/relu); biases add 2 x gates per unit.
    """
    packed = isinstance(args[1], torch.Tensor) and args[1].dtype == torch.int64 and args[1].dim() == 1
    if packed:  # (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidir)
        data, params, has_biases, num_layers, bidir = args[0], args[3], args[4], args[5], args[8]
    else:  # (input, hx, params, has_biases, num_layers, dropout, train, bidir, batch_first)
        data, params, has_biases, num_layers, bidir = args[0], args[2], args[3], args[4], args[7]
    tokens = data.numel() // data.shape[-1] if data.shape[-1] else 0  # packed: only the real tokens
    dirs = 2 if bidir else 1
    per = len(params) // (num_layers * dirs)
    macs = flops = 0
    for i in range(num_layers * dirs):
        group = params[i * per:(i + 1) * per]
        w_ih, w_hh = group[0], group[1]
        hidden = w_ih.shape[0] // GATES[kind]
        extra = group[-1].numel() if per in (3, 5) else 0  # LSTM projection W_hr
        macs += tokens * (w_ih.numel() + w_hh.numel() + extra)
        flops += tokens * hidden * (ELEMENTWISE[kind] + (2 * GATES[kind] if has_biases else 0))
    return Cost(macs, flops)


def mkldnn_rnn_backward_cost(args, kwargs, out) -> Cost:
    """One layer and direction of oneDNN's RNN backward: dX, dW_ih, dH, dW_hh (2 x the forward MACs)."""
    x, w_ih, w_hh = args[0], args[1], args[2]
    tokens = x.numel() // x.shape[-1]
    return Cost(2 * tokens * (w_ih.numel() + w_hh.numel()), 2 * _numel(x) + 2 * _numel(args[7]))


def mkldnn_rnn_forward_cost(args, kwargs, out) -> Cost:
    x, w_ih, w_hh = args[0], args[1], args[2]
    tokens = x.numel() // x.shape[-1]
    mode = {2: "lstm", 3: "gru", 0: "rnn_relu", 1: "rnn_tanh"}.get(int(args[9]), "lstm")
    hidden = int(args[10])
    return Cost(tokens * (w_ih.numel() + w_hh.numel()),
                tokens * hidden * (ELEMENTWISE[mode] + (2 * GATES[mode] if args[12] else 0)))


# ---- norms, pooling, elementwise ------------------------------------------------------------------

def layer_norm_cost(args, kwargs, out) -> Cost:
    affine = len(args) > 2 and args[2] is not None
    return Cost(0, args[0].numel() * (NORM_FLOPS if affine else NORM_FLOPS_NO_AFFINE))


def group_norm_cost(args, kwargs, out) -> Cost:
    affine = len(args) > 1 and args[1] is not None
    return Cost(0, args[0].numel() * (NORM_FLOPS if affine else NORM_FLOPS_NO_AFFINE))


def batch_norm_cost(training_arg: int | None) -> Handle:
    def handle(args, kwargs, out) -> Cost:
        training = bool(args[training_arg]) if training_arg is not None else False
        affine = args[1] is not None
        if training:
            return Cost(0, args[0].numel() * (NORM_FLOPS if affine else NORM_FLOPS_NO_AFFINE))
        return Cost(0, args[0].numel() * BN_EVAL_FLOPS)

    return handle


def per_output(k: int) -> Handle:
    """``k`` FLOPs per output element (elementwise ops, activations, their backward)."""
    return lambda args, kwargs, out: Cost(0, k * _numel(out))


def per_input(k: int) -> Handle:
    """``k`` FLOPs per input element (reductions, adaptive pooling)."""
    return lambda args, kwargs, out: Cost(0, k * _numel(args[0]))


def pool_cost(args, kwargs, out) -> Cost:  # one compare/add per window element per output
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    return Cost(0, _numel(_first(out)) * math.prod(kernel if isinstance(kernel, (list, tuple)) else [kernel]))


def pool_backward_cost(args, kwargs, out) -> Cost:
    return Cost(0, _numel(args[0]))


def zero(args, kwargs, out) -> Cost:
    return Cost()


def _quantized_linear_cost(args, kwargs, out) -> Cost:
    weight = args[1].unpack()[0]
    return Cost(_numel(out) * weight.shape[1], _numel(out))


def _quantized_conv_cost(args, kwargs, out) -> Cost:
    weight = args[1].unpack()[0]
    return Cost(_numel(out) * math.prod(weight.shape[1:]), _numel(out))


# Data movement, allocation and metadata: 0 FLOPs, counted (not "uncounted"), not listed.
MOVEMENT = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
    "expand_as", "select", "slice", "unsqueeze", "squeeze", "flatten", "unflatten", "clone", "copy_",
    "contiguous", "cat", "stack", "split", "split_with_sizes", "unsafe_split", "unbind", "chunk",
    "detach", "alias", "as_strided", "empty", "empty_like", "empty_strided", "zeros", "zeros_like",
    "ones", "ones_like", "full", "full_like", "new_empty", "new_empty_strided", "new_zeros",
    "new_ones", "new_full", "scalar_tensor", "_to_copy", "to", "lift_fresh", "lift_fresh_copy",
    "arange", "fill_", "zero_", "index_select", "gather", "index", "narrow", "repeat", "roll",
    "flip", "_local_scalar_dense", "item", "masked_select", "nonzero", "pad", "constant_pad_nd",
    "_pin_memory", "set_", "resize_", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "_pack_padded_sequence", "_pad_packed_sequence", "sort",
    "argsort", "topk", "quantize_per_tensor", "dequantize", "_make_per_tensor_quantized_tensor",
    "slice_backward", "select_backward", "unfold", "im2col", "col2im", "squeeze_", "unsqueeze_",
    "t_", "transpose_", "detach_", "as_strided_", "index_put_", "index_put", "scatter", "scatter_",
    "index_copy", "randint", "randn", "rand", "normal_", "uniform_", "random_", "bernoulli",
    "lt", "le", "gt", "ge", "eq", "ne", "logical_not", "logical_and", "logical_or", "bitwise_not",
    "bitwise_and", "bitwise_or", "any", "all", "argmax", "argmin", "is_nonzero", "_unique2", "tril",
    "triu", "masked_fill", "masked_fill_", "_index_put_impl_", "new_empty_strided", "record_stream",
    "_foreach_zero_", "isfinite", "isnan", "_assert_async", "_functional_assert_async", "diagonal",
    "view_as", "_safe_softmax_backward",
}
# Zero MACs and FLOPs by this convention, but listed in the report so nobody mistakes them for gaps.
LISTED_ZERO = {"embedding", "embedding_dense_backward", "_embedding_bag", "embedding_backward"}

ELEMENTWISE_1 = [
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "relu", "relu_",
    "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "gelu", "gelu_", "silu", "silu_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "exp", "exp_", "log",
    "log_", "sqrt", "rsqrt", "reciprocal", "pow", "abs", "maximum", "minimum", "where", "threshold",
    "threshold_", "sin", "cos", "erf", "square", "sign", "floor", "ceil", "round", "fmod",
    "remainder", "bernoulli_", "mish", "softplus", "log_sigmoid_forward", "prelu",
    "_prelu_kernel", "copysign", "logit", "mean" , "sum", "amax", "amin", "max", "min", "prod",
    "cumsum", "norm", "linalg_vector_norm", "std", "var", "var_mean", "std_mean", "logsumexp",
    "threshold_backward", "sigmoid_backward", "tanh_backward", "gelu_backward", "silu_backward",
    "hardtanh_backward", "leaky_relu_backward", "elu_backward", "hardswish_backward",
    "hardsigmoid_backward", "mish_backward", "softplus_backward", "log_sigmoid_backward", "lerp",
    "lerp_", "upsample_nearest2d", "upsample_nearest2d_backward", "nll_loss_forward",
    "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward", "mse_loss",
    "mse_loss_backward", "binary_cross_entropy", "binary_cross_entropy_with_logits", "sgn",
]

OP_HANDLES: dict[str, Handle] = {
    # fvcore's table (MACs where fvcore counts "flops"; norms and pooling as FLOPs here)
    "aten::addmm": addmm_cost,
    "aten::mm": mm_cost,
    "aten::bmm": bmm_cost,
    "aten::baddbmm": baddbmm_cost,
    "aten::convolution": conv_cost,
    "aten::_convolution": conv_cost,
    "aten::mkldnn_convolution": lambda a, k, o: conv_cost((a[0], a[1], a[2], None, None, None, False, None, a[6]), k, o),
    "aten::native_layer_norm": layer_norm_cost,
    "aten::native_group_norm": group_norm_cost,
    "aten::native_batch_norm": batch_norm_cost(5),
    "aten::_native_batch_norm_legit": batch_norm_cost(5),
    "aten::_native_batch_norm_legit_no_training": batch_norm_cost(None),
    "aten::_native_batch_norm_legit_functional": batch_norm_cost(5),
    "aten::upsample_bilinear2d": per_output(4),
    "aten::_adaptive_avg_pool2d": per_input(1),
    "aten::adaptive_avg_pool2d": per_input(1),
    "aten::grid_sampler_2d": per_output(4),
    # added: backward of the above
    "aten::convolution_backward": conv_backward_cost,
    "aten::native_layer_norm_backward": per_input(2 * NORM_FLOPS),
    "aten::native_group_norm_backward": per_input(2 * NORM_FLOPS),
    "aten::native_batch_norm_backward": per_input(2 * NORM_FLOPS),
    "aten::_adaptive_avg_pool2d_backward": per_input(1),
    # added: pooling, softmax
    "aten::max_pool2d_with_indices": pool_cost,
    "aten::max_pool2d": pool_cost,
    "aten::avg_pool2d": pool_cost,
    "aten::max_pool1d": pool_cost,
    "aten::avg_pool1d": pool_cost,
    "aten::max_pool2d_with_indices_backward": pool_backward_cost,
    "aten::avg_pool2d_backward": pool_backward_cost,
    "aten::_softmax": per_output(SOFTMAX_FLOPS),
    "aten::_log_softmax": per_output(SOFTMAX_FLOPS),
    "aten::_safe_softmax": per_output(SOFTMAX_FLOPS),
    "aten::_softmax_backward_data": per_output(3),
    "aten::_log_softmax_backward_data": per_output(3),
    "aten::native_dropout": lambda a, k, o: Cost(0, 2 * _numel(a[0])),
    "aten::native_dropout_backward": per_output(1),
    "aten::addcmul": per_output(2),
    "aten::addcmul_": per_output(2),
    "aten::addcdiv": per_output(2),
    "aten::addcdiv_": per_output(2),
    # added: attention and recurrent kernels seen at the dispatch level
    "aten::_scaled_dot_product_flash_attention_for_cpu": sdpa_fused_forward_cost,
    "aten::_scaled_dot_product_flash_attention": sdpa_fused_forward_cost,
    "aten::_scaled_dot_product_efficient_attention": sdpa_fused_forward_cost,
    "aten::_scaled_dot_product_cudnn_attention": sdpa_fused_forward_cost,
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": sdpa_fused_backward_cost,
    "aten::_scaled_dot_product_flash_attention_backward": sdpa_fused_backward_cost,
    "aten::_scaled_dot_product_efficient_attention_backward": sdpa_fused_backward_cost,
    "aten::_scaled_dot_product_cudnn_attention_backward": sdpa_fused_backward_cost,
    "aten::mkldnn_rnn_layer": mkldnn_rnn_forward_cost,
    "aten::mkldnn_rnn_layer_backward": mkldnn_rnn_backward_cost,
    # added: int8 kernels of quantized artifacts
    "quantized::linear_dynamic": _quantized_linear_cost,
    "quantized::linear": _quantized_linear_cost,
    "quantized::linear_relu": _quantized_linear_cost,
    "quantized::linear_relu_dynamic": _quantized_linear_cost,
    "quantized::conv2d": _quantized_conv_cost,
    "quantized::conv2d_relu": _quantized_conv_cost,
    "quantized::add": per_output(1),
    "quantized::add_relu": per_output(1),
    "quantized::batch_norm2d": per_output(BN_EVAL_FLOPS),
}
for _name in ELEMENTWISE_1:
    OP_HANDLES.setdefault(f"aten::{_name}", per_output(1) if not _name.startswith(
        ("mean", "sum", "amax", "amin", "max", "min", "prod", "norm", "std", "var", "logsumexp",
         "linalg", "cumsum")) else per_input(1))

# Caught before dispatch (TorchFunctionMode): name -> handle on the Python call's arguments.
FUNCTION_HANDLES: dict[str, Callable[[tuple, dict], Cost]] = {
    "lstm": lambda a, k: rnn_cost("lstm", a),
    "gru": lambda a, k: rnn_cost("gru", a),
    "rnn_tanh": lambda a, k: rnn_cost("rnn_tanh", a),
    "rnn_relu": lambda a, k: rnn_cost("rnn_relu", a),
    "scaled_dot_product_attention": lambda a, k: sdpa_cost(a, k, None),
}


def set_op_handle(name: str, handle: Handle | None) -> None:
    """Add or override the handle for aten op ``name`` (e.g. ``"aten::mm"``); None counts it as 0."""
    OP_HANDLES[name] = handle if handle is not None else zero


def op_name(func) -> str:
    schema = getattr(func, "_schema", None)
    if schema is not None:
        return schema.name  # "aten::mm" (no overload)
    return str(func)


# ---- the counter ----------------------------------------------------------------------------------

@dataclass
class OpCounts:
    """What one counted run saw. ``by_op``: op -> [MACs, FLOPs]; ``by_module``: module path
    ("" is the whole model) -> [MACs, FLOPs] of the forward ops run inside it."""

    macs: int = 0
    flops: int = 0  # total FLOPs = 2 x MACs + other FLOPs
    by_op: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    by_module: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    calls: Counter = field(default_factory=Counter)
    uncounted: Counter = field(default_factory=Counter)  # op -> calls with no handle
    listed_zero: Counter = field(default_factory=Counter)  # embeddings: 0 by convention, listed

    def add(self, name: str, cost: Cost, modules: list[str] | None) -> None:
        flops = 2 * cost.macs + cost.flops
        self.macs += cost.macs
        self.flops += flops
        entry = self.by_op[name]
        entry[0] += cost.macs
        entry[1] += flops
        self.calls[name] += 1
        for m in modules or ():
            e = self.by_module[m]
            e[0] += cost.macs
            e[1] += flops


class _Stack:
    """The module path being run, kept by forward pre/post hooks on the model's own modules."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.shapes: dict[str, Any] = {}
        self.module_calls: Counter = Counter()
        self._handles: list = []

    def __enter__(self):
        def pre(mod, args):
            name = self.names.get(id(mod))
            if name is not None:
                self.stack.append(name)
                self.module_calls[name] += 1

        def post(mod, args, out):
            name = self.names.get(id(mod))
            if name is not None:
                if self.stack and self.stack[-1] == name:
                    self.stack.pop()
                if name not in self.shapes:
                    t = _first(out)
                    self.shapes[name] = tuple(t.shape) if t is not None else None

        self._handles = [nn.modules.module.register_module_forward_pre_hook(pre),
                         nn.modules.module.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self.stack.clear()


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: "Counter_"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        handle = FUNCTION_HANDLES.get(name)
        if handle is None or self.owner.hidden:
            return func(*args, **kwargs)
        try:
            cost = handle(args, kwargs)
        except Exception:  # a call we cannot read: let the dispatch level count its insides
            return func(*args, **kwargs)
        self.owner.record(f"aten::{name}", cost)
        self.owner.hidden += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.owner.hidden -= 1


class _DispatchCounter(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ in torch._disable_dynamo, whose first call
        # imports torch._dynamo: 1.7-2 s of a 5 s `dlkit profile transformer`. The counter never
        # runs under torch.compile, so there is nothing for that wrapper to guard against.
        return False

    def __init__(self, owner: "Counter_"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.owner.on_op is not None:  # the memory estimator sees every op, hidden or not
            self.owner.on_op(func, args, out)
        if not self.owner.hidden:
            self.owner.dispatch(func, args, kwargs, out)
        return out


class Counter_:
    """Count MACs/FLOPs of everything run inside ``with Counter_(model) as c:``.

    ``c.phase`` ("forward" or "backward") picks which ``OpCounts`` the ops go to.
    """

    def __init__(self, model: nn.Module | None = None, on_op: Callable | None = None):
        self.forward = OpCounts()
        self.backward = OpCounts()
        self.phase = "forward"
        self.hidden = 0
        self.on_op = on_op  # optional callback(func, args, out) for the memory estimator
        self.stack = _Stack(model) if model is not None else None
        self._modes: list = []
        self._fastpath = None

    @property
    def counts(self) -> OpCounts:
        return self.forward if self.phase == "forward" else self.backward

    def record(self, name: str, cost: Cost) -> None:
        mods = None
        if self.stack is not None and self.phase == "forward":
            mods = set(self.stack.stack) | {""}
        self.counts.add(name, cost, mods)

    def dispatch(self, func, args, kwargs, out) -> None:
        name = op_name(func)
        short = name.split("::", 1)[-1]
        handle = OP_HANDLES.get(name)
        if handle is not None:
            try:
                cost = handle(args, kwargs, out)
            except Exception:
                self.counts.uncounted[name] += 1
                return
            self.record(name, cost)
        elif short in LISTED_ZERO:
            self.counts.listed_zero[name] += 1
            self.counts.calls[name] += 1
        elif short in MOVEMENT or short.startswith("_foreach") or name.startswith("prim::") \
                or short.endswith("_copy") and short[:-5] in MOVEMENT:
            pass
        else:
            self.counts.uncounted[name] += 1

    def __enter__(self):
        try:
            self._fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        except AttributeError:  # pragma: no cover - older torch
            self._fastpath = None
        if self.stack is not None:
            self.stack.__enter__()
        self._modes = [_FunctionCounter(self), _DispatchCounter(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        if self.stack is not None:
            self.stack.__exit__(*exc)
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
