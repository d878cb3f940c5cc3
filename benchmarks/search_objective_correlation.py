"""Does the search objective predict accuracy? Spearman rank correlation between a schedule's fidelity objective on
the calibration prompts and its accuracy on a test split, over schedules the search scored.

Reads `candidates.jsonl` of a derive output (rule=search), picks per budget `--per-budget` candidates spread over
the objective's range (the best, the worst and evenly spaced ranks between), evaluates each with the adaptinfer
scorer and the candidate's text_weight_blend on `--data` (greedy answers, the task's exact match) and prints the
table and the correlation (objective vs accuracy: a good objective gives a strongly negative rho; the report
states -rho, so 1 is perfect agreement).

    OMP_NUM_THREADS=1 python benchmarks/search_objective_correlation.py --derive outputs/derive_demo \
        --data shapes_test --limit 500 --per-budget 3 --out benchmarks/results/search_objective_correlation.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from analysis.derive import CANDIDATES_FILE  # noqa: E402
from analysis.search import Candidate  # noqa: E402
from benchmarks.search_vs_peers import emit  # noqa: E402
from pruning.runner import TimingSpec, evaluate  # noqa: E402
from vlm.models import load_from_config  # noqa: E402
from vlm.tasks.base import build_task, data_spec  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def pick(rows: list[dict], per_budget: int) -> list[dict]:
    """Per budget: `per_budget` candidates at evenly spaced objective ranks (best and worst included)."""
    out = []
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        ranked = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["score"]["objective"])
        if len(ranked) <= per_budget:
            out += ranked
            continue
        idx = sorted({round(i * (len(ranked) - 1) / max(per_budget - 1, 1)) for i in range(per_budget)})
        out += [ranked[i] for i in idx]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--derive", type=Path, required=True, help="derive output directory (rule=search)")
    ap.add_argument("--data", default="shapes_test")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--per-budget", type=int, default=3)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (args.derive / CANDIDATES_FILE).read_text().splitlines() if line.strip()]
    chosen = pick(rows, args.per_budget)
    data = data_spec({**OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / f"{args.data}.yaml")),
                      "limit": args.limit})
    task = build_task(data["task"], **data["options"])
    samples = list(task.samples(data["split"], limit=data["limit"]))
    loaded = load_from_config(OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml")))
    timing = TimingSpec(batch_size=1, warmup=0, repeats=1)
    t0 = time.perf_counter()
    base = task.score(evaluate(loaded, samples, batch_size=16, max_new_tokens=task.max_new_tokens, timing=timing,
                               progress=False).predictions, samples)["score"]
    table = []
    for r in chosen:
        cand = Candidate(tuple(r["layers"]), tuple(r["keeps"]), float(r["blend"]))
        schedule = cand.schedule(loaded.num_layers, loaded.vision_tokens_per_image)
        out = evaluate(loaded, samples, schedule=schedule, scorer="adaptinfer", scorer_options=cand.scorer_options(),
                       batch_size=16, max_new_tokens=task.max_new_tokens, timing=timing, progress=False)
        acc = task.score(out.predictions, samples)["score"]
        table.append({**r["score"], "budget": r["budget"], "key": r["key"], "accuracy": acc})
        print(f"{r['budget']:g} {r['key']}: objective {r['score']['objective']:.4f} accuracy {acc:.4f}", flush=True)
    rho_obj = spearmanr([t["objective"] for t in table], [t["accuracy"] for t in table]).statistic
    rho_mm = spearmanr([t["mismatch"] for t in table], [t["accuracy"] for t in table]).statistic
    rho_kl = spearmanr([t["kl"] for t in table], [t["accuracy"] for t in table]).statistic
    lines = [
        f"# Search objective vs test accuracy ({args.model}, {len(table)} searched schedules, {data['name']} "
        f"limit {args.limit}; unpruned accuracy {base:.4f})", "",
        f"command: `OMP_NUM_THREADS=1 python benchmarks/search_objective_correlation.py --derive {args.derive} "
        f"--data {args.data} --limit {args.limit} --per-budget {args.per_budget}`", "",
        f"Spearman rank correlation, calibration objective vs {data['name']} accuracy: rho = {rho_obj:.3f} "
        f"(-rho = {-rho_obj:.3f}; 1 = the objective orders schedules exactly as accuracy does)",
        f"components: KL alone -rho = {-rho_kl:.3f}, first-token mismatch alone -rho = {-rho_mm:.3f}", "",
        "| budget | candidate (layer:keep, blend) | objective | kl | mismatch | accuracy | retention |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in sorted(table, key=lambda t: (-t["budget"], t["objective"])):
        lines.append(f"| {t['budget']:g} | `{t['key']}` | {t['objective']:.4f} | {t['kl']:.4f} | {t['mismatch']:.3f} "
                     f"| {t['accuracy']:.4f} | {t['accuracy'] / base:.3f} |")
    lines.append("")
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
