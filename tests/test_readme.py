"""The README runs as written: its Python snippet, and every command of its pipeline blocks on the demo model.

Commands get the documented scale-down overrides appended (`n_samples=16` for collection, `data.limit=4` for the
benchmark, quick timing), and run in a fresh directory, so their `outputs/...` paths land there. The SLURM block
cannot run here: it is composed with Hydra's `--cfg job` instead, which checks every override and config group.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCALE_DOWN = {
    "analysis.collect": ["n_samples=16", "batch_size=8"],
    "analysis.derive": ["n_calibration=16", "search.max_candidates=4"],
    "pruning.benchmark": ["data.limit=4", "timing.warmup=0", "timing.repeats=1", "plots=false", "progress=false"],
}
LAUNCHER_ONLY = "+launcher=slurm"  # commands that need a cluster: composed, not run


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[list[str]]:
    """Every `python -m ...` line of the README's bash blocks, as argv (comments dropped)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["python", "-m"]:
                commands.append(argv)
    return commands


def sweep_jobs(argv: list[str]) -> list[list[str]]:
    """The single-job command lines of a Hydra multirun command (`-m` dropped, `key=a,b` sweeps expanded)."""
    jobs: list[list[str]] = [argv[:3]]  # python -m <module>
    for arg in argv[3:]:
        if arg in ("-m", "--multirun"):
            continue
        key, sep, value = arg.partition("=")
        if sep and "," in value and not value.startswith("["):
            jobs = [job + [f"{key}={v}"] for job in jobs for v in value.split(",")]
        else:
            jobs = [job + [arg] for job in jobs]
    return jobs


def _run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_readme_holds_the_pipeline_and_the_two_make_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    modules = [argv[2] for argv in readme_commands()]
    assert {"analysis.collect", "analysis.derive", "pruning.benchmark"} <= set(modules)


def test_the_readme_python_snippet_runs_as_written(tmp_path):
    (snippet,) = [b for b in code_blocks("python") if "PruningEngine" in b]
    proc = _run(["python", "-c", snippet], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(truth: " in proc.stdout and "vision tokens per layer: [576, 576, 576, 144, 144, 48, 48, 48]" in proc.stdout


def test_the_readme_pipeline_runs_as_written_on_the_demo_model(tmp_path):
    ran = []
    for argv in readme_commands():
        module = argv[2]
        if LAUNCHER_ONLY in argv:
            for job in sweep_jobs(argv):
                proc = _run(job + ["--cfg", "job"], tmp_path)
                assert proc.returncode == 0, f"{shlex.join(job)}\n{proc.stderr[-3000:]}"
                assert "llava-hf/llava-1.5-7b-hf" in proc.stdout
            continue
        proc = _run(argv + SCALE_DOWN.get(module, []), tmp_path)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "error:" not in proc.stderr, proc.stderr[-2000:]
        ran.append(module)
    assert ran[:4] == ["analysis.collect", "analysis.derive", "analysis.derive", "pruning.benchmark"]
    assert (tmp_path / "outputs" / "derive" / "front.json").is_file()
    assert (tmp_path / "outputs" / "derive_paper" / "schedule.yaml").is_file()
    assert json.loads((tmp_path / "outputs" / "derive3" / "front.json").read_text())["workers"] == 3  # the completion
    import pandas as pd

    table = pd.read_csv(tmp_path / "outputs" / "benchmark" / "results.csv")
    assert (table["status"] == "ok").all(), table[["method", "budget", "status", "note"]]
    derived = table[table["method"] == "adaptinfer_derived"]
    assert len(derived) == 4  # three budgets, plus the renumbered variant at 192 in a row of its own
    assert (table["model"] == "demo").all()  # the multirun, too, used the demo model
    assert set(table.loc[table["method"].isin(["adaptinfer", "fastv"]), "budget"]) == {256, 192, 160}


RESULTS = REPO / "benchmarks" / "results"
LATEST_TABLES = {"engine_overhead_cpu.md": "first", "prefill_latency_gpu.md": "first", "gpu_check_prefill.md": "all"}


def markdown_tables(text: str) -> list[str]:
    """The markdown tables of `text`, each as its lines (runs of lines that start with `|`)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def test_the_readme_performance_section_shows_the_latest_tables():
    """The section shows the newest table of each performance file (all of the GPU check's, once it has run), equal to
    the file: a results file rewritten without the README fails here."""
    text = README.read_text()
    section = text[text.index("## Performance"):]
    section = section[:section.index("\n## ", 1)]
    shown = markdown_tables(section)
    for name, which in LATEST_TABLES.items():
        if not (RESULTS / name).exists():
            assert which == "all", f"benchmarks/results/{name} is missing"  # the GPU check's, until a GPU runs it
            continue
        tables = markdown_tables((RESULTS / name).read_text())
        for table in tables if which == "all" else tables[:1]:
            assert table in shown, f"README's performance section lacks this table of benchmarks/results/{name}: " \
                                   f"copy it there\n{table}"
