"""ScienceQA-IMG (lmms-lab/ScienceQA, config ScienceQA-IMG): multiple-choice science questions with an image."""
from __future__ import annotations

from typing import Iterator, Sequence

from vlm.tasks.base import VQASample, register_task
from vlm.tasks.hub import HubTask, to_pil
from vlm.tasks.metrics import check_lengths, choice_letters, grouped_mean, multiple_choice_accuracy, parse_choice

CHOICE_PROMPT = "\nAnswer with the option's letter from the given choices directly."


@register_task("scienceqa_img")
class ScienceQAImgTask(HubTask):
    """ScienceQA in the lmms-lab schema: image (None for text-only questions), question, choices[str],
    answer (index), hint (the context), subject, grade, topic, category, skill, task, lecture, solution.

    Prompt as LLaVA-1.5 / lmms-eval: "Context: <hint>\\n" when there is a hint, the question, "A. ...\\nB. ...",
    then the instruction. Questions without an image are skipped.
    """

    name = "scienceqa_img"
    splits = ("test", "validation", "train")
    max_new_tokens = 16
    required_columns = ("image", "question", "choices", "answer", "hint")

    def __init__(self, path: str | None = None, hub_id: str | None = "lmms-lab/ScienceQA", split: str = "test",
                 limit: int | None = None, config: str | None = "ScienceQA-IMG", prompt_suffix: str = CHOICE_PROMPT,
                 cache_dir: str | None = None) -> None:
        super().__init__(path=path, hub_id=hub_id, split=split, limit=limit, config=config, cache_dir=cache_dir)
        self.prompt_suffix = prompt_suffix

    def _load(self, split: str) -> Iterator[VQASample]:
        ds = self.load(split)
        for index, row in enumerate(ds):
            if row["image"] is None:
                continue
            choices = [str(c) for c in row["choices"]]
            letters = choice_letters(len(choices))
            options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
            context = f"Context: {row['hint']}\n" if row["hint"] else ""
            answer = int(row["answer"])
            yield VQASample(
                sample_id=f"{split}/{index}",
                image=to_pil(row["image"], where=f"scienceqa {split} row {index}"),
                question=row["question"],
                prompt=f"{context}{row['question']}\n{options}{self.prompt_suffix}",
                answers=[letters[answer]],
                meta={
                    "question_id": f"{split}/{index}",
                    "choices": choices,
                    "answer_index": answer,
                    "subject": row.get("subject"),
                    "category": row.get("category"),
                    "grade": row.get("grade"),
                    "has_context": bool(row["hint"]),
                },
            )

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """Accuracy of the parsed option letter ("score"), share unparsed, and accuracy per subject."""
        check_lengths(predictions, samples, self.name)
        choices = [s.meta["choices"] for s in samples]
        answers = [s.meta["answer_index"] for s in samples]
        out = multiple_choice_accuracy(predictions, answers, choices)
        hits = [float(parse_choice(p, c) == a) for p, c, a in zip(predictions, choices, answers)]
        return {"score": out["accuracy"]} | out | grouped_mean(
            hits, [str(s.meta.get("subject") or "unknown") for s in samples], "subject")
