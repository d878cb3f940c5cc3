"""Qwen2-VL on the seam (vlm/arch): a tiny random-weight Qwen2-VL saved with save_pretrained and loaded back through
vlm.models with the shapes world's Qwen processor (built in code), pruned by the engine (M-RoPE positions kept)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pruning.engine import EngineError, PruningEngine
from pruning.schedule import MethodInfeasible, Schedule
from tests.family_checks import (assert_collector_records_are_the_adaptinfer_scores, assert_compiled_equals_eager,
                                 assert_generate_uses_the_pruned_cache, assert_padded_batch_equals_rows_alone,
                                 run_module)
from tests.test_engine import _eager_layer_attention, paper_formula_kept
from vlm.arch import UnsupportedModelError, for_model
from vlm.layout import TokenLayout
from vlm.models import load_from_config
from vlm.prompts import encode_batch
from vlm.shapes.world import make_scene, render_scene
from vlm.tasks.base import VQASample

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "model" / "qwen2-vl-tiny.yaml"
N_VISION = 16  # 112 px images: 8 x 8 patches of 14, merged 2 x 2


def _preset(**text: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(PRESET), resolve=True)
    cfg["device"] = "cpu"
    cfg["arch"]["text_config"].update({"initializer_range": 0.2, **text})  # peaked attention: no near-ties in top-k
    return cfg


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The tiny preset, saved and loaded back through the real loading path (source = a local directory)."""
    built = load_from_config(_preset())
    directory = tmp_path_factory.mktemp("qwen2_vl_tiny")
    built.model.save_pretrained(directory)
    loaded = load_from_config({"name": "qwen2-vl-tiny", "source": str(directory), "processor": "shapes_qwen2_vl",
                               "dtype": "float32", "device": "cpu"})
    assert type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration"
    return loaded


def _samples(questions, seed=0):
    out = []
    for i, q in enumerate(questions):
        image = render_scene(make_scene(seed + i))
        out.append(VQASample(sample_id=str(i), image=image, question=q, prompt=q, answers=["x"]))
    return out


def _inputs(loaded, questions, seed=0):
    return encode_batch(loaded.processor, _samples(questions, seed))


def _schedule(stages, positions="keep"):
    return Schedule.from_dict({"stages": [{"layer": l, "keep": k} for l, k in stages], "positions": positions})


QUESTIONS = ["what color is the circle ?", "is there a big red square left of the small blue triangle in the image ?"]


def test_seam_facts(qwen):
    arch = qwen.arch
    assert arch.renumber_positions is False and qwen.vision_tokens_per_image == N_VISION
    assert len(arch.decoder_layers) == qwen.num_layers == 4
    sites = arch.vision_sites()
    assert sites.has_cls is False and sites.projector is qwen.model.model.visual.merger
    inputs = _inputs(qwen, QUESTIONS[:1])
    assert int((inputs["input_ids"] == qwen.image_token_id).sum()) == N_VISION
    with pytest.raises(UnsupportedModelError, match="qwen2_vl"):
        for_model(torch.nn.Linear(2, 2))


def test_keep_all_schedule_gives_the_unpruned_logits(qwen):
    inputs = _inputs(qwen, QUESTIONS)
    with torch.no_grad():
        plain = qwen.model(**inputs).logits
        with PruningEngine(qwen.model, _schedule([(0, N_VISION), (2, 1.0)])) as engine:
            pruned = qwen.model(**inputs).logits
    torch.testing.assert_close(pruned, plain, atol=1e-5, rtol=0)
    assert engine.record.vision_per_layer == [N_VISION] * 4


def test_renumber_is_refused_on_mrope(qwen):
    with pytest.raises(EngineError, match="positions: keep"):
        PruningEngine(qwen.model, _schedule([(1, 4)], positions="renumber"))


def test_adaptinfer_keeps_the_top_k_of_the_paper_formula(qwen):
    inputs = _inputs(qwen, QUESTIONS, seed=3)
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], qwen.image_token_id)
    A = _eager_layer_attention(qwen.model, inputs, 1).double()
    with PruningEngine(qwen.model, _schedule([(1, 6)]), "adaptinfer") as engine, torch.no_grad():
        qwen.model(**inputs)
    assert torch.equal(engine.record.kept_positions[0], paper_formula_kept(A, layout, 6))


@pytest.mark.parametrize("scorer", ["adaptinfer", "fastv"])
def test_padded_batch_equals_each_row_alone(qwen, scorer):
    alone = [_inputs(qwen, [q], seed=5 + row) for row, q in enumerate(QUESTIONS)]
    assert_padded_batch_equals_rows_alone(qwen.model, _inputs(qwen, QUESTIONS, seed=5), alone,
                                          _schedule([(0, 8), (2, 3)]), scorer)


