"""Shared fixtures: tiny random-weight LLaVA models (no downloads) and hand-built prompts."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

IMAGE_TOKEN_ID = 7
PAD_TOKEN_ID = 0


def tiny_arch(image_size: int = 56, layers: int = 4, kv_heads: int = 4, vocab: int = 64, init_range: float = 0.02) -> dict:
    """LLaVA-1.5 structure at toy size: (image_size/14)^2 vision tokens."""
    return {
        "image_token_id": IMAGE_TOKEN_ID,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "pad_token_id": PAD_TOKEN_ID, "max_position_embeddings": 512, "initializer_range": init_range,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": image_size, "patch_size": 14, "projection_dim": 32,
        },
    }


def make_prompts(n_vision: int, text_lengths: list[int], system_len: int = 3, seed: int = 0,
                 padding_side: str = "left", vocab: int = 64) -> dict[str, torch.Tensor]:
    """A padded batch [system][image tokens][text] with random token ids (never the image or pad id)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in text_lengths:
        ids = torch.randint(10, vocab, (system_len + n_vision + t,), generator=g)
        ids[system_len:system_len + n_vision] = IMAGE_TOKEN_ID
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if padding_side == "left":
            input_ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        else:
            input_ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_model():
    from vlm.models import build_random_model

    return build_random_model(tiny_arch(), dtype="float32", device="cpu", seed=0, name="tiny-test")


def pixel_values(batch: int, image_size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def eager_cls_attention(model, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """Head-mean attention [B, P] of the vision tower's CLS query to each patch at `layer`, from eager attention
    (an independent reference for what the AttentionProbe computes with SDPA on)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixel_values, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions[layer][:, :, 0, 1:].mean(1)


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (the hand-run scripts there are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
