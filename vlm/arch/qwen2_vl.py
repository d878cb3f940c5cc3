"""Qwen2-VL and Qwen2.5-VL: a ViT with a 2x2 patch merger (no CLS token), dynamic resolution (the vision-token count
follows the image size), and an M-RoPE decoder (3-D positions: time, height, width), whose positions are kept as
they are after a drop (the authors' Qwen code does not renumber them)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from vlm.arch.base import ModelArch, VisionSites

_CLASSES = {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig"),
            "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig")}


def _transformers_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


class Qwen2VLArch(ModelArch):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    example = "Qwen/Qwen2-VL-2B-Instruct"
    renumber_positions = False  # M-RoPE: the 3-D positions of a kept token are kept
    vision_depth_key = "depth"

    @classmethod
    def model_class(cls, config: Any) -> type:
        return _transformers_class(_CLASSES[config.model_type][0])

    @classmethod
    def config_from_dict(cls, arch: Mapping[str, Any]) -> Any:
        arch = dict(arch)
        model_type = arch.pop("model_type", "qwen2_vl")
        return _transformers_class(_CLASSES[model_type][1])(**arch)

    @classmethod
    def tokens_per_image(cls, config: Any, processor: Any = None) -> int | None:
        """Fixed only when the processor resizes every image to one pixel count (min_pixels == max_pixels) and the
        image is square (the shapes world's): (side / (patch * merge))^2 tokens; None (variable) otherwise."""
        image_processor = getattr(processor, "image_processor", None)
        size = getattr(image_processor, "size", None) or {}
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
        if lo is None or lo != hi:
            return None
        vc = config.vision_config
        factor = vc.patch_size * vc.spatial_merge_size
        side = round(lo ** 0.5 / factor)
        return side * side if (side * factor) ** 2 == lo else None

    @classmethod
    def match_processor(cls, arch: Mapping[str, Any], processor: Any) -> dict[str, Any]:
        arch = super().match_processor(arch, processor)
        tokenizer = processor.tokenizer
        for key, token in (("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                           ("vision_end_token_id", "<|vision_end|>")):
            arch[key] = int(tokenizer.convert_tokens_to_ids(token))
        return arch

    def vision_sites(self) -> VisionSites:
        visual = self.model.model.visual
        return VisionSites(tower=visual, projector=visual.merger, encoder_layers=visual.blocks, feature_layer=None,
                           select_strategy="full", has_cls=False)

    def _grid_tokens(self, grid_thw: Tensor) -> Tensor:
        """Vision tokens per image [n_images] from image_grid_thw [n_images, 3]."""
        return grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size ** 2

    def check_vision_inputs(self, kwargs: Mapping[str, Any], batch: int, n_vision: int) -> str | None:
        grid = kwargs.get("image_grid_thw")
        if not isinstance(grid, Tensor) or n_vision == 0:
            return None
        total = int(self._grid_tokens(grid).sum())
        if total == batch * n_vision:
            return None
        return (f"input_ids holds {batch} rows with {n_vision} image tokens each ({batch * n_vision} in all) but "
                f"image_grid_thw describes {grid.shape[0]} images of {total} vision tokens: give the processor's "
                "pixel_values and image_grid_thw for exactly the images of these rows")

    def row_images(self, kwargs: Mapping[str, Any], batch: int) -> Tensor | None:
        """pixel_values [patches, C*T*P*P] split into [B, patches / B, ...] when the rows' images are alike."""
        pixels, grid = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
        if not isinstance(pixels, Tensor) or not isinstance(grid, Tensor) or pixels.shape[0] % batch:
            return None
        per_image = grid.prod(-1)
        if grid.shape[0] % batch or not bool((per_image == per_image[0]).all()):
            return None
        return pixels.reshape(batch, -1, pixels.shape[-1])

    def image_grids(self, kwargs: Mapping[str, Any]) -> list[tuple[int, int]] | None:
        """(h, w) / spatial_merge_size per image of image_grid_thw [n_images, 3] (t = 1 for an image): the merged
        tokens follow in raster order over that grid. None without image_grid_thw or for a multi-frame entry."""
        grid = kwargs.get("image_grid_thw")
        if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[-1] != 3:
            return None
        merge = int(self.config.vision_config.spatial_merge_size)
        out = []
        for t, h, w in grid.tolist():
            if t != 1:
                return None
            out.append((int(h) // merge, int(w) // merge))
        return out

    def tower_grids(self, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[int, int]] | None:
        """The tower is called as visual(pixel_values, grid_thw=image_grid_thw) (images; videos come with t > 1)."""
        return self.image_grids({"image_grid_thw": kwargs.get("grid_thw", args[1] if len(args) > 1 else None)})

    def random_image_inputs(self, input_ids: Tensor, grid: tuple[int, int] | None = None,
                            generator: torch.Generator | None = None, dtype: torch.dtype | None = None
                            ) -> dict[str, Tensor]:
        """One image per row with `grid` (rows, cols) merged tokens: pixel_values [B * rows * cols * m^2, C*T*P*P]
        (flattened patches, as the processor gives them), image_grid_thw [B, 3] = (1, rows*m, cols*m) and
        mm_token_type_ids [B, N] (1 at the image tokens), m = spatial_merge_size."""
        if grid is None:
            raise ValueError(f"{self.config.model_type}: the vision-token grid follows the image size; give grid=(rows, "
                             "cols) of merged tokens, e.g. (24, 24) for a 672 x 672 px image")
        vc = self.config.vision_config
        merge, rows, cols = int(vc.spatial_merge_size), int(grid[0]), int(grid[1])
        batch = input_ids.shape[0]
        width = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        pixels = torch.randn(batch * rows * cols * merge * merge, width, generator=generator)
        grid_thw = torch.tensor([[1, rows * merge, cols * merge]] * batch, dtype=torch.long)
        types = (input_ids == self.image_token_id).long()
        device = input_ids.device
        return {"pixel_values": pixels.to(device, dtype or torch.float32), "image_grid_thw": grid_thw.to(device),
                "mm_token_type_ids": types}

    def extend_text(self, inputs: Mapping[str, Any], new_ids: Tensor) -> dict[str, Any]:
        """As the base, and mm_token_type_ids extended with 0 (text) for the new tokens (M-RoPE reads it)."""
        out = super().extend_text(inputs, new_ids)
        types = inputs.get("mm_token_type_ids")
        if isinstance(types, Tensor):
            out["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(new_ids, dtype=types.dtype)], dim=1)
        return out
