"""From inflection layers to a pruning schedule: dense regions, stage placement, keep allocation.

`python -m analysis.derive input=<collect run dir> budget=64 n_stages=3` opens the records, fits the
`ShiftDetector`, derives a `pruning.schedule.Schedule`, and writes `schedule.yaml`, `inflection.json`
and the figures into the Hydra run directory (or `output=`).

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
from typing import Any, Mapping, Optional, Sequence

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from scipy.signal import find_peaks

from analysis.records import Records, RecordStore
from analysis.shift import ShiftDetector, ShiftResult
from pruning.schedule import CONVENTIONS, Schedule, ScheduleError, allocate_keep
from vlm.cli import hydra_run_dir, run_main
from vlm.errors import UserError

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
SCHEDULE_FILE = "schedule.yaml"
SUMMARY_FILE = "inflection.json"


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


def check_budget(budget: Any, num_vision: int) -> float:
    """`budget` as a float in [0, num_vision]; DeriveError with the right range otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not np.isfinite(budget):
        raise DeriveError(f"budget={budget!r} is not a number; give the mean vision tokens per decoder layer, e.g. budget=128")
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
    """A Schedule with stages placed around the dense regions of `result` and keep counts meeting `budget`."""
    if num_layers is None:
        num_layers = result.num_layers
    if num_layers != result.num_layers:
        raise DeriveError(f"num_layers={num_layers} but the shift result covers {result.num_layers} layers")
    if num_vision is None:
        num_vision = result.num_vision
    num_vision = _check_int("num_vision", num_vision, 1)
    if num_vision != result.num_vision:
        raise DeriveError(f"num_vision={num_vision} but the shift result was fitted on {result.num_vision} vision tokens")
    if convention not in CONVENTIONS:
        raise DeriveError(f"convention={convention!r} is not one of {list(CONVENTIONS)}")
    budget = check_budget(budget, num_vision)
    if int(np.asarray(result.histogram).sum()) == 0:
        raise DeriveError(
            "the detector found no shift layers (empty histogram); lower its penalty or use n_bkps"
        )
    regions = find_dense_regions(result.density, prominence=prominence, rel_height=rel_height, distance=distance)
    layers = place_stages(regions, n_stages, num_layers, placement=placement, min_layer=min_layer)
    try:
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
    schedule.provenance = _jsonable({
        **dict(provenance or {}),
        "sample_count": result.num_samples,
        "tokens_per_sample": result.tokens_per_sample,
        "detector": dict(result.params),
        "histogram": [int(x) for x in result.histogram],
        "density": [round(float(x), 6) for x in result.density],
        "dense_regions": [asdict(r) for r in regions],
        "stage_layers": layers,
        "derivation": {
            "placement": placement,
            "prominence": prominence,
            "rel_height": rel_height,
            "distance": distance,
            "min_layer": min_layer,
            "budget": float(budget),
            "convention": convention,
        },
        "allocation": dict(schedule.provenance),
        "rule": rule,
    })
    return schedule.validate(num_layers=num_layers, initial=num_vision)


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
    """Derive a schedule from a collect run as `cfg` says (configs/derive.yaml); returns the output directory."""
    cfg = _plain_cfg(cfg)
    for key in ("input", "n_stages", "budget"):
        if cfg.get(key) is None:
            raise DeriveError(f"{key} is required (input: the run directory written by `python -m analysis.collect`)")
    if isinstance(cfg["budget"], bool) or not isinstance(cfg["budget"], (int, float)):
        check_budget(cfg["budget"], 1)  # raises: not a number
    if isinstance(cfg["n_stages"], bool) or not isinstance(cfg["n_stages"], int) or cfg["n_stages"] < 1:
        raise DeriveError(f"n_stages={cfg['n_stages']!r} must be an integer >= 1 (the number of pruning stages)")
    out_dir = _output_dir(cfg)  # before the long fit, so a missing output fails fast
    store = RecordStore.open(cfg["input"])
    records = store.load()
    detector = ShiftDetector(**(cfg.get("detector") or {}))
    result = detector.fit(records).result_
    manifest = records.manifest
    model = manifest.get("model")
    model_name = model.get("name") if isinstance(model, Mapping) else str(model)
    name = cfg.get("name") or f"derived_{model_name}_{cfg['budget']}".replace("/", "_")
    options = {k: cfg[k] for k in DERIVE_OPTIONS if cfg.get(k) is not None}  # absent: derive_schedule's defaults
    schedule = derive_schedule(
        result,
        n_stages=cfg["n_stages"],
        budget=cfg["budget"],
        num_layers=store.num_layers,
        num_vision=store.num_vision,
        name=name,
        provenance={
            "model": model,
            "calibration_data": manifest.get("data"),
            "reducer": manifest.get("reducer"),
            "records": str(Path(cfg["input"]).resolve()),
            "collect_settings": manifest.get("settings"),
            "versions": manifest.get("versions"),
        },
        **options,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule_path = out_dir / SCHEDULE_FILE
    schedule.to_yaml(schedule_path)
    regions = [Region(**r) for r in schedule.provenance["dense_regions"]]
    summary = {**result.summary(), "sample_ids": result.sample_ids, "dense_regions": schedule.provenance["dense_regions"],
               "stage_layers": schedule.layers, "keep": schedule.keep_counts()}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(_jsonable(summary), indent=1))
    written = [schedule_path, out_dir / SUMMARY_FILE]
    plot_cfg = cfg.get("plots") or {}
    if plot_cfg.get("enabled", True):
        written += list(write_plots(records, result, schedule, regions, out_dir, plot_cfg.get("grid_layers")).values())
    budgets = {c: round(schedule.budget(convention=c), 2) for c in CONVENTIONS}
    print(f"schedule: {schedule_path}  layers {schedule.layers} keep {schedule.keep_counts()} budgets {budgets}")
    for path in written[1:]:
        print(f"  {path}")
    return out_dir


@hydra.main(config_path="../configs", config_name="derive", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run_derive over the composed config."""
    run_main(run_derive, cfg)


if __name__ == "__main__":
    main()
