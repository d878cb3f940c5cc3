"""Model families behind one protocol (`vlm.arch.base.ModelArch`): the only place that names a model's module paths.

Adding a family: a module `vlm/arch/<family>.py` with a `ModelArch` subclass, and its name in `FAMILIES` below.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vlm.arch.base import ModelArch, VisionSites
from vlm.arch.llava import LlavaArch
from vlm.arch.llava_next import LlavaNextArch, LlavaOnevisionArch
from vlm.arch.qwen2_vl import Qwen2VLArch
from vlm.errors import UserError

FAMILIES: tuple[type[ModelArch], ...] = (LlavaArch, Qwen2VLArch, LlavaNextArch, LlavaOnevisionArch)
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
