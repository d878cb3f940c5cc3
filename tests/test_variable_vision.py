"""A different number of vision tokens per row (Qwen2-VL's dynamic resolution, LLaVA-NeXT's anyres grids: the count
follows the image size), end to end: the collector on a padded batch of images of different sizes, records that keep
each sample's V, the shift analysis and `analysis.derive` on them, schedules of fractions with budgets as a share of
each image's tokens, benchmark rows, and the engine on such a batch (each row as it would run alone)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.collect import run_collect
from analysis.collector import AttentionCollector
from analysis.derive import DeriveError, derive_schedule, run_derive
from analysis.records import Records, RecordStore
from analysis.shift import ShiftDetector
from pruning.schedule import BudgetUnreachable, Schedule, ScheduleError, allocate_fractions
from tests.test_arch_qwen2_vl import _preset
from tests.test_shift import planted_t2v
from vlm.layout import TokenLayout
from vlm.models import load_from_config
from vlm.prompts import encode_batch
from vlm.shapes.world import make_scene, render_scene
from vlm.tasks.base import VQASample

# 112 x 112 px -> 4 x 4 merged tokens, 168 x 112 -> 6 x 4, 112 x 56 -> 4 x 2 (patches of 14, merged 2 x 2)
SIZES = [(112, 112), (168, 112), (112, 56)]
COUNTS = (16, 24, 8)
QUESTIONS = ["what color is the circle ?", "is there a big red square left of the small blue triangle in the image ?",
             "how many shapes are there ?"]


def _dynamic_preset(layers: int = 4) -> dict:
    cfg = _preset(num_hidden_layers=layers)
    cfg["processor"] = "shapes_qwen2_vl_dynamic"
    return cfg


@pytest.fixture(scope="module")
def qwen_dynamic():
    """The tiny Qwen2-VL with a processor that keeps each image's size (dynamic resolution)."""
    return load_from_config(_dynamic_preset())


def _samples(seed: int = 0) -> list[VQASample]:
    return [VQASample(sample_id=str(i), image=render_scene(make_scene(seed + i)).resize(size), question=q, prompt=q,
                      answers=["x"]) for i, (size, q) in enumerate(zip(SIZES, QUESTIONS))]


def test_a_batch_of_images_of_different_sizes_has_a_ragged_layout(qwen_dynamic):
    inputs = encode_batch(qwen_dynamic.processor, _samples())
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], qwen_dynamic.image_token_id)
    assert layout.vision_counts == COUNTS and layout.ragged and layout.max_vision == max(COUNTS)
    assert qwen_dynamic.arch.vision_tokens_per_image(qwen_dynamic.processor) is None  # varies with the image


@pytest.mark.parametrize("reducer", ["adaptinfer", "mean", "last"])
def test_collector_on_a_padded_batch_equals_each_sample_alone(qwen_dynamic, reducer):
    samples = _samples(seed=3)
    with AttentionCollector(qwen_dynamic, reducer=reducer) as collector, torch.no_grad():
        qwen_dynamic.model(**encode_batch(qwen_dynamic.processor, samples))
        batch = collector.consume()
        assert batch.vision_counts == COUNTS and batch.t2v.shape == (3, 4, max(COUNTS))
        for row, sample in enumerate(samples):
            qwen_dynamic.model(**encode_batch(qwen_dynamic.processor, [sample]))
            alone = collector.consume()
            v = COUNTS[row]
            assert alone.t2v.shape == (1, 4, v)
            torch.testing.assert_close(batch.t2v[row, :, :v], alone.t2v[0], atol=1e-6, rtol=1e-5)
            assert not batch.t2v[row, :, v:].any()  # zeros after the row's own tokens
            for name, value in alone.scalars.items():
                torch.testing.assert_close(batch.scalars[name][row], value[0], atol=1e-6, rtol=1e-5)


def _planted_ragged(counts: list[int], shifts: list[int]) -> Records:
    """Records whose sample i holds counts[i] tokens, planted to shift after layer shifts[i]."""
    per_sample = [planted_t2v([s], num_vision=v, seed=i)[0] for i, (s, v) in enumerate(zip(shifts, counts))]
    t2v = np.zeros((len(counts), per_sample[0].shape[0], max(counts)), dtype=np.float32)
    for i, t in enumerate(per_sample):
        t2v[i, :, : t.shape[1]] = t
    return Records(ids=[f"s{i}" for i in range(len(counts))], t2v=torch.from_numpy(t2v), scalars={},
                   vision_counts=torch.tensor(counts))


