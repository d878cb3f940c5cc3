"""LLaVA-NeXT (LlavaNextForConditionalGeneration) and LLaVA-OneVision (LlavaOnevisionForConditionalGeneration):
anyres tiles with an image-newline token, MLP projector, 1-D RoPE decoder (Llama / Mistral / Vicuna; OneVision: Qwen2).

How an image becomes vision tokens ("anyres"): the image processor picks the grid resolution (image_grid_pinpoints)
that fits the image best, cuts the resized, padded image into tiles of the tower's input size, and puts the whole
image resized to one tile (the base tile) first. The tower encodes every tile on its own; the language model then
sees the base tile's patches (raster order), then the tiles' patches re-arranged into one (rows x side, cols x side)
grid with the padding rows or columns cut off ("unpadding", to the image's aspect ratio), each grid row followed by
the learned image-newline embedding. The processor expands `<image>` into that whole count, all with the image token
id, so `vlm.layout.TokenLayout` sees base patches, tile patches and newline tokens alike as vision tokens: the
newline embeddings are scored, kept and dropped like the patches (as peer toolkits do).

The count follows the image size (`image_tokens`); it is fixed (`tokens_per_image`) only for a processor with one
grid resolution, for images of that resolution's aspect ratio (the shapes world's square images).

Selectors before the language model: DivPrune and CDPruner read the LM's own vision embeddings and run as on
LLaVA-1.5. VisionZip, VisPruner and pooling read the tower's patches (features, CLS attention per tile) or a raster
grid, which do not line up one for one with the LM's vision tokens here (per-tile tower outputs, a re-arranged and
unpadded grid, newline tokens): `VisionSites.patch_mapping` says so and they are `infeasible`.

LLaVA-OneVision: a SigLIP tower (no CLS; strategy "full"), a Qwen2 decoder, and `vision_aspect_ratio`
"anyres_max_N": an unpadded grid of more than about N tiles' patches is bilinearly shrunk. A prompt with several
images gets each image's base tile plus one newline token only (no tiles), as the model does.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from torch import Tensor

from vlm.arch.base import VisionSites
from vlm.arch.llava import LlavaArch

PATCH_MAPPING = ("the tower encodes each anyres tile on its own and the language model sees the base tile, then the "
                 "tiles re-arranged into one unpadded grid with an image-newline token after each row, so the tower's "
                 "patches (features, CLS attention) and a raster grid do not map one for one onto its vision tokens")


def _transformers_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def best_resolution(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) of the grid resolution the processor and the model choose for an image of (height, width)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution([int(image_size[0]), int(image_size[1])], [list(p) for p in pinpoints])
    return int(height), int(width)


def unpadded_grid(image_size: Sequence[int], rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) of a (rows, cols) patch grid after cutting the padding that fitted an image of (height, width)
    into it: the rows (or columns) beyond the image's aspect ratio, an equal number from each side."""
    height, width = int(image_size[0]), int(image_size[1])
    if width / height > cols / rows:  # wider than the grid: padding above and below
        kept = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - kept) // 2), cols
    kept = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - kept) // 2)


