"""Method configs -> what runs: the schedule for a model and budget, the scorer (or selector) and its options.

A method (configs/method/*.yaml) names a `scorer` and how its schedule is made, `schedule`:

* `none`: no pruning (the `unpruned` baseline; its budget is the model's vision-token count);
* `allocate`: stage `layers` (given for a `reference_layers`-deep model and scaled to this one by
  `scale_layers`) with keep counts solved from the run's budget by `pruning.schedule.allocate_keep`
  (geometric rule) so the schedule's budget in `convention` is within one token of the target;
* `derived`: the schedule file at `schedule_path` (analysis.derive); used as is when its budget is within one
  token of the target, else its layers with keep counts re-solved at the target. `schedule_path` may also be a
  derive output directory with a front (rule=search): each budget then uses the front's schedule for it and the
  scorer options it was searched with (options set on the method win);
* any other value: a schedule in configs/schedule/ used as is (its own budget; a run's budget does not apply).

On a model whose vision-token count follows the image (`initial` None: Qwen2-VL with dynamic resolution) the budget
is a fraction of each image's vision tokens in (0, 1] and every schedule keeps fractions: `allocate` solves them with
`pruning.schedule.allocate_fractions`, a derived or preset schedule must hold fractions (a count is a MethodError).

`resolve_method(method, num_layers, initial, budget, convention)` does all of it and returns a `ResolvedMethod`
(the method as it runs, its Schedule, scorer and scorer options). It is the one place where a method config
becomes a schedule: the benchmark (pruning.benchmark), the lmms-eval adapter (pruning.lmms_adapter) and the
end-to-end demo (pipeline.demo) go through this module.

Errors: an invalid method, schedule file or setting is a `MethodError` naming the file and field; a budget out of
reach of a valid method's stage layers is `pruning.schedule.BudgetUnreachable` (an infeasible run, not an error).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from pruning.schedule import (BEFORE_LM, CONVENTIONS, Schedule, ScheduleError, allocate_fractions, allocate_keep,
                              read_front, round_half_up)
from vlm.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
METHOD_KEYS = ("name", "scorer", "schedule", "layers", "reference_layers", "positions", "scorer_options",
               "schedule_path")
SCHEDULE_NONE, SCHEDULE_ALLOCATE, SCHEDULE_DERIVED = "none", "allocate", "derived"
BUDGET_MATCH = 1.0  # a written schedule serves a target budget within this many vision tokens of its own
FRACTION_MATCH = 0.005  # ... or, as a fraction of the vision tokens (images of any size), within this share


class MethodError(UserError, ValueError):
    """A method configuration that cannot run; the message names the method, file or key and what would be right."""


# -- method configs ---------------------------------------------------------------------------------------------
def load_method(name: str, configs_dir: Path = CONFIGS_DIR) -> dict[str, Any]:
    """The method config configs/method/<name>.yaml as a plain mapping."""
    path = configs_dir / "method" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir / "method").glob("*.yaml"))
        raise MethodError(f"unknown method {name!r} (no {path}); known methods: {known}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def check_method(method: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a method mapping; raise MethodError naming the bad key."""
    method = dict(method)
    unknown = sorted(set(method) - set(METHOD_KEYS))
    if unknown:
        raise MethodError(f"method {method.get('name')!r}: unknown keys {unknown}; allowed keys are {list(METHOD_KEYS)}")
    if not method.get("name"):
        raise MethodError(f"a method needs a `name`, got {method!r}")
    schedule = method.get("schedule")
    if not schedule:
        raise MethodError(
            f"method {method['name']!r}: `schedule` is missing; use none, allocate, derived or a configs/schedule name"
        )
    if schedule != SCHEDULE_NONE and not method.get("scorer"):
        raise MethodError(f"method {method['name']!r} prunes (schedule={schedule!r}) but names no `scorer`")
    if schedule == SCHEDULE_ALLOCATE and not method.get("layers"):
        raise MethodError(f"method {method['name']!r}: schedule=allocate needs `layers` (the stage layers)")
    if schedule == SCHEDULE_DERIVED and not method.get("schedule_path"):
        raise MethodError(
            f"method {method['name']!r}: schedule=derived needs `schedule_path` (a schedule.yaml written by "
            f"`python -m analysis.derive`): add method.schedule_path=PATH to `method={method['name']}`, or "
            f"+method_overrides.{method['name']}.schedule_path=PATH when it is one of `methods=[...]`"
        )
    options = method.get("scorer_options") or {}
    if not isinstance(options, Mapping):
        raise MethodError(f"method {method['name']!r}: scorer_options={options!r} must be a mapping of option: value")
    return method


def fixed_budget(method: Mapping[str, Any]) -> bool:
    """True for methods whose schedule fixes the budget (a configs/schedule preset, or no pruning)."""
    return method["schedule"] not in (SCHEDULE_ALLOCATE, SCHEDULE_DERIVED)


