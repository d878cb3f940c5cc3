"""Model layer: loading path on a local save_pretrained directory, presets, the 7B-shape preset on meta."""
from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tests.conftest import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_arch
from vlm.models import (
    ModelConfigError,
    UnsupportedModelError,
    build_random_model,
    check_architecture,
    load_from_config,
    load_model,
)


def _tiny_processor(vocab_size: int = 64) -> LlavaProcessor:
    specials = {"<pad>": PAD_TOKEN_ID, "<image>": IMAGE_TOKEN_ID, "<unk>": 1}
    words = {f"w{i}": i for i in range(vocab_size) if i not in specials.values()}  # one token per id
    words.update(specials)
    tok = Tokenizer(models.WordLevel({k: v for k, v in words.items()}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def test_local_directory_loads_through_the_hub_path_with_identical_logits(tmp_path):
    original = build_random_model(tiny_arch(), dtype="float32", device="cpu", seed=4)
    processor = _tiny_processor()
    original.model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.processor is not None
    from PIL import Image
    image = Image.new("RGB", (80, 60), (120, 30, 200))
    inputs = loaded.processor(images=image, text="w11 <image> w12 w13", return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 16  # placeholder expanded to (56/14)^2
    with torch.no_grad():
        a = original.model(**inputs).logits
        b = loaded.model(**inputs).logits
    assert torch.equal(a, b)
    assert loaded.model.config._attn_implementation == "sdpa"


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        check_architecture(cfg)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="supported architectures"):
        load_model(str(tmp_path), device="cpu")


def test_bad_dtype_and_device_are_clear_errors():
    with pytest.raises(ModelConfigError, match="dtype='float8'"):
        build_random_model(tiny_arch(), dtype="float8", device="cpu")
    with pytest.raises(ModelConfigError, match="needs either `source`"):
        load_from_config({"name": "x"})


def test_llava_7b_arch_preset_shapes_on_meta():
    cfg = OmegaConf.to_container(OmegaConf.load("configs/model/llava-1.5-7b-arch.yaml"), resolve=True)
    loaded = build_random_model(cfg["arch"], dtype="float16", device="meta", name=cfg["name"])
    model = loaded.model
    assert next(model.parameters()).device.type == "meta"
    n_params = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < n_params < 7.1e9, n_params  # LLaVA-1.5-7B: about 7.06 B
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.intermediate_size, tc.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    assert loaded.num_layers == 32 and loaded.vision_tokens_per_image == 576
    assert loaded.dtype == torch.float16
    layer = model.model.language_model.layers[0]
    assert tuple(layer.mlp.gate_proj.weight.shape) == (11008, 4096)
    assert tuple(model.model.multi_modal_projector.linear_1.weight.shape) == (4096, 1024)
    assert model.model.vision_tower.config.num_hidden_layers == 24
