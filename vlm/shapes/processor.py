"""Tokenizer and LlavaProcessor for the shapes world, built with the stock `tokenizers`/`transformers` classes.

They behave like LLaVA-1.5's: `USER: <image>\\n{question} ASSISTANT:`, the image placeholder expanded by
LlavaProcessor to 576 image tokens (336 px, patch 14, CLS dropped), BOS prepended, answers end with `</s>`.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlm.shapes.world import IMAGE_SIZE, PATCH_SIZE, vocabulary_words

# Ids fixed so that random-weight presets sharing this processor agree (configs/model/tiny.yaml: image id 3).
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<image>", "<pad>")
IMAGE_TOKEN = "<image>"
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_PREFIX = "USER: <image>\n"  # the part of the prompt shared by every question about one image
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Token -> id: the special tokens first, then prompt words and punctuation, then the world's words."""
    words = list(SPECIAL_TOKENS) + ["user", "assistant", ":", "?", "\n", ",", "."]
    words += [w for w in vocabulary_words() if w not in words]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level, lower-casing tokenizer; newline and punctuation are tokens, spaces are not."""
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|[^\w\s]"), behavior="isolated"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=2048, padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if fast.convert_tokens_to_ids(IMAGE_TOKEN) != vocab[IMAGE_TOKEN]:
        raise RuntimeError("the image token did not keep its fixed id; the vocabulary order is wrong")
    return fast


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at 336 px (resize shortest edge, centre crop, CLIP mean/std)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def build_processor() -> LlavaProcessor:
    """The LLaVA-1.5-style processor: 576 image tokens per image (24x24 patches, CLS dropped)."""
    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def prompt_for(question: str) -> str:
    """The full single-question prompt in LLaVA-1.5 form."""
    return PROMPT_TEMPLATE.format(question=question)
