"""Architecture of the embedded demo model: a small LLaVA-1.5-shaped model sized for a 2-core CPU."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlm.shapes.processor import SPECIAL_TOKENS, vocabulary
from vlm.shapes.world import IMAGE_SIZE, PATCH_SIZE

VISION_WIDTH = 128
VISION_LAYERS = 3
TEXT_WIDTH = 128
TEXT_LAYERS = 8
TEXT_HEADS = 4
VOCAB_SIZE = 64  # >= len(vocabulary()); room for a few more words


def demo_config() -> LlavaConfig:
    """LlavaConfig of the demo model: 2-layer/128 CLIP tower, MLP projector, 8-layer/128 Llama."""
    if len(vocabulary()) > VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocabulary())} words, more than VOCAB_SIZE={VOCAB_SIZE}")
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vision = CLIPVisionConfig(
        hidden_size=VISION_WIDTH, intermediate_size=4 * VISION_WIDTH, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION_WIDTH)
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_HEADS,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    # vision_feature_layer=-1: with a 2-layer tower, LLaVA's usual -2 would leave the last layer unused
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<image>"], projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=False)


def build_demo_model(seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised demo model (fp32, SDPA attention), seeded."""
    torch.manual_seed(seed)
    cfg = demo_config()
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg)