def test_generate_keep_all_equals_unpruned_and_pruned_uses_the_pruned_cache(qwen):
    assert_generate_uses_the_pruned_cache(qwen, _inputs(qwen, QUESTIONS, seed=7), _schedule([(0, N_VISION), (2, 1.0)]),
                                          _schedule([(0, 8), (2, 3)]), [16, 8, 8, 3])


def test_two_images_in_one_row(qwen):
    images = [render_scene(make_scene(11)), render_scene(make_scene(12))]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "what color is the circle ?"}]}]
    text = qwen.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = dict(qwen.processor(images=images, text=[text], return_tensors="pt"))
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], qwen.image_token_id)
    assert layout.num_vision == 2 * N_VISION and len(layout.vision_spans[0]) == 2
    with torch.no_grad():
        plain = qwen.model(**inputs).logits
        with PruningEngine(qwen.model, _schedule([(1, 2 * N_VISION)])):
            same = qwen.model(**inputs).logits
        with PruningEngine(qwen.model, _schedule([(1, 5)]), "adaptinfer") as engine:
            qwen.model(**inputs)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    kept = engine.record.kept_positions[0][0]
    assert kept.shape == (5,) and set(kept.tolist()) <= set(layout.vision_index[0].tolist())


def test_selectors_on_qwen_work_on_merged_tokens_or_are_infeasible(qwen):
    inputs = _inputs(qwen, QUESTIONS[:1])
    with pytest.raises(MethodInfeasible, match="no CLS"):
        with PruningEngine(qwen.model, _schedule([(-1, 4)]), "visionzip"), torch.no_grad():
            qwen.model(**inputs)
    with PruningEngine(qwen.model, _schedule([(-1, 4)]), "divprune") as engine, torch.no_grad():
        qwen.model(**inputs)
    assert engine.record.vision_per_layer == [4] * 4


def _sized_inputs(loaded, sizes, seed=20):
    """One row per (width, height): the scene rendered at that size (Qwen keeps the aspect ratio: a non-square grid)."""
    samples = [VQASample(sample_id=str(i), image=render_scene(make_scene(seed + i)).resize(size), question=q,
                         prompt=q, answers=["x"]) for i, (size, q) in enumerate(zip(sizes, QUESTIONS))]
    return encode_batch(loaded.processor, samples)


def test_image_grids_come_from_image_grid_thw(qwen):
    inputs = _sized_inputs(qwen, [(224, 112), (112, 224)])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 10], [1, 10, 4]]
    assert qwen.arch.image_grids(inputs) == [(2, 5), (5, 2)]  # merged 2 x 2: h / 2 rows, w / 2 columns
    assert qwen.arch.image_grids({"input_ids": inputs["input_ids"]}) is None
    assert qwen.arch.image_grid(qwen.processor) == (4, 4)  # the preset's square 112 px images


def _layer0_input(loaded, inputs, engine=None):
    """The hidden states decoder layer 0 processes: saved by a pre-hook on its input_layernorm, inside the layer's
    forward (after the engine's step, which runs as the layer's forward)."""
    seen = {}

    def save(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    handle = loaded.arch.decoder_layers[0].input_layernorm.register_forward_pre_hook(save, with_kwargs=True)
    try:
        with torch.no_grad(), engine if engine is not None else contextlib.nullcontext():
            loaded.model(**inputs)
    finally:
        handle.remove()
    return seen["h"]


def test_pooling_on_a_non_square_image_pools_its_own_grid(qwen):
    """A 224 x 112 px image gives 2 x 5 merged tokens (10: no square): pooling to 4 tokens averages the 2 x 5 grid
    to 2 x 2 (adaptive windows: columns 0-2 and 2-4), each pooled token in its window's top-left slot."""
    inputs = _sized_inputs(qwen, [(224, 112)])
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], qwen.image_token_id)
    assert layout.num_vision == 10
    full = _layer0_input(qwen, inputs)
    engine = PruningEngine(qwen.model, _schedule([(-1, 4)]), "pooling")
    pruned = _layer0_input(qwen, inputs, engine)
    p = full[0, layout.vision_index[0]]  # [10, D] in raster order over the 2 x 5 grid
    want = torch.nn.functional.adaptive_avg_pool2d(p.T.reshape(1, -1, 2, 5), (2, 2)).reshape(-1, 4).T  # [4, D]
    kept = engine.record.kept_positions[0][0]
    start = int(layout.vision_index[0, 0])
    assert (kept - start).tolist() == [0, 2, 5, 7]  # rows 0 / 1, columns 0 / 2 of the 2 x 5 grid
    assert engine.record.vision_per_layer == [4] * 4
    vision_now = pruned[0, start:start + 4]  # the kept slots are contiguous after the drop
    torch.testing.assert_close(vision_now, want, atol=1e-5, rtol=1e-5)
    with PruningEngine(qwen.model, _schedule([(-1, 4)]), "pooling") as engine, torch.no_grad():  # generate runs
        qwen.model.generate(**inputs, max_new_tokens=2, do_sample=False)  # the tower before the LM's forward
    assert (engine.record.kept_positions[0][0] - start).tolist() == [0, 2, 5, 7]
    # a keep count the 2 x 5 grid cannot factor (7) is infeasible, naming the grid; a square assumption would have
    # refused every count on 10 tokens
    with pytest.raises(MethodInfeasible, match="2x5 grid"):
        with PruningEngine(qwen.model, _schedule([(-1, 7)]), "pooling"), torch.no_grad():
            qwen.model(**inputs)


