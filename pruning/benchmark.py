"""`python -m pruning.benchmark`: model x task x methods x budgets -> rows of one tidy results table.

`run_benchmark(cfg)` (plain, importable) does the work; `main` is the thin Hydra entry over it
(configs/benchmark.yaml). One process evaluates one model on one task (the `model` and `data` groups) for every
method in `methods` (or the `method` group) at every budget in `budgets`; Hydra multirun spreads more models,
tasks, methods or budgets over jobs, all writing into the same `results_dir` (pruning/results.py).

Methods (configs/method/*.yaml) name a `scorer` and how their schedule is made, `schedule`:

* `none`: no pruning (the `unpruned` baseline; its budget is the model's vision-token count);
* `allocate`: stage `layers` (given for a `reference_layers`-deep model and scaled to this one by
  `scale_layers`) with keep counts solved from the run's budget by `pruning.schedule.allocate_keep`
  (geometric rule) so the schedule's budget in `convention` is within one token of the target;
* `derived`: the schedule file at `schedule_path` (analysis.derive); used as is when its budget is within one
  token of the target, else its layers with keep counts re-solved at the target;
* any other value: a schedule in configs/schedule/ used as is (its own budget; `budgets` does not apply).

A budget below what a method's layers allow (every layer up to the first stage sees every vision token) gives a
row with status `infeasible` and the allowed range in `note`, instead of a silently different budget.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pruning import results as res
from pruning.runner import RunOutput, TimingSpec, evaluate
from pruning.schedule import BEFORE_LM, CONVENTIONS, Schedule, ScheduleError, allocate_keep, round_half_up
from pruning.schedule import MethodInfeasible
from vlm.models import LoadedModel, load_from_config
from vlm.tasks.base import Task, TaskError, VQASample, build_task, data_spec

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
METHOD_KEYS = ("name", "scorer", "schedule", "layers", "reference_layers", "positions", "scorer_options",
               "schedule_path")
SCHEDULE_NONE, SCHEDULE_ALLOCATE, SCHEDULE_DERIVED = "none", "allocate", "derived"


class BenchmarkError(ValueError):
    """A benchmark configuration that cannot run; the message names the setting and what would be right."""


# -- configuration ----------------------------------------------------------------------------------------------
def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a DictConfig (other values pass through)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def load_method(name: str, configs_dir: Path = CONFIGS_DIR) -> dict[str, Any]:
    """The method config configs/method/<name>.yaml as a plain mapping."""
    path = configs_dir / "method" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir / "method").glob("*.yaml"))
        raise BenchmarkError(f"unknown method {name!r} (no {path}); known methods: {known}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def check_method(method: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a method mapping; raise BenchmarkError naming the bad key."""
    method = dict(method)
    unknown = sorted(set(method) - set(METHOD_KEYS))
    if unknown:
        raise BenchmarkError(f"method {method.get('name')!r}: unknown keys {unknown}; allowed keys are {list(METHOD_KEYS)}")
    if not method.get("name"):
        raise BenchmarkError(f"a method needs a `name`, got {method!r}")
    schedule = method.get("schedule")
    if not schedule:
        raise BenchmarkError(
            f"method {method['name']!r}: `schedule` is missing; use none, allocate, derived or a configs/schedule name"
        )
    if schedule != SCHEDULE_NONE and not method.get("scorer"):
        raise BenchmarkError(f"method {method['name']!r} prunes (schedule={schedule!r}) but names no `scorer`")
    if schedule == SCHEDULE_ALLOCATE and not method.get("layers"):
        raise BenchmarkError(f"method {method['name']!r}: schedule=allocate needs `layers` (the stage layers)")
    if schedule == SCHEDULE_DERIVED and not method.get("schedule_path"):
        raise BenchmarkError(
            f"method {method['name']!r}: schedule=derived needs `schedule_path` (a schedule.yaml written by "
            f"`python -m analysis.derive`), e.g. method_overrides.{method['name']}.schedule_path=PATH"
        )
    return method


def methods_from_config(cfg: Mapping[str, Any], configs_dir: Path = CONFIGS_DIR) -> list[dict[str, Any]]:
    """The methods of this run: `methods` (names) or the `method` group; `method_overrides[name]` merged on top."""
    names = cfg.get("methods")
    group = dict(cfg.get("method") or {})
    overrides = dict(cfg.get("method_overrides") or {})
    if names is None:
        if not group:
            raise BenchmarkError("no method: set `method=<name>` or `methods=[a,b,...]` (configs/method/)")
        methods = [group]
    else:
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise BenchmarkError("methods=[] names no method; give at least one of configs/method/*.yaml")
        methods = [group if group.get("name") == n else load_method(str(n), configs_dir) for n in names]
    out = []
    for m in methods:
        extra = overrides.get(m.get("name"), {}) or {}
        out.append(check_method({**m, **dict(extra)}))
    return out


