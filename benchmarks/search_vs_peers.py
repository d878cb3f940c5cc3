"""AdaptInfer with searched schedules (analysis.derive rule=search) against the peers at equal processed budgets.

Runs `pruning.benchmark.run_benchmark` once per budget (the searched schedule and its scorer options differ per
budget, and the benchmark takes one schedule_path per method), all rows into one results table, then prints
accuracy and retention (vs the unpruned model) per method and budget as a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/search_vs_peers.py --front outputs/derive_demo --data shapes_test \
        --limit 500 --results /tmp/bench_test [--methods adaptinfer fastv ...] [--out benchmarks/results/x.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from analysis.derive import read_front  # noqa: E402
from pruning import results as res  # noqa: E402
from pruning.benchmark import run_benchmark  # noqa: E402
from pruning.methods import CONFIGS_DIR  # noqa: E402

PEERS = ["adaptinfer", "fastv", "sparsevlm", "pyramiddrop", "visionzip", "random"]
DERIVED = "adaptinfer_derived"
SEARCHED_B1 = "adaptinfer_searched_blend1"  # the searched schedule with the paper's scorer setting
PAPER_B0 = "adaptinfer_paper_blend0"  # the paper-style schedule with uniform text weights


def bench_config(data: str, limit: int, results: Path, methods: list[str], budget: float,
                 extra: dict | None = None) -> dict:
    """The benchmark config for one budget (model=demo, processed convention)."""
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=[
            "model=demo", f"data={data}", f"data.limit={limit}", "convention=processed", "threads=1",
            "progress=false", "plots=false", f"results_dir={results}", "batch_size=16",
        ])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.update(methods=methods, budgets=[budget], method_overrides=extra or {})
    return cfg


def run(front_dir: Path, data: str, limit: int, results: Path, methods: list[str]) -> str:
    """Every method at every budget of the front; returns the markdown table."""
    front = read_front(front_dir)
    t0 = time.perf_counter()
    for entry in front:
        b = entry["budget"]
        budget = int(b) if float(b).is_integer() else b
        overrides = {DERIVED: {"schedule_path": entry["schedule_path"], "scorer_options": entry["scorer_options"]}}
        run_benchmark(bench_config(data, limit, results, [DERIVED, *methods], budget, overrides))
        print(f"budget {budget}: done after {time.perf_counter() - t0:.0f} s", flush=True)
    return table(results, front)


def run_variants(front_dir: Path, data: str, limit: int, results: Path) -> None:
    """Scorer x schedule: the searched schedules with blend 1 (the paper's scorer) and the paper-style schedule with
    blend 0 (uniform text weights), to separate what the schedule and the scorer option each bring."""
    for entry in read_front(front_dir):
        b = entry["budget"]
        budget = int(b) if float(b).is_integer() else b
        for method in ({"name": SEARCHED_B1, "scorer": "adaptinfer", "schedule": "derived",
                        "schedule_path": entry["schedule_path"], "scorer_options": {"text_weight_blend": 1.0}},
                       {"name": PAPER_B0, "scorer": "adaptinfer", "schedule": "allocate", "layers": [1, 10, 20],
                        "reference_layers": 32, "scorer_options": {"text_weight_blend": 0.0}}):
            cfg = bench_config(data, limit, results, [], budget)
            cfg.update(methods=None, method=method)
            run_benchmark(cfg)


def table(results: Path, front: list[dict]) -> str:
    """Markdown: accuracy (retention) per method and budget; '-' = infeasible at that budget."""
    t = res.read_table(results)
    base = t[t["method"] == res.BASELINE_METHOD]["accuracy"].iloc[0]
    budgets = sorted({int(f["budget"]) if float(f["budget"]).is_integer() else f["budget"] for f in front},
                     reverse=True)
    methods = [m for m in [DERIVED, SEARCHED_B1, PAPER_B0, *PEERS] if m in set(t["method"])]
    lines = [f"unpruned accuracy {base:.4f}; cells: accuracy (retention = accuracy / unpruned)", "",
             "| method | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            row = t[(t["method"] == m) & (t["budget"].astype(float) == float(b))]
            if row.empty or row["status"].iloc[0] != res.STATUS_OK:
                cells.append("infeasible" if not row.empty else "")
            else:
                acc = float(row["accuracy"].iloc[0])
                cells.append(f"{acc:.3f} ({acc / base:.3f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("searched schedules: " + "; ".join(
        f"{f['budget']:g}: layers {f['layers']} keep {f['keep']} blend {f['scorer_options']['text_weight_blend']:g}"
        for f in front))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--front", type=Path, required=True, help="a derive output directory with front.json")
    ap.add_argument("--data", default="shapes_test")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--methods", nargs="*", default=PEERS)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    ap.add_argument("--variants", action="store_true",
                    help="also the searched schedules at blend 1 and the paper-style schedule at blend 0")
    args = ap.parse_args()
    text = run(args.front, args.data, args.limit, args.results, args.methods)
    if args.variants:
        run_variants(args.front, args.data, args.limit, args.results)
        text = table(args.results, read_front(args.front))
    emit(text, args.out)


def emit(text: str, out: Path | None) -> None:
    """Print a report and, when `out` is given, write it there."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
