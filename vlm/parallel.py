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

`WorkerSpec.from_config` reads and checks the `workers` / `worker` config values. `worker` unset with `workers` > 1
means "merge only": compute nothing, put together what the workers wrote, and say which parts are missing.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from vlm.errors import UserError

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


__all__ = [
    "ParallelError", "WorkerSpec", "atomic_write", "locked", "merge_slices", "missing_workers", "owner", "part_path",
    "read_parts", "worker_indices", "worker_slice", "write_part",
]