# -- schedules --------------------------------------------------------------------------------------------------
def scale_layers(layers: Sequence[int], num_layers: int, reference_layers: int | None) -> list[int]:
    """Map stage layers given for a `reference_layers`-deep model onto a `num_layers`-deep one.

    A stage at layer l drops tokens after l + 1 layers have run, so what scales is that number of layers before the
    drop: l -> round_half_up((l + 1) * num_layers / reference_layers) - 1, clipped to 0..num_layers-2, then each
    layer raised to one above the previous where needed so the stages stay strictly increasing. The drop then lands
    at the same fraction of the stack as in the reference (scaling l itself would land it about
    (1 - num_layers / reference_layers) layers late). Layer -1 (before the LM) stays. With reference_layers None
    (or equal to num_layers) the layers are used as given. Examples for the reference [1, 10, 20] of 32 layers:
    8 layers -> [0, 2, 4], 16 -> [0, 5, 10], 40 -> [2, 13, 25].
    """
    last = num_layers - 2
    out: list[int] = []
    for layer in layers:
        layer = int(layer)
        if layer == BEFORE_LM or not reference_layers or reference_layers == num_layers:
            scaled = layer
        else:
            scaled = min(max(round_half_up((layer + 1) * num_layers / reference_layers) - 1, 0), last)
        if out and scaled <= out[-1]:
            scaled = out[-1] + 1
        if scaled > last:
            raise MethodError(
                f"stage layers {list(layers)} (for {reference_layers} layers) do not fit a {num_layers}-layer model: "
                f"scaled to {out + [scaled]}, but stages must lie in {BEFORE_LM} or 0..{last}"
            )
        out.append(scaled)
    return out


def preset_path(name: str, configs_dir: Path = CONFIGS_DIR) -> Path:
    """The path of the schedule preset configs/schedule/<name>.yaml; MethodError listing the presets if none."""
    path = configs_dir / "schedule" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir / "schedule").glob("*.yaml"))
        raise MethodError(
            f"schedule {name!r} is neither none/allocate/derived nor a file in configs/schedule/; known: {known}"
        )
    return path


def _schedule_file(method: Mapping[str, Any], path: Path, num_layers: int, initial: int | None) -> Schedule:
    """The schedule in `path`, checked against the model (`initial` None: a vision-token count that follows the
    image, so every keep must be a fraction); any defect is a MethodError naming method and file."""
    try:
        schedule = Schedule.from_yaml(path).validate(num_layers=num_layers, initial=initial)
        if initial is None:
            schedule.fraction_per_layer(num_layers)  # raises on a count
        return schedule
    except ScheduleError as err:
        text = str(err)
        where = "" if str(path) in text else f"schedule file {str(path)!r}: "
        tail = ("; this model's vision-token count follows the image size, so a schedule keeps fractions of each "
                "image's tokens (keep: 0.25)") if initial is None else ""
        raise MethodError(f"method {method['name']!r}: {where}{text}{tail}") from None


def _with_positions(schedule: Schedule, positions: str | None) -> Schedule:
    return schedule if not positions else dataclasses.replace(schedule, positions=positions)


def method_schedule(
    method: Mapping[str, Any], num_layers: int, initial: int | None, budget: float, convention: str = "processed",
    configs_dir: Path = CONFIGS_DIR,
) -> Schedule:
    """The schedule a method uses at `budget` on a model with `num_layers` layers and `initial` vision tokens
    (None: the count follows the image, `budget` is a fraction of each image's tokens and keeps are fractions).

    A derived method's `schedule_path` must be a schedule file here (`resolve_method` first picks a front's entry).
    Raises BudgetUnreachable when the budget is out of reach of the method's (valid) stage layers, an infeasible
    run, and MethodError when the method, its schedule file or a setting is invalid.
    """
    if convention not in CONVENTIONS:
        raise MethodError(f"convention={convention!r} must be one of {list(CONVENTIONS)}")
    kind = method["schedule"]
    positions = method.get("positions")
    name = f"{method['name']}@{budget}"
    if kind == SCHEDULE_NONE:
        return Schedule(stages=[], num_layers=num_layers, vision_tokens=initial, name=method["name"])
    if kind == SCHEDULE_ALLOCATE:
        layers = scale_layers(method["layers"], num_layers, method.get("reference_layers"))
        if initial is None:
            return allocate_fractions(layers, num_layers, float(budget), convention, positions=positions or "keep",
                                      name=name)
        return allocate_keep(layers, num_layers, initial, float(budget), convention, positions=positions or "keep",
                             name=name)
    if kind == SCHEDULE_DERIVED:
        path = Path(str(method["schedule_path"]))
        if not path.exists():
            raise MethodError(
                f"method {method['name']!r}: schedule_path={str(path)!r} does not exist; run "
                "`python -m analysis.derive input=<records dir> budget=...` first and point schedule_path at its schedule.yaml"
            )
        derived = _schedule_file(method, path, num_layers, initial)
        fitted = dataclasses.replace(derived, num_layers=num_layers, vision_tokens=initial)
        if initial is None:
            if abs(fitted.budget_fraction(convention=convention) - float(budget)) <= FRACTION_MATCH:
                return _with_positions(fitted, positions)
            realloc = allocate_fractions(fitted.layers, num_layers, float(budget), convention,
                                         positions=positions or derived.positions, name=name)
        elif abs(fitted.budget(convention=convention) - float(budget)) <= BUDGET_MATCH:
            return _with_positions(fitted, positions)
        else:
            realloc = allocate_keep(fitted.layers, num_layers, initial, float(budget), convention,
                                    positions=positions or derived.positions, name=name)
        realloc.provenance = {"derived_from": str(path), "derived_provenance": dict(derived.provenance),
                              **realloc.provenance}
        return realloc
    schedule = _schedule_file(method, preset_path(str(kind), configs_dir), num_layers, initial)
    return _with_positions(schedule, positions)


