"""GQA (lmms-lab/GQA): compositional questions; questions and images are separate configs joined on imageId."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

from vlm.tasks.base import TaskError, VQASample, register_task
from vlm.tasks.hub import SHORT_ANSWER_PROMPT, HubTask, to_pil
from vlm.tasks.metrics import check_lengths, exact_match, grouped_mean


@register_task("gqa")
class GQATask(HubTask):
    """GQA: config `<split>_<subset>_instructions` (id, imageId, question, answer, types, ...) plus config
    `<split>_<subset>_images` (id, image). A questions dataset that already has an `image` column is used as is."""

    name = "gqa"
    splits = ("testdev", "val", "train")  # the test / challenge configs carry no answers
    max_new_tokens = 16
    required_columns = ("id", "imageId", "question", "answer")

    def __init__(self, path: str | None = None, hub_id: str | None = "lmms-lab/GQA", split: str = "testdev",
                 limit: int | None = None, subset: str = "balanced", prompt_suffix: str = SHORT_ANSWER_PROMPT,
                 cache_dir: str | None = None) -> None:
        super().__init__(path=path, hub_id=hub_id, split=split, limit=limit, cache_dir=cache_dir)
        if subset not in ("balanced", "all"):
            raise TaskError(f"task 'gqa': subset must be 'balanced' or 'all', got {subset!r}")
        self.subset = subset
        self.prompt_suffix = prompt_suffix

    def config_for(self, split: str) -> str:
        """The instructions config of `split`, e.g. testdev_balanced_instructions."""
        return f"{split}_{self.subset}_instructions"

    def _images(self, split: str) -> tuple[Any, dict[str, int]]:
        """The images config of `split` and a map imageId -> row (images are decoded only when used)."""
        images = self.load(split, config=f"{split}_{self.subset}_images", columns=("id", "image"))
        return images, {str(i): row for row, i in enumerate(images["id"])}

    def _load(self, split: str) -> Iterator[VQASample]:
        questions = self.load(split)
        joined = "image" in questions.column_names
        if not joined:
            images, index = self._images(split)
        for row in questions:
            image_id = str(row["imageId"])
            if joined:
                image = row["image"]
            else:
                if image_id not in index:
                    raise TaskError(f"task 'gqa': question {row['id']} refers to imageId {image_id!r}, which the "
                                    f"images config {split}_{self.subset}_images of {self.source} does not hold")
                image = images[index[image_id]]["image"]
            types = row.get("types") or {}
            yield VQASample(
                sample_id=str(row["id"]),
                image=to_pil(image, where=f"gqa question {row['id']}"),
                question=row["question"],
                prompt=f"{row['question']}{self.prompt_suffix}",
                answers=[row["answer"]],
                meta={
                    "question_id": row["id"],
                    "image_id": image_id,
                    "full_answer": row.get("fullAnswer"),
                    "question_type": types.get("detailed") if isinstance(types, dict) else None,
                    "structural_type": types.get("structural") if isinstance(types, dict) else None,
                    "semantic_type": types.get("semantic") if isinstance(types, dict) else None,
                },
            )

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """Exact-match accuracy ("score") and per structural type ("structural/query", "structural/verify", ...)."""
        check_lengths(predictions, samples, self.name)
        hits = [exact_match(p, s.answers) for p, s in zip(predictions, samples)]
        out = {"score": sum(hits) / len(hits)}
        out |= grouped_mean(hits, [str(s.meta.get("structural_type") or "unknown") for s in samples], "structural")
        return out
