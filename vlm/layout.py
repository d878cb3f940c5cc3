"""Where each row's tokens are: [padding][system / pre-prompt][vision span(s)][text], read from input_ids."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlm.errors import UserError


class LayoutError(UserError, ValueError):
    """A batch whose image tokens cannot be laid out; the message says which row and what would be right."""


@dataclass
class TokenLayout:
    """Token positions per row, derived from `input_ids == image_token_id` and the attention mask.

    "Text" is every real token after the last vision span (question + assistant prefix), as in the
    AdaptInfer code; the system / pre-prompt tokens before the vision span are excluded.
    """

    valid: Tensor  # [B, N] bool: real (non-padding) tokens
    vision_spans: list[list[tuple[int, int]]]  # per row, [start, end) of each contiguous run of image tokens
    vision_index: Tensor  # [B, V] long: positions of the vision tokens, ascending
    text_index: Tensor  # [B, T] long: positions of the text tokens, ascending; filler = last real token
    text_mask: Tensor  # [B, T] bool: True where text_index is a real text token
    system_index: Tensor  # [B, S] long: positions of the real tokens before the first vision span; filler = first
    system_mask: Tensor  # [B, S] bool
    last_index: Tensor  # [B] long: position of the last real token (the one that predicts the next)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]

    @property
    def num_vision(self) -> int:
        return self.vision_index.shape[1]

    @property
    def text_lengths(self) -> Tensor:  # [B]
        return self.text_mask.sum(-1)

    @property
    def vision_start(self) -> Tensor:  # [B]
        return self.vision_index[:, 0]

    @classmethod
    def from_batch(
        cls,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_token_id: int,
        tokens_per_image: int | None = None,
    ) -> "TokenLayout":
        """Lay out a batch. Every row must hold the same number of image tokens (same images per row).

        input_ids: [B, N]; attention_mask: [B, N] (1 = real token) or None (no padding).
        `tokens_per_image`, when given, must divide each row's image-token count (LLaVA: 576 per image).
        """
        if input_ids.dim() != 2:
            raise LayoutError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if valid.shape != input_ids.shape:
            raise LayoutError(
                f"attention_mask shape {tuple(valid.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        is_image = (input_ids == image_token_id) & valid
        counts = is_image.sum(-1)  # [B]
        for row in range(batch):
            if counts[row] == 0:
                raise LayoutError(
                    f"row {row} has no image token (id {image_token_id}); a LLaVA prompt must contain the image "
                    "placeholder (e.g. 'USER: <image>\\n...') and the processor must expand it"
                )
        if not bool((counts == counts[0]).all()):
            raise LayoutError(
                f"rows hold different numbers of image tokens {counts.tolist()}; batch rows with the same number "
                "of images (or run them one at a time)"
            )
        n_vision = int(counts[0])
        if tokens_per_image is not None and n_vision % tokens_per_image != 0:
            raise LayoutError(
                f"each row has {n_vision} image tokens, not a multiple of the {tokens_per_image} features one image "
                "gives; the prompt's placeholder was not expanded to the vision tower's token count"
            )
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        vision_index = positions[is_image].view(batch, n_vision)  # row-major, so ascending per row
        spans = [_runs(vision_index[row].tolist()) for row in range(batch)]
        last_vision = vision_index[:, -1:]  # [B, 1]
        first_vision = vision_index[:, :1]
        last_index = torch.where(valid, positions, -1).max(-1).values  # [B]
        is_text = valid & (positions > last_vision)
        is_system = valid & (positions < first_vision)
        text_index, text_mask = _packed_index(is_text, filler=last_index)
        first_real = torch.where(valid, positions, seq).min(-1).values
        system_index, system_mask = _packed_index(is_system, filler=first_real)
        for row in range(batch):
            if not bool(text_mask[row].any()):
                raise LayoutError(
                    f"row {row} has no text token after its image tokens; put the question after the image "
                    "placeholder ('<image>\\n{question}')"
                )
        return cls(
            valid=valid,
            vision_spans=spans,
            vision_index=vision_index,
            text_index=text_index,
            text_mask=text_mask,
            system_index=system_index,
            system_mask=system_mask,
            last_index=last_index,
        )


def _runs(sorted_positions: list[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of ascending positions."""
    spans: list[tuple[int, int]] = []
    start = prev = sorted_positions[0]
    for p in sorted_positions[1:]:
        if p != prev + 1:
            spans.append((start, prev + 1))
            start = p
        prev = p
    spans.append((start, prev + 1))
    return spans


def _packed_index(select: Tensor, filler: Tensor) -> tuple[Tensor, Tensor]:
    """Positions where `select` [B, N] is True, packed left into [B, M] with a validity mask; filler [B] elsewhere."""
    batch, seq = select.shape
    counts = select.sum(-1)
    width = int(counts.max()) if batch else 0
    order = torch.argsort((~select).to(torch.int8), dim=-1, stable=True)[:, :width]  # selected positions first
    mask = torch.arange(width, device=select.device).expand(batch, width) < counts[:, None]
    index = torch.where(mask, order, filler[:, None].expand(batch, width))
    return index, mask
