"""Task loaders on tiny fixtures written in the lmms-lab schemas, their scores, and their error messages."""
from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf
from PIL import Image

import vlm.tasks.hub as hub
from tests import task_fixtures as fx
from vlm.tasks import TaskError, build_task, registered_tasks

SHORT = "\nAnswer the question using a single word or phrase."
TASK_NAMES = ("vqav2", "gqa", "textvqa", "pope", "mme", "scienceqa_img")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.fixture
def cache(tmp_path: Path) -> str:
    """A throwaway datasets cache, so parquet conversions stay in the test's tmp dir."""
    return str(tmp_path / "hf-cache")


def test_all_tasks_registered():
    assert set(TASK_NAMES) <= set(registered_tasks())


def test_unknown_task_and_split_errors(tmp_path, cache):
    with pytest.raises(TaskError, match="unknown task 'vqa3'"):
        build_task("vqa3")
    with pytest.raises(TaskError, match=r"no split 'val'; available splits: \['test'"):
        build_task("mme", path=str(tmp_path), split="val")
    task = build_task("mme", path=str(fx.write_mme(tmp_path / "mme")), cache_dir=cache)
    with pytest.raises(TaskError, match="no split 'dev'"):
        list(task.samples("dev"))


# ------------------------------------------------------------------ VQAv2


