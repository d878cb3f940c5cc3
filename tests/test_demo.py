"""`make demo` (pipeline.demo): the pipeline on a toy scale (fast), and the real thing end to end (slow)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import demo
from pruning import results as res
from tests.bench_fixtures import save_processor, tiny_model_cfg, toy_data_cfg

REPO = Path(__file__).resolve().parents[1]
METHODS = {"unpruned", "adaptinfer_derived", "adaptinfer", "fastv", "sparsevlm", "sparsevlm_recycle", "pyramiddrop", "dart",
           "visionzip", "divprune", "cdpruner", "vispruner", "pooling", "random"}


def _check_table(out: Path, n_samples: int) -> "res.pd.DataFrame":
    table = res.read_table(out)
    assert set(demo.DEMO_COLUMNS) <= set(table.columns)
    assert set(table["method"]) <= METHODS and METHODS - {"adaptinfer_derived"} <= set(table["method"])
    pruned = table[table["method"] != "unpruned"]
    assert set(pruned["budget"].astype(int)) == {256, 192, 160}
    ok = table[table["status"] == res.STATUS_OK]
    assert (ok["n_samples"] == n_samples).all()
    # every method ran (none infeasible) and was compared at equal processed budget, within one token
    assert (table["status"] == res.STATUS_OK).all()
    ok_pruned = ok[ok["method"] != "unpruned"]
    assert (ok_pruned["convention"] == "processed").all()
    assert ((ok_pruned["budget_processed"] - ok_pruned["budget"]).abs() <= 1.0).all()
    return table


def test_demo_pipeline_on_a_toy_scale_and_resume(tmp_path, capsys):
    model = tiny_model_cfg(save_processor(tmp_path / "processor"))
    kwargs = dict(calibration_samples=6, test_limit=2, model=model,
                  calibration_data=toy_data_cfg(None, "calibration"), test_data=toy_data_cfg(2, "test"),
                  benchmark_overrides=["batch_size=2", "timing.warmup=0", "timing.repeats=1", "progress=false"])
    path = demo.run_demo(tmp_path / "demo", **kwargs)
    assert path == tmp_path / "demo" / res.RESULTS_NAME
    printed = capsys.readouterr().out
    assert "### Accuracy" in printed and "plots:" in printed
    assert "Ranking by accuracy at equal processed budget" in printed
    for budget in (256, 192, 160):  # every method ranked at each of the demo's costs
        line = next(l for l in printed.splitlines() if l.startswith(f"- processed budget {budget}"))
        assert all(m in line for m in METHODS - {"unpruned", "adaptinfer_derived"}), line
    table = _check_table(tmp_path / "demo", 2)
    stamps = sorted(table["timestamp"].astype(str))

    t0 = time.perf_counter()
    demo.run_demo(tmp_path / "demo", **kwargs)  # resumes: nothing is recomputed
    assert sorted(res.read_table(tmp_path / "demo")["timestamp"].astype(str)) == stamps
    assert "reusing" in capsys.readouterr().out or "adaptinfer_derived" not in set(table["method"])
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow
def test_make_demo_end_to_end_under_15_minutes(tmp_path):
    """`python -m pipeline.demo` as `make demo` runs it, on whichever model is present, within 15 minutes."""
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=20 * 60)
    minutes = (time.perf_counter() - t0) / 60
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert minutes < 15, f"the demo took {minutes:.1f} minutes"
    assert "### Accuracy" in proc.stdout and str(out / res.RESULTS_NAME) in proc.stdout
    _check_table(out, demo.TEST_LIMIT)
