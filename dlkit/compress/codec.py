"""The weights codec of quantized artifacts: int8 and half-size models as plain safetensors tensors.

Registered with ``dlkit.artifacts`` for the ``quantize`` transform when this module is imported;
``dlkit.compress.quantize`` imports it, and ``artifacts`` imports ``dlkit.compress.quantize`` the
first time a manifest names that transform, so any quantized artifact loads with no special call.
Also here: ``quiet_ao``, the one way dlkit enters torch.ao (engine selected, its notices muted).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from dlkit import artifacts
from dlkit.errors import ArtifactError

KIND = "quantize"
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def quiet_ao(backend: str):
    """Select the quantized engine (packing is engine-specific) and mute torch.ao's notices."""
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        # Raised for every CPU, also those with VNNI (this machine's has it).
        warnings.filterwarnings("ignore", message=r"Default qconfig of oneDNN backend with reduce_range of false")
        torch.backends.quantized.engine = backend
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


# Quantized modules keep their weights in packed params (and an RNN in TorchScript cell objects)
# that safetensors cannot hold. Their state_dict is flattened into plain tensors under keys that
# say how to rebuild each value; "#" never occurs in a module path, so it separates the parts:
#   KEY#q.int, #q.scale, #q.zp [, #q.axis]  a quantized tensor (int repr, per-tensor or per-channel)
#   KEY#len, KEY#0, KEY#1 ...               a tuple (a linear layer's packed (weight, bias))
#   KEY#none                                None (a layer without bias)
#   KEY#dtype                               a dtype, as an index into DTYPES
#   MODULE#rnn.weight_ih_l0 ...             the weights and biases of a dynamic int8 LSTM/GRU
# Scales and zero points are stored in the narrowest dtype that holds them exactly.

DTYPES = (torch.qint8, torch.quint8, torch.qint32, torch.float16, torch.float32)
QDTYPE = {torch.int8: torch.qint8, torch.uint8: torch.quint8, torch.int32: torch.qint32}
RNN = "#rnn."


def _narrow(t: torch.Tensor) -> torch.Tensor:
    for dtype in ((torch.float32,) if t.is_floating_point() else (torch.int8, torch.int32)):
        small = t.to(dtype)
        if torch.equal(small.to(t.dtype), t):
            return small
    return t


def _put(out: dict, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.is_quantized:
        out[f"{key}#q.int"] = value.int_repr().contiguous()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{key}#q.scale"] = _narrow(value.q_per_channel_scales())
            out[f"{key}#q.zp"] = _narrow(value.q_per_channel_zero_points())
            out[f"{key}#q.axis"] = torch.tensor(value.q_per_channel_axis())
        else:
            out[f"{key}#q.scale"] = _narrow(torch.tensor(value.q_scale(), dtype=torch.float64))
            out[f"{key}#q.zp"] = _narrow(torch.tensor(value.q_zero_point()))
    elif isinstance(value, torch.Tensor):
        out[key] = value.detach().clone().contiguous()
    elif isinstance(value, (tuple, list)):
        out[f"{key}#len"] = torch.tensor(len(value))
        for i, item in enumerate(value):
            _put(out, f"{key}#{i}", item)
    elif value is None:
        out[f"{key}#none"] = torch.zeros(0)
    elif isinstance(value, torch.dtype) and value in DTYPES:
        out[f"{key}#dtype"] = torch.tensor(DTYPES.index(value))
    else:
        raise TypeError(f"cannot store {key} ({type(value).__name__}) as plain tensors")


def _get(tensors: dict, key: str) -> Any:
    if key in tensors:
        return tensors[key]
    if f"{key}#q.int" in tensors:
        ints, scale, zp = tensors[f"{key}#q.int"], tensors[f"{key}#q.scale"], tensors[f"{key}#q.zp"]
        if ints.dtype not in QDTYPE:
            raise ArtifactError(f"{key} holds {ints.dtype}, not an int8/uint8/int32 representation")
        if f"{key}#q.axis" in tensors:
            return torch._make_per_channel_quantized_tensor(ints, scale.double(), zp.long(),
                                                            int(tensors[f"{key}#q.axis"]))
        return torch._make_per_tensor_quantized_tensor(ints, float(scale.double()), int(zp))
    if f"{key}#len" in tensors:
        return tuple(_get(tensors, f"{key}#{i}") for i in range(int(tensors[f"{key}#len"])))
    if f"{key}#none" in tensors:
        return None
    if f"{key}#dtype" in tensors:
        index = int(tensors[f"{key}#dtype"])
        if not 0 <= index < len(DTYPES):
            raise ArtifactError(f"{key} names an unknown dtype")
        return DTYPES[index]
    raise KeyError(key)


def _rnn_modules(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase

    return {name: m for name, m in model.named_modules() if isinstance(m, RNNBase)}


def encode_weights(model: nn.Module, transform: dict) -> dict[str, torch.Tensor]:
    """The model's state as plain tensors that safetensors can store (see the key scheme above)."""
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    if transform.get("mode") in HALF:
        dtype = HALF[transform["mode"]]
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    with quiet_ao(transform.get("backend", "x86")):
        rnns = _rnn_modules(model)
        for name, m in rnns.items():
            for k, v in {**m.get_weight(), **m.get_bias()}.items():
                _put(out, f"{name}{RNN}{k}", v)
        for key, value in state.items():
            if not any(key.startswith(f"{name}.") for name in rnns):
                _put(out, key, value)
    return out


def decode_weights(model: nn.Module, tensors: dict[str, torch.Tensor], transform: dict) -> tuple[list, list]:
    """Load ``encode_weights``' tensors into the rebuilt ``model``; returns (missing, unexpected)."""
    if transform.get("mode") in HALF:
        return model.load_state_dict(tensors, strict=False)  # copy_ widens fp16/bf16 to fp32 exactly
    with quiet_ao(transform.get("backend", "x86")):
        rnns = _rnn_modules(model)
        missing: list[str] = []
        for name, m in rnns.items():
            wanted = {**m.get_weight(), **m.get_bias()}
            try:
                m.set_weight_bias({k: _get(tensors, f"{name}{RNN}{k}") for k in wanted})
            except KeyError as exc:
                missing.append(f"{name}{RNN}{exc.args[0]}")
        bases = {k.split("#")[0] for k in tensors if RNN not in k}
        state = OrderedDict((base, _get(tensors, base)) for base in sorted(bases))
        # Quantized modules read their format version from the metadata (without it they expect
        # an older layout); the rebuilt model is of this torch's version by construction.
        own = model.state_dict()
        state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
        # An RNN's cell objects were set above; hand them back so its children load unchanged.
        state.update((k, v) for k, v in own.items() if any(k.startswith(f"{n}.") for n in rnns))
        result = model.load_state_dict(state, strict=False)
        missing += [k for k in result.missing_keys if not any(k.startswith(f"{n}.") for n in rnns)]
        return missing, list(result.unexpected_keys)


artifacts.register_codec(KIND, encode=encode_weights, decode=decode_weights)
