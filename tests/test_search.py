"""Schedule search: budget arithmetic, a synthetic problem with a known answer, resumption, the paper rule kept,
the fidelity objective on a real (tiny) model, and the pass budget on a 32-layer model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from analysis.derive import DeriveError, derive_schedule, read_front, run_derive, search_schedules
from analysis.search import (
    Candidate, CandidateStore, ScheduleSearch, budget_of, candidate_layers_from_regions, keeps_from_shares,
    shares_from_keeps,
)
from analysis.shift import ShiftDetector
from pruning.schedule import Schedule
from tests.test_derive import compose_derive
from tests.test_shift import HALF_8_HALF_20, planted_t2v

L, V = 8, 576


def early_vision_objective(cand: Candidate) -> dict[str, float]:
    """Synthetic: only layers 1..3 read the image (squared shortfall there); blend 0.5 is the best scorer option.

    The optimum at a budget that cannot keep every token through layer 3 spends all of it on layers 1..3, evenly,
    and nothing after layer 3: stages (0, k) and (3, 0) with k = (L * budget - V) / 3.
    """
    per_layer = cand.schedule(L, V).tokens_per_layer(convention="processed")
    loss = sum((1 - t / V) ** 2 for t in per_layer[1:4])
    return {"objective": loss + (0.0 if cand.blend == 0.5 else 0.05)}


@pytest.mark.parametrize("convention", ["processed", "paper"])
def test_keeps_from_shares_meet_the_budget(convention: str) -> None:
    rng = np.random.default_rng(0)
    met = 0
    for _ in range(400):
        n = int(rng.integers(1, 4))
        layers = sorted(rng.choice(np.arange(0, L - 1), size=n, replace=False).tolist())
        budget = float(rng.uniform(40, 300))
        keeps = keeps_from_shares(layers, rng.dirichlet(np.ones(n)), L, V, budget, convention)
        if keeps is None:
            continue
        met += 1
        cand = Candidate(tuple(layers), keeps)
        assert abs(budget_of(cand, L, V, convention) - budget) <= 1.0, (layers, keeps, budget)
        assert all(a >= b for a, b in zip(keeps[:-1], keeps[1:])) and 0 <= keeps[-1] and keeps[0] <= V
        back = keeps_from_shares(layers, shares_from_keeps(layers, keeps, L, convention), L, V, budget, convention)
        # shares are a faithful parametrisation of an allocation (up to the rounding that meets the budget)
        assert back is not None and max(abs(a - b) for a, b in zip(back, keeps)) <= 2, (keeps, back)
    assert met > 50  # many random draws are unreachable or not non-increasing: those must give None


def test_search_finds_the_known_best_schedule() -> None:
    search = ScheduleSearch(L, V, range(0, L - 1), n_stages=3, max_candidates=200, max_rounds=20)
    store = CandidateStore()
    found = search.run(128, early_vision_objective, store=store)
    per_layer = found.best.schedule(L, V).tokens_per_layer()
    assert found.best.blend == 0.5
    assert sum(per_layer[4:]) <= L  # nothing spent where the image is not read, but the budget's rounding slack
    assert all(abs(t - (L * 128 - V) / 3) <= 20 for t in per_layer[1:4]), per_layer  # spread evenly over 1..3
    optimum = 3 * (1 - (L * 128 - V) / 3 / V) ** 2
    assert found.score["objective"] <= optimum + 0.01  # the exact-budget optimum, up to rounding to whole tokens
    # every candidate it looked at met the budget within one token
    assert store.rows and all(abs(r["budget_achieved"] - 128) <= 1.0 for r in store.rows.values())
    # the geometric rule alone (the seeds) cannot do this: it never empties the last stage
    seeds = search.seed_candidates(128, {})
    assert min(early_vision_objective(c)["objective"] for c in seeds) > found.score["objective"] + 0.05


def test_interrupted_search_resumes_to_the_same_result(tmp_path: Path) -> None:
    search = ScheduleSearch(L, V, range(0, L - 1), n_stages=2, max_candidates=40)
    full = search.run(160, early_vision_objective)
    calls = {"n": 0}

    def dies_after_10(cand: Candidate) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return early_vision_objective(cand)

    path = tmp_path / "candidates.jsonl"
    with pytest.raises(KeyboardInterrupt):
        search.run(160, dies_after_10, store=CandidateStore(path, {"objective": "synthetic"}))
    assert len(path.read_text().splitlines()) == 10
    with path.open("a") as fh:
        fh.write('{"budget": 160, "key": "cut')  # a line cut by the interruption is skipped
    seen: list[str] = []

    def counting(cand: Candidate) -> dict[str, float]:
        seen.append(cand.key)
        return early_vision_objective(cand)

    store = CandidateStore(path, {"objective": "synthetic"})
    assert len(store.rows) == 10
    resumed = search.run(160, counting, store=store)
    assert resumed.best == full.best and resumed.score == full.score
    assert len(seen) == full.scored - 10 and resumed.scored == len(seen)  # nothing scored twice
    # a store written under other settings is not reused
    assert not CandidateStore(path, {"objective": "other"}).rows


def test_candidate_layers_come_from_the_analysis_on_deep_models() -> None:
    result = ShiftDetector().fit(planted_t2v(HALF_8_HALF_20)).result_
    from analysis.derive import find_dense_regions

    regions = find_dense_regions(result.density)
    layers = candidate_layers_from_regions(regions, 32, rule_layers=[10, 22], min_layer=1)
    assert layers == [1, 6, 7, 9, 10, 18, 19, 21, 22]
    assert candidate_layers_from_regions(regions, 8, min_layer=0) == list(range(0, 7))  # small model: every layer


# the paper rule's schedules as they were before the search existed (commit 8851d3c), on two planted analyses
PAPER_GOLDEN = [
    ("a", 1, 48, "processed", "after", [(10, 40)]),
    ("a", 2, 24, "paper", "both", [(6, 28), (10, 12)]),
    ("a", 3, 16, "processed", "both", [(6, 12), (10, 2), (18, 0)]),
    ("a", 3, 32, "paper", "both", [(6, 42), (10, 27), (18, 18)]),
    ("a", 2, 32, "paper", "after", [(10, 24), (22, 9)]),
    ("a", 2, 48, "processed", "after", [(10, 45), (22, 32)]),
    ("b", 1, 32, "paper", "after", [(14, 7)]),
    ("b", 2, 24, "processed", "both", [(10, 10), (14, 1)]),
    ("b", 2, 48, "paper", "after", [(5, 52), (14, 42)]),
    ("b", 3, 24, "paper", "both", [(1, 39), (10, 24), (14, 14)]),
]


@pytest.fixture(scope="module")
def analyses():
    return {"a": ShiftDetector().fit(planted_t2v(HALF_8_HALF_20)).result_,
            "b": ShiftDetector().fit(planted_t2v([3] * 6 + [12] * 8 + [25] * 6, seed=1)).result_}


@pytest.mark.parametrize("which,n,budget,convention,placement,stages", PAPER_GOLDEN)
def test_paper_rule_reproduces_the_schedules_before_the_search(analyses, which, n, budget, convention, placement,
                                                               stages) -> None:
    schedule = derive_schedule(analyses[which], n, budget, convention=convention, placement=placement)
    assert [(s.layer, s.keep) for s in schedule.stages] == stages
    assert schedule.provenance["rule"].startswith("dense regions") and schedule.provenance["allocation"]["rule"] == "geometric"


def test_search_schedules_writes_provenance(analyses) -> None:
    def objective(cand: Candidate, schedule: Schedule) -> dict[str, float]:
        assert schedule.layers == list(cand.layers)
        per_layer = schedule.tokens_per_layer()
        return {"objective": sum((1 - t / 64) ** 2 for t in per_layer[:12]) + (0.01 if cand.blend else 0.0)}

    out = search_schedules(analyses["a"], [24, 16], objective, n_stages=3, min_layer=1,
                           settings={"max_candidates": 30}, objective_info={"objective": "synthetic"},
                           provenance={"records": "/r"})
    assert [o.budget for o in out] == [24.0, 16.0]
    for o in out:
        assert abs(o.schedule.budget() - o.budget) <= 1
        search = o.schedule.provenance["search"]
        assert search["objective"] == "synthetic" and search["value"]["objective"] == o.search.score["objective"]
        assert search["scorer_options"] == {"text_weight_blend": 0.0} == o.scorer_options
        assert search["top_candidates"][0]["objective"] == search["value"]["objective"]
        assert o.schedule.provenance["records"] == "/r" and o.schedule.provenance["derivation"]["rule"] == "search"
        assert set(o.schedule.layers) <= set(search["candidate_layers"])
    with pytest.raises(DeriveError, match="out of reach"):
        search_schedules(analyses["a"], [1], objective, n_stages=2, min_layer=10)


# -- on real (tiny, random-weight) models ---------------------------------------------------------------------------
def _collect(tmp_path: Path, layers: int, n: int) -> tuple[Path, dict]:
    from analysis.collect import run_collect
    from tests.conftest import tiny_arch
    from tests.test_collect_cli import TASK
    from tests.test_prompts import tiny_processor

    processor = tmp_path / "processor"
    tiny_processor().save_pretrained(processor)
    model = {"name": f"tiny-search-{layers}", "processor": str(processor), "seed": 0, "dtype": "float32",
             "device": "cpu", "attn_implementation": "sdpa", "arch": tiny_arch(layers=layers)}
    collect_dir = run_collect({
        "model": model, "data": {"name": "synthetic", "task": TASK, "split": "calibration", "limit": None},
        "n_samples": n, "batch_size": n, "reducer": "adaptinfer", "shard_size": n,
        "output": str(tmp_path / "collect"), "seed": 0,
    })
    return collect_dir, model


def test_run_derive_search_end_to_end_and_resume(tmp_path: Path) -> None:
    collect_dir, model = _collect(tmp_path, layers=8, n=6)
    out = tmp_path / "derive"
    overrides = [f"input={collect_dir}", f"output={out}", "budgets=[12,9]", "n_stages=2", "min_layer=0",
                 "n_calibration=6", "search.max_candidates=12", "search.batch_size=3", "search.progress=false",
                 "plots.enabled=false", "detector.token_fraction=0.25"]

    def cfg():
        return {**OmegaConf.to_container(compose_derive(overrides)), "model": model}

    run_derive(cfg())
    front = read_front(out)
    assert [f["budget"] for f in front] == [12.0, 9.0]
    first = Schedule.from_yaml(out / "schedule.yaml")
    assert first.to_dict() == Schedule.from_yaml(front[0]["schedule_path"]).to_dict()
    for f in front:
        schedule = Schedule.from_yaml(f["schedule_path"])
        assert abs(schedule.budget() - f["budget"]) <= 1 and schedule.num_layers == 8 and schedule.vision_tokens == 16
        assert f["scorer_options"]["text_weight_blend"] in (0.0, 0.5, 1.0) and f["objective"] >= 0
        prov = schedule.provenance
        assert prov["search"]["objective"] == "kl+mismatch" and prov["calibration"]["n"] == 6
        assert prov["records"] == str(collect_dir.resolve()) and prov["search"]["call"]["passes"]["prompts"] > 0
    summary = json.loads((out / "front.json").read_text())
    assert summary["candidates_scored_now"] > 0 and summary["candidates_from_file"] == 0
    assert (out / "reference.pt").is_file() and (out / "front.png").is_file()  # the front figure is always written
    lines = len((out / "candidates.jsonl").read_text().splitlines())
    run_derive(cfg())  # resumes: everything comes from candidates.jsonl, the same front
    again = json.loads((out / "front.json").read_text())
    assert again["candidates_scored_now"] == 0 and again["candidates_from_file"] == lines
    assert [f["keep"] for f in again["front"]] == [f["keep"] for f in summary["front"]]
    assert again["passes"]["prompts"] == 0  # the reference came from reference.pt, no candidate rescored


def test_search_on_a_32_layer_model_stays_within_its_pass_budget(tmp_path: Path) -> None:
    collect_dir, model = _collect(tmp_path, layers=32, n=4)
    out = tmp_path / "derive"
    c = compose_derive([f"input={collect_dir}", f"output={out}", "budgets=[8]", "n_stages=3", "min_layer=1",
                        "n_calibration=4", "search.batch_size=4", "search.progress=false", "plots.enabled=false",
                        "detector.token_fraction=0.25"])
    run_derive({**OmegaConf.to_container(c), "model": model})
    summary = json.loads((out / "front.json").read_text())
    schedule = Schedule.from_yaml(out / "schedule_8.yaml")
    search = schedule.provenance["search"]
    n_layers_tried = len(search["candidate_layers"])
    assert n_layers_tried < 31  # pruned by the analysis, not every layer
    max_scored = search["settings"]["max_candidates"]
    # passes: the reference, at most max_candidates candidates, one unpruned prefix per first-stage layer
    bound = 4 * (1 + max_scored + n_layers_tried)
    assert summary["passes"]["full_pass_equivalents"] <= bound, (summary["passes"], bound)
    assert summary["passes"]["prompts"] <= 4 * (1 + max_scored + n_layers_tried)
    assert abs(schedule.budget() - 8) <= 1 and schedule.num_layers == 32


def test_replay_from_a_cached_layer_input_matches_the_full_forward(tiny_model) -> None:
    """The objective's shortcut: layers before the first stage skipped, vision tower skipped, same logits."""
    from analysis.objective import replay_from
    from pruning.engine import PruningEngine
    from pruning.schedule import Stage
    from tests.conftest import make_prompts, pixel_values

    model = tiny_model.model
    layers = model.model.language_model.layers
    originals = list(layers)
    inputs = {**make_prompts(16, [5, 3]), "pixel_values": pixel_values(2)}
    schedule = Schedule([Stage(2, 6)], num_layers=4, vision_tokens=16)
    captured = []
    handle = layers[2].register_forward_pre_hook(lambda m, a, k: captured.append(a[0] if a else k["hidden_states"]),
                                                 with_kwargs=True)
    with torch.inference_mode():
        model(**inputs, use_cache=False)
        handle.remove()
        with PruningEngine(model, schedule, scorer="adaptinfer"):
            full = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        with replay_from(layers, 2, captured[0]), PruningEngine(model, schedule, scorer="adaptinfer") as engine:
            replay = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                           logits_to_keep=1).logits[:, -1]
    assert engine.record.vision_per_layer == [16, 16, 16, 6]
    torch.testing.assert_close(replay, full, rtol=0, atol=1e-5)
    assert list(layers) == originals  # the stand-ins are gone