def budgets_from_config(cfg: Mapping[str, Any]) -> list[float]:
    """`budgets` as a list of positive numbers (one number is accepted)."""
    budgets = cfg.get("budgets")
    if budgets is None:
        raise BenchmarkError("budgets is not set; give a list of target budgets, e.g. budgets=[192,128,64]")
    if isinstance(budgets, (int, float)) and not isinstance(budgets, bool):
        budgets = [budgets]
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise BenchmarkError(f"budgets contains {b!r}; every budget must be a number >= 0 (vision tokens per layer)")
        out.append(int(b) if float(b).is_integer() else float(b))
    return out


# -- schedules --------------------------------------------------------------------------------------------------
def scale_layers(layers: Sequence[int], num_layers: int, reference_layers: int | None) -> list[int]:
    """Map stage layers given for a `reference_layers`-deep model onto a `num_layers`-deep one.

    Rule: l -> round_half_up(l * num_layers / reference_layers), clipped to 0..num_layers-2, then each layer raised
    to one above the previous where needed so the stages stay strictly increasing; layer -1 (before the LM) stays.
    With reference_layers None (or equal to num_layers) the layers are used as given.
    """
    last = num_layers - 2
    out: list[int] = []
    for layer in layers:
        layer = int(layer)
        if layer == BEFORE_LM or not reference_layers or reference_layers == num_layers:
            scaled = layer
        else:
            scaled = min(max(round_half_up(layer * num_layers / reference_layers), 0), last)
        if out and scaled <= out[-1]:
            scaled = out[-1] + 1
        if scaled > last:
            raise BenchmarkError(
                f"stage layers {list(layers)} (for {reference_layers} layers) do not fit a {num_layers}-layer model: "
                f"scaled to {out + [scaled]}, but stages must lie in {BEFORE_LM} or 0..{last}"
            )
        out.append(scaled)
    return out


def schedule_string(schedule: Schedule | None) -> str:
    """Stages as 'layer:keep' pairs, e.g. '1:133,10:27,20:3' ('' = no pruning)."""
    if schedule is None:
        return ""
    return ",".join(f"{s.layer}:{s.keep}" for s in schedule.stages)


def named_schedule(name: str, configs_dir: Path = CONFIGS_DIR) -> Schedule:
    """A schedule from configs/schedule/<name>.yaml."""
    path = configs_dir / "schedule" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir / "schedule").glob("*.yaml"))
        raise BenchmarkError(
            f"schedule {name!r} is neither none/allocate/derived nor a file in configs/schedule/; known: {known}"
        )
    return Schedule.from_yaml(path)


def _with_positions(schedule: Schedule, positions: str | None) -> Schedule:
    return schedule if not positions else dataclasses.replace(schedule, positions=positions)


def method_schedule(
    method: Mapping[str, Any], num_layers: int, initial: int, budget: float, convention: str = "processed",
    configs_dir: Path = CONFIGS_DIR,
) -> Schedule:
    """The schedule a method uses at `budget` on a model with `num_layers` layers and `initial` vision tokens.

    Raises ScheduleError when the budget is out of reach of the method's stage layers (an infeasible run) and
    BenchmarkError when the method itself is misconfigured.
    """
    if convention not in CONVENTIONS:
        raise BenchmarkError(f"convention={convention!r} must be one of {list(CONVENTIONS)}")
    kind = method["schedule"]
    positions = method.get("positions")
    name = f"{method['name']}@{budget}"
    if kind == SCHEDULE_NONE:
        return Schedule(stages=[], num_layers=num_layers, vision_tokens=initial, name=method["name"])
    if kind == SCHEDULE_ALLOCATE:
        layers = scale_layers(method["layers"], num_layers, method.get("reference_layers"))
        return allocate_keep(layers, num_layers, initial, float(budget), convention, positions=positions or "keep",
                             name=name)
    if kind == SCHEDULE_DERIVED:
        path = Path(str(method["schedule_path"]))
        if not path.is_file():
            raise BenchmarkError(
                f"method {method['name']!r}: schedule_path={str(path)!r} does not exist; run "
                "`python -m analysis.derive input=<records dir> budget=...` first and point schedule_path at its schedule.yaml"
            )
        derived = Schedule.from_yaml(path)
        derived.validate(num_layers=num_layers, initial=initial)
        fitted = dataclasses.replace(derived, num_layers=num_layers, vision_tokens=initial)
        if abs(fitted.budget(convention=convention) - float(budget)) <= 1.0:
            return _with_positions(fitted, positions)
        realloc = allocate_keep(fitted.layers, num_layers, initial, float(budget), convention,
                                positions=positions or derived.positions, name=name)
        realloc.provenance = {"derived_from": str(path), "derived_provenance": dict(derived.provenance),
                              **realloc.provenance}
        return realloc
    schedule = named_schedule(str(kind), configs_dir)
    schedule.validate(num_layers=num_layers, initial=initial)
    return _with_positions(schedule, positions)


