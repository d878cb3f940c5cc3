"""Schedule semantics, budgets in both conventions, validation errors, YAML io and budget allocation."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pruning.schedule import Schedule, ScheduleError, Stage, allocate_keep, round_half_up

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "schedule"
LAYERS_7B, LAYERS_13B, VISION = 32, 40, 576


def preset_64() -> Schedule:
    return Schedule([Stage(1, 133), Stage(10, 27), Stage(20, 3)], num_layers=LAYERS_7B, vision_tokens=VISION)


def hand_per_layer(num_layers: int, initial: int, stages: list[tuple[int, int]], first_changed: int) -> list[int]:
    """Independent per-layer counts: a stage (l, k) changes the count from layer l + first_changed on."""
    out = []
    for layer in range(num_layers):
        count = initial
        for stage_layer, k in stages:
            if layer >= stage_layer + first_changed:
                count = k
        out.append(count)
    return out


# ---------------------------------------------------------------- semantics and budgets
def test_preset_64_budgets_by_hand():
    s = preset_64()
    # paper: layer 0 at 576, layers 1-9 at 133, 10-19 at 27, 20-31 at 3  -> 2079/32 (REFERENCE.md: "65.0")
    assert s.budget(convention="paper") == (576 * 1 + 133 * 9 + 27 * 10 + 3 * 12) / 32
    assert round(s.budget(convention="paper"), 1) == 65.0
    # processed: layers 0-1 at 576, 2-10 at 133, 11-20 at 27, 21-31 at 3 -> 2652/32 = 82.875.
    # REFERENCE.md writes (576*2 + 133*9 + 27*10 + 3*12)/32 = 83.0, which sums 33 layers; 3*11 is right.
    assert 2 + 9 + 10 + 11 == LAYERS_7B
    assert s.budget() == (576 * 2 + 133 * 9 + 27 * 10 + 3 * 11) / 32 == 82.875


def test_tokens_per_layer_both_conventions():
    s = preset_64()
    stages = [(1, 133), (10, 27), (20, 3)]
    assert s.tokens_per_layer() == hand_per_layer(LAYERS_7B, VISION, stages, first_changed=1)
    assert s.tokens_per_layer(convention="paper") == hand_per_layer(LAYERS_7B, VISION, stages, first_changed=0)
    per = s.tokens_per_layer()
    assert per[1] == 576 and per[2] == 133 and per[10] == 133 and per[11] == 27 and per[21] == 3
    assert len(per) == LAYERS_7B


def test_layer_minus_one_is_before_the_lm():
    s = Schedule([Stage(-1, 64)])
    assert s.tokens_per_layer(4, VISION) == [64] * 4
    assert s.budget(4, VISION) == s.budget(4, VISION, convention="paper") == 64.0


def test_fractions_resolve_against_current_count_with_half_up_rounding():
    s = Schedule([Stage(0, 0.5), Stage(1, 0.5), Stage(2, 0.5)])
    assert s.keep_counts(5) == [3, 2, 1]  # 2.5 -> 3, 1.5 -> 2, 1.0 -> 1 (banker's rounding would give 2, 2, 1)
    assert s.keep_counts(0) == [0, 0, 0]
    assert Schedule([Stage(0, 0.01)]).keep_counts(10) == [1]  # a positive fraction keeps at least one token
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49)] == [1, 2, 3, 2]
    assert Schedule([Stage(3, 1.0)]).keep_counts(7) == [7]
    # an int 1 is a count, a float 1.0 a fraction
    assert Schedule([Stage(3, 1)]).keep_counts(7) == [1]


def test_unpruned_budget_is_initial():
    s = Schedule()
    assert s.tokens_per_layer(LAYERS_7B, VISION) == [VISION] * LAYERS_7B
    assert s.budget(LAYERS_7B, VISION) == s.budget(LAYERS_7B, VISION, convention="paper") == VISION


def test_resolve_turns_fractions_into_counts():
    r = Schedule([Stage(8, 0.5), Stage(16, 0.5)], num_layers=LAYERS_7B).resolve(VISION)
    assert [(st.layer, st.keep) for st in r.stages] == [(8, 288), (16, 144)]
    assert all(isinstance(st.keep, int) for st in r.stages)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "stages, fragments",
    [
        ([Stage(5, 10), Stage(5, 5)], ["stages[1].layer", "5", "strictly increasing"]),
        ([Stage(5, 10), Stage(3, 5)], ["stages[1].layer", "3", "strictly increasing"]),
        ([{"layer": -2, "keep": 3}], ["stages[0].layer", "-2", "-1"]),
        ([{"layer": 1, "keep": -1}], ["stages[0].keep", "-1", ">= 0"]),
        ([{"layer": 1, "keep": float("nan")}], ["stages[0].keep", "nan", "finite"]),
        ([{"layer": 1, "keep": float("inf")}], ["stages[0].keep", "inf"]),
        ([{"layer": 1, "keep": 1.5}], ["stages[0].keep", "1.5", "(0, 1]"]),
        ([{"layer": 1, "keep": 0.0}], ["stages[0].keep", "0.0", "(0, 1]"]),
        ([{"layer": 1, "keep": True}], ["stages[0].keep", "True", "bool"]),
        ([{"layer": True, "keep": 3}], ["stages[0].layer", "True"]),
        ([{"layer": 1, "keep": "10"}], ["stages[0].keep", "'10'"]),
        ([{"layer": 1, "keep": 3, "ratio": 0.5}], ["stages[0]", "unknown keys", "ratio"]),
        ([{"layer": 1}], ["stages[0]", "missing", "keep"]),
    ],
)
def test_bad_stages_raise_naming_field_value_and_range(stages, fragments):
    with pytest.raises(ScheduleError) as e:
        Schedule(stages)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_schedule_error_is_value_error():
    assert issubclass(ScheduleError, ValueError)


def test_layer_at_or_beyond_last_layer():
    with pytest.raises(ScheduleError, match=r"stages\[0\]\.layer = 31.*-1 or 0\.\.30"):
        Schedule([Stage(31, 10)], num_layers=LAYERS_7B)
    with pytest.raises(ScheduleError, match=r"stages\[0\]\.layer = 40.*0\.\.30"):
        Schedule([Stage(40, 10)]).validate(num_layers=LAYERS_7B)
    Schedule([Stage(30, 10)], num_layers=LAYERS_7B)  # the last allowed layer


def test_keep_larger_than_present():
    with pytest.raises(ScheduleError, match=r"stages\[1\]\.keep = 200.*133.*0\.\.133"):
        Schedule([Stage(1, 133), Stage(10, 200)]).validate(initial=VISION)
    with pytest.raises(ScheduleError, match=r"stages\[0\]\.keep = 600.*0\.\.576"):
        Schedule([Stage(1, 600)], vision_tokens=VISION)


def test_positions_must_be_known():
    with pytest.raises(ScheduleError, match=r"positions = 'contiguous'.*keep.*renumber"):
        Schedule([Stage(1, 10)], positions="contiguous")
    assert Schedule([Stage(1, 10)], positions="renumber").positions == "renumber"


def test_schedule_for_a_different_model():
    s = preset_64()
    with pytest.raises(ScheduleError, match=r"num_layers = 32.*40"):
        s.validate(num_layers=LAYERS_13B)
    with pytest.raises(ScheduleError, match=r"vision_tokens = 576.*2880"):
        s.validate(initial=2880)
    with pytest.raises(ScheduleError, match="num_layers = 32"):
        s.budget(LAYERS_13B, VISION)
    s.validate(num_layers=LAYERS_7B, initial=VISION)


def test_budget_needs_model_size():
    with pytest.raises(ScheduleError, match="num_layers"):
        Schedule([Stage(1, 10)]).budget(initial=VISION)
    with pytest.raises(ScheduleError, match="convention = 'tokens'"):
        preset_64().budget(convention="tokens")


# ---------------------------------------------------------------- io
def test_dict_and_yaml_round_trip(tmp_path):
    s = Schedule([Stage(1, 0.5), Stage(10, 27)], positions="renumber", num_layers=LAYERS_7B, vision_tokens=VISION,
                 name="x", provenance={"detector": {"model": "l2", "n_bkps": 1}, "histogram": [0, 3, 5]})
    d = s.to_dict()
    assert set(d) == {"name", "positions", "num_layers", "vision_tokens", "stages", "provenance",
                      "budget_processed", "budget_paper"}
    assert d["stages"] == [{"layer": 1, "keep": 0.5}, {"layer": 10, "keep": 27}]
    path = tmp_path / "s.yaml"
    s.to_yaml(path)
    for loaded in (Schedule.from_yaml(path), Schedule.from_yaml(str(path)), Schedule.from_yaml(path.read_text()),
                   Schedule.from_dict(yaml.safe_load(path.read_text()))):
        assert loaded == s
        assert isinstance(loaded.stages[0].keep, float) and isinstance(loaded.stages[1].keep, int)


def test_from_dict_rejects_unknown_keys_and_wrong_budgets():
    d = preset_64().to_dict()
    with pytest.raises(ScheduleError, match=r"unknown keys \['budget'\]"):
        Schedule.from_dict({**d, "budget": 64})
    with pytest.raises(ScheduleError, match=r"budget_paper = 64: .*64\.96875"):
        Schedule.from_dict({**d, "budget_paper": 64})
    with pytest.raises(ScheduleError, match=r"budget_processed = 83.*82\.875"):
        Schedule.from_dict({**d, "budget_processed": 83.0})
    # a value written to one decimal, as in published tables, is accepted
    assert Schedule.from_dict({**d, "budget_paper": 65.0}) == preset_64()
    with pytest.raises(ScheduleError, match="needs num_layers and vision_tokens"):
        Schedule.from_dict({"stages": [], "budget_paper": 576})


def test_from_yaml_rejects_non_mapping():
    with pytest.raises(ScheduleError, match="mapping"):
        Schedule.from_yaml("- 1\n- 2\n")
    with pytest.raises(ScheduleError, match="does not exist"):
        Schedule.from_yaml("no/such/schedule.yaml")


# ---------------------------------------------------------------- preset files
# Hand-computed (processed, paper) budgets; see the comments in each file.
HAND_BUDGETS = {
    "adaptinfer_7b_64": ((576 * 2 + 133 * 9 + 27 * 10 + 3 * 11) / 32, (576 + 133 * 9 + 27 * 10 + 3 * 12) / 32),
    "adaptinfer_7b_128": ((576 * 2 + 290 * 9 + 72 * 10 + 18 * 11) / 32, (576 + 290 * 9 + 72 * 10 + 18 * 12) / 32),
    "adaptinfer_7b_48": ((576 * 2 + 80 * 9 + 24 * 10 + 2 * 11) / 32, (576 + 80 * 9 + 24 * 10 + 2 * 12) / 32),
    "adaptinfer_7b_32": ((576 * 2 + 40 * 9 + 12 * 10 + 0) / 32, (576 + 40 * 9 + 12 * 10 + 0) / 32),
    "adaptinfer_13b_64": ((576 * 2 + 148 * 9 + 40 * 10 + 5 * 19) / 40, (576 + 148 * 9 + 40 * 10 + 5 * 20) / 40),
    "adaptinfer_13b_128": ((576 * 2 + 300 * 9 + 94 * 10 + 30 * 19) / 40, (576 + 300 * 9 + 94 * 10 + 30 * 20) / 40),
    # 576 -> 288 after 8 -> 144 after 16 -> 72 after 24
    "pyramiddrop_7b": ((576 * 9 + 288 * 8 + 144 * 8 + 72 * 7) / 32, (576 * 8 + 288 * 8 + 144 * 8 + 72 * 8) / 32),
    "fastv_7b_k2": ((576 * 2 + 288 * 30) / 32, (576 + 288 * 31) / 32),
    "sparsevlm_7b_64": ((576 * 3 + 66 * 4 + 30 * 9 + 17 * 16) / 32, (576 * 2 + 66 * 4 + 30 * 9 + 17 * 17) / 32),
}
PRESET_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_expected_presets_exist():
    names = {p.stem for p in PRESET_FILES}
    expected = {"adaptinfer_7b_128", "adaptinfer_7b_64", "adaptinfer_7b_48", "adaptinfer_7b_32", "adaptinfer_13b_128",
                "adaptinfer_13b_64", "sparsevlm_7b_192", "sparsevlm_7b_128", "sparsevlm_7b_64", "pyramiddrop_7b",
                "fastv_7b_k2", "none"}
    assert expected <= names


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_file_loads_and_its_budgets_hold(path):
    data = yaml.safe_load(path.read_text())
    s = Schedule.from_dict(data)  # checks the written budgets against its own computation
    assert s.name == path.stem
    if s.num_layers is not None:
        assert data["budget_processed"] == pytest.approx(s.budget(), abs=1e-6)
        assert data["budget_paper"] == pytest.approx(s.budget(convention="paper"), abs=1e-6)
        assert s.budget(convention="paper") <= s.budget()
    if path.stem in HAND_BUDGETS:
        processed, paper = HAND_BUDGETS[path.stem]
        assert s.budget() == pytest.approx(processed, abs=1e-9)
        assert s.budget(convention="paper") == pytest.approx(paper, abs=1e-9)
    if path.stem == "none":
        assert s.stages == ()
        assert s.budget(LAYERS_7B, VISION) == VISION


def test_adaptinfer_7b_presets_are_named_by_paper_budget():
    for name in ("128", "64", "48", "32"):
        s = Schedule.from_yaml(CONFIG_DIR / f"adaptinfer_7b_{name}.yaml")
        assert abs(s.budget(convention="paper") - int(name)) <= 1.0


def test_presets_compose_with_hydra():
    hydra = pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR.parent), version_base=None):
        cfg = compose(config_name=None, overrides=["+schedule=adaptinfer_7b_64"])
    assert hydra is not None
    assert Schedule.from_dict(cfg.schedule) == Schedule.from_dict(OmegaConf.to_container(cfg.schedule))
    assert Schedule.from_dict(cfg.schedule).keep_counts() == [133, 27, 3]


# ---------------------------------------------------------------- allocation
def independent_budget(layers: list[int], counts: list[int], num_layers: int, initial: int, convention: str) -> float:
    shift = 1 if convention == "processed" else 0
    return sum(hand_per_layer(num_layers, initial, list(zip(layers, counts)), shift)) / num_layers


@pytest.mark.parametrize("convention", ["processed", "paper"])
@pytest.mark.parametrize("target", [40.0, 64.0, 128.0, 192.0, 300.0])
def test_allocate_keep_meets_budget_geometrically(convention, target):
    layers = [1, 10, 20]
    s = allocate_keep(layers, LAYERS_7B, VISION, target, convention=convention)
    counts = s.keep_counts()
    r = s.provenance["ratio"]
    assert counts == [round_half_up(VISION * r ** (i + 1)) for i in range(len(layers))]
    assert counts == sorted(counts, reverse=True)
    got = independent_budget(layers, counts, LAYERS_7B, VISION, convention)
    assert abs(got - target) <= 1.0
    assert s.budget(convention=convention) == got
    assert s.num_layers == LAYERS_7B and s.vision_tokens == VISION


def test_allocate_keep_unreachable():
    # processed minimum with a first stage at layer 1: layers 0 and 1 always see all 576 -> 36.0
    with pytest.raises(ScheduleError, match=r"budget = 30.*36"):
        allocate_keep([1, 10, 20], LAYERS_7B, VISION, 30)
    with pytest.raises(ScheduleError, match=r"budget = 600.*576"):
        allocate_keep([1, 10, 20], LAYERS_7B, VISION, 600)
    with pytest.raises(ScheduleError, match="rule = 'linear'"):
        allocate_keep([1, 10, 20], LAYERS_7B, VISION, 64, rule="linear")
    with pytest.raises(ScheduleError, match=r"stages\[0\]\.layer = 31"):
        allocate_keep([31], LAYERS_7B, VISION, 500)
    assert math.isclose(allocate_keep([1, 10, 20], LAYERS_7B, VISION, 36.0).budget(), 36.0)


def test_allocate_keep_before_the_lm():
    # a single pre-LM stage (VisionZip): every layer sees the kept count, in both conventions
    for convention in ("processed", "paper"):
        s = allocate_keep([-1], LAYERS_7B, VISION, 64, convention=convention)
        assert s.keep_counts() == [64]
        assert s.budget(convention=convention) == 64.0


def test_budget_needs_initial():
    with pytest.raises(ScheduleError, match="initial is needed.*vision_tokens"):
        Schedule([Stage(1, 10)], num_layers=LAYERS_7B).budget()


# -- the authors' Qwen2-VL-2B presets: fractions truncated as their code does ------------------------------------
QWEN_PRESETS = {"10": [0.17, 0.6, 0.3], "30": [0.5, 0.6, 0.3], "50": [0.7, 0.9, 0.3]}  # weiczh02/AdaptInfer-base


def _authors_counts(fractions, v):
    """qwen2_vl/SparseQwen/score.py: keep min(int(frac * v), v - 1) of the v tokens present, stage by stage."""
    out = []
    for frac in fractions:
        v = min(int(frac * v), v - 1)
        out.append(v)
    return out


@pytest.mark.parametrize("name", sorted(QWEN_PRESETS))
def test_qwen2vl2b_presets_keep_the_authors_counts_for_every_image_size(name):
    path = Path(__file__).resolve().parents[1] / "configs" / "schedule" / f"adaptinfer_qwen2vl2b_{name}.yaml"
    schedule = Schedule.from_yaml(path).validate(num_layers=28)
    assert schedule.layers == [0, 9, 19] and schedule.positions == "keep" and schedule.rounding == "truncate"
    assert [s.keep for s in schedule.stages] == QWEN_PRESETS[name]
    for v in range(100, 1501):
        assert schedule.keep_counts(v) == _authors_counts(QWEN_PRESETS[name], v), v
    # round half up (the toolkit's default) would keep one token more at some stage for most sizes
    nearest = Schedule(stages=schedule.stages)
    assert sum(nearest.keep_counts(v) != schedule.keep_counts(v) for v in range(100, 1501)) > 1000


def test_truncate_rounding_drops_one_at_least_and_keeps_one():
    s = Schedule([Stage(0, 1.0), Stage(1, 0.01)], rounding="truncate")
    assert s.keep_counts(10) == [9, 1]  # keep 1.0 still drops one (the authors' v - 1); 0.01 * 9 -> 0 -> at least 1
    assert Schedule([Stage(0, 1.0)]).keep_counts(10) == [10]
    again = Schedule.from_yaml(s.to_yaml())
    assert again.rounding == "truncate" and again.keep_counts(10) == [9, 1]
    assert "rounding" not in Schedule([Stage(0, 0.5)]).to_dict()  # the default is not written
    with pytest.raises(ScheduleError, match=r"rounding = 'floor'.*\['nearest', 'truncate'\]"):
        Schedule.from_dict({"stages": [{"layer": 0, "keep": 0.5}], "rounding": "floor"})
