"""pruning.methods: a method config -> the schedule at a budget (depth scaling, presets, derived files and searched
fronts), its scorer and options; the one resolution the benchmark, the lmms-eval adapter and the demo share."""
from __future__ import annotations

import pytest

from pruning.methods import (MethodError, check_method, front_entry, load_method, method_schedule, resolve_method,
                             scale_layers)
from pruning.schedule import BudgetUnreachable, ScheduleError, read_front
from tests.bench_fixtures import CONFIGS, write_front

METHOD_NAMES = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


# -- schedules (moved from test_benchmark.py with the functions) ---------------------------------------------------
@pytest.mark.parametrize("layers, depth, ref, expected", [
    ([1, 10, 20], 32, 32, [1, 10, 20]),
    ([1, 10, 20], 8, 32, [0, 2, 4]),
    ([1, 10, 20], 16, 32, [0, 5, 10]),
    ([1, 10, 20], 40, 32, [2, 13, 25]),
    ([2, 6, 15], 8, 32, [0, 1, 3]),
    ([2, 6, 15], 16, 32, [1, 3, 7]),
    ([2, 6, 15], 40, 32, [3, 8, 19]),
    ([8, 16, 24], 8, 32, [1, 3, 5]),
    ([8, 16, 24], 16, 32, [4, 8, 12]),
    ([8, 16, 24], 40, 32, [10, 20, 30]),
    ([1, 2, 3], 4, 32, [0, 1, 2]),  # collisions are pushed up, not merged
    ([-1], 8, None, [-1]),
])
def test_scale_layers(layers, depth, ref, expected):
    assert scale_layers(layers, depth, ref) == expected


@pytest.mark.parametrize("depth", [8, 16, 32, 40])
@pytest.mark.parametrize("layers", [[1, 10, 20], [2, 6, 15], [8, 16, 24]])
def test_scaled_drops_land_at_the_reference_fraction_of_the_stack(layers, depth):
    """The layers that run before each drop are the reference's share of the stack, to the nearest layer."""
    for ref_layer, layer in zip(layers, scale_layers(layers, depth, 32)):
        assert abs((layer + 1) / depth - (ref_layer + 1) / 32) <= 0.5 / depth + 1e-9


def test_scale_layers_refuses_a_model_too_shallow():
    with pytest.raises(MethodError, match="do not fit a 3-layer model"):
        scale_layers([1, 10, 20], 3, 32)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_config_is_valid(name):
    method = load_method(name)
    if method["schedule"] == "derived":
        with pytest.raises(MethodError, match="needs `schedule_path`"):
            check_method(method)
        method["schedule_path"] = "derive/schedule.yaml"
    assert check_method(method)["name"] == name


@pytest.mark.parametrize("name", ["adaptinfer", "fastv", "sparsevlm", "pyramiddrop", "visionzip", "random"])
@pytest.mark.parametrize("convention", ["processed", "paper"])
def test_allocated_methods_meet_the_budget_within_one_token(name, convention):
    method = load_method(name)
    schedule = method_schedule(method, 32, 576, 192, convention)
    assert abs(schedule.budget(32, 576, convention) - 192) <= 1.0
    if name == "visionzip":
        assert [s.layer for s in schedule.stages] == [-1] and schedule.stages[0].keep == 192


def test_budget_below_the_first_stage_is_infeasible():
    # PyramidDrop's first stage at layer 8 of 32: 9 layers see all 576 tokens -> processed budget >= 162
    with pytest.raises(ScheduleError, match="unreachable"):
        method_schedule(load_method("pyramiddrop"), 32, 576, 64, "processed")


