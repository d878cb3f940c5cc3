"""Official metrics of the VQA benchmarks: VQA accuracy, exact match, POPE, MME and multiple choice.

Every function here is pure: strings in, numbers out. Accuracies are fractions in [0, 1]; MME scores are
in MME points (0-200 per subtask). The task modules call these from their `score()`.
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from statistics import mean
from typing import Iterable, Sequence

# --------------------------------------------------------------------------------------------------
# VQA answer normalisation (rules of the official VQA evaluation, vqaEval.py / EvalAI)
# --------------------------------------------------------------------------------------------------

# Contractions written without an apostrophe, mapped to their apostrophe form. Data of the official
# evaluation, kept entry for entry (including its few entries that can never match after lowercasing,
# e.g. "Im", and its one reversed entry "somebody'd" -> "somebodyd"), so scores stay comparable.
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't
itd it'd | itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've
neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's | shouldve should've
shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's
someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll
someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've
somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've
therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've
werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's
whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's | wont won't
wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all
yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've
youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
VQA_CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " | ").split("|") if pair.strip()
)
# The "manual map" of the official evaluation: number words to digits ("none" counts as 0).
VQA_NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
VQA_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) look-ahead that always
# holds, so in effect a period is removed unless a digit follows it ("3.5" stays, "2." becomes "2").
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_strip_punctuation(text: str) -> str:
    """Official punctuation rule: drop a mark next to a space (or anywhere once a digit-comma-digit
    such as "1,000" occurs), otherwise replace it by a space; then remove periods not followed by a digit."""
    glue = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        if glue or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def vqa_digits_articles(text: str) -> str:
    """Official word rule: lowercase, number words to digits, drop articles, restore contractions."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the official VQA evaluation does (whitespace, punctuation, words)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_strip_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers.

    For each annotator i, acc_i = min(#other annotators (of the remaining n-1) giving the prediction / 3, 1);
    the score is the mean of acc_i over the n leave-one-out subsets (10 choose 9 for VQAv2 / TextVQA).
    Both the prediction and the references are normalised (as EvalAI and lmms-eval do; the reference
    script skips the step when all references agree, which only matters for unnormalised predictions).
    With a single reference the score is plain normalised equality.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer; got none")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    hits = sum(ref == pred for ref in refs)
    per_subset = []
    for ref in refs:
        others_agreeing = hits - (ref == pred)
        per_subset.append(min(others_agreeing / 3.0, 1.0))
    return mean(per_subset)


# --------------------------------------------------------------------------------------------------
# Exact match (GQA)
# --------------------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse whitespace (lmms-eval's ignore_case + ignore_punctuation)."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer; got none")
    pred = normalize_exact(prediction)
    return float(any(pred == normalize_exact(a) for a in answers))


# --------------------------------------------------------------------------------------------------
# Yes / no (POPE and MME)
# --------------------------------------------------------------------------------------------------

_YES_NO_WORD = re.compile(r"\b(yes|no)\b")


def parse_yes_no(text: str) -> str | None:
    """POPE answer parsing as in lmms-eval: the text after a closing </think> if any, lowercased; the first
    whole word "yes" or "no" wins. Returns "yes", "no", or None when neither word occurs."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    match = _YES_NO_WORD.search(text.lower())
    return match.group(1) if match else None


def parse_mme_answer(text: str) -> str | None:
    """MME answer parsing of the official calculation tool: lowercase, drop periods; "yes"/"no" exactly,
    "y"/"n" as a single letter, else "yes" or "no" inside the first four characters. None otherwise."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text)
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


def _gold_yes_no(label: str, where: str) -> str:
    """A reference yes/no label, lowercased and checked."""
    gold = label.strip().lower().rstrip(".")
    if gold not in ("yes", "no"):
        raise ValueError(f"{where}: reference answer must be 'yes' or 'no', got {label!r}")
    return gold


def binary_yes_no_metrics(parsed: Sequence[str | None], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" is the positive class) and yes-ratio of parsed predictions.

    As in lmms-eval, an unparsed prediction (None) counts as wrong for accuracy and is neither a positive nor
    a negative for precision/recall. The yes-ratio is the share of predictions answered "yes" (POPE's
    definition; lmms-eval's aggregate computes it on the references instead). `unparsed` is the share of None.
    """
    n = len(gold)
    if n == 0 or len(parsed) != n:
        raise ValueError(f"need equally many predictions and references (> 0); got {len(parsed)} and {n}")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(parsed, gold))
    correct = sum(p == g for p, g in zip(parsed, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in parsed) / n,
        "unparsed": sum(p is None for p in parsed) / n,
    }


POPE_CATEGORIES: tuple[str, ...] = ("adversarial", "popular", "random")


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], categories: Sequence[str]) -> dict[str, float]:
    """POPE metrics per category ("<category>/<metric>") and pooled over all samples ("<metric>").

    "f1_mean" is the F1 averaged over the categories present, the number LLaVA-1.5 reports as "POPE".
    """
    if not (len(predictions) == len(labels) == len(categories)):
        raise ValueError(
            f"pope_metrics needs one label and one category per prediction; got {len(predictions)} predictions, "
            f"{len(labels)} labels, {len(categories)} categories"
        )
    parsed = [parse_yes_no(p) for p in predictions]
    gold = [_gold_yes_no(lab, f"POPE sample {i}") for i, lab in enumerate(labels)]
    out: dict[str, float] = dict(binary_yes_no_metrics(parsed, gold))
    by_category: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        by_category[category].append(i)
    for category, idx in sorted(by_category.items()):
        for key, value in binary_yes_no_metrics([parsed[i] for i in idx], [gold[i] for i in idx]).items():
            out[f"{category}/{key}"] = value
    out["f1_mean"] = mean(out[f"{c}/f1"] for c in by_category)
    return out


MME_GROUPS: dict[str, tuple[str, ...]] = {
    "perception": (
        "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
    ),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
MME_SUBTASK_GROUP: dict[str, str] = {sub: group for group, subs in MME_GROUPS.items() for sub in subs}


def mme_scores(
    predictions: Sequence[str], answers: Sequence[str], categories: Sequence[str], image_ids: Sequence[str]
) -> dict[str, float]:
    """MME scores: per subtask, the mean over images of (acc + acc+) x 100, where acc is the share of the
    image's questions (two in MME) answered right and acc+ is 1 when all of them are; summed per group.

    Keys: "perception", "cognition", "total", "<subtask>" for each subtask present, "<subtask>/acc" and
    "<subtask>/acc_plus" (x100), and "unpaired_images" (images without exactly two questions, e.g. under a
    limit; they are still scored).
    """
    if not (len(predictions) == len(answers) == len(categories) == len(image_ids)):
        raise ValueError(
            f"mme_scores needs one answer, category and image id per prediction; got {len(predictions)}, "
            f"{len(answers)}, {len(categories)}, {len(image_ids)}"
        )
    unknown = sorted(set(categories) - set(MME_SUBTASK_GROUP))
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; known subtasks: {sorted(MME_SUBTASK_GROUP)}")
    per_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for pred, ans, cat, img in zip(predictions, answers, categories, image_ids):
        gold = _gold_yes_no(ans, f"MME question on image {img!r}")
        per_image[cat][img].append(float(parse_mme_answer(pred) == gold))
    out: dict[str, float] = {"perception": 0.0, "cognition": 0.0}
    unpaired = 0
    for cat, images in sorted(per_image.items()):
        accs = [100.0 * mean(s) for s in images.values()]
        acc_plus = [100.0 * all(s) for s in images.values()]
        unpaired += sum(len(s) != 2 for s in images.values())
        out[f"{cat}/acc"] = mean(accs)
        out[f"{cat}/acc_plus"] = mean(acc_plus)
        out[cat] = out[f"{cat}/acc"] + out[f"{cat}/acc_plus"]
        out[MME_SUBTASK_GROUP[cat]] += out[cat]
    out["total"] = out["perception"] + out["cognition"]
    out["unpaired_images"] = float(unpaired)
    return out


# --------------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA-IMG)
# --------------------------------------------------------------------------------------------------

_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?$"),  # "A", "(A)"
    re.compile(r"^\(?([A-Z])[.):]"),  # "A.", "A)", "A: text", "(A) text"
    re.compile(r"^(?i:(?:the )?(?:correct )?(?:answer|option)(?: is)?)[:\s]+\(?([A-Z])\b"),  # "The answer is B"
)


def choice_letters(n: int) -> list[str]:
    """Option letters for n choices: A, B, C, ..."""
    if not 0 < n <= 26:
        raise ValueError(f"a multiple-choice question needs 1 to 26 choices, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def parse_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the option a free-form answer names, or None.

    Accepted: the bare letter ("B", "(B)", "B.", "B) ...", "B: ..."), "Answer: B" / "The answer is B", or
    the exact text of one choice (case-insensitive). A letter outside the choices is not accepted.
    """
    text = prediction.strip()
    letters = choice_letters(len(choices))
    for pattern in _LETTER_PATTERNS:
        match = pattern.match(text)
        if match:
            letter = match.group(1).upper()
            return letters.index(letter) if letter in letters else None
    folded = text.rstrip(".").strip().lower()
    matching = [i for i, choice in enumerate(choices) if choice.strip().lower() == folded]
    return matching[0] if len(matching) == 1 else None


def multiple_choice_accuracy(
    predictions: Sequence[str], answer_indices: Sequence[int], choices: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Accuracy of parsed option letters against the answer indices, plus the share left unparsed."""
    n = len(predictions)
    if n == 0 or not (n == len(answer_indices) == len(choices)):
        raise ValueError(
            f"need equally many predictions, answers and choice lists (> 0); got {n}, {len(answer_indices)}, "
            f"{len(choices)}"
        )
    parsed = [parse_choice(p, c) for p, c in zip(predictions, choices)]
    return {
        "accuracy": sum(p == a for p, a in zip(parsed, answer_indices)) / n,
        "unparsed": sum(p is None for p in parsed) / n,
    }


def grouped_mean(values: Iterable[float], groups: Iterable[str], prefix: str) -> dict[str, float]:
    """Mean of `values` per group, keyed "<prefix>/<group>"."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for value, group in zip(values, groups):
        buckets[group].append(value)
    return {f"{prefix}/{group}": mean(vals) for group, vals in sorted(buckets.items())}


def check_lengths(predictions: Sequence[str], samples: Sequence[object], task: str) -> None:
    """Raise ValueError unless there is exactly one prediction per sample."""
    if len(predictions) != len(samples):
        raise ValueError(
            f"task {task!r}: got {len(predictions)} predictions for {len(samples)} samples; pass one prediction "
            f"per sample, in the samples' order"
        )
    if not samples:
        raise ValueError(f"task {task!r}: nothing to score (no samples)")


__all__: list[str] = [
    "VQA_CONTRACTIONS", "VQA_NUMBER_WORDS", "VQA_ARTICLES", "VQA_PUNCTUATION", "vqa_strip_punctuation",
    "vqa_digits_articles", "normalize_vqa_answer", "vqa_accuracy", "normalize_exact", "exact_match",
    "parse_yes_no", "parse_mme_answer", "binary_yes_no_metrics", "POPE_CATEGORIES", "pope_metrics", "MME_GROUPS",
    "MME_SUBTASK_GROUP", "mme_scores", "choice_letters", "parse_choice", "multiple_choice_accuracy",
    "grouped_mean", "check_lengths",
]
