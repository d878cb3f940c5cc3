"""Both notebooks execute (nbclient) on the outputs of a tiny run made here, and are stored without outputs."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from tests.bench_fixtures import CONFIGS, save_processor, tiny_model_cfg, toy_data_cfg

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_two_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"attention_shift.ipynb", "pruning_tradeoffs.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny collect run and a tiny benchmark table (random-weight model, toy shapes task)."""
    from analysis.collect import run_collect
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pruning.benchmark import run_benchmark

    root = tmp_path_factory.mktemp("tiny_run")
    model = tiny_model_cfg(save_processor(root / "processor"))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        collect = OmegaConf.to_container(compose(config_name="collect", overrides=["data=pope"]), resolve=True)
        bench = OmegaConf.to_container(compose(config_name="benchmark", overrides=["data=pope"]), resolve=True)
    collect.update(model=model, data=toy_data_cfg(None, "calibration"), n_samples=6, batch_size=3,
                   output=str(root / "records"))
    records = run_collect(collect)
    bench.update(model=model, data=toy_data_cfg(2), methods=["adaptinfer", "visionzip"], budgets=[192, 128],
                 convention="paper", results_dir=str(root / "bench"), batch_size=2, plots=False, progress=False,
                 timing={"batch_size": 1, "warmup": 0, "repeats": 1})
    results = run_benchmark(bench)
    return {"records": records, "results": results, "figures": root / "figures"}


def _execute(path: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_attention_shift_notebook_runs_on_tiny_records(tiny_run):
    figures = tiny_run["figures"] / "shift"
    nb = _execute(REPO / "notebooks" / "attention_shift.ipynb", {
        "ADAPTINFER_RECORDS": str(tiny_run["records"]), "ADAPTINFER_SCHEDULE": "", "ADAPTINFER_BUDGET": "128",
        "ADAPTINFER_CONVENTION": "paper", "ADAPTINFER_FIGURES": str(figures)})
    text = _text(nb)
    assert "6 samples, 8 decoder layers, 576 vision tokens" in text
    assert {"t2v_heatmap.png", "inflection_histogram.png", "trajectories.png"} <= {p.name for p in figures.iterdir()}


def test_pruning_tradeoffs_notebook_runs_on_a_tiny_table(tiny_run):
    figures = tiny_run["figures"] / "tradeoffs"
    nb = _execute(REPO / "notebooks" / "pruning_tradeoffs.ipynb", {
        "ADAPTINFER_RESULTS": str(tiny_run["results"]), "ADAPTINFER_FIGURES": str(figures)})
    text = _text(nb)
    rankings = [l for l in text.splitlines() if l.startswith("toy_shapes @ processed")]
    # paper budgets 192 and 128 cost AdaptInfer 250 and 192 processed tokens per layer, VisionZip 192 and 128:
    # ranked by cost, that is three rankings (by paper budget it would be two, each with both methods)
    assert len(rankings) == 3, rankings
    assert [l.split(":")[0] for l in rankings] == [f"toy_shapes @ processed {b}" for b in (250, 192, 128)]
    assert "visionzip" not in rankings[0] and "adaptinfer" not in rankings[2]
    names = {p.name for p in figures.iterdir()}
    assert "retention_vs_budget.png" in names and any(n.endswith("accuracy_vs_tflops.png") for n in names)
