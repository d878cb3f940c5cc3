"""The shapes world: seed -> scene -> 336 px image, per-patch labels and questions with answers.

Everything is a pure function of the seed and the `WorldOptions`, so a split is a range of seeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24 patches a side, 576 in all

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 120, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZES: dict[str, int] = {"small": 28, "large": 40}  # bounding-box side in pixels: 2-3 patches a side
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
# Relative-position questions name two objects and an axis, and the answer is the side: "Is the red circle left
# or right of the blue square?" -> "left". (A yes/no form, "Is the red circle left of the blue square?", makes the
# answer the product of the relation's direction and the position difference, which a model at chance gets no
# gradient from; benchmarks/results/shapes_training_trials.md, session 4.)
RELATIONS: dict[str, tuple[str, str]] = {"left or right of": ("left", "right"), "above or below": ("above", "below")}
FAMILIES: tuple[str, ...] = ("color", "shape", "exist", "count", "relative")
# Families asked in training only, never in a split's evaluation: "position" asks where one named object is
# ("Is the red circle on the left?"), a first step toward comparing two objects' positions.
TRAINING_FAMILIES: tuple[str, ...] = ("position",)

# Disjoint seed ranges per split: [start, stop)
SPLIT_SEEDS: dict[str, tuple[int, int]] = {
    "test": (0, 1_000_000),
    "calibration": (1_000_000, 2_000_000),
    # scenes no split above (nor training) draws from: a second held-out set, to check that a schedule tuned on
    # calibration and compared on test also holds on scenes neither saw
    "fresh": (2_000_000, 3_000_000),
    "train": (10_000_000, 2**31 - 1),
}
RELATION_MARGIN = 14  # centres must differ by this many pixels along the axis for a relation question


@dataclass(frozen=True)
class WorldOptions:
    """Knobs of the generator (the full world by default; the curriculum shrinks them)."""

    min_objects: int = 3
    max_objects: int = 6
    min_palette: int = 2  # colours used by one scene, so that colours repeat and counting is non-trivial
    max_palette: int = 4
    families: tuple[str, ...] = FAMILIES
    relations: tuple[str, ...] = tuple(RELATIONS)  # the axes relative-position questions may ask about
    questions_per_family: int = 2
    background_noise: float = 10.0  # std of the background texture, in 0-255 units

    def check(self) -> "WorldOptions":
        """Validate the options; raise ValueError naming the bad field."""
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, got {self.min_objects}, {self.max_objects}")
        if not 1 <= self.min_palette <= self.max_palette <= len(COLORS):
            raise ValueError(f"need 1 <= min_palette <= max_palette <= {len(COLORS)}, got "
                             f"{self.min_palette}, {self.max_palette}")
        unknown = set(self.families) - set(FAMILIES) - set(TRAINING_FAMILIES)
        if unknown:
            raise ValueError(f"unknown question families {sorted(unknown)}; known: {list(FAMILIES)}, and for "
                             f"training only {list(TRAINING_FAMILIES)}")
        bad = set(self.relations) - set(RELATIONS)
        if bad or not self.relations:
            raise ValueError(f"relations must be a non-empty subset of {list(RELATIONS)}, got {list(self.relations)}")
        return self


@dataclass(frozen=True)
class ShapeObject:
    """One object: colour, shape, size name, centre (x, y) and bounding-box side in pixels."""

    color: str
    shape: str
    size: str
    cx: int
    cy: int
    side: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    """A question about one scene, its one-word answer and its family; `objects` indexes the named objects."""

    text: str
    answer: str
    family: str
    objects: tuple[int, ...] = ()


@dataclass
class Scene:
    """A generated scene: objects, its seed and options, its questions; render with `render_scene`."""

    seed: int
    objects: list[ShapeObject]
    questions: list[Question] = field(default_factory=list)
    options: WorldOptions = field(default_factory=WorldOptions)


def _object_mask(obj: ShapeObject) -> Image.Image:
    """A 1-bit mask of the object on the full canvas."""
    mask = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(mask), obj, 1)
    return mask


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: int | tuple[int, int, int]) -> None:
    h = obj.side / 2
    x0, y0, x1, y1 = obj.cx - h, obj.cy - h, obj.cx + h - 1, obj.cy + h - 1
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        s = 0.85  # squares a bit smaller than their box so areas are comparable with circles
        d = h * (1 - s)
        draw.rectangle((x0 + d, y0 + d, x1 - d, y1 - d), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(obj.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {list(SHAPES)}")


def _place_objects(rng: np.random.Generator, opts: WorldOptions) -> list[ShapeObject]:
    n = int(rng.integers(opts.min_objects, opts.max_objects + 1))
    k = int(rng.integers(opts.min_palette, opts.max_palette + 1))
    palette = [list(COLORS)[i] for i in rng.choice(len(COLORS), size=k, replace=False)]
    objects: list[ShapeObject] = []
    while len(objects) < n:
        size = str(rng.choice(list(SIZES)))
        side = SIZES[size]
        margin = side // 2 + 2
        for _ in range(200):
            cx, cy = (int(v) for v in rng.integers(margin, IMAGE_SIZE - margin, size=2))
            if all(max(abs(cx - o.cx), abs(cy - o.cy)) > (side + o.side) / 2 + 6 for o in objects):
                break
        else:  # the canvas is full: restart with what we have
            break
        objects.append(ShapeObject(str(rng.choice(palette)), str(rng.choice(SHAPES)), size, cx, cy, side))
    return objects


def _relation_answer(a: ShapeObject, b: ShapeObject, relation: str) -> str | None:
    """Which side of `b` `a` lies on along `relation`'s axis ("left"/"right", "above"/"below"); None when the
    centres are too close along that axis to tell."""
    d = a.cx - b.cx if relation == "left or right of" else a.cy - b.cy
    if abs(d) < RELATION_MARGIN:
        return None
    return RELATIONS[relation][d > 0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _questions(rng: np.random.Generator, objects: list[ShapeObject], opts: WorldOptions) -> list[Question]:
    """Up to `questions_per_family` well-defined questions per family, answers balanced where possible."""
    out: list[Question] = []
    colors = [o.color for o in objects]
    shapes = [o.shape for o in objects]
    names = [o.name for o in objects]
    q = opts.questions_per_family
    for family in opts.families:
        cands: list[Question] = []
        if family == "color":
            for i, o in enumerate(objects):
                if shapes.count(o.shape) == 1:
                    cands.append(Question(f"What color is the {o.shape}?", o.color, family, (i,)))
        elif family == "shape":
            for i, o in enumerate(objects):
                if colors.count(o.color) == 1:
                    cands.append(Question(f"What shape is the {o.color} object?", o.shape, family, (i,)))
        elif family == "exist":
            present = set(names)
            pos = [Question(f"Is there {_article(o.color)} {o.name}?", "yes", family, (i,))
                   for i, o in enumerate(objects)]
            # POPE-style adversarial negatives: the colour or the shape is in the scene, the pair is not
            neg = [Question(f"Is there {_article(c)} {c} {s}?", "no", family) for c in COLORS for s in SHAPES
                   if f"{c} {s}" not in present and (c in colors or s in shapes)]
            for _ in range(q):
                pool = pos if (rng.random() < 0.5 and pos) or not neg else neg
                if pool:
                    out.append(pool.pop(int(rng.integers(len(pool)))))
            continue
        elif family == "count":
            for c in COLORS:
                n = colors.count(c)
                cands.append(Question(f"How many {c} objects are there?", NUMBER_WORDS[n], family,
                                      tuple(i for i, o in enumerate(objects) if o.color == c)))
            for s in SHAPES:
                n = shapes.count(s)
                cands.append(Question(f"How many {PLURALS[s]} are there?", NUMBER_WORDS[n], family,
                                      tuple(i for i, o in enumerate(objects) if o.shape == s)))
            # favour non-zero counts: zero is the easy majority answer otherwise
            nonzero = [c for c in cands if c.answer != "zero"]
            zero = [c for c in cands if c.answer == "zero"]
            cands = nonzero if rng.random() < 0.85 and nonzero else (zero or nonzero)
        elif family == "position":
            for i, o in enumerate(objects):
                if names.count(o.name) != 1:
                    continue
                for text, d in ((f"Is the {o.name} on the left?", IMAGE_SIZE / 2 - o.cx),
                                (f"Is the {o.name} at the top?", IMAGE_SIZE / 2 - o.cy)):
                    if abs(d) >= RELATION_MARGIN:
                        cands.append(Question(text, "yes" if d > 0 else "no", family, (i,)))
        elif family == "relative":
            unique = [i for i, o in enumerate(objects) if names.count(o.name) == 1]
            by_answer: dict[str, list[Question]] = {}
            for i in unique:
                for j in unique:
                    if i == j:
                        continue
                    for rel in opts.relations:
                        side = _relation_answer(objects[i], objects[j], rel)
                        if side is not None:
                            by_answer.setdefault(side, []).append(
                                Question(f"Is the {names[i]} {rel} the {names[j]}?", side, family, (i, j)))
            for _ in range(q):  # the four sides balanced: a side at random, then a question with that answer
                sides = sorted(a for a, pool in by_answer.items() if pool)
                if not sides:
                    break
                pool = by_answer[sides[int(rng.integers(len(sides)))]]
                out.append(pool.pop(int(rng.integers(len(pool)))))
            continue
        for _ in range(min(q, len(cands))):
            out.append(cands.pop(int(rng.integers(len(cands)))))
    return out


def make_scene(seed: int, options: WorldOptions | None = None) -> Scene:
    """The scene for `seed`: objects and questions, deterministic in (seed, options)."""
    opts = (options or WorldOptions()).check()
    rng = np.random.default_rng([seed, 0x5A4E])
    objects = _place_objects(rng, opts)
    return Scene(seed=seed, objects=objects, questions=_questions(rng, objects, opts), options=opts)


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of the scene: textured light background, flat-coloured objects."""
    rng = np.random.default_rng([scene.seed, 0xB6])
    base = np.array([200, 196, 188], dtype=np.float32) + rng.normal(0, 6, size=3)
    noise = rng.normal(0, scene.options.background_noise, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4, 1))
    noise = np.repeat(np.repeat(noise, 4, axis=0), 4, axis=1)  # blotchy 4 px texture
    canvas = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)  # [336, 336, 3] uint8
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj, COLORS[obj.color])
    return img


