"""The shapes world as a task: generated scenes and questions, exact match per question family and overall."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator, Sequence

from vlm.shapes.world import FAMILIES, SPLIT_SEEDS, WorldOptions, iter_split_questions, render_scene
from vlm.tasks.base import Task, TaskError, VQASample, register_task
from vlm.tasks.metrics import check_lengths, exact_match, grouped_mean


def _check_sizes(sizes: Sequence[Sequence[int]] | None) -> list[tuple[int, int]] | None:
    """`image_sizes` as (width, height) pairs of positive ints, or TaskError naming the bad entry."""
    if sizes is None:
        return None
    out = []
    for size in sizes:
        pair = list(size) if isinstance(size, (list, tuple)) else [size]
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise TaskError(f"shapes: image_sizes entry {size!r} must be [width, height] in pixels, e.g. [168, 112]")
        out.append((pair[0], pair[1]))
    if not out:
        raise TaskError("shapes: image_sizes=[] gives no size; leave it null for the world's own size")
    return out


@register_task("shapes")
class ShapesTask(Task):
    """Procedural VQA on the shapes world (no download): `n_per_family` questions of each family per split.

    Questions come one per scene and family, scenes in seed order from the split's first seed, interleaved,
    so any prefix of a split is about balanced over families and the same on every machine. The prompt is the
    bare question: the demo model was trained on `USER: <image>\\n{question} ASSISTANT:` with no suffix.
    `image_sizes` ([[width, height], ...]): sample i's image resized to entry i mod n (images of different sizes,
    for models whose vision-token count follows the image).
    """

    name = "shapes"
    splits = tuple(SPLIT_SEEDS)
    max_new_tokens = 2

    def __init__(self, split: str = "test", limit: int | None = None, n_per_family: int = 200,
                 families: Sequence[str] = FAMILIES, min_objects: int | None = None,
                 max_objects: int | None = None, prompt_suffix: str = "",
                 image_sizes: Sequence[Sequence[int]] | None = None) -> None:
        unknown = set(families) - set(FAMILIES)
        if unknown:
            raise TaskError(f"shapes: unknown families {sorted(unknown)}; known: {list(FAMILIES)}")
        if n_per_family < 1:
            raise TaskError(f"shapes: n_per_family must be >= 1, got {n_per_family}")
        if split not in self.splits:
            raise TaskError(f"shapes: no split {split!r}; available splits: {list(self.splits)}")
        opts = WorldOptions()
        if min_objects is not None:
            opts = replace(opts, min_objects=min_objects)
        if max_objects is not None:
            opts = replace(opts, max_objects=max_objects)
        try:
            self.options = opts.check()
        except ValueError as e:
            raise TaskError(f"shapes: {e}") from e
        self.split = split
        self.limit = limit
        self.n_per_family = n_per_family
        self.families = tuple(families)
        self.prompt_suffix = prompt_suffix
        self.image_sizes = _check_sizes(image_sizes)

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[VQASample]:
        """The split's samples (default: the configured split and limit)."""
        return super().samples(split or self.split, limit if limit is not None else self.limit)

    def _load(self, split: str) -> Iterator[VQASample]:
        for index, (scene, q) in enumerate(iter_split_questions(split, self.n_per_family, self.options, self.families)):
            qi = scene.questions.index(q)
            meta: dict[str, Any] = {"family": q.family, "seed": scene.seed, "question_index": qi,
                                    "objects": list(q.objects), "n_objects": len(scene.objects)}
            image = render_scene(scene)
            if self.image_sizes:  # sample i at size i mod len(image_sizes): images of different sizes in one split
                image = image.resize(self.image_sizes[index % len(self.image_sizes)])
            yield VQASample(sample_id=f"{split}/{scene.seed}/{qi}", image=image, question=q.text,
                            prompt=f"{q.text}{self.prompt_suffix}", answers=[q.answer], meta=meta)

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """"score" = exact-match accuracy over all questions; "accuracy/<family>" per family."""
        check_lengths(predictions, samples, self.name)
        hits = [exact_match(p, s.answers) for p, s in zip(predictions, samples)]
        out = {"score": sum(hits) / len(hits), "accuracy": sum(hits) / len(hits), "n": float(len(hits))}
        return out | grouped_mean(hits, [s.meta["family"] for s in samples], "accuracy")