class LlavaNextArch(LlavaArch):
    model_types = ("llava_next",)
    architectures = ("LlavaNextForConditionalGeneration",)
    example = "llava-hf/llava-v1.6-mistral-7b-hf"
    renumber_positions = True
    classes = ("LlavaNextForConditionalGeneration", "LlavaNextConfig")

    @classmethod
    def model_class(cls, config: Any) -> type:
        return _transformers_class(cls.classes[0])

    @classmethod
    def config_from_dict(cls, arch: Mapping[str, Any]) -> Any:
        return _transformers_class(cls.classes[1])(**{k: v for k, v in arch.items() if k != "model_type"})

    @classmethod
    def tile_tokens(cls, config: Any) -> int:
        """Vision tokens one tile gives (the base tile's count): the tower's patches, CLS dropped under 'default'."""
        return LlavaArch.tokens_per_image(config)

    @classmethod
    def shrink_grid(cls, config: Any, rows: int, cols: int) -> tuple[int, int]:
        """The unpadded grid as the language model gets it (LLaVA-NeXT: unchanged)."""
        return rows, cols

    @classmethod
    def image_tokens(cls, config: Any, image_size: Sequence[int], tiled: bool = True) -> int:
        """Vision tokens of one image of (height, width): the base tile, then (when `tiled`) the unpadded tile grid
        with one newline token per grid row; untiled (OneVision's images in a multi-image prompt): base + 1 newline."""
        base = cls.tile_tokens(config)
        if not tiled:
            return base + 1
        side = config.vision_config.image_size // config.vision_config.patch_size
        height, width = best_resolution(image_size, config.image_grid_pinpoints)
        tile = config.vision_config.image_size
        rows, cols = unpadded_grid(image_size, height // tile * side, width // tile * side)
        rows, cols = cls.shrink_grid(config, rows, cols)
        return base + rows * cols + rows

    @classmethod
    def tokens_per_image(cls, config: Any, processor: Any = None) -> int | None:
        """Fixed only when the processor has one grid resolution (every image goes to the same tiles) and the images
        have its aspect ratio (no unpadding; the shapes world's square images on a square resolution): that count;
        None (variable with the image) otherwise."""
        pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        if not pinpoints or len(pinpoints) != 1:
            return None
        return cls.image_tokens(config, tuple(pinpoints[0]))

    @classmethod
    def match_processor(cls, arch: Mapping[str, Any], processor: Any) -> dict[str, Any]:
        """As LLaVA's, plus the processor's grid resolutions (the model must pick the tiles the processor cut)."""
        arch = super().match_processor(arch, processor)
        arch["image_grid_pinpoints"] = [list(p) for p in processor.image_processor.image_grid_pinpoints]
        return arch

    def vision_sites(self) -> VisionSites:
        sites = super().vision_sites()
        sites.patch_mapping = PATCH_MAPPING
        return sites

    def _tiled(self, kwargs: Mapping[str, Any], n_images: int) -> list[bool]:
        """Per image: whether the model tiles it (LLaVA-NeXT: always)."""
        return [True] * n_images

    def check_vision_inputs(self, kwargs: Mapping[str, Any], batch: int, n_vision: int) -> str | None:
        sizes = kwargs.get("image_sizes")
        if not isinstance(sizes, Tensor) or n_vision == 0:
            return None
        sizes_list = [tuple(int(v) for v in s) for s in sizes.tolist()]
        tiled = self._tiled(kwargs, len(sizes_list))
        total = sum(self.image_tokens(self.config, s, t) for s, t in zip(sizes_list, tiled))
        if total == batch * n_vision:
            return None
        return (f"input_ids holds {batch} rows with {n_vision} image tokens each ({batch * n_vision} in all) but "
                f"image_sizes describes {len(sizes_list)} images of {total} vision tokens (anyres tiles and newline "
                "tokens counted): give the processor's pixel_values and image_sizes for exactly the images of these "
                "rows")

    def row_images(self, kwargs: Mapping[str, Any], batch: int) -> Tensor | None:
        """pixel_values [images, tiles, C, H, W] when it holds one image per row and every image has the same size
        (then no row's tiles are padded for another row's)."""
        pixels, sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
        if not isinstance(pixels, Tensor) or pixels.shape[0] != batch or not isinstance(sizes, Tensor):
            return None
        return pixels if bool((sizes == sizes[:1]).all()) else None


class LlavaOnevisionArch(LlavaNextArch):
    model_types = ("llava_onevision",)
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    example = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    classes = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig")

    @classmethod
    def match_processor(cls, arch: Mapping[str, Any], processor: Any) -> dict[str, Any]:
        arch = super().match_processor(arch, processor)
        arch["video_token_id"] = int(processor.tokenizer.convert_tokens_to_ids(processor.video_token))
        return arch

    @classmethod
    def shrink_grid(cls, config: Any, rows: int, cols: int) -> tuple[int, int]:
        """anyres_max_N: a grid above 1.1 x the patches of N tiles is shrunk by that ratio (floored per side)."""
        max_tiles = int(str(config.vision_aspect_ratio).removeprefix("anyres_max_"))
        side = config.vision_config.image_size // config.vision_config.patch_size
        ratio = math.sqrt(rows * cols / (max_tiles * side * side))
        if ratio > 1.1:
            return int(rows // ratio), int(cols // ratio)
        return rows, cols

    def _tiled(self, kwargs: Mapping[str, Any], n_images: int) -> list[bool]:
        """A row with several images gets them untiled (base tile + newline); a row with one image tiles it."""
        per_row = kwargs.get("batch_num_images")
        if per_row is None:
            return [True] * n_images
        counts = [int(n) for n in (per_row.tolist() if isinstance(per_row, Tensor) else per_row)]
        return [n == 1 for n in counts for _ in range(n)]
