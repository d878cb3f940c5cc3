"""LLaVA-NeXT and LLaVA-OneVision on the seam (vlm/arch/llava_next.py): tiny random-weight models saved with
save_pretrained and loaded back through vlm.models with the shapes world's processors (built in code), pruned by
the engine. Every `<image>` expands to base-tile patches + tile patches + image-newline tokens, all vision tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pruning.engine import PruningEngine
from pruning.schedule import MethodInfeasible, Schedule
from tests.family_checks import (assert_collector_records_are_the_adaptinfer_scores, assert_compiled_equals_eager,
                                 assert_generate_uses_the_pruned_cache, assert_padded_batch_equals_rows_alone,
                                 run_module)
from tests.test_engine import _eager_layer_attention, paper_formula_kept
from vlm.arch import for_config
from vlm.arch.llava_next import LlavaNextArch, LlavaOnevisionArch
from vlm.layout import TokenLayout
from vlm.models import build_random_model, load_from_config, match_processor
from vlm.prompts import encode_batch
from vlm.shapes.processor import build_llava_next_processor, build_llava_onevision_processor
from vlm.shapes.world import make_scene, render_scene
from vlm.tasks.base import VQASample

REPO = Path(__file__).resolve().parents[1]
N_VISION = 88  # 16 base patches + 8 x 8 tile patches + 8 newline tokens (56 px tiles, one 112 px grid)
SIDE = 8  # tile-grid patches per row (and rows) of a square shapes image
BASE = 16
FAMILIES = {"llava-next-tiny": "LlavaNextForConditionalGeneration",
            "llava-onevision-tiny": "LlavaOnevisionForConditionalGeneration"}


def _preset(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"), resolve=True)
    cfg["device"] = "cpu"
    cfg["arch"]["text_config"]["initializer_range"] = 0.2  # peaked attention: no near-ties in top-k
    return cfg


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """Each tiny preset, saved and loaded back through the real loading path (source = a local directory)."""
    name = request.param
    cfg = _preset(name)
    built = load_from_config(cfg)
    directory = tmp_path_factory.mktemp(name)
    built.model.save_pretrained(directory)
    loaded = load_from_config({"name": name, "source": str(directory), "processor": cfg["processor"],
                               "dtype": "float32", "device": "cpu"})
    assert type(loaded.model).__name__ == FAMILIES[name]
    return loaded


@pytest.fixture(scope="module")
def next_tiny(tmp_path_factory):
    """LLaVA-NeXT as a hub checkpoint is loaded: model and processor files from one directory (AutoProcessor)."""
    built = load_from_config(_preset("llava-next-tiny"))
    directory = tmp_path_factory.mktemp("llava_next_tiny")
    built.model.save_pretrained(directory)
    built.processor.save_pretrained(directory)
    loaded = load_from_config({"name": "llava-next-tiny", "source": str(directory), "dtype": "float32", "device": "cpu"})
    assert type(loaded.processor).__name__ == "LlavaNextProcessor" and loaded.vision_tokens_per_image == N_VISION
    return loaded


def _inputs(loaded, questions, seed=0):
    samples = [VQASample(sample_id=str(i), image=render_scene(make_scene(seed + i)), question=q, prompt=q,
                         answers=["x"]) for i, q in enumerate(questions)]
    return encode_batch(loaded.processor, samples)


def _schedule(stages, positions="keep"):
    return Schedule.from_dict({"stages": [{"layer": l, "keep": k} for l, k in stages], "positions": positions})


QUESTIONS = ["what color is the circle ?", "is there a big red square left of the small blue triangle in the image ?"]


def test_seam_facts_and_newline_tokens_are_vision_tokens(family):
    arch = family.arch
    assert family.vision_tokens_per_image == N_VISION and len(arch.decoder_layers) == family.num_layers == 4
    assert arch.renumber_positions is True
    inputs = _inputs(family, QUESTIONS[:1])
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], family.image_token_id)
    assert layout.num_vision == N_VISION and len(layout.vision_spans[0]) == 1
    assert arch.check_vision_inputs(inputs, 1, N_VISION) is None
    assert "image_sizes describes 1 images of 88" in arch.check_vision_inputs(inputs, 1, N_VISION - 1)
    # what the language model receives at the vision slots: after the 16 base patches, every 9th token of the
    # 8 x (8 + 1) tile grid is the learned image-newline embedding
    seen = {}

    def take_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = arch.language_model.register_forward_pre_hook(take_embeds, with_kwargs=True)
    try:
        with torch.no_grad():
            family.model(**inputs)
    finally:
        hook.remove()
    vision = seen["embeds"][0, layout.vision_index[0]]  # [V, D]
    newline = family.model.model.image_newline
    is_newline = torch.isclose(vision, newline.expand_as(vision)).all(-1)
    expected = torch.tensor([i >= BASE and (i - BASE) % (SIDE + 1) == SIDE for i in range(N_VISION)])
    assert torch.equal(is_newline, expected)


@pytest.mark.parametrize("arch_cls, build, aspect", [
    (LlavaNextArch, build_llava_next_processor, "anyres_max_9"),
    (LlavaOnevisionArch, build_llava_onevision_processor, "anyres_max_1"),  # small cap: the grid gets shrunk
])
def test_image_tokens_match_the_processor_and_the_model_for_any_image_size(arch_cls, build, aspect):
    """The family's count (base + unpadded tile grid + newline rows, shrunk under anyres_max_N) equals what the stock
    processor expands and what the stock model accepts, on LLaVA-NeXT's grid set scaled to 56 px tiles."""
    from PIL import Image

    processor = build()
    processor.image_processor.image_grid_pinpoints = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    if arch_cls is LlavaOnevisionArch:
        processor.vision_aspect_ratio = aspect
    assert arch_cls.tokens_per_image(None, processor) is None  # several resolutions: varies with the image
    name = "llava-next-tiny" if arch_cls is LlavaNextArch else "llava-onevision-tiny"
    cfg = _preset(name)
    arch = match_processor(cfg["arch"], processor)
    if arch_cls is LlavaOnevisionArch:
        arch["vision_aspect_ratio"] = aspect
    loaded = build_random_model(arch, dtype="float32", device="cpu", name=name, processor=processor)
    assert for_config(loaded.config) is arch_cls
    counts = set()
    for height, width in [(336, 336), (100, 300), (300, 100), (240, 320), (90, 60), (500, 170)]:
        text = "USER: <image>\nwhat color is the circle ? ASSISTANT:"
        inputs = dict(processor(images=[Image.new("RGB", (width, height), (90, 30, 200))], text=[text],
                                return_tensors="pt"))
        n = int((inputs["input_ids"] == loaded.image_token_id).sum())
        assert arch_cls.image_tokens(loaded.config, (height, width)) == n, (height, width)
        assert loaded.arch.check_vision_inputs(inputs, 1, n) is None
        with torch.no_grad():
            loaded.model(**inputs)  # the stock model scatters exactly that many features
        counts.add(n)
    assert len(counts) >= 4


