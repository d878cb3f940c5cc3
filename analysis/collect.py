"""`python -m analysis.collect model=... data=... n_samples=...`: attention records over a calibration set.

Runs the model over the task's samples in batches inside an `AttentionCollector`, and writes the
records through `analysis.records.RecordStore` into the run directory (the Hydra run directory, or
`output=DIR`): a shard every `shard_size` samples, each written to a temporary name and renamed,
plus a manifest (model, data, reducer, layer and vision-token counts, versions; the sample ids per
shard). Rerunning into the same directory resumes: the samples already stored are skipped, so an
interrupted run loses at most the shard in progress.

Data parallel (`vlm.parallel`): `workers=N worker=i` makes this process one of N that share the run directory
(`output=DIR` is then required). The split's samples, in their order, are cut into blocks of `batch_size`, and block
k goes to worker k mod N, so every batch a worker runs is a batch of the one-worker run and the records are the same
numbers; each worker writes its own shards into the one store (the manifest is updated under a lock), resumes from
what it stored, and at the end says which workers' samples are still missing. `workers=N` without `worker` computes
nothing: it checks the store and names the workers whose samples are missing (exit status 2) or reports it complete.
Reading (`RecordStore.load`) orders samples by their index in the split, so an N-worker store reads exactly as a
one-worker one.

The data group (`configs/data/*.yaml`) gives `task` (a registered task name), `split`, optionally
`limit` (at most this many samples of the split) and the task's constructor options, either under
`options:` or as further top-level keys.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import hydra
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from analysis.collector import REDUCERS, AttentionCollector, BatchRecords
from analysis.records import RecordsError, RecordStore, pad_vision
from vlm.cli import hydra_run_dir, run_main
from vlm.errors import UserError
from vlm.models import LoadedModel, load_from_config
from vlm.parallel import WorkerSpec, owner
from vlm.prompts import encode_batch
from vlm.tasks.base import Task, TaskError, VQASample, build_task, data_spec

log = logging.getLogger(__name__)

TOOLKIT_DISTRIBUTION = "adaptinfer-toolkit"


class CollectError(UserError, ValueError):
    """A collection run that cannot start or go on; the message names the setting and what would be right."""


# -- configuration ---------------------------------------------------------------------------------------------
def _plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a DictConfig (or the value itself)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _positive_int(cfg: Mapping[str, Any], key: str) -> int:
    """cfg[key] as an int >= 1, or CollectError naming the key."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CollectError(f"{key}={value!r} must be a positive integer")
    return value


def output_dir(cfg: Mapping[str, Any]) -> Path:
    """`output` when set, else (on the command line) outputs/collect/<date>_<time>; CollectError outside Hydra."""
    if cfg.get("output"):
        return Path(str(cfg["output"]))
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return hydra_run_dir() or Path("outputs") / "collect" / time.strftime("%Y-%m-%d_%H-%M-%S")
    raise CollectError("output is not set and no Hydra run directory exists; pass output=DIR (a run directory)")


