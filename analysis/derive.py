"""From inflection layers to a pruning schedule: dense regions, stage placement, keep allocation or a search.

`python -m analysis.derive input=<collect run dir> budget=64 n_stages=3` opens the records, fits the
`ShiftDetector`, derives a `pruning.schedule.Schedule`, and writes `schedule.yaml`, `inflection.json`
and the figures into the Hydra run directory (or `output=`).

Two rules (`rule=`):

* `search` (default): the schedule that minimises the fidelity objective (`analysis.objective`: KL of the answer
  distribution plus greedy-answer disagreement against the unpruned model, on calibration prompts) at each budget
  of `budgets`, found by `analysis.search.ScheduleSearch` over stage counts 1..n_stages, stage layers drawn from the
  analysis (the dense regions' bounds and neighbours, the paper rule's layers; every layer on models of at most
  `search.every_layer_up_to` layers), keep counts (any non-increasing allocation meeting the budget within one
  token) and the adaptinfer scorer's `text_weight_blend`. It needs the model (`model=<preset>`, default: the
  records' own when it is loadable) and calibration prompts (`calibration=<data preset name>`, default: the
  records' own data; the first `n_calibration` prompts). Writes `schedule.yaml` (the first budget), `schedule_<budget>.yaml` per budget, `front.json`
  (per budget: schedule file, scorer options, objective), `front.png`, and `candidates.jsonl` (every scored
  candidate, appended as scored: a rerun into the same output resumes). See `search_schedules`. `workers=N
  worker=i output=DIR` makes this process one of N that run the search together, at the same time, with the same
  result (`analysis.search_workers`); worker 0 writes the results, and `workers=N` without `worker` completes the
  search from the stored scores and writes them.
* `paper`: the rule below, unchanged (stages around the dense regions, geometric keep counts).

Dense regions (`find_dense_regions`), on the smoothed, normalised density `d[L]`:

1. Peaks: `scipy.signal.find_peaks` on `d` padded with one zero at each end (so that layer 0 or L-1
   can be a peak), with `prominence >= prominence * max(d)` and `distance` layers between peaks.
2. Bounds: from each peak walk outward while the density stays `>= rel_height * d[peak]`
   (`rel_height=0.5`: the half-maximum width), never past the valley (the first lowest layer) between
   this peak and the neighbouring peak; the valley layer itself belongs to neither region.
3. A region is `[start, end]` (inclusive) with its peak and its mass `sum(d[start:end + 1])`.

Stage placement (`place_stages`), the paper's rule "prune just before or after the dense regions of
attention shift, not inside them". Allowed layers are `min_layer .. num_layers - 2` (a stage at the last
layer would prune nothing that is used):

1. Candidates per region: `end + 1` ("after"), `start - 1` ("before"), or both, the before-candidate
   first ("both"). Regions are visited by decreasing mass (ties: earlier peak first).
2. Candidates outside the allowed layers, inside any region, or already chosen are skipped; the first
   `n_stages` remaining are chosen.
3. If fewer than `n_stages` were chosen, fill one at a time: with sentinels `min_layer - 1` and
   `num_layers - 1` around the chosen layers, take the widest gap (ties: the earliest) that still holds
   a layer outside every region, and add that layer closest to the gap's midpoint (ties: the lower).
4. The layers are returned in increasing order.

Keep counts come from `pruning.schedule.allocate_keep` (one geometric ratio for all stages, found by
bisection to meet the budget within one token in the chosen convention).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from scipy.signal import find_peaks

from analysis.records import Records, RecordStore
from analysis.search import (
    BLENDS, Candidate, CandidateStore, ScheduleSearch, SearchError, SearchResult, Team, budget_of,
    candidate_layers_from_regions,
)
from analysis.shift import ShiftDetector, ShiftResult
from pruning.schedule import (CONVENTIONS, FRONT_FILE, Schedule, ScheduleError, allocate_fractions,  # noqa: F401
                              allocate_keep, read_front)
from vlm.cli import hydra_run_dir, run_main
from vlm.errors import UserError
from vlm.parallel import WorkerSpec

log = logging.getLogger(__name__)

PLACEMENTS = ("after", "before", "both")
PLACEMENT_RULE = (
    "dense regions: find_peaks on the smoothed inflection density (zero-padded ends) with prominence >= "
    "{prominence} * max, bounds where the density falls below {rel_height} * peak, not past the valley to the "
    "next peak; stages: {placement} the regions (end + 1 / start - 1) by decreasing region mass, never inside "
    "a region, within {min_layer}..num_layers-2; missing stages fill the widest gap at its midpoint; keep counts: "
    "pruning.schedule.allocate_keep (geometric) to budget {budget} ({convention} convention)"
)
DERIVE_OPTIONS = ("convention", "placement", "prominence", "rel_height", "distance", "min_layer", "positions")
RULES = ("search", "paper")
SCHEDULE_FILE = "schedule.yaml"
SUMMARY_FILE = "inflection.json"
FRONT_PLOT = "front.png"
CANDIDATES_FILE = "candidates.jsonl"
SEARCH_SCORER = "adaptinfer"
# search settings and their defaults (configs/derive.yaml `search:`)
SEARCH_DEFAULTS: dict[str, Any] = {
    "blends": list(BLENDS), "step": 0.2, "min_step": 0.05, "max_rounds": 30, "max_candidates": 24,
    "mismatch_weight": 1.0, "batch_size": 32, "top_n": 10, "every_layer_up_to": 12, "max_cached_layers": 4,
    "progress": True,
}


class DeriveError(UserError, ValueError):
    """Schedule derivation cannot proceed as asked; the message names the parameter or input."""


@dataclass(frozen=True)
class Region:
    """A dense region of attention shift: layers start..end (inclusive) around a density peak."""

    start: int
    peak: int
    end: int
    mass: float  # sum of the normalised density over start..end
    height: float  # density at the peak

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer <= self.end


def _check_fraction(name: str, value: Any, low_open: bool = True) -> float:
    """A float in (0, 1] (or [0, 1] when low_open is False), else DeriveError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise DeriveError(f"{name} must be a number in (0, 1], got {value!r}")
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise DeriveError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, low: int) -> int:
    """An int >= low, else DeriveError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DeriveError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def find_dense_regions(
    density: Any, prominence: float = 0.1, rel_height: float = 0.5, distance: int = 1
) -> list[Region]:
    """Dense regions of the inflection density by the module's documented rule, ordered by layer. density [L]"""
    d = np.asarray(density, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise DeriveError(f"density must be a non-empty 1-D array [L], got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise DeriveError("density must be finite and non-negative")
    prominence = _check_fraction("prominence", prominence, low_open=False)
    rel_height = _check_fraction("rel_height", rel_height)
    distance = _check_int("distance", distance, 1)
    top = d.max()
    if top <= 0:
        return []
    padded = np.pad(d, 1)
    peaks, _ = find_peaks(padded, prominence=prominence * top, distance=distance)
    peaks = [int(p) - 1 for p in peaks]
    valleys = [a + int(np.argmin(d[a : b + 1])) for a, b in zip(peaks[:-1], peaks[1:])]
    regions = []
    for i, p in enumerate(peaks):
        lo_limit = valleys[i - 1] + 1 if i > 0 else 0
        hi_limit = valleys[i] - 1 if i < len(valleys) else d.size - 1
        threshold = rel_height * d[p]
        start = p
        while start - 1 >= lo_limit and d[start - 1] >= threshold:
            start -= 1
        end = p
        while end + 1 <= hi_limit and d[end + 1] >= threshold:
            end += 1
        regions.append(
            Region(start=start, peak=p, end=end, mass=float(d[start : end + 1].sum()), height=float(d[p]))
        )
    return regions


def place_stages(
    regions: Sequence[Region],
    n_stages: int,
    num_layers: int,
    placement: str = "after",
    min_layer: int = 1,
) -> list[int]:
    """Stage layers just before/after the dense regions, never inside, by the module's documented rule."""
    n_stages = _check_int("n_stages", n_stages, 1)
    num_layers = _check_int("num_layers", num_layers, 2)
    min_layer = _check_int("min_layer", min_layer, 0)
    if placement not in PLACEMENTS:
        raise DeriveError(f"placement={placement!r} is not one of {list(PLACEMENTS)}")
    lo, hi = min_layer, num_layers - 2
    if lo > hi:
        raise DeriveError(f"min_layer={min_layer} leaves no layer for a stage in a {num_layers}-layer model (max {hi})")

    def inside(layer: int) -> bool:
        return any(layer in r for r in regions)

    chosen: list[int] = []
    for region in sorted(regions, key=lambda r: (-r.mass, r.peak)):
        candidates = {"after": [region.end + 1], "before": [region.start - 1]}.get(
            placement, [region.start - 1, region.end + 1]
        )
        for c in candidates:
            if len(chosen) < n_stages and lo <= c <= hi and not inside(c) and c not in chosen:
                chosen.append(c)

    while len(chosen) < n_stages:
        bounds = [lo - 1] + sorted(chosen) + [hi + 1]
        best: Optional[tuple[int, int]] = None  # (width, layer)
        for a, b in zip(bounds[:-1], bounds[1:]):
            free = [layer for layer in range(a + 1, b) if not inside(layer)]
            if not free:
                continue
            mid = (a + b) / 2
            layer = min(free, key=lambda x: (abs(x - mid), x))
            if best is None or b - a > best[0]:
                best = (b - a, layer)
        if best is None:
            raise DeriveError(
                f"n_stages={n_stages} does not fit: only {len(chosen)} layers in {lo}..{hi} lie outside the dense "
                f"regions {[(r.start, r.end) for r in regions]}; ask for fewer stages or lower min_layer"
            )
        chosen.append(best[1])
    return sorted(chosen)


def check_budget(budget: Any, num_vision: Optional[int]) -> float:
    """`budget` as a float in [0, num_vision], or in (0, 1] (a fraction of each sample's vision tokens) when
    num_vision is None (records whose V differs per sample); DeriveError with the right range otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not np.isfinite(budget):
        raise DeriveError(f"budget={budget!r} is not a number; give the mean vision tokens per decoder layer, e.g. budget=128")
    if num_vision is None:
        if not 0 < budget <= 1:
            raise DeriveError(
                f"budget={budget:g} is out of range: these records hold a different number of vision tokens per "
                "sample (the count follows the image size), so the budget is a fraction of each sample's vision "
                "tokens (mean over decoder layers) in (0, 1], where 1 means no pruning; e.g. budget=0.25"
            )
        return float(budget)
    if not 0 <= budget <= num_vision:
        raise DeriveError(
            f"budget={budget:g} is out of range: the model has {num_vision} vision tokens per image, so a budget "
            f"(mean vision tokens per decoder layer) lies in 0..{num_vision}, where {num_vision} means no pruning; "
            f"ask for less, e.g. budget={num_vision // 3}"
        )
    return float(budget)


def derive_schedule(
    result: ShiftResult,
    n_stages: int,
    budget: float,
    num_layers: Optional[int] = None,
    num_vision: Optional[int] = None,
    convention: str = "processed",
    placement: str = "after",
    prominence: float = 0.1,
    rel_height: float = 0.5,
    distance: int = 1,
    min_layer: int = 1,
    positions: str = "keep",
    name: Optional[str] = None,
    provenance: Optional[Mapping[str, Any]] = None,
) -> Schedule:
    """A Schedule with stages placed around the dense regions of `result` and keep counts meeting `budget`.

    When the records' vision-token count differs per sample (`result.num_vision` None), `budget` is a fraction of
    each sample's vision tokens in (0, 1] and the stages keep fractions (`pruning.schedule.allocate_fractions`)."""
    num_layers, num_vision = _check_analysis(result, num_layers, num_vision, convention)
    budget = check_budget(budget, num_vision)
    regions = find_dense_regions(result.density, prominence=prominence, rel_height=rel_height, distance=distance)
    layers = place_stages(regions, n_stages, num_layers, placement=placement, min_layer=min_layer)
    try:
        if num_vision is None:  # V follows the image: every stage keeps a fraction of each image's own tokens
            schedule = allocate_fractions(layers, num_layers, float(budget), convention=convention,
                                          positions=positions, name=name)
        else:
            schedule = allocate_keep(layers, num_layers, num_vision, float(budget), convention=convention,
                                     positions=positions, name=name)
    except ScheduleError as exc:
        raise DeriveError(
            f"{exc}. The stage layers {layers} come from the dense regions "
            f"{[(r.start, r.end) for r in regions]} with placement={placement!r}; ask for a larger budget, "
            "more stages, or placement='before'/'both'"
        ) from exc
    rule = PLACEMENT_RULE.format(prominence=prominence, rel_height=rel_height, placement=placement,
                                 min_layer=min_layer, budget=budget, convention=convention)
    schedule.provenance = _analysis_provenance(
        result, regions, provenance, stage_layers=layers,
        derivation={"placement": placement, "prominence": prominence, "rel_height": rel_height, "distance": distance,
                    "min_layer": min_layer, "budget": float(budget), "convention": convention,
                    **({"budget_unit": "fraction of each sample's vision tokens"} if num_vision is None else {})},
        allocation=dict(schedule.provenance), rule=rule,
    )
    return schedule.validate(num_layers=num_layers, initial=num_vision)


def _analysis_provenance(result: ShiftResult, regions: Sequence[Region], provenance: Optional[Mapping[str, Any]],
                         **fields: Any) -> dict[str, Any]:
    """Provenance of a derived schedule: the given fields, the analysis it came from, then `fields`."""
    return _jsonable({
        **dict(provenance or {}),
        "sample_count": result.num_samples,
        "tokens_per_sample": result.tokens_per_sample,
        "detector": dict(result.params),
        "histogram": [int(x) for x in result.histogram],
        "density": [round(float(x), 6) for x in result.density],
        "dense_regions": [asdict(r) for r in regions],
        **fields,
    })


def _check_analysis(result: ShiftResult, num_layers: Optional[int], num_vision: Optional[int],
                    convention: str) -> tuple[int, Optional[int]]:
    """(num_layers, num_vision) checked against the shift result (num_vision None: it differs per sample);
    DeriveError naming the disagreement."""
    if num_layers is None:
        num_layers = result.num_layers
    if num_layers != result.num_layers:
        raise DeriveError(f"num_layers={num_layers} but the shift result covers {result.num_layers} layers")
    if num_vision is None:
        num_vision = result.num_vision
    if result.num_vision is None:
        if num_vision is not None:
            raise DeriveError(f"num_vision={num_vision} but the shift result was fitted on records whose vision-token "
                              f"count differs per sample ({result.summary()['vision_counts']}); leave num_vision unset")
        num_vision = None
    elif _check_int("num_vision", num_vision, 1) != result.num_vision:
        raise DeriveError(f"num_vision={num_vision} but the shift result was fitted on {result.num_vision} vision tokens")
    if convention not in CONVENTIONS:
        raise DeriveError(f"convention={convention!r} is not one of {list(CONVENTIONS)}")
    if int(np.asarray(result.histogram).sum()) == 0:
        raise DeriveError(
            "the detector found no shift layers (empty histogram); lower its penalty or use n_bkps"
        )
    return num_layers, num_vision


@dataclass
class SearchedSchedule:
    """One budget's searched schedule, its scorer options and the search that found it."""

    budget: float
    schedule: Schedule
    scorer_options: dict[str, float]
    search: SearchResult
    seconds: float = 0.0  # wall time of this budget's search (the first budget's includes the cache fills)


def search_schedules(
    result: ShiftResult,
    budgets: Sequence[float],
    objective: Callable[[Candidate, Schedule], Mapping[str, Any]],
    n_stages: int = 3,
    num_layers: Optional[int] = None,
    num_vision: Optional[int] = None,
    convention: str = "processed",
    placement: str = "after",
    prominence: float = 0.1,
    rel_height: float = 0.5,
    distance: int = 1,
    min_layer: int = 1,
    positions: str = "keep",
    name: Optional[str] = None,
    provenance: Optional[Mapping[str, Any]] = None,
    store: Optional[CandidateStore] = None,
    settings: Optional[Mapping[str, Any]] = None,
    objective_info: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
    team: Optional[Team] = None,
) -> list[SearchedSchedule]:
    """Per budget, the schedule minimising `objective(candidate, schedule)["objective"]` (analysis.search).

    Candidate stage layers come from the dense regions of `result` (`candidate_layers_from_regions`); the paper
    rule's layers for each stage count seed the search; each budget's search also starts from the previous budget's
    best. `settings` overrides SEARCH_DEFAULTS; `store` keeps the scores (and makes a rerun resume); `team`: this
    process is one of several sharing `store` (analysis.search_workers), with the same result as one alone.
    """
    num_layers, num_vision = _check_analysis(result, num_layers, num_vision, convention)
    n_stages = _check_int("n_stages", n_stages, 1)
    opts = {**SEARCH_DEFAULTS, **dict(settings or {})}
    unknown = sorted(set(opts) - set(SEARCH_DEFAULTS))
    if unknown:
        raise DeriveError(f"search settings {unknown} are unknown; allowed: {sorted(SEARCH_DEFAULTS)}")
    if not budgets:
        raise DeriveError("budgets is empty; give at least one budget to search, e.g. budgets=[192,128]")
    budgets = [check_budget(b, num_vision) for b in budgets]
    regions = find_dense_regions(result.density, prominence=prominence, rel_height=rel_height, distance=distance)
    seed_layers: dict[int, list[int]] = {}
    for n in range(1, n_stages + 1):
        try:
            seed_layers[n] = place_stages(regions, n, num_layers, placement=placement, min_layer=min_layer)
        except DeriveError:
            continue
    rule_layers = sorted({l for layers in seed_layers.values() for l in layers})
    cand_layers = candidate_layers_from_regions(regions, num_layers, rule_layers, min_layer=min_layer,
                                                every_layer_up_to=int(opts["every_layer_up_to"]))
    try:
        search = ScheduleSearch(num_layers, num_vision, cand_layers, n_stages=n_stages, blends=opts["blends"],
                                convention=convention, step=float(opts["step"]), min_step=float(opts["min_step"]),
                                max_rounds=int(opts["max_rounds"]), max_candidates=int(opts["max_candidates"]))
    except SearchError as exc:
        raise DeriveError(str(exc)) from exc
    store = store if store is not None else CandidateStore()

    def score(cand: Candidate) -> Mapping[str, Any]:
        return objective(cand, _candidate_schedule(cand, num_layers, num_vision, positions, name))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=search.max_scored() * len(budgets), desc="schedule search", unit="candidate")
    out: list[SearchedSchedule] = []
    previous: list[Candidate] = []
    try:
        for budget in budgets:
            t0 = time.perf_counter()
            try:
                found = search.run(float(budget), score, seed_layers=seed_layers, extra_seeds=previous, store=store,
                                   progress=bar, team=team)
            except SearchError as exc:
                raise DeriveError(f"budget {budget}: {exc}") from exc
            previous = [found.best]
            schedule = _candidate_schedule(found.best, num_layers, num_vision, positions,
                                           f"{name or 'searched'}@{budget:g}")
            looked = set(found.looked_at)  # not the rest of the store: earlier runs', other workers' in vain
            top = [{"layers": r["layers"], "keeps": r["keeps"], "blend": r["blend"], **r["score"]}
                   for r in store.for_budget(float(budget)) if r["key"] in looked][: int(opts["top_n"])]
            schedule.provenance = _analysis_provenance(
                result, regions, provenance, stage_layers=list(found.best.layers),
                derivation={"rule": "search", "budget": float(budget), "convention": convention, "n_stages": n_stages,
                            "min_layer": min_layer, "placement": placement, "prominence": prominence,
                            "rel_height": rel_height, "distance": distance, "positions": positions},
                search={
                    **dict(objective_info or {}),
                    "value": dict(found.score),
                    "scorer": SEARCH_SCORER,
                    "scorer_options": found.best.scorer_options(),
                    "candidate_layers": cand_layers,
                    "seed_layers": {str(k): v for k, v in seed_layers.items()},
                    "settings": {k: v for k, v in opts.items() if k != "progress"},
                    "scored_now": found.scored,
                    "visited": found.visited,
                    "rounds": found.rounds,
                    "history": found.history,
                    "top_candidates": top,
                },
            )
            out.append(SearchedSchedule(float(budget), schedule.validate(num_layers=num_layers, initial=num_vision),
                                        found.best.scorer_options(), found, time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
    return out


def _candidate_schedule(cand: Candidate, num_layers: int, num_vision: int, positions: str,
                        name: Optional[str]) -> Schedule:
    schedule = cand.schedule(num_layers, num_vision, name=name)
    schedule.positions = positions
    return schedule.validate()


class ScheduleDeriver:
    """Estimator form of `derive_schedule`: parameters up front, `fit(result)` sets regions_, layers_, schedule_."""

    def __init__(
        self,
        n_stages: int = 3,
        budget: float = 64.0,
        convention: str = "processed",
        placement: str = "after",
        prominence: float = 0.1,
        rel_height: float = 0.5,
        distance: int = 1,
        min_layer: int = 1,
        positions: str = "keep",
        name: Optional[str] = None,
    ) -> None:
        """Store and check the derivation parameters (see the module docstring for the rules)."""
        self.n_stages = n_stages
        self.budget = budget
        self.convention = convention
        self.placement = placement
        self.prominence = prominence
        self.rel_height = rel_height
        self.distance = distance
        self.min_layer = min_layer
        self.positions = positions
        self.name = name
        self.sanity_check()

    def sanity_check(self) -> None:
        """Raise DeriveError naming the first invalid parameter."""
        _check_int("n_stages", self.n_stages, 1)
        _check_int("distance", self.distance, 1)
        _check_int("min_layer", self.min_layer, 0)
        _check_fraction("prominence", self.prominence, low_open=False)
        _check_fraction("rel_height", self.rel_height)
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float, np.floating)) or self.budget < 0:
            raise DeriveError(f"budget must be a number >= 0 (mean vision tokens per layer), got {self.budget!r}")
        if self.convention not in CONVENTIONS:
            raise DeriveError(f"convention={self.convention!r} is not one of {list(CONVENTIONS)}")
        if self.placement not in PLACEMENTS:
            raise DeriveError(f"placement={self.placement!r} is not one of {list(PLACEMENTS)}")

    def fit(self, result: ShiftResult, provenance: Optional[Mapping[str, Any]] = None) -> "ScheduleDeriver":
        """Derive the schedule from a ShiftResult; sets regions_, layers_ and schedule_."""
        self.sanity_check()
        self.schedule_ = derive_schedule(
            result, self.n_stages, self.budget, convention=self.convention, placement=self.placement,
            prominence=self.prominence, rel_height=self.rel_height, distance=self.distance,
            min_layer=self.min_layer, positions=self.positions, name=self.name, provenance=provenance,
        )
        self.regions_ = [Region(**r) for r in self.schedule_.provenance["dense_regions"]]
        self.layers_ = list(self.schedule_.layers)
        return self


def _jsonable(x: Any) -> Any:
    """Plain Python types (numpy scalars and arrays converted) for YAML/JSON writing."""
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ---- the entry point ---------------------------------------------------------------------------------------------
def _plain_cfg(cfg: Any) -> dict[str, Any]:
    """A plain dict from a DictConfig or mapping; a missing required value raises DeriveError naming it."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
        except MissingMandatoryValue as exc:
            raise DeriveError(f"{exc.full_key} is required (e.g. input=<collect run directory>)") from exc
    return dict(cfg)


def _output_dir(cfg: Mapping[str, Any]) -> Path:
    """`output` if set, else (on the command line) outputs/derive/<date>_<time>; DeriveError outside Hydra."""
    if cfg.get("output"):
        return Path(cfg["output"])
    if HydraConfig.initialized():
        return hydra_run_dir() or Path("outputs") / "derive" / time.strftime("%Y-%m-%d_%H-%M-%S")
    raise DeriveError("output is not set and no Hydra run is active; pass output=<directory>")


def write_plots(
    records: Records, result: ShiftResult, schedule: Schedule, regions: Sequence[Region], out_dir: Path,
    grid_layers: Optional[Sequence[int]] = None,
) -> dict[str, Path]:
    """The derive figures (heatmap, patch grids when V is square, histogram, trajectories) as PNGs."""
    from analysis import plots

    mean = records.mean_t2v().numpy()  # [L, V]
    layers = schedule.layers
    paths = {
        "t2v_heatmap": plots.t2v_heatmap(mean, out_dir / "t2v_heatmap.png"),
        "inflection_histogram": plots.inflection_histogram(
            result.histogram, result.density, out_dir / "inflection_histogram.png",
            stage_layers=layers, regions=[(r.start, r.end) for r in regions],
        ),
        "trajectories": plots.mean_trajectories(
            result.mean_trajectories, out_dir / "trajectories.png", stage_layers=layers,
            ylabel=f"{result.params.get('trajectory', 'cumulative')} attention"
            + (" (normalised)" if result.params.get("normalize") else ""),
        ),
    }
    if records.ragged:
        log.info("the samples hold %s vision tokens (grids of different sizes); skipping t2v_grids.png",
                 records.vision_range())
        return paths
    try:
        plots.grid_side(records.num_vision)
    except plots.PlotError:
        log.info("%d vision tokens are not a square grid; skipping t2v_grids.png", records.num_vision)
    else:
        if grid_layers is None:
            grid_layers = sorted({0, *layers, records.num_layers - 1})
        paths["t2v_grids"] = plots.t2v_grids(mean, grid_layers, out_dir / "t2v_grids.png")
    return paths


def run_derive(cfg: Any) -> Path:
    """Derive schedules from a collect run as `cfg` says (configs/derive.yaml); returns the output directory."""
    cfg = _plain_cfg(cfg)
    for key in ("input", "n_stages", "budget"):
        if cfg.get(key) is None:
            raise DeriveError(f"{key} is required (input: the run directory written by `python -m analysis.collect`)")
    if isinstance(cfg["budget"], bool) or not isinstance(cfg["budget"], (int, float)):
        check_budget(cfg["budget"], 1)  # raises: not a number
    if isinstance(cfg["n_stages"], bool) or not isinstance(cfg["n_stages"], int) or cfg["n_stages"] < 1:
        raise DeriveError(f"n_stages={cfg['n_stages']!r} must be an integer >= 1 (the number of pruning stages)")
    rule = cfg.get("rule") or "search"
    if rule not in RULES:
        raise DeriveError(f"rule={rule!r} is not one of {list(RULES)} (search: minimise the fidelity objective; "
                          "paper: the AdaptInfer placement rule with geometric keep counts)")
    spec = _worker_spec(cfg, rule)
    out_dir = _output_dir(cfg)  # before the long fit, so a missing output fails fast
    store = RecordStore.open(cfg["input"])
    records = store.load()
    if records.ragged and rule != "paper":
        raise DeriveError(
            f"{cfg['input']} holds a different number of vision tokens per sample ({records.vision_range()}); the "
            "schedule search does not run on such records yet: use rule=paper with budget= a fraction of each "
            "sample's vision tokens in (0, 1], e.g. budget=0.25"
        )
    detector = ShiftDetector(**(cfg.get("detector") or {}))
    result = detector.fit(records).result_
    manifest = records.manifest
    model = manifest.get("model")
    model_name = model.get("name") if isinstance(model, Mapping) else str(model)
    default_name = f"searched_{model_name}" if rule == "search" else f"derived_{model_name}_{cfg['budget']}"
    name = (cfg.get("name") or default_name).replace("/", "_")
    options = {k: cfg[k] for k in DERIVE_OPTIONS if cfg.get(k) is not None}  # absent: derive_schedule's defaults
    provenance = {
        "model": model,
        "calibration_data": manifest.get("data"),
        "reducer": manifest.get("reducer"),
        "records": str(Path(cfg["input"]).resolve()),
        "collect_settings": manifest.get("settings"),
        "versions": manifest.get("versions"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule_path = out_dir / SCHEDULE_FILE
    if rule == "paper":
        schedule = derive_schedule(result, n_stages=cfg["n_stages"], budget=cfg["budget"], num_layers=store.num_layers,
                                   num_vision=result.num_vision, name=name, provenance=provenance, **options)
        written = [schedule_path]
    else:
        from analysis.derive_search import run_search  # loads the model: only for rule=search

        searched = run_search(cfg, result, store.num_layers, store.num_vision, manifest, out_dir, name, provenance,
                              options)
        if not writes_results(spec):
            return out_dir
        schedule = searched[0].schedule
        written = [schedule_path] + [out_dir / budget_file(s.budget) for s in searched] + [out_dir / FRONT_FILE]
    schedule.to_yaml(schedule_path)
    regions = [Region(**r) for r in schedule.provenance["dense_regions"]]
    summary = {**result.summary(), "sample_ids": result.sample_ids, "dense_regions": schedule.provenance["dense_regions"],
               "stage_layers": schedule.layers, "keep": _keeps(schedule)}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(_jsonable(summary), indent=1))
    written.append(out_dir / SUMMARY_FILE)
    plot_cfg = cfg.get("plots") or {}
    if plot_cfg.get("enabled", True):
        written += list(write_plots(records, result, schedule, regions, out_dir, plot_cfg.get("grid_layers")).values())
    budgets = {c: round(schedule.budget(convention=c), 2) if schedule.vision_tokens is not None
               else f"{schedule.budget_fraction(convention=c):.1%} of each image's vision tokens" for c in CONVENTIONS}
    print(f"schedule: {schedule_path}  layers {schedule.layers} keep {_keeps(schedule)} budgets {budgets}")
    for path in written[1:]:
        print(f"  {path}")
    return out_dir


def _keeps(schedule: Schedule) -> list:
    """The stages' keep counts, or their fractions for a schedule made for images of any size."""
    return schedule.keep_counts() if schedule.vision_tokens is not None else [s.keep for s in schedule.stages]


def _worker_spec(cfg: Mapping[str, Any], rule: str) -> WorkerSpec:
    """`workers`/`worker` of the config, checked: a split search needs rule=search, a shared `output`, a positive
    `worker_timeout` and workers that run at the same time (not one after another in Hydra's basic launcher)."""
    spec = WorkerSpec.from_config(cfg)
    if spec.workers == 1:
        return spec
    if rule != "search":
        raise DeriveError(f"workers={spec.workers} splits the schedule search; rule={rule} takes seconds in one "
                          "process: drop workers/worker")
    if not cfg.get("output"):
        raise DeriveError(f"workers={spec.workers} needs output=DIR: the directory every worker shares (its "
                          "candidates.jsonl holds the scores)")
    timeout = cfg.get("worker_timeout", 120)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise DeriveError(f"worker_timeout={timeout!r} must be a number of seconds > 0 (how long a worker waits "
                          "for a silent peer before scoring its candidates itself)")
    if spec.worker is not None and HydraConfig.initialized():
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hydra_cfg.launcher.get("_target_", "")):
            raise DeriveError(
                f"workers={spec.workers} worker=... in a Hydra multirun with the basic launcher runs the workers one "
                "after another, but the search's workers score each round together: add +launcher=local (or "
                "+launcher=slurm) to run them at the same time, or start one process per worker"
            )
    return spec


def writes_results(spec: WorkerSpec) -> bool:
    """Whether this process writes the derive results: one worker alone, worker 0 of a split search, or the
    `workers=N` run without `worker` that completes the search from the stored scores."""
    return spec.worker in (0, None)


def budget_file(budget: float) -> str:
    """The searched schedule's file name at `budget`, e.g. schedule_192.yaml."""
    return f"schedule_{budget:g}.yaml"


@hydra.main(config_path="../configs", config_name="derive", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run_derive over the composed config."""
    run_main(run_derive, cfg)


if __name__ == "__main__":
    main()
