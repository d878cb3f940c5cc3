"""The shapes world: determinism, answers consistent with the rendered pixels, disjoint splits, the processor."""
from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage

from vlm.shapes.world import (COLORS, FAMILIES, GRID, NUMBER_WORDS, PLURALS, SHAPES, SPLIT_SEEDS, WorldOptions,
                              iter_split_questions, make_scene, object_masks, patch_labels, render_scene)

SEEDS = range(0, 40)


def test_same_seed_same_scene_image_and_questions():
    for seed in (0, 7, 12345):
        a, b = make_scene(seed), make_scene(seed)
        assert a.objects == b.objects and a.questions == b.questions
        assert np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(b)))
    assert make_scene(1).objects != make_scene(2).objects


def test_splits_are_disjoint_seed_ranges():
    ranges = sorted(SPLIT_SEEDS.values())
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop <= start
    test_seeds = {s.seed for s, _ in iter_split_questions("test", 30)}
    cal_seeds = {s.seed for s, _ in iter_split_questions("calibration", 30)}
    assert test_seeds and cal_seeds and not test_seeds & cal_seeds


def _color_pixels(img: np.ndarray, color: str) -> np.ndarray:
    return np.all(img == np.array(COLORS[color], dtype=np.uint8), axis=-1)


def test_objects_do_not_overlap_and_are_drawn_in_their_colour():
    for seed in SEEDS:
        scene = make_scene(seed)
        masks = object_masks(scene)
        assert (masks.sum(axis=0) <= 1).all(), f"seed {seed}: objects overlap"
        img = np.asarray(render_scene(scene))
        for obj, m in zip(scene.objects, masks):
            assert _color_pixels(img, obj.color)[m].all()


def test_count_answers_match_connected_components_of_the_rendered_image():
    checked = 0
    for seed in SEEDS:
        scene = make_scene(seed)
        img = np.asarray(render_scene(scene))
        for q in scene.questions:
            m = re.fullmatch(r"How many (\w+) objects are there\?", q.text)
            if m:
                _, n = ndimage.label(_color_pixels(img, m.group(1)))
                assert NUMBER_WORDS[n] == q.answer, f"seed {seed}: {q.text} -> {q.answer}, image has {n}"
                checked += 1
    assert checked > 20


def test_answers_consistent_with_the_scene():
    relative: dict[str, int] = {}
    for seed in SEEDS:
        scene = make_scene(seed)
        objs = scene.objects
        for q in scene.questions:
            if q.family == "color":
                shape = q.text.split()[-1].rstrip("?")
                assert [o.color for o in objs if o.shape == shape] == [q.answer]
            elif q.family == "shape":
                color = q.text.split()[-2]
                assert [o.shape for o in objs if o.color == color] == [q.answer]
            elif q.family == "exist":
                color, shape = q.text.rstrip("?").split()[-2:]
                assert q.answer == ("yes" if any(o.color == color and o.shape == shape for o in objs) else "no")
            elif q.family == "count" and "objects" not in q.text:
                shape = next(s for s, p in PLURALS.items() if f" {p} " in q.text)
                assert NUMBER_WORDS[sum(o.shape == shape for o in objs)] == q.answer
            elif q.family == "relative":
                m = re.fullmatch(r"Is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?", q.text)
                assert m, q.text
                [a] = [o for o in objs if (o.color, o.shape) == m.group(1, 2)]  # both named uniquely
                [b] = [o for o in objs if (o.color, o.shape) == m.group(4, 5)]
                if m.group(3) == "left or right of":
                    assert abs(a.cx - b.cx) >= 14 and q.answer == ("left" if a.cx < b.cx else "right")
                else:
                    assert abs(a.cy - b.cy) >= 14 and q.answer == ("above" if a.cy < b.cy else "below")
                relative[q.answer] = relative.get(q.answer, 0) + 1
    # all four sides are asked, none much more than another
    assert set(relative) == {"left", "right", "above", "below"}
    assert max(relative.values()) < 2 * min(relative.values())


