"""The seam between the toolkit and one model family: where its parts are and the facts the engine needs.

Every other module (engine, probe, collector, selectors, loading, benchmark) reaches a model only through a
`ModelArch` (`vlm.arch.for_model(model)` / `for_config(config)`); a family's module (`vlm/arch/<family>.py`) is
the one place that names its module paths, its transformers classes and its config fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn


def square_grid(n_tokens: int | None) -> tuple[int, int] | None:
    """(side, side) when n_tokens is a perfect square (LLaVA-1.5: 24 x 24), else None."""
    if n_tokens is None or n_tokens < 0:
        return None
    side = math.isqrt(n_tokens)
    return (side, side) if side * side == n_tokens else None


@dataclass
class VisionSites:
    """Where a model keeps its vision side, for the selectors that choose before the language model."""

    tower: nn.Module  # the vision tower (CLIP/SigLIP vision model, Qwen's ViT)
    projector: nn.Module  # vision features F [.., Dv] -> LM input embeddings P [.., D]
    encoder_layers: nn.ModuleList | None  # the tower's encoder layers, when it has them
    feature_layer: Any  # hidden_states index of the features fed to the projector (None: the tower's last output)
    select_strategy: str  # "default" (patch tokens only, CLS dropped) or "full"
    has_cls: bool  # the tower prepends a CLS token (CLIP: yes; SigLIP, Qwen: no)
    # None when the tower's patch tokens of an image are the LM's vision tokens one for one, as one raster grid (what
    # selectors reading features, CLS attention or a spatial grid rely on); else why not (LLaVA-NeXT's anyres tiles)
    patch_mapping: str | None = None

    def feature_attention(self) -> nn.Module:
        """The self-attention module of the encoder layer whose output is the projector's input.

        hidden_states[f] is the output of encoder layer f-1 (hidden_states[0] = the embeddings). Raises
        ValueError when there is no such layer (several feature layers, or the embeddings themselves).
        """
        if not isinstance(self.feature_layer, int):
            raise ValueError(f"vision_feature_layer = {self.feature_layer!r}: need a single int layer")
        if self.encoder_layers is None:
            raise ValueError(f"{type(self.tower).__name__} has no encoder layers to read attention from")
        n = len(self.encoder_layers)
        index = self.feature_layer - 1 if self.feature_layer >= 0 else n + self.feature_layer
        if not 0 <= index < n:
            raise ValueError(f"vision_feature_layer = {self.feature_layer} has no attention layer (encoder has {n})")
        return self.encoder_layers[index].self_attn

    @property
    def span(self) -> tuple[nn.Module, nn.Module]:
        """(first, last): the vision side starts with first's forward and ends with last's (a pre-hook on first and
        a forward hook on last time it). last is the projector when it runs after the tower (LLaVA), the tower
        when the projector is part of it (Qwen's merger)."""
        inside = any(m is self.projector for m in self.tower.modules())
        return self.tower, (self.tower if inside else self.projector)


class ModelArch:
    """One model family behind one protocol. Class-level facts read a config; an instance is bound to a model.

    Subclasses set `model_types` (config.model_type values), `architectures`, `example` (a hub id for messages) and
    `renumber_positions` (False for M-RoPE: positions are kept), and implement the sites below.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()  # transformers class names of its checkpoints
    example: ClassVar[str] = ""
    renumber_positions: ClassVar[bool] = True  # contiguous renumbering after a drop is meaningful (1-D RoPE)
    vision_depth_key: ClassVar[str] = "num_hidden_layers"  # the vision_config field that holds the tower's depth

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- config-level facts (no model needed) ---------------------------------------------------------
    @classmethod
    def model_class(cls, config: Any) -> type:
        """The transformers class that loads this family's checkpoints."""
        raise NotImplementedError

    @classmethod
    def config_from_dict(cls, arch: Mapping[str, Any]) -> Any:
        """A config from a plain mapping with text_config / vision_config sub-mappings (configs/model/*-arch.yaml)."""
        raise NotImplementedError

    @classmethod
    def tokens_per_image(cls, config: Any, processor: Any = None) -> int | None:
        """Vision tokens one image gives in the language model; None when it varies with the image."""
        raise NotImplementedError

    @classmethod
    def vision_depth(cls, config: Any) -> int:
        """Layers (blocks) of the vision tower."""
        return int(getattr(config.vision_config, cls.vision_depth_key))

    @classmethod
    def text_widths(cls, config: Any) -> tuple[int, int]:
        """(hidden size, intermediate size) of the decoder, for the FLOPs formula."""
        tc = config.get_text_config()
        return int(tc.hidden_size), int(tc.intermediate_size)

    @classmethod
    def match_processor(cls, arch: Mapping[str, Any], processor: Any) -> dict[str, Any]:
        """A random model's arch mapping with its vocabulary and image token sized to `processor`'s tokenizer."""
        tokenizer = processor.tokenizer
        arch = dict(arch)
        arch["image_token_id"] = int(tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>")))
        arch["text_config"] = {**arch["text_config"], "vocab_size": len(tokenizer)}
        if tokenizer.pad_token_id is not None:
            arch["text_config"]["pad_token_id"] = int(tokenizer.pad_token_id)
        return arch

    # -- sites of a bound model -----------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward takes input_ids and the image inputs, then runs the language model."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def rotary_embedding(self) -> nn.Module:
        """rotary(hidden, position_ids) -> (cos, sin) [B, N, head_dim], as the decoder layers receive them."""
        return self.language_model.rotary_emb

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def vision_sites(self) -> VisionSites:
        raise NotImplementedError

    def vision_tokens_per_image(self, processor: Any = None) -> int | None:
        return self.tokens_per_image(self.config, processor)

    def image_grid(self, processor: Any = None) -> tuple[int, int] | None:
        """(rows, cols) token grid of every image when the tower (or the processor) fixes it, else None."""
        return square_grid(self.vision_tokens_per_image(processor))

    # -- inputs ------------------------------------------------------------------------------------------
    def check_vision_inputs(self, kwargs: Mapping[str, Any], batch: int, n_vision: int) -> str | None:
        """Why the image inputs of a prefill call do not match `batch` rows of `n_vision` image tokens, or None."""
        return None

    def row_images(self, kwargs: Mapping[str, Any], batch: int) -> Tensor | None:
        """The image inputs split per row [B, ...] (to seed per-row generators), or None when they cannot be."""
        return None

    def image_grids(self, kwargs: Mapping[str, Any]) -> list[tuple[int, int]] | None:
        """Each image's (rows, cols) grid of vision tokens, in the order of the call's images (raster order: token
        r * cols + c of an image sits at row r, column c), from a forward call's image inputs; None when the call has
        none or the family cannot tell."""
        return None

    def tower_grids(self, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[int, int]] | None:
        """`image_grids` read from one call of the vision tower (vision_sites().tower) instead of the model's: the
        selectors capture it there, since `generate` may run the tower before the language model's forward (and
        then passes no image inputs to it)."""
        return None

    def random_image_inputs(self, input_ids: Tensor, grid: tuple[int, int] | None = None,
                            generator: torch.Generator | None = None, dtype: torch.dtype | None = None
                            ) -> dict[str, Tensor]:
        """Image inputs with random pixels for a forward over input_ids [B, N] whose rows each hold one image's tokens
        (image_token_id), every image with the token grid `grid` (None: the family's fixed one), on input_ids'
        device; floating inputs in `dtype`. For latency work without a processor."""
        raise NotImplementedError

    def extend_text(self, inputs: Mapping[str, Any], new_ids: Tensor) -> dict[str, Any]:
        """The prompt's model inputs followed by the text tokens new_ids [B, n] (a continuation to score): input_ids
        and attention_mask extended, image inputs as they are; families with per-token modality inputs extend those
        too (as text)."""
        out = dict(inputs)
        out["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
        if inputs.get("attention_mask") is not None:
            out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_ids)], dim=1)
        return out
