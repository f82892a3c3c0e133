"""Optional measures of an explanation (``--metrics``), through ``captum.metrics``.

Infidelity (Yeh et al., 2019) is the mean squared gap between what the attributions predict for a
perturbation and what the target logit really does. The perturbations here remove random half of
the features (patches, tokens) by switching them to the baseline, as the deletion curves do. How
a perturbation is weighed depends on what a method's scores are:

- ``ig``, ``gradient-shap``, ``occlusion``, ``lime``, ``kernel-shap`` score a feature's whole
  contribution against the baseline, so the prediction is the sum of the removed features' scores
  (the perturbation is the 0/1 removal mask);
- ``saliency``, ``smoothgrad`` and ``grad-cam`` score a local rate of change, so the prediction is
  their scores times the change of the input (the mask times input minus baseline). On text those
  scores are norms over an embedding, which no change of a token id multiplies: not measured.

Attributions are rescaled by the factor that fits the logit changes best before the gap is taken
(Captum's ``normalize``), so methods whose scores have other units compare fairly.

Sensitivity is the largest relative change of the attributions when the input moves at random
within a small box (``SENSITIVITY_RADIUS`` in the model's normalised input units, each value
independently; Captum's ``sensitivity_max``): max ||A(x + d) - A(x)|| / ||A(x)||. Token ids do
not move continuously, so it is measured on image models only.
"""

from __future__ import annotations

import torch

from dlkit.explain import methods
from dlkit.extras import require
from dlkit.spec import IMAGE

INFIDELITY_SAMPLES = 64  # random removals per sample
SENSITIVITY_SAMPLES = 8  # random moves per sample (each one a full explanation)
SENSITIVITY_RADIUS = 0.02
LOCAL_METHODS = ("saliency", "smoothgrad", "grad-cam")


def captum_metrics():
    """``captum.metrics``, imported on first use (it is an optional extra)."""
    return require("captum.metrics", "--metrics", "explain")


def infidelity(subject: methods.Subject, x: torch.Tensor, baseline: torch.Tensor, scores: torch.Tensor, target: int,
               method: str, u: torch.Tensor, *, seed: int = 0) -> float | None:
    """Normalised infidelity of ``scores`` for one input (None where it is not defined)."""
    local = method in LOCAL_METHODS
    if local and subject.modality != IMAGE:
        return None
    n = int(u.max()) + 1 if (u >= 0).any() else 0
    if n == 0:
        return None
    image = subject.modality == IMAGE

    def perturb(inputs, baselines):
        removed = torch.rand(inputs.shape[0], n, device=inputs.device) < 0.5
        where = removed[:, u.clamp(min=0)] & (u >= 0)
        if image:
            where = where.unsqueeze(1)  # channels share their pixel's patch
        perturbed = torch.where(where, baselines, inputs)
        weight = where.to(inputs.dtype)
        return (weight * (inputs - baselines) if local else weight.expand_as(inputs)), perturbed

    if image:
        forward, xb, bb = subject.model, x[None], baseline[None]
        attributions = scores.expand_as(x)[None]
    else:
        forward, xb, bb = methods.FromIds(subject.model), x[None].float(), baseline[None].float()
        attributions = scores[None]
    torch.manual_seed(seed)
    with torch.no_grad():
        value = captum_metrics().infidelity(forward, perturb, xb, attributions.to(xb.dtype), baselines=bb,
                                            target=target, n_perturb_samples=INFIDELITY_SAMPLES, normalize=True)
    return float(value[0])


def sensitivity(subject: methods.Subject, x: torch.Tensor, baseline: torch.Tensor, target: int, method: str, *,
                steps: int, perturbations: int, patch: int, seed: int = 0) -> float | None:
    """The largest relative change of the attributions under small random moves (images only)."""
    if subject.modality != IMAGE:
        return None

    def explanation(inputs):  # Captum passes (and expects back) a tuple holding one batch
        rows = inputs[0] if isinstance(inputs, tuple) else inputs
        return (torch.stack([methods.attribute(subject, row, target, method, baseline, steps=steps,
                                               perturbations=perturbations, patch=patch, seed=seed).scores
                             for row in rows]),)

    torch.manual_seed(seed)
    value = captum_metrics().sensitivity_max(explanation, x[None], perturb_radius=SENSITIVITY_RADIUS,
                                             n_perturb_samples=SENSITIVITY_SAMPLES)
    return float(value[0])
