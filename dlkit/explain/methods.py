"""Attribution methods through Captum, one entry point for image and text models.

What a score is attached to:

- Images: gradient methods (``ig``, ``saliency``, ``smoothgrad``, ``gradient-shap``) score every
  input value; ``occlusion``, ``lime`` and ``kernel-shap`` switch square patches of pixels to the
  baseline (the patch grid is the feature mask, no superpixel library); ``grad-cam`` weighs the
  last ``nn.Conv2d``'s feature maps by their mean gradient and is upsampled to the input size.
- Text: token ids have no gradient, so gradient methods attribute the output of the token
  embedding (the first ``nn.Embedding`` as large as the vocabulary). A forward hook puts the
  tensor Captum varies in place of that output while the model still receives the real ids, so
  its padding mask stays right; this is what Captum's ``Layer*`` classes do inside, made an
  ordinary input so that every input method (and SmoothGrad's noise) applies unchanged. A token's
  score is the sum of its vector's attributions. Perturbation methods switch whole tokens to the
  padding id 0; one feature per token, the padding positions grouped into one more feature.

Every method explains the target class's logit. Random draws (SmoothGrad's noise, GradientSHAP's
points, LIME's and KernelSHAP's samples) come from torch's generator, seeded before each call, so
the same options give the same attributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dlkit.choices import EXPLAIN_GRADIENT_METHODS, EXPLAIN_METHODS
from dlkit.extras import require
from dlkit.errors import IncompatibleError, UsageError
from dlkit.spec import IMAGE, TEXT, DataSpec

PERTURBATION_METHODS = tuple(m for m in EXPLAIN_METHODS if m not in EXPLAIN_GRADIENT_METHODS)
SMOOTHGRAD_NOISE = 0.15  # SmoothGrad's noise: this fraction of the input's value range (as its paper)
BATCH = 64  # perturbed inputs (or noisy copies) run through the model at once


def captum_attr():
    """``captum.attr``, imported on first use (it is an optional extra)."""
    return require("captum.attr", "dlkit explain", "explain")


@dataclass
class Subject:
    """A model to explain and the parts of it some methods need."""

    model: nn.Module
    modality: str
    int8: bool = False  # int8 kernels: no gradients
    embedding: nn.Module | None = None  # text: the token embedding gradient methods attribute through
    conv: nn.Module | None = None  # images: the layer grad-cam weighs (feature_map_layer)

    @classmethod
    def of(cls, model: nn.Module, spec: DataSpec, *, int8: bool = False) -> "Subject":
        embedding = conv = None
        if spec.modality == TEXT:
            embedding = next((m for m in model.modules()
                              if isinstance(m, nn.Embedding) and m.num_embeddings == spec.vocab_size), None)
        elif not int8:
            conv = feature_map_layer(model, spec.input_shape)
        return cls(model, spec.modality, int8, embedding, conv)

    def check(self, method: str, name: str) -> None:
        """One line when ``method`` cannot explain this model (``name`` names it)."""
        if method not in EXPLAIN_METHODS:
            raise UsageError(f"unknown method '{method}'", hint=f"use one of {', '.join(EXPLAIN_METHODS)}")
        others = ", ".join(PERTURBATION_METHODS)
        if self.int8 and method in EXPLAIN_GRADIENT_METHODS:
            raise IncompatibleError(f"--method {method} needs gradients, which the int8 kernels of {name} do not have",
                                    hint=f"use --method {others}, or explain the float artifact it came from")
        if method == "grad-cam" and (self.modality != IMAGE or self.conv is None):
            raise IncompatibleError(f"--method grad-cam needs an image model with convolutional feature maps; {name} "
                                    "has none",
                                    hint="use --method ig")
        if self.modality == TEXT and self.embedding is None and method in EXPLAIN_GRADIENT_METHODS:
            raise IncompatibleError(f"{name} has no token embedding (an nn.Embedding as large as the vocabulary) "
                                    "for gradient methods to attribute through", hint=f"use --method {others}")


def feature_map_layer(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | None:
    """The layer Grad-CAM weighs, for a model with an ``nn.Conv2d``: of the leaf modules a forward
    pass runs once each, the last whose output is an (N, C, H, W) map larger than 1 x 1. That is
    the last convolutional stage's output (after its activation, pooling or residual sum), found
    the same way in any model; None when there is none."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    calls: list[nn.Module] = []
    maps: list[nn.Module] = []

    def record(module, args, out):
        calls.append(module)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            maps.append(module)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        param = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
    once = [m for m in maps if calls.count(m) == 1]
    return once[-1] if once else None


