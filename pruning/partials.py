"""One benchmark run split over workers: each worker's partial output as a part file, and the merge into one output.

A run (model, task, method, budget: one row's key) evaluated with `workers=N` gives each worker the samples of its
blocks (`vlm.parallel`, blocks of `batch_size`); worker i writes

    results_dir/parts/<method>@<budget>-<run hash>/worker-<i>-of-<N>.json

atomically: the sample ids it evaluated, in its order, and its `RunOutput` (predictions, FLOPs summed over its
samples, generation time, peak memory; prefill latency from worker 0 only, the others leave it NaN). `merge_outputs`
puts the predictions back in the split's order, so the task's official metric is computed over all predictions
(never averaged from per-worker scores), and combines the measurements: prefill latency and tokens per layer from
worker 0 (which times the same fixed batch the one-worker run times), FLOPs and generation time per sample over all
samples, peak memory the maximum over workers.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from pruning.flops import to_tflops
from pruning.runner import RunOutput
from vlm.parallel import ParallelError, merge_slices, missing_workers
from vlm.tasks.base import VQASample

PARTS_DIR = "parts"


def part_dir(results_dir: Path, key: Mapping[str, Any], run_hash: str) -> Path:
    """The directory of one run's parts: results_dir/parts/<method>@<budget>-<run_hash>."""
    label = f"{key['method']}@{key['budget']}"
    safe = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in label)
    return Path(results_dir) / PARTS_DIR / f"{safe}-{run_hash}"


def part_payload(sample_ids: Sequence[str], output: RunOutput | None, block: int) -> dict[str, Any]:
    """What a worker writes: its sample ids (in order), the block size of the slicing, and its output (None when
    its share of the samples is empty)."""
    return {"sample_ids": [str(i) for i in sample_ids], "block": int(block),
            "output": dataclasses.asdict(output) if output is not None else None}


def merge_outputs(parts: Mapping[int, Mapping[str, Any]], samples: Sequence[VQASample], workers: int) -> RunOutput:
    """One RunOutput for all `samples` from every worker's part (see the module docstring); ParallelError when a
    part is missing or the parts do not cover exactly these samples."""
    missing = missing_workers(parts, workers)
    if missing:
        raise ParallelError(f"cannot merge: the parts of workers {missing} (of {workers}) are missing")
    blocks = {int(p["block"]) for p in parts.values()}
    if len(blocks) != 1:
        raise ParallelError(f"the parts were split with different batch sizes {sorted(blocks)}; rerun every worker "
                            "with the same batch_size")
    block = blocks.pop()
    ids = [str(s.sample_id) for s in samples]
    try:
        merged_ids = merge_slices({w: p["sample_ids"] for w, p in parts.items()}, len(ids), workers, block)
    except ParallelError as err:
        raise ParallelError(f"the workers' parts do not cover the {len(ids)} samples of this run ({err}); "
                            "rerun the workers with the same data and batch_size") from None
    if merged_ids != ids:
        raise ParallelError("the workers' parts hold other samples than this run's; rerun them with the same data")
    outputs = {w: RunOutput(**p["output"]) for w, p in parts.items() if p["output"] is not None}
    if 0 not in outputs:
        raise ParallelError("worker 0's part is empty; it holds the first samples and the timing, so it cannot be")
    predictions = merge_slices({w: outputs[w].predictions if w in outputs else [] for w in parts}, len(ids),
                               workers, block)
    first = outputs[0]
    n = sum(o.n_samples for o in outputs.values())
    flops = sum(o.flops_total for o in outputs.values())
    peaks = [o.peak_mem_mb for o in outputs.values() if not math.isnan(o.peak_mem_mb)]
    return RunOutput(
        predictions=predictions,
        prefill_ms=first.prefill_ms,
        generate_ms=sum(o.generate_ms * o.n_samples for o in outputs.values()) / n,
        tflops=to_tflops(flops / n),
        peak_mem_mb=max(peaks) if peaks else float("nan"),
        vision_per_layer=first.vision_per_layer,
        tokens_per_layer=first.tokens_per_layer,
        n_samples=n,
        timing_batch=first.timing_batch,
        device=first.device,
        extras={**first.extras, "workers": workers},
        flops_total=flops,
        vision_counts=merge_slices({w: outputs[w].vision_counts if w in outputs else [] for w in parts}, len(ids),
                                   workers, block)
        if all(len(o.vision_counts) == o.n_samples for o in outputs.values()) else [],  # parts of older versions: none
    )


__all__ = ["PARTS_DIR", "merge_outputs", "part_dir", "part_payload"]
