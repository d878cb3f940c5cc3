"""Data parallelism past one process: which items a worker takes, safe shared files, and putting the parts together.

A long step (collection, one benchmark run, the schedule search) is split over `workers` processes that share a
filesystem: local processes, a Hydra multirun, or a SLURM array through the submitit launcher. Every worker runs the
same command with its own `worker=i`; nothing is sent between them, they only read and write files.

* **Slicing rule** (`worker_indices`): the items, in their canonical order (a split's sample order, a candidate
  list), are cut into consecutive blocks of `block` items, and block k goes to worker k mod `workers`. With
  `block` = the batch size every batch of a worker is exactly a batch of the one-worker run (same rows, same
  padding), so per-sample numbers are bit-for-bit those of the one-worker run. `block=1` is plain index mod N.
* **Shared files**: `atomic_write` (temporary file in the same directory, fsync, `os.replace`) so a reader sees a
  whole file or none, and `locked` (an exclusive `fcntl.flock` on `<path>.lock`) around read-modify-write of a file
  several workers update. On a cluster the directory must be on a filesystem every node shares with working
  `flock` (NFSv4, or Lustre/BeeGFS mounted with flock support).
* **Parts** (`write_part`, `read_parts`, `missing_workers`): each worker writes its result as one JSON file
  `worker-<i>-of-<N>.json` in a directory of its own per unit of work; whoever finds every part present merges them
  (`merge_slices` puts per-worker lists back in canonical order).

* **Liveness** (`Heartbeat`, `PeerWatch`), for steps whose workers wait on each other (the schedule search): each
  worker keeps a status file `worker-<i>-of-<N>.json` (pid, host, state running/done/failed, a beat counter) that a
  daemon thread rewrites every few seconds; a peer is alive while its state is `running` and its beat changed within
  `timeout` seconds of the reader's own clock (no clock is compared across machines). A peer that never wrote its
  file gets `timeout` seconds from when the reader began watching.

`WorkerSpec.from_config` reads and checks the `workers` / `worker` config values. `worker` unset with `workers` > 1
means "merge only": compute nothing, put together what the workers wrote, and say which parts are missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

from vlm.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
TMP_MARKER = ".tmp"
PART_PATTERN = "worker-{worker}-of-{workers}.json"


class ParallelError(UserError, ValueError):
    """Bad `workers`/`worker` settings, or parts of a split run that are missing or do not fit together."""


@dataclass(frozen=True)
class WorkerSpec:
    """This process's place in a data-parallel run: `worker` of `workers` (worker None = merge only)."""

    workers: int = 1
    worker: int | None = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "WorkerSpec":
        """`workers` (int >= 1, default 1) and `worker` (int in 0..workers-1; unset = 0 alone, merge only with
        workers > 1) from a config mapping; ParallelError names the bad value."""
        workers = cfg.get("workers", 1)
        workers = 1 if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ParallelError(f"workers={workers!r} must be an integer >= 1 (the number of processes sharing the run)")
        worker = cfg.get("worker")
        if worker is None:
            return cls(workers, 0 if workers == 1 else None)
        if isinstance(worker, bool) or not isinstance(worker, int) or not 0 <= worker < workers:
            raise ParallelError(
                f"worker={worker!r} must be an integer in 0..{workers - 1} (this process's index among workers={workers}); "
                f"leave worker unset to merge what the {workers} workers wrote"
            )
        return cls(workers, worker)

    @property
    def merge_only(self) -> bool:
        """True when this process computes nothing and only merges (workers > 1, no worker given)."""
        return self.worker is None

    @property
    def tag(self) -> str:
        """'w<i>' for worker i, 'merge' for a merge-only process (used in temporary file names)."""
        return "merge" if self.worker is None else f"w{self.worker}"

    def indices(self, n: int, block: int = 1) -> list[int]:
        """This worker's item indices among `n` items (none when merging only)."""
        return [] if self.worker is None else worker_indices(n, self.workers, self.worker, block)

    def __str__(self) -> str:
        return f"worker {self.worker} of {self.workers}" if self.worker is not None else f"merge of {self.workers} workers"


# -- slicing -----------------------------------------------------------------------------------------------------
def owner(index: int, workers: int, block: int = 1) -> int:
    """The worker that takes item `index`: block index // `block`, modulo `workers`."""
    return (index // block) % workers


def worker_indices(n: int, workers: int, worker: int, block: int = 1) -> list[int]:
    """Indices (ascending) of the items among `n` that `worker` of `workers` takes, in blocks of `block` items."""
    if block < 1:
        raise ParallelError(f"block={block!r} must be an integer >= 1")
    return [i for i in range(n) if owner(i, workers, block) == worker]


def worker_slice(items: Sequence[T], workers: int, worker: int, block: int = 1) -> list[T]:
    """The items `worker` of `workers` takes (see `worker_indices`), in their order."""
    return [items[i] for i in worker_indices(len(items), workers, worker, block)]


def merge_slices(parts: Mapping[int, Sequence[T]], n: int, workers: int, block: int = 1) -> list[T]:
    """Inverse of `worker_slice`: the `n` items back in canonical order from every worker's list."""
    missing = missing_workers(parts, workers)
    if missing:
        raise ParallelError(f"cannot merge: the parts of workers {missing} (of {workers}) are missing")
    out: list[T] = []
    taken = {w: 0 for w in range(workers)}
    for i in range(n):
        w = owner(i, workers, block)
        if taken[w] >= len(parts[w]):
            raise ParallelError(f"worker {w}'s part has {len(parts[w])} items; {n} items over {workers} workers "
                                f"in blocks of {block} give it more")
        out.append(parts[w][taken[w]])
        taken[w] += 1
    extra = {w: len(parts[w]) - k for w, k in taken.items() if len(parts[w]) != k}
    if extra:
        raise ParallelError(f"parts hold more items than {n} over {workers} workers give them: {extra}")
    return out


def missing_workers(parts: Mapping[int, Any], workers: int) -> list[int]:
    """The workers in 0..workers-1 without a part."""
    return [w for w in range(workers) if w not in parts]


# -- shared files ------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], Any], tag: str = "") -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then `os.replace` it onto `path`.

    The temporary name is `.<name>.tmp-<tag>-<pid>` (`tag` names the writer, e.g. 'w3'), so a worker can clean
    up what its own earlier, killed incarnation left without touching files other live workers are writing.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}-{tag + '-' if tag else ''}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path`.lock while the block runs (several processes update `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- parts of a split unit of work -------------------------------------------------------------------------------
