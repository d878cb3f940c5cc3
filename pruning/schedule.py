"""Pruning schedules: which decoder layers drop vision tokens, how many survive, and the budget arithmetic.

Semantics (DESIGN.md, exact):

* A stage ``Stage(layer=l, keep=k)`` scores the vision tokens with layer ``l``'s attention over the tokens
  present at ``l``; the dropped tokens leave *after* layer ``l``, so layers ``l+1, l+2, ...`` see ``k``
  vision tokens. Layer ``l`` itself still processes the count it received.
* ``layer = -1`` means "before the language model" (VisionZip style): layer 0 already sees ``k`` tokens.
* ``keep`` is a count (``int >= 0``) or a fraction of the *current* count (``float`` in ``(0, 1]``).
  Fractions are resolved in stage order with :func:`round_half_up` (``rounding: nearest``, the default), or
  as the AdaptInfer authors' Qwen code does, ``min(int(f * c), c - 1)`` (``rounding: truncate``: truncation,
  and at least one token dropped); either way a fraction never resolves to 0 while tokens remain (a positive
  fraction of a non-empty set keeps at least one token).
* Budgets (mean vision tokens per decoder layer) come in two conventions:

  - ``"processed"``: the vision tokens each layer really processes (the pruning layer counts at the
    count it received). This is the toolkit's default and the one FLOPs follow.
  - ``"paper"``: the AdaptInfer code's convention, which counts the pruning layer already at its
    reduced count; the AdaptInfer preset names ("64", "128", ...) are budgets in this convention.
* Where the vision-token count V varies with the image (Qwen2-VL's dynamic resolution), a schedule of fractions
  applies to each image's own V; its budget is also given as a fraction of V (`Schedule.budget_fraction`): exact
  for one V, nominal (no rounding) for a schedule of fractions alone. `allocate_fractions` is `allocate_keep` in
  fractions.
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm.errors import UserError

POSITIONS = ("keep", "renumber")
ROUNDINGS = ("nearest", "truncate")  # how a fraction of the current count becomes a count (Stage.resolve)
CONVENTIONS = ("processed", "paper")
ALLOCATION_RULES = ("geometric",)
BEFORE_LM = -1  # the layer value meaning "before the language model"

_STAGE_KEYS = ("layer", "keep")
_SCHEDULE_KEYS = ("name", "positions", "rounding", "num_layers", "vision_tokens", "stages", "provenance")
_BUDGET_KEYS = {"budget_processed": "processed", "budget_paper": "paper"}
# Written budgets are compared with the computed ones to this absolute tolerance (in vision tokens):
# half of the last digit of a one-decimal table entry, so "65.0" for 64.96875 is accepted.
BUDGET_TOLERANCE = 0.05
# Digits kept when budgets are written beside a schedule (for information only).
BUDGET_DIGITS = 6
# Bisection steps used by allocate_keep (the ratio is resolved to 2**-60, far below one token).
_BISECTION_STEPS = 60


FRONT_FILE = "front.json"  # a derive output's front: one searched schedule per budget


class ScheduleError(UserError, ValueError):
    """A schedule that is malformed or does not fit the model; the message names field, value and range."""


class BudgetUnreachable(ScheduleError):
    """A valid set of stage layers that cannot meet the asked budget (an "infeasible" outcome of a run)."""


class MethodInfeasible(BudgetUnreachable):
    """A valid method and budget that this method cannot reach on this model (e.g. no CLS token in the vision
    tower, a keep count pooling cannot factor): the benchmark records it as an `infeasible` row with this message."""


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves away from zero for x >= 0 (not Python's banker's rounding)."""
    return int(math.floor(x + 0.5))


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_float(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, numbers.Integral))


