"""Data parallelism past one process (vlm.parallel): slicing, config checks, a manifest hammered by concurrent
writers, N-worker collection == one-worker collection (in-process and as real processes), a killed worker rerun;
the benchmark split the same way; the schedule search over N concurrent workers (the one-worker result, a killed,
interrupted or absent worker taken over and rerun alone, the candidate store under concurrent appends)."""
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
import yaml

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


def test_heartbeat_and_peer_watch(tmp_path):
    """A peer is alive while its beat changes; gone `timeout` s after its last change (killed), at once when its state
    says it stopped, and `timeout` s after the watch began when it never wrote a status file."""
    from vlm.parallel import Heartbeat, PeerWatch, read_status

    now = [0.0]
    watch = PeerWatch(tmp_path, 3, timeout=10.0, clock=lambda: now[0])
    assert watch.alive(1) and watch.alive(2)  # not started yet: given time
    beat = Heartbeat(tmp_path, 1, 3, interval=3600, info={"digest": "d"})  # beats only when told (_write)
    with beat:
        now[0] = 9.0
        assert watch.alive(1)  # first seen now
        now[0] = 18.0
        beat._write()
        assert watch.alive(1) and 1 in watch.moved and watch.last[1]["info"] == {"digest": "d"}
        now[0] = 27.9
        assert watch.alive(1)
        now[0] = 28.1
        assert not watch.alive(1)  # no beat for 10 s: killed
        assert not watch.alive(2)  # never wrote its file within 10 s of the watch's start
        beat._write()
        assert watch.alive(1)  # beats again: back
        beat.update(scored=3)
    assert read_status(tmp_path, 1, 3)["state"] == "done" and read_status(tmp_path, 1, 3)["info"]["scored"] == 3
    assert not watch.alive(1)  # done: no longer doing anything
    with pytest.raises(RuntimeError):
        with Heartbeat(tmp_path, 1, 3, interval=3600):
            raise RuntimeError("boom")
    assert read_status(tmp_path, 1, 3)["state"] == "failed"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


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


# -- one benchmark run over N workers -----------------------------------------------------------------------------
ROW_FIELDS = ("model", "task", "split", "limit", "setup_id", "convention", "method", "budget", "variant_id", "status",
              "variant", "scorer", "schedule", "positions", "budget_processed", "budget_paper", "accuracy", "retention",
              "tflops", "n_samples", "batch_size", "timing_batch", "vision_per_layer", "tokens_per_layer",
              "model_settings")  # config_id differs only by results_dir; timings and peak memory are measurements


@pytest.fixture(scope="module")
def bench_processor(tmp_path_factory) -> Path:
    from tests.bench_fixtures import save_processor

    return save_processor(tmp_path_factory.mktemp("bench_processor"))


@pytest.fixture
def scored(monkeypatch):
    """The predictions every score() call saw, in order (the toy task's score wrapped)."""
    from tests.bench_fixtures import ToyShapesTask

    seen: list[list[str]] = []
    original = ToyShapesTask.score

    def score(self, predictions, samples):
        seen.append(list(predictions))
        return original(self, predictions, samples)

    monkeypatch.setattr(ToyShapesTask, "score", score)
    return seen


def _bench(bench_processor: Path, results_dir: Path, **extra) -> dict:
    from tests.test_benchmark import bench_cfg

    return bench_cfg(bench_processor, results_dir, ["fastv"], [192], limit=4, **extra)  # batches of 2: 2 + 2 + 0


def _rows(results_dir: Path):
    from pruning import results as res

    table = res.read_table(results_dir).sort_values(["method", "budget"]).reset_index(drop=True)
    metrics = sorted(c for c in table.columns if c.startswith("metric_"))
    return table[list(ROW_FIELDS) + metrics]


@pytest.fixture(scope="module")
def one_worker_bench(bench_processor, tmp_path_factory):
    from pruning.benchmark import run_benchmark
    from tests.bench_fixtures import ToyShapesTask

    seen: list[list[str]] = []
    original = ToyShapesTask.score
    ToyShapesTask.score = lambda self, p, s: seen.append(list(p)) or original(self, p, s)
    try:
        out = run_benchmark(_bench(bench_processor, tmp_path_factory.mktemp("bench1")))
    finally:
        ToyShapesTask.score = original
    return _rows(out), seen


