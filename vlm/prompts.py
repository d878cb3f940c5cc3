"""Prompts: the user turn around one image (the processor's chat template, else LLaVA-1.5's), and left-padded model
inputs for a batch of samples."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from vlm.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from vlm.tasks.base import VQASample

LLAVA_15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"


class PromptError(UserError, ValueError):
    """A processor or sample that cannot be turned into LLaVA inputs; the message says what would be right."""


def _chat_template(processor: Any) -> str | None:
    """The processor's chat template, or its tokenizer's, or None."""
    template = getattr(processor, "chat_template", None)
    if template:
        return template
    tokenizer = getattr(processor, "tokenizer", None)
    return getattr(tokenizer, "chat_template", None) or None


def format_prompt(processor: Any, text: str, with_image: bool = True) -> str:
    """One user turn with one image before `text` (none with with_image=False), ending in the assistant prefix.

    Uses the processor's chat template when it has one (llava-hf and Qwen checkpoints do), else the LLaVA-1.5
    literal "USER: <image>\\n{text} ASSISTANT:" ("USER: {text} ASSISTANT:" without the image). The placeholder is
    the processor's `image_token`.
    """
    if _chat_template(processor):
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        conversation = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if isinstance(prompt, list):  # some processors return one string per conversation
            prompt = prompt[0]
        return str(prompt)
    if not with_image:
        return LLAVA_15_TEMPLATE.replace(IMAGE_PLACEHOLDER + "\n", "").format(prompt=text)
    image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    return LLAVA_15_TEMPLATE.replace(IMAGE_PLACEHOLDER, image_token).format(prompt=text)


def encode_batch(
    processor: Any,
    samples: Sequence["VQASample"],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch, left-padded (ready for generation), on `device`.

    Returns input_ids [B, N], attention_mask [B, N] (1 = real token) and pixel_values [B, 3, H, W]
    (cast to `dtype` when given, e.g. the model's float16).
    """
    if processor is None:
        raise PromptError(
            "the model has no processor; give the model preset a `processor` (a hub id, path or 'demo')"
        )
    if not samples:
        raise PromptError("encode_batch got no samples; pass at least one VQASample")
    texts = [format_prompt(processor, s.prompt) for s in samples]
    images = [s.image.convert("RGB") if s.image.mode != "RGB" else s.image for s in samples]
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        raise PromptError(
            f"the tokenizer of {type(processor).__name__} has no pad token; batches need one to left-pad "
            "(set tokenizer.pad_token, e.g. to its unk or eos token)"
        )
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value
    return out


__all__ = ["LLAVA_15_TEMPLATE", "PromptError", "encode_batch", "format_prompt"]
