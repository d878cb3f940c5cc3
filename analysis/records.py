"""On-disk store of per-sample text-to-vision attention records, written in shards with a manifest.

Layout of a run directory::

    run_dir/
      manifest.json            identity (model, data, reducer, num_layers, num_vision), versions, shards
      shards/shard-00000.pt    {"ids": [str], "t2v": [N, L, V] float32, "scalars": {name: [N, L] float32}}

`num_vision` is the vision-token count V of every sample, or null when it varies per sample (Qwen2-VL's dynamic
resolution: V follows each image's size). A shard of such a store also holds `"vision_counts": [N] int64`, and its
t2v is [N, L, Vmax] with Vmax = the shard's largest count and zeros after each sample's own V. Fixed-V stores are
written exactly as before (no vision_counts), so stores written before variable V existed read unchanged.

Each shard is written to a temporary name in `shards/`; then, holding the store's lock
(`manifest.json.lock`, `vlm.parallel.locked`), the writer re-reads the manifest, takes the next shard
index, moves the shard into place with `os.replace` and saves the manifest (itself written to a
temporary file and replaced) with the shard added. So several writers (the workers of a data-parallel
collection, `writer` = their tag) can share one store: no update is lost when two finish together, and
no index is taken twice. A run that is interrupted loses at most the shard in progress: on resume,
`done_ids()` comes from the manifest, the writer's own leftover temporary files are removed (other
writers' are left alone: they may be live) and a shard file that the manifest does not list (moved
into place just before the interruption) is removed too, because its samples are not marked done and
will be collected again. Shards are read with `torch.load(weights_only=True)`, so no pickle code runs.

Shard entries may carry `positions` (each sample's index in the split's order); `load()` then returns
the samples in that order, whatever worker wrote them and when, so an N-worker store reads exactly as
a one-worker store of the same samples.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from vlm.errors import UserError
from vlm.parallel import TMP_MARKER, atomic_write, locked

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.pt$")
WRITER_TAG = re.compile(r"\.tmp-(w\d+|merge)-")  # the writer a temporary file belongs to
DEFAULT_WRITER = "w0"
IDENTITY_FIELDS = ("model", "data", "reducer", "num_layers", "num_vision")
REQUIRED_FIELDS = IDENTITY_FIELDS + ("versions",)
DEFAULT_SCALARS = ("vision_share", "prior_entropy")

ArrayLike = Union[Tensor, np.ndarray]


class RecordsError(UserError, RuntimeError):
    """A record store is missing, inconsistent with the caller, or damaged."""


def count_range(values) -> str:
    """Integer counts as 'v' when they are all equal, else 'lo..hi' ('0' for none)."""
    values = [int(v) for v in values]
    lo, hi = (min(values), max(values)) if values else (0, 0)
    return str(lo) if lo == hi else f"{lo}..{hi}"


@dataclass
class Records:
    """All samples of a record store, concatenated in the order the shards were written."""

    ids: list[str]
    t2v: Tensor  # [N, L, V] float32 text-to-vision attention per layer ([N, L, Vmax], zero-padded, when ragged)
    scalars: dict[str, Tensor]  # name -> [N, L] float32 per-layer scalar
    manifest: dict[str, Any] = field(default_factory=dict)
    vision_counts: Tensor | None = None  # [N] int64 vision tokens of each sample; None: every sample has V

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.t2v.ndim != 3 or self.t2v.shape[0] != n:
            raise RecordsError(f"Records.t2v has shape {tuple(self.t2v.shape)}; expected [N={n}, L, V]")
        if self.vision_counts is not None:
            counts = self.vision_counts
            if counts.shape != (n,) or counts.is_floating_point() or (n and not (
                    int(counts.min()) >= 1 and int(counts.max()) <= self.t2v.shape[2])):
                raise RecordsError(
                    f"Records.vision_counts must be [N={n}] ints in 1..{self.t2v.shape[2]} (the width of t2v), got "
                    f"{counts.tolist() if counts.numel() <= 8 else tuple(counts.shape)}")
        for name, values in self.scalars.items():
            if tuple(values.shape) != (n, self.t2v.shape[1]):
                raise RecordsError(
                    f"Records.scalars[{name!r}] has shape {tuple(values.shape)}; expected [N={n}, L={self.t2v.shape[1]}]"
                )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L."""
        return int(self.t2v.shape[1])

    @property
    def ragged(self) -> bool:
        """Whether the samples hold different numbers of vision tokens (t2v is then padded; see vision_mask)."""
        counts = self.vision_counts
        return counts is not None and bool((counts != self.t2v.shape[2]).any())

    @property
    def num_vision(self) -> int:
        """Number of vision tokens V of every sample; RecordsError when it differs between samples."""
        if self.ragged:
            raise RecordsError(
                f"these records hold a different number of vision tokens per sample ({self.vision_range()}); there "
                "is no one V: use vision_counts / vision_mask() / sample_t2v(i)"
            )
        return int(self.t2v.shape[2])

    @property
    def max_vision(self) -> int:
        """Width Vmax of t2v: the largest vision-token count of a sample."""
        return int(self.t2v.shape[2])

    def counts(self) -> Tensor:
        """[N] int64 vision tokens of each sample."""
        if self.vision_counts is not None:
            return self.vision_counts
        return torch.full((len(self.ids),), self.t2v.shape[2], dtype=torch.long)

    def vision_range(self) -> str:
        """The samples' vision-token counts as 'V' or 'Vmin..Vmax'."""
        return count_range(self.counts().tolist())

    def vision_mask(self) -> Tensor:
        """[N, Vmax] bool: True where t2v[i, :, v] is a real vision token of sample i."""
        return torch.arange(self.t2v.shape[2])[None, :] < self.counts()[:, None]

    def sample_t2v(self, i: int) -> Tensor:
        """Sample i's own attention: [L, V_i]."""
        return self.t2v[i, :, : int(self.counts()[i])]

    def mean_t2v(self) -> Tensor:
        """Mean text-to-vision attention over samples -> [L, V]; when ragged [L, Vmax], each token index averaged
        over the samples that have it."""
        if not self.ragged:
            return self.t2v.mean(dim=0)
        mask = self.vision_mask()  # [N, Vmax]
        return self.t2v.sum(dim=0) / mask.sum(0).clamp_min(1)[None, :]

    def mean_scalar(self, name: str) -> Tensor:
        """Mean of one per-layer scalar over samples. -> [L]"""
        if name not in self.scalars:
            raise KeyError(f"no scalar {name!r} in these records; have {sorted(self.scalars)}")
        return self.scalars[name].mean(dim=0)

    def subset(self, indices: Sequence[int]) -> "Records":
        """The records of the samples at `indices`, in that order."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Records(
            ids=[self.ids[i] for i in idx.tolist()],
            t2v=self.t2v[idx],
            scalars={k: v[idx] for k, v in self.scalars.items()},
            manifest=self.manifest,
            vision_counts=None if self.vision_counts is None else self.vision_counts[idx],
        )


def _as_float32(name: str, values: ArrayLike) -> Tensor:
    """A CPU float32 tensor from a tensor or array, rejecting non-float and non-finite input."""
    t = torch.from_numpy(np.asarray(values)) if isinstance(values, np.ndarray) else values
    if not isinstance(t, Tensor):
        raise RecordsError(f"{name} must be a torch.Tensor or numpy array, not {type(values).__name__}")
    if not t.is_floating_point():
        raise RecordsError(f"{name} must be floating point, got dtype {t.dtype}")
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise RecordsError(f"{name} has {bad} non-finite values (NaN/inf); check the collector's reducer")
    return t


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    """The parsed manifest of `run_dir`, or RecordsError if missing or unreadable."""
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        raise RecordsError(
            f"{path} does not exist: {run_dir} is not a record store "
            "(run `python -m analysis.collect` to create one, or pass the right directory)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordsError(f"{path} is not readable JSON ({exc}); restore it or start a new run directory") from exc
    if not isinstance(manifest, dict):
        raise RecordsError(f"{path} must hold a JSON object, found {type(manifest).__name__}")
    missing = [k for k in REQUIRED_FIELDS + ("shards",) if k not in manifest]
    if missing:
        raise RecordsError(f"{path} lacks the fields {missing}; it was not written by analysis.records")
    return manifest


def _check_new_manifest(manifest: Mapping[str, Any]) -> None:
    """Validate the caller's manifest for a new or resumed run."""
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise RecordsError(
            f"manifest lacks {missing}; it needs model, data (task, split), reducer, num_layers, num_vision "
            "and versions (torch, transformers, toolkit)"
        )
    for key in ("num_layers", "num_vision"):
        value = manifest[key]
        if key == "num_vision" and value is None:  # varies per sample
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecordsError(f"manifest[{key!r}] must be a positive int" + (
                " (or null: a different number per sample)" if key == "num_vision" else "") + f", got {value!r}")
    if "shards" in manifest:
        raise RecordsError("manifest['shards'] is managed by RecordStore; leave it out of the caller's manifest")
    try:
        json.dumps(dict(manifest))
    except TypeError as exc:
        raise RecordsError(f"manifest must be JSON-serialisable (plain dicts, lists, str, numbers): {exc}") from exc


