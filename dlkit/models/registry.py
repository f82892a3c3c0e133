"""The model registry: names -> (config preset, builder), in the style of timm's ``register_model``.

A family file defines a config dataclass (its defaults are the family's default model), an
``nn.Module`` built from ``(config, DataSpec)``, and registers presets with a decorated function
that only returns a config. The family also declares, once, what compression may do to its
models (``Support``); ``dlkit.compress`` asks this declaration and never inspects the model::

    SUPPORT = Support(prune="channels", static_int8=True, widths=CNN.width_overrides)

    @register_model(family="cnn", build=CNN, modalities=(IMAGE,), default_dataset="mnist", support=SUPPORT)
    def lenet5() -> CNNConfig:
        "LeNet-5: conv6-pool-conv16-pool-dense120-dense84."
        return CNNConfig(channels=(6, 16), kernel_size=5, hidden=(120, 84))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from dlkit.config import apply_overrides, from_dict
from dlkit.errors import IncompatibleError, UsageError
from dlkit.registry import Registry
from dlkit.spec import IMAGE, DataSpec

# How a family is pruned:
#   channels  Torch-Pruning's dependency graph removes coupled channel groups; ``head`` and the
#             ``kept`` layers keep their outputs.
#   heads     whole attention heads and FFN neurons of every block in ``blocks`` (an
#             ``nn.ModuleList`` of blocks with ``attn.q/k/v/proj/num_heads``, ``fc1``, ``fc2``);
#             the residual width stays: the ``kept`` layers write it, ``unwrapped`` parameters
#             (class token, positions) are (1, tokens, dim) tensors along it.
#   rnn       the hidden units of the one recurrent cell at attribute ``cell``
#             (dlkit.compress.rnn_prune), and the inputs of ``head`` with them.
#   hf        a Hugging Face Transformers model (dlkit.hf.prune): whole attention heads and FFN
#             width, its HF config updated; ``widths`` returns the new config.
#   none      not prunable; ``reason`` says why in one line.
PRUNE_KINDS = ("channels", "heads", "rnn", "hf", "none")


@dataclass(frozen=True)
class Support:
    """What dlkit.compress may do to a family's models, declared where the family registers."""

    prune: str = "none"
    static_int8: bool = False  # eager static int8 / QAT (a chain of conv/linear modules) on images
    widths: Callable[[Any], dict] | None = None  # model -> the config fields holding its current widths
    head: str = "head"  # the classifier: keeps its outputs, its inputs shrink with the layer before
    kept: tuple[str, ...] = ()  # other layers (attribute names) whose outputs pruning keeps; None is skipped
    blocks: str | None = None  # heads: the attribute holding the blocks
    unwrapped: tuple[str, ...] = ()  # heads: parameters (or None) along the residual width
    cell: str | None = None  # rnn: the attribute holding the recurrent cell
    reason: str = ""  # none: why not, for the error message

    def check(self, family: str, modalities: tuple[str, ...]) -> None:
        """A family declared inconsistently is a programming error: raised at import."""
        problems = []
        if self.prune not in PRUNE_KINDS:
            problems.append(f"prune={self.prune!r} is not one of {', '.join(PRUNE_KINDS)}")
        if self.prune != "none" and not callable(self.widths):
            problems.append("a prunable family needs widths= (model -> config fields of its widths)")
        if self.prune == "none" and not self.reason:
            problems.append("prune='none' needs a reason=")
        if self.prune == "heads" and not self.blocks:
            problems.append("prune='heads' needs blocks= (the attribute holding the blocks)")
        if self.prune == "rnn" and not self.cell:
            problems.append("prune='rnn' needs cell= (the attribute holding the recurrent cell)")
        if (self.cell and self.prune != "rnn") or ((self.blocks or self.unwrapped) and self.prune != "heads"):
            problems.append("cell= is for prune='rnn', blocks=/unwrapped= for prune='heads'")
        if self.static_int8 and IMAGE not in modalities:
            problems.append("static_int8=True needs image data among the modalities")
        if problems:
            raise TypeError(f"model family '{family}' declares its support inconsistently: {'; '.join(problems)}")