def test_keep_all_schedule_gives_the_unpruned_logits(family):
    inputs = _inputs(family, QUESTIONS)
    with torch.no_grad():
        plain = family.model(**inputs).logits
        with PruningEngine(family.model, _schedule([(0, N_VISION), (2, 1.0)])) as engine:
            pruned = family.model(**inputs).logits
    torch.testing.assert_close(pruned, plain, atol=1e-5, rtol=0)
    assert engine.record.vision_per_layer == [N_VISION] * 4


def test_adaptinfer_keeps_the_top_k_of_the_paper_formula(family):
    inputs = _inputs(family, QUESTIONS, seed=3)
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], family.image_token_id)
    A = _eager_layer_attention(family.model, inputs, 1).double()
    with PruningEngine(family.model, _schedule([(1, 20)]), "adaptinfer") as engine, torch.no_grad():
        family.model(**inputs)
    assert torch.equal(engine.record.kept_positions[0], paper_formula_kept(A, layout, 20))


@pytest.mark.parametrize("scorer", ["adaptinfer", "fastv"])
def test_padded_batch_equals_each_row_alone(family, scorer):
    both = _inputs(family, QUESTIONS, seed=5)
    assert int(both["attention_mask"].eq(0).sum()) > 0  # the shorter question is padded
    alone = [_inputs(family, [q], seed=5 + row) for row, q in enumerate(QUESTIONS)]
    assert_padded_batch_equals_rows_alone(family.model, both, alone, _schedule([(0, 40), (2, 9)]), scorer)


def test_generate_keep_all_equals_unpruned_and_pruned_uses_the_pruned_cache(next_tiny):
    inputs = _inputs(next_tiny, QUESTIONS, seed=7)
    assert_generate_uses_the_pruned_cache(next_tiny, inputs, _schedule([(0, N_VISION), (2, 1.0)]),
                                          _schedule([(0, 40), (2, 9)]), [N_VISION, 40, 40, 9])
    with torch.no_grad():  # the pruning changed the answer tokens: the comparison has teeth
        plain = next_tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with PruningEngine(next_tiny.model, _schedule([(0, 40), (2, 9)]), "test_first_vision"):
            assert not torch.equal(next_tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False), plain)


def test_two_images_in_one_row(family):
    images = [render_scene(make_scene(11)), render_scene(make_scene(12))]
    text = "USER: <image>\n<image>\nwhat color is the circle ? ASSISTANT:"
    inputs = dict(family.processor(images=[images], text=[text], return_tensors="pt"))
    # LLaVA-NeXT tiles each image; LLaVA-OneVision gives each image of a multi-image prompt its base tile + a newline
    per_image = BASE + 1 if isinstance(family.arch, LlavaOnevisionArch) else N_VISION
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], family.image_token_id)
    assert layout.num_vision == 2 * per_image and len(layout.vision_spans[0]) == 2
    assert family.arch.check_vision_inputs(inputs, 1, 2 * per_image) is None
    with torch.no_grad():
        plain = family.model(**inputs).logits
        with PruningEngine(family.model, _schedule([(1, 2 * per_image)])):
            same = family.model(**inputs).logits
        with PruningEngine(family.model, _schedule([(1, 5)]), "adaptinfer") as engine:
            family.model(**inputs)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    kept = engine.record.kept_positions[0][0]
    assert kept.shape == (5,) and set(kept.tolist()) <= set(layout.vision_index[0].tolist())


