"""Tiny VQA datasets in the real lmms-lab schemas, written to disk by the tests (never downloaded).

Each writer builds a few rows with 8x8 PIL images and saves them in one of the layouts `vlm.tasks.hub`
reads: a `save_to_disk` DatasetDict, or parquet files named like the hub's (`data/<split>-00000-of-00001.parquet`,
`<config>/<split>-...parquet`, `<config>/<split>/0000.parquet`). Schemas follow the dataset cards of
lmms-lab/VQAv2, GQA, textvqa, POPE, MME and ScienceQA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from datasets import Features, Image as ImageFeature, List, Value
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


def tiny_image(i: int, size: int = 8) -> Image.Image:
    """An 8x8 single-colour RGB image, a different colour per index."""
    return Image.new("RGB", (size, size), COLOURS[i % len(COLOURS)])


def _write_parquet(rows: dict[str, list[Any]], features: Features, file: Path) -> Path:
    """Rows -> one parquet file (with the datasets feature metadata, as the hub's files have)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(file))
    return file


VQAV2_FEATURES = Features({
    "question_type": Value("string"),
    "multiple_choice_answer": Value("string"),
    "answers": List({"answer": Value("string"), "answer_confidence": Value("string"), "answer_id": Value("int64")}),
    "image_id": Value("int64"),
    "answer_type": Value("string"),
    "question_id": Value("int64"),
    "question": Value("string"),
    "image": ImageFeature(),
})


def _ten(answers: list[str]) -> list[dict[str, Any]]:
    """Ten VQA answer records from ten strings."""
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]


def write_vqav2(root: Path, drop: tuple[str, ...] = ()) -> Path:
    """lmms-lab/VQAv2 as a `save_to_disk` DatasetDict with a 'validation' split of 3 questions."""
    rows = {
        "question_type": ["how many", "is the", "what color is the"],
        "multiple_choice_answer": ["2", "yes", "red"],
        "answers": [
            _ten(["2"] * 6 + ["two"] * 2 + ["3"] * 2),
            _ten(["yes"] * 10),
            _ten(["red"] * 2 + ["maroon"] * 8),
        ],
        "image_id": [9, 9, 42],
        "answer_type": ["number", "yes/no", "other"],
        "question_id": [9001, 9002, 42001],
        "question": ["How many dogs are there?", "Is the dog asleep?", "What color is the bus?"],
        "image": [tiny_image(0), tiny_image(0), tiny_image(1)],
    }
    ds = datasets.Dataset.from_dict(rows, features=VQAV2_FEATURES).remove_columns(list(drop))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(root))
    return root


GQA_INSTRUCTION_FEATURES = Features({
    "id": Value("string"),
    "imageId": Value("string"),
    "question": Value("string"),
    "answer": Value("string"),
    "fullAnswer": Value("string"),
    "isBalanced": Value("bool"),
    "types": {"structural": Value("string"), "semantic": Value("string"), "detailed": Value("string")},
})
GQA_IMAGE_FEATURES = Features({"id": Value("string"), "image": ImageFeature()})