def part_path(directory: Path, worker: int, workers: int) -> Path:
    """Where worker `worker` of `workers` writes its part in `directory`."""
    return Path(directory) / PART_PATTERN.format(worker=worker, workers=workers)


def write_part(directory: Path, worker: int, workers: int, payload: Mapping[str, Any]) -> Path:
    """Write one worker's part (a JSON object) atomically; returns its path."""
    path = part_path(directory, worker, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(payload), allow_nan=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), tag=f"w{worker}")
    return path


def read_parts(directory: Path, workers: int) -> dict[int, dict[str, Any]]:
    """The parts present in `directory` for a run over `workers` workers: worker -> payload."""
    parts: dict[int, dict[str, Any]] = {}
    for w in range(workers):
        path = part_path(directory, w, workers)
        if path.is_file():
            try:
                parts[w] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ParallelError(f"{path} is not readable JSON ({exc}); delete it and rerun worker={w}") from exc
    return parts


# -- liveness of workers that wait on each other ----------------------------------------------------------------
RUNNING, DONE, FAILED = "running", "done", "failed"


def read_status(directory: Path, worker: int, workers: int) -> Optional[dict[str, Any]]:
    """Worker `worker`'s status file in `directory` (see `Heartbeat`); None when it has none or it is unreadable."""
    path = part_path(directory, worker, workers)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Heartbeat:
    """While the block runs, a daemon thread rewrites this worker's status file every `interval` seconds.

    The file (`<directory>/worker-<i>-of-<N>.json`, written atomically) holds worker, workers, pid, host, state
    (`running`; on leaving the block `done`, or `failed` when the block raised), a beat counter and `info` (whatever
    the step wants its peers to see; `update(**info)` adds to it). A worker killed outright leaves `running` with a
    beat that no longer changes: its peers call it gone `timeout` seconds later (`PeerWatch`).
    """

    def __init__(self, directory: Path, worker: int, workers: int, interval: float = 5.0,
                 info: Optional[Mapping[str, Any]] = None) -> None:
        self.path = part_path(directory, worker, workers)
        self.worker, self.workers, self.interval = int(worker), int(workers), float(interval)
        self.info: dict[str, Any] = dict(info or {})
        self.beat = 0
        self.state = RUNNING
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def update(self, **info: Any) -> None:
        """Add `info` to what the status file shows (written at the next beat)."""
        with self._lock:
            self.info.update(info)

    def _write(self) -> None:
        with self._lock:
            self.beat += 1
            status = {"worker": self.worker, "workers": self.workers, "pid": os.getpid(), "host": socket.gethostname(),
                      "state": self.state, "beat": self.beat, "info": dict(self.info)}
        text = json.dumps(status, default=str)
        try:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text), tag=f"w{self.worker}")
        except OSError as exc:  # a missed beat is no reason to stop the work; peers allow `timeout` seconds
            log.warning("could not write the status file %s: %s", self.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def __enter__(self) -> "Heartbeat":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-w{self.worker}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.state = DONE if exc_type is None else FAILED
        self._write()


class PeerWatch:
    """Which of the other workers are alive, judged from their status files by this process's clock (`Heartbeat`).

    A peer is alive while its state is `running` and its (beat, state) changed within the last `timeout` seconds;
    a peer without a status file gets `timeout` seconds from when the watch began to write one.
    """

    def __init__(self, directory: Path, workers: int, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory, self.workers, self.timeout, self.clock = Path(directory), int(workers), float(timeout), clock
        self.started = clock()
        self._seen: dict[int, tuple[Any, Any, Any]] = {}  # worker -> (pid, beat, state) last read
        self._changed: dict[int, float] = {}  # worker -> when that value was first read
        self.moved: set[int] = set()  # workers whose status changed while watched: surely running now
        self.last: dict[int, dict[str, Any]] = {}  # worker -> its status as last read

    def status(self, worker: int) -> Optional[dict[str, Any]]:
        """The peer's status file now (None when absent), noting when it last changed."""
        status = read_status(self.directory, worker, self.workers)
        if status is None:
            self.last.pop(worker, None)
        else:
            self.last[worker] = status
            value = (status.get("pid"), status.get("beat"), status.get("state"))
            if self._seen.get(worker) != value:
                if worker in self._seen:
                    self.moved.add(worker)
                self._seen[worker] = value
                self._changed[worker] = self.clock()
        return status

    def alive(self, worker: int) -> bool:
        """True while the peer may still do its share (module docstring)."""
        status = self.status(worker)
        now = self.clock()
        if status is None:
            return now - self.started < self.timeout
        return status.get("state") == RUNNING and now - self._changed[worker] < self.timeout


__all__ = [
    "DONE", "FAILED", "Heartbeat", "ParallelError", "PeerWatch", "RUNNING", "WorkerSpec", "atomic_write", "locked",
    "merge_slices", "missing_workers", "owner", "part_path", "read_parts", "read_status", "worker_indices",
    "worker_slice", "write_part",
]