# -- a searched front (analysis.derive rule=search) --------------------------------------------------------------
def front_entry(front: Sequence[Mapping[str, Any]], budget: float, convention: str) -> Mapping[str, Any] | None:
    """The entry of a front (pruning.schedule.read_front) that serves `budget` in `convention` (its budget within
    BUDGET_MATCH tokens), or None."""
    return next((e for e in front if e["convention"] == convention
                 and abs(float(e["budget"]) - float(budget)) <= BUDGET_MATCH), None)


def with_front_entry(method: dict[str, Any], budget: float, convention: str) -> dict[str, Any]:
    """A derived method whose `schedule_path` is a derive output directory with a front (analysis.derive
    rule=search): the method with that budget's schedule file. Other methods come back as they are. MethodError
    when the front has no schedule for this budget."""
    path = Path(str(method.get("schedule_path") or ""))
    if method["schedule"] != SCHEDULE_DERIVED or not path.is_dir():
        return method
    try:
        front = read_front(path)
    except ScheduleError as err:
        raise MethodError(f"method {method['name']!r}: schedule_path={str(path)!r} is a directory but {err}") from None
    match = front_entry(front, budget, convention)
    if match is None:
        have = sorted({f"{float(e['budget']):g} ({e['convention']})" for e in front})
        raise MethodError(
            f"method {method['name']!r}: the front in {str(path)!r} holds schedules for budgets {have}, none for "
            f"{budget:g} ({convention}); search it with budgets including {budget:g} (python -m analysis.derive "
            f"rule=search budgets=[...] output={path}) or benchmark the front's budgets"
        )
    return {**method, "schedule_path": match["schedule_path"]}


def with_searched_options(method: dict[str, Any], schedule: Schedule) -> dict[str, Any]:
    """A derived method whose schedule file was searched (analysis.derive rule=search) and is used as written: the
    method with the scorer options the schedule was searched with (`provenance.search.scorer_options`); options set
    on the method win. Any other method or schedule comes back as it is."""
    searched = (schedule.provenance.get("search") or {}).get("scorer_options") if schedule.provenance else None
    if method["schedule"] != SCHEDULE_DERIVED or not isinstance(searched, Mapping):
        return method
    return {**method, "scorer_options": {**dict(searched), **dict(method.get("scorer_options") or {})}}


# -- the whole resolution ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ResolvedMethod:
    """A method at one budget on one model: what the engine runs."""

    method: dict[str, Any]  # as it runs: a front's schedule file and the searched scorer options filled in
    schedule: Schedule  # no stages = no pruning

    @property
    def scorer(self) -> str | None:
        """The scorer or selector name (None for a method that names none, the unpruned baseline)."""
        return self.method.get("scorer")

    @property
    def scorer_options(self) -> dict[str, Any]:
        """The options set on the method (the scorer's own defaults fill in the rest)."""
        return dict(self.method.get("scorer_options") or {})


def resolve_method(
    method: Mapping[str, Any], num_layers: int, initial: int | None, budget: float, convention: str = "processed",
    configs_dir: Path = CONFIGS_DIR,
) -> ResolvedMethod:
    """A checked method (check_method) at `budget` on a model with `num_layers` layers and `initial` vision tokens:
    a front's entry for the budget (with_front_entry), the schedule (method_schedule), the searched scorer options
    (with_searched_options). Raises BudgetUnreachable (infeasible) or MethodError (invalid), as method_schedule."""
    runs = with_front_entry(dict(method), budget, convention)
    schedule = method_schedule(runs, num_layers, initial, budget, convention, configs_dir)
    return ResolvedMethod(method=with_searched_options(runs, schedule), schedule=schedule)


__all__ = [
    "BUDGET_MATCH", "CONFIGS_DIR", "FRACTION_MATCH", "METHOD_KEYS", "MethodError", "ResolvedMethod", "SCHEDULE_ALLOCATE",
    "SCHEDULE_DERIVED", "SCHEDULE_NONE", "check_method", "fixed_budget", "front_entry", "load_method",
    "method_schedule", "preset_path", "resolve_method", "scale_layers", "with_front_entry", "with_searched_options",
]