@pytest.mark.parametrize("selector", ["visionzip", "vispruner", "pooling"])
def test_selectors_reading_the_towers_patches_are_infeasible(family, selector):
    inputs = _inputs(family, QUESTIONS[:1])
    with pytest.raises(MethodInfeasible, match="anyres tile") as err:
        with PruningEngine(family.model, _schedule([(-1, 36)]), selector), torch.no_grad():
            family.model(**inputs)
    assert "divprune, cdpruner" in str(err.value)


@pytest.mark.parametrize("selector", ["divprune", "cdpruner"])
def test_selectors_on_the_lms_own_vision_embeddings_work(family, selector):
    inputs = _inputs(family, QUESTIONS)
    with torch.no_grad():
        with PruningEngine(family.model, _schedule([(-1, N_VISION)]), selector):
            same = family.model(**inputs).logits
        plain = family.model(**inputs).logits
        with PruningEngine(family.model, _schedule([(-1, 12)]), selector) as engine:
            family.model(**inputs)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert engine.record.vision_per_layer == [12] * 4
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], family.image_token_id)
    for row in range(2):
        assert set(engine.record.kept_positions[0][row].tolist()) <= set(layout.vision_index[row].tolist())


def test_collector_records_are_the_adaptinfer_scores(family):
    assert_collector_records_are_the_adaptinfer_scores(family, _inputs(family, QUESTIONS, seed=9), N_VISION, 20)


@pytest.mark.parametrize("name, params, layers", [("llava-v1.6-mistral-7b-arch", (7.5e9, 7.6e9), 32),
                                                   ("llava-onevision-7b-arch", (8.0e9, 8.1e9), 28)])
def test_arch_presets_have_the_real_shapes_on_meta(name, params, layers):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"), resolve=True)
    loaded = build_random_model(cfg["arch"], dtype="float16", device="meta", name=name)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert params[0] < n_params < params[1], n_params  # 7.57 B (v1.6 Mistral-7B), 8.03 B (OneVision Qwen2-7B)
    assert loaded.num_layers == layers and loaded.arch.vision_tokens_per_image() is None
    sizes = {"llava-v1.6-mistral-7b-arch": ((672, 672), 2928), "llava-onevision-7b-arch": ((768, 768), 3699)}[name]
    assert type(loaded.arch).image_tokens(loaded.config, sizes[0]) == sizes[1]  # the counts the preset comments give


def test_collect_derive_and_benchmark_from_the_command_line(tmp_path):
    """`python -m analysis.collect model=llava-next-tiny`, `analysis.derive rule=paper` on its records, and benchmark
    rows of fastv (ok) and visionzip (infeasible, with the reason) on the shapes task, each in a subprocess."""
    records = tmp_path / "records"
    run_module("analysis.collect", ["model=llava-next-tiny", "data=shapes_calibration", "model.device=cpu",
                                     "model.arch.text_config.num_hidden_layers=12", "n_samples=6", "batch_size=2",
                                     f"hydra.run.dir={records}"])
    run_module("analysis.derive", [f"input={records}", "rule=paper", "budget=30", "n_stages=2", "min_layer=0",
                                    f"output={tmp_path / 'derived'}"])
    schedule = Schedule.from_yaml(str(tmp_path / "derived" / "schedule.yaml"))
    assert len(schedule.stages) == 2
    results = tmp_path / "bench"
    run_module("pruning.benchmark", ["model=llava-next-tiny", "methods=[fastv,visionzip]", "budgets=[32]",
                                      "data=shapes_test", "data.limit=2", "model.device=cpu",
                                      f"results_dir={results}"])
    import pandas as pd

    table = pd.read_csv(results / "results.csv")
    fastv = table[table["method"] == "fastv"].iloc[0]
    assert fastv["status"] == "ok" and fastv["model"] == "llava-next-tiny"
    visionzip = table[table["method"] == "visionzip"].iloc[0]
    assert visionzip["status"] == "infeasible" and "anyres tile" in visionzip["note"]


def test_every_family_module_is_found_without_a_registry_edit():
    """Adding a family is a module in vlm/arch (and a model preset): the package finds every ModelArch subclass of its
    modules by itself, each model_type once."""
    import vlm.arch as arch
    from vlm.arch.base import ModelArch

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    declared = {c for c in subclasses(ModelArch) if c.model_types and c.__module__.startswith("vlm.arch.")}
    assert set(arch.FAMILIES) == declared
    assert {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"} <= set(arch.ARCHS)
    assert len(arch.SUPPORTED_MODEL_TYPES) == sum(len(f.model_types) for f in arch.FAMILIES)


def test_compiled_pruned_prefill_on_llava_next_equals_eager(next_tiny):
    """The compiled prefill with anyres tiles and newline tokens: the same logits and kept tokens as eager."""
    assert_compiled_equals_eager(next_tiny.model, _inputs(next_tiny, QUESTIONS), _schedule([(0, 40), (2, 9)]))
