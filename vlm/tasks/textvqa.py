"""TextVQA (lmms-lab/textvqa): questions about text in images, VQA accuracy over 10 human answers."""
from __future__ import annotations

from typing import Iterator, Sequence

from vlm.tasks.base import TaskError, VQASample, register_task
from vlm.tasks.hub import SHORT_ANSWER_PROMPT, HubTask, to_pil
from vlm.tasks.metrics import check_lengths, vqa_accuracy

OCR_PREFIX = "\nReference OCR token: "


@register_task("textvqa")
class TextVQATask(HubTask):
    """TextVQA in the lmms-lab schema: question_id, question, image, answers[str], ocr_tokens[str], image_id, ...

    `ocr=True` adds the LLaVA-1.5 line "Reference OCR token: a, b, c" between question and instruction
    (lmms-eval's default is off).
    """

    name = "textvqa"
    splits = ("validation", "train", "test")  # test carries no answers
    max_new_tokens = 16
    required_columns = ("question_id", "question", "image", "answers")

    def __init__(self, path: str | None = None, hub_id: str | None = "lmms-lab/textvqa", split: str = "validation",
                 limit: int | None = None, ocr: bool = False, prompt_suffix: str = SHORT_ANSWER_PROMPT,
                 cache_dir: str | None = None) -> None:
        super().__init__(path=path, hub_id=hub_id, split=split, limit=limit, cache_dir=cache_dir)
        self.ocr = ocr
        self.prompt_suffix = prompt_suffix

    def _load(self, split: str) -> Iterator[VQASample]:
        ds = self.load(split, columns=self.required_columns + (("ocr_tokens",) if self.ocr else ()))
        for row in ds:
            question = row["question"]
            ocr_tokens = list(row.get("ocr_tokens") or [])
            ocr_line = f"{OCR_PREFIX}{', '.join(ocr_tokens)}" if self.ocr else ""
            yield VQASample(
                sample_id=str(row["question_id"]),
                image=to_pil(row["image"], where=f"textvqa question {row['question_id']}"),
                question=question,
                prompt=f"{question}{ocr_line}{self.prompt_suffix}",
                answers=[str(a) for a in (row["answers"] or [])],
                meta={"question_id": row["question_id"], "image_id": row.get("image_id"), "ocr_tokens": ocr_tokens},
            )

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """VQA accuracy ("score")."""
        check_lengths(predictions, samples, self.name)
        unanswered = [s.sample_id for s in samples if not s.answers]
        if unanswered:
            raise TaskError(f"task 'textvqa': {len(unanswered)} sample(s) have no reference answers (e.g. "
                            f"{unanswered[:3]}); score the 'validation' split")
        accs = [vqa_accuracy(p, s.answers) for p, s in zip(predictions, samples)]
        return {"score": sum(accs) / len(accs)}
