"""The benchmark runner: method schedules at a budget, rows per run, no duplicates on rerun, Hydra multirun
(basic launcher in process, submitit's local executor in subprocesses) and the launcher configs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pruning import results as res
from pruning.benchmark import (BenchmarkError, check_method, load_method, method_schedule, methods_from_config,
                               run_benchmark, scale_layers)
from pruning.schedule import ScheduleError
from tests.bench_fixtures import CONFIGS, TOY_TASK, save_processor, tiny_model_cfg, toy_data_cfg

METHOD_NAMES = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    return save_processor(tmp_path_factory.mktemp("processor"))


def bench_cfg(processor_dir: Path, results_dir: Path, methods, budgets, limit: int = 3, **extra) -> dict:
    """A composed benchmark config on the tiny model and the toy task, sized for a test."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["data=pope"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(model=tiny_model_cfg(processor_dir), data=toy_data_cfg(limit), methods=methods, budgets=budgets,
               results_dir=str(results_dir), batch_size=2, timing={"batch_size": 1, "warmup": 0, "repeats": 1},
               plots=False, progress=False, **extra)
    return cfg


# -- schedules --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, depth, ref, expected", [
    ([1, 10, 20], 32, 32, [1, 10, 20]),
    ([1, 10, 20], 8, 32, [0, 3, 5]),
    ([2, 6, 15], 8, 32, [1, 2, 4]),
    ([8, 16, 24], 8, 32, [2, 4, 6]),
    ([1, 2, 3], 4, 32, [0, 1, 2]),  # collisions are pushed up, not merged
    ([-1], 8, None, [-1]),
    ([1, 10, 20], 40, 32, [1, 13, 25]),
])
def test_scale_layers(layers, depth, ref, expected):
    assert scale_layers(layers, depth, ref) == expected


def test_scale_layers_refuses_a_model_too_shallow():
    with pytest.raises(BenchmarkError, match="do not fit a 3-layer model"):
        scale_layers([1, 10, 20], 3, 32)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_config_is_valid(name):
    method = load_method(name)
    if method["schedule"] == "derived":
        with pytest.raises(BenchmarkError, match="needs `schedule_path`"):
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
    with pytest.raises(BenchmarkError, match="schedule_path"):
        method_schedule({**method, "schedule_path": str(tmp_path / "missing.yaml")}, 8, 576, 64, "paper")


def test_methods_from_config_applies_overrides_and_checks_names():
    cfg = {"methods": ["adaptinfer_derived", "fastv"], "method": {},
           "method_overrides": {"adaptinfer_derived": {"schedule_path": "x.yaml"}}}
    methods = methods_from_config(cfg)
    assert [m["name"] for m in methods] == ["adaptinfer_derived", "fastv"]
    assert methods[0]["schedule_path"] == "x.yaml"
    with pytest.raises(BenchmarkError, match="unknown method 'nope'"):
        methods_from_config({"methods": ["nope"]})
    with pytest.raises(BenchmarkError, match="needs `schedule_path`"):
        methods_from_config({"methods": ["adaptinfer_derived"]})