def fixed_budget(method: Mapping[str, Any]) -> bool:
    """True for methods whose schedule fixes the budget (a configs/schedule preset, or no pruning)."""
    return method["schedule"] not in (SCHEDULE_ALLOCATE, SCHEDULE_DERIVED)


# -- rows -------------------------------------------------------------------------------------------------------
def config_id(cfg: Mapping[str, Any]) -> str:
    """Short hash of the resolved run config (without hydra's own settings)."""
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k != "hydra"}, sort_keys=True, default_flow_style=None)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _numbers(values: Sequence[int]) -> str:
    return " ".join(str(int(v)) for v in values)


def make_row(
    *, key: Mapping[str, Any], method: Mapping[str, Any], schedule: Schedule | None, loaded: LoadedModel,
    output: RunOutput | None, metrics: Mapping[str, float] | None, batch_size: int, cfg_id: str,
    status: str = res.STATUS_OK, note: str = "",
) -> dict[str, Any]:
    """One results row (see pruning.results.COLUMNS)."""
    n_layers, n_vision = loaded.num_layers, loaded.vision_tokens_per_image
    row: dict[str, Any] = dict(key)
    row.update(status=status, scorer=method.get("scorer") or "", schedule=schedule_string(schedule),
               positions=schedule.positions if schedule is not None else "", batch_size=batch_size,
               config_id=cfg_id, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               note=note)
    if schedule is not None:
        for conv in CONVENTIONS:
            row[f"budget_{conv}"] = schedule.budget(n_layers, n_vision, conv) if schedule.stages else float(n_vision)
    if output is not None:
        row.update(prefill_ms=output.prefill_ms, generate_ms=output.generate_ms, tflops=output.tflops,
                   peak_mem_mb=output.peak_mem_mb, n_samples=output.n_samples, timing_batch=output.timing_batch,
                   vision_per_layer=_numbers(output.vision_per_layer), tokens_per_layer=_numbers(output.tokens_per_layer),
                   device=output.device)
    if metrics is not None:
        if "score" not in metrics:
            raise BenchmarkError(f"the task's score() returned {sorted(metrics)} without the headline key 'score'")
        row["accuracy"] = float(metrics["score"])
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"metric_{name}"] = float(value)
    return row


def _expected_vision(schedule: Schedule, n_layers: int, n_vision: int) -> list[int]:
    if not schedule.stages:
        return [n_vision] * n_layers
    return schedule.tokens_per_layer(n_layers, n_vision, "processed")


