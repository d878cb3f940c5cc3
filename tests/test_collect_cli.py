"""run_collect / `python -m analysis.collect`: shards + manifest, resume equals an uninterrupted run, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.collect import CollectError, run_collect
from analysis.records import RecordsError, RecordStore
from tests.conftest import tiny_arch
from tests.test_prompts import tiny_processor
from vlm.tasks.base import Task, VQASample, register_task

REPO = Path(__file__).resolve().parents[1]
TASK = "collect_test_synthetic"
N_VISION = 16  # 56 px / 14 -> 4x4


@register_task(TASK)
class SyntheticTask(Task):
    """Twelve synthetic images with questions of 1-5 words; split 'empty' has none."""

    name = TASK
    splits = ("calibration", "empty")
    size = 12
    fail_at: int | None = None  # raise when asked for this sample index (simulates an interrupted run)

    def __init__(self, colour_shift: int = 0) -> None:
        self.colour_shift = colour_shift

    def _load(self, split: str) -> Iterator[VQASample]:
        if split == "empty":
            return
        for i in range(self.size):
            if self.fail_at is not None and i == self.fail_at:
                raise KeyboardInterrupt(f"interrupted before sample {i}")
            rng = np.random.default_rng(i + self.colour_shift)
            image = Image.fromarray(rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8))
            words = " ".join(f"w{10 + (i * 7 + k) % 50}" for k in range(1 + i % 5))
            yield VQASample(sample_id=f"syn-{i:03d}", image=image, question=words, prompt=words, answers=["w6"])

    def score(self, predictions, samples):  # pragma: no cover - not used here
        return {"score": 0.0}


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_processor")
    tiny_processor().save_pretrained(path)
    return path


def _cfg(processor_dir: Path, out: Path | None, **overrides) -> dict:
    """A run_collect config: the tiny random model with the tiny processor, the synthetic task."""
    cfg = {
        "model": {"name": "tiny-collect", "processor": str(processor_dir), "seed": 0, "dtype": "float32",
                  "device": "cpu", "attn_implementation": "sdpa", "arch": tiny_arch(layers=3)},
        "data": {"name": "synthetic", "task": TASK, "split": "calibration", "limit": None},
        "n_samples": 10, "batch_size": 2, "reducer": "adaptinfer", "shard_size": 4, "output": str(out), "seed": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(processor_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    run_collect(_cfg(processor_dir, out))
    return RecordStore.open(out).load()


def test_writes_shards_and_manifest(uninterrupted, processor_dir, tmp_path):
    records = uninterrupted
    assert records.ids == [f"syn-{i:03d}" for i in range(10)]
    assert records.t2v.shape == (10, 3, N_VISION)
    assert sorted(records.scalars) == ["prior_entropy", "vision_share"]
    assert torch.isfinite(records.t2v).all() and float(records.t2v.std()) > 0
    m = records.manifest
    assert [s["num_samples"] for s in m["shards"]] == [4, 4, 2]
    assert m["reducer"] == "adaptinfer" and m["num_layers"] == 3 and m["num_vision"] == N_VISION
    assert m["model"]["name"] == "tiny-collect" and m["model"]["dtype"] == "float32"
    assert m["data"]["task"] == TASK and m["data"]["split"] == "calibration"
    assert {"torch", "transformers", "toolkit"} <= set(m["versions"]) and m["versions"]["toolkit"] != "unknown"
    # the adaptinfer prior-weighted t2v is a normalised average of attention rows: within [0, 1]
    assert float(records.t2v.min()) >= 0 and float(records.t2v.max()) <= 1


def test_resume_after_an_interruption_equals_an_uninterrupted_run(uninterrupted, processor_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(SyntheticTask, "fail_at", 9)  # after two shards of 4 and one batch of 1
    with pytest.raises(KeyboardInterrupt):
        run_collect(_cfg(processor_dir, out))
    partial = RecordStore.open(out)
    assert len(partial) == 8 and len(partial.manifest["shards"]) == 2  # only the shard in progress is lost
    monkeypatch.setattr(SyntheticTask, "fail_at", None)
    run_collect(_cfg(processor_dir, out))
    resumed = RecordStore.open(out).load()
    assert resumed.ids == uninterrupted.ids
    torch.testing.assert_close(resumed.t2v, uninterrupted.t2v, atol=1e-6, rtol=0)
    for name in uninterrupted.scalars:
        torch.testing.assert_close(resumed.scalars[name], uninterrupted.scalars[name], atol=1e-6, rtol=0)


def test_a_larger_n_samples_extends_a_run(uninterrupted, processor_dir, tmp_path):
    out = tmp_path / "run"
    run_collect(_cfg(processor_dir, out, n_samples=4))
    assert len(RecordStore.open(out)) == 4
    run_collect(_cfg(processor_dir, out, n_samples=10))
    extended = RecordStore.open(out).load()
    assert extended.ids == uninterrupted.ids
    assert [s["num_samples"] for s in extended.manifest["shards"]] == [4, 4, 2]
    torch.testing.assert_close(extended.t2v, uninterrupted.t2v, atol=1e-6, rtol=0)
    run_collect(_cfg(processor_dir, out, n_samples=10))  # nothing left to do: no new shard
    assert len(RecordStore.open(out).manifest["shards"]) == 3


def test_a_run_directory_from_another_model_or_reducer_is_refused(processor_dir, tmp_path):
    out = tmp_path / "run"
    run_collect(_cfg(processor_dir, out, n_samples=2))
    with pytest.raises(RecordsError, match="made for model"):
        run_collect(_cfg(processor_dir, out, n_samples=4, model={"seed": 1}))
    with pytest.raises(RecordsError, match="made for reducer"):
        run_collect(_cfg(processor_dir, out, n_samples=4, reducer="mean"))
    assert len(RecordStore.open(out)) == 2


def test_empty_dataset_is_a_clear_error_and_writes_nothing(processor_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CollectError, match="split 'empty' gave no samples"):
        run_collect(_cfg(processor_dir, out, data={"split": "empty"}))
    assert not out.exists()


def test_corrupt_shard_and_missing_manifest_are_clear_errors(processor_dir, tmp_path):
    out = tmp_path / "run"
    run_collect(_cfg(processor_dir, out, n_samples=4))
    shard = out / "shards" / "shard-00000.pt"
    shard.write_bytes(b"not a torch file")
    with pytest.raises(RecordsError, match="shard-00000.pt"):
        run_collect(_cfg(processor_dir, out, n_samples=6))
    (out / "manifest.json").unlink()
    with pytest.raises(RecordsError, match="no manifest.json"):
        run_collect(_cfg(processor_dir, out, n_samples=6))
    assert shard.exists(), "the shards are left alone"


@pytest.mark.parametrize("bad, match", [
    ({"n_samples": 0}, "n_samples=0"),
    ({"reducer": "max"}, "reducer='max'"),
    ({"data": {"task": None}}, "needs `task`"),
    ({"output": None}, "pass output="),
])
def test_bad_settings_are_clear_errors(processor_dir, tmp_path, bad, match):
    with pytest.raises(CollectError, match=match):
        run_collect(_cfg(processor_dir, tmp_path / "run", **bad))


def test_collect_config_composes_into_run_collect_settings():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="collect")
    assert cfg.n_samples == 256 and cfg.batch_size == 8 and cfg.reducer == "adaptinfer" and cfg.shard_size == 64
    assert cfg.output is None and cfg.seed == 0 and cfg.model.name == "demo"  # the embedded default
    assert cfg.data.task and cfg.data.split


def test_cli_runs_under_hydra(processor_dir, tmp_path):
    """`python -m analysis.collect` end to end in a subprocess: the synthetic task through an extra config dir."""
    extra = tmp_path / "configs"
    (extra / "data").mkdir(parents=True)
    (extra / "data" / "synthetic.yaml").write_text(f"name: synthetic\ntask: {TASK}\nsplit: calibration\nlimit: 5\n")
    out = tmp_path / "cli"
    code = ("import runpy, sys, tests.test_collect_cli; sys.argv[0] = 'analysis/collect.py'; "
            "runpy.run_module('analysis.collect', run_name='__main__', alter_sys=True)")  # = python -m analysis.collect
    args = [
        "--config-dir", str(extra), "model=tiny", "data=synthetic", f"model.processor={processor_dir}",
        "model.device=cpu", "model.arch.vision_config.image_size=56", "model.arch.text_config.num_hidden_layers=2",
        "n_samples=3", "batch_size=2", "shard_size=2", f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 1]
    assert manifest["model"]["name"] == "tiny" and manifest["num_layers"] == 2
    assert manifest["settings"]["n_samples"] == 3 and manifest["settings"]["limit"] == 5
    assert not (out / ".hydra").exists()  # Hydra writes no files of its own; the manifest holds the settings