def test_derived_method_reuses_or_resolves_its_schedule(tmp_path):
    from pruning.schedule import allocate_keep

    path = tmp_path / "schedule.yaml"
    allocate_keep([0, 3, 5], 8, 576, 64, "paper", name="derived").to_yaml(path)
    method = {**load_method("adaptinfer_derived"), "schedule_path": str(path)}
    same = method_schedule(method, 8, 576, 64, "paper")
    assert same.name == "derived"  # within one token: used as written
    other = method_schedule(method, 8, 576, 192, "paper")
    assert other.layers == [0, 3, 5] and abs(other.budget(8, 576, "paper") - 192) <= 1.0
    with pytest.raises(MethodError, match="schedule_path"):
        method_schedule({**method, "schedule_path": str(tmp_path / "missing.yaml")}, 8, 576, 64, "paper")



# -- the whole resolution ---------------------------------------------------------------------------------------
def test_resolve_a_searched_front_picks_each_budgets_schedule_and_its_searched_options(tmp_path):
    front_dir = write_front(tmp_path / "front", [(192, [0, 2], 0.5), (160, [0, 3], 0.0)])
    method = {**load_method("adaptinfer_derived"), "schedule_path": str(front_dir)}
    for budget, entry, layers, blend in ((192, 192, [0, 2], 0.5), (160.6, 160, [0, 3], 0.0)):  # within one token
        resolved = resolve_method(method, 8, 576, budget, "processed")
        assert resolved.schedule.layers == layers and resolved.schedule.name.startswith("searched@")
        assert resolved.method["schedule_path"].endswith(f"schedule_{entry}.yaml")
        assert resolved.scorer == "adaptinfer" and resolved.scorer_options == {"text_weight_blend": blend}
    pinned = resolve_method({**method, "scorer_options": {"text_weight_blend": 1.0}}, 8, 576, 160, "processed")
    assert pinned.scorer_options == {"text_weight_blend": 1.0}  # options set on the method win
    with pytest.raises(MethodError, match=r"holds schedules for budgets \['160 \(processed\)', '192 \(processed\)'\]"):
        resolve_method(method, 8, 576, 128, "processed")
    with pytest.raises(MethodError, match="holds schedules"):  # a front is per convention
        resolve_method(method, 8, 576, 192, "paper")


def test_front_entry_serves_budgets_within_one_token(tmp_path):
    front = read_front(write_front(tmp_path / "front", [(192, [0, 2], 0.5)]))
    assert front_entry(front, 191.0, "processed")["budget"] == 192.0
    assert front_entry(front, 193.0, "processed") is not None
    assert front_entry(front, 190.9, "processed") is None and front_entry(front, 192, "paper") is None
    assert front_entry([], 192, "processed") is None


@pytest.mark.parametrize("name", ["unpruned", "adaptinfer", "fastv", "visionzip", "adaptinfer_7b_64"])
def test_resolve_equals_the_schedule_and_the_methods_own_scorer_and_options(name):
    method = load_method(name) if name != "adaptinfer_7b_64" else {
        "name": "preset", "scorer": "adaptinfer", "schedule": name, "scorer_options": {"text_weight_blend": 0.5}}
    resolved = resolve_method(check_method(method), 32, 576, 192, "processed")
    assert resolved.schedule.to_dict() == method_schedule(method, 32, 576, 192, "processed").to_dict()
    assert resolved.method == method  # nothing filled in for a method without a searched front
    assert resolved.scorer == method.get("scorer") and resolved.scorer_options == dict(method.get("scorer_options") or {})
    assert bool(resolved.schedule.stages) == (name != "unpruned")


def test_resolve_raises_budget_unreachable_for_an_infeasible_budget_and_method_error_for_an_invalid_method():
    with pytest.raises(BudgetUnreachable):
        resolve_method(load_method("pyramiddrop"), 32, 576, 64, "processed")
    with pytest.raises(MethodError, match="convention='tokens'"):
        resolve_method(load_method("adaptinfer"), 32, 576, 64, "tokens")
    with pytest.raises(MethodError, match="neither none/allocate/derived"):
        resolve_method({"name": "x", "scorer": "adaptinfer", "schedule": "nope"}, 32, 576, 64, "processed")