def test_vqav2_loads_save_to_disk_and_scores(tmp_path, cache):
    task = build_task("vqav2", path=str(fx.write_vqav2(tmp_path / "vqav2")), cache_dir=cache)
    samples = list(task.samples())
    assert [s.sample_id for s in samples] == ["9001", "9002", "42001"]
    first = samples[0]
    assert first.prompt == "How many dogs are there?" + SHORT
    assert first.question == "How many dogs are there?"
    assert len(first.answers) == 10 and first.answers.count("two") == 2
    assert first.meta["question_id"] == 9001 and first.meta["answer_type"] == "number"
    assert isinstance(first.image, Image.Image) and first.image.mode == "RGB" and first.image.size == (8, 8)
    assert first.image.getpixel((0, 0)) == (255, 0, 0)
    # "2": 6 x "2" + 2 x "two" = 8 of 10 -> 1.0; "no" vs 10 x "yes" -> 0; "red": 2 of 10 -> 0.6
    scores = task.score(["2", "no", "red"], samples)
    assert scores["score"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    assert scores["answer_type/yes/no"] == 0.0
    assert scores["answer_type/other"] == pytest.approx(0.6)
    assert [s.sample_id for s in task.samples(limit=2)] == ["9001", "9002"]


def test_vqav2_missing_column_is_named(tmp_path, cache):
    task = build_task("vqav2", path=str(fx.write_vqav2(tmp_path / "vqav2", drop=("answers",))), cache_dir=cache)
    with pytest.raises(TaskError, match=r"lacks column\(s\) \['answers'\].*lmms-lab schema"):
        list(task.samples())


def test_vqav2_unknown_split_in_saved_dict(tmp_path, cache):
    task = build_task("vqav2", path=str(fx.write_vqav2(tmp_path / "vqav2")), split="testdev", cache_dir=cache)
    with pytest.raises(TaskError, match=r"has no split 'testdev'; available splits: \['validation'\]"):
        list(task.samples())


def test_score_needs_one_prediction_per_sample(tmp_path, cache):
    task = build_task("vqav2", path=str(fx.write_vqav2(tmp_path / "vqav2")), cache_dir=cache)
    samples = list(task.samples())
    with pytest.raises(ValueError, match="got 2 predictions for 3 samples"):
        task.score(["2", "yes"], samples)


# ------------------------------------------------------------------ GQA


def test_gqa_joins_images_by_image_id(tmp_path, cache):
    task = build_task("gqa", path=str(fx.write_gqa(tmp_path / "gqa")), cache_dir=cache)
    samples = list(task.samples())
    assert [s.sample_id for s in samples] == ["201307251", "201640614", "20968379"]
    assert samples[1].prompt == "Who is wearing a dress?" + SHORT
    assert samples[1].answers == ["woman"]
    assert samples[1].meta["structural_type"] == "query" and samples[1].meta["question_type"] == "relS"
    # n161313 is the second image row (yellow), n235859 the first (blue): the join is by id, not position
    assert samples[0].image.getpixel((0, 0)) == (255, 255, 0)
    assert samples[1].image.getpixel((0, 0)) == (0, 0, 255)
    scores = task.score(["No.", "Woman", "yes"], samples)
    assert scores["score"] == pytest.approx(2 / 3)
    assert scores["structural/verify"] == pytest.approx(0.5)
    assert scores["structural/query"] == 1.0


def test_gqa_unknown_split_lists_splits_found(tmp_path, cache):
    task = build_task("gqa", path=str(fx.write_gqa(tmp_path / "gqa")), split="val", cache_dir=cache)
    with pytest.raises(TaskError, match=r"no split 'val': the folder of its config 'val_balanced_instructions' is "
                                        r"missing \(folders there: \['testdev_balanced_images', "):
        list(task.samples())


# ------------------------------------------------------------------ TextVQA


def test_textvqa_prompt_with_and_without_ocr(tmp_path, cache):
    root = str(fx.write_textvqa(tmp_path / "textvqa"))
    plain = list(build_task("textvqa", path=root, cache_dir=cache).samples())
    assert plain[0].prompt == "what is the brand of this camera?" + SHORT
    with_ocr = list(build_task("textvqa", path=root, ocr=True, cache_dir=cache).samples())
    assert with_ocr[0].prompt == "what is the brand of this camera?\nReference OCR token: MIX, dakota" + SHORT
    assert with_ocr[0].meta["ocr_tokens"] == ["MIX", "dakota"]
    task = build_task("textvqa", path=root, cache_dir=cache)
    # "nous les gosses": 3 of 10 -> 0.9; "Copenhagen": 9 of 10 -> 1.0
    assert task.score(["Nous les gosses", "Copenhagen"], plain)["score"] == pytest.approx(0.95)


def test_textvqa_unknown_split_lists_splits_found(tmp_path, cache):
    task = build_task("textvqa", path=str(fx.write_textvqa(tmp_path / "textvqa")), split="test", cache_dir=cache)
    with pytest.raises(TaskError, match=r"has no split 'test'; splits found there: \['validation'\]"):
        list(task.samples())


def test_textvqa_ocr_needs_ocr_tokens(tmp_path, cache):
    root = str(fx.write_textvqa(tmp_path / "textvqa", drop=("ocr_tokens",)))
    assert len(list(build_task("textvqa", path=root, cache_dir=cache).samples())) == 2
    with pytest.raises(TaskError, match=r"lacks column\(s\) \['ocr_tokens'\]"):
        list(build_task("textvqa", path=root, ocr=True, cache_dir=cache).samples())


# ------------------------------------------------------------------ POPE


def test_pope_test_split_and_category_scores(tmp_path, cache):
    task = build_task("pope", path=str(fx.write_pope(tmp_path / "pope")), cache_dir=cache)
    samples = list(task.samples())
    assert len(samples) == 6
    assert samples[0].prompt == "Is there a dog in the image?" + SHORT
    assert [s.meta["category"] for s in samples] == ["adversarial"] * 2 + ["popular"] * 2 + ["random"] * 2
    assert [s.answers for s in samples[:2]] == [["yes"], ["no"]]
    # adversarial: says yes to both (P=0.5, R=1, F1=2/3); popular and random answered right (F1=1)
    preds = ["Yes.", "Yes", "yes", "No, there is not.", "Yes", "No"]
    scores = task.score(preds, samples)
    assert scores["adversarial/f1"] == pytest.approx(2 / 3)
    assert scores["random/f1"] == 1.0
    assert scores["score"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert scores["yes_ratio"] == pytest.approx(4 / 6)
    assert scores["accuracy"] == pytest.approx(5 / 6)


def test_pope_category_split_from_full_config(tmp_path, cache):
    task = build_task("pope", path=str(fx.write_pope(tmp_path / "pope")), split="adversarial", cache_dir=cache)
    samples = list(task.samples())
    assert [s.sample_id for s in samples] == ["adversarial/1", "adversarial/2"]
    assert {s.meta["category"] for s in samples} == {"adversarial"}


# ------------------------------------------------------------------ MME


def test_mme_prompt_and_scores(tmp_path, cache):
    root = str(fx.write_mme(tmp_path / "mme"))
    task = build_task("mme", path=root, cache_dir=cache)
    samples = list(task.samples())
    assert samples[0].prompt == "Is there a train in this image? Please answer yes or no." + SHORT
    assert samples[0].sample_id == "existence/000000006040.jpg#0"
    assert samples[0].meta == {"question_id": "existence/000000006040.jpg", "category": "existence"}
    lmms = list(build_task("mme", path=root, keep_yes_no_hint=False, cache_dir=cache).samples())
    assert lmms[0].prompt == "Is there a train in this image?" + SHORT
    # existence image: both right -> 200; code image: one right -> acc 50 + acc+ 0 = 50
    scores = task.score(["Yes", "No", "Yes", "Yes"], samples)
    assert scores["existence"] == 200.0 and scores["code_reasoning"] == 50.0
    assert scores["score"] == scores["perception"] == 200.0
    assert scores["cognition"] == 50.0 and scores["total"] == 250.0


def test_mme_missing_category_column(tmp_path, cache):
    task = build_task("mme", path=str(fx.write_mme(tmp_path / "mme", drop=("category",))), cache_dir=cache)
    with pytest.raises(TaskError, match=r"lacks column\(s\) \['category'\]"):
        next(iter(task.samples()))


# ------------------------------------------------------------------ ScienceQA-IMG


def test_scienceqa_img_skips_imageless_and_formats_choices(tmp_path, cache):
    task = build_task("scienceqa_img", path=str(fx.write_scienceqa(tmp_path / "sqa")), cache_dir=cache)
    samples = list(task.samples())
    assert [s.sample_id for s in samples] == ["test/0", "test/2"]  # row 1 has no image
    assert samples[0].prompt == (
        "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert samples[1].prompt.startswith("Context: Select the best answer.\nWhich property")
    assert samples[1].answers == ["C"] and samples[1].meta["choices"] == ["shiny", "slippery", "opaque"]
    scores = task.score(["A", "B. slippery"], samples)
    assert scores["score"] == pytest.approx(0.5)
    assert scores["subject/social science"] == 1.0 and scores["subject/natural science"] == 0.0


def test_scienceqa_config_folder_must_exist(tmp_path, cache):
    root = fx.write_scienceqa(tmp_path / "sqa", config="ScienceQA-FULL")
    task = build_task("scienceqa_img", path=str(root), split="validation", cache_dir=cache)
    with pytest.raises(TaskError, match=r"config 'ScienceQA-IMG' is missing \(folders there: \['ScienceQA-FULL'\]"):
        list(task.samples())


# ------------------------------------------------------------------ hub path and local-path errors


def test_hub_id_goes_to_load_dataset(monkeypatch, cache):
    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split))
        raise ValueError(f'Unknown split "{split}". Should be one of [\'test\'].')

    monkeypatch.setattr(hub.datasets, "load_dataset", fake_load_dataset)
    task = build_task("scienceqa_img", split="validation", cache_dir=cache)
    with pytest.raises(TaskError, match=r"hub dataset 'lmms-lab/ScienceQA'.*no split 'validation'"):
        list(task.samples())
    assert calls == [("lmms-lab/ScienceQA", "ScienceQA-IMG", "validation")]
    task = build_task("pope", split="random", cache_dir=cache)
    with pytest.raises(TaskError):
        list(task.samples())
    assert calls[-1] == ("lmms-lab/POPE", "Full", "random")


def test_local_path_errors(tmp_path, cache):
    with pytest.raises(TaskError, match="does not exist or is not a directory"):
        list(build_task("mme", path=str(tmp_path / "nowhere"), cache_dir=cache).samples())
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="holds no dataset.*data/test-00000-of-00001.parquet"):
        list(build_task("mme", path=str(tmp_path / "empty"), cache_dir=cache).samples())
    with pytest.raises(TaskError, match="give either `path`"):
        list(build_task("mme", hub_id=None, cache_dir=cache).samples())


def test_single_saved_dataset_is_taken_as_the_split(tmp_path, cache):
    root = fx.write_mme(tmp_path / "mme")
    single = tmp_path / "single"
    datasets.load_from_disk(str(root))["test"].save_to_disk(str(single))
    assert len(list(build_task("mme", path=str(single), cache_dir=cache).samples())) == 4


# ------------------------------------------------------------------ configs/data


@pytest.mark.parametrize("name", ["vqav2", "gqa", "textvqa", "pope", "mme", "scienceqa_img"])
def test_data_config_builds_its_task(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert {"task", "split", "limit", "path", "hub_id"} <= set(cfg)
    task = build_task(cfg.pop("task"), **cfg)
    assert task.name == name and task.split in task.splits and task.hub_id.startswith("lmms-lab/")