def object_masks(scene: Scene) -> np.ndarray:
    """Pixel masks of the objects: bool [n_objects, 336, 336]."""
    if not scene.objects:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    return np.stack([np.array(_object_mask(o), dtype=bool) for o in scene.objects])


def patch_coverage(scene: Scene) -> np.ndarray:
    """Fraction of each 14 px patch covered by each object: float [n_objects, 24, 24] (row-major patches)."""
    m = object_masks(scene).astype(np.float32)
    return m.reshape(len(scene.objects), GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(axis=(2, 4))


def patch_labels(scene: Scene, min_cover: float = 0.25) -> dict[str, np.ndarray]:
    """Per-patch labels for the vision-tower stage, each int64 [576] in raster order.

    `color`: 0 background, 1 + index in COLORS; `shape`: 0 background, 1 + index in SHAPES;
    `center`: 1 on the patch holding an object's centre; `row`, `col`: the patch's grid coordinates.
    """
    cov = patch_coverage(scene).reshape(len(scene.objects), GRID * GRID)
    color = np.zeros(GRID * GRID, dtype=np.int64)
    shape = np.zeros(GRID * GRID, dtype=np.int64)
    center = np.zeros(GRID * GRID, dtype=np.int64)
    if scene.objects:
        best = cov.argmax(axis=0)
        covered = cov.max(axis=0) >= min_cover
        cidx = np.array([list(COLORS).index(o.color) + 1 for o in scene.objects])
        sidx = np.array([SHAPES.index(o.shape) + 1 for o in scene.objects])
        color[covered] = cidx[best[covered]]
        shape[covered] = sidx[best[covered]]
        for o in scene.objects:
            center[min(o.cy // PATCH_SIZE, GRID - 1) * GRID + min(o.cx // PATCH_SIZE, GRID - 1)] = 1
    idx = np.arange(GRID * GRID)
    return {"color": color, "shape": shape, "center": center, "row": idx // GRID, "col": idx % GRID}


def split_seeds(split: str) -> tuple[int, int]:
    """The [start, stop) seed range of a split."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits: {list(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]


def iter_split_questions(split: str, n_per_family: int, options: WorldOptions | None = None,
                         families: tuple[str, ...] = FAMILIES) -> Iterator[tuple[Scene, Question]]:
    """A family-balanced stream of (scene, question) from a split: `n_per_family` of each, one per scene and family.

    Scenes are taken in seed order from the split's start, so the stream is fixed for given arguments.
    Questions come interleaved scene by scene, so any prefix is roughly balanced too.
    """
    opts = replace(options or WorldOptions(), questions_per_family=1)
    start, stop = split_seeds(split)
    counts = {f: 0 for f in families}
    seed = start
    while any(c < n_per_family for c in counts.values()):
        if seed >= stop:
            raise ValueError(f"split {split!r} ran out of seeds before {n_per_family} questions per family")
        scene = make_scene(seed, opts)
        for q in scene.questions:
            if q.family in counts and counts[q.family] < n_per_family:
                counts[q.family] += 1
                yield scene, q
        seed += 1


def vocabulary_words() -> list[str]:
    """Every word the generator can put in a question or an answer (lower case), sorted."""
    words = {"what", "color", "is", "the", "shape", "object", "objects", "there", "a", "an", "how", "many", "are",
             "yes", "no", "left", "right", "of", "above", "below", "closest", "to"}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(NUMBER_WORDS)
    # "closest" and "to" belong to a retired question form and stay so that no id moves; words added after the
    # first shipped model go last, for the same reason
    return sorted(words) + ["on", "at", "top", "or"]
