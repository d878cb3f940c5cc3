"""benchmarks/gpu_check.sh runs end to end on the CPU (DRY_RUN=1, tiny model), so a lent GPU gets it working."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, compile: bool, **extra: str) -> str:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "COMPILE": str(int(compile)),
           **extra}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp_path / "gpu_check_prefill.md").read_text()


def test_gpu_check_dry_run_writes_its_eager_table(tmp_path):
    """The eager parts, with the compiled ones skipped by the time budget (estimated at 10000 s a graph): the table
    says why they have no rows, and the parts after them still run."""
    table = _dry_run(tmp_path, compile=True, GRAPH_S="10000")
    for variant in ("unpruned", "adaptinfer_7b_64", "adaptinfer_7b_128", "keep-all"):
        assert f"| tiny | sdpa | 1 | eager | {variant}" in table
        assert f"| qwen2-vl-tiny | sdpa | 1 | eager | {variant}" in table  # the Qwen2.5-VL-7B part, on a tiny Qwen
    assert "| tiny | sdpa | 2 | eager |" in table and "| compiled |" not in table
    for part in ("gpu_check_compiled_b1", "gpu_check_compiled_big"):
        assert f"## {part}\n\nskipped: " in table and "needs about" in table
    assert "| qwen2-vl-tiny | sdpa | 2 | eager | unpruned | 576.0 |" in table  # one 24 x 24 image per row


@pytest.mark.slow
def test_gpu_check_dry_run_with_compiled_rows(tmp_path):
    """The whole script, compiled part included (a few minutes of compiling on a CPU)."""
    table = _dry_run(tmp_path, compile=True)
    for variant in ("unpruned", "adaptinfer_7b_64", "adaptinfer_7b_128", "keep-all"):
        assert f"| eager | {variant}" in table
    for variant in ("unpruned", "adaptinfer_7b_64", "adaptinfer_7b_128", "keep-all"):
        assert f"| tiny | sdpa | 1 | compiled | {variant}" in table  # batch 1: every variant compiled, none fell back
    compiled_rows = [line for line in table.splitlines() if "| compiled |" in line]
    assert compiled_rows and all(line.endswith(", 100% |") for line in compiled_rows)  # same next token as eager
    assert "| tiny | sdpa | 2 | compiled | adaptinfer_7b_64" in table  # the large batch: unpruned and "64"
    assert "| tiny | sdpa | 2 | eager |" in table