def test_shift_detector_analyses_each_sample_on_its_own_tokens():
    counts, shifts = [64, 40, 100, 64, 30, 80], [8, 20, 8, 20, 8, 20]
    records = _planted_ragged(counts, shifts)
    result = ShiftDetector().fit(records).result_
    assert result.num_vision is None and result.vision_counts.tolist() == counts
    assert result.summary()["vision_counts"] == "30..100"
    for i, v in enumerate(counts):  # the same as fitting the sample alone on its own [L, V_i]
        alone = ShiftDetector().fit(records.sample_t2v(i)[None]).result_
        assert np.array_equal(result.breakpoints[i], alone.breakpoints[0])
        k = alone.tokens_per_sample
        assert np.array_equal(result.token_indices[i, :k], alone.token_indices[0])
        assert (result.token_indices[i, k:] == -1).all()
        assert np.allclose(result.mean_trajectories[i], alone.mean_trajectories[0])
    assert result.histogram.sum() == sum(max(1, round(0.1 * v)) for v in counts)
    assert set(np.argsort(-result.histogram)[:2]) == {8, 20}  # the planted shifts (unplanted tokens fall mid-stack)


def test_derive_on_ragged_records_gives_a_schedule_of_fractions():
    result = ShiftDetector().fit(_planted_ragged([64, 40, 100, 64, 30, 80] * 2, [8, 20] * 6)).result_
    schedule = derive_schedule(result, n_stages=2, budget=0.5)
    assert schedule.layers == [10, 22]  # after the planted regions
    assert schedule.vision_tokens is None and all(s.is_fraction for s in schedule.stages)
    assert abs(schedule.budget_fraction() - 0.5) < 1e-6
    assert schedule.provenance["derivation"]["budget_unit"] == "fraction of each sample's vision tokens"
    back = Schedule.from_yaml(schedule.to_yaml())
    assert back.stages == schedule.stages
    for v in (30, 64, 100):  # each image keeps its own share; the realised share is near the target
        assert abs(schedule.budget_fraction(initial=v) - 0.5) < 0.05
    with pytest.raises(DeriveError, match=r"fraction of each sample's vision tokens .* in \(0, 1\]"):
        derive_schedule(result, n_stages=2, budget=24)


def test_allocate_fractions_and_budget_fraction():
    schedule = allocate_fractions([1, 5], 12, 0.4)
    r = schedule.stages[0].keep
    assert schedule.stages[1].keep == r and 0 < r < 1
    # nominal: layers 0-1 at 1, layers 2-5 at r, layers 6-11 at r^2 (processed convention)
    assert schedule.fraction_per_layer() == pytest.approx([1, 1] + [r] * 4 + [r * r] * 6)
    assert schedule.budget_fraction() == pytest.approx(0.4)
    assert schedule.budget_fraction(initial=16) == pytest.approx(schedule.budget(initial=16) / 16)
    paper = allocate_fractions([1, 5], 12, 0.4, convention="paper")
    assert paper.budget_fraction(convention="paper") == pytest.approx(0.4)
    with pytest.raises(BudgetUnreachable, match="allowed range above 0.166667 up to 1"):
        allocate_fractions([1, 5], 12, 0.1)
    counts = Schedule.from_dict({"stages": [{"layer": 1, "keep": 4}], "num_layers": 12})
    with pytest.raises(ScheduleError, match="a count; the share of each image's vision tokens needs"):
        counts.budget_fraction()
    assert counts.budget_fraction(initial=16) == pytest.approx((2 * 16 + 10 * 4) / 12 / 16)


