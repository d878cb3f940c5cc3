"""Data parallelism past one process (vlm.parallel): slicing, config checks, a manifest hammered by concurrent
writers, N-worker collection == one-worker collection (in-process and as real processes), a killed worker rerun."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from analysis.collect import CollectError, run_collect
from analysis.records import RecordStore
from tests.test_collect_cli import SyntheticTask, _cfg
from tests.test_collect_cli import processor_dir  # noqa: F401  (fixture)
from tests.test_records import batch, manifest
from vlm.errors import UserError
from vlm.parallel import (ParallelError, WorkerSpec, merge_slices, missing_workers, read_parts, worker_indices,
                          worker_slice, write_part)

REPO = Path(__file__).resolve().parents[1]


# -- slicing and settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, workers, block", [(10, 3, 1), (10, 3, 2), (7, 4, 3), (2, 3, 8), (0, 2, 1), (9, 1, 4)])
def test_worker_slices_are_disjoint_cover_everything_and_merge_back(n, workers, block):
    items = [f"s{i}" for i in range(n)]
    parts = {w: worker_slice(items, workers, w, block) for w in range(workers)}
    assert sorted(x for p in parts.values() for x in p) == sorted(items)
    assert merge_slices(parts, n, workers, block) == items
    assert worker_indices(10, 3, 1, block=2) == [2, 3, 8, 9]  # blocks of 2: block k -> worker k mod 3


def test_merge_names_missing_parts():
    with pytest.raises(ParallelError, match=r"workers \[1\]"):
        merge_slices({0: ["a"], 2: []}, 3, 3)
    assert missing_workers({0: 1, 2: 1}, 4) == [1, 3]


@pytest.mark.parametrize("cfg, expected", [
    ({}, WorkerSpec(1, 0)), ({"workers": 1, "worker": None}, WorkerSpec(1, 0)), ({"workers": 3, "worker": 2}, WorkerSpec(3, 2)),
    ({"workers": 3}, WorkerSpec(3, None)),
])
def test_worker_spec_from_config(cfg, expected):
    spec = WorkerSpec.from_config(cfg)
    assert spec == expected
    assert spec.merge_only == (expected.worker is None)


@pytest.mark.parametrize("cfg, match", [
    ({"workers": 0}, "workers=0 must be an integer >= 1"), ({"workers": "2"}, "workers='2'"),
    ({"workers": 2, "worker": 2}, r"worker=2 must be an integer in 0\.\.1"), ({"workers": 2, "worker": -1}, "worker=-1"),
    ({"workers": 2, "worker": 1.0}, "worker=1.0"), ({"workers": True}, "workers=True"),
])
def test_bad_worker_settings_are_user_errors(cfg, match):
    with pytest.raises(ParallelError, match=match) as info:
        WorkerSpec.from_config(cfg)
    assert isinstance(info.value, UserError)


def test_parts_are_written_atomically_and_read_back(tmp_path):
    write_part(tmp_path, 1, 2, {"ids": ["a"], "x": float("nan")})
    parts = read_parts(tmp_path, 2)
    assert list(parts) == [1] and parts[1]["ids"] == ["a"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert read_parts(tmp_path, 3) == {}  # a part of another worker count is not this run's


# -- the manifest under concurrent writers --------------------------------------------------------------------------
def _hammer(run_dir: str, writer: int, shards: int) -> None:
    """Open the store as writer `writer` and add `shards` one-sample shards of ids w<writer>-<k>."""
    store = RecordStore.create_or_resume(run_dir, manifest(), writer=f"w{writer}")
    for k in range(shards):
        _, t2v, scalars = batch(0, 1)
        store.write_shard([f"w{writer}-{k:03d}"], t2v, scalars, positions=[writer * 1000 + k])


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_concurrent_writers_lose_no_shard(tmp_path, kind):
    writers, shards = 4, 15
    if kind == "threads":
        barrier = threading.Barrier(writers)

        def go(w: int) -> None:
            barrier.wait()
            _hammer(str(tmp_path), w, shards)

        jobs = [threading.Thread(target=go, args=(w,)) for w in range(writers)]
    else:
        ctx = multiprocessing.get_context("fork")  # no re-import of torch per process: the test stays fast
        jobs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, shards)) for w in range(writers)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
        assert getattr(job, "exitcode", 0) == 0
    store = RecordStore.open(tmp_path)
    files = [s["file"] for s in store.manifest["shards"]]
    assert len(files) == writers * shards and len(set(files)) == len(files)  # no lost update, no index twice
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(files)  # no orphan, no temporary
    records = store.load()  # in position order: writer by writer
    assert records.ids == [f"w{w}-{k:03d}" for w in range(writers) for k in range(shards)]


def test_a_writer_leaves_other_writers_temporaries_alone(tmp_path):
    RecordStore.create_or_resume(tmp_path, manifest(), writer="w0")
    other = tmp_path / "shards" / ".shard.tmp-w1-12345"
    mine = tmp_path / "shards" / ".shard.tmp-w0-12345"
    other.write_bytes(b"in progress")
    mine.write_bytes(b"left by a killed run")
    RecordStore.create_or_resume(tmp_path, manifest(), writer="w0")
    assert other.exists() and not mine.exists()


# -- collection over N workers ------------------------------------------------------------------------------------
def _assert_same_records(a, b):
    assert a.ids == b.ids
    assert torch.equal(a.t2v, b.t2v)
    assert a.scalars.keys() == b.scalars.keys()
    for name in a.scalars:
        assert torch.equal(a.scalars[name], b.scalars[name])


@pytest.fixture(scope="module")
def one_worker(processor_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=3))
    return RecordStore.open(out).load()


def test_three_workers_store_the_same_records_as_one(one_worker, processor_dir, tmp_path):
    out = tmp_path / "run"
    for w in (2, 0, 1):  # any order
        run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=3, workers=3, worker=w))
    store = RecordStore.open(out)
    assert len(store.manifest["shards"]) > 4  # each worker wrote its own shards
    _assert_same_records(store.load(), one_worker)
    assert run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=3, workers=3)) == out  # complete


def test_a_killed_worker_rerun_alone_completes_the_store(one_worker, processor_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=2, workers=2, worker=0))
    monkeypatch.setattr(SyntheticTask, "fail_at", 7)  # worker 1 (blocks 1, 3, 5 of 2 samples) dies at sample 7
    with pytest.raises(KeyboardInterrupt):
        run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=2, workers=2, worker=1))
    monkeypatch.setattr(SyntheticTask, "fail_at", None)
    with pytest.raises(CollectError, match=r"lacks samples of worker 1 \(3 samples\)"):
        run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=2, workers=2))
    stored = RecordStore.open(out).done_ids()
    run_collect(_cfg(processor_dir, out, n_samples=11, shard_size=2, workers=2, worker=1))
    store = RecordStore.open(out)
    assert stored <= store.done_ids()  # what it had stored was kept, not recomputed
    _assert_same_records(store.load(), one_worker)


def test_workers_need_a_shared_output(processor_dir, tmp_path):
    with pytest.raises(CollectError, match="workers=2 needs output=DIR"):
        run_collect(_cfg(processor_dir, None, workers=2, worker=0) | {"output": None})
    with pytest.raises(ParallelError, match="worker=5"):
        run_collect(_cfg(processor_dir, tmp_path / "run", workers=2, worker=5))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_collection_workers_as_processes_through_the_cli(processor_dir, tmp_path):
    """`python -m analysis.collect ... workers=3 worker=i` as three concurrent processes, then the merge-only check;
    the store equals a one-worker run of the same config."""
    from omegaconf import OmegaConf

    extra = tmp_path / "configs"
    (extra / "data").mkdir(parents=True)
    (extra / "data" / "synthetic.yaml").write_text("name: synthetic\ntask: collect_test_synthetic\nsplit: calibration\n")
    out = tmp_path / "cli"
    code = ("import runpy, sys, tests.test_collect_cli; sys.argv[0] = 'analysis/collect.py'; "
            "runpy.run_module('analysis.collect', run_name='__main__', alter_sys=True)")  # = python -m analysis.collect
    args = ["--config-dir", str(extra), "model=tiny", "data=synthetic", f"model.processor={processor_dir}",
            "model.device=cpu", "model.arch.vision_config.image_size=56", "model.arch.text_config.num_hidden_layers=2",
            "n_samples=11", "batch_size=2", "shard_size=3", f"output={out}", "workers=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, *args, f"worker={w}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    check = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]

    model = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    model.update(processor=str(processor_dir), device="cpu")
    model["arch"]["vision_config"]["image_size"] = 56
    model["arch"]["text_config"]["num_hidden_layers"] = 2
    single = tmp_path / "single"
    run_collect(_cfg(processor_dir, single, n_samples=11, batch_size=2, shard_size=3) | {"model": model})
    _assert_same_records(RecordStore.open(out).load(), RecordStore.open(single).load())
