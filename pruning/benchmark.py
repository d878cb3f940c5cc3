"""`python -m pruning.benchmark`: model x task x methods x budgets -> rows of one tidy results table.

`run_benchmark(cfg)` (plain, importable) does the work; `main` is the thin Hydra entry over it
(configs/benchmark.yaml). One process evaluates one model on one task (the `model` and `data` groups) for every
method in `methods` (or the `method` group) at every budget in `budgets`; Hydra multirun spreads more models,
tasks, methods or budgets over jobs, all writing into the same `results_dir` (pruning/results.py).

Methods (configs/method/*.yaml) become a schedule, a scorer and its options at each budget through
`pruning.methods.resolve_method` (none, allocate, derived from a schedule file or a searched front, or a
configs/schedule preset; see that module).

A budget below what a method's layers allow (every layer up to the first stage sees every vision token) gives a
row with status `infeasible` and the allowed range in `note`, instead of a silently different budget. That is the
only outcome recorded without numbers: an *invalid* method, schedule file or setting is an error that names the
file and field, raised before anything is written; and an infeasible row never blocks a later run that can compute
it (a rerun recomputes it).

Images of different sizes (a model whose vision-token count V follows the image, e.g. Qwen2-VL with dynamic
resolution): the run's budgets are fractions of each image's vision tokens in (0, 1] (the baseline's is 1) and every
schedule keeps fractions (pruning.methods). Every row reports its budget both ways: `budget_processed` /
`budget_paper` in mean vision tokens per decoder layer (mean over the samples) and `budget_fraction`, the processed
budget as a fraction of each sample's own V (mean over the samples).

Row identity (pruning/results.py): every setting that can change a number is part of a row's key. `setup_id`
hashes what the unpruned baseline shares with the pruned rows (model source, revision, dtype, attention
implementation, device type, execution mode, data options, max_new_tokens, timing batch); `variant_id` hashes that
plus the method's resolved settings (scorer, scorer options with their defaults, resolved schedule, positions, the
seed for scorers that draw random numbers). `variant` says in words how the method differs from its config file
(e.g. `positions=renumber`), `model_settings` how the model was loaded.

Data parallel (`workers=N worker=i`, vlm.parallel and pruning/partials.py): the samples of every run are cut into
blocks of `batch_size`, block k going to worker k mod N (so each worker's batches are batches of the one-worker run);
each worker writes its part of each run under results_dir/parts/ and skips the parts it already wrote (a killed
worker is rerun alone). The process that finds every part of a run present (the last worker to finish it) merges
them (predictions in split order, then the task's official metric over all of them) and writes the row, under a
lock so it is written once. `workers=N` without `worker` only merges, and names the missing parts (exit status 2).
Worker 0 times the prefill of the run's fixed timing batch, as a one-worker run does. `workers` and `worker` are not
part of a row's identity or its config_id: an N-worker row stands where the one-worker row would, with the same
accuracy, metrics and counts.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pruning import partials
from pruning import results as res
from pruning.compiled import CompileError, check_buckets, check_mode
from pruning.methods import (CONFIGS_DIR, SCHEDULE_NONE, MethodError, check_method, fixed_budget, load_method,
                             method_schedule, resolve_method, with_front_entry)
from pruning.runner import RunOutput, TimingSpec, evaluate, mean_per_layer
from pruning.schedule import CONVENTIONS, BudgetUnreachable, MethodInfeasible, Schedule, ScheduleError, schedule_string
from pruning.scorers import get_scorer
from pruning.selectors import get_selector, is_selector
from vlm.cli import run_main
from vlm.errors import UserError
from vlm.models import LoadedModel, load_from_config
from vlm.parallel import WorkerSpec, locked, missing_workers, read_parts, write_part
from vlm.tasks.base import Task, TaskError, VQASample, build_task, data_spec

log = logging.getLogger(__name__)
T = TypeVar("T")

ID_DIGITS = 10
PARALLEL_KEYS = ("workers", "worker")  # how the work was split: never part of a row's identity or config_id


class BenchmarkError(UserError, ValueError):
    """A benchmark configuration that cannot run; the message names the setting and what would be right."""


def _benchmark_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: a MethodError (an invalid method, pruning.methods) raised by `fn` becomes a BenchmarkError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except MethodError as err:
            raise BenchmarkError(str(err)) from None

    return wrapper


# -- configuration ----------------------------------------------------------------------------------------------
def plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a DictConfig (other values pass through)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


@_benchmark_errors
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
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence):
        budgets = [budgets]
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            raise BenchmarkError(
                f"budgets={cfg.get('budgets')!r}: {b!r} is not a number; every budget must be a number >= 0 (mean "
                "vision tokens per decoder layer), e.g. budgets=[192,128] or budgets=64"
            )
        out.append(int(b) if float(b).is_integer() else float(b))
    if not out:
        raise BenchmarkError("budgets=[] names no budget; give at least one, e.g. budgets=[192,128]")
    return out


# -- rows -------------------------------------------------------------------------------------------------------
def config_id(cfg: Mapping[str, Any]) -> str:
    """Short hash of the resolved run config (without hydra's own settings and how the work was split)."""
    return short_hash(_recorded_config(cfg))


def _recorded_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as recorded beside the table: without hydra's settings and the worker split (PARALLEL_KEYS)."""
    return {k: v for k, v in cfg.items() if k != "hydra" and k not in PARALLEL_KEYS}


def short_hash(value: Any) -> str:
    """A short, stable hash of a plain value (mappings hashed with sorted keys)."""
    text = yaml.safe_dump(value, sort_keys=True, default_flow_style=None)
    return hashlib.sha256(text.encode()).hexdigest()[:ID_DIGITS]


def _numbers(values: Sequence[float]) -> str:
    """Space-separated numbers: ints as ints, a mean over samples (images of different sizes) to 0.1."""
    return " ".join(str(int(v)) if float(v).is_integer() else f"{float(v):.1f}" for v in values)


def execution_setting(cfg: Mapping[str, Any]) -> tuple[bool | str, Any, str]:
    """(compile for the runner, the buckets, the execution label in a row's identity) from `compile`,
    `compile_mode` and `compile_buckets`; BenchmarkError names a bad value."""
    flag = cfg.get("compile", False)
    if not isinstance(flag, bool):
        raise BenchmarkError(f"compile={flag!r} must be true or false (compile_mode picks the torch.compile mode)")
    if not flag:
        return False, None, "eager"
    try:
        mode = check_mode(cfg.get("compile_mode"))
        buckets = check_buckets(cfg.get("compile_buckets", 64))
    except CompileError as err:
        raise BenchmarkError(str(err)) from None
    return (mode or True), buckets, f"compiled mode={mode or 'auto'} buckets={buckets}"


def model_settings(model_cfg: Mapping[str, Any], loaded: LoadedModel, execution: str = "eager") -> dict[str, Any]:
    """How the model was loaded, as far as it can change a number: source or random architecture, dtype, ..."""
    model_cfg = dict(model_cfg or {})
    settings: dict[str, Any] = {}
    if model_cfg.get("source"):
        settings.update(source=str(model_cfg["source"]), revision=model_cfg.get("revision"))
    else:
        settings.update(arch=short_hash(plain(model_cfg.get("arch"))), seed=model_cfg.get("seed", 0),
                        processor=model_cfg.get("processor"))
    settings.update(dtype=str(loaded.dtype).replace("torch.", ""),
                    attn=str(getattr(loaded.config, "_attn_implementation", None) or model_cfg.get("attn_implementation")),
                    device=loaded.device.type, execution=execution)
    return settings


def describe(settings: Mapping[str, Any]) -> str:
    """`key=value` pairs of the settings that are set, space-separated."""
    return " ".join(f"{k}={v}" for k, v in settings.items() if v is not None and v != "")


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def method_variant(method: Mapping[str, Any], configs_dir: Path = CONFIGS_DIR) -> str:
    """How `method` differs from configs/method/<name>.yaml, e.g. 'positions=renumber' ('' = as the file says)."""
    path = configs_dir / "method" / f"{method['name']}.yaml"
    stock = _flat("", load_method(str(method["name"]), configs_dir)) if path.is_file() else {}
    mine = _flat("", dict(method))
    changed = {k: v for k, v in mine.items() if k not in stock or stock[k] != v}
    changed.update({k: None for k in stock if k not in mine})
    return " ".join(f"{k}={v}" for k, v in sorted(changed.items()) if not (v is None and k not in stock))


def _seeded(scorer: str | None) -> bool:
    """True for scorers that draw random numbers (registered with seeded=True)."""
    try:
        return bool(scorer) and not is_selector(str(scorer)) and get_scorer(str(scorer)).seeded
    except KeyError:
        return False


def scorer_settings(method: Mapping[str, Any]) -> dict[str, Any]:
    """The scorer's options with its defaults filled in (what the scorer really runs with)."""
    options = dict(method.get("scorer_options") or {})
    scorer = method.get("scorer")
    try:
        spec = (get_selector if is_selector(str(scorer)) else get_scorer)(str(scorer)) if scorer else None
    except KeyError:  # an unknown name: the engine reports it when the run is planned
        spec = None
    return {**(dict(spec.options) if spec is not None else {}), **options}


@dataclasses.dataclass
class PlannedRun:
    """One (method, budget) of a benchmark: its resolved schedule (None = infeasible, see `reason`) and identity."""

    method: dict[str, Any]  # as it runs (a front's entry filled in: its schedule file and scorer options)
    budget: float
    schedule: Schedule | None
    reason: str = ""
    configured: dict[str, Any] | None = None  # as configured, when it differs from `method` (labels the variant)
    key: dict[str, Any] = dataclasses.field(default_factory=dict)
    variant: str = ""
    variant_id: str = ""

    @property
    def is_baseline(self) -> bool:
        return self.method["schedule"] == SCHEDULE_NONE


def identify(run: PlannedRun, group: Mapping[str, Any], setup: Mapping[str, Any], convention: str,
             seed: int) -> PlannedRun:
    """Fill in the run's key, `variant` and `variant_id` (see the module docstring)."""
    method, budget = run.method, run.budget
    identity: dict[str, Any] = {
        "setup": dict(setup), "scorer": method.get("scorer"), "scorer_options": scorer_settings(method),
        "schedule_kind": method["schedule"],
    }
    if run.schedule is not None:
        identity.update(schedule=schedule_string(run.schedule), positions=run.schedule.positions)
    else:  # infeasible: what was asked
        identity.update({k: method.get(k) for k in ("layers", "reference_layers", "positions", "schedule_path")})
    if _seeded(method.get("scorer")):  # its numbers depend on `seed`
        identity["seed"] = seed
    run.variant = method_variant(run.configured or method)
    run.variant_id = short_hash(identity)
    run.key = {**group, "convention": "" if run.is_baseline else convention, "method": method["name"],
               "budget": int(budget) if math.isfinite(budget) and float(budget).is_integer() else budget,
               "variant_id": run.variant_id}
    return run


def make_row(
    *, key: Mapping[str, Any], method: Mapping[str, Any], schedule: Schedule | None, loaded: LoadedModel,
    output: RunOutput | None, metrics: Mapping[str, float] | None, batch_size: int, cfg_id: str,
    status: str = res.STATUS_OK, note: str = "", variant: str = "", settings: str = "",
) -> dict[str, Any]:
    """One results row (see pruning.results.COLUMNS)."""
    n_layers, n_vision = loaded.num_layers, loaded.fixed_vision_tokens
    row: dict[str, Any] = dict(key)
    row.update(status=status, variant=variant, model_settings=settings, scorer=method.get("scorer") or "",
               schedule=schedule_string(schedule),
               positions=schedule.positions if schedule is not None else "", batch_size=batch_size,
               config_id=cfg_id, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               note=note)
    row["budget_unit"] = "tokens" if n_vision is not None else "fraction"
    counts = [n_vision] if n_vision is not None else (output.vision_counts if output is not None else [])
    if schedule is not None and counts:  # per sample from its own V, then the mean over the samples
        for conv in CONVENTIONS:
            row[f"budget_{conv}"] = _mean([schedule.budget(n_layers, v, conv) if schedule.stages else float(v)
                                           for v in counts])
        row["budget_fraction"] = _mean([schedule.budget_fraction(n_layers, v) if schedule.stages else 1.0
                                        for v in counts])
    elif schedule is not None and schedule.stages and n_vision is None:  # no samples measured: the nominal share
        row["budget_fraction"] = schedule.budget_fraction(n_layers)
    if output is not None:
        row.update(prefill_ms=output.prefill_ms, generate_ms=output.generate_ms, tflops=output.tflops,
                   peak_mem_mb=output.peak_mem_mb, n_samples=output.n_samples, timing_batch=output.timing_batch,
                   vision_per_layer=_numbers(output.vision_per_layer), tokens_per_layer=_numbers(output.tokens_per_layer),
                   device=output.device, execution=output.extras.get("execution", "eager"))
        if output.extras.get("compile_fallback"):
            row["note"] = "; ".join(filter(None, [row["note"], f"compile fell back to eager: {output.extras['compile_fallback']}"]))
        if output.extras.get("cudagraph_skip"):
            row["note"] = "; ".join(filter(None, [row["note"], f"no CUDA graphs: {output.extras['cudagraph_skip']}"]))
    if metrics is not None:
        if "score" not in metrics:
            raise BenchmarkError(f"the task's score() returned {sorted(metrics)} without the headline key 'score'")
        row["accuracy"] = float(metrics["score"])
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"metric_{name}"] = float(value)
    return row


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _expected_vision(schedule: Schedule, n_layers: int, n_vision: int) -> list[int]:
    if not schedule.stages:
        return [n_vision] * n_layers
    return schedule.tokens_per_layer(n_layers, n_vision, "processed")


