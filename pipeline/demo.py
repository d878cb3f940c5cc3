"""`python -m pipeline.demo` (`make demo`): the whole pipeline on the embedded default, end to end.

1. collect text-to-vision attention on the shapes calibration split (analysis.collect.run_collect);
2. search a schedule of up to 3 stages for each benchmark budget (analysis.derive.run_derive, rule=search: the
   fidelity objective on calibration prompts; a front of schedules with their scorer options);
3. benchmark the unpruned model, AdaptInfer (derived and paper-style schedules) and every other method
   (configs/experiment/demo.yaml) at processed budgets 256 / 192 / 160 on the shapes test split
   (pruning.benchmark.run_benchmark, configs/experiment/demo.yaml): every method at equal cost;
4. print the summary (with its ranking at equal processed budget) and where the table and plots are.

Model: the embedded demo model (`model=demo`, vlm/assets/shapes_llava). Without its weights the demo falls back
to the random-weight `tiny` preset, says so loudly, and its numbers are noise.

Budgets are in the "processed" convention: the mean vision tokens each decoder layer really processes, i.e. what a
method costs (configs/experiment/demo.yaml says why these budgets); results.csv holds the paper convention beside.
Everything lands in `outputs/demo/` and every step resumes: collect skips stored samples, derive is skipped when
its front covers the budgets (and resumes its candidates otherwise), the benchmark skips rows already in the table.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pruning import results as res
from pruning.benchmark import run_benchmark
from pruning.methods import CONFIGS_DIR, front_entry
from pruning.schedule import ScheduleError, read_front
from vlm.cli import run_main
from vlm.errors import UserError
from vlm.models import DEMO_MODEL_DIR

log = logging.getLogger(__name__)

OUT_DIR = Path("outputs/demo")
CALIBRATION_SAMPLES = 256
# Test questions per run (30 per question family), the same questions for every method. Chosen so the whole demo
# stays under 15 minutes on a 2-core CPU: measured 11.8 min for collect (256) + derive + 22 benchmark runs of 150
# questions with the demo architecture, on a machine shared with a training job. Raise it for tighter accuracy
# estimates (the standard error of an accuracy near 0.8 is about 0.03 at 150 questions).
TEST_LIMIT = 150
N_STAGES = 3
# The schedule search, sized for a demo that stays under 10 minutes on 2 CPU cores: 64 calibration prompts and 12
# candidates per budget (the defaults, 256 and 24, take about 3 minutes per budget here; see README).
SEARCH_CALIBRATION = 64
SEARCH_SETTINGS = {"max_candidates": 12}
DEMO_COLUMNS = ("task", "method", "budget", "accuracy", "retention", "prefill_ms", "tflops")
BANNER = "=" * 100


class DemoError(UserError, RuntimeError):
    """A demo step that cannot run; the message says which and what to do."""


def _compose(config_name: str, overrides: Sequence[str]) -> dict[str, Any]:
    """A config from configs/ composed with overrides, as a plain resolved dict (no Hydra run)."""
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def demo_model_available() -> bool:
    """True when the trained demo model ships with this checkout."""
    return (DEMO_MODEL_DIR / "config.json").is_file() and any(DEMO_MODEL_DIR.glob("*.safetensors"))


def _preset(group: str, name: str) -> dict[str, Any]:
    """configs/<group>/<name>.yaml as a plain dict."""
    path = CONFIGS_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise DemoError(f"the demo needs {path} (the {group} preset {name!r}); restore it from the repository")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def choose_model(out_dir: Path) -> dict[str, Any]:
    """The demo model's preset, or (loudly) the tiny random-weight preset when the demo weights are absent."""
    if demo_model_available():
        return _preset("model", "demo")
    print(f"\n{BANNER}\nWARNING: the trained demo model is missing ({DEMO_MODEL_DIR}).\n"
          "Falling back to the RANDOM-WEIGHT `tiny` model: the pipeline runs, but every accuracy below is noise.\n"
          f"Restore vlm/assets/shapes_llava (re-clone) or train it with `python -m vlm.shapes.train`.\n{BANNER}\n",
          flush=True)
    model = _preset("model", "tiny")
    if model.get("processor") == "demo" and not (DEMO_MODEL_DIR / "tokenizer.json").is_file():
        from vlm.shapes.processor import build_processor

        proc_dir = out_dir / "processor"
        if not (proc_dir / "tokenizer.json").is_file():
            build_processor().save_pretrained(proc_dir)
        model["processor"] = str(proc_dir)
    return model