def test_collect_and_derive_from_a_split_of_images_of_different_sizes(tmp_path):
    """run_collect on shapes images of three sizes writes a store with each sample's own V (the same records as
    each sample collected alone); analysis.derive rule=paper gives a schedule of fractions from it."""
    out = tmp_path / "records"
    sizes = [list(s) for s in SIZES]
    cfg = {"model": _dynamic_preset(layers=8),
           "data": {"name": "shapes_sizes", "task": "shapes", "split": "calibration", "limit": 6, "n_per_family": 2,
                    "image_sizes": sizes},
           "n_samples": 6, "batch_size": 3, "reducer": "adaptinfer", "shard_size": 4, "output": str(out), "seed": 0}
    run_collect(cfg)
    store = RecordStore.open(out)
    assert store.num_vision is None and store.manifest["num_vision"] is None
    records = store.load()
    assert records.counts().tolist() == list(COUNTS) * 2 and records.ragged
    # each sample alone (a batch of one) gives the same record
    one = tmp_path / "one_by_one"
    run_collect({**cfg, "batch_size": 1, "output": str(one)})
    alone = RecordStore.open(one).load()
    assert alone.ids == records.ids and torch.equal(alone.vision_counts, records.vision_counts)
    torch.testing.assert_close(alone.t2v, records.t2v, atol=1e-6, rtol=1e-5)
    derived = tmp_path / "derived"
    run_derive({"input": str(out), "rule": "paper", "budget": 0.4, "n_stages": 2, "min_layer": 0,
                "output": str(derived), "plots": {"enabled": True}})
    schedule = Schedule.from_yaml(derived / "schedule.yaml")
    assert all(s.is_fraction for s in schedule.stages) and len(schedule.stages) == 2
    assert schedule.budget_fraction(num_layers=8) == pytest.approx(0.4)
    assert (derived / "t2v_heatmap.png").is_file() and not (derived / "t2v_grids.png").exists()
    with pytest.raises(DeriveError, match="use rule=paper with budget= a fraction"):
        run_derive({"input": str(out), "rule": "search", "budget": 0.4, "n_stages": 2, "output": str(tmp_path / "s")})


def _bench_cfg(results_dir, methods, budgets, batch_size: int = 1) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.bench_fixtures import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="benchmark", overrides=["data=shapes_test"]), resolve=True)
    cfg["data"].update(limit=6, image_sizes=[list(s) for s in SIZES])
    cfg.update(model=_dynamic_preset(layers=8), methods=methods, budgets=budgets, results_dir=str(results_dir),
               batch_size=batch_size, timing={"batch_size": 1, "warmup": 0, "repeats": 1}, plots=False,
               progress=False)
    return cfg


def test_benchmark_rows_report_budgets_in_tokens_and_as_a_fraction_of_each_image(tmp_path):
    """On a model whose vision-token count follows the image, budgets are fractions: each image keeps its share of
    its own tokens; rows give the processed budget in mean vision tokens and as a fraction of each sample's V."""
    from pruning import results as res
    from pruning.benchmark import BenchmarkError, run_benchmark

    with pytest.raises(BenchmarkError, match=r"budgets \[64\] are out of range: .* fractions of each image's"):
        run_benchmark(_bench_cfg(tmp_path / "bad", ["adaptinfer"], [64]))
    out = run_benchmark(_bench_cfg(tmp_path / "bench", ["adaptinfer"], [0.5], batch_size=3))  # mixed sizes per batch
    table = res.read_table(out).set_index("method")
    assert set(table["status"]) == {res.STATUS_OK} and set(table["budget_unit"]) == {"fraction"}
    counts = list(COUNTS) * 2  # the six samples' vision tokens
    base, pruned = table.loc["unpruned"], table.loc["adaptinfer"]
    assert float(base["budget"]) == 1.0 and float(base["budget_fraction"]) == 1.0
    assert float(base["budget_processed"]) == pytest.approx(np.mean(counts))
    schedule = Schedule.from_dict({"stages": [{"layer": int(l), "keep": float(k)} for l, k in
                                              (p.split(":") for p in pruned["schedule"].split(","))]})
    assert all(s.is_fraction for s in schedule.stages)
    assert float(pruned["budget_fraction"]) == pytest.approx(np.mean([schedule.budget_fraction(8, v) for v in counts]))
    assert float(pruned["budget_processed"]) == pytest.approx(np.mean([schedule.budget(8, v) for v in counts]))
    assert abs(float(pruned["budget_fraction"]) - 0.5) < 0.05
    # each sample's own tokens per layer, averaged: the mean of the schedule's counts for each V
    expected = np.mean([schedule.tokens_per_layer(8, v) for v in counts], axis=0)
    assert [float(x) for x in str(pruned["vision_per_layer"]).split()] == pytest.approx(expected, abs=0.05)
    assert float(pruned["tflops"]) < float(base["tflops"])
    assert str(pruned["note"]) in ("", "nan")  # what the engine processed is what the schedule says, per sample
    # one sample per batch gives the same rows: each row of a mixed batch computes what it would alone
    single = res.read_table(run_benchmark(_bench_cfg(tmp_path / "one", ["adaptinfer"], [0.5]))).set_index("method")
    for column in ("accuracy", "tflops", "budget_processed", "budget_paper", "budget_fraction", "vision_per_layer"):
        assert list(single[column]) == list(table[column]), column
    summary = (out / "summary.md").read_text()
    assert "fraction of each image's vision tokens" in summary and "each image its own count" in summary


