"""The schedule search over several processes: `python -m analysis.derive ... workers=N worker=i`.

Every worker runs the same deterministic search (`analysis.search.ScheduleSearch`) over the same output directory
and the same `candidates.jsonl`. Where one process scores candidates one after another, the team scores a batch at
once: the seeds, then each round's neighbours, in their fixed order, in chunks of up to N candidates the team has
not scored yet (`ScheduleSearch.run`). Candidate j of a batch (the same list in every worker) is worker j mod N's
(`vlm.parallel.worker_slice`); a worker scores its share, appending each score to the shared store under its file
lock, then waits, polling the store, until every candidate of the batch is there. Every worker then reads the
scores in the one-process order and takes the same next move (first improvement within the chunk), so the search
path, its `max_candidates` count and its result are those of one process alone; the candidates of a chunk after
its first improvement are scored in vain, but kept in the store.

Gone workers. Each worker keeps its status file `workers/worker-<i>-of-<N>.json` fresh (`vlm.parallel.Heartbeat`).
While waiting, a worker scores itself the missing candidates of a peer that is gone: it stopped (state `failed`, or
`done` from an earlier run), its beat has not changed for `worker_timeout` seconds (killed outright, node lost),
or it never showed up within `worker_timeout` seconds of this worker's start. A peer (re)started later with its
`worker=i` replays the search from the store and joins in. Scores are deterministic, so whoever scores a
candidate, the result is the same; a candidate scored twice keeps its first line.

Workers started with other settings (calibration set, budgets, search settings, ...) would wait for candidates the
others never score: a worker that sees a live peer with another settings digest stops with a ParallelError.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from analysis.search import Candidate, CandidateStore
from vlm.parallel import FAILED, RUNNING, Heartbeat, ParallelError, PeerWatch, WorkerSpec, owner, worker_slice

log = logging.getLogger(__name__)

WORKERS_DIR = "workers"  # the workers' status files, beside candidates.jsonl
FIRST_POLL = 0.02  # seconds between looks at the store while waiting: doubling from this ...
MAX_POLL = 0.25  # ... up to this
NOTE_EVERY = 60.0  # seconds between "still waiting" notes in the log
# config keys that change nothing a worker computes (each worker has its own `worker`)
DIGEST_IGNORES = ("worker", "worker_timeout", "plots", "name")


def settings_digest(cfg: Mapping[str, Any]) -> str:
    """A short hash of everything in a derive config that shapes the search (what every worker must share)."""
    plain = {k: v for k, v in cfg.items() if k not in DIGEST_IGNORES}
    if isinstance(plain.get("search"), Mapping):
        plain["search"] = {k: v for k, v in plain["search"].items() if k != "progress"}
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SearchTeam:
    """This process's place in a search shared by `workers` processes (module docstring); a context manager that
    keeps the status file fresh while the search runs."""

    def __init__(self, spec: WorkerSpec, directory: Path, digest: str, timeout: float = 120.0,
                 max_poll: float = MAX_POLL) -> None:
        if spec.worker is None or spec.workers < 2:
            raise ParallelError(f"a search team needs a worker index among workers >= 2, got {spec}")
        if not timeout > 0:
            raise ParallelError(f"worker_timeout={timeout!r} must be a number of seconds > 0")
        self.workers, self.worker = spec.workers, spec.worker
        self.directory, self.digest = Path(directory), digest
        self.timeout, self.max_poll = float(timeout), float(max_poll)
        self.heartbeat = Heartbeat(self.directory, self.worker, self.workers, interval=min(max(timeout / 4, 0.05), 5.0),
                                   info={"digest": digest, "scored": 0, "taken_over": 0})
        self.watch = PeerWatch(self.directory, self.workers, self.timeout)
        self.scored = 0  # candidates this worker scored
        self.taken_over = 0  # of which other workers' share
        self._gone: set[int] = set()  # peers whose share this worker is taking over (warned once per absence)

    def __enter__(self) -> "SearchTeam":
        self.heartbeat.__enter__()
        self.watch = PeerWatch(self.directory, self.workers, self.timeout)  # peers get `timeout` from now
        return self

    def __exit__(self, *exc: Any) -> None:
        self.heartbeat.__exit__(*exc)

    def __str__(self) -> str:
        return f"worker {self.worker} of {self.workers}"

    def score(self, store: CandidateStore, budget: float, candidates: Sequence[Candidate],
              score_here: Callable[[Candidate], Mapping[str, Any]]) -> None:
        """Return once all `candidates` are in `store`: score this worker's share, wait for the others' (taking over
        the share of a peer that is gone)."""
        owners = {c.key: owner(j, self.workers) for j, c in enumerate(candidates)}
        for cand in worker_slice(candidates, self.workers, self.worker):
            store.refresh()
            if store.get(budget, cand) is None:
                self._score(cand, score_here, taken_over=False)
        poll, waiting_since, noted = FIRST_POLL, time.monotonic(), time.monotonic()
        while True:
            store.refresh()
            missing = [c for c in candidates if store.get(budget, c) is None]
            if not missing:
                return
            alive = {w: self._alive(w) for w in sorted({owners[c.key] for c in missing})}
            gone = [c for c in missing if not alive[owners[c.key]]]
            if gone:
                peer = owners[gone[0].key]
                self._warn_gone(peer, [c.key for c in gone if owners[c.key] == peer], budget)
                self._score(gone[0], score_here, taken_over=True)
                poll = FIRST_POLL
                continue
            if time.monotonic() - noted >= NOTE_EVERY:
                noted = time.monotonic()
                log.info("%s: waited %.0f s at budget %g for %s", self, noted - waiting_since, budget,
                         "; ".join(f"worker {w}: {[c.key for c in missing if owners[c.key] == w]}"
                                   for w in sorted({owners[c.key] for c in missing})))
            time.sleep(poll)
            poll = min(2 * poll, self.max_poll)

    def _score(self, cand: Candidate, score_here: Callable[[Candidate], Mapping[str, Any]], taken_over: bool) -> None:
        score_here(cand)
        self.scored += 1
        self.taken_over += int(taken_over)
        self.heartbeat.update(scored=self.scored, taken_over=self.taken_over)

    def _alive(self, worker: int) -> bool:
        """Whether `worker` may still score its share; ParallelError when it is running with other settings."""
        alive = self.watch.alive(worker)
        status = self.watch.last.get(worker)
        if (status is not None and worker in self.watch.moved and status.get("state") == RUNNING
                and status.get("info", {}).get("digest") != self.digest):
            raise ParallelError(
                f"worker {worker} of {self.workers} (pid {status.get('pid')} on {status.get('host')}) searches with "
                f"other settings than {self} (digest {status.get('info', {}).get('digest')} != {self.digest}); every "
                f"worker must run the same command but for worker=i"
            )
        if alive:
            self._gone.discard(worker)
        return alive

    def _warn_gone(self, worker: int, keys: Sequence[str], budget: float) -> None:
        if worker in self._gone:
            return
        self._gone.add(worker)
        status = self.watch.last.get(worker)
        path = self.directory / f"worker-{worker}-of-{self.workers}.json"
        if status is None:
            why = f"it has not started ({path} not written within worker_timeout={self.timeout:g} s)"
        elif status.get("state") == FAILED:
            why = "it stopped with an error or was interrupted"
        elif status.get("state") != RUNNING:
            why = f"its status is {status.get('state')!r} ({path}, an earlier run)"
        else:
            why = f"its heartbeat ({path}) has not changed for worker_timeout={self.timeout:g} s"
        log.warning("%s: worker %d is gone (%s); scoring its candidates %s at budget %g here. Rerun it with "
                    "worker=%d to have it join again", self, worker, why, list(keys), budget, worker)


__all__ = ["DIGEST_IGNORES", "SearchTeam", "WORKERS_DIR", "settings_digest"]