def write_gqa(root: Path, split: str = "testdev") -> Path:
    """lmms-lab/GQA parquet layout: `<split>_balanced_instructions/` (3 questions) and `<split>_balanced_images/`."""
    questions = {
        "id": ["201307251", "201640614", "20968379"],
        "imageId": ["n161313", "n235859", "n161313"],
        "question": ["Is it overcast?", "Who is wearing a dress?", "Does the shirt have red color?"],
        "answer": ["no", "woman", "no"],
        "fullAnswer": ["No, it is clear.", "The woman is wearing a dress.", "No, the shirt is white."],
        "isBalanced": [True, True, True],
        "types": [
            {"structural": "verify", "semantic": "global", "detailed": "weatherVerify"},
            {"structural": "query", "semantic": "rel", "detailed": "relS"},
            {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
        ],
    }
    _write_parquet(questions, GQA_INSTRUCTION_FEATURES,
                   root / f"{split}_balanced_instructions" / f"{split}-00000-of-00001.parquet")
    images = {"id": ["n235859", "n161313"], "image": [tiny_image(2), tiny_image(3)]}
    _write_parquet(images, GQA_IMAGE_FEATURES, root / f"{split}_balanced_images" / f"{split}-00000-of-00001.parquet")
    return root


TEXTVQA_FEATURES = Features({
    "image_id": Value("string"),
    "question_id": Value("int32"),
    "question": Value("string"),
    "question_tokens": List(Value("string")),
    "image": ImageFeature(),
    "image_width": Value("int32"),
    "image_height": Value("int32"),
    "flickr_original_url": Value("string"),
    "flickr_300k_url": Value("string"),
    "answers": List(Value("string")),
    "image_classes": List(Value("string")),
    "set_name": Value("string"),
    "ocr_tokens": List(Value("string")),
})


def write_textvqa(root: Path, split: str = "validation", drop: tuple[str, ...] = ()) -> Path:
    """lmms-lab/textvqa parquet layout `data/<split>-00000-of-00001.parquet`, 2 questions."""
    rows = {
        "image_id": ["003a8ae2ef43b901", "0054c91397f2fe05"],
        "question_id": [34602, 34603],
        "question": ["what is the brand of this camera?", "what does the small white text say?"],
        "question_tokens": [["what", "is", "the", "brand"], ["what", "does", "the", "text", "say"]],
        "image": [tiny_image(4), tiny_image(5)],
        "image_width": [8, 8],
        "image_height": [8, 8],
        "flickr_original_url": ["", ""],
        "flickr_300k_url": ["", ""],
        "answers": [["nous les gosses"] * 3 + ["dakota"] * 7, ["copenhagen"] * 9 + ["copenhagen denmark"]],
        "image_classes": [["Camera"], ["Poster"]],
        "set_name": ["val", "val"],
        "ocr_tokens": [["MIX", "dakota"], ["COPENHAGEN", "DENMARK"]],
    }
    features = Features({k: v for k, v in TEXTVQA_FEATURES.items() if k not in drop})
    _write_parquet({k: v for k, v in rows.items() if k not in drop}, features,
                   root / "data" / f"{split}-00000-of-00001.parquet")
    return root


POPE_FEATURES = Features({
    "id": Value("string"),
    "question_id": Value("string"),
    "question": Value("string"),
    "answer": Value("string"),
    "image_source": Value("string"),
    "image": ImageFeature(),
    "category": Value("string"),
})


def _pope_rows(categories: list[str]) -> dict[str, list[Any]]:
    """Two POPE rows (one yes, one no) per category."""
    rows: dict[str, list[Any]] = {k: [] for k in POPE_FEATURES}
    for c, category in enumerate(categories):
        for k, (obj, answer) in enumerate([("dog", "yes"), ("surfboard", "no")]):
            n = 2 * c + k
            rows["id"].append(str(n))
            rows["question_id"].append(str(n + 1))
            rows["question"].append(f" Is there a {obj} in the image?")
            rows["answer"].append(answer)
            rows["image_source"].append(f"COCO_val2014_00000000{n:04d}")
            rows["image"].append(tiny_image(n))
            rows["category"].append(category)
    return rows


def write_pope(root: Path) -> Path:
    """lmms-lab/POPE layout: `data/test-...parquet` (all categories) and `Full/adversarial/0000.parquet`."""
    _write_parquet(_pope_rows(["adversarial", "popular", "random"]), POPE_FEATURES,
                   root / "data" / "test-00000-of-00001.parquet")
    _write_parquet(_pope_rows(["adversarial"]), POPE_FEATURES, root / "Full" / "adversarial" / "0000.parquet")
    return root


MME_FEATURES = Features({
    "question_id": Value("string"),
    "image": ImageFeature(),
    "question": Value("string"),
    "answer": Value("string"),
    "category": Value("string"),
})


def write_mme(root: Path, drop: tuple[str, ...] = ()) -> Path:
    """lmms-lab/MME as a `save_to_disk` DatasetDict, split 'test': 2 images x 2 questions (existence, code)."""
    rows = {
        "question_id": ["existence/000000006040.jpg"] * 2 + ["code_reasoning/0020.png"] * 2,
        "image": [tiny_image(0), tiny_image(0), tiny_image(1), tiny_image(1)],
        "question": [
            "Is there a train in this image? Please answer yes or no.",
            "Is there a bed in this image? Please answer yes or no.",
            "The image shows a python code. Is the output of the code 'Hello'? Please answer yes or no.",
            "The image shows a python code. Is the output of the code 'World'? Please answer yes or no.",
        ],
        "answer": ["Yes", "No", "Yes", "No"],
        "category": ["existence", "existence", "code_reasoning", "code_reasoning"],
    }
    ds = datasets.Dataset.from_dict(rows, features=MME_FEATURES).remove_columns(list(drop))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root))
    return root


SCIENCEQA_FEATURES = Features({
    "image": ImageFeature(),
    "question": Value("string"),
    "choices": List(Value("string")),
    "answer": Value("int8"),
    "hint": Value("string"),
    "task": Value("string"),
    "grade": Value("string"),
    "subject": Value("string"),
    "topic": Value("string"),
    "category": Value("string"),
    "skill": Value("string"),
    "lecture": Value("string"),
    "solution": Value("string"),
})


def write_scienceqa(root: Path, split: str = "test", config: str = "ScienceQA-IMG") -> Path:
    """lmms-lab/ScienceQA layout `<config>/<split>-00000-of-00001.parquet`: 3 rows, the 2nd without image."""
    rows = {
        "image": [tiny_image(6), None, tiny_image(7)],
        "question": [
            "Which of these states is farthest north?",
            "Which word would you find on a dictionary page?",
            "Which property do these three objects have in common?",
        ],
        "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["wire", "ball"],
                    ["shiny", "slippery", "opaque"]],
        "answer": [0, 0, 2],
        "hint": ["", "", "Select the best answer."],
        "task": ["closed choice"] * 3,
        "grade": ["grade2", "grade3", "grade4"],
        "subject": ["social science", "language science", "natural science"],
        "topic": ["geography", "reference-skills", "physics"],
        "category": ["Geography", "Reference skills", "Materials"],
        "skill": ["Read a map: cardinal directions", "Use guide words", "Compare properties of objects"],
        "lecture": ["", "", ""],
        "solution": ["", "", ""],
    }
    _write_parquet(rows, SCIENCEQA_FEATURES, root / config / f"{split}-00000-of-00001.parquet")
    return root