# -- the engine on a padded batch of images of different sizes -------------------------------------------------------
FRACTIONS = [(0, 0.5), (2, 0.3)]


def _fraction_schedule(stages=FRACTIONS) -> Schedule:
    return Schedule.from_dict({"stages": [{"layer": l, "keep": k} for l, k in stages]})


@pytest.mark.parametrize("scorer", ["adaptinfer", "fastv", "sparsevlm"])
def test_engine_on_a_padded_batch_of_different_sizes_equals_each_row_alone(qwen_dynamic, scorer):
    from pruning.engine import PruningEngine

    model, samples, schedule = qwen_dynamic.model, _samples(seed=5), _fraction_schedule()
    both = encode_batch(qwen_dynamic.processor, samples)
    pad = (both["attention_mask"] == 0).sum(1)  # left padding per row
    with PruningEngine(model, schedule, scorer) as engine, torch.no_grad():
        logits = model(**both).logits[:, -1]
        record = engine.record
        kept_both = [k.clone() for k in record.kept_positions]
        assert record.row_vision_per_layer == [schedule.tokens_per_layer(4, v) for v in COUNTS]
        assert record.stage_counts == [tuple(schedule.keep_counts(v)[s] for v in COUNTS) for s in range(2)]
        for row, sample in enumerate(samples):
            single = model(**encode_batch(qwen_dynamic.processor, [sample])).logits[:, -1]
            torch.testing.assert_close(single[0], logits[row], atol=1e-5, rtol=1e-5)
            for stage, kept in enumerate(engine.record.kept_positions):
                k = kept.shape[1]
                assert k == schedule.keep_counts(COUNTS[row])[stage]
                assert torch.equal(kept[0] + pad[row], kept_both[stage][row, :k])
                assert (kept_both[stage][row, k:] == -1).all()  # nothing after the row's own picks


def test_engine_keep_all_on_different_sizes_is_unpruned_and_generate_equals_each_row_alone(qwen_dynamic):
    from pruning.engine import PruningEngine

    model, samples = qwen_dynamic.model, _samples(seed=7)
    both = encode_batch(qwen_dynamic.processor, samples)
    gen = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plain = model(**both).logits
        with PruningEngine(model, _fraction_schedule([(0, 1.0), (2, 1.0)])) as engine:
            keep_all = model(**both).logits
        assert engine.record.row_vision_per_layer == [[v] * 4 for v in COUNTS]
        torch.testing.assert_close(keep_all, plain, atol=1e-5, rtol=0)
        with PruningEngine(model, _fraction_schedule(), "adaptinfer"):
            batched = model.generate(**both, **gen)[:, both["input_ids"].shape[1]:]
            for row, sample in enumerate(samples):  # the pruned cache with filler keys masked in every step
                one = encode_batch(qwen_dynamic.processor, [sample])
                alone = model.generate(**one, **gen)[:, one["input_ids"].shape[1]:]
                assert torch.equal(alone[0], batched[row])


def test_engine_on_rows_of_one_length_without_padding(qwen_dynamic):
    """Rows whose text makes up for their image sizes: no padding, so the model passes no mask; the engine builds
    the causal mask with the filler keys hidden."""
    from pruning.engine import PruningEngine

    samples = _samples(seed=9)[:2]  # 16 and 24 vision tokens
    tokenizer = qwen_dynamic.processor.tokenizer
    lengths = [len(encode_batch(qwen_dynamic.processor, [s])["input_ids"][0]) for s in samples]
    words = lengths[1] - lengths[0]  # each word of the shapes vocabulary is one token
    samples[0] = VQASample(sample_id="0", image=samples[0].image, question="q", answers=["x"],
                           prompt=samples[0].prompt + " the" * words)
    both = encode_batch(qwen_dynamic.processor, samples)
    assert bool(both["attention_mask"].all()) and len(tokenizer.tokenize(" the")) == 1
    with PruningEngine(qwen_dynamic.model, _fraction_schedule(), "adaptinfer") as engine, torch.no_grad():
        logits = qwen_dynamic.model(**both).logits[:, -1]
        kept_both = [k.clone() for k in engine.record.kept_positions]
        for row, sample in enumerate(samples):
            single = qwen_dynamic.model(**encode_batch(qwen_dynamic.processor, [sample])).logits[:, -1]
            torch.testing.assert_close(single[0], logits[row], atol=1e-5, rtol=1e-5)
            k = engine.record.kept_positions[0].shape[1]
            assert torch.equal(engine.record.kept_positions[0][0], kept_both[0][row, :k])


