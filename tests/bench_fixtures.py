"""Helpers for the benchmark, results, notebook and demo tests: a tiny shapes-world task and model overrides.

`toy_shapes` is a minimal Task over the shapes world (one question per scene, exact match), so these tests do
not depend on the real shapes task; `tiny_model_cfg` is the tiny random-weight preset with its processor
saved to a temporary directory (the demo processor, built in code, so no trained weights are needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import OmegaConf

from vlm.tasks.base import Task, VQASample, register_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOY_TASK = "toy_shapes"


@register_task(TOY_TASK)
class ToyShapesTask(Task):
    """One question per shapes-world scene; score = exact match (lower-cased), plus the count answered."""

    name = TOY_TASK
    splits = ("test", "calibration")
    max_new_tokens = 2

    def __init__(self, **options: Any) -> None:
        self.options = options

    def _load(self, split: str) -> Iterator[VQASample]:
        from vlm.shapes.world import make_scene, render_scene, split_seeds

        start, _ = split_seeds(split)
        for i in range(10_000):
            scene = make_scene(start + i)
            q = scene.questions[i % len(scene.questions)]
            yield VQASample(sample_id=f"{split}-{i}", image=render_scene(scene), question=q.text, prompt=q.text,
                            answers=[q.answer], meta={"family": getattr(q, "family", "")})

    def score(self, predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
        hits = [p.strip().lower() == s.answers[0].lower() for p, s in zip(predictions, samples)]
        return {"score": sum(hits) / max(len(hits), 1), "answered": float(sum(bool(p) for p in predictions))}


class RegisterToyTask:
    """A Hydra callback that only imports this module (registering `toy_shapes`) inside each job's process."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        return None


def save_processor(directory: Path) -> Path:
    """Save the shapes-world processor (built in code) to `directory`; returns it."""
    from vlm.shapes.processor import build_processor

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "processor_config.json").exists() and not (directory / "tokenizer.json").exists():
        build_processor().save_pretrained(directory)
    return directory


def tiny_model_cfg(processor_dir: Path, device: str = "cpu") -> dict:
    """The tiny preset (configs/model/tiny.yaml) with its processor at `processor_dir`, on `device`."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "tiny.yaml"), resolve=True)
    cfg["processor"] = str(processor_dir)
    cfg["device"] = device
    return cfg


def toy_data_cfg(limit: int = 4, split: str = "test") -> dict:
    """A data group for the toy task."""
    return {"name": f"{TOY_TASK}_{split}", "task": TOY_TASK, "split": split, "limit": limit}


def write_front(front_dir: Path, entries: Sequence[tuple[float, list[int], float]], num_layers: int = 8,
                vision_tokens: int = 576) -> Path:
    """A derive output directory with a front (as analysis.derive rule=search writes it), processed convention:
    per (budget, stage layers, text_weight_blend) an adaptinfer schedule allocated at that budget, searched with
    that blend; returns front_dir."""
    import json

    from pruning.schedule import allocate_keep

    front_dir.mkdir(parents=True, exist_ok=True)
    front = []
    for budget, layers, blend in entries:
        schedule = allocate_keep(layers, num_layers, vision_tokens, budget, "processed", name=f"searched@{budget}")
        schedule.provenance = {"search": {"scorer": "adaptinfer", "scorer_options": {"text_weight_blend": blend}}}
        schedule.to_yaml(front_dir / f"schedule_{budget}.yaml")
        front.append({"budget": float(budget), "schedule": f"schedule_{budget}.yaml", "scorer": "adaptinfer",
                      "scorer_options": {"text_weight_blend": blend}})
    (front_dir / "front.json").write_text(json.dumps({"convention": "processed", "front": front}))
    return front_dir