def test_three_worker_benchmark_rows_equal_the_one_worker_rows(one_worker_bench, bench_processor, tmp_path, scored):
    from pandas.testing import assert_frame_equal

    from pruning.benchmark import run_benchmark

    for w in (1, 2, 0):  # worker 0 (the one that times the prefill) finishes last and merges
        run_benchmark(_bench(bench_processor, tmp_path, workers=3, worker=w))
    rows, predictions = one_worker_bench
    assert_frame_equal(_rows(tmp_path), rows)  # accuracy, metrics, counts, FLOPs, identity
    assert scored == predictions  # the metric saw the same predictions, in the same order
    assert not {"workers", "worker"} & set(yaml.safe_load((tmp_path / "config.yaml").read_text()))  # not the config
    assert sorted(p.name for p in (tmp_path / "parts").glob("*/*.json")) == sorted(
        f"worker-{w}-of-3.json" for w in range(3) for _ in range(2))
    run_benchmark(_bench(bench_processor, tmp_path, workers=3))  # merge only: everything is there, nothing to do


def test_a_killed_benchmark_worker_rerun_alone_reuses_its_parts(one_worker_bench, bench_processor, tmp_path,
                                                               monkeypatch):
    from pandas.testing import assert_frame_equal

    import pruning.benchmark as bench
    from pruning.benchmark import BenchmarkError, run_benchmark

    for w in (0, 2):
        run_benchmark(_bench(bench_processor, tmp_path, workers=3, worker=w))
    calls = []
    real = bench.evaluate

    def dies_on_second_run(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "evaluate", dies_on_second_run)
    with pytest.raises(KeyboardInterrupt):  # worker 1 wrote its unpruned part, then died in fastv@192
        run_benchmark(_bench(bench_processor, tmp_path, workers=3, worker=1))
    with pytest.raises(BenchmarkError, match=r"fastv@192: workers \[1\]") as info:
        run_benchmark(_bench(bench_processor, tmp_path, workers=3))  # merge only names what is missing
    assert "unpruned" not in str(info.value)  # that run was merged when worker 1 wrote the last part
    calls.clear()
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    run_benchmark(_bench(bench_processor, tmp_path, workers=3, worker=1))
    assert calls == ["fastv@192"]  # the finished part was reused, only the missing one recomputed
    assert_frame_equal(_rows(tmp_path), one_worker_bench[0])