@pytest.mark.parametrize("scorer, why", [("divprune", "before the language model"), ("dart", "pool over"),
                                         ("sparsevlm_recycle", "pool over")])
def test_engine_refuses_what_rows_of_different_sizes_cannot_run(qwen_dynamic, scorer, why):
    from pruning.engine import EngineError, PruningEngine

    stages = [(-1, 0.5)] if scorer == "divprune" else [(1, 0.5)]
    both = encode_batch(qwen_dynamic.processor, _samples())
    with pytest.raises(EngineError, match=rf"different numbers of vision tokens \[16, 24, 8\].*{why}"):
        with PruningEngine(qwen_dynamic.model, _fraction_schedule(stages), scorer), torch.no_grad():
            qwen_dynamic.model(**both)


def test_llava_next_rows_of_different_aspect_ratios_equal_each_row_alone():
    """LLaVA-NeXT's anyres count follows the image's aspect ratio (tiles, unpadded grid, newline tokens): the same
    ragged path, in the engine and the collector."""
    from analysis.collector import AttentionCollector
    from pruning.engine import PruningEngine
    from tests.test_arch_llava_next import _preset as next_preset
    from vlm.models import build_random_model, match_processor
    from vlm.shapes.processor import build_llava_next_processor

    processor = build_llava_next_processor()
    processor.image_processor.image_grid_pinpoints = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    loaded = build_random_model(match_processor(next_preset("llava-next-tiny")["arch"], processor), dtype="float32",
                                device="cpu", name="llava-next-tiny", processor=processor)
    samples = [VQASample(sample_id=str(i), image=render_scene(make_scene(20 + i)).resize(size), question=q, prompt=q,
                         answers=["x"]) for i, (size, q) in enumerate(zip([(336, 336), (300, 100), (100, 300)],
                                                                             QUESTIONS))]
    both = encode_batch(processor, samples)
    counts = TokenLayout.from_batch(both["input_ids"], both["attention_mask"], loaded.image_token_id).vision_counts
    assert len(set(counts)) == 3
    pad = (both["attention_mask"] == 0).sum(1)
    with torch.no_grad(), PruningEngine(loaded.model, _fraction_schedule(), "adaptinfer") as engine:
        logits = loaded.model(**both).logits[:, -1]
        kept_both = [k.clone() for k in engine.record.kept_positions]
        for row, sample in enumerate(samples):
            single = loaded.model(**encode_batch(processor, [sample])).logits[:, -1]
            torch.testing.assert_close(single[0], logits[row], atol=1e-5, rtol=1e-5)
            for stage, kept in enumerate(engine.record.kept_positions):
                assert torch.equal(kept[0] + pad[row], kept_both[stage][row, :kept.shape[1]])
    with torch.no_grad(), AttentionCollector(loaded, reducer="adaptinfer") as collector:
        loaded.model(**both)
        records = collector.consume()
        for row, sample in enumerate(samples):
            loaded.model(**encode_batch(processor, [sample]))
            torch.testing.assert_close(collector.consume().t2v[0], records.t2v[row, :, :counts[row]], atol=1e-6,
                                       rtol=1e-5)


@pytest.mark.parametrize("scorer", ["random", "pyramiddrop"])
def test_runner_runs_a_mixed_batch_in_groups_for_a_method_of_one_count(qwen_dynamic, scorer):
    """A method whose engine takes one vision count per batch still runs a batch of images of different sizes: the
    runner splits it into rows that share a count, and every sample gets what it gets alone, in sample order."""
    from pruning.runner import TimingSpec, count_groups, evaluate

    assert count_groups([16, 24, 16, 8, 24]) == [[0, 2], [1, 4], [3]]
    samples = _samples() + _samples(seed=10)  # counts 16, 24, 8, 16, 24, 8
    kw = dict(schedule=_fraction_schedule([(1, 0.5)]), scorer=scorer, progress=False, max_new_tokens=3,
              timing=TimingSpec(batch_size=2, warmup=0, repeats=1))
    mixed = evaluate(qwen_dynamic, samples, batch_size=3, **kw)
    alone = evaluate(qwen_dynamic, samples, batch_size=1, **kw)
    assert mixed.vision_counts == alone.vision_counts == [16, 24, 8] * 2
    assert mixed.predictions == alone.predictions
    assert mixed.vision_per_layer == alone.vision_per_layer and mixed.flops_total == alone.flops_total
    assert mixed.timing_batch == 2  # the first two samples with the first one's count (16): samples 0 and 3
