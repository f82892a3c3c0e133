"""The model registry: names -> (config preset, builder), in the style of timm's ``register_model``.

A family file defines a config dataclass (its defaults are the family's default model), an
``nn.Module`` built from ``(config, DataSpec)``, and registers presets with a decorated function
that only returns a config::

    @register_model(family="cnn", build=CNN, modalities=(IMAGE,), default_dataset="mnist")
    def lenet5() -> CNNConfig:
        "LeNet-5: conv6-pool-conv16-pool-dense120-dense84."
        return CNNConfig(channels=(6, 16), kernel_size=5, hidden=(120, 84))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from dlkit.config import apply_overrides, from_dict
from dlkit.errors import IncompatibleError
from dlkit.registry import Registry
from dlkit.spec import DataSpec


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    make_config: Callable[[], Any]
    build: Callable[[Any, DataSpec], Any]
    modalities: tuple[str, ...]
    default_dataset: str
    description: str = ""
    # Training options that suit this model better than the global defaults (lr, epochs, ...).
    train_defaults: dict = field(default_factory=dict)

    @property
    def config_cls(self) -> type:
        return type(self.make_config())


MODELS: Registry[ModelEntry] = Registry("model", list_command="dlkit models")


def register_model(
    name: str | None = None,
    *,
    family: str,
    build: Callable[[Any, DataSpec], Any],
    modalities: tuple[str, ...],
    default_dataset: str,
    train_defaults: dict | None = None,
):
    """Register the decorated config factory under ``name`` (default: its function name)."""

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        reg_name = name or fn.__name__.replace("_", "-")
        doc = (fn.__doc__ or "").strip().splitlines()
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
            ),
        )
        return fn

    return deco


def check_fits(entry: ModelEntry, spec: DataSpec) -> None:
    if spec.modality not in entry.modalities:
        raise IncompatibleError(
            f"model '{entry.name}' takes {' or '.join(entry.modalities)} data, not {spec.modality}",
            hint=f"pick a {spec.modality} model (`dlkit models`) or another dataset",
        )


def create_model(name: str, spec: DataSpec, overrides: dict[str, Any] | None = None):
    """Build registered model ``name`` for data ``spec``; returns ``(module, resolved_config)``."""
    entry = MODELS.get(name)
    check_fits(entry, spec)
    cfg = apply_overrides(entry.make_config(), overrides or {}, what=f"'{name}' config")
    return entry.build(cfg, spec), cfg


def build_model(name: str, config: dict, spec: DataSpec):
    """Rebuild a model from a saved config (an artifact's manifest)."""
    entry = MODELS.get(name)
    check_fits(entry, spec)
    cfg = from_dict(entry.config_cls, config)
    return entry.build(cfg, spec)