# -- the benchmark ----------------------------------------------------------------------------------------------
def run_benchmark(cfg: Mapping[str, Any] | DictConfig) -> Path:
    """Run every (method, budget) of `cfg` (configs/benchmark.yaml) not yet in the table; returns results_dir."""
    cfg = plain(cfg)
    convention = str(cfg.get("convention", "processed"))
    if convention not in CONVENTIONS:
        raise BenchmarkError(f"convention={convention!r} must be one of {list(CONVENTIONS)}")
    methods = methods_from_config(cfg)
    budgets = budgets_from_config(cfg)
    try:
        data = data_spec(cfg.get("data") or {})
    except TaskError as err:
        raise BenchmarkError(str(err)) from err
    results_dir = Path(str(cfg.get("results_dir") or "outputs/benchmark"))
    results_dir.mkdir(parents=True, exist_ok=True)
    timing = TimingSpec(**dict(cfg.get("timing") or {})).check()
    batch_size = int(cfg.get("batch_size", 8))
    rerun = bool(cfg.get("rerun", False))
    progress = bool(cfg.get("progress", True))
    seed = int(cfg.get("seed", 0))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    cfg_id = config_id(cfg)
    _write_config(results_dir, cfg, cfg_id)

    task: Task = build_task(data["task"], **data["options"])
    samples: list[VQASample] = list(task.samples(data["split"], limit=data["limit"]))
    if not samples:
        raise BenchmarkError(f"task {data['task']!r} split {data['split']!r} gave no samples; check {data['name']}")
    max_new_tokens = int(cfg.get("max_new_tokens") or task.max_new_tokens)
    loaded = load_from_config(cfg["model"])
    n_layers, n_vision = loaded.num_layers, loaded.vision_tokens_per_image
    group = {"model": loaded.name, "task": data["task"], "split": data["split"], "limit": data["limit"]}

    # the plan: (method, budget key, budget target) in order, the baseline first
    plan: list[tuple[dict, float]] = []
    baseline = next((m for m in methods if m["schedule"] == SCHEDULE_NONE), None)
    if baseline is None and cfg.get("baseline", True):
        baseline = check_method(load_method(res.BASELINE_METHOD))
    if baseline is not None:
        plan.append((baseline, float(n_vision)))
    for m in methods:
        if m is baseline or m["schedule"] == SCHEDULE_NONE:
            continue
        if fixed_budget(m):
            try:
                preset = named_schedule(str(m["schedule"]))
                plan.append((m, round(preset.budget(n_layers, n_vision, convention), 3)))
            except ScheduleError:  # made for another model: recorded as an infeasible row below
                plan.append((m, float("nan")))
        else:
            plan += [(m, float(b)) for b in budgets]

    table = res.read_table(results_dir)
    outer = tqdm(plan, desc=f"benchmark {data['name']}", unit="run", disable=not progress)
    for method, budget in outer:
        is_base = method["schedule"] == SCHEDULE_NONE
        key = {**group, "convention": "" if is_base else convention, "method": method["name"],
               "budget": int(budget) if math.isfinite(budget) and float(budget).is_integer() else budget}
        if not rerun and res.has_row(table, key):
            log.info("skip %s at %s: already in %s", method["name"], key["budget"], results_dir)
            continue
        outer.set_postfix_str(f"{method['name']}@{key['budget']}")
        try:
            schedule = method_schedule(method, n_layers, n_vision, budget, convention)
        except ScheduleError as err:
            row = make_row(key=key, method=method, schedule=None, loaded=loaded, output=None, metrics=None,
                           batch_size=batch_size, cfg_id=cfg_id, status=res.STATUS_INFEASIBLE, note=str(err))
            table = res.upsert_rows(results_dir, [row])
            log.warning("%s at budget %s is infeasible: %s", method["name"], key["budget"], err)
            continue
        torch.manual_seed(seed)
        try:
            output = evaluate(
                loaded, samples, schedule=schedule if schedule.stages else None, scorer=method.get("scorer"),
                scorer_options=method.get("scorer_options") or {}, seed=seed, batch_size=batch_size,
                max_new_tokens=max_new_tokens, timing=timing, progress=progress, desc=f"{method['name']}@{key['budget']}",
            )
        except MethodInfeasible as err:  # valid, but out of this method's reach on this model (e.g. no CLS token)
            row = make_row(key=key, method=method, schedule=schedule, loaded=loaded, output=None, metrics=None,
                           batch_size=batch_size, cfg_id=cfg_id, status=res.STATUS_INFEASIBLE, note=str(err))
            table = res.upsert_rows(results_dir, [row])
            log.warning("%s at budget %s is infeasible: %s", method["name"], key["budget"], err)
            continue
        metrics = task.score(output.predictions, samples)
        note = ""
        expected = _expected_vision(schedule, n_layers, n_vision)
        if output.vision_per_layer != expected:
            note = f"engine processed vision tokens {output.vision_per_layer}, schedule says {expected}"
            log.warning("%s: %s", method["name"], note)
        row = make_row(key=key, method=method, schedule=schedule, loaded=loaded, output=output, metrics=metrics,
                       batch_size=batch_size, cfg_id=cfg_id, note=note)
        table = res.upsert_rows(results_dir, [row])
    outer.close()
    table = res.read_table(results_dir)
    res.write_summary(results_dir, table)
    if cfg.get("plots", True):
        res.plot_tradeoffs(table, results_dir / res.PLOTS_DIR)
    return results_dir


def _write_config(results_dir: Path, cfg: Mapping[str, Any], cfg_id: str) -> None:
    """config.yaml (latest run) and configs/<id>.yaml (every run) beside the table."""
    text = yaml.safe_dump({k: v for k, v in cfg.items() if k != "hydra"}, sort_keys=False, default_flow_style=None)
    (results_dir / "configs").mkdir(parents=True, exist_ok=True)
    (results_dir / "configs" / f"{cfg_id}.yaml").write_text(text)
    (results_dir / "config.yaml").write_text(f"# config_id: {cfg_id}\n{text}")


@hydra.main(config_path="../configs", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run_benchmark over the composed config, then point at the outputs."""
    out = run_benchmark(cfg)
    print(f"results: {out / res.RESULTS_NAME}\nsummary: {out / res.SUMMARY_NAME}\nplots:   {out / res.PLOTS_DIR}")


if __name__ == "__main__":
    main()