def test_bad_benchmark_worker_settings_write_nothing(bench_processor, tmp_path):
    from pruning.benchmark import run_benchmark

    with pytest.raises(ParallelError, match=r"worker=3 must be an integer in 0\.\.2"):
        run_benchmark(_bench(bench_processor, tmp_path / "out", workers=3, worker=3))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_split_benchmark_through_the_submitit_local_executor(one_worker_bench, bench_processor, tmp_path):
    """`-m +launcher=local workers=3 worker=0,1,2`: three concurrent subprocesses, the last one merges."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from tests.bench_fixtures import TOY_TASK
    from tests.test_benchmark import TOY_CALLBACK, _run_hydra_main

    results_dir = tmp_path / "results"
    _run_hydra_main([
        "-m", "model=tiny", f"model.processor={bench_processor}", "model.device=cpu", "data=pope",
        f"++data.task={TOY_TASK}", "++data.split=test", "++data.limit=4", "methods=[fastv]", "budgets=[192]",
        "batch_size=2", "timing.warmup=0", "timing.repeats=1", "plots=false", "progress=false",
        f"results_dir={results_dir}", TOY_CALLBACK, "workers=3", "worker=0,1,2", "+launcher=local",
        "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
    ])
    same = ["method", "budget", "status", "accuracy", "metric_score", "metric_answered", "n_samples", "tflops",
            "vision_per_layer", "budget_processed"]
    assert _rows(results_dir)[same].equals(one_worker_bench[0][same])


def test_a_method_infeasible_on_the_model_gives_one_infeasible_row_in_a_split_run(bench_processor, tmp_path,
                                                                                 monkeypatch):
    import pruning.benchmark as bench
    from pruning import results as res
    from pruning.schedule import MethodInfeasible

    real = bench.evaluate

    def no_cls(*args, **kwargs):
        if kwargs["desc"].startswith("fastv"):
            raise MethodInfeasible("fastv needs what this model lacks (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "evaluate", no_cls)
    bench.run_benchmark(_bench(bench_processor, tmp_path, workers=2, worker=0))
    table = res.read_table(tmp_path)
    fastv = table[table["method"] == "fastv"]
    assert list(fastv["status"]) == [res.STATUS_INFEASIBLE] and "simulated" in fastv["note"].iloc[0]
    bench.run_benchmark(_bench(bench_processor, tmp_path, workers=2, worker=1))
    bench.run_benchmark(_bench(bench_processor, tmp_path, workers=2))  # nothing missing: merge only passes
    table = res.read_table(tmp_path)
    assert sorted(zip(table["method"], table["status"])) == [("fastv", res.STATUS_INFEASIBLE), ("unpruned", res.STATUS_OK)]


# -- the schedule search over N workers ---------------------------------------------------------------------------
SEARCH_BUDGETS = (160.0, 128.0)
SEARCH_SETTINGS = {"objective": "synthetic"}


def _search(store_path: Path, team=None, objective=None) -> list[dict]:
    """The synthetic search of tests/test_search.py at two budgets (the second seeded by the first's best)."""
    from analysis.search import CandidateStore, ScheduleSearch
    from tests.test_search import L, V, early_vision_objective

    search = ScheduleSearch(L, V, range(0, L - 1), n_stages=3, max_candidates=40, max_rounds=20)
    store = CandidateStore(store_path, SEARCH_SETTINGS)
    out, previous = [], []
    for budget in SEARCH_BUDGETS:
        found = search.run(budget, objective or early_vision_objective, extra_seeds=previous, store=store, team=team)
        previous = [found.best]
        out.append({"best": found.best.key, "score": found.score, "visited": found.visited, "rounds": found.rounds,
                    "history": found.history})
    return json.loads(json.dumps(out))


def _search_worker(directory: str, workers: int, worker: int, timeout: float, die_after: int | None = None,
                   how: str = "kill") -> None:
    """Worker `worker` of `workers` of the synthetic search in `directory`; `die_after` candidates it scores, it is
    killed outright (`how="kill"`: no last word in its status file) or interrupted (`how="interrupt"`)."""
    import time

    from analysis.search_workers import SearchTeam
    from tests.test_search import early_vision_objective

    d = Path(directory)
    calls = 0

    def objective(cand):
        nonlocal calls
        calls += 1
        if die_after is not None and calls > die_after:
            if how == "kill":
                os._exit(9)
            raise KeyboardInterrupt
        time.sleep(0.005)  # let the workers interleave
        with open(d / f"scored-w{worker}.txt", "a") as fh:
            fh.write(cand.key + "\n")
        return early_vision_objective(cand)

    with SearchTeam(WorkerSpec(workers, worker), d / "workers", "digest", timeout=timeout) as team:
        result = _search(d / "candidates.jsonl", team, objective)
    (d / f"result-w{worker}.json").write_text(json.dumps(result))


def _start_search_workers(directory: Path, workers: int, which, timeout: float, die: dict | None = None) -> list:
    """Workers `which` of `workers` as processes; `die` maps a worker to its _search_worker death options."""
    ctx = multiprocessing.get_context("fork")  # no re-import per process; the synthetic objective needs no torch
    jobs = [ctx.Process(target=_search_worker, args=(str(directory), workers, w, timeout),
                        kwargs=(die or {}).get(w, {})) for w in which]
    for job in jobs:
        job.start()
    return jobs


def _join(jobs, codes=None) -> None:
    for i, job in enumerate(jobs):
        job.join(timeout=120)
        assert job.exitcode == (0 if codes is None else codes[i]), (i, job.exitcode)


@pytest.fixture(scope="module")
def one_worker_search(tmp_path_factory):
    path = tmp_path_factory.mktemp("search1") / "candidates.jsonl"
    return _search(path), _store_rows(path)


def _store_rows(path: Path) -> dict:
    from analysis.search import CandidateStore

    return CandidateStore(path, SEARCH_SETTINGS).rows


def _assert_same_search(directory: Path, one_worker_search, workers) -> None:
    result, rows = one_worker_search
    for w in workers:
        assert json.loads((directory / f"result-w{w}.json").read_text()) == result, f"worker {w}"
    shared = _store_rows(directory / "candidates.jsonl")
    assert {k: r["score"] for k, r in shared.items() if k in rows} == {k: r["score"] for k, r in rows.items()}
    assert set(rows) <= set(shared)  # plus the candidates of a chunk after its first improvement

    def must_not_score(cand):
        raise AssertionError(f"{cand.key} was not in the store")

    assert _search(directory / "candidates.jsonl", objective=must_not_score) == result  # the merge: all there


@pytest.mark.parametrize("workers", [2, 3])
def test_search_workers_as_processes_take_the_one_worker_path(one_worker_search, tmp_path, workers):
    """N concurrent workers over one candidates.jsonl: every worker ends with the one-worker result (best, score,
    candidates looked at, rounds, history); each scored a share, no candidate twice."""
    _join(_start_search_workers(tmp_path, workers, range(workers), timeout=60.0))
    _assert_same_search(tmp_path, one_worker_search, range(workers))
    lines = (tmp_path / "candidates.jsonl").read_text().splitlines()
    scored = [len((tmp_path / f"scored-w{w}.txt").read_text().splitlines()) for w in range(workers)]
    assert all(n > 0 for n in scored) and sum(scored) == len(lines) == len(_store_rows(tmp_path / "candidates.jsonl"))
    states = [json.loads((tmp_path / "workers" / f"worker-{w}-of-{workers}.json").read_text()) for w in range(workers)]
    assert [s["state"] for s in states] == ["done"] * workers and [s["info"]["scored"] for s in states] == scored


@pytest.mark.parametrize("scenario", ["killed", "interrupted", "never started"])
def test_a_gone_search_worker_is_taken_over_and_rerun_alone_completes(one_worker_search, tmp_path, scenario):
    """Worker 1 of 3 is killed outright (its beat stops: taken over after worker_timeout), interrupted (its status
    says failed: taken over at once) or never starts; the others finish the search, and worker 1 rerun alone
    replays it from the store to the same result."""
    import time

    timeout = 60.0 if scenario == "interrupted" else 1.0
    die = {"killed": {"die_after": 4, "how": "kill"}, "interrupted": {"die_after": 4, "how": "interrupt"}}
    which = [0, 2] if scenario == "never started" else [0, 1, 2]
    t0 = time.monotonic()
    jobs = _start_search_workers(tmp_path, 3, which, timeout, die={1: die.get(scenario, {})})
    _join(jobs, [9 if scenario == "killed" and w == 1 else 1 if w == 1 else 0 for w in which])
    assert time.monotonic() - t0 < 30  # an interrupted worker's share was taken over without waiting 60 s
    statuses = [json.loads((tmp_path / "workers" / f"worker-{w}-of-3.json").read_text()) for w in (0, 2)]
    assert sum(s["info"]["taken_over"] for s in statuses) > 0
    if scenario != "never started":
        assert len((tmp_path / "scored-w1.txt").read_text().splitlines()) == 4  # kept, not rescored
    _join(_start_search_workers(tmp_path, 3, [1], timeout))
    _assert_same_search(tmp_path, one_worker_search, range(3))


def test_a_killed_search_worker_rerun_while_the_others_wait_joins_in(one_worker_search, tmp_path):
    """Worker 1 killed outright; rerun before worker_timeout, it resumes from the store: nothing taken over, no
    candidate scored twice, the one-worker result."""
    others = _start_search_workers(tmp_path, 3, [0, 2], timeout=60.0)
    _join(_start_search_workers(tmp_path, 3, [1], 60.0, die={1: {"die_after": 6, "how": "kill"}}), [9])
    _join(_start_search_workers(tmp_path, 3, [1], timeout=60.0))
    _join(others)
    _assert_same_search(tmp_path, one_worker_search, range(3))
    lines = (tmp_path / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == len(_store_rows(tmp_path / "candidates.jsonl"))  # nobody scored a candidate twice
    assert all(json.loads((tmp_path / "workers" / f"worker-{w}-of-3.json").read_text())["info"]["taken_over"] == 0
               for w in range(3))


def test_a_search_worker_with_other_settings_is_an_error(tmp_path):
    from analysis.search_workers import SearchTeam
    from vlm.parallel import Heartbeat

    with Heartbeat(tmp_path / "workers", 1, 2, interval=0.02, info={"digest": "other"}):
        with pytest.raises(ParallelError, match="worker 1 of 2 .* searches with other settings"):
            with SearchTeam(WorkerSpec(2, 0), tmp_path / "workers", "mine", timeout=30.0) as team:
                _search(tmp_path / "candidates.jsonl", team)
    assert json.loads((tmp_path / "workers" / "worker-0-of-2.json").read_text())["state"] == "failed"


def _append_rows(path: str, writer: int, n: int) -> None:
    from analysis.search import Candidate, CandidateStore

    store = CandidateStore(Path(path), SEARCH_SETTINGS)
    for k in range(n):
        store.add(100.0, Candidate((1,), (writer * 1000 + k,)), {"objective": float(k)}, 100.0)
        store.add(100.0, Candidate((2,), (k,)), {"objective": float(writer)}, 100.0)  # the same k by every writer


def test_candidate_store_under_concurrent_appends_loses_nothing(tmp_path):
    """4 processes append to one store at once (after a line cut by a killed writer): every row is there, each
    line whole, a candidate appended by several writers stored once (the first)."""
    path = tmp_path / "candidates.jsonl"
    path.write_text('{"budget": 100.0, "key": "cut by a kill')  # no newline: the next append starts a new line
    writers, n = 4, 40
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Process(target=_append_rows, args=(str(path), w, n)) for w in range(writers)]
    for job in jobs:
        job.start()
    _join(jobs)
    lines = path.read_text().splitlines()
    assert lines[0].endswith("cut by a kill") and all(json.loads(line) for line in lines[1:])
    rows = _store_rows(path)
    assert len(lines) - 1 == len(rows) == writers * n + n
    assert {k for _, k in rows} >= {f"1:{w * 1000 + k}|b=1" for w in range(writers) for k in range(n)}


def _front(out: Path) -> dict:
    """front.json without what depends on the process that wrote it (its own work and time)."""
    front = json.loads((out / "front.json").read_text())
    per_process = ("candidates_scored", "seconds")
    return {"front": [{k: v for k, v in f.items() if k not in per_process} for f in front["front"]],
            **{k: front[k] for k in ("objective", "calibration", "settings")}}


def _schedules(out: Path) -> dict:
    """Every schedule file of a derive directory, without the provenance of the process that wrote it."""
    found = {}
    for path in sorted(out.glob("schedule*.yaml")):
        schedule = yaml.safe_load(path.read_text())
        search = schedule["provenance"]["search"]
        for key in ("seconds", "call", "scored_now"):
            search.pop(key, None)
        schedule["provenance"].pop("records", None)
        found[path.name] = schedule
    return found


def _derive_in_process(cfg: dict) -> None:
    """run_derive in a forked process, on one thread (as every process of the comparison)."""
    torch.set_num_threads(1)
    from analysis.derive import run_derive

    run_derive(cfg)


def test_derive_search_workers_as_processes_match_one_worker(tmp_path):
    """run_derive with workers=3 worker=0,1,2 as three concurrent processes, beside a one-worker run, on a tiny model:
    the same front, schedules (provenance included, but for each process's own work and time) and candidate
    scores; worker 1 and 2 write no results; `workers=3` without `worker` then finds everything scored."""
    from omegaconf import OmegaConf

    from analysis.derive import run_derive
    from analysis.search import CandidateStore
    from tests.test_derive import compose_derive
    from tests.test_search import _collect

    collect_dir, model = _collect(tmp_path, layers=8, n=6)
    split, single = tmp_path / "split", tmp_path / "single"
    overrides = [f"input={collect_dir}", "budgets=[12,9]", "n_stages=2", "min_layer=0", "n_calibration=6",
                 "search.max_candidates=12", "search.batch_size=3", "search.progress=false", "plots.enabled=false",
                 "detector.token_fraction=0.25"]

    def cfg(*extra: str) -> dict:
        return {**OmegaConf.to_container(compose_derive([*overrides, *extra])), "model": model}

    ctx = multiprocessing.get_context("fork")  # no re-import of torch per process: the test stays fast
    jobs = [ctx.Process(target=_derive_in_process, args=(cfg(f"output={single}"),))]
    jobs += [ctx.Process(target=_derive_in_process, args=(cfg(f"output={split}", "workers=3", f"worker={w}"),))
             for w in range(3)]
    for job in jobs:
        job.start()
    _join(jobs)
    assert _front(split) == _front(single) and _schedules(split) == _schedules(single)
    settings = _settings(single)
    rows = {k: r["score"] for k, r in CandidateStore(single / "candidates.jsonl", settings).rows.items()}
    shared = CandidateStore(split / "candidates.jsonl", settings).rows
    assert rows and {k: shared[k]["score"] for k in rows} == rows
    states = [json.loads((split / "workers" / f"worker-{w}-of-3.json").read_text()) for w in range(3)]
    assert [s["state"] for s in states] == ["done"] * 3 and all(s["info"]["scored"] > 0 for s in states)
    assert sorted(p.name for p in split.glob("schedule*.yaml")) == ["schedule.yaml", "schedule_12.yaml",
                                                                   "schedule_9.yaml"]

    (split / "front.json").unlink()
    run_derive(cfg(f"output={split}", "workers=3"))  # no worker: completes the search from the store, writes
    again = json.loads((split / "front.json").read_text())
    assert again["candidates_scored_now"] == 0 and again["candidates_from_file"] == len(shared)
    assert again["workers"] == 3 and _front(split) == _front(single)


@pytest.mark.slow
def test_derive_search_workers_through_the_cli(processor_dir, tmp_path):
    """`python -m analysis.derive ... workers=3 worker=i` as three concurrent processes (and a one-worker run beside
    them) on a tiny model: the same front, schedules and candidate scores; then `workers=3` without `worker` finds
    everything scored and writes the same results."""
    from omegaconf import OmegaConf

    from analysis.derive import run_derive
    from analysis.search import CandidateStore
    from tests.test_derive import compose_derive

    model = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    model.update(processor=str(processor_dir), device="cpu")
    model["arch"]["vision_config"]["image_size"] = 56
    records = tmp_path / "records"
    run_collect(_cfg(processor_dir, records, n_samples=6, batch_size=3, shard_size=6) | {"model": model})
    code = ("import runpy, sys, tests.test_collect_cli; sys.argv[0] = 'analysis/derive.py'; "
            "runpy.run_module('analysis.derive', run_name='__main__', alter_sys=True)")  # = python -m analysis.derive
    args = [f"input={records}", "model=tiny", f"model.processor={processor_dir}", "model.device=cpu",
            "model.arch.vision_config.image_size=56", "budgets=[12,9]", "n_stages=2", "min_layer=0", "n_calibration=6",
            "search.max_candidates=12", "search.batch_size=3", "search.progress=false", "plots.enabled=false",
            "detector.token_fraction=0.25"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    split, single = tmp_path / "split", tmp_path / "single"
    commands = [[*args, f"output={single}"]]
    commands += [[*args, f"output={split}", "workers=3", f"worker={w}"] for w in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", code, *c], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    assert "worker 1 of 3 done" in outs[2] and "worker 0 writes" in outs[2]
    assert _front(split) == _front(single) and _schedules(split) == _schedules(single)
    rows = {k: r["score"] for k, r in CandidateStore(single / "candidates.jsonl", _settings(single)).rows.items()}
    shared = CandidateStore(split / "candidates.jsonl", _settings(single)).rows
    assert rows and {k: shared[k]["score"] for k in rows} == rows
    states = [json.loads((split / "workers" / f"worker-{w}-of-3.json").read_text())["state"] for w in range(3)]
    assert states == ["done"] * 3

    merged = json.loads((split / "front.json").read_text())
    (split / "front.json").unlink()
    cfg = OmegaConf.to_container(compose_derive([*args[:1], *args[5:], f"output={split}", "workers=3"]))
    run_derive({**cfg, "model": {**model, "processor": str(processor_dir)}})
    again = json.loads((split / "front.json").read_text())
    assert again["candidates_scored_now"] == 0 and again["workers"] == 3 and _front(split) == _front(single)
    assert again["candidates_from_file"] == len(shared) and merged["workers"] == 3


def _settings(out: Path) -> dict:
    """The store settings of a derive directory's candidates.jsonl (its first row's)."""
    return json.loads((out / "candidates.jsonl").read_text().splitlines()[0])["settings"]


@pytest.mark.parametrize("overrides, match", [
    (["workers=3", "worker=3"], r"worker=3 must be an integer in 0\.\.2"),
    (["workers=0"], "workers=0 must be an integer >= 1"),
    (["workers=2", "worker=0", "rule=paper"], "rule=paper takes seconds"),
    (["workers=2", "worker=0", "output=null"], "workers=2 needs output=DIR"),
    (["workers=2", "worker=1", "worker_timeout=0"], "worker_timeout=0 must be"),
])
def test_bad_derive_worker_settings_are_user_errors_and_write_nothing(tmp_path, overrides, match):
    from omegaconf import OmegaConf

    from analysis.derive import run_derive
    from tests.test_derive import compose_derive

    cfg = OmegaConf.to_container(compose_derive([f"input={tmp_path / 'none'}", f"output={tmp_path / 'out'}",
                                                 *overrides]))
    with pytest.raises(UserError, match=match):
        run_derive(cfg)
    assert not (tmp_path / "out").exists()