def versions() -> dict[str, str]:
    """Versions of torch, transformers and this toolkit (plus its git commit when available)."""
    try:
        toolkit = metadata.version(TOOLKIT_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a checkout that is not pip-installed
        toolkit = _setup_cfg_version() or "unknown"
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "toolkit": toolkit}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()
        if commit:
            out["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _setup_cfg_version() -> str | None:
    """The version in the checkout's setup.cfg, if there is one."""
    import configparser

    parser = configparser.ConfigParser()
    if parser.read(Path(__file__).resolve().parents[1] / "setup.cfg"):
        return parser.get("metadata", "version", fallback=None)
    return None


def model_identity(model_cfg: Mapping[str, Any], loaded: LoadedModel) -> dict[str, Any]:
    """What makes two runs' records comparable: name, source, dtype; for random weights the arch and seed too."""
    identity: dict[str, Any] = {
        "name": loaded.name,
        "source": str(model_cfg.get("source") or loaded.source),
        "revision": model_cfg.get("revision"),
        "dtype": str(loaded.dtype).replace("torch.", ""),
    }
    if not model_cfg.get("source"):
        arch = json.dumps(model_cfg.get("arch"), sort_keys=True, default=str)
        identity["arch_sha256"] = hashlib.sha256(arch.encode()).hexdigest()[:16]
        identity["seed"] = int(model_cfg.get("seed", 0))
        identity["processor"] = model_cfg.get("processor")
    return identity


def build_manifest(cfg: Mapping[str, Any], loaded: LoadedModel, data: Mapping[str, Any]) -> dict[str, Any]:
    """The run's manifest: identity fields (model, data, reducer, num_layers, num_vision), versions, settings.
    num_vision is null for a model whose vision-token count follows the image (Qwen2-VL with dynamic resolution):
    the store then keeps each sample's own count."""
    manifest = {
        "model": model_identity(cfg["model"], loaded),
        "data": {"name": data["name"], "task": data["task"], "split": data["split"], "options": data["options"]},
        "reducer": str(cfg["reducer"]),
        "num_layers": loaded.num_layers,
        "num_vision": loaded.fixed_vision_tokens,  # None: it follows each image's size
        "layers": list(range(loaded.num_layers)),
        "scalars_doc": {
            "vision_share": "mean over heads and text rows of the attention mass on vision tokens",
            "prior_entropy": "entropy (nats) over text tokens of the normalised AdaptInfer text prior, head-mean",
        },
        "versions": versions(),
        "settings": {k: cfg.get(k) for k in ("n_samples", "batch_size", "shard_size", "seed")} | {"limit": data["limit"]},
    }
    return json.loads(json.dumps(manifest, default=str))  # JSON types, as the stored manifest will read back


# -- the run ---------------------------------------------------------------------------------------------------
def _batches(samples: Iterator[VQASample], done: set[str], batch_size: int, progress: tqdm, spec: WorkerSpec,
             seen: dict[str, int]) -> Iterator[list[tuple[int, VQASample]]]:
    """Batches of (split index, sample) that are this worker's (blocks of `batch_size`, see `vlm.parallel`) and not
    yet done; checks ids are unique; records every id of the split in `seen` (id -> index); advances the bar per
    own sample."""
    batch: list[tuple[int, VQASample]] = []
    for index, sample in enumerate(samples):
        sid = str(sample.sample_id)
        if sid in seen:
            raise CollectError(f"sample id {sid!r} occurs twice in the data; records need unique sample ids")
        seen[sid] = index
        if spec.merge_only or owner(index, spec.workers, batch_size) != spec.worker:
            continue
        if sid in done:
            progress.update(1)
            continue
        batch.append((index, sample))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardBuffer:
    """Records waiting for their shard: at most `shard_size` + one batch samples."""

    def __init__(self, store: RecordStore, shard_size: int) -> None:
        self.store = store
        self.shard_size = shard_size
        self.ids: list[str] = []
        self.positions: list[int] = []  # each sample's index in the split
        self.t2v: list[torch.Tensor] = []  # each [b, L, V] ([b, L, Vmax of its batch] when V varies per sample)
        self.counts: list[int] = []  # each sample's vision tokens
        self.scalars: dict[str, list[torch.Tensor]] = {}  # name -> each [b, L]
        self.shards_written = 0

    def add(self, ids: Sequence[str], positions: Sequence[int], records: BatchRecords) -> None:
        """Queue a batch's records (samples at these split positions) and write every full shard."""
        self.ids.extend(ids)
        self.positions.extend(positions)
        self.t2v.append(records.t2v)
        self.counts.extend(records.vision_counts or [records.t2v.shape[-1]] * len(ids))
        for name, value in records.scalars.items():
            self.scalars.setdefault(name, []).append(value)
        while len(self.ids) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        """Write what is left as a last, smaller shard."""
        if self.ids:
            self._write(len(self.ids))

    def _write(self, n: int) -> None:
        width = max(part.shape[-1] for part in self.t2v)
        t2v = torch.cat([pad_vision(part, width) for part in self.t2v])  # [pending, L, Vmax]
        scalars = {name: torch.cat(parts) for name, parts in self.scalars.items()}  # each [pending, L]
        counts = self.counts[:n] if self.store.variable_vision else None
        self.store.write_shard(self.ids[:n], t2v[:n], {name: value[:n] for name, value in scalars.items()},
                               positions=self.positions[:n], vision_counts=counts)
        self.shards_written += 1
        self.ids = self.ids[n:]
        self.positions = self.positions[n:]
        self.counts = self.counts[n:]
        self.t2v = [t2v[n:]] if self.ids else []
        self.scalars = {name: [value[n:]] for name, value in scalars.items()} if self.ids else {}


def _build_task(data: Mapping[str, Any]) -> Task:
    """The data config's task, given its split too when its constructor takes one (lmms-lab tasks do)."""
    from vlm.tasks.base import registered_tasks

    options = dict(data["options"])
    factory = registered_tasks().get(data["task"])
    if factory is not None:
        params = inspect.signature(factory).parameters
        if "split" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            options.setdefault("split", data["split"])
    return build_task(data["task"], **options)


def run_collect(cfg: Mapping[str, Any] | DictConfig) -> Path:
    """Collect attention records as `cfg` says (see configs/collect.yaml); returns the run directory."""
    cfg = _plain(cfg)
    n_samples = _positive_int(cfg, "n_samples")
    batch_size = _positive_int(cfg, "batch_size")
    shard_size = _positive_int(cfg, "shard_size")
    spec = WorkerSpec.from_config(cfg)
    if spec.workers > 1 and not cfg.get("output"):
        raise CollectError(f"workers={spec.workers} needs output=DIR: every worker must write into the same record store")
    reducer = str(cfg.get("reducer"))
    if reducer not in REDUCERS:
        raise CollectError(f"reducer={reducer!r} is unknown; choose one of {sorted(REDUCERS)}")
    try:
        data = data_spec(cfg.get("data") or {})
    except TaskError as err:
        raise CollectError(str(err)) from err
    run_dir = output_dir(cfg)
    if cfg.get("seed") is not None:
        torch.manual_seed(int(cfg["seed"]))

    task = _build_task(data)
    target = n_samples if data["limit"] is None else min(n_samples, data["limit"])
    samples = task.samples(data["split"], limit=target)
    first = next(samples, None)
    if first is None:
        raise CollectError(
            f"task {data['task']!r} split {data['split']!r} gave no samples; check the data config "
            f"({data['name']}) and that the dataset is present"
        )

    def all_samples() -> Iterator[VQASample]:
        yield first
        yield from samples

    if spec.merge_only:
        return check_complete(run_dir, all_samples(), spec, batch_size)

    loaded = load_from_config(cfg["model"])
    if loaded.processor is None:
        raise CollectError(f"model preset {loaded.name!r} has no processor; set model.processor (e.g. 'demo')")
    manifest = build_manifest(cfg, loaded, data)
    store = RecordStore.create_or_resume(run_dir, manifest, writer=spec.tag)
    done = store.done_ids()
    log.info("collecting %s into %s as %s (%d samples already there)", data["name"], run_dir, spec, len(done))

    buffer = _ShardBuffer(store, shard_size)
    model = loaded.model
    seen: dict[str, int] = {}
    share = len(spec.indices(target, batch_size))
    with tqdm(total=share, desc=f"collect {data['name']}", unit="sample") as progress, \
            AttentionCollector(loaded, reducer=reducer) as collector:
        for indexed in _batches(all_samples(), done, batch_size, progress, spec, seen):
            batch = [sample for _, sample in indexed]
            inputs = encode_batch(loaded.processor, batch, device=loaded.device, dtype=loaded.dtype)
            try:
                with torch.inference_mode():
                    model(**inputs, use_cache=False, logits_to_keep=1)
            except BaseException:
                collector.discard()
                raise
            records = collector.consume()
            if store.num_vision is not None and set(records.vision_counts) != {store.num_vision}:
                raise CollectError(
                    f"a batch has {list(records.vision_counts)} vision tokens per sample but the run records "
                    f"{store.num_vision} (one image per sample); use a one-image task"
                )
            buffer.add([str(s.sample_id) for s in batch], [index for index, _ in indexed], records)
            progress.update(len(batch))
        buffer.flush()
    log.info("wrote %d shards; %d samples in %s", buffer.shards_written, len(store.refresh()), run_dir)
    if spec.workers > 1:
        missing = _missing_by_worker(store.done_ids(), seen, spec.workers, batch_size)
        if missing:
            log.info("this worker is done; still missing: %s", _describe_missing(missing))
        else:
            log.info("all %d workers' samples are stored: %s is complete", spec.workers, run_dir)
    return run_dir


def _missing_by_worker(done: set[str], seen: Mapping[str, int], workers: int, batch_size: int) -> dict[int, int]:
    """Worker -> how many of its samples (split index -> owner by blocks of batch_size) are not in `done`."""
    missing: dict[int, int] = {}
    for sid, index in seen.items():
        if sid not in done:
            w = owner(index, workers, batch_size)
            missing[w] = missing.get(w, 0) + 1
    return dict(sorted(missing.items()))


def _describe_missing(missing: Mapping[int, int]) -> str:
    return ", ".join(f"worker {w} ({n} samples)" for w, n in missing.items())


def check_complete(run_dir: Path, samples: Iterator[VQASample], spec: WorkerSpec, batch_size: int) -> Path:
    """Merge-only collection (`workers=N`, no `worker`): the store at `run_dir` holds every worker's samples, or
    CollectError names the workers whose samples are missing and the command that fills them in."""
    seen: dict[str, int] = {}
    with tqdm(disable=True) as progress:
        for _ in _batches(samples, set(), batch_size, progress, spec, seen):
            pass
    try:
        done = RecordStore.open(run_dir).done_ids()
    except RecordsError:  # no worker has written yet
        done = set()
    missing = _missing_by_worker(done, seen, spec.workers, batch_size)
    if missing:
        raise CollectError(
            f"{run_dir} lacks samples of {_describe_missing(missing)} (of workers={spec.workers}); rerun the same "
            f"command with worker=<i> for each of them (batch_size={batch_size} as the workers had)"
        )
    log.info("%s holds all %d samples of its %d workers", run_dir, len(seen), spec.workers)
    return run_dir


@hydra.main(config_path="../configs", config_name="collect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run_collect over the composed config."""
    run_dir = run_main(run_collect, cfg)
    print(f"records: {run_dir}")


if __name__ == "__main__":
    main()
