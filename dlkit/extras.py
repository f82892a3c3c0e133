"""Optional dependencies (the ``explain`` and ``onnx`` extras): imported on first use, so that
``dlkit --help`` and the core commands never load them, and a missing one is one line that says
how to install it."""

from __future__ import annotations

import importlib

from dlkit.errors import UsageError

INSTALL = {"explain": 'pip install "dlkit[explain]"', "onnx": 'pip install "dlkit[onnx]"', "hf": 'pip install "dlkit[hf]"'}


def require(module: str, what: str, extra: str):
    """``module``, imported; or a UsageError naming ``what`` needs it and the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise UsageError(f"{what} needs the '{module}' package, which is not installed",
                         hint=INSTALL[extra]) from None
