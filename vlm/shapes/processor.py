"""Tokenizer and processors for the shapes world, built with the stock `tokenizers`/`transformers` classes.

`build_processor`: LLaVA-1.5's form, `USER: <image>\\n{question} ASSISTANT:`, the image placeholder expanded by
LlavaProcessor to 576 image tokens (336 px, patch 14, CLS dropped), BOS prepended, answers end with `</s>`.
`build_qwen2_vl_processor`: Qwen2-VL's form (`<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...`),
the same words plus Qwen's special tokens, images resized to a fixed small pixel count (16 vision tokens at 112 px).
`build_llava_next_processor` / `build_llava_onevision_processor`: LLaVA-1.5's prompt form with anyres tiles of
56 px on one 112 x 112 grid resolution: 16 base patches + 8 x 8 tile patches + 8 newline tokens = 88 vision tokens.
"""
from __future__ import annotations

from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast
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


def build_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level, lower-casing tokenizer; newline and punctuation are tokens, spaces are not.
    `extra_special` tokens get the ids after the vocabulary, in order."""
    vocab = vocabulary()
    vocab.update({t: len(vocab) + i for i, t in enumerate(t for t in extra_special if t not in vocab)})
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
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, *extra_special]})
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


# Qwen2-VL's special tokens (the model config's image / video / vision-start / vision-end ids come from these).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
QWEN_IMAGE_PIXELS = 112 * 112  # min = max pixels: 112 x 112 -> 8 x 8 patches of 14 -> 4 x 4 = 16 merged tokens
# Dynamic resolution ('shapes_qwen2_vl_dynamic'): images keep their size between 56 x 56 px (4 tokens) and 224 x 224 px
# (64 tokens), so a batch of images of different sizes holds a different number of vision tokens per row.
QWEN_DYNAMIC_PIXELS = (56 * 56, 224 * 224)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl_processor(pixels: int = QWEN_IMAGE_PIXELS, max_pixels: int | None = None) -> Any:
    """A Qwen2-VL processor over the shapes world's words (image-only: no video processor, which needs torchvision).

    Every image is resized to `pixels` pixels; with `max_pixels` (dynamic resolution) an image keeps its own size
    between `pixels` and `max_pixels` (rounded to 28 px), so its vision-token count follows its size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=max_pixels or pixels)
    return _image_only_qwen2_vl()(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


def build_qwen2_vl_dynamic_processor() -> Any:
    """`build_qwen2_vl_processor` with dynamic resolution (QWEN_DYNAMIC_PIXELS): each image keeps its size, so a
    batch of images of different sizes holds a different number of vision tokens per row."""
    return build_qwen2_vl_processor(*QWEN_DYNAMIC_PIXELS)


def _image_only_qwen2_vl() -> type:
    """Qwen2VLProcessor without its video processor (whose base class needs torchvision), built on first use."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


# LLaVA-NeXT / OneVision over the shapes world: small tiles so the vision-token count stays small on CPU.
NEXT_TILE = 56  # the tower's input side (configs/model/llava-next-tiny.yaml): 4 x 4 patches of 14 per tile
NEXT_GRID = 112  # the one grid resolution: a square image becomes 2 x 2 tiles, no unpadding
VIDEO_TOKEN = "<video>"


def _clip_pixels() -> dict[str, Any]:
    """CLIP's pixel normalisation (as `build_image_processor`), for the anyres image processors."""
    return dict(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True, do_rescale=True,
                do_normalize=True, do_pad=True)


def build_llava_next_processor(tile: int = NEXT_TILE, grid: int = NEXT_GRID) -> LlavaNextProcessor:
    """A LLaVA-NeXT processor over the shapes world's words: base tile + tiles of `tile` px on one `grid` x `grid`
    resolution, CLIP-style tower with CLS (dropped: strategy 'default')."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=[[grid, grid]],
        do_resize=True, do_center_crop=True, **_clip_pixels())
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE)


def build_llava_onevision_processor(tile: int = NEXT_TILE, grid: int = NEXT_GRID) -> Any:
    """A LLaVA-OneVision processor over the shapes world's words (image-only: no video processor, which needs
    torchvision): SigLIP-style tower without CLS (strategy 'full'), tiles as `build_llava_next_processor`."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=[[grid, grid]], do_resize=True, **_clip_pixels())
    return _image_only_llava_onevision()(
        image_processor=image_processor, tokenizer=build_tokenizer((VIDEO_TOKEN,)),
        num_image_tokens=(tile // PATCH_SIZE) ** 2, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)


def _image_only_llava_onevision() -> type:
    """LlavaOnevisionProcessor without its video processor (whose base class needs torchvision), built on first use."""
    from transformers import LlavaOnevisionProcessor, ProcessorMixin

    class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
                     vision_feature_select_strategy: str | None = None, chat_template: Any = None,
                     vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any):
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.vision_aspect_ratio = vision_aspect_ratio
            self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyLlavaOnevisionProcessor
