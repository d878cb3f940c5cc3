"""Where each row's tokens are: [padding][system / pre-prompt][vision span(s)][text], read from input_ids."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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
    vision_index: Tensor  # [B, Vmax] long: positions of the vision tokens, ascending; filler = the row's last one
    text_index: Tensor  # [B, T] long: positions of the text tokens, ascending; filler = last real token
    text_mask: Tensor  # [B, T] bool: True where text_index is a real text token
    last_index: Tensor  # [B] long: position of the last real token (the one that predicts the next)
    text_full: bool = False  # every entry of text_mask is True (no filler), known on the host
    text_tail: bool = False  # no padding and no filler: every row's text is its last T positions (host)
    vision_run: int | None = None  # no padding and every row's vision tokens are one run starting here (host)
    vision_valid: Tensor | None = None  # [B, Vmax] bool: True where vision_index is a real vision token; None when
    # every row holds the same count (then every entry is real: nothing to mask, nothing built)
    vision_counts: tuple[int, ...] = ()  # vision tokens per row, on the host
    positions: Tensor | None = None  # [1, N] long 0..N-1 when the layout made it (the batch-1 path), else None
    _vision: Tensor | None = field(default=None, repr=False)  # vision_mask, or None until first read (batch-1 path)
    _host: dict | None = field(default=None, repr=False)  # host arrays behind the lazily built fields below

    @property
    def vision_mask(self) -> Tensor:
        """[B, N] bool: True at the vision tokens."""
        if self._vision is None:
            self._vision = torch.from_numpy(self._arrays()["is_image"]).to(self.valid.device)
        return self._vision

    def _arrays(self) -> dict:
        """The host arrays (vision_index, valid, is_system, is_image), built from the run when the batch-1 path
        skipped them."""
        host = self._host
        if "run" in host and "valid" not in host:
            seq, first, end = host["run"]
            positions = np.arange(seq)[None]
            host.update(vision_index=positions[:, first:end], valid=np.ones((1, seq), dtype=bool),
                        is_system=positions < first, is_image=(positions >= first) & (positions < end))
        return host

    @property
    def vision_spans(self) -> list[list[tuple[int, int]]]:
        """Per row, [start, end) of each contiguous run of image tokens."""
        return [_runs(row[:count].tolist()) for row, count in zip(self._arrays()["vision_index"], self.vision_counts)]

    @property
    def ragged(self) -> bool:
        """Whether the rows hold different numbers of vision tokens (vision_index is then padded, see vision_valid)."""
        return self.vision_valid is not None

    @property
    def _system(self) -> tuple[np.ndarray, np.ndarray]:
        host = self._arrays()
        if "system" not in host:
            seq = host["valid"].shape[1]
            first_real = np.where(host["valid"], np.arange(seq), seq).min(-1)
            host["system"] = _packed_index(host["is_system"], filler=first_real)
        return host["system"]

    @property
    def system_index(self) -> Tensor:
        """[B, S] long: positions of the real tokens before the first vision span; filler = the first real token."""
        return torch.from_numpy(self._system[0]).to(self.valid.device)

    @property
    def system_mask(self) -> Tensor:
        """[B, S] bool: True where system_index is a real system token."""
        return torch.from_numpy(self._system[1]).to(self.valid.device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def seq_len(self) -> int:
        return self.valid.shape[1]

    @property
    def num_vision(self) -> int:
        """The vision-token count of every row; LayoutError when the rows' counts differ (see `vision_counts`)."""
        if self.vision_valid is not None:
            raise LayoutError(
                f"rows hold different numbers of vision tokens {list(self.vision_counts)} (images of different "
                "sizes), so there is no one count per row: read vision_counts / max_vision and mask with "
                "vision_valid, or batch images that give the same number of tokens"
            )
        return self.vision_index.shape[1]

    @property
    def max_vision(self) -> int:
        """Width Vmax of vision_index: the largest vision-token count of a row."""
        return self.vision_index.shape[1]

    def vision_valid_mask(self) -> Tensor:
        """[B, Vmax] bool: True where vision_index is a real vision token (all True, built now, when not ragged)."""
        if self.vision_valid is not None:
            return self.vision_valid
        return torch.ones(self.vision_index.shape, dtype=torch.bool, device=self.vision_index.device)

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
        static: bool = False,
    ) -> "TokenLayout":
        """Lay out a batch. Rows may hold different numbers of image tokens (images of different sizes).

        input_ids: [B, N]; attention_mask: [B, N] (1 = real token) or None (no padding).
        `tokens_per_image`, when given, must divide each row's image-token count (LLaVA: 576 per image).
        `static`: text_index / text_mask get the width N - min(V) (every non-vision token could be text) instead of
        the batch's longest text, so that a compiled forward has one shape for all prompts of one length.
        When the counts differ, vision_index is [B, Vmax] with each row's positions first and its last vision
        position as filler, vision_valid [B, Vmax] marks the real ones and vision_counts holds each row's count;
        when they are equal, vision_valid is None and the tensors are exactly those of an unpadded [B, V] layout.

        The layout is computed on the host from one copy of the ids and the mask, before the vision tower queues any
        work: on a GPU that is the forward's one read of device values, and nothing else waits for the device.
        """
        if input_ids.dim() != 2:
            raise LayoutError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise LayoutError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        device = input_ids.device
        if input_ids.shape[0] == 1 and not static:  # the batch-1 prefill: host lists, no numpy (see `_one_row`)
            row = input_ids.tolist()[0]
            if attention_mask is None or all(attention_mask.tolist()[0]):
                one = cls._one_row(row, image_token_id, tokens_per_image, device)
                if one is not None:
                    return one
        ids = input_ids.cpu().numpy()  # integer ids never require grad
        batch, seq = ids.shape
        valid = np.ones(ids.shape, dtype=bool) if attention_mask is None else \
            attention_mask.cpu().numpy().astype(bool)
        is_image = (ids == image_token_id) & valid
        counts = is_image.sum(-1)  # [B]
        for row in range(batch):
            if counts[row] == 0:
                raise _no_image(row, image_token_id)
        equal = bool((counts == counts[0]).all())
        positions = np.arange(seq)
        if equal:
            n_vision = int(counts[0])
            _check_multiple(n_vision, tokens_per_image)
            vision_index = np.nonzero(is_image)[1].reshape(batch, n_vision)  # row-major, so ascending per row
            vision_valid, last_vision = None, vision_index[:, -1:]
        else:  # images of different sizes: each row's own positions, padded with its last one
            for row in range(batch):
                _check_multiple(int(counts[row]), tokens_per_image, row)
            last_vision = np.where(is_image, positions, -1).max(-1, keepdims=True)  # [B, 1]
            vision_index, vision_valid = _packed_index(is_image, filler=last_vision[:, 0])
        last_index = np.where(valid, positions, -1).max(-1)  # [B]
        is_text = valid & (positions > last_vision)
        is_system = valid & (positions < vision_index[:, :1])
        for row in range(batch):
            if not is_text[row].any():
                raise _no_text(row)
        width = seq - int(counts.min()) if static else None
        text_index, text_mask = _packed_index(is_text, filler=last_index, width=width)

        dev = _to_device(device)
        return cls(
            valid=dev(valid),
            vision_index=dev(vision_index.astype(np.int64)),
            text_index=dev(text_index),
            text_mask=dev(text_mask),
            last_index=dev(last_index.astype(np.int64)),
            _vision=dev(is_image),
            text_full=bool(text_mask.all()),
            text_tail=bool(text_mask.all()) and bool(valid.all()),
            vision_run=_shared_run(vision_index) if equal and valid.all() else None,
            vision_valid=None if vision_valid is None else dev(vision_valid),
            vision_counts=tuple(int(c) for c in counts),
            _host={"vision_index": vision_index, "valid": valid, "is_system": is_system},
        )

    @classmethod
    def _one_row(cls, ids: list[int], image_token_id: int, tokens_per_image: int | None,
                 device: torch.device) -> "TokenLayout | None":
        """`from_batch` of one unpadded row whose image tokens are one run with text after it (the batch-1 prefill),
        from the ids as a Python list: a few list methods and three tensor ops (0..N-1, a bool row and their views),
        since the host work of every prefill delays the forward. None when the row is laid out otherwise (several
        image runs): the general path then lays it out. The host arrays are built when first read."""
        try:
            first = ids.index(image_token_id)
        except ValueError:
            raise _no_image(0, image_token_id) from None
        n_vision = ids.count(image_token_id)
        end, seq = first + n_vision, len(ids)
        if ids[first:end].count(image_token_id) != n_vision:
            return None  # several runs
        _check_multiple(n_vision, tokens_per_image)
        if end == seq:
            raise _no_text(0)
        positions = torch.arange(seq, device=device).view(1, seq)
        valid = torch.ones(1, seq, dtype=torch.bool, device=device)
        return cls(valid=valid, vision_index=positions[:, first:end], text_index=positions[:, end:],
                   text_mask=valid[:, end:], last_index=positions[:, -1], text_full=True, text_tail=True,
                   vision_run=first, vision_counts=(n_vision,), positions=positions,
                   _host={"run": (seq, first, end)})


