"""Model families behind one protocol (`vlm.arch.base.ModelArch`): the only place that names a model's module paths.

Adding a family: a module `vlm/arch/<family>.py` with a `ModelArch` subclass that sets `model_types`; it is found
here by itself (every module of this package is imported and its families collected), so nothing else is edited.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from torch import nn

from vlm.arch.base import ModelArch, VisionSites
from vlm.errors import UserError


def _discover() -> tuple[type[ModelArch], ...]:
    """Every ModelArch subclass with model_types defined in a module of this package, in module-name order."""
    found: list[type[ModelArch]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ModelArch) and cls.model_types and cls.__module__ == module.__name__:
                taken = {t: f.__name__ for f in found for t in f.model_types}
                clash = sorted(set(cls.model_types) & set(taken))
                if clash:
                    raise TypeError(f"{cls.__name__} and {taken[clash[0]]} both claim model_type {clash[0]!r}")
                found.append(cls)
    return tuple(found)


FAMILIES: tuple[type[ModelArch], ...] = _discover()
ARCHS: dict[str, type[ModelArch]] = {t: family for family in FAMILIES for t in family.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHS)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for family in FAMILIES for a in family.architectures)


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint is not an architecture this toolkit can prune."""


def _describe() -> str:
    examples = ", ".join(family.example for family in FAMILIES)
    return (f"supported architectures: {list(SUPPORTED_ARCHITECTURES)} (model_type {list(SUPPORTED_MODEL_TYPES)}), "
            f"e.g. {examples}")


def arch_class(model_type: Any, architectures: Any = ()) -> type[ModelArch]:
    """The family of `model_type` (or of a listed architecture class name); UnsupportedModelError naming the
    supported ones otherwise."""
    family = ARCHS.get(str(model_type)) if model_type is not None else None
    for name in architectures or ():
        family = family or next((f for f in FAMILIES if name in f.architectures), None)
    if family is None:
        raise UnsupportedModelError(f"model_type={model_type!r} (architectures={list(architectures or [])}) is not "
                                    f"supported; {_describe()}")
    return family


def for_config(config: Any) -> type[ModelArch]:
    """The family of a transformers config (by config.model_type, else config.architectures)."""
    return arch_class(getattr(config, "model_type", None), getattr(config, "architectures", None))


def for_model(model: nn.Module) -> ModelArch:
    """The family of `model` (by model.config.model_type), bound to it."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config; expected a transformers VLM; {_describe()}")
    return for_config(config)(model)


__all__ = ["ARCHS", "FAMILIES", "ModelArch", "SUPPORTED_ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "VisionSites",
           "arch_class", "for_config", "for_model"]