@dataclass
class Completeness:
    """Integrated gradients' sum of attributions against the change of the target's logit."""

    total: float  # sum of the attributions
    change: float  # f(input) - f(baseline), the target class's logit

    @property
    def error(self) -> float:
        return abs(self.total - self.change)

    @property
    def relative_error(self) -> float | None:
        """The error as a fraction of the change; None when the logit did not change."""
        return self.error / abs(self.change) if abs(self.change) > 1e-8 else None

    def to_dict(self) -> dict:
        return {"sum": self.total, "change": self.change, "error": self.error, "relative_error": self.relative_error}


@dataclass
class Attribution:
    scores: torch.Tensor  # images (C, H, W), grad-cam (1, H, W); text (L,) one per token
    completeness: Completeness | None = None  # ig only


class _FromEmbeddings(nn.Module):
    """``model(ids)`` with its token embedding's output replaced by ``embedded``."""

    def __init__(self, model: nn.Module, embedding: nn.Module):
        super().__init__()
        self.model, self.embedding = model, embedding

    def forward(self, embedded: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        handle = self.embedding.register_forward_hook(lambda module, args, out: embedded)
        try:
            return self.model(ids)
        finally:
            handle.remove()


class FromIds(nn.Module):
    """``model`` on token ids that perturbation methods carry as floats (whole numbers: exact)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.round().long())


# ------------------------------------------------------------------------------------- baselines


def image_baseline(kind: str, x: torch.Tensor, mean: list[float] | None, std: list[float] | None) -> torch.Tensor:
    """The reference image for ``x`` (C, H, W), in the normalised space the model reads:
    ``zero`` a black image, ``mean`` the training images' mean (0 once normalised), ``blur`` ``x``
    under a Gaussian blur (sigma an eighth of the smaller side, at least 1 pixel)."""
    if kind == "zero":
        if mean is None or std is None:
            return torch.zeros_like(x)
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return ((0 - m) / s).expand_as(x).clone()
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "blur":
        return _blur(x, sigma=max(1.0, min(x.shape[-2:]) / 8))
    raise UsageError(f"image models take --baseline zero, mean or blur, not {kind}")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(2 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[0]
    y = nn.functional.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    y = nn.functional.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = nn.functional.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


# ------------------------------------------------------------------------------------- features


def default_patch(input_shape: tuple[int, ...]) -> int:
    """The side of a feature patch: a grid of at most 8 x 8 patches."""
    return max(1, math.ceil(min(input_shape[-2:]) / 8))


def units(x: torch.Tensor, modality: str, patch: int) -> torch.Tensor:
    """The features explanations are ranked and perturbed by, as ids 0..F-1 per position:
    images (H, W) the patch of each pixel; text (L,) the position of each token, -1 for padding."""
    if modality == IMAGE:
        h, w = x.shape[-2:]
        cols = math.ceil(w / patch)
        rows = torch.arange(h, device=x.device) // patch
        return rows[:, None] * cols + (torch.arange(w, device=x.device) // patch)[None, :]
    real = x != 0
    out = torch.full(x.shape, -1, dtype=torch.long, device=x.device)
    out[real] = torch.arange(int(real.sum()), device=x.device)
    return out


def _captum_mask(u: torch.Tensor) -> torch.Tensor:
    """Captum's feature mask (a batch of one): padding positions (-1) become one feature more."""
    mask = u.clone()
    mask[mask < 0] = int(mask.max()) + 1
    return mask[None] if mask.dim() == 1 else mask[None, None]


# ------------------------------------------------------------------------------------- attributing


def logits(subject: Subject, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for a batch of inputs, without gradients."""
    with torch.no_grad():
        return subject.model(x).float()


def attribute(subject: Subject, x: torch.Tensor, target: int, method: str, baseline: torch.Tensor, *,
              steps: int = 50, perturbations: int = 200, patch: int = 1, seed: int = 0) -> Attribution:
    """Attribute ``subject``'s target logit on one input ``x`` (no batch dimension) to its
    features, relative to ``baseline`` (same shape; for text, token ids)."""
    torch.manual_seed(seed)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN has no backward in eval mode
        if subject.modality == TEXT:
            return _text(subject, x, target, method, baseline, steps, perturbations)
        return _image(subject, x, target, method, baseline, steps, perturbations, patch)


def _image(subject: Subject, x, target, method, baseline, steps, perturbations, patch) -> Attribution:
    ca = captum_attr()
    model, xb, bb = subject.model, x[None], baseline[None]
    if method in ("occlusion", "lime", "kernel-shap"):
        if method == "occlusion":
            window = (x.shape[0], patch, patch)
            a = ca.Occlusion(model).attribute(xb, sliding_window_shapes=window, strides=window, baselines=bb,
                                              target=target, perturbations_per_eval=BATCH)
        else:
            explainer = ca.Lime(model) if method == "lime" else ca.KernelShap(model)
            a = explainer.attribute(xb, baselines=bb, target=target, feature_mask=_captum_mask(units(x, IMAGE, patch)),
                                    n_samples=perturbations, perturbations_per_eval=BATCH)
        return Attribution(a[0].detach())
    if method == "grad-cam":
        cam = ca.LayerGradCam(model, subject.conv).attribute(xb, target=target, relu_attributions=True)
        cam = ca.LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return Attribution(cam[0].sum(0, keepdim=True))
    a, completeness = _gradients(model, method, xb, bb, target, steps, perturbations, ())
    return Attribution(a[0], completeness)


def _text(subject: Subject, ids, target, method, baseline, steps, perturbations) -> Attribution:
    ca = captum_attr()
    ids_b, base_b = ids[None], baseline[None]
    if method in PERTURBATION_METHODS:
        forward = FromIds(subject.model)
        x, b = ids_b.float(), base_b.float()
        if method == "occlusion":
            a = ca.Occlusion(forward).attribute(x, sliding_window_shapes=(1,), strides=1, baselines=b, target=target,
                                                perturbations_per_eval=BATCH)
        else:
            explainer = ca.Lime(forward) if method == "lime" else ca.KernelShap(forward)
            a = explainer.attribute(x, baselines=b, target=target, feature_mask=_captum_mask(units(ids, TEXT, 1)),
                                    n_samples=perturbations, perturbations_per_eval=BATCH)
        return Attribution(a[0].detach() * (ids != 0))
    forward = _FromEmbeddings(subject.model, subject.embedding)
    with torch.no_grad():
        e, eb = subject.embedding(ids_b), subject.embedding(base_b)
    a, completeness = _gradients(forward, method, e, eb, target, steps, perturbations, (ids_b,))
    return Attribution(a[0].sum(-1), completeness)


def _gradients(forward: nn.Module, method: str, x: torch.Tensor, b: torch.Tensor, target: int, steps: int,
               perturbations: int, extra: tuple) -> tuple[torch.Tensor, Completeness | None]:
    """A gradient method on a batch of one ``x`` against baseline ``b``; ``extra`` is passed on."""
    ca = captum_attr()
    args = extra or None
    x = x.detach().clone().requires_grad_()  # Captum would otherwise warn that it set this itself
    if method == "ig":
        a = ca.IntegratedGradients(forward).attribute(x, baselines=b, target=target, additional_forward_args=args,
                                                      n_steps=steps, internal_batch_size=BATCH).detach()
        with torch.no_grad():
            change = float(forward(x, *extra)[0, target] - forward(b, *extra)[0, target])
        return a, Completeness(float(a.sum()), change)
    if method == "saliency":
        a = ca.Saliency(forward).attribute(x, target=target, abs=True, additional_forward_args=args)
    elif method == "smoothgrad":
        noise = SMOOTHGRAD_NOISE * float(x.detach().max() - x.detach().min()) or SMOOTHGRAD_NOISE
        a = ca.NoiseTunnel(ca.Saliency(forward)).attribute(x, nt_type="smoothgrad", nt_samples=perturbations,
                                                            nt_samples_batch_size=BATCH, stdevs=noise, target=target,
                                                            abs=True, additional_forward_args=args)
    elif method == "gradient-shap":
        a = ca.GradientShap(forward).attribute(x, baselines=b, n_samples=perturbations, target=target,
                                               additional_forward_args=args)
    else:
        raise UsageError(f"unknown gradient method '{method}'")
    return a.detach(), None