@dataclass(frozen=True)
class Stage:
    """One pruning step: score at decoder `layer` (-1 = before the LM) and keep `keep` vision tokens.

    `keep` is a count (int >= 0) or a fraction of the current count (float in (0, 1]).
    """

    layer: int
    keep: int | float

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "stage") -> None:
        """Check the stage on its own (types and ranges); raise ScheduleError naming the bad field."""
        if not _is_int(self.layer):
            raise ScheduleError(
                f"{where}.layer = {self.layer!r} ({type(self.layer).__name__}): must be an int, "
                f"{BEFORE_LM} (before the language model) or a 0-indexed decoder layer >= 0"
            )
        if self.layer < BEFORE_LM:
            raise ScheduleError(
                f"{where}.layer = {self.layer}: must be {BEFORE_LM} (before the language model) "
                f"or a 0-indexed decoder layer >= 0"
            )
        keep = self.keep
        if isinstance(keep, bool):
            raise ScheduleError(
                f"{where}.keep = {keep!r} (bool): must be a count (int >= 0) or a fraction (float in (0, 1])"
            )
        if _is_int(keep):
            if keep < 0:
                raise ScheduleError(f"{where}.keep = {keep}: a count must be >= 0")
        elif _is_float(keep):
            if not math.isfinite(keep):
                raise ScheduleError(
                    f"{where}.keep = {keep!r}: must be finite; a count (int >= 0) or a fraction in (0, 1]"
                )
            if not 0.0 < keep <= 1.0:
                raise ScheduleError(
                    f"{where}.keep = {keep!r}: a fraction must lie in (0, 1] "
                    f"(write an int for a token count, e.g. keep: {int(keep) if keep > 1 else 0})"
                )
        else:
            raise ScheduleError(
                f"{where}.keep = {keep!r} ({type(keep).__name__}): must be a count (int >= 0) "
                f"or a fraction (float in (0, 1])"
            )

    @property
    def is_fraction(self) -> bool:
        """True when `keep` is a fraction of the current count rather than a count."""
        return _is_float(self.keep)

    def resolve(self, current: int, rounding: str = "nearest") -> int:
        """Number of vision tokens kept when `current` are present (raises if a count exceeds `current`).

        A fraction f keeps round_half_up(f * current) ("nearest") or min(int(f * current), current - 1)
        ("truncate", the AdaptInfer authors' Qwen rule: truncation, at least one token dropped); at least 1 either
        way while current > 0.
        """
        if self.is_fraction:
            if rounding == "truncate":
                kept = min(int(float(self.keep) * current), current - 1)
            else:
                kept = round_half_up(current * float(self.keep))
            return max(kept, 1) if current > 0 else 0
        if self.keep > current:
            raise ScheduleError(
                f"stage at layer {self.layer}: keep = {self.keep} but only {current} vision tokens are present "
                f"(allowed range 0..{current})"
            )
        return int(self.keep)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping {layer, keep}."""
        return {"layer": int(self.layer), "keep": float(self.keep) if self.is_fraction else int(self.keep)}


def _plain(x: Any) -> Any:
    """Mappings -> dict, sequences (not str) -> list, recursively (turns OmegaConf containers into plain ones)."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


def _stage_from(item: Any, index: int) -> Stage:
    where = f"stages[{index}]"
    if isinstance(item, Stage):
        return item
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - set(_STAGE_KEYS))
        if unknown:
            raise ScheduleError(f"{where}: unknown keys {unknown}; allowed keys are {list(_STAGE_KEYS)}")
        missing = [k for k in _STAGE_KEYS if k not in item]
        if missing:
            raise ScheduleError(f"{where}: missing keys {missing}; a stage needs {list(_STAGE_KEYS)}")
        layer, keep = item["layer"], item["keep"]
    else:
        raise ScheduleError(
            f"{where} = {item!r} ({type(item).__name__}): must be a Stage or a mapping with keys {list(_STAGE_KEYS)}"
        )
    try:
        return Stage(layer=layer, keep=keep)
    except ScheduleError as e:
        raise ScheduleError(str(e).replace("stage.", f"{where}.", 1)) from None


