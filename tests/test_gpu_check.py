"""benchmarks/gpu_check.sh runs end to end on the CPU (DRY_RUN=1, tiny model), so a lent GPU gets it working."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_table(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "gpu_check_prefill.md").read_text()
    for variant in ("unpruned", "adaptinfer_7b_64", "adaptinfer_7b_128", "keep-all"):
        assert f"| {variant}" in table
    assert "| tiny | sdpa | 2 |" in table
