"""LLaVA (LlavaForConditionalGeneration): CLIP/SigLIP tower, MLP projector, Llama-style 1-D RoPE decoder."""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from vlm.arch.base import ModelArch, VisionSites


class LlavaArch(ModelArch):
    model_types = ("llava",)
    architectures = ("LlavaForConditionalGeneration",)
    example = "llava-hf/llava-1.5-7b-hf"
    renumber_positions = True

    @classmethod
    def model_class(cls, config: Any) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def config_from_dict(cls, arch: Mapping[str, Any]) -> Any:
        from transformers import LlavaConfig

        return LlavaConfig(**{k: v for k, v in arch.items() if k != "model_type"})

    @classmethod
    def tokens_per_image(cls, config: Any, processor: Any = None) -> int:
        """The tower's tokens ((image_size / patch_size)^2 patches, plus CLS on towers that have one: CLIP yes,
        SigLIP no), less the first token under the 'default' strategy (which drops it)."""
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        tower = n + (0 if "siglip" in str(getattr(vc, "model_type", "")) else 1)
        return tower - 1 if config.vision_feature_select_strategy == "default" else tower

    def vision_sites(self) -> VisionSites:
        inner = getattr(self.model, "model", self.model)
        tower = getattr(inner, "vision_tower", None)
        projector = getattr(inner, "multi_modal_projector", None)
        if tower is None or projector is None:
            raise ValueError(f"{type(self.model).__name__} has no model.vision_tower / model.multi_modal_projector "
                             "(a LLaVA model has both)")
        vision_model = getattr(tower, "vision_model", tower)
        encoder = getattr(vision_model, "encoder", None)
        layers = getattr(encoder, "layers", None) if encoder is not None else None
        embeddings = getattr(vision_model, "embeddings", None)
        return VisionSites(
            tower=tower, projector=projector, encoder_layers=layers if isinstance(layers, nn.ModuleList) else None,
            feature_layer=self.config.vision_feature_layer, select_strategy=str(self.config.vision_feature_select_strategy),
            has_cls=embeddings is not None and hasattr(embeddings, "class_embedding"),
        )

    @functools.cached_property
    def _per_image(self) -> int:
        """tokens_per_image of the bound model, read once (every prefill checks its pixel_values against it)."""
        return self.tokens_per_image(self.config)

    def check_vision_inputs(self, kwargs: Mapping[str, Any], batch: int, n_vision: int) -> str | None:
        pixels = kwargs.get("pixel_values")
        if not (isinstance(pixels, Tensor) and pixels.dim() == 4 and n_vision > 0):
            return None
        per_image = self._per_image
        if pixels.shape[0] * per_image == batch * n_vision:
            return None
        return (f"input_ids holds {batch} rows with {n_vision} image tokens each ({batch * n_vision} in all) but "
                f"pixel_values holds {pixels.shape[0]} images ({pixels.shape[0] * per_image} vision tokens at "
                f"{per_image} per image): give pixel_values one image per image placeholder, in row order")

    def row_images(self, kwargs: Mapping[str, Any], batch: int) -> Tensor | None:
        pixels = kwargs.get("pixel_values")
        return pixels if isinstance(pixels, Tensor) and pixels.shape[0] == batch else None

    def image_grids(self, kwargs: Mapping[str, Any]) -> list[tuple[int, int]] | None:
        """Every image of pixel_values [n, 3, S, S] gets the tower's fixed grid (24 x 24 on LLaVA-1.5); None when its
        token count is not a square (a CLS token kept by the 'full' strategy)."""
        pixels = kwargs.get("pixel_values")
        grid = self.image_grid()
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or grid is None:
            return None
        return [grid] * int(pixels.shape[0])

    def tower_grids(self, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[int, int]] | None:
        return self.image_grids({"pixel_values": args[0] if args else kwargs.get("pixel_values")})

    def random_image_inputs(self, input_ids: Tensor, grid: tuple[int, int] | None = None,
                            generator: torch.Generator | None = None, dtype: torch.dtype | None = None
                            ) -> dict[str, Tensor]:
        """pixel_values [B, 3, S, S] at the tower's image size S; `grid`, when given, must be the tower's own."""
        fixed = self.image_grid()
        if grid is not None and tuple(grid) != fixed:
            raise ValueError(f"{type(self.model).__name__}: every image gives a {fixed} token grid (the tower's "
                             f"{self.config.vision_config.image_size} px input), not {tuple(grid)}")
        size = int(self.config.vision_config.image_size)
        pixels = torch.randn(input_ids.shape[0], 3, size, size, generator=generator)
        return {"pixel_values": pixels.to(input_ids.device, dtype or torch.float32)}