# -- the benchmark ----------------------------------------------------------------------------------------------
def check_results_dir(results_dir: Path) -> Path:
    """`results_dir` must be a directory (or not exist yet) whose results.csv, if any, is a table of this toolkit."""
    if results_dir.exists() and not results_dir.is_dir():
        raise BenchmarkError(f"results_dir={str(results_dir)!r} is a file; results_dir must be a directory "
                             "(it holds results.csv, summary.md and plots/)")
    res.read_table(results_dir)  # raises ResultsError naming the file when it is not a results table
    return results_dir


@_benchmark_errors
def plan_runs(methods: Sequence[Mapping[str, Any]], budgets: Sequence[float], loaded: LoadedModel, convention: str,
              baseline: bool = True) -> list[PlannedRun]:
    """Every (method, budget) of the run in order, the baseline first, each with its schedule resolved.

    Invalid methods, schedule files or scorer settings raise BenchmarkError here, before anything runs or is
    written; a budget out of reach of a valid method's layers becomes a run with `schedule=None` and the reason.
    """
    from pruning.engine import PruningEngine

    n_layers, n_vision = loaded.num_layers, loaded.fixed_vision_tokens
    if n_vision is None:
        over = [b for b in budgets if not 0 < b <= 1]
        if over:
            raise BenchmarkError(
                f"budgets {over} are out of range: {loaded.name!r} gives a vision-token count that follows each "
                "image's size, so budgets are fractions of each image's vision tokens (mean over decoder layers) in "
                "(0, 1], e.g. budgets=[0.5,0.25]"
            )
    pairs: list[tuple[dict, float]] = []
    base = next((m for m in methods if m["schedule"] == SCHEDULE_NONE), None)
    if base is None and baseline:
        base = check_method(load_method(res.BASELINE_METHOD))
    if base is not None:
        pairs.append((dict(base), float(n_vision) if n_vision is not None else 1.0))
    for m in methods:
        if m is base or m["schedule"] == SCHEDULE_NONE:
            continue
        if fixed_budget(m):
            preset = method_schedule(m, n_layers, n_vision, 0.0, convention)
            pairs.append((dict(m), round(preset.budget(n_layers, n_vision, convention), 3) if n_vision is not None
                          else round(preset.budget_fraction(n_layers, None, convention), 4)))
        else:
            pairs += [(dict(m), float(b)) for b in budgets]
    runs = []
    for configured, budget in pairs:
        try:
            resolved = resolve_method(configured, n_layers, n_vision, budget, convention)
        except BudgetUnreachable as err:
            method = with_front_entry(configured, budget, convention)  # the front's entry, as the run would use it
            runs.append(PlannedRun(method, budget, None, reason=str(err), configured=configured))
            continue
        except ScheduleError as err:
            raise BenchmarkError(f"method {configured['name']!r} at budget {budget:g}: {err}") from None
        method, schedule = resolved.method, resolved.schedule
        if schedule.stages:
            try:  # the engine's own checks (scorer name and options, stage layers) without attaching anything
                PruningEngine(loaded.model, schedule, scorer=method.get("scorer"),
                              scorer_options=method.get("scorer_options") or {})
            except MethodInfeasible as err:  # e.g. a keep count pooling cannot factor
                runs.append(PlannedRun(method, budget, None, reason=str(err), configured=configured))
                continue
            except (KeyError, ValueError, UserError) as err:
                raise BenchmarkError(f"method {method['name']!r}: {str(err).strip(chr(34))}") from None
        runs.append(PlannedRun(method, budget, schedule, configured=configured))
    return runs