def test_patch_labels_follow_the_masks():
    scene = make_scene(3)
    labels = patch_labels(scene)
    assert all(v.shape == (GRID * GRID,) for v in labels.values())
    masks = object_masks(scene)
    for obj, m in zip(scene.objects, masks):
        r, c = obj.cy // 14, obj.cx // 14
        assert labels["center"][r * GRID + c] == 1
        assert labels["color"][r * GRID + c] == list(COLORS).index(obj.color) + 1
        assert labels["shape"][r * GRID + c] == SHAPES.index(obj.shape) + 1
    assert labels["center"].sum() == len(scene.objects)
    assert (labels["color"] == 0).mean() > 0.5  # mostly background


def test_test_split_is_balanced_and_large_enough():
    qs = list(iter_split_questions("test", 200))
    assert len(qs) == 200 * len(FAMILIES)
    assert {f: sum(q.family == f for _, q in qs) for f in FAMILIES} == {f: 200 for f in FAMILIES}
    yes_no = [q.answer for _, q in qs if q.family == "exist"]
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="min_objects"):
        make_scene(0, WorldOptions(min_objects=5, max_objects=2))
    with pytest.raises(ValueError, match="families"):
        make_scene(0, WorldOptions(families=("colour",)))
    with pytest.raises(ValueError, match="relations"):
        make_scene(0, WorldOptions(relations=("left of",)))


def test_relation_questions_use_only_the_allowed_axes():
    opts = WorldOptions(families=("relative",), relations=("above or below",), questions_per_family=8)
    qs = [q for seed in SEEDS for q in make_scene(seed, opts).questions]
    assert qs and all(" above or below " in q.text for q in qs)
    assert {q.answer for q in qs} == {"above", "below"}


def test_processor_expands_the_image_to_576_tokens_like_llava():
    from vlm.shapes.processor import build_processor, prompt_for, vocabulary

    proc = build_processor()
    scene = make_scene(3)
    out = proc(text=prompt_for(scene.questions[0].text), images=render_scene(scene), return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 576 and ids[0] == proc.tokenizer.bos_token_id
    assert tuple(out["pixel_values"].shape) == (1, 3, 336, 336)
    words = proc.tokenizer.convert_ids_to_tokens(ids[ids.index(image_id) + 576:])
    assert words[0] == "\n" and words[-2:] == ["assistant", ":"]
    assert proc.tokenizer.unk_token_id not in ids
    # every answer is a single token of the vocabulary
    for _, q in iter_split_questions("test", 20):
        assert q.answer in vocabulary()


def test_task_scores_exact_match_per_family():
    from vlm.tasks import build_task

    task = build_task("shapes", split="test")
    samples = list(task.samples(limit=50))
    assert len(samples) == 50
    perfect = task.score([s.answers[0] for s in samples], samples)
    assert perfect["score"] == 1.0 and all(perfect[f"accuracy/{f}"] == 1.0 for f in FAMILIES)
    wrong = task.score(["purple"] * len(samples), samples)
    assert wrong["score"] < 0.3
    assert wrong["accuracy/exist"] == 0.0


def test_training_only_position_questions_match_the_scene_and_stay_out_of_the_splits():
    opts = WorldOptions(families=("position",), questions_per_family=6)
    n = 0
    for seed in SEEDS:
        scene = make_scene(seed, opts)
        for q in scene.questions:
            o = scene.objects[q.objects[0]]
            assert [p.name for p in scene.objects].count(o.name) == 1  # the named object is unique
            coord = o.cx if q.text.endswith("on the left?") else o.cy
            assert q.text in (f"Is the {o.name} on the left?", f"Is the {o.name} at the top?")
            assert q.answer == ("yes" if coord < 168 else "no") and abs(coord - 168) >= 14
            n += 1
    assert n > 50
    assert all(q.family in FAMILIES for _, q in iter_split_questions("test", 20))
