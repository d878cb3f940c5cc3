"""The results table: keyed upsert (no duplicates), retention from the unpruned row, summary and plots."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from pruning import results as res


def _row(method: str, budget: float, accuracy: float, **extra) -> dict:
    row = {"model": "m", "task": "t", "split": "test", "limit": 8, "setup_id": "s1",
           "convention": "" if method == "unpruned" else "processed", "method": method, "budget": budget,
           "variant_id": f"v-{method}", "status": res.STATUS_OK, "accuracy": accuracy, "prefill_ms": 10.0,
           "budget_processed": budget, "tflops": 0.5 if method == "unpruned" else 0.1 * budget / 64,
           "metric_score": accuracy}
    row.update(extra)
    return row


def test_upsert_replaces_rows_with_the_same_key(tmp_path):
    res.upsert_rows(tmp_path, [_row("unpruned", 576, 0.8), _row("fastv", 64, 0.4)])
    table = res.upsert_rows(tmp_path, [_row("fastv", 64.0, 0.6)])  # same key: 64 == 64.0
    assert len(table) == 2
    assert float(table.loc[table["method"] == "fastv", "accuracy"].iloc[0]) == pytest.approx(0.6)
    table = res.upsert_rows(tmp_path, [_row("fastv", 128, 0.7)])  # new key
    assert len(res.read_table(tmp_path)) == 3


def test_limit_none_and_nan_are_one_key(tmp_path):
    res.upsert_rows(tmp_path, [_row("fastv", 64, 0.4, limit=None)])
    table = res.upsert_rows(tmp_path, [_row("fastv", 64, 0.5, limit=float("nan"))])
    assert len(table) == 1


def test_retention_is_relative_to_the_unpruned_row_of_the_same_group(tmp_path):
    res.upsert_rows(tmp_path, [_row("unpruned", 576, 0.8), _row("adaptinfer", 64, 0.6),
                               _row("adaptinfer", 64, 0.5, task="other")])
    table = res.read_table(tmp_path)
    ret = dict(zip(table["task"] + "/" + table["method"], table["retention"]))
    assert ret["t/adaptinfer"] == pytest.approx(0.75)
    assert ret["t/unpruned"] == pytest.approx(1.0)
    assert math.isnan(ret["other/adaptinfer"])  # no baseline for that task
    # a new baseline changes every retention of its group
    table = res.upsert_rows(tmp_path, [_row("unpruned", 576, 0.6)])
    assert float(table.loc[(table["task"] == "t") & (table["method"] == "adaptinfer"), "retention"].iloc[0]) == 1.0


def test_rows_without_key_columns_are_refused(tmp_path):
    with pytest.raises(res.ResultsError, match="key columns"):
        res.upsert_rows(tmp_path, [{"method": "fastv", "budget": 64}])


def test_has_row_and_find_baseline(tmp_path):
    table = res.upsert_rows(tmp_path, [_row("unpruned", 576, 0.8), _row("fastv", 64, 0.4)])
    key = {k: v for k, v in _row("fastv", 64, 0).items() if k in res.KEY_COLUMNS}
    assert res.has_row(table, key)
    assert not res.has_row(table, {**key, "budget": 128})
    group = {"model": "m", "task": "t", "split": "test", "limit": 8, "setup_id": "s1"}
    assert float(res.find_baseline(table, group)["accuracy"]) == 0.8
    assert res.find_baseline(table, {**group, "limit": 9}) is None
    assert res.find_baseline(table, {**group, "setup_id": "s2"}) is None  # another model setup: another baseline
    infeasible = {**_row("fastv", 32, float("nan")), "status": res.STATUS_INFEASIBLE}
    table = res.upsert_rows(tmp_path, [infeasible])
    assert not res.has_row(table, infeasible)  # an infeasible row never counts as done


def test_summary_pivots_method_by_budget(tmp_path):
    rows = [_row("unpruned", 576, 0.8)]
    rows += [_row(m, b, a) for m, b, a in [("adaptinfer", 128, 0.78), ("adaptinfer", 64, 0.7), ("fastv", 128, 0.6)]]
    rows.append({**_row("fastv", 64, float("nan")), "status": res.STATUS_INFEASIBLE, "note": "allowed range 72..576"})
    table = res.upsert_rows(tmp_path, rows)
    text = res.write_summary(tmp_path, table).read_text()
    assert "| method \\ processed budget | 128 | 64 |" in text
    assert "| adaptinfer | 0.7800 | 0.7000 |" in text
    assert "| fastv | 0.6000 | — |" in text
    assert "fastv at 64 (processed): allowed range 72..576" in text
    assert "Unpruned: accuracy 0.8000" in text
    assert "- processed budget 128: adaptinfer 0.7800, fastv 0.6000; retention >= 95%: adaptinfer" in text
    assert "- processed budget 64: adaptinfer 0.7000; retention >= 95%: none" in text


def test_rankings_compare_runs_at_equal_processed_budget_whatever_the_convention(tmp_path):
    """Two runs at paper budget 64 that cost 128 and 64 processed tokens per layer are not ranked together."""
    rows = [_row("unpruned", 576, 0.8),
            _row("adaptinfer", 64, 0.75, convention="paper", budget_processed=128.0),
            _row("visionzip", 64, 0.6, convention="paper", budget_processed=64.0),
            _row("fastv", 128, 0.7, budget_processed=128.4)]
    text = res.summary_markdown(res.upsert_rows(tmp_path, rows))
    assert "- processed budget 128 (128.0-128.4): adaptinfer 0.7500, fastv 0.7000" in text
    assert "- processed budget 64: visionzip 0.6000" in text
    assert "are not equal cost" in text  # the paper-convention section says so


def test_variants_are_labelled_apart_in_the_summary(tmp_path):
    rows = [_row("unpruned", 576, 0.8), _row("adaptinfer", 128, 0.7),
            _row("adaptinfer", 128, 0.72, variant_id="v2", variant="positions=renumber")]
    table = res.upsert_rows(tmp_path, rows)
    assert len(table) == 3
    text = res.summary_markdown(table)
    assert "| adaptinfer | 0.7000 |" in text and "| adaptinfer [positions=renumber] | 0.7200 |" in text


def test_plots_are_written_per_group(tmp_path):
    rows = [_row("unpruned", 576, 0.8), _row("adaptinfer", 128, 0.78), _row("adaptinfer", 64, 0.7)]
    table = res.upsert_rows(tmp_path, rows)
    paths = res.plot_tradeoffs(table, tmp_path / "plots")
    assert sorted(p.name.split("_", 5)[-1] for p in paths) == [
        "accuracy_vs_budget.png", "accuracy_vs_tflops.png", "latency_vs_budget.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_markdown_table_shows_nan_as_dash():
    frame = pd.DataFrame({"64": [0.5, float("nan")]}, index=["a", "b"])
    assert res.markdown_table(frame, 2).splitlines()[-1] == "| b | — |"