def run_benchmark(cfg: Mapping[str, Any] | DictConfig) -> Path:
    """Run every (method, budget) of `cfg` (configs/benchmark.yaml) not yet in the table; returns results_dir.

    Everything is checked before the first run (methods, budgets, schedule files, data, model, results_dir), so an
    invalid configuration writes nothing.
    """
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
    results_dir = check_results_dir(Path(str(cfg.get("results_dir") or "outputs/benchmark")))
    timing = TimingSpec(**dict(cfg.get("timing") or {})).check()
    batch_size = _int_setting(cfg, "batch_size", 8)
    rerun = bool(cfg.get("rerun", False))
    progress = bool(cfg.get("progress", True))
    seed = _int_setting(cfg, "seed", 0)
    spec = WorkerSpec.from_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(_int_setting(cfg, "threads", 1))
    cfg_id = config_id(cfg)

    task: Task = build_task(data["task"], **data["options"])
    samples: list[VQASample] = list(task.samples(data["split"], limit=data["limit"]))
    if not samples:
        raise BenchmarkError(f"task {data['task']!r} split {data['split']!r} gave no samples; check {data['name']}")
    max_new_tokens = int(cfg.get("max_new_tokens") or task.max_new_tokens)
    loaded = load_from_config(cfg["model"])
    n_layers, n_vision = loaded.num_layers, loaded.fixed_vision_tokens
    compile, compile_buckets, execution = execution_setting(cfg)
    settings = model_settings(cfg["model"], loaded, execution)
    setup = {"model": settings, "data": plain(data["options"]), "max_new_tokens": max_new_tokens,
             "timing_batch": timing.batch_size}
    group = {"model": loaded.name, "task": data["task"], "split": data["split"], "limit": data["limit"],
             "setup_id": short_hash(setup)}
    runs = [identify(r, group, setup, convention, seed)
            for r in plan_runs(methods, budgets, loaded, convention, bool(cfg.get("baseline", True)))]

    table = res.read_table(results_dir)
    written = False

    def store(row: dict[str, Any]) -> None:
        nonlocal table, written
        if not written:  # the first row: the run is valid and has produced something
            _write_config(results_dir, cfg, cfg_id)
            written = True
        table = res.upsert_rows(results_dir, [row])

    def run_on(run: PlannedRun, subset: Sequence[VQASample], time_prefill: bool = True) -> RunOutput:
        """Evaluate `subset` of the samples with the run's method (the timing batch is always the run's first)."""
        torch.manual_seed(seed)
        schedule, method = run.schedule, run.method
        return evaluate(
            loaded, subset, schedule=schedule if schedule.stages else None, scorer=method.get("scorer"),
            scorer_options=method.get("scorer_options") or {}, seed=seed, batch_size=batch_size,
            max_new_tokens=max_new_tokens, timing=timing, progress=progress,
            desc=f"{method['name']}@{run.key['budget']}", timing_samples=samples[:timing.batch_size],
            time_prefill=time_prefill, compile=compile, compile_buckets=compile_buckets,
        )

    def infeasible(run: PlannedRun, reason: str) -> None:
        """Store the run's `infeasible` row (valid, but out of the method's reach) with the reason."""
        store(make_row(key=run.key, method=run.method, loaded=loaded, batch_size=batch_size, cfg_id=cfg_id,
                       variant=run.variant, settings=describe(settings), schedule=run.schedule, output=None,
                       metrics=None, status=res.STATUS_INFEASIBLE, note=reason))
        log.warning("%s at budget %s is infeasible: %s", run.method["name"], run.key["budget"], reason)

    def finish(run: PlannedRun, output: RunOutput) -> None:
        """Score all samples' predictions and store the run's row."""
        method, schedule = run.method, run.schedule
        metrics = task.score(output.predictions, samples)
        note = ""
        expected = _expected_vision(schedule, n_layers, n_vision) if n_vision is not None else \
            mean_per_layer([_expected_vision(schedule, n_layers, v) for v in output.vision_counts])
        if output.vision_per_layer != expected:
            note = f"engine processed vision tokens {output.vision_per_layer}, schedule says {expected}"
            log.warning("%s: %s", method["name"], note)
        store(make_row(schedule=schedule, output=output, metrics=metrics, note=note, key=run.key, method=method,
                       loaded=loaded, batch_size=batch_size, cfg_id=cfg_id, variant=run.variant,
                       settings=describe(settings)))

    waiting: dict[str, list[int]] = {}  # run label -> workers whose parts are missing
    outer = tqdm(runs, desc=f"benchmark {data['name']}", unit="run", disable=not progress)
    for run in outer:
        method, key = run.method, run.key
        if not rerun and res.has_row(table, key):
            log.info("skip %s at %s: already in %s", method["name"], key["budget"], results_dir)
            continue
        outer.set_postfix_str(f"{method['name']}@{key['budget']}")
        if run.schedule is None:
            infeasible(run, run.reason)
            continue
        if spec.workers == 1:
            try:
                output = run_on(run, samples)
            except MethodInfeasible as err:  # valid, but out of this method's reach on this model (e.g. no CLS token)
                infeasible(run, str(err))
                continue
            finish(run, output)
            continue
        missing = split_run(run, spec, samples, batch_size, results_dir, rerun, run_on, finish, infeasible)
        if missing:
            waiting[f"{method['name']}@{key['budget']}"] = missing
    outer.close()
    if waiting:
        text = "; ".join(f"{label}: workers {ws}" for label, ws in waiting.items())
        if spec.merge_only:
            raise BenchmarkError(
                f"cannot merge yet, parts are missing ({text}) of workers={spec.workers}; run those workers "
                "(the same command with worker=<i>), then merge again"
            )
        log.info("%s done; the last worker to finish merges. Missing parts: %s", spec, text)
    if results_dir.is_dir():
        table = res.read_table(results_dir)
        res.write_summary(results_dir, table)
        if cfg.get("plots", True):
            res.plot_tradeoffs(table, results_dir / res.PLOTS_DIR)
    return results_dir


