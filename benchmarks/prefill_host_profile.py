"""Where a pruned prefill spends its time on a GPU: wall time of the full forward, GPU busy time, kernel
launches and host-device syncs / copies per variant (one profiled forward each, torch.profiler).

When the wall time exceeds the GPU busy time the prefill is host-bound (Python and kernel launches), and
dropping tokens, which only shortens GPU work, cannot make it faster.

    python benchmarks/prefill_host_profile.py --model llava-1.5-7b-arch --batch 1
    python benchmarks/prefill_host_profile.py --model qwen2.5-vl-7b-arch --batch 1

Any family of vlm.arch (the model, its image inputs and the schedule's depth come from prefill_latency's helpers).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prefill_latency import DEFAULT_GRID, build, keep_all, preset_at_depth, synthetic_inputs  # noqa: E402
from pruning.engine import PruningEngine  # noqa: E402
from pruning.schedule import Schedule  # noqa: E402
from vlm.models import resolve_device  # noqa: E402


def sync_sites(fn) -> collections.Counter:
    """Call `fn` with CUDA's sync debug mode on; count the synchronizing ops by their innermost caller in this
    repository or in transformers."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if str(ROOT) in f.filename or "transformers" in f.filename]
        sites[f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else filename] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    return sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b-arch", help="a configs/model preset with `arch`")
    parser.add_argument("--schedule", default="adaptinfer_7b_64",
                        help="a configs/schedule preset (stage layers scaled to the model's depth)")
    parser.add_argument("--image-grid", type=int, nargs=2, default=list(DEFAULT_GRID), metavar=("ROWS", "COLS"),
                        help="vision-token grid of the synthetic image where the family does not fix one (Qwen)")
    parser.add_argument("--layers", type=int, default=None, help="override the decoder depth (a quick dry run)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stacks", action="store_true", help="also print where the synchronizing ops come from")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print the N functions with the most host time in the pruned forwards (cProfile)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    loaded = build(args.model, device, layers=args.layers)
    inputs = synthetic_inputs(loaded, args.batch, 40, 35, tuple(args.image_grid))
    sched = preset_at_depth(args.schedule, loaded.num_layers)
    variants = {"unpruned": None, args.schedule: sched, "keep-all": keep_all(sched)}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(schedule: Schedule | None) -> None:
        if schedule is None:
            loaded.model(**inputs)
            return
        with PruningEngine(loaded.model, schedule, "adaptinfer"):
            loaded.model(**inputs)

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for _ in range(args.warmup):
            for schedule in variants.values():
                run(schedule)
        for name, schedule in variants.items():
            wall = []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                run(schedule)
                sync()
                wall.append(1e3 * (time.perf_counter() - t0))
            with torch.profiler.profile(activities=activities, with_stack=args.stacks) as prof:
                run(schedule)
                sync()
            events = prof.key_averages()
            n_sync = sum(e.count for e in events if "Synchronize" in e.key)
            n_copy = sum(e.count for e in events if "Memcpy" in e.key)
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            busy = sum(e.self_device_time_total for e in events) / 1e3
            print(f"{name:18s} full-forward wall median {statistics.median(wall):7.1f} ms | GPU busy {busy:7.1f} ms | "
                  f"kernel launches {launches} | syncs {n_sync} | memcpy {n_copy}", flush=True)
            if args.cprofile and schedule is not None and name != "keep-all":
                stats_of = cProfile.Profile()
                stats_of.runcall(lambda: [run(schedule) for _ in range(5)] and sync())
                print(f"    host time of 5 forwards, top {args.cprofile} functions by own time:", flush=True)
                pstats.Stats(stats_of, stream=sys.stdout).sort_stats("tottime").print_stats(args.cprofile)
            if args.stacks and device.type == "cuda":
                for site, count in sync_sites(lambda: run(schedule)).most_common():
                    print(f"    {count:3d} synchronizing op(s) at {site}", flush=True)


if __name__ == "__main__":
    main()
