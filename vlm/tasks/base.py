"""The task contract: a VQA dataset as data (samples) plus its official metric."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image

from vlm.errors import UserError


@dataclass
class VQASample:
    """One question about one image, in the form every task yields."""

    sample_id: str
    image: Image.Image
    question: str  # the raw question as the dataset gives it
    prompt: str  # the user turn's text: question plus the task's instruction (LLaVA-1.5 style)
    answers: list[str]  # reference answers (VQAv2: the 10 human answers; others: one)
    meta: dict[str, Any] = field(default_factory=dict)  # category, family, question_id, choices, ...


class TaskError(UserError, ValueError):
    """A dataset or task configuration that cannot be used; the message says what would be right."""


class Task:
    """A VQA task: `samples(split)` yields VQASample; `score(predictions, samples)` gives the official metrics.

    Subclasses set `name`, `splits` and `max_new_tokens`, and implement `_load(split)` and `score`.
    """

    name: str = "task"
    splits: tuple[str, ...] = ()
    max_new_tokens: int = 8

    def samples(self, split: str, limit: int | None = None) -> Iterator[VQASample]:
        if split not in self.splits:
            raise TaskError(f"task {self.name!r} has no split {split!r}; available splits: {list(self.splits)}")
        for i, sample in enumerate(self._load(split)):
            if limit is not None and i >= limit:
                return
            yield sample

    def _load(self, split: str) -> Iterator[VQASample]:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """Official metric(s) of `predictions[i]` against `samples[i]`; the key `"score"` is the headline number."""
        raise NotImplementedError  # pragma: no cover - abstract


DATA_RESERVED_KEYS = ("name", "task", "split", "limit", "options")


def data_spec(data: Mapping[str, Any]) -> dict[str, Any]:
    """A `configs/data/*.yaml` group as {name, task, split, limit, options}; options = `options:` plus other keys."""
    data = dict(data or {})
    task, split = data.get("task"), data.get("split")
    if not task or not split:
        raise TaskError(
            f"the data config needs `task` (a registered task name) and `split`, got task={task!r} split={split!r}; "
            "see configs/data/"
        )
    limit = data.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TaskError(f"data.limit={limit!r} must be a positive integer or null")
    options = dict(data.get("options") or {})
    options.update({k: v for k, v in data.items() if k not in DATA_RESERVED_KEYS})
    return {"name": data.get("name", f"{task}_{split}"), "task": str(task), "split": str(split), "limit": limit,
            "options": options}


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Class decorator: make a task constructible by name through `build_task`."""

    def wrap(factory: Callable[..., Task]) -> Callable[..., Task]:
        _TASKS[name] = factory
        return factory

    return wrap


def build_task(name: str, **kwargs: Any) -> Task:
    """Construct a registered task by name with its options (e.g. `path`, `hub_id`)."""
    import vlm.tasks  # noqa: F401  (registers the built-in tasks)

    if name not in _TASKS:
        raise TaskError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}")
    factory = _TASKS[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            hint = " (it generates its data: it reads no files)" if "path" in unknown and "path" not in allowed else ""
            raise TaskError(f"task {name!r} takes no option {', '.join(f'data.{k}' for k in unknown)}{hint}; "
                            f"its options are {['data.' + k for k in allowed]}")
    return factory(**kwargs)


def registered_tasks() -> Mapping[str, Callable[..., Task]]:
    import vlm.tasks  # noqa: F401

    return dict(_TASKS)
