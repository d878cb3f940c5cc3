"""POPE (lmms-lab/POPE): yes/no object-hallucination probes on COCO, in adversarial/popular/random categories."""
from __future__ import annotations

from typing import Iterator, Sequence

from vlm.tasks.base import VQASample, register_task
from vlm.tasks.hub import SHORT_ANSWER_PROMPT, HubTask, to_pil
from vlm.tasks.metrics import POPE_CATEGORIES, check_lengths, pope_metrics


@register_task("pope")
class POPETask(HubTask):
    """POPE in the lmms-lab schema: question_id, question, answer (yes/no), image, category, image_source, id.

    Split "test" is the default config (all three categories, told apart by `category`); "adversarial",
    "popular" and "random" are the splits of the hub's "Full" config.
    """

    name = "pope"
    splits = ("test",) + POPE_CATEGORIES
    max_new_tokens = 16
    required_columns = ("question_id", "question", "answer", "image")
    full_config = "Full"

    def __init__(self, path: str | None = None, hub_id: str | None = "lmms-lab/POPE", split: str = "test",
                 limit: int | None = None, prompt_suffix: str = SHORT_ANSWER_PROMPT,
                 cache_dir: str | None = None) -> None:
        super().__init__(path=path, hub_id=hub_id, split=split, limit=limit, cache_dir=cache_dir)
        self.prompt_suffix = prompt_suffix

    def config_for(self, split: str) -> str | None:
        """No config for "test"; the "Full" config for the per-category splits."""
        return None if split == "test" else self.full_config

    def _load(self, split: str) -> Iterator[VQASample]:
        ds = self.load(split, columns=self.required_columns + (("category",) if split == "test" else ()))
        for row in ds:
            question = row["question"].strip()
            yield VQASample(
                sample_id=str(row["question_id"]) if split == "test" else f"{split}/{row['question_id']}",
                image=to_pil(row["image"], where=f"pope question {row['question_id']}"),
                question=question,
                prompt=f"{question}{self.prompt_suffix}",
                answers=[row["answer"].strip().lower()],
                meta={
                    "question_id": row["question_id"],
                    "category": row.get("category") or split,
                    "image_source": row.get("image_source"),
                },
            )

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        """"score" = F1 averaged over the categories present (LLaVA-1.5's POPE number); pooled accuracy,
        precision, recall, f1, yes_ratio, unparsed; and the same per category ("random/f1", ...)."""
        check_lengths(predictions, samples, self.name)
        out = pope_metrics(predictions, [s.answers[0] for s in samples], [s.meta["category"] for s in samples])
        return {"score": out["f1_mean"]} | out
