"""qvit-export: Q-ViT quantization-aware training of timm vision transformers, and deployment.

Importing the package is light: the names below load their modules (and torch, timm) on first use (PEP 562),
so the commands' --help and tools that only read metadata do not pay for them.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "QuantConfig": "config", "QvitError": "errors", "calibrate": "calibrate", "create_model": "timm_models",
    "load_checkpoint": "checkpoint", "read_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "quantize": "quantize", "quantizers": "quantize", "quantizers_disabled": "quantize",
    "set_quantizers_enabled": "quantize", "CalibrationSet": "calibration_set", "read_manifest": "calibration_set",
    "post_training_quantize": "ptq", "deploy": "deploy", "DeployOptions": "deploy", "DeployOutputs": "deploy",
    "ParityOptions": "deploy", "EngineOptions": "engine", "ExportOptions": "onnx_export", "Recipe": "recipe",
    "load_recipe": "recipe",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qvit_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Two functions share their module's name (``calibrate``, ``quantize``). Importing such a module binds the
    module to the package attribute, which would shadow the function: bind the function instead, as an eager
    ``from .calibrate import calibrate`` did."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
