"""The command lines as a user meets them: a known user error is one line and exit 2 with nothing written (the
traceback only with HYDRA_FULL_ERROR=1), and Ctrl-C is one line, exit 130, and a rerun resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlm.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, INTERRUPTED_MESSAGE

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env or ENV)


def test_a_user_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
    proc = _run(["pruning.benchmark", "methods=[adaptinfer_derived]", "results_dir=r"], tmp_path)
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "schedule=derived needs `schedule_path`" in line
    assert "+method_overrides.adaptinfer_derived.schedule_path=PATH" in line  # a suggestion that works (below)
    assert not (tmp_path / "r").exists() and not any(tmp_path.iterdir())


def test_the_suggested_override_is_accepted_by_hydra(tmp_path):
    proc = _run(["pruning.benchmark", "methods=[adaptinfer_derived]",
                 "+method_overrides.adaptinfer_derived.schedule_path=s.yaml", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schedule_path: s.yaml" in proc.stdout


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    proc = _run(["analysis.derive", "input=nowhere", "budget=abc"], tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DeriveError" in proc.stderr


def test_ctrl_c_prints_one_line_and_a_rerun_resumes(tmp_path):
    args = ["analysis.collect", "n_samples=48", "batch_size=4", "shard_size=4", "output=calib"]
    for attempt in range(3):  # a run that ended before the interrupt reached it (a starved test process) is retried
        workdir = tmp_path / f"attempt{attempt}"
        workdir.mkdir()
        # SIGINT restored to its default in the child: a test run started in the background (`cmd &` in a script) has
        # it ignored, and Python then never installs its Ctrl-C handler
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=workdir, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        manifest = workdir / "calib" / "manifest.json"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # interrupt once a shard is stored
            if manifest.exists() and json.loads(manifest.read_text()).get("shards"):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert INTERRUPTED_MESSAGE in err and "Traceback" not in err
    stored = sum(s["num_samples"] for s in json.loads(manifest.read_text())["shards"])
    assert 0 < stored < 48
    again = _run(args, workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    shards = json.loads(manifest.read_text())["shards"]
    assert sum(s["num_samples"] for s in shards) == 48
