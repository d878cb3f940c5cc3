"""`rule=search` of `python -m analysis.derive`: load the model and calibration prompts, search, write the front.

Kept apart from analysis/derive.py because it loads a model; `rule=paper` never imports it.
Writes into the output directory: `schedule_<budget>.yaml` per budget, `front.json`, `front.png`,
`candidates.jsonl` (appended as each candidate is scored; a rerun with the same settings resumes from it) and
`reference.pt` (the unpruned answer distribution on the calibration prompts). With `workers=N worker=i` this process
is one of N sharing the search (`analysis.search_workers`, status files in `workers/`); only worker 0 (or the
`workers=N` run without `worker`) writes the schedules and the front.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from analysis.derive import (
    CANDIDATES_FILE, FRONT_FILE, FRONT_PLOT, SEARCH_DEFAULTS, SEARCH_SCORER, DeriveError, SearchedSchedule, _jsonable,
    budget_file, search_schedules,
)
from analysis.objective import OBJECTIVE_DOC, OBJECTIVE_NAME, Calibration, calibration_samples
from analysis.search import Candidate, CandidateStore
from analysis.shift import ShiftResult
from pruning.schedule import CONVENTIONS, Schedule
from vlm.parallel import WorkerSpec

log = logging.getLogger(__name__)


def _model_cfg(cfg: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`model` from the config, else the records' model when it names a loadable source."""
    recorded = manifest.get("model") if isinstance(manifest.get("model"), Mapping) else {}
    if cfg.get("model"):
        model = dict(cfg["model"])
        if recorded.get("name") and model.get("name") and model["name"] != recorded["name"]:
            raise DeriveError(f"model={model['name']!r} but the records at input= were collected on "
                              f"{recorded['name']!r}; pass model={recorded['name']} (or records of this model)")
        return model
    if recorded.get("source") and not recorded.get("arch_sha256") and recorded.get("source") != "None":
        return {"name": recorded.get("name"), "source": recorded["source"], "revision": recorded.get("revision"),
                "dtype": recorded.get("dtype", "auto")}
    raise DeriveError("rule=search needs the model: pass model=<preset> (configs/model/), e.g. model=demo; the "
                      "records' manifest does not name a loadable source")


