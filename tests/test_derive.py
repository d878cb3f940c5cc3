"""Schedule derivation: dense regions, stage placement rule, budget, YAML, the Hydra entry point."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from analysis.derive import (
    DeriveError,
    Region,
    ScheduleDeriver,
    derive_schedule,
    find_dense_regions,
    place_stages,
    run_derive,
)
from analysis.records import RecordStore
from analysis.shift import ShiftDetector, smooth_histogram
from pruning.schedule import Schedule
from tests.test_shift import HALF_8_HALF_20, planted_t2v

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def density_with(counts: dict[int, int], num_layers: int = 32, sigma: float = 1.0) -> np.ndarray:
    h = np.zeros(num_layers)
    for layer, c in counts.items():
        h[layer] = c
    return smooth_histogram(h, sigma)


def spans(regions: list[Region]) -> list[tuple[int, int, int]]:
    return [(r.start, r.peak, r.end) for r in regions]


def test_dense_regions_at_half_maximum() -> None:
    # sigma=1: neighbours at exp(-1/2) = 0.61 of the peak are in, layers two away (0.14) are out
    regions = find_dense_regions(density_with({8: 50, 20: 50}))
    assert spans(regions) == [(7, 8, 9), (19, 20, 21)]
    assert regions[0].mass == pytest.approx(regions[1].mass)
    assert 8 in regions[0] and 10 not in regions[0]
    # a lower rel_height widens the regions: exp(-2) = 0.135 >= 0.1
    assert spans(find_dense_regions(density_with({8: 50, 20: 50}), rel_height=0.1)) == [(6, 8, 10), (18, 20, 22)]


def test_dense_regions_prominence_and_edges() -> None:
    d = density_with({8: 100, 20: 5})
    assert spans(find_dense_regions(d, prominence=0.1)) == [(7, 8, 9)]  # the 5% bump is not a region
    assert spans(find_dense_regions(d, prominence=0.01)) == [(7, 8, 9), (19, 20, 21)]
    assert spans(find_dense_regions(density_with({0: 10, 31: 10}))) == [(0, 0, 1), (30, 31, 31)]
    assert find_dense_regions(np.zeros(32)) == []
    with pytest.raises(DeriveError, match="prominence"):
        find_dense_regions(d, prominence=2.0)
    with pytest.raises(DeriveError, match="density"):
        find_dense_regions(np.zeros((2, 3)))


def test_neighbouring_peaks_split_at_the_valley() -> None:
    regions = find_dense_regions(density_with({8: 50, 11: 50}))
    # valley at 9 (the first lowest layer between the peaks) belongs to neither region
    assert spans(regions) == [(7, 8, 8), (10, 11, 12)]
    assert place_stages(regions, 2, 32, "after") == [9, 13]


@pytest.mark.parametrize(
    "placement,n_stages,expected",
    [
        ("after", 2, [10, 22]),
        ("after", 3, [10, 16, 22]),  # fill: widest gap (10, 22) at its midpoint 16
        ("before", 3, [6, 18, 24]),  # fill: gap (18, 31) midpoint 24.5 -> the lower, 24
        ("both", 3, [6, 10, 18]),  # equal masses: the earlier region first, before-candidate first
        ("both", 4, [6, 10, 18, 22]),
    ],
)
def test_place_stages_rule(placement: str, n_stages: int, expected: list[int]) -> None:
    regions = find_dense_regions(density_with({8: 50, 20: 50}))
    assert place_stages(regions, n_stages, 32, placement) == expected


def test_place_stages_orders_by_mass_and_avoids_regions() -> None:
    regions = find_dense_regions(density_with({8: 30, 20: 70}))
    assert place_stages(regions, 1, 32, "after") == [22]  # the heavier region first
    assert place_stages(regions, 2, 32, "after") == [10, 22]
    # no regions: even bisection of 1..30 with sentinels 0 and 31
    assert place_stages([], 3, 32) == [7, 15, 23]
    # candidates outside min_layer..L-2 are skipped and filled instead
    edge = find_dense_regions(density_with({0: 10, 30: 10}))
    assert spans(edge) == [(0, 0, 1), (29, 30, 31)]
    layers = place_stages(edge, 2, 32, "after")
    assert layers[0] == 2 and all(not any(l in r for r in edge) for l in layers)
    # fill never lands inside a region
    wide = [Region(start=2, peak=15, end=28, mass=1.0, height=0.1)]
    assert place_stages(wide, 3, 32, "after") == [1, 29, 30]


def test_place_stages_errors() -> None:
    wide = [Region(start=1, peak=15, end=29, mass=1.0, height=0.1)]
    with pytest.raises(DeriveError, match="n_stages=3 does not fit"):
        place_stages(wide, 3, 32)
    with pytest.raises(DeriveError, match="placement='inside'"):
        place_stages([], 1, 32, placement="inside")
    with pytest.raises(DeriveError, match="n_stages must be an int >= 1"):
        place_stages([], 0, 32)
    with pytest.raises(DeriveError, match="min_layer=31 leaves no layer"):
        place_stages([], 1, 32, min_layer=31)


@pytest.fixture(scope="module")
def planted_result():
    return ShiftDetector().fit(planted_t2v(HALF_8_HALF_20)).result_


@pytest.mark.parametrize("convention", ["processed", "paper"])
@pytest.mark.parametrize("budget", [24, 32.5])
def test_derive_schedule_meets_budget(planted_result, convention: str, budget: int, tmp_path: Path) -> None:
    schedule = derive_schedule(planted_result, n_stages=3, budget=budget, num_vision=64, convention=convention,
                               provenance={"model": "tiny", "calibration_data": {"task": "shapes"}})
    assert schedule.layers == [10, 16, 22]
    assert abs(schedule.budget(convention=convention) - budget) <= 1.0
    counts = schedule.keep_counts()
    assert counts == sorted(counts, reverse=True) and counts[0] < 64
    prov = schedule.provenance
    assert prov["model"] == "tiny" and prov["calibration_data"] == {"task": "shapes"}
    assert prov["sample_count"] == 20 and prov["tokens_per_sample"] == 6
    assert prov["histogram"] == planted_result.histogram.tolist()
    assert prov["detector"]["algorithm"] == "binseg" and prov["detector"]["jump"] == 1
    assert [(r["start"], r["end"]) for r in prov["dense_regions"]] == [(7, 9), (19, 21)]
    assert prov["stage_layers"] == [10, 16, 22] and "rule" in prov
    # the YAML round-trips
    path = tmp_path / "schedule.yaml"
    schedule.to_yaml(path)
    back = Schedule.from_yaml(path)
    assert back.layers == schedule.layers and back.keep_counts() == counts
    assert back.provenance == prov
    assert back.budget(convention=convention) == schedule.budget(convention=convention)


def test_schedule_deriver_estimator(planted_result) -> None:
    deriver = ScheduleDeriver(n_stages=3, budget=32, placement="before").fit(planted_result)
    assert deriver.layers_ == [6, 18, 24]
    assert spans(deriver.regions_) == [(7, 8, 9), (19, 20, 21)]
    assert deriver.schedule_.layers == deriver.layers_
    assert abs(deriver.schedule_.budget() - 32) <= 1
    with pytest.raises(DeriveError, match="placement='inside'"):
        ScheduleDeriver(placement="inside")
    with pytest.raises(DeriveError, match="rel_height must be in"):
        ScheduleDeriver(rel_height=0)
    with pytest.raises(DeriveError, match="budget must be a number"):
        ScheduleDeriver(budget="64")


def test_derive_schedule_errors(planted_result) -> None:
    with pytest.raises(DeriveError, match="num_layers=40"):
        derive_schedule(planted_result, 3, 64, num_layers=40)
    with pytest.raises(DeriveError, match="convention='flops'"):
        derive_schedule(planted_result, 3, 32, convention="flops")
    with pytest.raises(DeriveError, match="num_vision=576 but the shift result was fitted on 64"):
        derive_schedule(planted_result, 3, 64, num_vision=576)
    with pytest.raises(DeriveError, match=r"budget = 10.0: unreachable .* come from the dense regions"):
        derive_schedule(planted_result, 3, 10)  # the first stage at layer 10 alone forces >= 22
    empty = ShiftDetector(algorithm="pelt", n_bkps=None, penalty=1e6).fit(planted_t2v([8, 20])).result_
    with pytest.raises(DeriveError, match="no shift layers"):
        derive_schedule(empty, 3, 32)


# ---- the entry point ---------------------------------------------------------------------------------------------
def make_store(run_dir: Path, n: int = 20, num_vision: int = 64) -> Path:
    t2v = torch.from_numpy(planted_t2v([8 if i % 2 else 20 for i in range(n)], num_vision=num_vision))
    store = RecordStore.create_or_resume(run_dir, {
        "model": {"name": "tiny-llava", "source": "random"},
        "data": {"task": "shapes", "split": "calibration"},
        "reducer": "adaptinfer",
        "num_layers": 32,
        "num_vision": num_vision,
        "versions": {"torch": torch.__version__},
    })
    for start in range(0, n, 8):
        sl = slice(start, min(n, start + 8))
        k = sl.stop - sl.start
        store.write_shard([f"q{i}" for i in range(sl.start, sl.stop)], t2v[sl],
                          {"vision_share": torch.rand(k, 32), "prior_entropy": torch.rand(k, 32)})
    return run_dir


def compose_derive(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="derive", overrides=overrides)


def test_compose_config_and_every_detector() -> None:
    cfg = compose_derive(["input=/x"])
    assert cfg.n_stages == 3 and cfg.budget == 64 and cfg.convention == "processed"
    assert cfg.rule == "search" and cfg.n_calibration == 256 and "model" not in cfg and cfg.calibration is None
    assert compose_derive(["input=/x", "model=demo", "calibration=shapes_calibration"]).model.name == "demo"
    assert cfg.detector.algorithm == "binseg" and cfg.detector.jump == 1 and cfg.detector.n_bkps == 1
    for path in sorted((CONFIGS / "detector").glob("*.yaml")):
        cfg = compose_derive(["input=/x", f"detector={path.stem}"])
        ShiftDetector(**cfg.detector)  # every detector config is valid
    with pytest.raises(DeriveError, match="input is required"):
        run_derive(compose_derive([]))


def test_run_derive_writes_schedule_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = make_store(tmp_path / "collect")
    cfg = compose_derive([f"input={records}", f"output={tmp_path / 'derive'}", "budget=32", "n_stages=2", "rule=paper"])
    out = run_derive(cfg)
    assert out == tmp_path / "derive"
    schedule = Schedule.from_yaml(out / "schedule.yaml")
    assert schedule.layers == [10, 22] and schedule.num_layers == 32 and schedule.vision_tokens == 64
    assert abs(schedule.budget(convention="processed") - 32) <= 1
    assert schedule.provenance["model"]["name"] == "tiny-llava"
    assert schedule.provenance["calibration_data"]["task"] == "shapes"
    assert schedule.provenance["sample_count"] == 20
    for png in ["t2v_heatmap.png", "t2v_grids.png", "inflection_histogram.png", "trajectories.png"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    summary = yaml.safe_load((out / "inflection.json").read_text())
    assert summary["stage_layers"] == [10, 22] and sum(summary["histogram"]) == 20 * 6
    assert str(out / "schedule.yaml") in capsys.readouterr().out


def test_run_derive_without_output_outside_hydra(tmp_path: Path) -> None:
    records = make_store(tmp_path / "collect", n=4)
    with pytest.raises(DeriveError, match="output is not set"):
        run_derive({"input": str(records), "detector": {}, "budget": 64, "n_stages": 3})
    with pytest.raises(DeriveError, match="budget is required"):
        run_derive({"input": str(records), "n_stages": 3, "output": str(tmp_path)})


def test_command_line_entry(tmp_path: Path) -> None:
    records = make_store(tmp_path / "collect", n=4)
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.derive", f"input={records}", f"hydra.run.dir={tmp_path / 'run'}",
         "plots.enabled=false", "n_stages=2", "rule=paper"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "schedule.yaml").is_file()
    assert "schedule:" in proc.stdout


def test_tiny_multirun(tmp_path: Path) -> None:
    records = make_store(tmp_path / "collect", n=4)
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.derive", "-m", f"input={records}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         "plots.enabled=false", "n_stages=2", "budget=24,32", "rule=paper"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    budgets = [Schedule.from_yaml(tmp_path / "sweep" / str(i) / "schedule.yaml").budget() for i in (0, 1)]
    assert abs(budgets[0] - 24) <= 1 and abs(budgets[1] - 32) <= 1


def test_derive_on_records_from_the_real_collector(tmp_path: Path) -> None:
    """End to end on the lead's collector: a tiny random 8-layer LLaVA, 16 vision tokens, 6 samples."""
    from analysis.collect import run_collect
    from tests.conftest import tiny_arch
    from tests.test_collect_cli import TASK
    from tests.test_prompts import tiny_processor

    processor = tmp_path / "processor"
    tiny_processor().save_pretrained(processor)
    collect_dir = run_collect({
        "model": {"name": "tiny-derive", "processor": str(processor), "seed": 0, "dtype": "float32",
                  "device": "cpu", "attn_implementation": "sdpa", "arch": tiny_arch(layers=8)},
        "data": {"name": "synthetic", "task": TASK, "split": "calibration", "limit": None},
        "n_samples": 6, "batch_size": 3, "reducer": "adaptinfer", "shard_size": 4,
        "output": str(tmp_path / "collect"), "seed": 0,
    })
    out = run_derive(compose_derive([f"input={collect_dir}", f"output={tmp_path / 'derive'}", "rule=paper",
                                     "n_stages=2", "budget=13", "detector.token_fraction=0.25"]))  # 13: reachable wherever the 2 stages land
    schedule = Schedule.from_yaml(out / "schedule.yaml")
    assert schedule.num_layers == 8 and schedule.vision_tokens == 16 and len(schedule.layers) == 2
    assert all(1 <= layer <= 6 for layer in schedule.layers)
    assert abs(schedule.budget() - 13) <= 1
    assert schedule.provenance["model"]["name"] == "tiny-derive"
    assert schedule.provenance["reducer"] == "adaptinfer" and schedule.provenance["sample_count"] == 6
    assert sum(schedule.provenance["histogram"]) == 6 * 4  # round(0.25 * 16) tokens per sample
    assert (out / "t2v_grids.png").is_file()
