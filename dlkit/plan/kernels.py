"""Where the kernel a device runs saves something other than what the meta trace saw.

CPU LSTM training runs oneDNN (``aten::mkldnn_rnn_layer``), which keeps, per layer and direction,
the layer's input and output, the initial and final h and c, and one opaque workspace (gates and
states of every step); on meta, ``nn.LSTM`` runs as a per-step decomposition instead. The
workspace has no meta implementation (its meta kernel returns an empty one), so its size is a
fit to oneDNN's actual workspaces on this build (torch 2.13, measured for hidden 32-256, inputs
28-512, 10-28 steps, batches 32-64, exact in batch size, within 3% elsewhere), per sample::

    steps * (a * H + c * W) + d * H + c * W     W = max(input width, H)
    fp32: a = 36.5, c = 24, d = 16        bf16: a = 21.7, c = 20.8, d = 11.2

Its backward pass allocates, besides, gradient buffers for the gates and states of every step
and copies of the weights in oneDNN's layouts: a least-squares fit to measured peaks (hidden 64
and 128, 10-28 steps, batches 4-256; within 15% of this extra, a few percent of the peak) gives
``p * tokens * H * bytes + q * batch * H * bytes + r * (the LSTM's weight bytes)`` with
fp32: p, q, r = 5.35, 10.3, 1.09 and bf16: 3.45, 23.5, 3.9.

On CUDA, cuDNN's reserve space is not modelled: the decomposition's saved tensors stand in.
"""

from __future__ import annotations

LSTM_WS = {4: (36.5, 24.0, 16.0), 2: (21.7, 20.8, 11.2)}  # element bytes -> (a, c, d)
LSTM_BWD = {4: (5.35, 10.3, 1.09), 2: (3.45, 23.5, 3.9)}  # element bytes -> (p, q, r)


def onednn_lstm_saved(call: dict, batch: int) -> int:
    """Bytes oneDNN's LSTM training saves for one ``nn.LSTM`` call (see the module doc)."""
    a, c, d = LSTM_WS.get(call["bytes"], LSTM_WS[4])
    tokens, h, b = call["tokens"], call["hidden"], call["bytes"]
    n = call["batch"] or batch
    steps = tokens / n
    dirs, layers = call["directions"], call["layers"]
    total = tokens * call["input"] * b  # the input the first layer keeps
    width = call["input"]
    for _ in range(layers):
        w = max(width, h)
        ws = n * (steps * (a * h + c * w) + d * h + c * w)
        total += dirs * (ws + 4 * n * h * b)  # workspace, h0, c0, h_n, c_n
        total += tokens * h * dirs * b  # the layer's output
        width = h * dirs
    return int(total)


def onednn_lstm_backward(call: dict, batch: int) -> int:
    """Bytes oneDNN's LSTM backward pass holds besides the saved tensors (see the module doc)."""
    n = call["batch"] or batch
    p, q, r = LSTM_BWD.get(call["bytes"], LSTM_BWD[4])
    hb = call["hidden"] * call["bytes"]
    per = p * call["tokens"] * hb + q * n * hb
    return int(per * call["layers"] * call["directions"] + r * call["weights"])