NOT_DECLARED = Support(reason="its family declares no compression support")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    make_config: Callable[[], Any]
    build: Callable[[Any, DataSpec], Any]
    modalities: tuple[str, ...]
    default_dataset: str  # what `dlkit train NAME` trains on when --dataset is not given
    description: str = ""
    # Training options that suit this model better than the global defaults (lr, epochs, ...).
    train_defaults: dict = field(default_factory=dict)
    support: Support = NOT_DECLARED
    # The data shape the name stands for when no dataset is given (profile, models): the published
    # input and head ("imagenet" for vgg16); None means default_dataset's shape.
    native: str | None = None
    # Set where make_config reads files (hf: names): the config's type, and how a saved config is
    # rebuilt without them (build_model); None: type(make_config()) and build.
    config_type: type | None = None
    rebuild: Callable[[Any, DataSpec], Any] | None = None

    @property
    def config_cls(self) -> type:
        return self.config_type or type(self.make_config())

    @property
    def native_dataset(self) -> str:
        return self.native or self.default_dataset


MODELS: Registry[ModelEntry] = Registry("model", list_command="dlkit models")
FAMILIES: dict[str, Support] = {}  # family -> its one declaration
_BY_CLASS: dict[type, Support] = {}  # built module class -> its family's declaration


def support_of(model) -> Support:
    """The declaration of the family that built ``model`` (``NOT_DECLARED`` for other modules)."""
    return _BY_CLASS.get(type(model), NOT_DECLARED)


def _declare(family: str, build, support: Support, modalities: tuple[str, ...]) -> None:
    support.check(family, modalities)
    if FAMILIES.setdefault(family, support) != support:
        raise TypeError(f"model family '{family}' is registered with two different Support declarations")
    if isinstance(build, type) and _BY_CLASS.setdefault(build, support) != support:
        raise TypeError(f"{build.__name__} is built by families with different Support declarations")


def register_model(
    name: str | None = None,
    *,
    family: str,
    build: Callable[[Any, DataSpec], Any],
    modalities: tuple[str, ...],
    default_dataset: str,
    train_defaults: dict | None = None,
    support: Support = NOT_DECLARED,
    native: str | None = None,
):
    """Register the decorated config factory under ``name`` (default: its function name)."""

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        reg_name = name or fn.__name__.replace("_", "-")
        doc = (fn.__doc__ or "").strip().splitlines()
        _declare(family, build, support, tuple(modalities))
        MODELS.add(
            reg_name,
            ModelEntry(
                name=reg_name,
                family=family,
                make_config=fn,
                build=build,
                modalities=tuple(modalities),
                default_dataset=default_dataset,
                description=doc[0] if doc else "",
                train_defaults=dict(train_defaults or {}),
                support=support,
                native=native,
            ),
        )
        return fn

    return deco


def model_entry(name: str) -> ModelEntry:
    """The entry for ``name``: a registered preset, or for ``hf:...`` an entry made from the
    Hugging Face config it names (dlkit.hf). Everything that looks a model name up goes here."""
    if name.startswith("hf:"):
        from dlkit.hf import model_entry as hf_model_entry

        return hf_model_entry(name)
    from dlkit.artifacts import is_artifact_folder, read_artifact

    if is_artifact_folder(name):  # `dlkit train ARTIFACT` starts from its weights: its model's entry
        art = read_artifact(name)
        entry = model_entry(art.model_name)
        return replace(entry, default_dataset=art.dataset or entry.default_dataset)
    if ":" in name and name.rpartition(":")[0].endswith(".py"):  # the user's file.py:Name
        raise UsageError(f"{name} is your own module: profile and compare take it, but nothing can be trained "
                         "from it, since an artifact must load without running code from a file",
                         hint="add the model to dlkit/models/ as a registered family, or train it with your "
                              "own script")
    return MODELS.get(name)


def check_fits(entry: ModelEntry, spec: DataSpec) -> None:
    if spec.modality not in entry.modalities:
        raise IncompatibleError(
            f"model '{entry.name}' takes {' or '.join(entry.modalities)} data, not {spec.modality}",
            hint=f"pick a {spec.modality} model (`dlkit models`) or another dataset",
        )


def create_model(name: str, spec: DataSpec, overrides: dict[str, Any] | None = None):
    """Build registered model ``name`` for data ``spec``; returns ``(module, resolved_config)``."""
    entry = model_entry(name)
    check_fits(entry, spec)
    cfg = apply_overrides(entry.make_config(), overrides or {}, what=f"'{name}' config")
    return entry.build(cfg, spec), cfg


def build_model(name: str, config: dict, spec: DataSpec):
    """Rebuild a model from a saved config (an artifact's manifest)."""
    entry = model_entry(name)
    check_fits(entry, spec)
    cfg = from_dict(entry.config_cls, config)
    return (entry.rebuild or entry.build)(cfg, spec)
