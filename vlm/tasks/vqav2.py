"""VQAv2 (lmms-lab/VQAv2): open-ended questions on COCO images, scored by VQA accuracy over 10 human answers."""
from __future__ import annotations

from typing import Iterator, Sequence

from vlm.tasks.base import TaskError, VQASample, register_task
from vlm.tasks.hub import SHORT_ANSWER_PROMPT, HubTask, to_pil
from vlm.tasks.metrics import check_lengths, grouped_mean, vqa_accuracy


@register_task("vqav2")
class VQAv2Task(HubTask):
    """VQAv2 in the lmms-lab schema: question_id, question, image, answers[{answer, ...}], answer_type, ..."""

    name = "vqav2"
    splits = ("validation", "testdev", "test")  # only validation carries answers; the others are for EvalAI
    max_new_tokens = 16
    required_columns = ("question_id", "question", "image", "answers")

    def __init__(self, path: str | None = None, hub_id: str | None = "lmms-lab/VQAv2", split: str = "validation",
                 limit: int | None = None, prompt_suffix: str = SHORT_ANSWER_PROMPT,
                 cache_dir: str | None = None) -> None:
        super().__init__(path=path, hub_id=hub_id, split=split, limit=limit, cache_dir=cache_dir)
        self.prompt_suffix = prompt_suffix

    def _load(self, split: str) -> Iterator[VQASample]:
        ds = self.load(split)
        for row in ds:
            question = row["question"]
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in (row["answers"] or [])]
            yield VQASample(
                sample_id=str(row["question_id"]),
                image=to_pil(row["image"], where=f"vqav2 question {row['question_id']}"),
                question=question,
                prompt=f"{question}{self.prompt_suffix}",
                answers=answers,
                meta={
                    "question_id": row["question_id"],
                    "image_id": row.get("image_id"),
                    "question_type": row.get("question_type"),
                    "answer_type": row.get("answer_type"),
                    "multiple_choice_answer": row.get("multiple_choice_answer"),
                },
            )

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """VQA accuracy overall ("score") and per answer type ("answer_type/yes/no", ".../number", ...)."""
        check_lengths(predictions, samples, self.name)
        unanswered = [s.sample_id for s in samples if not s.answers]
        if unanswered:
            raise TaskError(f"task 'vqav2': {len(unanswered)} sample(s) have no reference answers (e.g. "
                            f"{unanswered[:3]}); score the 'validation' split, or submit test/testdev to EvalAI")
        accs = [vqa_accuracy(p, s.answers) for p, s in zip(predictions, samples)]
        out = {"score": sum(accs) / len(accs)}
        out |= grouped_mean(accs, [str(s.meta.get("answer_type") or "unknown") for s in samples], "answer_type")
        return out
