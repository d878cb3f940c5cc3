"""One worker against N workers on the demo model: same records, same benchmark rows; wall times of both.

    OMP_NUM_THREADS=1 python benchmarks/parallel_workers.py [--workers 3] [--n-samples 96] [--limit 90]
        [--out benchmarks/results/parallel_workers_cpu.md]

Runs, in a scratch directory, exactly what a user types: `python -m analysis.collect ... output=DIR` once, and N
processes `... workers=N worker=i` started together (`for i in ...; do ... & done; wait`); then the same for
`python -m pruning.benchmark method=fastv budgets=[192] data.limit=...`. Compares the records (ids, tensors, order)
and the results rows (accuracy, metrics, counts, FLOPs, identity), times each step, and writes a markdown report.
On a machine with fewer cores than workers the N-worker wall time includes the processes waiting for each other.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.records import RecordStore  # noqa: E402
from pruning import results as res  # noqa: E402

ROW_FIELDS = ("method", "budget", "setup_id", "variant_id", "status", "schedule", "budget_processed", "accuracy",
              "tflops", "n_samples", "timing_batch", "vision_per_layer", "tokens_per_layer")


def run_all(commands: list[list[str]], cwd: Path) -> float:
    """Start the commands together, wait for all; seconds of wall time. Raises if one fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, *c], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    for c, p in zip(commands, procs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{shlex.join(c)} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=96)
    parser.add_argument("--limit", type=int, default=90)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parallel_workers_cpu.md"))
    args = parser.parse_args()
    n = args.workers
    scratch = Path(tempfile.mkdtemp(prefix="parallel_workers_"))
    collect = ["-m", "analysis.collect", "data=shapes_calibration", f"n_samples={args.n_samples}"]
    bench = ["-m", "pruning.benchmark", "method=fastv", "budgets=[192]", f"data.limit={args.limit}", "plots=false",
             "progress=false"]
    lines = ["# One worker against N workers on the demo model", "",
             f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}`, {os.cpu_count()} CPU cores on the machine "
             f"(shared), torch {torch.__version__}. Produced by `python benchmarks/parallel_workers.py --workers {n} "
             f"--n-samples {args.n_samples} --limit {args.limit}`.", "",
             "| step | command (in a scratch directory) | wall s |", "|---|---|---|"]

    t_c1 = run_all([collect + ["output=calib1"]], scratch)
    t_cn = run_all([collect + ["output=calibN", f"workers={n}", f"worker={i}"] for i in range(n)], scratch)
    run_all([collect + ["output=calibN", f"workers={n}"]], scratch)  # the merge-only check passes
    one, many = RecordStore.open(scratch / "calib1").load(), RecordStore.open(scratch / "calibN").load()
    same_ids = one.ids == many.ids
    same_t2v = torch.equal(one.t2v, many.t2v)
    same_scalars = all(torch.equal(one.scalars[k], many.scalars[k]) for k in one.scalars)
    max_diff = float((one.t2v - many.t2v).abs().max()) if one.t2v.shape == many.t2v.shape else float("nan")
    shards1, shardsN = (len(RecordStore.open(scratch / d).manifest["shards"]) for d in ("calib1", "calibN"))

    t_b1 = run_all([bench + ["results_dir=bench1"]], scratch)
    t_bn = run_all([bench + ["results_dir=benchN", f"workers={n}", f"worker={i}"] for i in range(n)], scratch)
    run_all([bench + ["results_dir=benchN", f"workers={n}"]], scratch)
    rows = {d: res.read_table(scratch / d).sort_values("method").reset_index(drop=True) for d in ("bench1", "benchN")}
    fields = list(ROW_FIELDS) + sorted(c for c in rows["bench1"].columns if c.startswith("metric_"))
    same_rows = rows["bench1"][fields].equals(rows["benchN"][fields])

    c1 = shlex.join(["python", *collect, "output=calib1"])
    cn = f"for i in {' '.join(map(str, range(n)))}; do {shlex.join(['python', *collect, 'output=calibN', f'workers={n}'])} worker=$i & done; wait"
    b1 = shlex.join(["python", *bench, "results_dir=bench1"])
    bn = f"for i in {' '.join(map(str, range(n)))}; do {shlex.join(['python', *bench, 'results_dir=benchN', f'workers={n}'])} worker=$i & done; wait"
    lines += [f"| collect, 1 worker | `{c1}` | {t_c1:.1f} |", f"| collect, {n} workers | `{cn}` | {t_cn:.1f} |",
              f"| benchmark, 1 worker | `{b1}` | {t_b1:.1f} |", f"| benchmark, {n} workers | `{bn}` | {t_bn:.1f} |", "",
              f"Records ({len(one)} samples; {shards1} shards from 1 worker, {shardsN} from {n}): ids and order equal: "
              f"{same_ids}; t2v equal (torch.equal): {same_t2v} (max abs difference {max_diff:g}); scalars equal: "
              f"{same_scalars}.", "",
              f"Rows (columns {', '.join(fields)}) equal: {same_rows}.", ""]
    for d, label in (("bench1", "1 worker"), ("benchN", f"{n} workers")):
        frame = rows[d][["method", "budget", "accuracy", "tflops", "n_samples", "prefill_ms", "generate_ms",
                         "peak_mem_mb"]]
        lines += [f"{label}:", "", "| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)] + [""]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    if not (same_ids and same_t2v and same_scalars and same_rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