def _data_preset(name: str) -> dict[str, Any]:
    """configs/data/<name>.yaml as a plain mapping."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "configs" / "data" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise DeriveError(f"calibration={name!r}: no {path}; known data presets: {known}")
    return {"name": name, **OmegaConf.to_container(OmegaConf.load(path), resolve=True)}


def _budgets(cfg: Mapping[str, Any]) -> list[float]:
    budgets = cfg.get("budgets")
    if budgets is None:
        budgets = [cfg["budget"]]
    if isinstance(budgets, (int, float, str)):
        budgets = [budgets]
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0:
            raise DeriveError(f"budgets contains {b!r}; every budget must be a number > 0")
        out.append(float(b))
    return out


def run_search(cfg: Mapping[str, Any], result: ShiftResult, num_layers: int, num_vision: int,
               manifest: Mapping[str, Any], out_dir: Path, name: str, provenance: Mapping[str, Any],
               options: Mapping[str, Any]) -> list[SearchedSchedule]:
    """The searched schedules for `cfg` (rule=search), written with the front into out_dir."""
    from vlm.models import load_from_config

    settings = {**SEARCH_DEFAULTS, **dict(cfg.get("search") or {})}
    budgets = _budgets(cfg)
    data = cfg.get("calibration") or manifest.get("data")
    if isinstance(data, str):
        data = _data_preset(data)
    if not data:
        raise DeriveError("rule=search needs calibration prompts: pass calibration=<data preset>, e.g. "
                          "calibration=shapes_calibration")
    n_cal = int(cfg.get("n_calibration") or 256)
    convention = options.get("convention", "processed")
    positions = options.get("positions", "keep")
    spec = WorkerSpec.from_config(cfg)
    team = None
    if spec.workers > 1 and spec.worker is not None:  # one of several workers sharing out_dir
        from analysis.search_workers import WORKERS_DIR, SearchTeam, settings_digest

        team = SearchTeam(spec, out_dir / WORKERS_DIR, settings_digest(cfg),
                          timeout=float(cfg.get("worker_timeout", 120)))
    t0 = time.perf_counter()
    with team if team is not None else contextlib.nullcontext():  # peers see this worker alive from here on
        loaded = load_from_config(_model_cfg(cfg, manifest))
        if loaded.num_layers != num_layers or loaded.vision_tokens_per_image != num_vision:
            raise DeriveError(f"the model has {loaded.num_layers} layers and {loaded.vision_tokens_per_image} vision "
                              f"tokens, the records {num_layers} and {num_vision}: pass the records' model")
        samples = calibration_samples(data, n_cal)
        calibration = Calibration(loaded, samples, batch_size=int(settings["batch_size"]), cache_dir=out_dir,
                                  max_cached_layers=int(settings["max_cached_layers"]),
                                  mismatch_weight=float(settings["mismatch_weight"]),
                                  progress=bool(settings["progress"]))
        cal_info = {"data": _jsonable(data), **calibration.identity()}
        store_settings = {"objective": OBJECTIVE_NAME, "mismatch_weight": settings["mismatch_weight"],
                          "calibration": cal_info, "convention": convention, "positions": positions,
                          "scorer": SEARCH_SCORER}
        store = CandidateStore(out_dir / CANDIDATES_FILE, store_settings)
        resumed = len(store.rows)

        def objective(cand: Candidate, schedule: Schedule) -> Mapping[str, Any]:
            return calibration.fidelity(schedule, SEARCH_SCORER, cand.scorer_options()).as_dict()

        searched = search_schedules(
            result, budgets, objective, n_stages=cfg["n_stages"], num_layers=num_layers, num_vision=num_vision,
            name=name, provenance={**dict(provenance), "calibration": cal_info}, store=store,
            settings={k: v for k, v in settings.items() if k in SEARCH_DEFAULTS},
            objective_info={"objective": OBJECTIVE_NAME, "definition": OBJECTIVE_DOC,
                            "mismatch_weight": settings["mismatch_weight"]},
            progress=bool(settings["progress"]), team=team, **options,
        )
    if team is not None and spec.worker != 0:
        print(f"search: {team} done in {time.perf_counter() - t0:.0f} s, {team.scored} candidates scored here "
              f"({team.taken_over} of them other workers'); worker 0 writes the schedules and front.json into "
              f"{out_dir}")
        return searched
    seconds = time.perf_counter() - t0
    passes = calibration.counter.as_dict()
    for s in searched:
        s.schedule.provenance["search"]["seconds"] = round(s.seconds, 1)  # this budget's search
        s.schedule.provenance["search"]["call"] = {"budgets": budgets, "passes": passes, "seconds": round(seconds, 1)}
        s.schedule.to_yaml(out_dir / budget_file(s.budget))
    front = [{"budget": s.budget, "schedule": budget_file(s.budget), "scorer": SEARCH_SCORER,
              "scorer_options": s.scorer_options, "layers": s.schedule.layers, "keep": s.schedule.keep_counts(),
              **{f"budget_{c}": round(s.schedule.budget(convention=c), 3) for c in CONVENTIONS},
              **s.search.score, "candidates_looked_at": s.search.visited, "candidates_scored": s.search.scored,
              "seconds": round(s.seconds, 1)} for s in searched]
    summary = {"objective": OBJECTIVE_NAME, "definition": OBJECTIVE_DOC, "convention": convention, "front": front,
               "calibration": cal_info, "passes": passes, "seconds": round(seconds, 1),
               "candidates_scored_now": sum(s.search.scored for s in searched),
               "candidates_from_file": resumed, "settings": {k: v for k, v in settings.items() if k != "progress"},
               "workers": spec.workers}
    (out_dir / FRONT_FILE).write_text(json.dumps(_jsonable(summary), indent=1))
    rows = [{"budget_achieved": r["budget_achieved"], "objective": r["score"]["objective"],
             "n_stages": len(r["layers"])} for r in store.rows.values()]
    try:
        from analysis import plots

        plots.search_front(front, rows, out_dir / FRONT_PLOT, OBJECTIVE_NAME)
    except Exception as exc:  # a figure is never worth losing the search over
        log.warning("front plot failed: %s", exc)
    print(f"search: {len(budgets)} budget(s) in {seconds:.0f} s; forward work {passes}; "
          f"{summary['candidates_scored_now']} candidates scored now, {resumed} read from {out_dir / CANDIDATES_FILE}")
    for f in front:
        print(f"  budget {f['budget']:g}: layers {f['layers']} keep {f['keep']} blend "
              f"{f['scorer_options']['text_weight_blend']:g} objective {f['objective']:.4f} "
              f"(kl {f['kl']:.4f}, mismatch {f['mismatch']:.3f})")
    return searched
