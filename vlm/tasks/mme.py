"""MME (lmms-lab/MME): two yes/no questions per image over 14 subtasks; perception and cognition scores."""
from __future__ import annotations

from typing import Iterator, Sequence

from vlm.tasks.base import VQASample, register_task
from vlm.tasks.hub import SHORT_ANSWER_PROMPT, HubTask, to_pil
from vlm.tasks.metrics import check_lengths, mme_scores

YES_NO_HINT = " Please answer yes or no."


@register_task("mme")
class MMETask(HubTask):
    """MME in the lmms-lab schema: question_id (the image's path, shared by its two questions), image,
    question (ending in "Please answer yes or no."), answer (Yes/No), category (the subtask).

    The prompt is the question plus the short-answer instruction; `keep_yes_no_hint=False` drops the
    question's " Please answer yes or no." first, as lmms-eval does.
    """

    name = "mme"
    splits = ("test",)
    max_new_tokens = 16
    required_columns = ("question_id", "question", "answer", "image", "category")

    def __init__(self, path: str | None = None, hub_id: str | None = "lmms-lab/MME", split: str = "test",
                 limit: int | None = None, keep_yes_no_hint: bool = True, prompt_suffix: str = SHORT_ANSWER_PROMPT,
                 cache_dir: str | None = None) -> None:
        super().__init__(path=path, hub_id=hub_id, split=split, limit=limit, cache_dir=cache_dir)
        self.keep_yes_no_hint = keep_yes_no_hint
        self.prompt_suffix = prompt_suffix

    def _load(self, split: str) -> Iterator[VQASample]:
        ds = self.load(split)
        for index, row in enumerate(ds):
            question = row["question"].strip()
            asked = question if self.keep_yes_no_hint else question.replace(YES_NO_HINT, "")
            yield VQASample(
                sample_id=f"{row['question_id']}#{index}",
                image=to_pil(row["image"], where=f"mme question {row['question_id']}"),
                question=question,
                prompt=f"{asked}{self.prompt_suffix}",
                answers=[row["answer"]],
                meta={"question_id": row["question_id"], "category": row["category"]},
            )

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """"score" = perception score (the number papers report as MME); also cognition, total, per subtask."""
        check_lengths(predictions, samples, self.name)
        out = mme_scores(
            predictions,
            [s.answers[0] for s in samples],
            [s.meta["category"] for s in samples],
            [str(s.meta["question_id"]) for s in samples],
        )
        return {"score": out["perception"]} | out