def split_run(run: PlannedRun, spec: WorkerSpec, samples: Sequence[VQASample], batch_size: int, results_dir: Path,
              rerun: bool, run_on: Any, finish: Any, infeasible: Any) -> list[int]:
    """One run of a split benchmark: this worker's part (unless written already, or merging only), then, under the
    run's lock, the merge and the row when every part is there. Returns the workers whose parts are missing.

    A worker whose evaluation finds the method infeasible on this model (MethodInfeasible) writes that as its part;
    any such part makes the run's row `infeasible` without waiting for the others."""
    key = run.key
    directory = partials.part_dir(results_dir, key, short_hash({k: res.key_value(v) for k, v in key.items()}))
    if not spec.merge_only:
        mine = spec.indices(len(samples), batch_size)
        done = spec.worker in read_parts(directory, spec.workers)
        if done and not rerun:
            log.info("%s at %s: part of %s already written, reused", run.method["name"], key["budget"], spec)
        else:
            subset = [samples[i] for i in mine]
            try:
                output = run_on(run, subset, time_prefill=spec.worker == 0) if subset else None
                payload = partials.part_payload([s.sample_id for s in subset], output, batch_size)
            except MethodInfeasible as err:
                payload = {"infeasible": str(err)}
            write_part(directory, spec.worker, spec.workers, payload)
    with locked(directory / "merge"):
        if not rerun and res.has_row(res.read_table(results_dir), key):
            return []  # another worker merged it meanwhile
        parts = read_parts(directory, spec.workers)
        reason = next((p["infeasible"] for p in parts.values() if p.get("infeasible")), None)
        if reason is not None:
            infeasible(run, reason)
            return []
        missing = missing_workers(parts, spec.workers)
        if missing:
            return missing
        try:
            output = partials.merge_outputs(parts, samples, spec.workers)
        except UserError as err:
            raise BenchmarkError(f"{run.method['name']} at {key['budget']} ({directory}): {err}") from None
        finish(run, output)
        log.info("%s at %s: merged the parts of %d workers", run.method["name"], key["budget"], spec.workers)
    return []


def _int_setting(cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BenchmarkError(f"{key}={value!r} must be an integer")
    return value


def _write_config(results_dir: Path, cfg: Mapping[str, Any], cfg_id: str) -> None:
    """config.yaml (latest run) and configs/<id>.yaml (every run) beside the table."""
    text = yaml.safe_dump(_recorded_config(cfg), sort_keys=False, default_flow_style=None)
    (results_dir / "configs").mkdir(parents=True, exist_ok=True)
    (results_dir / "configs" / f"{cfg_id}.yaml").write_text(text)
    (results_dir / "config.yaml").write_text(f"# config_id: {cfg_id}\n{text}")


@hydra.main(config_path="../configs", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run_benchmark over the composed config, then point at the outputs."""
    out = run_main(run_benchmark, cfg)
    print(f"results: {out / res.RESULTS_NAME}\nsummary: {out / res.SUMMARY_NAME}\nplots:   {out / res.PLOTS_DIR}")


if __name__ == "__main__":
    main()