def test_pooling_refuses_rows_whose_images_have_different_grids(qwen):
    inputs = _sized_inputs(qwen, [(224, 112), (112, 224)])  # 10 tokens each, 2 x 5 and 5 x 2
    with pytest.raises(MethodInfeasible, match="no common image grid"):
        with PruningEngine(qwen.model, _schedule([(-1, 4)]), "pooling"), torch.no_grad():
            qwen.model(**inputs)
    with PruningEngine(qwen.model, _schedule([(-1, 4)]), "pooling") as engine, torch.no_grad():
        qwen.model(**_sized_inputs(qwen, [(112, 224)]))  # each alone pools its own grid
    assert (engine.record.kept_positions[0][0] - engine.record.kept_positions[0][0][0]).tolist() == [0, 1, 4, 5]  # rows 0 / 2, columns 0 / 1 of 5 x 2


def test_collector_records_are_the_adaptinfer_scores(qwen):
    assert_collector_records_are_the_adaptinfer_scores(qwen, _inputs(qwen, QUESTIONS, seed=9), N_VISION, 6)


def test_collect_derive_and_benchmark_from_the_command_line(tmp_path):
    """`python -m analysis.collect model=qwen2-vl-tiny`, `analysis.derive rule=paper` on its records, and a
    benchmark row of fastv on the shapes task, each in a subprocess."""
    records = tmp_path / "records"
    run_module("analysis.collect", ["model=qwen2-vl-tiny", "data=shapes_calibration", "model.device=cpu",
                                     "model.arch.text_config.num_hidden_layers=12", "n_samples=6", "batch_size=2",
                                     f"hydra.run.dir={records}"])
    run_module("analysis.derive", [f"input={records}", "rule=paper", "budget=6", "n_stages=2", "min_layer=0",
                                    f"output={tmp_path / 'derived'}"])
    schedule = Schedule.from_yaml(str(tmp_path / "derived" / "schedule.yaml"))
    assert len(schedule.stages) == 2 and schedule.positions == "keep"
    results = tmp_path / "bench"
    run_module("pruning.benchmark", ["model=qwen2-vl-tiny", "method=fastv", "budgets=[8]", "data=shapes_test",
                                      "data.limit=2", "model.device=cpu", f"results_dir={results}"])
    import pandas as pd

    table = pd.read_csv(results / "results.csv")
    row = table[table["method"] == "fastv"].iloc[0]
    assert row["status"] == "ok" and row["model"] == "qwen2-vl-tiny"


def test_qwen2_5_vl_keep_all_and_pruned_prefill():
    """Qwen2.5-VL (model_type qwen2_5_vl) through the same seam: keep-all equals unpruned; a stage drops tokens."""
    cfg = _preset()
    cfg["arch"]["model_type"] = "qwen2_5_vl"
    vision = cfg["arch"]["vision_config"]
    vision.update({"hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64, "window_size": 56,
                   "fullatt_block_indexes": [1]})
    for key in ("embed_dim", "mlp_ratio"):
        vision.pop(key)
    loaded = load_from_config(cfg)
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    inputs = _inputs(loaded, QUESTIONS, seed=13)
    with torch.no_grad():
        plain = loaded.model(**inputs).logits
        with PruningEngine(loaded.model, _schedule([(0, N_VISION)])):
            same = loaded.model(**inputs).logits
        with PruningEngine(loaded.model, _schedule([(0, 0.5), (2, 0.25)]), "adaptinfer") as engine:
            loaded.model(**inputs)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert engine.record.vision_per_layer == [16, 8, 8, 2]


def test_compiled_pruned_prefill_on_qwen_equals_eager(qwen):
    """The compiled prefill (pruning inside one graph) on the M-RoPE family: the same logits and kept tokens."""
    assert_compiled_equals_eager(qwen.model, _inputs(qwen, QUESTIONS), _schedule([(0, 8), (2, 3)]))
