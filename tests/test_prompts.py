"""LLaVA-1.5 prompt formatting and left-padded batches (vlm.prompts)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlm.prompts import PromptError, encode_batch, format_prompt
from vlm.tasks.base import VQASample

PAD_ID, IMAGE_ID, USER_ID, ASSISTANT_ID = 0, 3, 4, 5
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def tiny_processor(image_size: int = 56, vocab_size: int = 64) -> LlavaProcessor:
    """A word-level LLaVA processor: words 'w6'..'w63', USER:/ASSISTANT:, (image_size/14)^2 image tokens."""
    words = {"<pad>": PAD_ID, "<unk>": 1, "<s>": 2, "<image>": IMAGE_ID, "USER:": USER_ID, "ASSISTANT:": ASSISTANT_ID}
    words.update({f"w{i}": i for i in range(6, vocab_size)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def _sample(i: int, words: int) -> VQASample:
    image = Image.new("RGB", (40 + 10 * i, 60), (30 * i, 100, 200))
    prompt = " ".join(f"w{10 + k}" for k in range(words))
    return VQASample(sample_id=f"s{i}", image=image, question=prompt, prompt=prompt, answers=["w7"])


def test_format_prompt_is_the_llava_15_literal_without_a_chat_template():
    processor = tiny_processor()
    assert format_prompt(processor, "What colour is it?") == "USER: <image>\nWhat colour is it? ASSISTANT:"


def test_format_prompt_uses_the_chat_template_when_present():
    processor = tiny_processor()
    processor.chat_template = LLAVA_CHAT_TEMPLATE.replace("USER: ", "USER:  ")  # distinguishable from the literal
    assert format_prompt(processor, "w10 w11") == "USER:  <image>\nw10 w11 ASSISTANT:"


def test_encode_batch_left_pads_and_expands_the_image():
    processor = tiny_processor()
    samples = [_sample(0, 4), _sample(1, 1), _sample(2, 2)]
    inputs = encode_batch(processor, samples, device="cpu", dtype=torch.float64)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (3, 1 + 16 + 4 + 1)
    assert inputs["pixel_values"].shape == (3, 3, 56, 56) and inputs["pixel_values"].dtype == torch.float64
    assert ids.dtype == torch.long
    assert mask[:, -1].all(), "left padding: every row ends with a real token"
    assert ids[:, -1].eq(ASSISTANT_ID).all()
    lengths = mask.sum(-1).tolist()
    assert lengths == [22, 19, 20]
    for row, n in enumerate(lengths):
        assert not mask[row, : ids.shape[1] - n].any() and ids[row, : ids.shape[1] - n].eq(PAD_ID).all()
        assert int((ids[row] == IMAGE_ID).sum()) == 16
        assert int(ids[row, ids.shape[1] - n]) == USER_ID  # the prompt starts right after the padding
    assert processor.tokenizer.padding_side == "right", "encode_batch must not change the processor"


def test_encode_batch_errors():
    with pytest.raises(PromptError, match="no processor"):
        encode_batch(None, [_sample(0, 1)])
    with pytest.raises(PromptError, match="no samples"):
        encode_batch(tiny_processor(), [])
