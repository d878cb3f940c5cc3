"""Shared dataset loading for the VQA tasks: a hub id or a local directory, one split, checked columns.

A local `path` may be
  * a `save_to_disk` directory: a DatasetDict (splits inside), a Dataset at `path/<split>` (or at
    `path/<config>/<split>`), or a single Dataset at `path` itself (then taken as the requested split);
  * a directory of parquet / arrow files in the lmms-lab hub layout: `<config or data>/<split>-*.parquet`,
    `<config>/<split>/*.parquet` (the hub's parquet-converter layout) or `<split>-*.parquet` at the top.
Without `path`, `datasets.load_dataset(hub_id, config, split=split)` is used (downloads, needs a token for
some lmms-lab copies).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
from PIL import Image

from vlm.tasks.base import Task, TaskError, VQASample

DATA_FILE_SUFFIXES: tuple[str, ...] = (".parquet", ".arrow")
# LLaVA-1.5's instruction for short answers (VQAv2, GQA, TextVQA, POPE, MME), as in lmms-eval's task YAMLs.
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


def _is_saved_dataset(directory: Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk`."""
    return (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file()


def _is_saved_dataset_dict(directory: Path) -> bool:
    """True for a directory written by `DatasetDict.save_to_disk`."""
    return (directory / "dataset_dict.json").is_file()


def _split_of_file(file: Path, folder: Path) -> str:
    """Split name a data file stands for: `<split>-00000-of-00001.parquet` or `<split>/<any>.parquet`."""
    if file.parent != folder:
        return file.parent.name
    stem = file.name
    for suffix in DATA_FILE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.split("-")[0]


def _data_files(folder: Path) -> list[Path]:
    """Parquet / arrow files directly in `folder` or one level below it."""
    files = [f for f in folder.glob("*") if f.is_file() and f.suffix in DATA_FILE_SUFFIXES]
    files += [f for f in folder.glob("*/*") if f.is_file() and f.suffix in DATA_FILE_SUFFIXES]
    return sorted(files)


def find_split_files(root: Path, split: str, config: str | None = None) -> tuple[list[Path], list[str]]:
    """Data files of `split` under `root` in the lmms-lab layout, and every split name seen there."""
    folders = ([root / config] if config else []) + [root / "data", root]
    seen: set[str] = set()
    for folder in folders:
        if not folder.is_dir():
            continue
        files = [f for f in _data_files(folder) if not (folder == root and f.parent.name in {config, "data"})]
        by_split: dict[str, list[Path]] = {}
        for f in files:
            by_split.setdefault(_split_of_file(f, folder), []).append(f)
        seen.update(by_split)
        if split in by_split:
            return by_split[split], sorted(seen)
    return [], sorted(seen)


def _wrap_split_error(exc: Exception, where: str, split: str) -> TaskError:
    """A TaskError for a split `datasets` refused, keeping its list of splits."""
    return TaskError(f"{where} has no split {split!r} ({exc}); pass one of the splits it lists")


def load_split(
    *,
    split: str,
    path: str | None = None,
    hub_id: str | None = None,
    config: str | None = None,
    cache_dir: str | None = None,
    task: str = "task",
) -> datasets.Dataset:
    """One split of a dataset, from a local directory (`path`, preferred) or the hub (`hub_id`)."""
    if path is not None:
        return _load_local(Path(path).expanduser(), split=split, config=config, cache_dir=cache_dir, task=task)
    if hub_id is None:
        raise TaskError(f"task {task!r}: give either `path` (a local dataset directory) or `hub_id` (e.g. an "
                        f"lmms-lab dataset id); both are None")
    try:
        return datasets.load_dataset(hub_id, config, split=split, cache_dir=cache_dir)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise _wrap_split_error(exc, f"task {task!r}: hub dataset {hub_id!r} (config {config!r})", split) from exc
        raise


def _load_local(root: Path, *, split: str, config: str | None, cache_dir: str | None, task: str) -> datasets.Dataset:
    """`load_split` for a local directory (see the module docstring for the layouts)."""
    where = f"task {task!r}: dataset directory {str(root)!r}"
    if not root.is_dir():
        raise TaskError(f"{where} does not exist or is not a directory; pass a `save_to_disk` directory or a "
                        f"folder of parquet files in the lmms-lab layout")
    bases = ([root / config] if config else []) + [root]
    for base in bases:
        if _is_saved_dataset_dict(base):
            splits = json.loads((base / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise TaskError(f"{where}: saved DatasetDict at {str(base)!r} has no split {split!r}; "
                                f"available splits: {splits}")
            return datasets.load_from_disk(str(base / split))
        if _is_saved_dataset(base / split):
            return datasets.load_from_disk(str(base / split))
    if _is_saved_dataset(root):
        return datasets.load_from_disk(str(root))
    files, seen = find_split_files(root, split, config)
    if not files:
        if config and not (root / config).is_dir() and any(p.is_dir() for p in root.iterdir()):
            folders = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise TaskError(f"{where} has no split {split!r}: the folder of its config {config!r} is missing "
                            f"(folders there: {folders})")
        if seen:
            raise TaskError(f"{where} has no split {split!r}; splits found there: {seen}")
        raise TaskError(f"{where} holds no dataset: expected a `save_to_disk` directory or parquet/arrow files "
                        f"named like '{(config + '/') if config else 'data/'}{split}-00000-of-00001.parquet'")
    kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
    return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)


def require_columns(ds: datasets.Dataset, columns: Sequence[str], *, task: str, split: str, source: str) -> None:
    """Raise TaskError naming the missing columns (and the ones present) unless `ds` has all `columns`."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise TaskError(
            f"task {task!r}: dataset {source} (split {split!r}) lacks column(s) {missing}; it has "
            f"{sorted(ds.column_names)}, the task needs {list(columns)} (the lmms-lab schema)"
        )


def undecoded_images(ds: datasets.Dataset) -> datasets.Dataset:
    """`ds` with its image columns left as bytes/paths, so that `to_pil` decodes each image and a broken one is
    reported with its row instead of failing inside the dataset's iterator."""
    for name, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def to_pil(value: Any, *, where: str) -> Image.Image:
    """An RGB PIL image from what a dataset row holds: a PIL image, {'bytes', 'path'}, bytes or a file path."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            image = Image.open(value)
        else:
            raise TaskError(f"{where}: no usable image (got {type(value).__name__}); expected a PIL image, image "
                            f"bytes or a file path")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError (an OSError), truncated data
        if isinstance(err, TaskError):
            raise
        raise TaskError(f"{where}: the image cannot be decoded ({err}); fix or drop that row of the dataset") from None


class HubTask(Task):
    """A Task read from an lmms-lab style dataset: hub id or local directory, a default split and limit."""

    required_columns: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | None = None,
        hub_id: str | None = None,
        split: str | None = None,
        limit: int | None = None,
        config: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.path = path
        self.hub_id = hub_id
        self.split = split if split is not None else self.splits[0]
        if self.split not in self.splits:
            raise TaskError(f"task {self.name!r} has no split {self.split!r}; available splits: {list(self.splits)}")
        if limit is not None and limit < 0:
            raise TaskError(f"task {self.name!r}: limit must be a count >= 0 or None, got {limit}")
        self.limit = limit
        self.config = config
        self.cache_dir = cache_dir

    @property
    def source(self) -> str:
        """Where the data comes from, for messages."""
        return repr(self.path) if self.path is not None else f"{self.hub_id!r}"

    def config_for(self, split: str) -> str | None:
        """Hub config (subset) that holds `split`; subclasses override when it depends on the split."""
        return self.config

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[VQASample]:
        """Samples of `split` (default: the task's split), at most `limit` (default: the task's limit)."""
        return super().samples(split if split is not None else self.split, limit if limit is not None else self.limit)

    def load(self, split: str, config: str | None = None, columns: Sequence[str] | None = None) -> datasets.Dataset:
        """The dataset of `split`, checked to have `columns` (default: the task's required columns)."""
        ds = load_split(
            split=split, path=self.path, hub_id=self.hub_id, cache_dir=self.cache_dir, task=self.name,
            config=config if config is not None else self.config_for(split),
        )
        require_columns(ds, self.required_columns if columns is None else columns, task=self.name, split=split,
                        source=self.source)
        return undecoded_images(ds)
