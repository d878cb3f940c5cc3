"""The benchmark runner: methods from its config, rows per run, no duplicates on rerun, Hydra multirun
(basic launcher in process, submitit's local executor in subprocesses) and the launcher configs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pruning import results as res
from pruning.benchmark import BenchmarkError, methods_from_config, run_benchmark
from tests.bench_fixtures import CONFIGS, TOY_TASK, save_processor, tiny_model_cfg, toy_data_cfg, write_front


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
               plots=False, progress=False)
    cfg.update(extra)
    return cfg


# -- methods ----------------------------------------------------------------------------------------------------
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
    # the processed budget also as a fraction of each sample's vision tokens (576 for every image here)
    assert ((table["budget_fraction"] - table["budget_processed"] / 576).abs() < 1e-9).all()
    assert set(table["budget_unit"]) == {"tokens"}
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
    assert "allowed range 144..576" in table["note"].iloc[0]  # layers 0-1 of 8 see all 576


REPO = Path(__file__).resolve().parents[1]
# Imports tests.bench_fixtures (registering the toy task) in every process that runs a job.
TOY_CALLBACK = "+hydra.callbacks.toy._target_=tests.bench_fixtures.RegisterToyTask"


def test_a_preset_for_another_model_is_an_error_and_writes_nothing(processor_dir, tmp_path):
    out = tmp_path / "results"
    cfg = bench_cfg(processor_dir, out, ["adaptinfer_preset"], [64], baseline=False, limit=2)
    with pytest.raises(BenchmarkError, match=r"adaptinfer_7b_64\.yaml.*32-layer model"):
        run_benchmark(cfg)  # the 7B preset (32 layers) on the 8-layer tiny model
    assert not out.exists()


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


# -- invalid is an error, infeasible is a row that never blocks ------------------------------------------------------
GOOD_SCHEDULE = "num_layers: 8\nvision_tokens: 576\nstages:\n- {layer: 0, keep: 300}\n- {layer: 3, keep: 100}\n"
BAD_SCHEDULES = {
    "layers not increasing": ("stages:\n- {layer: 3, keep: 300}\n- {layer: 1, keep: 100}\n", "strictly increasing"),
    "keep above the tokens present": ("stages:\n- {layer: 0, keep: 600}\n", "larger than the 576 vision tokens"),
    "negative keep": ("stages:\n- {layer: 0, keep: -5}\n", "keep = -5"),
    "fraction above 1": ("stages:\n- {layer: 0, keep: 1.5}\n", "fraction must lie in"),
    "layer past the model": ("stages:\n- {layer: 9, keep: 100}\n", "stages\\[0\\].layer = 9"),
    "missing key": ("stages:\n- {layer: 0}\n", "missing keys \\['keep'\\]"),
    "wrong type": ("stages:\n- {layer: zero, keep: 100}\n", "must be an int"),
    "unknown key": ("stages:\n- {layer: 0, keep: 100, drop: 1}\n", "unknown keys \\['drop'\\]"),
    "YAML syntax": ("stages: [ {layer: 0, keep: 100\n", "invalid YAML at line"),
    "empty file": ("", "is empty"),
    "another model": ("num_layers: 32\nstages:\n- {layer: 1, keep: 100}\n", "32-layer model"),
}


@pytest.mark.parametrize("what", sorted(BAD_SCHEDULES))
def test_an_invalid_schedule_file_is_an_error_naming_file_and_field_and_writes_nothing(what, processor_dir, tmp_path):
    text, message = BAD_SCHEDULES[what]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "results"
    cfg = bench_cfg(processor_dir, out, ["adaptinfer_derived"], [150], limit=2,
                    method_overrides={"adaptinfer_derived": {"schedule_path": str(path)}})
    with pytest.raises(BenchmarkError, match=message) as err:
        run_benchmark(cfg)
    assert str(path) in str(err.value) and "adaptinfer_derived" in str(err.value)
    assert not out.exists()  # no row, no config, no summary


def test_an_infeasible_row_never_blocks_a_later_run_that_can_compute_it(processor_dir, tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text("num_layers: 8\nvision_tokens: 576\nstages:\n- {layer: 5, keep: 10}\n")  # >= 432 processed
    overrides = {"adaptinfer_derived": {"schedule_path": str(path)}}
    cfg = bench_cfg(processor_dir, tmp_path, ["adaptinfer_derived"], [150], limit=2, baseline=False,
                    method_overrides=overrides)
    table = res.read_table(run_benchmark(cfg))
    assert list(table["status"]) == [res.STATUS_INFEASIBLE]
    path.write_text(GOOD_SCHEDULE)  # the user fixes the file (stage layers that reach 150)
    table = res.read_table(run_benchmark(cfg))
    ok = table[table["status"] == res.STATUS_OK]
    assert len(ok) == 1 and ok["schedule"].iloc[0].startswith("0:") and ok["accuracy"].notna().all()
    # rerunning the infeasible variant does not drop the computed row, and it is never reported as 'already in'
    assert res.has_row(table, ok.iloc[0].to_dict())


@pytest.mark.parametrize("override", [
    {"positions": "renumber"},
    {"scorer_options": {"text_weight_blend": 0.0}},
])
def test_variants_of_a_method_get_their_own_rows(override, processor_dir, tmp_path):
    cfg = bench_cfg(processor_dir, tmp_path, ["adaptinfer"], [150], limit=2, convention="processed")
    run_benchmark(cfg)
    run_benchmark({**cfg, "method_overrides": {"adaptinfer": override}})
    table = res.read_table(tmp_path)
    rows = table[table["method"] == "adaptinfer"]
    assert len(rows) == 2 and rows["variant_id"].nunique() == 2
    assert sorted(rows["variant"].fillna("")) == ["", " ".join(
        f"{k}={v}" if not isinstance(v, dict) else " ".join(f"{k}.{a}={b}" for a, b in v.items())
        for k, v in override.items())]
    summary = (tmp_path / "summary.md").read_text()
    assert "adaptinfer [" in summary  # the variant is labelled apart
    variant_stamp = rows.loc[rows["variant"].fillna("") != "", "timestamp"].iloc[0]
    run_benchmark({**cfg, "rerun": True})  # a rerun of the stock variant replaces only its own row
    again = res.read_table(tmp_path)
    again = again[again["method"] == "adaptinfer"]
    assert len(again) == 2
    assert again.loc[again["variant"].fillna("") != "", "timestamp"].iloc[0] == variant_stamp


def test_model_settings_are_part_of_the_identity(processor_dir, tmp_path):
    cfg = bench_cfg(processor_dir, tmp_path, ["fastv"], [150], limit=2, convention="processed")
    run_benchmark(cfg)
    other = {**cfg, "model": {**cfg["model"], "attn_implementation": "eager"}}
    run_benchmark(other)
    table = res.read_table(tmp_path)
    assert len(table) == 4 and table["setup_id"].nunique() == 2  # baseline + fastv for each attention implementation
    for _, rows in table.groupby("setup_id"):  # each setup has its own baseline, and retention uses it
        assert sorted(rows["method"]) == ["fastv", "unpruned"]
        base = res.find_baseline(table, rows.iloc[0].to_dict())
        assert base is not None and base["setup_id"] == rows["setup_id"].iloc[0]
    assert {"attn=sdpa" in s for s in table["model_settings"]} == {True, False}


def test_non_finite_logits_stop_the_run_naming_the_model(processor_dir, tmp_path, monkeypatch):
    import torch

    from pruning import runner
    from vlm import models

    real = models.build_random_model

    def corrupted(*args, **kwargs):
        loaded = real(*args, **kwargs)
        with torch.no_grad():
            loaded.model.model.language_model.norm.weight.fill_(float("nan"))
        return loaded

    monkeypatch.setattr(models, "build_random_model", corrupted)
    out = tmp_path / "results"
    cfg = bench_cfg(processor_dir, out, ["fastv"], [150], limit=2)
    with pytest.raises(runner.RunnerError, match="'tiny'.*non-finite logits"):
        run_benchmark(cfg)
    assert not out.exists()


@pytest.mark.parametrize("budgets, message", [
    ("abc", "'abc' is not a number"), (["abc"], "'abc' is not a number"), ([], "names no budget"),
    ([-4], "-4 is not a number"),
])
def test_bad_budgets_are_refused(budgets, message):
    from pruning.benchmark import budgets_from_config

    with pytest.raises(BenchmarkError, match=message):
        budgets_from_config({"budgets": budgets})


def test_results_dir_that_is_a_file_is_refused(processor_dir, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    with pytest.raises(BenchmarkError, match="is a file"):
        run_benchmark(bench_cfg(processor_dir, target, ["fastv"], [150], limit=2))
    assert target.read_text() == "not a directory"


def test_unknown_scorer_option_is_refused_before_anything_runs(processor_dir, tmp_path):
    out = tmp_path / "results"
    cfg = bench_cfg(processor_dir, out, ["adaptinfer"], [150], limit=2,
                    method_overrides={"adaptinfer": {"scorer_options": {"text_weight_blnd": 0.0}}})
    with pytest.raises(BenchmarkError, match=r"text_weight_blnd.*text_weight_blend"):
        run_benchmark(cfg)
    assert not out.exists()


def test_a_searched_front_gives_each_budget_its_own_schedule_and_scorer_options(processor_dir, tmp_path):
    """schedule_path may be a derive output directory with a front (rule=search): each budget runs its own searched
    schedule with the scorer options it was searched with, under one label."""
    front_dir = write_front(tmp_path / "front", [(192, [0, 2], 0.5), (160, [0, 3], 0.0)])
    overrides = {"adaptinfer_derived": {"schedule_path": str(front_dir)}}
    cfg = bench_cfg(processor_dir, tmp_path / "r", ["adaptinfer_derived"], [192, 160], limit=2, baseline=False,
                    convention="processed", method_overrides=overrides)
    table = res.read_table(run_benchmark(cfg)).sort_values("budget", ascending=False)
    assert [s.split(",")[0].split(":")[0] for s in table["schedule"]] == ["0", "0"]
    assert list(table["schedule"].str.count(",")) == [1, 1]
    assert table["schedule"].iloc[0].split(",")[1].startswith("2:") and table["schedule"].iloc[1].split(",")[1].startswith("3:")
    assert table["variant"].nunique() == 1 and table["variant_id"].nunique() == 2  # one label, two identities
    from pruning.benchmark import methods_from_config, plan_runs
    from vlm.models import load_from_config

    loaded = load_from_config(cfg["model"])
    runs = plan_runs(methods_from_config(cfg), [192, 160], loaded, "processed", baseline=False)
    assert [r.method["scorer_options"] for r in runs] == [{"text_weight_blend": 0.5}, {"text_weight_blend": 0.0}]
    pinned = plan_runs(methods_from_config({**cfg, "method_overrides": {"adaptinfer_derived": {
        "schedule_path": str(front_dir), "scorer_options": {"text_weight_blend": 1.0}}}}), [160], loaded, "processed",
        baseline=False)
    assert pinned[0].method["scorer_options"] == {"text_weight_blend": 1.0}  # options set on the method win
    with pytest.raises(BenchmarkError, match=r"holds schedules for budgets \['160 \(processed\)', '192 \(processed\)'\]"):
        run_benchmark({**cfg, "budgets": [128], "results_dir": str(tmp_path / "other")})
    assert not (tmp_path / "other").exists()
