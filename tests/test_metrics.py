"""The benchmark metrics against hand-computed cases."""
from __future__ import annotations

import pytest

from vlm.tasks.metrics import (
    binary_yes_no_metrics,
    exact_match,
    mme_scores,
    multiple_choice_accuracy,
    normalize_exact,
    normalize_vqa_answer,
    parse_choice,
    parse_mme_answer,
    parse_yes_no,
    pope_metrics,
    vqa_accuracy,
)

# ------------------------------------------------------------------ VQA normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        # articles are dropped, case folded
        ("The Cat", "cat"),
        ("a dog", "dog"),
        ("an apple on the table", "apple on table"),
        ("theater", "theater"),  # only whole words
        # number words to digits ("none" counts as zero)
        ("two", "2"),
        ("Ten dogs", "10 dogs"),
        ("none", "0"),
        ("twenty", "twenty"),  # outside the manual map
        # contractions restored
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("cant", "can't"),
        ("yall'll", "y'all'll"),
        # punctuation: next to a space -> removed, inside a word -> space
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("black/white", "black white"),
        ("yes!", "yes"),
        ("left (mostly)", "left mostly"),
        # digit-comma-digit anywhere: every mark removed without a space
        ("1,000", "1000"),
        ("1,000 red/white", "1000 redwhite"),
        # periods: removed unless a digit follows (the official pattern's effect)
        ("2.", "2"),
        ("3.5", "3.5"),
        ("e.g.", "eg"),
        ("Yes.", "yes"),
        # whitespace
        ("  two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


# ------------------------------------------------------------------ VQA accuracy (10 choose 9)


def test_vqa_accuracy_counts_of_agreeing_humans():
    others = ["cat"] * 10
    # k humans of 10 gave the prediction. Leaving out one of those k leaves k-1 agreeing, leaving out one of
    # the other 10-k leaves k; each subset scores min(agreeing/3, 1), and the score is the mean over 10 subsets.
    # k=0: every subset 0                                   -> 0
    # k=1: 1 subset with 0, 9 subsets with 1/3              -> 9/30 = 0.3
    # k=2: 2 subsets with 1/3, 8 subsets with 2/3           -> (2/3 + 16/3)/10 = 0.6
    # k=3: 3 subsets with 2/3, 7 subsets with 1             -> (2 + 7)/10 = 0.9
    # k=4: 4 subsets with 1, 6 subsets with 1               -> 1.0
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for k, value in expected.items():
        answers = ["dog"] * k + others[k:]
        assert vqa_accuracy("dog", answers) == pytest.approx(value), k


def test_vqa_accuracy_normalises_both_sides():
    # "Two." and "2" and "two" are the same answer after normalisation: 3 of 10 -> 0.9
    answers = ["2", "two", "2.", "3", "3", "3", "3", "3", "3", "4"]
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    # "the dog" vs "dog": articles dropped, 2 of 10 -> 0.6
    assert vqa_accuracy("The dog", ["dog", "a dog"] + ["cat"] * 8) == pytest.approx(0.6)
    # wrong answer stays wrong
    assert vqa_accuracy("horse", ["dog"] * 10) == 0.0


def test_vqa_accuracy_single_reference_and_errors():
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("yes", [])


# ------------------------------------------------------------------ exact match (GQA)


def test_exact_match():
    assert normalize_exact("  T-shirt. ") == "tshirt"
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert exact_match("woman", ["Woman"]) == 1.0
    assert exact_match("the woman", ["woman"]) == 0.0  # no article stripping in exact match
    assert exact_match("left side", ["left", "left side"]) == 1.0
    assert exact_match("right", ["left"]) == 0.0


# ------------------------------------------------------------------ POPE


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is a dog, yes.", "yes"),  # first whole word yes/no wins
        ("<think>maybe no</think> Yes", "yes"),  # only the text after </think>
        ("Nope", None),
        ("I cannot tell", None),
        ("", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_binary_yes_no_metrics_hand_case():
    gold = ["yes", "yes", "yes", "no", "no", "no"]
    parsed = ["yes", "yes", "no", "yes", "no", None]
    # TP=2 (0,1), FN=1 (2), FP=1 (3), TN=1 (4), unparsed=1 (5; wrong, not in P/R as in lmms-eval)
    m = binary_yes_no_metrics(parsed, gold)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)  # share of predictions that say yes
    assert m["unparsed"] == pytest.approx(1 / 6)


def test_binary_yes_no_metrics_no_positive_predictions():
    m = binary_yes_no_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def test_pope_metrics_per_category_and_pooled():
    preds = ["Yes", "No", "Yes", "Yes", "no", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    cats = ["random", "random", "popular", "popular", "adversarial", "adversarial"]
    m = pope_metrics(preds, labels, cats)
    # random: all right -> F1 1; popular: TP=1, FP=1 -> P=0.5, R=1, F1=2/3; adversarial: TP=0 -> F1 0
    assert m["random/f1"] == pytest.approx(1.0)
    assert m["popular/precision"] == pytest.approx(0.5)
    assert m["popular/recall"] == pytest.approx(1.0)
    assert m["popular/f1"] == pytest.approx(2 / 3)
    assert m["adversarial/f1"] == 0.0
    assert m["adversarial/accuracy"] == pytest.approx(0.5)
    assert m["f1_mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # pooled: TP=2, FP=1, FN=1 -> P=R=F1=2/3; accuracy 4/6; yes-ratio 3/6
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_rejects_bad_labels_and_lengths():
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"], ["random"])
    with pytest.raises(ValueError, match="one label and one category"):
        pope_metrics(["yes", "no"], ["yes"], ["random"])


# ------------------------------------------------------------------ MME


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("y", "yes"),
        ("N", "no"),
        ("Yes, there is a train.", "yes"),
        ("Not at all", "no"),  # "no" within the first four characters (the official tool's rule)
        ("There is no train", None),  # yes/no only counted in the first four characters
        ("x", None),
    ],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def test_mme_scores_hand_case():
    preds = ["Yes", "No", "Yes", "Yes", "No", "Yes"]
    answers = ["Yes", "No", "Yes", "No", "Yes", "No"]
    cats = ["existence", "existence", "existence", "existence", "code_reasoning", "code_reasoning"]
    images = ["e1", "e1", "e2", "e2", "c1", "c1"]
    s = mme_scores(preds, answers, cats, images)
    # existence: e1 both right (acc 100, acc+ 100), e2 one right (acc 50, acc+ 0)
    #   -> acc = 75, acc+ = 50, score 125
    assert s["existence/acc"] == pytest.approx(75.0)
    assert s["existence/acc_plus"] == pytest.approx(50.0)
    assert s["existence"] == pytest.approx(125.0)
    # code_reasoning: c1 both wrong -> 0
    assert s["code_reasoning"] == 0.0
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == 0.0
    assert s["total"] == pytest.approx(125.0)
    assert s["unpaired_images"] == 0.0


def test_mme_scores_groups_sum_subtasks_and_flag_unpaired():
    s = mme_scores(["yes", "no", "yes"], ["yes", "no", "yes"], ["count", "count", "OCR"], ["a", "a", "b"])
    assert s["count"] == 200.0 and s["OCR"] == 200.0
    assert s["perception"] == 400.0  # both are perception subtasks
    assert s["unpaired_images"] == 1.0  # image b has one question only


def test_mme_scores_unknown_subtask():
    with pytest.raises(ValueError, match="unknown MME subtask.*'ocr'"):
        mme_scores(["yes"], ["yes"], ["ocr"], ["a"])


# ------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", 1),
        ("(B)", 1),
        ("B.", 1),
        ("B. Louisiana", 1),
        ("C) Arizona", 2),
        ("The answer is D.", 3),
        ("Answer: A", 0),
        ("louisiana", 1),  # the exact text of a choice
        ("E", None),  # outside the four choices
        ("A cat", None),  # a letter followed by text is not an option letter
        ("I don't know", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, ["West Virginia", "Louisiana", "Arizona", "Oklahoma"]) == expected


def test_multiple_choice_accuracy():
    choices = [["x", "y"], ["x", "y", "z"], ["p", "q"]]
    m = multiple_choice_accuracy(["B", "A.", "unsure"], [1, 2, 0], choices)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["unparsed"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="equally many"):
        multiple_choice_accuracy(["A"], [0, 1], choices[:2])