class RecordStore:
    """A run directory of record shards; create or resume with `create_or_resume`, read with `open`."""

    def __init__(self, run_dir: Union[str, os.PathLike], manifest: dict[str, Any], writable: bool,
                 writer: str = DEFAULT_WRITER) -> None:
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.writable = writable
        self.writer = writer  # tag of this writer ('w<i>'), in its temporary file names

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, run_dir: Union[str, os.PathLike], manifest: Mapping[str, Any],
                         writer: str = DEFAULT_WRITER) -> "RecordStore":
        """Open `run_dir` for writing: create it with `manifest`, or resume it if its identity matches.

        Safe when several writers (tags `writer`, e.g. 'w0', 'w1') open the same directory at once: the first
        creates it, the others resume it.
        """
        _check_new_manifest(manifest)
        manifest = json.loads(json.dumps(dict(manifest)))  # JSON types (tuples -> lists), as stored manifests read back
        run_dir = Path(run_dir)
        with locked(run_dir / MANIFEST_NAME):
            return cls._create_or_resume_locked(run_dir, manifest, writer)

    @classmethod
    def _create_or_resume_locked(cls, run_dir: Path, manifest: dict[str, Any], writer: str) -> "RecordStore":
        shard_dir = run_dir / SHARD_DIR
        if (run_dir / MANIFEST_NAME).exists():
            existing = _read_manifest(run_dir)
            for key in IDENTITY_FIELDS:
                if existing[key] != manifest[key]:
                    raise RecordsError(
                        f"run directory {run_dir} was made for {key} {existing[key]!r}, not {manifest[key]!r}; "
                        "use a new directory (or the matching settings) to resume"
                    )
            if existing["versions"] != manifest["versions"]:
                log.warning("resuming %s with versions %s; it was started with %s", run_dir, manifest["versions"],
                            existing["versions"])
            store = cls(run_dir, existing, writable=True, writer=writer)
            store._recover()
            log.info("resuming %s: %d samples in %d shards", run_dir, len(store.done_ids()), len(existing["shards"]))
            return store
        stray = sorted(p.name for p in shard_dir.glob("shard-*.pt")) if shard_dir.is_dir() else []
        if stray:
            raise RecordsError(
                f"{shard_dir} holds {len(stray)} shard files ({stray[0]}, ...) but {run_dir} has no {MANIFEST_NAME}, "
                "so they cannot be resumed; restore the manifest, or move the shards away / use a new directory"
            )
        shard_dir.mkdir(parents=True, exist_ok=True)
        fresh = dict(manifest)
        fresh["format_version"] = FORMAT_VERSION
        fresh["scalar_names"] = None
        fresh["shards"] = []
        store = cls(run_dir, fresh, writable=True, writer=writer)
        store._clean_leftovers()
        store._save_manifest()
        return store

    @classmethod
    def open(cls, run_dir: Union[str, os.PathLike]) -> "RecordStore":
        """Open an existing store for reading."""
        run_dir = Path(run_dir)
        return cls(run_dir, _read_manifest(run_dir), writable=False)

    # ---- queries --------------------------------------------------------------------------------
    @property
    def shard_dir(self) -> Path:
        """Directory holding the shard files."""
        return self.run_dir / SHARD_DIR

    @property
    def num_layers(self) -> int:
        """Decoder layers L of every record."""
        return int(self.manifest["num_layers"])

    @property
    def num_vision(self) -> int | None:
        """Vision tokens V of every record; None when the store holds a different number per sample."""
        value = self.manifest["num_vision"]
        return None if value is None else int(value)

    @property
    def variable_vision(self) -> bool:
        """Whether the store holds a different number of vision tokens per sample (manifest num_vision null)."""
        return self.manifest["num_vision"] is None

    def done_ids(self) -> set[str]:
        """Ids of the samples in the shards the manifest lists."""
        return {i for shard in self.manifest["shards"] for i in shard["ids"]}

    def __len__(self) -> int:
        return sum(len(s["ids"]) for s in self.manifest["shards"])

    def refresh(self) -> "RecordStore":
        """Re-read the manifest from disk (other writers may have added shards); returns self."""
        self.manifest = _read_manifest(self.run_dir)
        return self

    # ---- writing --------------------------------------------------------------------------------
    def write_shard(self, ids: Sequence[str], t2v: ArrayLike, scalars: Mapping[str, ArrayLike],
                    positions: Sequence[int] | None = None, vision_counts: Sequence[int] | Tensor | None = None) -> Path:
        """Write one shard of N samples: t2v [N, L, V], scalars name -> [N, L]; returns its path.

        `positions` (optional, N ints): each sample's index in the split's order, by which `load()` orders samples.
        `vision_counts` (N ints): each sample's vision tokens V_i, needed by a store with a different V per sample
        (manifest num_vision null); t2v is then [N, L, W >= max V_i], read up to each V_i. A fixed-V store takes
        none (or counts all equal to its V).
        """
        if not self.writable:
            raise RecordsError(f"{self.run_dir} was opened read-only; use RecordStore.create_or_resume to write")
        ids = list(ids)
        n = len(ids)
        if n == 0:
            raise RecordsError("write_shard got no ids; write only non-empty shards")
        if not all(isinstance(i, str) for i in ids):
            raise RecordsError(f"sample ids must be str, got {sorted({type(i).__name__ for i in ids})}")
        if len(set(ids)) != n:
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise RecordsError(f"ids repeat within the shard: {dup}")
        already = self.done_ids().intersection(ids)
        if already:
            raise RecordsError(
                f"{len(already)} ids are already stored (e.g. {sorted(already)[:3]}); filter samples by done_ids()"
            )
        if positions is not None:
            positions = [int(p) for p in positions]
            if len(positions) != n:
                raise RecordsError(f"write_shard got {len(positions)} positions for {n} ids; give one per sample")
        L, V = self.num_layers, self.num_vision
        t2v_t = _as_float32("t2v", t2v)
        counts_t = self._check_counts(vision_counts, n, t2v_t)
        if counts_t is not None:
            t2v_t = _zero_padding(t2v_t[:, :, : int(counts_t.max())].contiguous(), counts_t)
        elif tuple(t2v_t.shape) != (n, L, V):
            raise RecordsError(f"t2v has shape {tuple(t2v_t.shape)}; expected [N={n}, L={L}, V={V}]")
        if t2v_t.shape[1] != L:
            raise RecordsError(f"t2v has shape {tuple(t2v_t.shape)}; expected [N={n}, L={L}, V]")
        names = sorted(scalars)
        expected = self.manifest.get("scalar_names")
        if expected is not None and names != expected:
            raise RecordsError(f"scalars are {names}; this store's earlier shards have {expected}")
        scalars_t: dict[str, Tensor] = {}
        for name in names:
            s = _as_float32(f"scalars[{name!r}]", scalars[name])
            if tuple(s.shape) != (n, L):
                raise RecordsError(f"scalars[{name!r}] has shape {tuple(s.shape)}; expected [N={n}, L={L}]")
            scalars_t[name] = s

        self.shard_dir.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {"ids": ids, "t2v": t2v_t, "scalars": scalars_t}
        if counts_t is not None:
            payload["vision_counts"] = counts_t
        pending = self.shard_dir / f".shard{TMP_MARKER}-{self.writer}-{os.getpid()}"
        try:
            torch.save(payload, pending)
            with open(pending, "rb") as fh:
                os.fsync(fh.fileno())
            with locked(self.run_dir / MANIFEST_NAME):  # other writers may have added shards since we last looked
                self.refresh()
                already = self.done_ids().intersection(ids)
                if already:
                    raise RecordsError(
                        f"{len(already)} ids were stored meanwhile by another writer (e.g. {sorted(already)[:3]}); "
                        "two writers were given the same samples: give each worker its own `worker=`"
                    )
                expected = self.manifest.get("scalar_names")
                if expected is not None and names != expected:
                    raise RecordsError(f"scalars are {names}; this store's earlier shards have {expected}")
                path = self.shard_dir / f"shard-{self._next_index():05d}.pt"
                os.replace(pending, path)
                entry: dict[str, Any] = {"file": path.name, "num_samples": n, "ids": ids}
                if positions is not None:
                    entry["positions"] = positions
                self.manifest["scalar_names"] = names
                self.manifest["shards"].append(entry)
                self._save_manifest()
        finally:
            if pending.exists():
                pending.unlink()
        return path

    def _check_counts(self, vision_counts: Sequence[int] | Tensor | None, n: int, t2v: Tensor) -> Tensor | None:
        """The shard's per-sample vision counts [N] int64 for a variable-V store (None for a fixed one); RecordsError
        naming what is wrong otherwise."""
        V = self.num_vision
        if vision_counts is None:
            if V is None:
                raise RecordsError(
                    "this store records a different number of vision tokens per sample (manifest num_vision null): "
                    "give write_shard vision_counts=[V_1, ..., V_N]"
                )
            return None
        counts = torch.as_tensor(vision_counts).detach().cpu()
        if counts.is_floating_point() or counts.shape != (n,) or (n and int(counts.min()) < 1):
            raise RecordsError(f"vision_counts must be {n} ints >= 1 (one per sample), got {counts.tolist()}")
        counts = counts.to(torch.int64)
        if V is not None:
            if bool((counts != V).any()):
                raise RecordsError(
                    f"vision_counts {counts.tolist()} differ from this store's num_vision={V}; a store with a "
                    "different V per sample needs num_vision: null in its manifest (use a new run directory)"
                )
            return None
        if t2v.ndim != 3 or t2v.shape[2] < int(counts.max()):
            raise RecordsError(f"t2v has shape {tuple(t2v.shape)}; expected [N={n}, L={self.num_layers}, "
                               f"W >= {int(counts.max())}] (the largest of vision_counts)")
        return counts

    # ---- reading --------------------------------------------------------------------------------
    def load(self) -> Records:
        """All samples, each shard checked against the manifest: in split order when every shard lists its samples'
        `positions` (stores written by analysis.collect, with any number of workers), else in writing order."""
        shards = self.manifest["shards"]
        if not shards:
            raise RecordsError(
                f"{self.run_dir} holds no records yet (manifest lists no shards); run `python -m analysis.collect` first"
            )
        ids: list[str] = []
        t2v: list[Tensor] = []
        counts: list[Tensor] = []
        scalars: dict[str, list[Tensor]] = {name: [] for name in self.manifest.get("scalar_names") or []}
        for entry in shards:
            data = self._read_shard(entry)
            ids.extend(data["ids"])
            t2v.append(data["t2v"])
            if self.variable_vision:
                counts.append(data["vision_counts"])
            for name in scalars:
                scalars[name].append(data["scalars"][name])
        width = max(part.shape[2] for part in t2v)
        records = Records(
            ids=ids,
            t2v=torch.cat([pad_vision(part, width) for part in t2v], dim=0),
            scalars={k: torch.cat(v, dim=0) for k, v in scalars.items()},
            manifest=dict(self.manifest),
            vision_counts=torch.cat(counts) if self.variable_vision else None,
        )
        if all("positions" in entry for entry in shards):
            positions = [p for entry in shards for p in entry["positions"]]
            order = sorted(range(len(positions)), key=positions.__getitem__)
            if order != list(range(len(positions))):
                records = records.subset(order)
        return records

    def iter_shards(self) -> Iterator[Records]:
        """Each listed shard as Records, in writing order, validated like load() (for runs too big to concatenate)."""
        for entry in self.manifest["shards"]:
            data = self._read_shard(entry)
            yield Records(ids=list(data["ids"]), t2v=data["t2v"], scalars=dict(data["scalars"]),
                          manifest=dict(self.manifest), vision_counts=data.get("vision_counts"))

    def _read_shard(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Load and validate one listed shard; RecordsError names the file and the remedy."""
        path = self.shard_dir / entry["file"]
        remedy = f"delete {path} and rerun `python -m analysis.collect` with the same run directory to resume"
        if not path.is_file():
            raise RecordsError(
                f"{path} is listed in {self.run_dir / MANIFEST_NAME} but missing; rerun "
                "`python -m analysis.collect` with the same run directory to collect its samples again"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise RecordsError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {remedy}") from exc
        L, V, n = self.num_layers, self.num_vision, int(entry["num_samples"])
        problem = None
        if not isinstance(data, dict) or not {"ids", "t2v", "scalars"} <= set(data):
            problem = "it is not a record shard (needs ids, t2v, scalars)"
        elif list(data["ids"]) != list(entry["ids"]):
            problem = "its ids differ from the ones the manifest lists for it"
        elif V is None and not _counts_fit(data.get("vision_counts"), data["t2v"], n, L):
            problem = (f"it needs vision_counts [N={n}] ints >= 1 and t2v [N={n}, L={L}, max(vision_counts)] (this "
                       "store has a different V per sample)")
        elif V is not None and (not isinstance(data["t2v"], Tensor) or tuple(data["t2v"].shape) != (n, L, V)):
            shape = tuple(getattr(data["t2v"], "shape", ()))
            problem = f"t2v has shape {shape}, expected [N={n}, L={L}, V={V}]"
        else:
            names = self.manifest.get("scalar_names") or []
            if sorted(data["scalars"]) != sorted(names):
                problem = f"its scalars are {sorted(data['scalars'])}, expected {names}"
            else:
                for name in names:
                    if tuple(data["scalars"][name].shape) != (n, L):
                        problem = f"scalars[{name!r}] has shape {tuple(data['scalars'][name].shape)}, expected [{n}, {L}]"
                        break
        if problem:
            raise RecordsError(f"{path} is corrupt: {problem}; {remedy}")
        return data

    # ---- internals ------------------------------------------------------------------------------
    def _next_index(self) -> int:
        """One past the highest shard index listed (indices are never reused within a manifest)."""
        indices = [int(SHARD_PATTERN.match(s["file"]).group(1)) for s in self.manifest["shards"]]
        return max(indices, default=-1) + 1

    def _save_manifest(self) -> None:
        """Write manifest.json atomically (callers hold the store's lock)."""
        text = json.dumps(self.manifest, indent=1)
        atomic_write(self.run_dir / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(text), tag=self.writer)

    def _mine(self, name: str) -> bool:
        """True for a temporary file this writer (or an untagged, single-writer run) left behind."""
        tag = WRITER_TAG.search(name)
        return TMP_MARKER in name and (tag is None or tag.group(1) == self.writer)

    def _clean_leftovers(self) -> None:
        """Remove this writer's temporary files and shard files the manifest does not list (an interrupted write).

        Called with the store's lock held, so an unlisted shard file cannot be one another writer is adding."""
        listed = {s["file"] for s in self.manifest["shards"]}
        if not self.shard_dir.is_dir():
            return
        for path in self.shard_dir.iterdir():
            if self._mine(path.name) or (SHARD_PATTERN.match(path.name) and path.name not in listed):
                log.warning("removing %s left by an interrupted write; its samples will be collected again", path)
                path.unlink()
        for path in self.run_dir.glob(f".{MANIFEST_NAME}{TMP_MARKER}*"):
            path.unlink()

    def _recover(self) -> None:
        """On resume: drop listed shards whose files were deleted, verify the rest, clean leftovers."""
        kept = []
        for entry in self.manifest["shards"]:
            if (self.shard_dir / entry["file"]).is_file():
                self._read_shard(entry)  # raises with the remedy if corrupt
                kept.append(entry)
            else:
                log.warning(
                    "%s is listed but missing; its %d samples will be collected again",
                    self.shard_dir / entry["file"],
                    entry["num_samples"],
                )
        if len(kept) != len(self.manifest["shards"]):
            self.manifest["shards"] = kept
            if not kept:
                self.manifest["scalar_names"] = None
            self._save_manifest()
        self._clean_leftovers()


def _counts_fit(counts: Any, t2v: Any, n: int, num_layers: int) -> bool:
    """Whether a variable-V shard's vision_counts [N] and t2v [N, L, max(counts)] agree."""
    if not isinstance(counts, Tensor) or not isinstance(t2v, Tensor) or counts.is_floating_point():
        return False
    if tuple(counts.shape) != (n,) or (n and int(counts.min()) < 1):
        return False
    return tuple(t2v.shape) == (n, num_layers, int(counts.max()) if n else 0)


def _zero_padding(t2v: Tensor, counts: Tensor) -> Tensor:
    """t2v [N, L, W] with the entries past each sample's count set to 0 (a copy only when something changes)."""
    pad = torch.arange(t2v.shape[2])[None, :] >= counts[:, None]  # [N, W]
    if not bool(pad.any()):
        return t2v
    return t2v.masked_fill(pad[:, None, :], 0.0)


def pad_vision(t2v: Tensor, width: int) -> Tensor:
    """t2v [N, L, W] zero-padded on the vision axis to [N, L, width]."""
    if t2v.shape[2] == width:
        return t2v
    return torch.nn.functional.pad(t2v, (0, width - t2v.shape[2]))


__all__ = [
    "count_range",
    "DEFAULT_SCALARS",
    "IDENTITY_FIELDS",
    "Records",
    "RecordStore",
    "RecordsError",
    "pad_vision",
]