@dataclass
class Schedule:
    """An ordered list of pruning stages plus the model size it was made for and where it came from.

    `positions`: "keep" keeps each kept token's original RoPE position; "renumber" renumbers the
    sequence contiguously after a drop (the AdaptInfer code's behaviour; for parity runs).
    `rounding`: how fractions become counts, "nearest" (round half up) or "truncate" (the authors' Qwen presets:
    min(int(f * c), c - 1)); counts are used as they are.
    `num_layers` / `vision_tokens`: the model the schedule was made for (None = any).
    """

    stages: Sequence[Stage] = ()
    positions: str = "keep"
    rounding: str = "nearest"
    num_layers: int | None = None
    vision_tokens: int | None = None
    name: str | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stages, (str, bytes)) or not isinstance(self.stages, Sequence):
            raise ScheduleError(f"stages = {self.stages!r}: must be a list of stages")
        self.stages = tuple(_stage_from(s, i) for i, s in enumerate(self.stages))
        self.provenance = _plain(self.provenance) if self.provenance is not None else {}
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, num_layers: int | None = None, initial: int | None = None) -> "Schedule":
        """Check the schedule (and, given them, that it fits a model with `num_layers` and `initial` vision tokens).

        Returns self; raises ScheduleError naming the field, its value and the allowed range.
        """
        if self.positions not in POSITIONS:
            raise ScheduleError(f"positions = {self.positions!r}: must be one of {list(POSITIONS)}")
        if self.rounding not in ROUNDINGS:
            raise ScheduleError(f"rounding = {self.rounding!r}: must be one of {list(ROUNDINGS)} (how a fraction of the "
                                "current count becomes a count)")
        if self.name is not None and not isinstance(self.name, str):
            raise ScheduleError(f"name = {self.name!r}: must be a string or null")
        if not isinstance(self.provenance, dict):
            raise ScheduleError(f"provenance = {self.provenance!r}: must be a mapping")
        for fld, val in (("num_layers", self.num_layers), ("vision_tokens", self.vision_tokens)):
            if val is not None and (not _is_int(val) or val < (1 if fld == "num_layers" else 0)):
                low = 1 if fld == "num_layers" else 0
                raise ScheduleError(f"{fld} = {val!r}: must be an int >= {low} or null")
        for fld, val in (("num_layers (argument)", num_layers), ("initial (argument)", initial)):
            if val is not None and (not _is_int(val) or val < 0):
                raise ScheduleError(f"{fld} = {val!r}: must be an int >= 0")
        if num_layers is not None and self.num_layers is not None and num_layers != self.num_layers:
            raise ScheduleError(
                f"num_layers = {self.num_layers}: this schedule was made for a {self.num_layers}-layer model "
                f"but the model has {num_layers} decoder layers"
            )
        if initial is not None and self.vision_tokens is not None and initial != self.vision_tokens:
            raise ScheduleError(
                f"vision_tokens = {self.vision_tokens}: this schedule was made for {self.vision_tokens} vision "
                f"tokens but the model produces {initial}"
            )
        for i, s in enumerate(self.stages):
            s.check(f"stages[{i}]")
        for i in range(1, len(self.stages)):
            prev, cur = self.stages[i - 1].layer, self.stages[i].layer
            if cur <= prev:
                raise ScheduleError(
                    f"stages[{i}].layer = {cur}: layers must be strictly increasing "
                    f"(previous stage is at layer {prev}; allowed range {prev + 1}..)"
                )
        n_layers = num_layers if num_layers is not None else self.num_layers
        if n_layers is not None:
            last_allowed = n_layers - 2
            for i, s in enumerate(self.stages):
                if s.layer > last_allowed:
                    raise ScheduleError(
                        f"stages[{i}].layer = {s.layer}: outside the allowed range {BEFORE_LM} or 0..{last_allowed} "
                        f"for a {n_layers}-layer model (a stage at the last layer would prune nothing that is used)"
                    )
        n_initial = initial if initial is not None else self.vision_tokens
        if n_initial is not None:
            self.keep_counts(n_initial)
        return self

    # ------------------------------------------------------------------ arithmetic
    def _model_size(self, num_layers: int | None, initial: int | None) -> tuple[int, int]:
        """(num_layers, initial) from the arguments or the schedule's own fields, checked against the schedule."""
        n_layers = num_layers if num_layers is not None else self.num_layers
        n_initial = initial if initial is not None else self.vision_tokens
        for what, value, own in (("num_layers", n_layers, "num_layers"), ("initial", n_initial, "vision_tokens")):
            if value is None:
                raise ScheduleError(f"{what} is needed: pass it, or set the schedule's {own} field")
        self.validate(num_layers=n_layers, initial=n_initial)
        return int(n_layers), int(n_initial)

    def keep_counts(self, initial: int | None = None) -> list[int]:
        """Vision tokens kept after each stage, starting from `initial` (fractions resolved in stage order).

        Rounding: a fraction f of the current count c keeps round_half_up(f * c) tokens (`rounding` "nearest") or
        min(int(f * c), c - 1) ("truncate"), at least 1 when c > 0. A count larger than the tokens present raises
        ScheduleError.
        """
        if initial is None:
            initial = self.vision_tokens
        if initial is None or not _is_int(initial) or initial < 0:
            raise ScheduleError(f"initial = {initial!r}: must be an int >= 0 (the vision-token count before pruning)")
        counts, current = [], int(initial)
        for i, s in enumerate(self.stages):
            try:
                current = s.resolve(current, self.rounding)
            except ScheduleError:
                raise ScheduleError(
                    f"stages[{i}].keep = {s.keep}: larger than the {current} vision tokens present at layer "
                    f"{s.layer} (allowed range 0..{current})"
                ) from None
            counts.append(current)
        return counts

    def tokens_per_layer(
        self, num_layers: int | None = None, initial: int | None = None, convention: str = "processed"
    ) -> list[int]:
        """Vision tokens at each decoder layer: list of length num_layers.

        "processed" (default): what each layer really processes (a stage's layer still sees the tokens it
        received). "paper": the AdaptInfer code's count, the stage's layer already at its reduced count.
        """
        if convention not in CONVENTIONS:
            raise ScheduleError(f"convention = {convention!r}: must be one of {list(CONVENTIONS)}")
        n_layers, n_initial = self._model_size(num_layers, initial)
        counts = self.keep_counts(n_initial)
        # a stage at layer l changes the count from layer l+1 on ("processed") or from layer l on ("paper")
        shift = 1 if convention == "processed" else 0
        out, current, j = [], n_initial, 0
        for layer in range(n_layers):
            while j < len(self.stages) and self.stages[j].layer + shift <= layer:
                current = counts[j]
                j += 1
            out.append(current)
        return out

    def budget(
        self, num_layers: int | None = None, initial: int | None = None, convention: str = "processed"
    ) -> float:
        """Mean over all decoder layers of the vision tokens per layer, in the named convention."""
        per_layer = self.tokens_per_layer(num_layers, initial, convention)
        return sum(per_layer) / len(per_layer)

    def fraction_per_layer(self, num_layers: int | None = None, convention: str = "processed") -> list[float]:
        """Nominal share of the vision tokens at each decoder layer of a schedule of fractions (no rounding): the
        product of the fractions of the stages before it. ScheduleError when a stage keeps a count."""
        if convention not in CONVENTIONS:
            raise ScheduleError(f"convention = {convention!r}: must be one of {list(CONVENTIONS)}")
        n_layers = num_layers if num_layers is not None else self.num_layers
        if n_layers is None:
            raise ScheduleError("num_layers is needed: pass it, or set the schedule's num_layers field")
        self.validate(num_layers=n_layers)
        counts = [i for i, s in enumerate(self.stages) if not s.is_fraction]
        if counts:
            raise ScheduleError(
                f"stages[{counts[0]}].keep = {self.stages[counts[0]].keep}: a count; the share of each image's vision "
                "tokens needs the image's count (pass initial=), or a schedule of fractions"
            )
        shift = 1 if convention == "processed" else 0
        out, share, j = [], 1.0, 0
        for layer in range(n_layers):
            while j < len(self.stages) and self.stages[j].layer + shift <= layer:
                share *= float(self.stages[j].keep)
                j += 1
            out.append(share)
        return out

    def budget_fraction(self, num_layers: int | None = None, initial: int | None = None,
                        convention: str = "processed") -> float:
        """The budget as a fraction of the vision tokens: budget / initial for an image of `initial` tokens (exact,
        with rounding); without a count, the nominal mean of `fraction_per_layer` (a schedule of fractions)."""
        n_initial = initial if initial is not None else self.vision_tokens
        if n_initial is not None:
            return self.budget(num_layers, n_initial, convention) / n_initial if n_initial else 1.0
        per_layer = self.fraction_per_layer(num_layers, convention)
        return sum(per_layer) / len(per_layer)

    def resolve(self, initial: int | None = None) -> "Schedule":
        """A copy with every keep as a count (fractions resolved against `initial` vision tokens)."""
        counts = self.keep_counts(initial)
        return Schedule(
            stages=[Stage(s.layer, c) for s, c in zip(self.stages, counts)],
            positions=self.positions,
            rounding=self.rounding,
            num_layers=self.num_layers,
            vision_tokens=initial if initial is not None else self.vision_tokens,
            name=self.name,
            provenance=dict(self.provenance),
        )

    @property
    def layers(self) -> list[int]:
        """Stage layers, ascending."""
        return [s.layer for s in self.stages]

    # ------------------------------------------------------------------ io
    def to_dict(self, with_budgets: bool = True) -> dict[str, Any]:
        """Plain mapping; budgets in both conventions are added when num_layers and vision_tokens are set."""
        out: dict[str, Any] = {
            "name": self.name,
            "positions": self.positions,
            **({"rounding": self.rounding} if self.rounding != "nearest" else {}),
            "num_layers": self.num_layers,
            "vision_tokens": self.vision_tokens,
            "stages": [s.to_dict() for s in self.stages],
            "provenance": _plain(self.provenance),
        }
        if with_budgets and self.num_layers is not None and self.vision_tokens is not None:
            for key, conv in _BUDGET_KEYS.items():
                out[key] = round(self.budget(convention=conv), BUDGET_DIGITS)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schedule":
        """Build from a mapping (as written by to_dict); unknown keys and disagreeing budgets raise ScheduleError."""
        if not isinstance(data, Mapping):
            raise ScheduleError(f"schedule = {data!r} ({type(data).__name__}): must be a mapping")
        data = _plain(data)
        allowed = set(_SCHEDULE_KEYS) | set(_BUDGET_KEYS)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ScheduleError(f"unknown keys {unknown}; allowed keys are {sorted(allowed)}")
        stages = data.get("stages")
        if stages is None:
            stages = []
        schedule = cls(
            stages=stages,
            positions=data.get("positions", "keep"),
            rounding=data.get("rounding", "nearest"),
            num_layers=data.get("num_layers"),
            vision_tokens=data.get("vision_tokens"),
            name=data.get("name"),
            provenance=data.get("provenance") or {},
        )
        for key, conv in _BUDGET_KEYS.items():
            if data.get(key) is None:
                continue
            written = data[key]
            if not isinstance(written, numbers.Real) or isinstance(written, bool):
                raise ScheduleError(f"{key} = {written!r}: must be a number")
            if schedule.num_layers is None or schedule.vision_tokens is None:
                raise ScheduleError(
                    f"{key} = {written}: a written budget needs num_layers and vision_tokens to be checked "
                    f"(got num_layers = {schedule.num_layers}, vision_tokens = {schedule.vision_tokens})"
                )
            computed = schedule.budget(convention=conv)
            if abs(computed - float(written)) > BUDGET_TOLERANCE:
                raise ScheduleError(
                    f"{key} = {written}: disagrees with the stages, which give {round(computed, BUDGET_DIGITS)} in the "
                    f"{conv!r} convention (tolerance {BUDGET_TOLERANCE})"
                )
        return schedule

    @classmethod
    def from_yaml(cls, source: str | Path) -> "Schedule":
        """Load from a YAML file path or a YAML string (a str without newline ending in .yaml/.yml is a path)."""
        if isinstance(source, Path) or (
            isinstance(source, str) and "\n" not in source and source.strip().endswith((".yaml", ".yml"))
        ):
            path = Path(source)
            if path.is_dir():
                raise ScheduleError(f"schedule file {str(path)!r} is a directory; give the schedule.yaml inside it")
            if not path.is_file():
                raise ScheduleError(f"schedule file {str(path)!r} does not exist")
            text, where = path.read_text(), f"schedule file {str(path)!r}"
        elif isinstance(source, str):
            text, where = source, "schedule YAML text"
        else:
            raise ScheduleError(f"source = {source!r}: must be a path or a YAML string")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ScheduleError(f"{where}: invalid YAML{at}: {problem}") from None
        if data is None:
            raise ScheduleError(f"{where} is empty; a schedule is a mapping with `stages: [{{layer: L, keep: K}}, ...]`")
        if not isinstance(data, Mapping):
            raise ScheduleError(f"{where} must hold a mapping, got {type(data).__name__}: {data!r}")
        try:
            return cls.from_dict(data)
        except ScheduleError as err:
            raise ScheduleError(f"{where}: {err}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Write the schedule (with budgets beside) to `path` and return the YAML text."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            Path(path).write_text(text)
        return text


def allocate_keep(
    layers: Sequence[int],
    num_layers: int,
    initial: int,
    budget: float,
    convention: str = "processed",
    rule: str = "geometric",
    positions: str = "keep",
    name: str | None = None,
) -> Schedule:
    """Choose keep counts at the given stage layers so the schedule's budget is `budget` (within one token).

    Rule "geometric": one ratio r in [0, 1] for every stage; stage i (0-based) keeps
    round_half_up(initial * r**(i + 1)) tokens, i.e. each stage keeps about a fraction r of the previous
    one. The budget grows monotonically with r, so r is found by bisection and the closer of the two
    bracketing solutions is returned. Raises ScheduleError when `budget` is below what the layers allow
    (every stage keeping 0 tokens) or above `initial`, or when no r gets within one token.
    """
    if rule not in ALLOCATION_RULES:
        raise ScheduleError(f"rule = {rule!r}: must be one of {list(ALLOCATION_RULES)}")
    if convention not in CONVENTIONS:
        raise ScheduleError(f"convention = {convention!r}: must be one of {list(CONVENTIONS)}")
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not math.isfinite(budget):
        raise ScheduleError(f"budget = {budget!r}: must be a finite number")
    layers = list(layers)
    if not layers:
        raise ScheduleError("layers = []: need at least one stage layer to allocate a budget")

    def build(r: float) -> Schedule:
        stages = [Stage(layer, round_half_up(initial * r ** (i + 1))) for i, layer in enumerate(layers)]
        return Schedule(stages=stages, positions=positions, num_layers=num_layers, vision_tokens=initial, name=name)

    def achieved(r: float) -> float:
        return build(r).budget(convention=convention)

    lowest, highest = achieved(0.0), achieved(1.0)
    if not lowest <= budget <= highest:
        raise BudgetUnreachable(
            f"budget = {budget}: unreachable with stages at layers {layers} of a {num_layers}-layer model and "
            f"{initial} vision tokens; allowed range {lowest:.6g}..{highest:.6g} ({convention!r} convention)"
        )
    lo, hi = 0.0, 1.0  # invariant: achieved(lo) <= budget <= achieved(hi)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if achieved(mid) <= budget:
            lo = mid
        else:
            hi = mid
    r = lo if abs(achieved(lo) - budget) <= abs(achieved(hi) - budget) else hi
    schedule = build(r)
    got = schedule.budget(convention=convention)
    if abs(got - budget) > 1.0:
        raise BudgetUnreachable(
            f"budget = {budget}: the geometric rule reaches {got:.6g} at best (ratio {r:.6g}); "
            f"more than one token away in the {convention!r} convention"
        )
    schedule.provenance = {
        "rule": rule,
        "ratio": r,
        "target_budget": float(budget),
        "convention": convention,
    }
    return schedule


def allocate_fractions(
    layers: Sequence[int],
    num_layers: int,
    budget: float,
    convention: str = "processed",
    positions: str = "keep",
    name: str | None = None,
) -> Schedule:
    """`allocate_keep` for images of any size: every stage keeps the same fraction r of the tokens present, with r
    chosen so that the nominal budget fraction (`Schedule.budget_fraction` without a count) is `budget` in (0, 1].
    Each image then keeps about r, r^2, ... of its own vision tokens (at least one). BudgetUnreachable when `budget`
    lies below what the layers allow (the layers up to the first stage see every token) or above 1."""
    if convention not in CONVENTIONS:
        raise ScheduleError(f"convention = {convention!r}: must be one of {list(CONVENTIONS)}")
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not math.isfinite(budget):
        raise ScheduleError(f"budget = {budget!r}: must be a finite number (a fraction of the vision tokens)")
    layers = list(layers)
    if not layers:
        raise ScheduleError("layers = []: need at least one stage layer to allocate a budget")

    def build(r: float) -> Schedule:
        return Schedule(stages=[Stage(layer, float(r)) for layer in layers], positions=positions,
                        num_layers=num_layers, name=name)

    floor = min(layers[0] + (1 if convention == "processed" else 0), num_layers) / num_layers  # r -> 0
    if not floor < budget <= 1.0:
        raise BudgetUnreachable(
            f"budget = {budget}: unreachable as a fraction of each image's vision tokens with stages at layers "
            f"{layers} of a {num_layers}-layer model; allowed range above {floor:.6g} up to 1 ({convention!r} "
            "convention)"
        )
    lo, hi = 0.0, 1.0  # invariant: achieved(lo) <= budget <= achieved(hi), achieved(0) = floor
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid > 0 and build(mid).budget_fraction(convention=convention) <= budget:
            lo = mid
        else:
            hi = mid
    r = hi if lo == 0.0 else lo
    schedule = build(r)
    schedule.provenance = {"rule": "geometric", "ratio": r, "target_budget_fraction": float(budget),
                           "convention": convention}
    return schedule


def schedule_string(schedule: Schedule | None) -> str:
    """Stages as 'layer:keep' pairs, e.g. '1:133,10:27,20:3' ('' = no pruning)."""
    if schedule is None:
        return ""
    return ",".join(f"{s.layer}:{s.keep}" for s in schedule.stages)


def read_front(out_dir: str | Path) -> list[dict[str, Any]]:
    """The front of schedules in a derive output directory (`front.json`, written by `analysis.derive rule=search`):
    per budget {budget, convention, schedule_path, scorer, scorer_options, objective, ...}.

    Each entry is what a benchmark run at that budget uses: the schedule file and the scorer options it was
    searched with. Raises ScheduleError naming the file when there is no readable front.
    """
    path = Path(out_dir) / FRONT_FILE
    if not path.is_file():
        raise ScheduleError(f"{str(path)!r} does not exist: {str(out_dir)!r} holds no front of searched schedules "
                            f"(run `python -m analysis.derive rule=search budgets=[...] output={out_dir}`)")
    try:
        data = json.loads(path.read_text())
        front = [dict(entry) for entry in data["front"]]
        for entry in front:
            entry["schedule_path"] = str(Path(out_dir) / entry["schedule"])
            entry.setdefault("convention", data.get("convention", "processed"))
            entry.setdefault("scorer_options", {})
    except (ValueError, KeyError, TypeError) as err:
        raise ScheduleError(f"{str(path)!r} is not a front written by analysis.derive ({err!r})") from None
    return front
