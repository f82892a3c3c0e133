"""LoRA (Hu et al. 2021) as the planner models it: the chosen ``nn.Linear`` layers gain a rank-R
update ``B(A(x)) * alpha / R`` (A: in -> R, B: R -> out, B starting at zero), every other
parameter is frozen. The planner applies it to the meta model before tracing, so what autograd
saves with a frozen base (no inputs kept for weight gradients, only A's input and A(x) for the
adapters) comes from the model itself. Adapter dropout is 0 (PEFT's default).
"""

from __future__ import annotations

from torch import nn

from dlkit.errors import UsageError

# Attention projections, by the names the families and Hugging Face models give them.
DEFAULT_TARGETS = ("q", "v", "q_proj", "v_proj", "query", "value", "c_attn")


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = (alpha or rank) / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **kw)
        if not base.weight.is_meta:
            nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def _linear_like(mod: nn.Module) -> bool:
    # nn.Linear, and Hugging Face GPT-2's Conv1D (a Linear with a transposed weight)
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def lora_targets(model: nn.Module, names: tuple[str, ...] | None) -> list[str]:
    """Paths of the Linear layers whose last name component is in ``names`` (default: q and v)."""
    wanted = set(names or DEFAULT_TARGETS)
    found = [path for path, mod in model.named_modules() if _linear_like(mod) and path.rpartition(".")[2] in wanted]
    if not found:
        linears = sorted({path.rpartition(".")[2] for path, mod in model.named_modules() if _linear_like(mod)})
        raise UsageError(f"no Linear layer named {', '.join(sorted(wanted))} for LoRA",
                         hint="--lora-targets takes layer names; this model has " + (", ".join(linears) or "none"))
    return found


def apply_lora(model: nn.Module, rank: int, names: tuple[str, ...] | None = None) -> tuple[int, list[str]]:
    """Freeze ``model`` and wrap the target Linears; returns (trainable parameters, target paths)."""
    if rank < 1:
        raise UsageError(f"--lora-rank {rank} must be at least 1")
    targets = lora_targets(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in targets:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, leaf)
        if not isinstance(base, nn.Linear):
            base = _as_linear(base)
        setattr(parent, leaf, LoRALinear(base, rank))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, targets


def _as_linear(conv1d: nn.Module) -> nn.Linear:
    """Hugging Face's Conv1D (weight in x out) as an nn.Linear on the same device and dtype."""
    w = conv1d.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=conv1d.bias is not None, device=w.device, dtype=w.dtype)
    lin.requires_grad_(False)
    return lin
