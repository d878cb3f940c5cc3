"""The shipped demo model: on disk within budget, loads offline through `vlm.models.load_model`, and is accurate."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

DEMO_DIR = Path(__file__).resolve().parents[1] / "vlm" / "assets" / "shapes_llava"
MAX_BYTES = 25 * 1024 * 1024


def test_demo_files_are_shipped_and_small():
    names = {p.name for p in DEMO_DIR.iterdir()} if DEMO_DIR.is_dir() else set()
    assert {"config.json", "model.safetensors"} <= names, f"demo model missing in {DEMO_DIR}: {sorted(names)}"
    assert any("tokenizer" in n for n in names) and any("processor" in n for n in names), sorted(names)
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert size <= MAX_BYTES, f"demo model is {size / 2**20:.1f} MiB, over the 25 MiB budget"


@pytest.fixture(scope="module")
def demo():
    """The demo preset loaded with HF_HUB_OFFLINE=1."""
    import os

    from vlm.models import load_model

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # no network: must load from the repository alone
    try:
        yield load_model("demo", dtype="float32", device="cpu", attn_implementation="sdpa")
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def test_demo_loads_offline_as_a_llava_checkpoint(demo):
    cfg = demo.model.config
    assert type(demo.model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.text_config.num_hidden_layers >= 8
    assert type(demo.processor).__name__ == "LlavaProcessor"
    from vlm.shapes.world import make_scene, render_scene

    scene = make_scene(0)
    text = f"USER: <image>\n{scene.questions[0].text} ASSISTANT:"
    ids = demo.processor(text=text, images=render_scene(scene), return_tensors="pt")["input_ids"]
    assert int((ids == cfg.image_token_id).sum()) == 576


@pytest.mark.slow
def test_demo_reaches_90_percent_on_a_fixed_test_slice(demo):
    from vlm.shapes.evaluate import answers_from_logits, prompt_inputs
    from vlm.tasks import build_task

    task = build_task("shapes", split="test")
    samples = list(task.samples(limit=300))
    preds: list[str] = []
    with torch.no_grad():
        for i in range(0, len(samples), 16):
            inputs = prompt_inputs(demo.processor, samples[i:i + 16])
            preds += answers_from_logits(demo.processor, demo.model(**inputs).logits[:, -1])
    scores = task.score(preds, samples)
    assert scores["score"] >= 0.90, scores