def _shared_run(vision_index: np.ndarray) -> int | None:
    """The start of the vision tokens when every row holds them as one contiguous run at the same positions."""
    first = vision_index[0]
    if first[-1] - first[0] + 1 != first.size or not (vision_index == first).all():
        return None
    return int(first[0])


def _to_device(device: torch.device):
    def dev(a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if device.type == "cpu" else t.to(device)

    return dev


def _no_image(row: int, image_token_id: int) -> LayoutError:
    return LayoutError(
        f"row {row} has no image token (id {image_token_id}); a LLaVA prompt must contain the image "
        "placeholder (e.g. 'USER: <image>\\n...') and the processor must expand it"
    )


def _no_text(row: int) -> LayoutError:
    return LayoutError(
        f"row {row} has no text token after its image tokens; put the question after the image "
        "placeholder ('<image>\\n{question}')"
    )


def _check_multiple(n_vision: int, tokens_per_image: int | None, row: int | None = None) -> None:
    if tokens_per_image is not None and n_vision % tokens_per_image != 0:
        who = "each row" if row is None else f"row {row}"
        raise LayoutError(
            f"{who} has {n_vision} image tokens, not a multiple of the {tokens_per_image} features one image "
            "gives; the prompt's placeholder was not expanded to the vision tower's token count"
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


def _packed_index(select: np.ndarray, filler: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions where `select` [B, N] is True, packed left into [B, M] with a validity mask; filler [B] elsewhere.
    M = `width`, or the largest count in the batch."""
    batch, seq = select.shape
    counts = select.sum(-1)
    most = int(counts.max()) if batch else 0
    if width is None:
        width = most
    order = np.argsort(~select, axis=-1, kind="stable")[:, :width]  # selected positions first, ascending
    mask = np.arange(width)[None, :] < counts[:, None]
    index = np.where(mask, order, filler[:, None]).astype(np.int64)
    return index, mask