def _data(name_or_cfg: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(name_or_cfg, Mapping):
        return dict(name_or_cfg)
    return _preset("data", str(name_or_cfg))


def collect_step(model: Mapping[str, Any], data: Mapping[str, Any], out_dir: Path, n_samples: int) -> Path:
    """Attention records on the calibration split (resumes in out_dir/records_<model>)."""
    from analysis.collect import run_collect

    cfg = _compose("collect", [])
    cfg.update(model=dict(model), data=dict(data), n_samples=n_samples, output=str(out_dir / f"records_{model['name']}"))
    return run_collect(cfg)


def derive_step(records: Path, out_dir: Path, model: Mapping[str, Any], budgets: Sequence[float],
                convention: str) -> Path:
    """The searched front from the records: one schedule per benchmark budget (analysis.derive rule=search, up to
    N_STAGES stages from layer 0 on), sized for the demo; returns the derive directory (the front's home)."""
    from analysis.derive import DeriveError, run_derive

    target = out_dir / f"derive_{model['name']}"
    try:
        front = read_front(target)
    except ScheduleError:
        front = []
    if all(front_entry(front, b, convention) is not None for b in budgets):  # the benchmark finds each budget's entry
        print(f"derive: reusing the front in {target}")
        return target
    cfg = _compose("derive", [f"input={records}"])
    cfg.update(output=str(target), rule="search", budget=budgets[0], budgets=list(budgets), n_stages=N_STAGES,
               convention=convention, min_layer=0, model=dict(model), n_calibration=SEARCH_CALIBRATION,
               search={**cfg["search"], **SEARCH_SETTINGS})
    try:
        run_derive(cfg)
    except (DeriveError, ScheduleError) as err:
        raise DemoError(f"analysis.derive could not search a schedule: {err}") from err
    return target


def run_demo(
    out_dir: str | Path = OUT_DIR,
    *,
    calibration_samples: int = CALIBRATION_SAMPLES,
    test_limit: int = TEST_LIMIT,
    calibration_data: str | Mapping[str, Any] = "shapes_calibration",
    test_data: str | Mapping[str, Any] = "shapes_test",
    model: Mapping[str, Any] | None = None,
    benchmark_overrides: Sequence[str] = (),
) -> Path:
    """Collect -> derive -> benchmark into `out_dir`; prints the summary; returns the path of results.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = dict(model) if model is not None else choose_model(out_dir)
    bench = _compose("benchmark", ["+experiment=demo", *benchmark_overrides])
    convention = bench["convention"]

    print(f"[1/3] collect: {calibration_samples} calibration samples on {model['name']}", flush=True)
    records = collect_step(model, _data(calibration_data), out_dir, calibration_samples)

    print(f"[2/3] derive: search up to {N_STAGES} stages per budget {bench['budgets']} ({convention} convention), "
          f"{SEARCH_CALIBRATION} calibration prompts", flush=True)
    try:
        schedule: Path | None = derive_step(records, out_dir, model, bench["budgets"], convention)
    except DemoError as err:
        schedule = None
        bench["methods"] = [m for m in bench["methods"] if m != "adaptinfer_derived"]
        print(f"\n{BANNER}\nWARNING: no schedule could be derived, so adaptinfer_derived is left out:\n{err}\n{BANNER}\n")

    print(f"[3/3] benchmark: {', '.join(bench['methods'])} at budgets {bench['budgets']} on {test_limit} test "
          "questions", flush=True)
    data = _data(test_data)
    data["limit"] = test_limit
    bench.update(model=model, data=data, results_dir=str(out_dir))
    if schedule is not None:
        bench["method_overrides"] = {**(bench.get("method_overrides") or {}),
                                     "adaptinfer_derived": {"schedule_path": str(schedule)}}
    run_benchmark(bench)

    table = res.read_table(out_dir)
    missing = [c for c in DEMO_COLUMNS if c not in table.columns]
    if missing:
        raise DemoError(f"{out_dir / res.RESULTS_NAME} lacks the columns {missing}")
    minutes = (time.perf_counter() - t0) / 60
    print("\n" + (out_dir / res.SUMMARY_NAME).read_text())
    print(f"results: {out_dir / res.RESULTS_NAME}\nsummary: {out_dir / res.SUMMARY_NAME}\n"
          f"plots:   {out_dir / res.PLOTS_DIR}/"
          + (f" and {schedule}/ (the searched front, attention heatmap, inflection histogram)" if schedule else "") + "\n"
          f"wall time of this invocation: {minutes:.1f} min")
    return out_dir / res.RESULTS_NAME


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m pipeline.demo [--out DIR] [--test-limit N] [--calibration-samples N]`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--test-limit", type=int, default=TEST_LIMIT)
    ap.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    run_main(run_demo, args.out, test_limit=args.test_limit, calibration_samples=args.calibration_samples)


if __name__ == "__main__":
    main()
