"""The seam between the toolkit and one model family: where its parts are and the facts the engine needs.

Every other module (engine, probe, collector, selectors, loading, benchmark) reaches a model only through a
`ModelArch` (`vlm.arch.for_model(model)` / `for_config(config)`); a family's module (`vlm/arch/<family>.py`) is
the one place that names its module paths, its transformers classes and its config fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import Tensor, nn


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


class ModelArch:
    """One model family behind one protocol. Class-level facts read a config; an instance is bound to a model.

    Subclasses set `model_types` (config.model_type values), `architectures`, `example` (a hub id for messages) and
    `renumber_positions` (False for M-RoPE: positions are kept), and implement the sites below.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()  # transformers class names of its checkpoints
    example: ClassVar[str] = ""
    renumber_positions: ClassVar[bool] = True  # contiguous renumbering after a drop is meaningful (1-D RoPE)

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

    # -- inputs ------------------------------------------------------------------------------------------
    def check_vision_inputs(self, kwargs: Mapping[str, Any], batch: int, n_vision: int) -> str | None:
        """Why the image inputs of a prefill call do not match `batch` rows of `n_vision` image tokens, or None."""
        return None

    def row_images(self, kwargs: Mapping[str, Any], batch: int) -> Tensor | None:
        """The image inputs split per row [B, ...] (to seed per-row generators), or None when they cannot be."""
        return None
