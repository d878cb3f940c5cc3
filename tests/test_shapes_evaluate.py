"""Reporting of the demo-model evaluation: per-family tables and the relative family's split by question kind."""
from __future__ import annotations

from PIL import Image

from vlm.shapes.evaluate import accuracy_table, markdown, relative_split
from vlm.tasks.base import VQASample


def _sample(question: str, answer: str, family: str) -> VQASample:
    return VQASample(sample_id=question, image=Image.new("RGB", (4, 4)), question=question, prompt=question,
                     answers=[answer], meta={"family": family})


SAMPLES = [
    _sample("Is the red circle left or right of the blue square?", "left", "relative"),
    _sample("Is the blue square left or right of the red circle?", "right", "relative"),
    _sample("Is the red circle above or below the blue square?", "above", "relative"),
    _sample("Is the blue square above or below the red circle?", "below", "relative"),
    _sample("What color is the triangle?", "green", "color"),
]


def test_relative_split_separates_the_two_axes():
    preds = ["left", "left", "above", "below", "green"]
    split = relative_split(preds, SAMPLES)
    assert split == {"above or below": {"accuracy": 1.0, "n": 2}, "left or right of": {"accuracy": 0.5, "n": 2}}
    assert accuracy_table(preds, SAMPLES) == {"overall": 0.8, "color": 1.0, "relative": 0.75}


def test_markdown_reports_the_check_and_the_relative_split():
    preds = {"unpruned": ["left", "right", "above", "below", "green"],
             "attention": ["left", "left", "above", "below", "red"],
             "random/0": ["right", "left", "above", "above", "red"]}
    tables = {k: accuracy_table(p, SAMPLES) for k, p in preds.items()}
    summary = {"model": "m", "split": "test", "n_questions": 5, "keep": 64, "layer": 2, "random_seeds": [0],
               "tables": tables, "attention_retention": 0.6, "random_drop_points": 80.0, "random_std": 0.0,
               "relative_split": {k: relative_split(p, SAMPLES) for k, p in preds.items()}}
    text = markdown(summary)
    assert "| unpruned | 100.0 | 100.0 | 100.0 |" in text
    assert "keeps 60.0% of the unpruned accuracy; random-64 loses 80.0 points" in text
    assert "| above or below (n=2) | left or right of (n=2) |" in text
    assert "| random/0 | 20.0 | 0.0 | 25.0 |" in text
    assert "| random/0 | 50.0 | 0.0 |" in text
    assert "full world (3-6 objects)" in text