# -- runs -------------------------------------------------------------------------------------------------------
def test_run_writes_one_row_per_run_and_rerun_does_not_duplicate(processor_dir, tmp_path):
    cfg = bench_cfg(processor_dir, tmp_path, ["adaptinfer", "visionzip"], [192, 64], convention="paper")
    out = run_benchmark(cfg)
    table = res.read_table(out)
    # unpruned + adaptinfer x 2 + visionzip x 2
    assert sorted(zip(table["method"], table["budget"])) == [
        ("adaptinfer", 64), ("adaptinfer", 192), ("unpruned", 576), ("visionzip", 64), ("visionzip", 192)]
    assert set(table["status"]) == {res.STATUS_OK}
    for col in ("task", "method", "budget", "accuracy", "retention", "prefill_ms", "generate_ms", "tflops",
                "peak_mem_mb", "budget_processed", "budget_paper", "schedule", "vision_per_layer", "metric_score"):
        assert col in table.columns, col
    pruned = table[table["method"] != "unpruned"]
    assert (abs(pruned["budget_paper"] - pruned["budget"]) <= 1.0).all()
    unpruned_tflops = float(table.loc[table["method"] == "unpruned", "tflops"].iloc[0])
    assert (pruned["tflops"] < unpruned_tflops).all()
    vz64 = table[(table["method"] == "visionzip") & (table["budget"] == 64)].iloc[0]
    assert vz64["vision_per_layer"] == " ".join(["64"] * 8)
    assert (table["task"] == TOY_TASK).all() and (table["n_samples"] == 3).all()
    assert (out / "summary.md").is_file() and (out / "config.yaml").is_file()
    stamps = dict(zip(table["method"] + table["budget"].astype(str), table["timestamp"]))

    run_benchmark(cfg)  # everything is there: nothing reruns, nothing duplicates
    again = res.read_table(out)
    assert len(again) == 5
    assert dict(zip(again["method"] + again["budget"].astype(str), again["timestamp"])) == stamps

    cfg2 = bench_cfg(processor_dir, tmp_path, ["fastv"], [192], convention="paper")
    run_benchmark(cfg2)  # a new method joins the table; the baseline is reused, not rerun
    third = res.read_table(out)
    assert len(third) == 6
    assert third.loc[third["method"] == "unpruned", "timestamp"].iloc[0] == stamps["unpruned576"]


def test_infeasible_budget_gives_an_infeasible_row(processor_dir, tmp_path):
    cfg = bench_cfg(processor_dir, tmp_path, ["pyramiddrop"], [64], baseline=False, limit=2)
    table = res.read_table(run_benchmark(cfg))
    assert list(table["status"]) == [res.STATUS_INFEASIBLE]
    assert "allowed range 216..576" in table["note"].iloc[0]


REPO = Path(__file__).resolve().parents[1]
# Imports tests.bench_fixtures (registering the toy task) in every process that runs a job.
TOY_CALLBACK = "+hydra.callbacks.toy._target_=tests.bench_fixtures.RegisterToyTask"


def test_a_preset_for_another_model_gives_an_infeasible_row(processor_dir, tmp_path):
    cfg = bench_cfg(processor_dir, tmp_path, ["adaptinfer_preset"], [64], baseline=False, limit=2)
    table = res.read_table(run_benchmark(cfg))  # the 7B preset (32 layers) on the 8-layer tiny model
    assert list(table["status"]) == [res.STATUS_INFEASIBLE]
    assert "32-layer model" in table["note"].iloc[0]


def _run_hydra_main(argv: list[str]) -> None:
    """`python -m pruning.benchmark ARGS` from the repository root, as a user runs it."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pruning.benchmark", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _multirun_args(processor_dir: Path, results_dir: Path) -> list[str]:
    return [
        "-m", "model=tiny", f"model.processor={processor_dir}", "model.device=cpu",
        "data=pope", f"++data.task={TOY_TASK}", "++data.split=test", "++data.limit=2",
        "method=fastv,visionzip", "budgets=128", "convention=paper", "batch_size=2",
        "timing.warmup=0", "timing.repeats=1", "plots=false", "progress=false", f"results_dir={results_dir}",
        TOY_CALLBACK,
    ]


def test_multirun_writes_one_row_per_job_into_one_table(processor_dir, tmp_path):
    results_dir = tmp_path / "results"
    args = _multirun_args(processor_dir, results_dir)
    _run_hydra_main(args)
    table = res.read_table(results_dir)
    assert sorted(table["method"]) == ["fastv", "unpruned", "visionzip"]
    _run_hydra_main(args)  # the whole sweep again: no duplicates
    assert len(res.read_table(results_dir)) == 3
    assert len(list((results_dir / "configs").glob("*.yaml"))) == 2  # one resolved config per job


def test_multirun_through_submitit_local_executor(processor_dir, tmp_path):
    """The SLURM path with submitit's local executor: each job a subprocess, one shared table."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    results_dir = tmp_path / "results"
    args = _multirun_args(processor_dir, results_dir) + [
        "+launcher=local",
        "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
    ]
    _run_hydra_main(args)
    table = res.read_table(results_dir)
    assert sorted(table["method"]) == ["fastv", "unpruned", "visionzip"]
    assert (table["status"] == res.STATUS_OK).all()


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_configs_compose(launcher, target):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["data=pope", f"+launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition
