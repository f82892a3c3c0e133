"""Model families. Importing this package registers every family's presets."""

from dlkit.models.registry import (FAMILIES, MODELS, ModelEntry, Support, build_model, create_model, model_entry,
                                   register_model, support_of)

# Each import registers that family's names.
from dlkit.models import mlp, cnn, resnet, vgg, rnn, transformer  # noqa: E402,F401
from dlkit.models import vit, bert, gpt  # noqa: E402,F401  (published presets)

__all__ = ["FAMILIES", "MODELS", "ModelEntry", "Support", "build_model", "create_model", "model_entry", "register_model", "support_of"]
